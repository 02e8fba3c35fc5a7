"""tools/bench.py runs end to end (on CPU, tiny): it is the tool GPU numbers come from."""

from __future__ import annotations

import json
import math

from conftest import load_tool


def _bench_module():
    return load_tool("bench")


def test_bench_measures_a_flavor_on_cpu(tmp_path, capsys):
    bench = _bench_module()
    out = tmp_path / "bench.json"
    code = bench.main(["--device", "cpu", "--configs", "debug", "--vocab", "256", "--batch", "2",
                       "--seq", "32", "--steps", "2", "--warmup", "1", "--no-compile",
                       "--json", str(out), "--markdown", str(tmp_path / "bench.md")])
    assert code == 0
    rows = json.loads(out.read_text())
    assert [r["name"] for r in rows] == ["debug V=256"]
    assert rows[0]["tok_per_s"] > 0 and rows[0]["mfu"] > 0
    assert math.isfinite(rows[0]["loss"]) and abs(rows[0]["loss"] - math.log(256)) < 1.0
    assert "| debug V=256 |" in (tmp_path / "bench.md").read_text()
    assert "| config | params | tok/s |" in capsys.readouterr().out
