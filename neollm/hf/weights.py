"""An exported folder's safetensors weights read back: all of them, only their shapes, or only some.

Both loaders of an export use it: ``NeoLLMForCausalLM.from_pretrained`` (transformers) and
``hf_to_neollm_state_dict`` (tools/convert_from_hf.py), which reshape a parameter stored in an older layout
(neollm.checkpoint.shape_mismatches: MEA's GroupNorm affine, [Hkv, d] before commit 4ab54bb), so an export
written before a layout change keeps loading.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of an exported folder (one file, or the shards its index names)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    raise FileNotFoundError(f"no model.safetensors (or index) in {folder}")


def read_hf_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """The safetensors weights of an exported folder (single file or sharded with an index)."""
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        sd.update(load_file(str(path)))
    return sd


def stored_shapes(folder: str | Path) -> dict[str, tuple[int, ...]]:
    """name -> shape of every stored weight, read from the files' headers (no tensor is loaded)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in weight_files(folder):
        with safe_open(str(path), "pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes


def read_stored(folder: str | Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Only the named weights of an exported folder."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys() if k in names})
    return out

