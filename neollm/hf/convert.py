"""NeoLLM checkpoint <-> transformers folder.

``export_hf``: a NeoLLM model -> a folder ``AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)`` and ``AutoTokenizer.from_pretrained(folder)`` load: config.json (every
model arg, ``auto_map``), model.safetensors, generation_config.json, configuration_neollm.py and
modeling_neollm.py (copied from neollm/hf/; they import the installed ``neollm``), the tokenizer
files and a README.md.

``hf_to_dcp``: such a folder -> ``<out>/step-<N>``, a model-only DCP checkpoint with the keys
torchtitan's CheckpointManager saves (``tok_embeddings.weight``, ``layers.0....``: the model's
state dict, flat, no prefix), in float32 (the trainer's parameter dtype). Train from it with
``--checkpoint.initial_load_path <out>/step-<N>`` (model only is torchtitan's default there), or
put ``step-0`` in a run's ``checkpoint/`` folder (torchtitan loads step 0 model-only).
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import torch

from neollm.hf.configuration_neollm import REQUIREMENT, NeoLLMConfig
from neollm.hf.modeling_neollm import NeoLLMForCausalLM
from neollm.checkpoint import shape_mismatches
from neollm.hf.weights import read_hf_state_dict
from neollm.model.args import NeoLLMModelArgs
from neollm.model.model import NeoLLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")
PREFIX = "model."


def _token_ids(tokenizer_dir: Path) -> tuple[dict[str, int], int]:
    """(bos/eos/pad ids for config.json and generation_config.json, number of ids)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id}
    return {k: v for k, v in ids.items() if v is not None}, len(tok)


def export_hf(model: NeoLLM, out: str | Path, tokenizer_dir: str | Path,
              dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` (weights cast to ``dtype``, default: as they are) as a transformers folder."""
    out, tokenizer_dir = Path(out), Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {tokenizer_dir}: pass the tokenizer folder "
                                "the model was trained with ([model] hf_assets_path)")
    args = model.model_args
    token_ids, n_tokens = _token_ids(tokenizer_dir)
    if n_tokens > args.vocab_size:
        raise ValueError(f"the tokenizer in {tokenizer_dir} has {n_tokens:,} ids but the model's "
                         f"vocabulary is {args.vocab_size:,}: wrong tokenizer?")
    dtype = dtype or model.tok_embeddings.weight.dtype
    config = NeoLLMConfig.from_model_args(args, dtype=dtype, **token_ids)
    with torch.device("meta"):
        hf = NeoLLMForCausalLM(config)
    if dtype != model.tok_embeddings.weight.dtype:  # cast a copy; the caller's model is kept
        model = copy.deepcopy(model).to(dtype)
    hf.model = model
    NeoLLMConfig.register_for_auto_class()
    NeoLLMForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out), safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, out / name)
    (out / "README.md").write_text(_readme(args, dtype))
    return out


def _readme(args: NeoLLMModelArgs, dtype: torch.dtype) -> str:
    return f"""# NeoLLM checkpoint (transformers format)

Requires: `{REQUIREMENT}`. configuration_neollm.py and modeling_neollm.py wrap the installed
package's `neollm.model.model.NeoLLM`; transformers asks for `neollm` when it is missing.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(path)
out = model(**tok("Hello", return_tensors="pt"), labels=...)  # logits, mean next-token CE
model.generate(tok("Hello", return_tensors="pt").input_ids, max_new_tokens=20, use_cache=False)
```

No padding mask (unpadded batches only) and no transformers KV cache; for cached decoding use
`neollm.inference` on `model.model`. Back to a DCP checkpoint: `python tools/convert_from_hf.py`.

Model: {args.n_layers} layers, dim {args.dim}, pattern {args.layer_pattern!r}, vocabulary
{args.vocab_size:,}, context {args.max_seq_len}; weights {str(dtype).replace('torch.', '')}.
"""


# ---- transformers folder -> DCP ---------------------------------------------------------------
def hf_to_neollm_state_dict(folder: str | Path) -> tuple[NeoLLMModelArgs, dict[str, torch.Tensor]]:
    """(model args, NeoLLM state dict with torchtitan's key names) of an exported folder."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    config = NeoLLMConfig.from_pretrained(str(folder))
    if config.model_type != "neollm":
        raise ValueError(f"{folder} holds a {config.model_type!r} model, not neollm")
    args = config.to_model_args()
    raw = read_hf_state_dict(folder)
    sd = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in raw.items()}
    with torch.device("meta"):
        expected = {k: v.shape for k, v in NeoLLM(args).state_dict().items()}
    missing, wrong, older = shape_mismatches(expected, {k: v.shape for k, v in sd.items()})
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected or wrong:
        raise ValueError(f"{folder}'s weights do not fit its config.json: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}")
    return args, {k: sd[k].reshape(expected[k]) if k in older else sd[k] for k in expected}


def hf_to_dcp(folder: str | Path, out: str | Path, step: int = 0,
              dtype: torch.dtype = torch.float32, overwrite: bool = False) -> tuple[Path, NeoLLMModelArgs]:
    """Write ``<out>/step-<step>``: a model-only DCP checkpoint of the exported ``folder``, plus
    ``<out>/model_args.json`` (the model's args, to pick or check the training flavor).
    Returns (the step folder, the model args)."""
    import torch.distributed.checkpoint as dcp

    args, sd = hf_to_neollm_state_dict(folder)
    target = Path(out) / f"step-{step}"
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} exists (pass overwrite=True / --overwrite to replace it)")
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.to(dtype).contiguous() for k, v in sd.items()}
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.filterwarnings("ignore", message=".*torch.distributed.*")
        dcp.save(sd, checkpoint_id=str(target))
    (Path(out) / "model_args.json").write_text(args.to_json() + "\n")
    return target, args


def model_args_from_json(path: str | Path) -> NeoLLMModelArgs:
    """The ``NeoLLMModelArgs`` of a model_args.json (``NeoLLMModelArgs.to_json``)."""
    values = json.loads(Path(path).read_text())
    return NeoLLMModelArgs(**{k: v for k, v in values.items() if not k.startswith("_")})


def matching_flavor(args: NeoLLMModelArgs) -> str | None:
    """The flavor whose args equal ``args`` up to the run-level vocab_size / max_seq_len /
    gdn_backend / rwkv_backend, if any."""
    import dataclasses

    from neollm.model.args import FLAVORS

    run_level = dict(vocab_size=1, max_seq_len=1, gdn_backend="auto", rwkv_backend="auto")
    mine = dataclasses.replace(args, **run_level)
    for name, flavor in FLAVORS.items():
        if dataclasses.replace(flavor, **run_level) == mine:
            return name
    return None
