"""Finding, validating and loading NeoLLM's DCP checkpoints: one place for the trainer's resume
(neollm.faults.NeoLLMCheckpointManager), generation, evaluation and the transformers export.

* ``validate_checkpoint``: a ``step-N`` folder is loadable only if its DCP ``.metadata`` reads
  and every storage file it names exists and is long enough for the byte ranges it records
  (a save killed half-way, a truncated or missing shard file is rejected).
* ``checkpoint_steps`` / ``resolve_checkpoint``: the step-N folders of a run; the newest that
  validates, from a step folder, a checkpoint folder or a run's dump folder.
* ``checkpoint_shapes`` / ``load_checkpoint`` / ``load_model``: model weights out of a torchtitan
  checkpoint (full or model-only; resharded as needed without a process group) or a state-dict file.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch
from torch import Tensor

from neollm.model.args import NeoLLMModelArgs
from neollm.model.model import NeoLLM, build_model

__all__ = ["STEP_FOLDER", "read_dcp_metadata", "validate_checkpoint", "holds_training_state", "checkpoint_steps",
           "resolve_checkpoint",
           "checkpoint_shapes", "load_checkpoint", "load_model"]

STEP_FOLDER = re.compile(r"^step-(\d+)$")


def read_dcp_metadata(path: str):
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(path).read_metadata()


def validate_checkpoint(path: str) -> str | None:
    """None if ``path`` is a complete DCP checkpoint, else the reason it is not."""
    if os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        return None  # an HF export (model only): torchtitan's own reader checks it
    if not os.path.isfile(os.path.join(path, ".metadata")):
        return "no .metadata (the save did not finish)"
    try:
        metadata = read_dcp_metadata(path)
    except Exception as error:  # truncated / garbled pickle
        return f".metadata is unreadable ({type(error).__name__}: {error})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        size = os.path.getsize(file)
        if size < end:
            return f"{name} is truncated ({size} bytes, {end} expected)"
    return None


def holds_training_state(path: str) -> bool:
    """Whether a valid checkpoint folder can resume training (torchtitan's full save: step, optimizer,
    data position) rather than only hold the model (``[checkpoint] last_save_model_only``'s final save,
    or an HF export)."""
    if not os.path.isfile(os.path.join(path, ".metadata")):
        return False
    return any(k.startswith("train_state.") for k in read_dcp_metadata(path).state_dict_metadata)


def checkpoint_steps(folder: str) -> list[int]:
    if not os.path.isdir(folder):
        return []
    return sorted(int(m.group(1)) for name in os.listdir(folder) if (m := STEP_FOLDER.match(name)))


def resolve_checkpoint(path: str | Path) -> Path:
    """A DCP step folder (has .metadata), a checkpoint folder of step-N folders or a run's dump
    folder (its checkpoint/ subfolder): the newest step that validates (as the trainer's resume);
    or a state-dict file (.pt/.safetensors)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    if p.is_file():
        return p
    if (p / ".metadata").is_file():
        problem = validate_checkpoint(str(p))
        if problem:
            raise ValueError(f"checkpoint {p} cannot be loaded: {problem}")
        return p
    for folder in (p, p / "checkpoint"):
        for step in reversed(checkpoint_steps(str(folder))):
            if validate_checkpoint(str(folder / f"step-{step}")) is None:
                return folder / f"step-{step}"
    raise FileNotFoundError(f"{p} is neither a DCP checkpoint (no .metadata), nor holds a loadable step-N "
                            "checkpoint folder, nor is a state-dict file")


def _dcp_keys(folder: Path) -> dict[str, torch.Size]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(folder)).read_metadata()
    return {k: v.size for k, v in meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


def _model_prefix(keys: dict[str, torch.Size]) -> str:
    """torchtitan saves the model's keys flat (``tok_embeddings.weight``); accept ``model.`` too."""
    if "tok_embeddings.weight" in keys:
        return ""
    if "model.tok_embeddings.weight" in keys:
        return "model."
    raise ValueError("no tok_embeddings.weight in the checkpoint: not a NeoLLM model checkpoint")


def _read_file(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    return sd


def checkpoint_shapes(path: str | Path) -> dict[str, torch.Size]:
    """Model parameter names (prefix stripped) and shapes of a checkpoint, without loading it."""
    p = resolve_checkpoint(path)
    if p.is_file():
        return {k: v.shape for k, v in _read_file(p).items()}
    keys = _dcp_keys(p)
    prefix = _model_prefix(keys)
    return _model_keys(keys, prefix)


_NON_MODEL_STATES = ("optimizer", "lr_scheduler", "dataloader", "train_state")


def _model_keys(keys: dict[str, torch.Size], prefix: str) -> dict[str, torch.Size]:
    """The model's entries of a torchtitan checkpoint (which also holds optimizer etc. states)."""
    return {k[len(prefix):]: v for k, v in keys.items()
            if k.startswith(prefix) and k[len(prefix):].split(".")[0] not in _NON_MODEL_STATES}


# Parameters stored in an older layout that loads by a reshape (same values): MEA's GroupNorm affine was
# [Hkv, d] per k and v until commit 4ab54bb, one flat [Hkv * d] vector since (Conda's Adam step).
_FLATTENED = ("mea_k_weight", "mea_k_bias", "mea_v_weight", "mea_v_bias")


def _older_layout(name: str, stored: torch.Size, model: torch.Size) -> bool:
    """Whether a checkpoint's ``stored`` shape of ``name`` is the older layout of the model's shape."""
    return (name.rsplit(".", 1)[-1] in _FLATTENED and len(stored) == 2 and len(model) == 1
            and stored[0] * stored[1] == model[0])


def shape_mismatches(expected: dict[str, tuple], stored: dict[str, tuple]) -> tuple[list[str], list[str], list[str]]:
    """How a checkpoint's model parameters (``stored``: name -> shape) differ from a model's (``expected``):
    (names missing from the checkpoint, "name: checkpoint S vs model M" for shapes that differ, names
    stored in an older layout that a reshape loads)."""
    missing = sorted(set(expected) - set(stored))
    differ = [k for k, v in expected.items() if k in stored and tuple(stored[k]) != tuple(v)]
    older = [k for k in differ if _older_layout(k, stored[k], expected[k])]
    wrong = [f"{k}: checkpoint {tuple(stored[k])} vs model {tuple(expected[k])}" for k in differ if k not in older]
    return missing, wrong, older


def _check_shapes(model: NeoLLM, shapes: dict[str, torch.Size], source: Path) -> None:
    missing, wrong, _ = shape_mismatches({k: v.shape for k, v in model.state_dict().items()}, shapes)
    if missing or wrong:
        detail = "; ".join(wrong[:5] + ([f"missing {missing[:5]}"] if missing else []))
        raise ValueError(f"checkpoint {source} does not fit this model (wrong flavor or overrides?): {detail}")


@torch.no_grad()
def load_checkpoint(model: NeoLLM, path: str | Path) -> Path:
    """Load model weights into ``model`` in place from a DCP folder (torchtitan step-N, full or
    model-only; reshards as needed, no process group) or a state-dict file. Returns the path read."""
    p = resolve_checkpoint(path)
    if p.is_file():
        sd = _read_file(p)
        _check_shapes(model, {k: v.shape for k, v in sd.items()}, p)
        own = model.state_dict()
        model.load_state_dict({k: v.reshape(own[k].shape) if k in own else v for k, v in sd.items()}, strict=True)
        return p
    import torch.distributed.checkpoint as dcp

    keys = _dcp_keys(p)
    prefix = _model_prefix(keys)
    stored = _model_keys(keys, prefix)
    _check_shapes(model, stored, p)
    own = model.state_dict()
    # DCP loads into the given tensors (the checkpoint's shapes); read in the checkpoint's dtype (fp32), then
    # copy (casting, and reshaping an older layout)
    target = {prefix + k: torch.empty(stored[k], dtype=torch.float32, device=v.device) for k, v in own.items()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(target, checkpoint_id=str(p))
    for k, v in own.items():
        v.copy_(target[prefix + k].reshape(v.shape))
    return p


def load_model(path: str | Path, flavor: str | NeoLLMModelArgs, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, **overrides) -> NeoLLM:
    """Build ``flavor`` and load ``path`` into it. ``vocab_size`` is taken from the checkpoint's
    embedding unless given (runs may override the flavor's vocabulary)."""
    shapes = checkpoint_shapes(path)
    if "vocab_size" not in overrides and "tok_embeddings.weight" in shapes:
        overrides["vocab_size"] = int(shapes["tok_embeddings.weight"][0])
    model = build_model(flavor, device=device, dtype=dtype, **overrides)
    load_checkpoint(model, path)
    return model
