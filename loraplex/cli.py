"""The `loraplex` command line.

Each subcommand lives in its own module, which provides `add_parser(subparsers) -> ArgumentParser` and
`run(args) -> int` (the exit status). Adding one is adding its module to `SUBCOMMANDS`; the modules keep
their heavy imports (torch, transformers) inside `run`, so that `loraplex --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import import_module

from . import __version__

SUBCOMMANDS: tuple[str, ...] = (
    "loraplex.server.app",  # serve
    "loraplex.trainer.cli",  # train
    "loraplex.demo",  # demo
    "loraplex.health",  # health
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description="One base model, many task adapters, "
                                     "batched together in one forward pass.")
    parser.add_argument("--version", action="version", version=f"loraplex {__version__}")
    subparsers = parser.add_subparsers(dest="command", title="commands", required=True)
    for name in SUBCOMMANDS:
        module = import_module(name)
        module.add_parser(subparsers).set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
