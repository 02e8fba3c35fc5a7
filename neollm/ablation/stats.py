"""When is an ablation's delta more than noise, and is a technique worth its time.

The noise rule (also stated in docs/ablations.md and in every results.md): the reference is run
at n seeds; s is the standard deviation of its final validation losses (n - 1 in the
denominator). Changing only the seed moves a run's final loss by about s (init noise plus the
GPU's run-to-run nondeterminism, since every seed is a separate run). A variant run at m seeds
differs from the reference mean by delta = mean(variant) - mean(reference). Under "no effect",
delta / se follows Student's t with

* m = 1:  se = s * sqrt(1 + 1/n),           n - 1 degrees of freedom (a prediction interval for
  one new run around the reference mean);
* m >= 2: se = s_p * sqrt(1/n + 1/m),       n + m - 2 degrees of freedom, s_p the pooled
  standard deviation of both groups (two-sample t-test, equal variances).

The delta is called a real effect when |delta| > t_{0.975, dof} * se (two-sided, 5%). With one
reference seed (or seeds that gave identical losses) s is unknown and no delta is called real.

Worth its time: both runs are compared at equal training seconds (tokens / measured tok/s),
at t* = the shorter run's training time, by linear interpolation of each validation curve
against seconds: delta_t = L_variant(t*) - L_reference(t*), judged by the same threshold.
"""

from __future__ import annotations

import math
import statistics

# Student's t, two-sided 95% (the 0.975 quantile), by degrees of freedom
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
         18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t975(dof: int) -> float:
    """The 0.975 quantile of Student's t (table; the next smaller tabulated dof above 20, so the
    threshold errs wide; 1.96 beyond 120)."""
    if dof < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {dof}")
    if dof > 120:
        return 1.960
    return _T975[max(d for d in _T975 if d <= dof)]


def noise_threshold(reference: list[float], variant: list[float]) -> dict | None:
    """The |delta| above which ``variant``'s mean differs from ``reference``'s beyond seed noise;
    None when the reference's seed noise is unknown (one seed, or identical losses)."""
    n, m = len(reference), len(variant)
    if n < 2 or m < 1:
        return None
    s_ref = statistics.stdev(reference)
    if m == 1:
        sd, dof, se_factor = s_ref, n - 1, math.sqrt(1 + 1 / n)
    else:
        pooled = ((n - 1) * s_ref ** 2 + (m - 1) * statistics.stdev(variant) ** 2) / (n + m - 2)
        sd, dof, se_factor = math.sqrt(pooled), n + m - 2, math.sqrt(1 / n + 1 / m)
    if sd == 0.0:
        return None
    return {"threshold": t975(dof) * sd * se_factor, "sd": sd, "dof": dof, "se": sd * se_factor}


def quality_verdict(delta: float, threshold: float | None) -> str:
    """helps / hurts / within noise (lower loss is better); "noise unknown" without a threshold."""
    if threshold is None:
        return "noise unknown"
    if abs(delta) <= threshold:
        return "within noise"
    return "helps" if delta < 0 else "hurts"


def interpolate(points: list[tuple[float, float]], x: float) -> float:
    """Linear interpolation of sorted (x, y) points at x (x within their range)."""
    if not points[0][0] <= x <= points[-1][0] + 1e-9:
        raise ValueError(f"{x} is outside [{points[0][0]}, {points[-1][0]}]")
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def equal_time_delta(variant: list[tuple[float, float]], reference: list[tuple[float, float]]) -> dict:
    """Loss of the variant minus the reference's at the same training seconds: at t* = the end of
    the shorter of the two (seconds, loss) curves. Before its first validation (step 1, the
    initial loss) a run counts as at that loss from second 0."""
    variant, reference = ([(0.0, c[0][1]), *c] if c[0][0] > 0 else c for c in (variant, reference))
    t_star = min(variant[-1][0], reference[-1][0])
    return {"seconds": t_star, "delta": interpolate(variant, t_star) - interpolate(reference, t_star)}


def time_verdict(delta_at_equal_time: float, threshold: float | None) -> str:
    """worth its time / not worth its time / even at equal time (for the variant itself)."""
    if threshold is None:
        return "noise unknown"
    if abs(delta_at_equal_time) <= threshold:
        return "even at equal time"
    return "worth its time" if delta_at_equal_time < 0 else "not worth its time"


def technique_reading(name: str, quality: str, time: str) -> str:
    """The verdicts said of the technique: a leave-one-out row "-x" judges x by its absence."""
    if not name.startswith("-"):
        return f"{name.lstrip('+')}: {quality}; {time}"
    flip = {"helps": "hurts", "hurts": "helps", "worth its time": "not worth its time",
            "not worth its time": "worth its time"}
    return f"{name[1:]}: {flip.get(quality, quality)}; {flip.get(time, time)} (judged by its removal)"


def required_seeds(delta: float, sd: float, max_seeds: int = 64) -> int | None:
    """The smallest n (reference and variant both at n seeds) whose two-sample threshold
    t_{0.975, 2n-2} * sd * sqrt(2/n) is below |delta|; None if more than ``max_seeds``."""
    for n in range(2, max_seeds + 1):
        if t975(2 * n - 2) * sd * math.sqrt(2 / n) < abs(delta):
            return n
    return None
