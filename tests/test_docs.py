"""The documentation stays true: generated tables in sync, every `loraplex` command shown parses, every
Python block compiles, every relative link resolves."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from loraplex.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", ROOT / "BENCHMARKS.md", ROOT / "clients" / "python" / "README.md",
               *(ROOT / "docs").glob("*.md")])
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(language: str) -> list[tuple[Path, str]]:
    return [(doc, body) for doc in DOCS for lang, body in FENCE.findall(doc.read_text()) if lang == language]


def loraplex_commands() -> list[tuple[Path, list[str]]]:
    """Each `loraplex ...` invocation in a bash block (after `&&`, `$(...)` or environment assignments)."""
    found = []
    for doc, body in blocks("bash"):
        for line in re.sub(r"\\\n", " ", body).splitlines():
            for part in re.split(r"&&|\|\||;|\||&$", line.split("#")[0].strip()):
                words = shlex.split(part.strip())
                while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                    words = words[1:]
                if words and words[0] == "loraplex":
                    found.append((doc, words[1:]))
    return found


def test_configuration_reference_is_generated_from_the_parsers():
    result = subprocess.run([sys.executable, str(ROOT / "docs" / "reference.py"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_configuration_reference_lists_every_flag():
    text = (ROOT / "docs" / "configuration.md").read_text()
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, subparser in sub.choices.items():
        for action in subparser._actions:
            for flag in action.option_strings:
                assert f"`{flag}`" in text or flag in ("-h", "--help"), f"loraplex {name} {flag}"


COMMANDS = loraplex_commands()


def test_docs_show_loraplex_commands():
    assert {argv[0] for _, argv in COMMANDS if argv} >= {"serve", "train", "demo", "health"}


@pytest.mark.parametrize("doc, argv", COMMANDS, ids=[f"{d.name}:{' '.join(a)[:40]}" for d, a in COMMANDS])
def test_every_loraplex_command_shown_parses(doc, argv):
    if argv in (["--help"], ["--version"]) or "--help" in argv:
        return
    build_parser().parse_args(argv)  # SystemExit (exit 2) on an unknown flag or a bad value


@pytest.mark.parametrize("doc, body", blocks("python"), ids=lambda v: v.name if isinstance(v, Path) else "")
def test_every_python_block_compiles(doc, body):
    compile(body, str(doc), "exec")


def test_relative_links_resolve():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if not re.match(r"[a-z]+://|mailto:", target) and not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken
