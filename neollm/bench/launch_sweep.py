"""Sweeps of a Triton kernel's launch constants (tokens per program, warps) in its micro-benchmark: the
sizes asked for on the command line, the Triton path once per setting, and the module constants set while
that path is measured (forward and backward both read them at launch).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator


def power_of_two_list(text: str) -> list[int]:
    """``"16,32,64"`` -> [16, 32, 64]: argparse's ``type=`` for a flag listing launch sizes to sweep."""
    sizes = [int(v) for v in text.split(",") if v.strip().isdigit()]
    if not sizes or len(sizes) != len(text.split(",")) or any(v < 1 or v & (v - 1) for v in sizes):
        raise argparse.ArgumentTypeError(f"want powers of two separated by commas (e.g. 16,32,64), got {text!r}")
    return sizes


def launches(paths: dict[str, Callable], settings: list[dict]) -> Iterator[tuple[str, Callable, dict]]:
    """(name, fn, settings) per measurement: every path once, the "triton" path once per entry of
    ``settings`` (module constant -> value; none: once, at the module's own values)."""
    for name, fn in paths.items():
        if name == "triton" and settings:
            for setting in settings:
                yield ", ".join([name, *(f"{k} {v}" for k, v in setting.items())]), fn, setting
        else:
            yield name, fn, {}


@contextlib.contextmanager
def module_settings(module, **values):
    """Set a kernel module's launch constants (e.g. ``BLOCK_T=64``) for a measurement, and restore them after."""
    old = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(module, name, value)
