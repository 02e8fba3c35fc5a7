"""Leave-one-out and add-one read together: what each technique does alone and inside the stack.

A leave-one-out grid (``-<switch>`` against the full model) measures a switch's contribution in the
stack; an add-one grid (``+<switch>`` against ``plain``) measures it alone. Each grid's verdicts keep
their own reference and noise threshold; a switch is read from the pair:

* its effect alone: the add-one delta (negative: the switch lowers the loss, it helps);
* its effect in the stack: minus the leave-one-out delta (removing a switch that helps raises the
  loss), so both columns read "negative helps";
* the reading, from the two quality verdicts: "helps alone and in the stack", "needs the stack: hurts
  alone, helps inside it", "helps alone; unresolved in the stack" and so on. "Unresolved" is a delta
  within its grid's noise threshold, not a measured zero (the two grids' thresholds can differ
  several-fold); "noise unknown" is a grid without a seed spread (one reference seed).

Both grids must share a config, a budget (tokens per run, warm-up, validation) and their ``--set``
changes; a pair that does not is refused, since its deltas are not comparable. Commits and kernel
switches may differ (the table names them).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from neollm.errors import ConfigError

_ALONE = {"helps": "helps alone", "hurts": "hurts alone", "unresolved": "unresolved alone",
          "unknown": "noise unknown alone"}
_STACK = {"helps": "helps in the stack", "hurts": "hurts in the stack", "unresolved": "unresolved in the stack",
          "unknown": "noise unknown in the stack"}


def reading(alone: str, stack: str) -> str:
    """One line from the two effects ("helps", "hurts", "unresolved" or "unknown")."""
    if alone == stack and alone in ("helps", "hurts"):
        return f"{alone} alone and in the stack"
    if stack == "helps" and alone in ("hurts", "unresolved"):
        return f"needs the stack: {_ALONE[alone]}, helps inside it"
    return f"{_ALONE[alone]}; {_STACK[stack]}"


def _load(folder: Path, what: str) -> dict:
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise ConfigError(f"{what} grid {folder}: no results.json (run tools/ablate.py there, or give its folder)")
    return json.loads(path.read_text())


def _effect(quality: str, delta_means_removal: bool) -> str:
    """A verdict's quality as the switch's effect: in a leave-one-out grid "hurts" means removing
    the switch hurts, so the switch helps. "within noise" is unresolved; anything else (one reference
    seed, a no-op control) leaves the noise unknown."""
    if quality == "within noise":
        return "unresolved"
    if quality not in ("helps", "hurts"):
        return "unknown"
    if delta_means_removal:
        return "helps" if quality == "hurts" else "hurts"
    return quality


def _set_changes(header: dict) -> list[str]:
    """The ``--set KEY=VALUE`` changes of a grid's recorded command (what every variant shares)."""
    words = shlex.split(header.get("command", ""))
    return sorted([words[i + 1] for i, word in enumerate(words[:-1]) if word == "--set"]
                  + [word.split("=", 1)[1] for word in words if word.startswith("--set=")])


def joint(leave_one_out: Path, add_one: Path) -> dict:
    """One row per switch found in both grids (``-name`` and ``+name``), with each grid's delta as the
    switch's effect (negative = lowers the loss), its threshold, time per token and the reading."""
    loo, add = _load(leave_one_out, "leave-one-out"), _load(add_one, "add-one")
    pairs = [(key, loo["header"].get(key), add["header"].get(key)) for key in ("config", "budget")]
    pairs.append(("--set changes", _set_changes(loo["header"]), _set_changes(add["header"])))
    for key, a, b in pairs:
        if a != b:
            raise ConfigError(f"the two grids differ in {key}: leave-one-out {a!r}, add-one {b!r}; "
                              "read grids run with the same config, budget and --set changes together")
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
            # time per token the stack saves without the switch (negative: the stack is faster with it)
            "stack_time_saved": (1 - inside["time_per_token_vs_ref"]) if inside["time_per_token_vs_ref"] else None,
            "alone": effects[0], "stack": effects[1], "reading": reading(*effects),
        })
    rows.sort(key=lambda r: (r["alone_delta"] + r["stack_delta"]))
    header = {key: {"leave_one_out": loo["header"].get(field), "add_one": add["header"].get(field)}
              for key, field in (("commits", "git commit"), ("environments", "environment"))}
    return {"leave_one_out": str(leave_one_out), "add_one": str(add_one),
            "budget": loo["header"].get("budget"), "config": loo["header"].get("config"), **header,
            "references": {"stack": loo["reference"]["reference_mean"], "plain": add["reference"]["reference_mean"]},
            "only_in_one": sorted(set(added) ^ set(removed)), "rows": rows}


def _num(value: float | None, spec: str, unit: str = "") -> str:
    return "" if value is None else format(value, spec) + unit


def markdown(result: dict) -> str:
    refs, commits, envs = result["references"], result["commits"], result["environments"]
    lines = [
        "# A technique alone and in the stack",
        "",
        f"- leave-one-out: `{result['leave_one_out']}` (commit `{commits['leave_one_out']}`, kernel switches "
        f"{envs['leave_one_out'] or 'the defaults'}); add-one: `{result['add_one']}` (commit "
        f"`{commits['add_one']}`, kernel switches {envs['add_one'] or 'the defaults'})",
        f"- config: `{result['config']}`; budget: {result['budget']}",
        f"- references: the full stack {refs['stack']:.4f}, `plain` {refs['plain']:.4f} "
        f"(stack minus plain {refs['stack'] - refs['plain']:+.4f})",
        "- effect = the switch's change of the final validation loss (negative: it helps): alone, the add-one "
        "delta against `plain`; in the stack, minus the leave-one-out delta (the loss the stack loses without it). "
        "Each is judged against its own grid's noise threshold; \"unresolved\" is within that threshold, not a "
        "measured zero",
        "",
        "| switch | effect alone | threshold | time alone vs plain | effect in the stack | threshold "
        "| stack's time saved without it | reading |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        saved = None if r["stack_time_saved"] is None else 100 * r["stack_time_saved"]
        lines.append(f"| {r['switch']} | {r['alone_delta']:+.4f} | {_num(r['alone_threshold'], '.4f')} "
                     f"| {_num(r['alone_time_per_token'], '.2f', 'x')} | {r['stack_delta']:+.4f} "
                     f"| {_num(r['stack_threshold'], '.4f')} | {_num(saved, '.0f', '%')} | {r['reading']} |")
    if result["only_in_one"]:
        lines += ["", f"In one grid only (not read): {', '.join(result['only_in_one'])}"]
    return "\n".join(lines) + "\n"
