"""Environment variables as flag defaults: `LORAPLEX_<FLAG>` for each `--<flag>` of `loraplex serve`.

Containers and process managers configure a server through its environment (`docker run -e
LORAPLEX_ADAPTER_DIR=/adapters ...`). Precedence: the flag on the command line, then its variable, then
the built-in default. An empty variable counts as unset. A variable whose value the flag would refuse is
reported when the subcommand runs (not while the parser is built, so that it cannot break `--help`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

PREFIX = "LORAPLEX_"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def env_name(dest: str) -> str:
    """The variable of an option: `--max-batch-size` (dest `max_batch_size`) -> `LORAPLEX_MAX_BATCH_SIZE`."""
    return PREFIX + dest.upper()


def _parse(action: argparse.Action, raw: str) -> object:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        word = raw.strip().lower()
        if word not in _TRUE | _FALSE:
            raise ValueError("expected one of 1/0, true/false, yes/no, on/off")
        return (word in _TRUE) == isinstance(action, argparse._StoreTrueAction)
    try:
        value = action.type(raw) if callable(action.type) else raw
    except (TypeError, ValueError):
        raise ValueError(f"expected {getattr(action.type, '__name__', 'a valid value')}") from None
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"expected one of {', '.join(map(str, action.choices))}")
    return value


def apply_env_defaults(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None) -> None:
    """Give every option of `parser` its `LORAPLEX_*` variable as default, and name the variable in `--help`.

    Values the option would refuse are collected in the parsed namespace as `env_errors` (see `env_errors`).
    """
    environ = os.environ if environ is None else environ
    errors: list[str] = []
    for action in parser._actions:
        if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        name = env_name(action.dest)
        if action.help is not argparse.SUPPRESS:
            action.help = f"{action.help} [${name}]" if action.help else f"[${name}]"
        raw = environ.get(name, "")
        if raw == "":
            continue
        try:
            action.default = _parse(action, raw)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            errors.append(f"${name}={raw!r} is not a valid {action.option_strings[-1]}: {exc}")
    parser.set_defaults(env_errors=errors)


def env_errors(args: argparse.Namespace) -> list[str]:
    """The messages `apply_env_defaults` collected for the parsed subcommand (empty when all is well)."""
    return list(getattr(args, "env_errors", []))


__all__ = ["PREFIX", "apply_env_defaults", "env_errors", "env_name"]
