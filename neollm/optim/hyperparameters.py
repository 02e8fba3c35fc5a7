"""The range checks AdEMAMix and Conda share, so both refuse a bad setting with the same words."""

from collections.abc import Sequence


def check_common(name: str, lr: float, eps: float, betas: Sequence[float], weight_decay: float) -> None:
    """Raise ValueError naming the optimizer and the setting that is out of range."""
    if lr < 0.0:
        raise ValueError(f"{name}: invalid learning rate {lr}")
    if eps < 0.0:
        raise ValueError(f"{name}: invalid eps {eps}")
    for i, b in enumerate(betas):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{name}: invalid beta{i + 1} {b} (must be in [0, 1))")
    if weight_decay < 0.0:
        raise ValueError(f"{name}: invalid weight_decay {weight_decay}")
