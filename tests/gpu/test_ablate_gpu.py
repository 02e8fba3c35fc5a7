"""tools/ablate.py on a CUDA device: compiled runs sharing one compile cache, --parallel auto
(the first run alone, the next ones together on the GPU), and a rerun that skips finished runs.
Needs the prepared debug corpus and tokenizer (tools/prepare_corpus.py). A few minutes, mostly
compilation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from gpu_checks import GPU_ONLY

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import load_tool, require_prepared_assets  # noqa: E402

pytestmark = GPU_ONLY


@pytest.mark.slow
def test_compiled_grid_shares_the_gpu_and_its_cache(tmp_path, capsys):
    require_prepared_assets()
    ablate = load_tool("ablate")
    out = tmp_path / "grid"
    argv = ["--config", "train_configs/debug.toml", "--out", str(out), "--vary", "layer_pattern=A,D",
            "--seeds", "0,1", "--steps", "20", "--val-freq", "10", "--parallel", "auto"]
    assert ablate.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    runs = {r["variant"]["name"]: r for r in results["runs"]}
    assert set(runs) == {"base", "base@seed1", "layer_pattern=A", "layer_pattern=D"} and not results["missing"]
    assert "compiled" in results["header"]["budget"] and results["header"]["runs at once"].startswith("auto: ")
    assert runs["base"].get("runs_sharing_gpu", 1) == 1  # measured its peak memory alone
    assert max(r.get("runs_sharing_gpu", 1) for r in runs.values()) > 1  # then several at once
    for r in runs.values():
        assert r["final_step"] == 20 and r["peak_memory_gib"] > 0
        assert [p[0] for p in r["val_curve"]] == [1, 10, 20] and r["final_val_loss"] < 10
        assert not (out / r["variant"]["name"] / "checkpoint").exists()  # removed once finished
    assert any((out / "compile_cache" / "inductor").rglob("*.py"))  # the shared inductor cache
    for png in ("val_loss.png", "val_loss_time.png", "delta.png"):
        assert (out / png).stat().st_size > 10_000
    capsys.readouterr()
    assert ablate.main(argv) == 0
    assert capsys.readouterr().out.count("finished earlier, skipped") == 4
