"""Benchmark fixtures: the shared builder (`../shared/bench/make_fixture.py`) plus a many-adapter view.

`zipf1000` needs 1000 registered adapters. Writing 1000 distinct smol135 rank-16 adapters would take
~20 GB, so `many_adapters` makes 1000 adapter directories whose files are hard links to the fixture's N
distinct adapters: to the server they are 1000 separate adapters, each read from disk, validated and bound
on its own (the weights repeat every N names; the page cache keeps the reads warm).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# the shared builder sits beside the checkout; LORAPLEX_FIXTURE_BUILDER points elsewhere (a GPU machine that
# received only the repository gets a copy of it)
SHARED_BUILDER = Path(os.environ.get("LORAPLEX_FIXTURE_BUILDER")
                      or Path(__file__).resolve().parents[2] / "shared" / "bench" / "make_fixture.py")

# Presets the shared builder lacks, for the GPU figures of BENCHMARK.md (batch 64 on a 0.5B-1.5B shape):
# `llama1b` has TinyLlama-1.1B's shape (22 layers, hidden 2048, 32 heads / 4 KV heads, MLP 5632) with the
# fixture's 8192-token vocabulary: 1.0B parameters.
EXTRA_PRESETS = {
    "llama1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                    num_key_value_heads=4, vocab_size=8192, max_position_embeddings=2048, rope_theta=10000.0,
                    tie_word_embeddings=False),
}
PRESETS = ("tiny", "smol135", *EXTRA_PRESETS)

# runs the shared builder with EXTRA_PRESETS added to its table: python -c RUN_BUILDER BUILDER PRESETS_JSON ARGS...
RUN_BUILDER = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("make_fixture", sys.argv[1])
builder = importlib.util.module_from_spec(spec)
spec.loader.exec_module(builder)
builder.PRESETS.update(json.loads(sys.argv[2]))
sys.argv = [sys.argv[1], *sys.argv[3:]]
builder.main()
"""


def build_fixture(out: Path, preset: str, adapters: int, rank: int) -> Path:
    """Build (once) the fixture at `out` with the shared builder; returns `out`."""
    if (out / "base" / "config.json").is_file() and len(list((out / "adapters").glob("lora-*"))) >= adapters:
        return out
    if not SHARED_BUILDER.is_file():
        raise SystemExit(f"fixture builder not found at {SHARED_BUILDER}; pass --fixture to an existing fixture "
                         "or set LORAPLEX_FIXTURE_BUILDER")
    cmd = [sys.executable, "-c", RUN_BUILDER, str(SHARED_BUILDER), json.dumps(EXTRA_PRESETS), str(out),
           "--preset", preset, "--adapters", str(adapters), "--rank", str(rank)]
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


if __name__ == "__main__":  # python bench/fixture.py OUT PRESET ADAPTERS RANK: build ahead of a benchmark
    out, preset, adapters, rank = sys.argv[1:5]
    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}: one of {', '.join(PRESETS)}")
    build_fixture(Path(out), preset, int(adapters), int(rank))
