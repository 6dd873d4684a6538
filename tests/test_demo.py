"""`loraplex demo`, the main job, end to end: trains, serves, queries through the SDK, and its adapters
answer held-out prompts (>= 90% exact match per task, and a wrong task id does worse: the demo exits 1
otherwise)."""

from __future__ import annotations

import re

from loraplex.cli import main


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--workdir", str(tmp_path), "--eval-per-task", "20"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (\w+) \| (\w+) \| (\d+)% \| (\d+)% \|", out, flags=re.M)
    assert {r[0] for r in rows} == {"reverse", "sort", "uppercase", "shift"}
    for task, adapter, right, wrong in rows:
        assert int(right) >= 90 and int(wrong) < int(right), (task, right, wrong)
    assert (tmp_path / "adapters" / "strings" / "adapter_config.json").is_file()
    assert "metrics (while serving): http://127.0.0.1:" in out
