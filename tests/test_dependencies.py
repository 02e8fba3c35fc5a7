"""The required dependencies import (pyproject's [project] dependencies): a broken install fails
here with the package's own error instead of turning the tests that use it into skips."""

from __future__ import annotations

import importlib

import pytest

REQUIRED = ["torchtitan", "triton", "fla", "fla.layers", "torchao.float8", "datasets", "tokenizers",
            "cut_cross_entropy"]


@pytest.mark.parametrize("module", REQUIRED)
def test_required_dependency_imports(module):
    importlib.import_module(module)
