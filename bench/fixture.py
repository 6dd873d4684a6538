"""Benchmark fixtures: the shared builder (`../shared/bench/make_fixture.py`) plus a many-adapter view.

`zipf1000` needs 1000 registered adapters. Writing 1000 distinct smol135 rank-16 adapters would take
~20 GB, so `many_adapters` makes 1000 adapter directories whose files are hard links to the fixture's N
distinct adapters: to the server they are 1000 separate adapters, each read from disk, validated and bound
on its own (the weights repeat every N names; the page cache keeps the reads warm).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SHARED_BUILDER = Path(__file__).resolve().parents[2] / "shared" / "bench" / "make_fixture.py"


def build_fixture(out: Path, preset: str, adapters: int, rank: int) -> Path:
    """Build (once) the fixture at `out` with the shared builder; returns `out`."""
    if (out / "base" / "config.json").is_file() and len(list((out / "adapters").glob("lora-*"))) >= adapters:
        return out
    if not SHARED_BUILDER.is_file():
        raise SystemExit(f"fixture builder not found at {SHARED_BUILDER}; pass --fixture to an existing fixture")
    cmd = [sys.executable, str(SHARED_BUILDER), str(out), "--preset", preset, "--adapters", str(adapters),
           "--rank", str(rank)]
    print("building fixture:", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)
    return out


def many_adapters(fixture: Path, count: int) -> Path:
    """`fixture/many/z-0000 ... z-{count-1}`, hard links onto the fixture's distinct adapters."""
    sources = sorted((fixture / "adapters").glob("lora-*"))
    out = fixture / "many"
    for i in range(count):
        target = out / f"z-{i:04d}"
        if target.is_dir():
            continue
        target.mkdir(parents=True)
        for f in sources[i % len(sources)].iterdir():
            os.link(f, target / f.name)
    return out
