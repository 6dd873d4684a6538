"""Render the flag tables of docs/configuration.md from the command line's own parsers.

    python docs/reference.py           # rewrite the tables between the BEGIN/END markers
    python docs/reference.py --check   # exit 1 if docs/configuration.md is stale

Each table lists every option of one subcommand with its default and help text; `loraplex serve`'s also
names the LORAPLEX_* variable of each flag. Defaults are rendered with no LORAPLEX_* variable set, so the
tables show the built-in values. tests/test_docs.py runs the check.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from unittest import mock

DOC = Path(__file__).resolve().parent / "configuration.md"
SUBCOMMANDS = ("serve", "train", "demo", "health")
_VARIABLE = re.compile(r"\s*\[\$LORAPLEX_[A-Z_]+\]$")


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from loraplex.cli import build_parser

    clean = {k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}
    with mock.patch.dict(os.environ, clean, clear=True):
        parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: sub.choices[name] for name in SUBCOMMANDS}


def _default(action: argparse.Action) -> str:
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "off" if isinstance(action, argparse._StoreTrueAction) else "on"
    if action.required:
        return "required"
    if action.default is None or action.default == "":
        return "—"
    return f"`{action.default}`"


def _help(action: argparse.Action) -> str:
    text = _VARIABLE.sub("", action.help or "")
    text = re.sub(r" ?\(default %\(default\)s\)|default %\(default\)s; ", "", text)  # the default column says it
    text = text % {**vars(action), "default": action.default} if "%(" in text else text
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        text = f"{text}{'' if not text or text.endswith('.') else ';'} one of {', '.join(f'`{c}`' for c in action.choices)}.".strip()
    return text.replace("|", "\\|").replace("\n", " ")


def table(name: str, parser: argparse.ArgumentParser) -> str:
    with_variables = name == "serve"
    head = "| flag | variable | default | meaning |\n|---|---|---|---|" if with_variables else \
        "| flag | default | meaning |\n|---|---|---|"
    rows = [head]
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        flags = ", ".join(f"`{flag}`" for flag in action.option_strings)
        variable = f"`LORAPLEX_{action.dest.upper()}`" if with_variables else None
        cells = [flags, *([variable] if variable else []), _default(action), _help(action)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def render(text: str) -> str:
    """`text` with each `<!-- BEGIN flags:NAME -->...<!-- END flags:NAME -->` block regenerated."""
    for name, parser in _parsers().items():
        begin, end = f"<!-- BEGIN flags:{name} -->", f"<!-- END flags:{name} -->"
        if begin not in text or end not in text:
            raise SystemExit(f"{DOC} lacks the markers {begin} ... {end}")
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{begin}\n{table(name, parser)}\n{end}{tail}"
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the document is stale")
    args = p.parse_args(argv)
    current = DOC.read_text()
    fresh = render(current)
    if args.check:
        if fresh != current:
            print(f"{DOC} is stale: run `python docs/reference.py`", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
