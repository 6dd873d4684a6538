"""`loraplex health`: ask a server's standard gRPC health service whether it is SERVING.

For container health checks and scripts: exit status 0 when SERVING, 1 when not (NOT_SERVING while
loading or draining, or unreachable), 2 on bad usage. Health checks need no token. The default address
follows the server's own variables, so that `HEALTHCHECK CMD ["loraplex", "health"]` in an image
configured with `LORAPLEX_PORT` probes the right port. Imports no torch: it runs in well under a second.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

from .envflags import env_name

DEFAULT_PORT = 50051
_WILDCARDS = {"", "0.0.0.0", "::", "[::]"}


def default_address(environ: Mapping[str, str] = os.environ) -> str:
    """127.0.0.1 (or $LORAPLEX_HOST when it names one interface) on $LORAPLEX_PORT (default 50051)."""
    host = environ.get(env_name("host"), "").strip()
    port = environ.get(env_name("port"), "").strip() or str(DEFAULT_PORT)
    host = "127.0.0.1" if host in _WILDCARDS else host
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("health", help="exit 0 if a server's gRPC health status is SERVING",
                              description="Ask a loraplex server's grpc.health.v1 service whether it is SERVING: "
                              "exit 0 if so, 1 if not or unreachable.")
    p.add_argument("--address", default=None, metavar="HOST:PORT",
                   help="server to ask (default: 127.0.0.1 on $LORAPLEX_PORT, else 50051)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="give up after (default %(default)s)")
    p.add_argument("--tls-ca", metavar="FILE", help="PEM root certificate(s) to verify a TLS server with (implies TLS)")
    p.add_argument("--tls-server-name", metavar="NAME",
                   help="name to check the server's certificate against (default: the address's host)")
    p.add_argument("--service", default="", help="health service name (default: the whole server)")
    return p


def run(args: argparse.Namespace) -> int:
    from loraplex_client import Client, LoraplexError

    if args.timeout <= 0:
        print("loraplex health: --timeout must be > 0", file=sys.stderr)
        return 2
    address = args.address or default_address()
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else None
    try:
        with Client(address, root_certificates=args.tls_ca, options=options) as client:
            status = client.health_status(args.service, timeout=args.timeout)
    except LoraplexError as exc:
        print(f"{address}: unreachable ({exc.code.name}: {exc.details})", file=sys.stderr)
        return 1
    except OSError as exc:  # an unreadable --tls-ca
        print(f"loraplex health: {exc}", file=sys.stderr)
        return 2
    print(f"{address}: {status}")
    return 0 if status == "SERVING" else 1


__all__ = ["add_parser", "default_address", "run"]
