"""Leave-one-out and add-one read together: what each technique does alone and inside the stack.

A leave-one-out grid (``-<switch>`` against the full model) measures a switch's contribution in the
stack; an add-one grid (``+<switch>`` against ``plain``) measures it alone. Each grid's verdicts keep
their own reference and noise threshold; a switch is read from the pair:

* its effect alone: the add-one delta (negative: the switch lowers the loss, it helps);
* its effect in the stack: minus the leave-one-out delta (removing a switch that helps raises the
  loss), so both columns read "negative helps";
* the reading: "helps alone and in the stack", "helps alone, not in the stack" (what it gives is
  already given by the others), "needs the stack" (hurts or does nothing alone, helps inside),
  "hurts in the stack" and so on, from the two quality verdicts.

Both grids must share a budget (tokens per run, warm-up, validation) and a config; a pair that does
not is refused, since deltas at different budgets are not comparable.
"""

from __future__ import annotations

import json
from pathlib import Path

from neollm.errors import ConfigError

# (effect alone, effect in the stack) -> reading; each effect is "helps", "hurts" or "none"
READINGS = {
    ("helps", "helps"): "helps alone and in the stack",
    ("helps", "none"): "helps alone, not in the stack",
    ("helps", "hurts"): "helps alone, hurts in the stack",
    ("none", "helps"): "needs the stack: helps only inside it",
    ("hurts", "helps"): "needs the stack: hurts alone, helps inside it",
    ("none", "none"): "no effect either way at this budget",
    ("hurts", "none"): "hurts alone, not in the stack",
    ("none", "hurts"): "hurts in the stack",
    ("hurts", "hurts"): "hurts alone and in the stack",
}


def _load(folder: Path, what: str) -> dict:
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise ConfigError(f"{what} grid {folder}: no results.json (run tools/ablate.py there, or give its folder)")
    return json.loads(path.read_text())


def _effect(quality: str, delta_means_removal: bool) -> str:
    """A verdict's quality as the switch's effect: in a leave-one-out grid "hurts" means removing
    the switch hurts, so the switch helps."""
    if quality not in ("helps", "hurts"):
        return "none"
    if delta_means_removal:
        return "helps" if quality == "hurts" else "hurts"
    return quality


def joint(leave_one_out: Path, add_one: Path) -> dict:
    """One row per switch found in both grids (``-name`` and ``+name``), with each grid's delta as the
    switch's effect (negative = lowers the loss), its threshold, time per token and the reading."""
    loo, add = _load(leave_one_out, "leave-one-out"), _load(add_one, "add-one")
    for key in ("config", "budget"):
        a, b = loo["header"].get(key), add["header"].get(key)
        if a != b:
            raise ConfigError(f"the two grids differ in {key}: leave-one-out {a!r}, add-one {b!r}; "
                              "read grids run with the same config and budget together")
    removed = {name[1:]: v for name, v in loo["verdicts"].items() if name.startswith("-")}
    added = {name[1:]: v for name, v in add["verdicts"].items() if name.startswith("+")}
    if not removed or not added:
        raise ConfigError("expected a leave-one-out grid (variants named -<switch>) and an add-one grid "
                          f"(+<switch>); got {sorted(loo['verdicts'])[:3]} and {sorted(add['verdicts'])[:3]}")
    rows = []
    for name in [n for n in added if n in removed]:
        alone, inside = added[name], removed[name]
        effects = (_effect(alone["quality"], False), _effect(inside["quality"], True))
        rows.append({
            "switch": name,
            "alone_delta": alone["delta"], "alone_threshold": alone["threshold"],
            "alone_time_per_token": alone["time_per_token_vs_ref"],
            "stack_delta": -inside["delta"], "stack_threshold": inside["threshold"],
            "stack_time_share": (1 - inside["time_per_token_vs_ref"]) if inside["time_per_token_vs_ref"] else None,
            "alone": effects[0], "stack": effects[1], "reading": READINGS[effects],
        })
    rows.sort(key=lambda r: (r["alone_delta"] + r["stack_delta"]))
    return {"leave_one_out": str(leave_one_out), "add_one": str(add_one),
            "budget": loo["header"].get("budget"), "config": loo["header"].get("config"),
            "environments": {"leave_one_out": loo["header"].get("environment"),
                             "add_one": add["header"].get("environment")},
            "references": {"stack": loo["reference"]["reference_mean"], "plain": add["reference"]["reference_mean"]},
            "only_in_one": sorted(set(added) ^ set(removed)), "rows": rows}


def _num(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    refs = result["references"]
    lines = [
        "# A technique alone and in the stack",
        "",
        f"- leave-one-out: `{result['leave_one_out']}`; add-one: `{result['add_one']}`",
        f"- config: `{result['config']}`; budget: {result['budget']}",
        *([f"- kernel switches (last job of each grid): leave-one-out {envs['leave_one_out'] or 'defaults'}, "
           f"add-one {envs['add_one'] or 'defaults'}"] if any((envs := result.get("environments", {})).values()) else []),
        f"- references: the full stack {refs['stack']:.4f}, `plain` {refs['plain']:.4f} "
        f"(stack minus plain {refs['stack'] - refs['plain']:+.4f})",
        "- effect = the switch's change of the final validation loss (negative: it helps): alone, the add-one "
        "delta against `plain`; in the stack, minus the leave-one-out delta (the loss the stack loses without it). "
        "Each is judged against its own grid's noise threshold",
        "",
        "| switch | effect alone | threshold | time alone vs plain | effect in the stack | threshold "
        "| share of the stack's time | reading |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        share = _num(None if r["stack_time_share"] is None else 100 * r["stack_time_share"], ".0f")
        lines.append(f"| {r['switch']} | {r['alone_delta']:+.4f} | {_num(r['alone_threshold'], '.4f')} "
                     f"| {_num(r['alone_time_per_token'], '.2f')}x | {r['stack_delta']:+.4f} "
                     f"| {_num(r['stack_threshold'], '.4f')} | {share + '%' if share else ''} | {r['reading']} |")
    if result["only_in_one"]:
        lines += ["", f"In one grid only (not read): {', '.join(result['only_in_one'])}"]
    return "\n".join(lines) + "\n"
