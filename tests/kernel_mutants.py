"""Injected errors for the Triton kernel checks (tests/*_interpreted.py): a copy of a kernels module
with a few lines replaced, which the checks must then fail."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Callable


def mutant(module: ModuleType, replacements: list[tuple[str, str]]) -> ModuleType:
    """A copy of ``module``'s kernels with each ``old`` replaced by ``new`` (each must occur once), cut
    before its ``# ---- the op`` section (the op registration, whose name the real module holds)."""
    source = Path(module.__file__).read_text()
    source = source[: source.index("# ---- the op")]
    for old, new in replacements:
        assert source.count(old) == 1, f"the mutation's anchor {old!r} is not in the kernels once"
        source = source.replace(old, new)
    name = module.__name__.rsplit(".", 1)[-1] + "_mutant"
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    return copy


def assert_injected_errors_fail(module: ModuleType, injected: dict[str, list[tuple[str, str]]],
                                check: Callable[[ModuleType], None]) -> None:
    """``check`` (which raises AssertionError on a wrong kernel) must fail on every mutant of ``module``."""
    for name, replacements in injected.items():
        try:
            check(mutant(module, replacements))
        except AssertionError:
            continue
        raise AssertionError(f"the checks pass with an injected error: {name}")
