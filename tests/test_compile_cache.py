"""neollm/compile_cache.py: the cache variables it sets, what it leaves alone, and "off"."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from neollm import compile_cache

KEYS = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TRITON_CACHE_AUTOTUNING")


def _clear(monkeypatch):
    for key in KEYS + ("NEOLLM_COMPILE_CACHE",):
        monkeypatch.delenv(key, raising=False)


def test_root_from_setting(monkeypatch, tmp_path):
    _clear(monkeypatch)
    monkeypatch.setenv("NEOLLM_COMPILE_CACHE", str(tmp_path / "c"))
    root = compile_cache.configure_compile_cache()
    assert root == tmp_path / "c"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "c" / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "c" / "triton")
    assert os.environ["TRITON_CACHE_AUTOTUNING"] == "1"
    assert "0 files" in compile_cache.describe_compile_cache()


def test_user_values_win_and_default_root(monkeypatch, tmp_path):
    _clear(monkeypatch)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("TRITON_CACHE_DIR", "/mine")
    assert compile_cache.configure_compile_cache() == tmp_path / "neollm" / "compile"
    assert os.environ["TRITON_CACHE_DIR"] == "/mine"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "neollm" / "compile" / "inductor")


def test_off(monkeypatch):
    _clear(monkeypatch)
    monkeypatch.setenv("NEOLLM_COMPILE_CACHE", "off")
    assert compile_cache.configure_compile_cache() is None
    assert not any(key in os.environ for key in KEYS)


def test_import_sets_it_before_fla_and_inductor_reads_it(tmp_path):
    """A fresh process: importing neollm sets the variables, and inductor's cache_dir() follows them."""
    code = ("import neollm, os, sys; from torch._inductor.runtime.cache_dir_utils import cache_dir; "
            "print(os.environ['TRITON_CACHE_DIR']); print(cache_dir()); print('fla' in sys.modules)")
    env = {**os.environ, "NEOLLM_COMPILE_CACHE": str(tmp_path)}
    for key in KEYS:
        env.pop(key, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    triton_dir, inductor_dir, fla_imported = out.stdout.split()[-3:]
    assert Path(triton_dir) == tmp_path / "triton" and Path(inductor_dir) == tmp_path / "inductor"
    assert fla_imported == "False"
