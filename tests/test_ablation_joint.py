"""Leave-one-out and add-one read together (neollm/ablation/joint.py, tools/ablation_joint.py)."""

from __future__ import annotations

import json

import pytest

from conftest import REPO, load_tool

from neollm.ablation import joint
from neollm.errors import ConfigError

HEADER = {"config": "train_configs/x.toml", "budget": "320 steps", "git commit": "abc1234",
          "command": "python tools/ablate.py --config train_configs/x.toml --set training.local_batch_size=64"}


def grid(folder, verdicts: dict, reference: float, header=HEADER):
    folder.mkdir()
    full = {name: {"quality": q, "delta": d, "threshold": 0.02, "time_per_token_vs_ref": t}
            for name, (q, d, t) in verdicts.items()}
    (folder / "results.json").write_text(json.dumps(
        {"header": header, "reference": {"reference_mean": reference}, "verdicts": full}))
    return folder


def test_each_switch_is_read_from_both_grids(tmp_path):
    loo = grid(tmp_path / "loo", {"-a": ("hurts", 0.10, 0.9),            # removing a hurts: a helps in the stack
                                  "-b": ("within noise", 0.01, 0.99),
                                  "-c": ("helps", -0.08, 1.0),           # removing c helps: c hurts in the stack
                                  "-d": ("hurts", 0.06, 0.95), "-e": ("noise unknown", 0.01, None),
                                  "-only_loo": ("within noise", 0.0, 1.0)}, 5.0)
    add = grid(tmp_path / "add", {"+a": ("hurts", 0.30, 1.1), "+b": ("helps", -0.05, 1.02),
                                  "+c": ("within noise", 0.0, 1.0), "+d": ("within noise", -0.01, 1.0),
                                  "+e": ("helps", -0.04, None)}, 5.2)
    result = joint.joint(loo, add)
    rows = {r["switch"]: r for r in result["rows"]}
    assert rows["a"]["reading"] == "needs the stack: hurts alone, helps inside it"
    assert rows["a"]["stack_delta"] == pytest.approx(-0.10) and rows["a"]["alone_delta"] == pytest.approx(0.30)
    assert rows["b"]["reading"] == "helps alone; unresolved in the stack"  # within noise is not "no effect"
    assert rows["c"]["reading"] == "unresolved alone; hurts in the stack"
    assert rows["d"]["reading"] == "needs the stack: unresolved alone, helps inside it"
    assert rows["e"]["reading"] == "helps alone; noise unknown in the stack"
    assert rows["a"]["stack_time_saved"] == pytest.approx(0.1) and rows["e"]["stack_time_saved"] is None
    assert result["only_in_one"] == ["only_loo"]
    assert [r["switch"] for r in result["rows"]] == ["d", "b", "e", "c", "a"]  # by the summed effect
    text = joint.markdown(result)
    assert "stack minus plain -0.2000" in text and "| a | +0.3000 | 0.0200 | 1.10x | -0.1000 | 0.0200 | 10% |" in text
    assert "| e | -0.0400 | 0.0200 |  | -0.0100 | 0.0200 |  | helps alone; noise unknown in the stack |" in text
    assert "commit `abc1234`, kernel switches the defaults" in text


def test_grids_of_different_budgets_or_kinds_are_refused(tmp_path):
    loo = grid(tmp_path / "loo", {"-a": ("hurts", 0.1, 0.9)}, 5.0)
    other = grid(tmp_path / "other", {"+a": ("hurts", 0.3, 1.1)}, 5.2, {**HEADER, "budget": "640 steps"})
    with pytest.raises(ConfigError, match="differ in budget"):
        joint.joint(loo, other)
    flavor = grid(tmp_path / "flavor", {"+a": ("hurts", 0.3, 1.1)}, 5.2,
                  {**HEADER, "command": HEADER["command"] + " --set model.flavor=plain"})
    with pytest.raises(ConfigError, match=r"differ in --set changes: .*'model.flavor=plain'"):
        joint.joint(loo, flavor)
    vary = grid(tmp_path / "vary", {"layer_pattern=A": ("hurts", 0.3, 1.1)}, 5.2)
    with pytest.raises(ConfigError, match=r"expected a leave-one-out grid \(variants named -<switch>\)"):
        joint.joint(loo, vary)
    with pytest.raises(ConfigError, match="no results.json"):
        joint.joint(loo, tmp_path / "missing")


def test_the_committed_10m_grids_read_together(tmp_path, capsys):
    """The docs' two 10.5M-token grids: MEA and the FFN's FAN hurt alone and help in the stack."""
    tool = load_tool("ablation_joint")
    docs = REPO / "docs" / "ablations"
    out = tmp_path / "joint.md"
    assert tool.main(["--leave-one-out", str(docs / "leave_one_out_10m"), "--add-one", str(docs / "add_one_10m"),
                      "--out", str(out)]) == 0
    rows = {r["switch"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert len(rows) == 15
    assert rows["mea"]["reading"] == rows["ffn_fan_ratio"]["reading"] == "needs the stack: hurts alone, helps inside it"
    assert rows["fan_ratio"]["reading"] == "helps alone and in the stack"
    assert rows["simplegpt"]["reading"] == "hurts alone and in the stack"
    assert rows["xsa"]["reading"] == "helps alone; unresolved in the stack"
    assert "(commit `ca58e79`, kernel switches NEOLLM_LUCID_DIAGONAL=substitute)" in out.read_text()
    assert out.read_text() == (docs / "joint_10m.md").read_text().replace(
        "docs/ablations/", str(docs) + "/")  # the committed table is this tool's output
    assert tool.main(["--leave-one-out", str(docs / "add_one_10m"), "--add-one", str(docs / "add_one_10m")]) == 2
    assert "expected a leave-one-out grid" in capsys.readouterr().err
