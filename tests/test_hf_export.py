"""transformers export (neollm/hf, tools/convert_to_hf.py, tools/convert_from_hf.py) on CPU:
the exported folder loads through the Auto classes offline, its logits and loss are NeoLLM's,
and NeoLLM -> HF -> DCP -> NeoLLM is bit-identical."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from conftest import TOKENIZER_DIR, load_tool
from test_model import build, tiny

from neollm.checkpoint import load_model
from neollm.hf import NeoLLMConfig
from neollm.hf.configuration_neollm import MODEL_ARG_DEFAULTS
from neollm.hf.convert import export_hf, hf_to_dcp, matching_flavor
from neollm.model.args import FLAVORS, NeoLLMModelArgs

VOCAB = 151_680  # the Qwen3 tokenizer's 151,669 ids, padded
CASES = {
    # Gated DeltaNet (torch reference) + attention, every switch off
    "debug": tiny(FLAVORS["debug"], vocab_size=VOCAB),
    # seed 001's techniques (SeeDNorm, PolyNorm, GPAS, LNS, FAN, MEA, LUCID, affine, XSA, routing,
    # output gate, momentum, multipliers, SimpleNorm)
    "neollm_135m": tiny(FLAVORS["neollm_135m"], vocab_size=VOCAB),
    # hybrid with CoLA, HybridNorm, gated residuals, FAN on GDN, untied head
    "hybrid_untied": tiny(FLAVORS["fanformer_92m"], vocab_size=VOCAB, layer_pattern="DA",
                          fan_on_gdn=True, tie_embeddings=False),
}


def perturbed(args: NeoLLMModelArgs, seed: int = 0):
    """A float32 eval model with its zero/identity-initialised parts moved off their init."""
    model = build(args, seed).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.requires_grad_(False)


def tokens(n: int = 2, t: int = 17, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 151_669, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (NeoLLM model, export folder, HF model loaded through the Auto class)."""
    from transformers import AutoModelForCausalLM

    out = {}
    for name, args in CASES.items():
        model = perturbed(args)
        folder = export_hf(model, tmp_path_factory.mktemp(name), TOKENIZER_DIR)
        hf = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True).eval()
        out[name] = (model, folder, hf)
    return out


def test_config_carries_every_model_arg(tmp_path):
    fields = {f.name for f in dataclasses.fields(NeoLLMModelArgs) if not f.name.startswith("_")}
    assert set(MODEL_ARG_DEFAULTS) == fields
    for name, args in FLAVORS.items():
        config = NeoLLMConfig.from_model_args(args)
        config.save_pretrained(tmp_path / name)
        back = NeoLLMConfig.from_pretrained(tmp_path / name)
        assert back.to_model_args() == args, name
        assert back.tie_word_embeddings == args.tie_embeddings
        assert (back.hidden_size, back.num_hidden_layers) == (args.dim, args.n_layers)
        assert matching_flavor(dataclasses.replace(args, vocab_size=1024, max_seq_len=99)) == name


@pytest.mark.parametrize("name", list(CASES))
def test_exported_logits_equal_neollm(exported, name):
    model, folder, hf = exported[name]
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_neollm.NeoLLMConfig",
                                  "AutoModelForCausalLM": "modeling_neollm.NeoLLMForCausalLM"}
    assert config["tie_word_embeddings"] == CASES[name].tie_embeddings
    assert "pip install neollm" in config["neollm_requires"]
    for f in ("model.safetensors", "configuration_neollm.py", "modeling_neollm.py",
              "tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"):
        assert (folder / f).is_file(), f
    assert type(hf).__name__ == "NeoLLMForCausalLM" and hf.dtype == torch.float32
    assert all(p.requires_grad for p in hf.parameters())  # as from_pretrained leaves them
    ids = tokens()
    # Compare in the same requires_grad state: torch's CPU matmul takes another kernel when a
    # weight requires grad (even under no_grad), which moves float32 logits by ~1e-7.
    try:
        with torch.no_grad():
            model.requires_grad_(True)
            assert torch.equal(hf(ids).logits, model(ids))  # float32, bit for bit
            model.requires_grad_(False)
            hf.requires_grad_(False)
            assert torch.equal(hf(ids).logits, model(ids))
            assert torch.equal(hf.double()(ids).logits, model.double()(ids))  # float64
    finally:
        hf.float().requires_grad_(False)
        model.float().requires_grad_(False)


@pytest.mark.parametrize("name", ["debug", "neollm_135m"])
def test_hf_loss_is_neollm_loss(exported, name):
    model, _, hf = exported[name]
    ids = tokens()
    labels = ids.clone()
    labels[0, 5:9] = -100  # ignored positions count in neither
    with torch.no_grad():
        out = hf(ids, labels=labels)
        logits = model(ids)
        # HF's convention: labels are the inputs, shifted inside -> mean CE over kept targets
        ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                              labels[:, 1:].reshape(-1), ignore_index=-100)
        # (transformers' loss sums over all T positions, the last one ignored, then divides:
        # the same terms in another order)
        torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=0)
        # NeoLLM's training loss (summed, labels already shifted) over the same targets
        summed = model(ids[:, :-1], labels=labels[:, 1:])
        n = int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(out.loss, summed / n, rtol=1e-5, atol=1e-6)


def test_round_trip_is_bit_identical(exported, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader
    from torchtitan.components.checkpoint import ModelWrapper
    import torch.distributed.checkpoint as dcp

    for name, (model, folder, _) in exported.items():
        step, args = hf_to_dcp(folder, tmp_path / name, step=0)
        assert step.name == "step-0" and args == CASES[name]
        # the keys torchtitan's CheckpointManager saves and loads for the model
        saved = set(FileSystemReader(str(step)).read_metadata().state_dict_metadata)
        assert saved == set(ModelWrapper(model).state_dict())
        # neollm.checkpoint's loader (generation, evaluation)
        back = load_model(step, args)
        # torchtitan's model-only load path (CheckpointManager.load at step 0)
        fresh = build(args, seed=7)
        wrapper = ModelWrapper(fresh)
        states = wrapper.state_dict()
        dcp.load(states, checkpoint_id=str(step))
        wrapper.load_state_dict(states)
        ref = model.state_dict()
        for loaded in (back.state_dict(), fresh.state_dict()):
            assert loaded.keys() == ref.keys()
            for k, v in ref.items():
                assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), (name, k)


def test_cli_round_trip_and_fresh_process_load(exported, tmp_path):
    """The two tools end to end on a DCP checkpoint, then a fresh process outside the repository
    loads the export offline through the Auto classes and reproduces the logits."""
    convert_from_hf, convert_to_hf = load_tool("convert_from_hf"), load_tool("convert_to_hf")

    model, folder, _ = exported["neollm_135m"]
    ckpt, _ = hf_to_dcp(folder, tmp_path / "ckpt", step=0)
    out = tmp_path / "export"
    args_json = str(ckpt.parent / "model_args.json")  # the tiny model is no named flavor
    assert convert_to_hf.main(["--checkpoint", str(ckpt.parent), "--flavor", args_json,
                               "--tokenizer", str(TOKENIZER_DIR), "--out", str(out),
                               "--max-seq-len", "64"]) == 0
    with pytest.raises(SystemExit, match="already holds an export"):
        convert_to_hf.main(["--checkpoint", str(ckpt), "--flavor", args_json, "--out", str(out)])
    assert convert_from_hf.main(["--hf", str(out), "--out", str(tmp_path / "back"), "--step", "0"]) == 0
    with pytest.raises(FileExistsError):
        convert_from_hf.main(["--hf", str(out), "--out", str(tmp_path / "back")])
    back = load_model(tmp_path / "back" / "step-0", CASES["neollm_135m"])
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k

    ids = tokens(1, 11)
    torch.save({"ids": ids, "logits": model(ids)}, tmp_path / "ref.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"path = {str(out)!r}\n"
        "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)\n"
        "model.requires_grad_(False)  # as the reference (see test_exported_logits_equal_neollm)\n"
        "tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)\n"
        "assert tok.decode(tok('hello world').input_ids) == 'hello world'\n"
        f"ref = torch.load({str(tmp_path / 'ref.pt')!r})\n"
        # Another process may split SDPA's CPU kernel over threads differently: equal to fp32 rounding.
        "torch.testing.assert_close(model(ref['ids']).logits, ref['logits'], rtol=1e-5, atol=1e-5)\n"
        "g = model.generate(ref['ids'][:, :4], max_new_tokens=3, do_sample=False, use_cache=False)\n"
        "assert g.shape == (1, 7)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-3000:]


def test_tokenizer_loads_without_remote_code(exported):
    from transformers import AutoTokenizer

    _, folder, _ = exported["debug"]
    tok = AutoTokenizer.from_pretrained(str(folder))
    ref = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    text = "The history of mathematics <|endoftext|>"
    assert tok(text).input_ids == ref(text).input_ids
    config = json.loads((folder / "config.json").read_text())
    assert config["eos_token_id"] == ref.eos_token_id


def test_hf_generate_is_greedy_argmax(exported):
    model, _, hf = exported["debug"]
    ids = tokens(1, 5)
    with torch.no_grad():
        got = hf.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False,
                          attention_mask=torch.ones_like(ids), eos_token_id=None)
        seq = ids
        for _ in range(4):
            seq = torch.cat([seq, model(seq)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(got, seq)


def test_bad_inputs(exported, tmp_path):
    model, folder, hf = exported["debug"]
    ids = tokens(2, 6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with pytest.raises(ValueError, match="no padding mask"):
        hf(ids, attention_mask=mask)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        export_hf(model, tmp_path / "x", tmp_path / "no_tokenizer")
    small = perturbed(tiny(FLAVORS["debug"], vocab_size=1000))
    with pytest.raises(ValueError, match="151,669 ids but the model's vocabulary is 1,000"):
        export_hf(small, tmp_path / "y", TOKENIZER_DIR)
    # weights that do not fit the config
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["dim"] = 32
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not fit its config.json"):
        hf_to_dcp(bad, tmp_path / "bad_ckpt")


def test_fresh_hf_model_initialises_like_neollm():
    """from_config (no checkpoint) runs NeoLLM.init_weights, not transformers' generic init."""
    from transformers import AutoModelForCausalLM

    from neollm.hf import NeoLLMForCausalLM

    args = CASES["neollm_135m"]
    AutoModelForCausalLM.register(NeoLLMConfig, NeoLLMForCausalLM, exist_ok=True)
    hf = AutoModelForCausalLM.from_config(NeoLLMConfig.from_model_args(args))
    ref = build(args)
    assert torch.equal(hf.model.rope, ref.rope)
    for (name, p), (_, q) in zip(hf.model.named_parameters(), ref.named_parameters()):
        if q.numel() < 64 or float(q.std()) == 0.0:  # constants (zeros, ones, identity mixes)
            assert torch.equal(p, q), name
        else:
            assert abs(float(p.std()) / float(q.std()) - 1) < 0.25, name


def test_bfloat16_export(exported, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _, _ = exported["debug"]
    folder = export_hf(model, tmp_path / "bf16", TOKENIZER_DIR, dtype=torch.bfloat16)
    assert model.tok_embeddings.weight.dtype == torch.float32  # the caller's model is untouched
    hf = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True)
    assert hf.dtype == torch.bfloat16
    step, args = hf_to_dcp(folder, tmp_path / "ckpt")
    back = load_model(step, args)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v.to(torch.bfloat16).float()), k
        assert torch.equal(hf.model.state_dict()[k], v.to(torch.bfloat16)), k


@pytest.mark.slow
def test_trainer_starts_from_converted_checkpoint(tmp_path):
    """A published model fine-tuned by the real trainer: HF folder -> step-0 ->
    --checkpoint.initial_load_path; after one step the weights are near the loaded ones."""
    from conftest import require_prepared_assets, run_trainer

    from neollm.model.model import build_model

    require_prepared_assets()
    torch.manual_seed(5)
    source = build_model("debug", max_seq_len=256)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.05 * torch.randn_like(p))
    step, _ = hf_to_dcp(export_hf(source, tmp_path / "hf", TOKENIZER_DIR), tmp_path / "ckpt")
    dump = tmp_path / "run"
    result = run_trainer("--training.steps", "1", "--checkpoint.interval", "1",
                         "--job.dump_folder", str(dump), "--checkpoint.initial_load_path", str(step))
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"Loading the checkpoint from {step}" in result.stdout
    after, fresh = load_model(dump, "debug").state_dict(), build_model("debug").state_dict()
    ref = source.state_dict()

    def distance(sd):
        return sum(float((sd[k] - v).abs().mean()) for k, v in ref.items()) / len(ref)

    assert distance(after) < 0.1 * distance(fresh)


def test_plain_export_loads_into_transformers_llama(tmp_path):
    """An independent reference for the export: `plain` (GQA, tied head) written by export_hf and
    read back from its safetensors file into transformers' own LlamaForCausalLM (rotate-half RoPE,
    repeat_kv GQA, RMSNorm, SwiGLU), none of NeoLLM's code involved, gives NeoLLM's logits in
    float64 (to the float32 rounding of the RoPE angles both compute). The name map is the whole correspondence between the two architectures."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    args = tiny(FLAVORS["plain"], vocab_size=VOCAB)
    model = perturbed(args).double()
    folder = export_hf(model, tmp_path / "plain", TOKENIZER_DIR)
    (weights_file,) = folder.glob("*.safetensors")
    exported = load_file(str(weights_file))
    prefix = "model."  # NeoLLMForCausalLM keeps the NeoLLM module as .model
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    for i in range(args.n_layers):
        for ours, theirs in (("mixer_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm"),
                             ("mixer.wq", "self_attn.q_proj"), ("mixer.wk", "self_attn.k_proj"),
                             ("mixer.wv", "self_attn.v_proj"), ("mixer.wo", "self_attn.o_proj"),
                             ("mlp.w1", "mlp.gate_proj"), ("mlp.w3", "mlp.up_proj"), ("mlp.w2", "mlp.down_proj")):
            names[f"layers.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    assert {k[len(prefix):] for k in exported if k != "lm_head.weight"} == set(names)
    config = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
                         num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                         num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim, rms_norm_eps=args.norm_eps,
                         rope_theta=args.rope_theta, max_position_embeddings=args.max_seq_len,
                         tie_word_embeddings=True, attention_bias=False, mlp_bias=False, hidden_act="silu")
    llama = LlamaForCausalLM(config).double().eval()
    missing, unexpected = llama.load_state_dict(
        {names[k[len(prefix):]]: v.double() for k, v in exported.items() if k != "lm_head.weight"}, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    assert llama.lm_head.weight.data_ptr() == llama.model.embed_tokens.weight.data_ptr()  # tied
    ids = tokens()
    with torch.no_grad():
        theirs = llama(ids).logits
        ours = model(ids)  # NeoLLM without labels returns the logits
    # both build their RoPE angles in float32 (rounded differently: ~3e-7 here); a wrong rotation,
    # head grouping or norm moves logits by orders of magnitude more than this tolerance
    assert ours.std() > 0.05
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-6)


def test_an_export_in_the_older_mea_layout_still_loads(exported, tmp_path):
    """An export written while MEA's GroupNorm gains and biases were [Hkv, d] matrices (before 4ab54bb; flat
    [Hkv * d] since) loads through NeoLLMForCausalLM (and the Auto class with today's modeling file in the
    folder) and through convert_from_hf by a reshape: same logits, weights and generation config; transformers'
    own options still work on that path, and a folder without weights still gets transformers' own error."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from neollm.hf import NeoLLMForCausalLM

    model, folder, hf = exported["neollm_135m"]
    old = tmp_path / "old_export"
    shutil.copytree(folder, old)
    sd = load_file(str(old / "model.safetensors"))
    hkv = CASES["neollm_135m"].n_kv_heads
    flat = [k for k in sd if k.rsplit(".", 1)[-1] in ("mea_k_weight", "mea_k_bias", "mea_v_weight", "mea_v_bias")]
    assert flat and all(sd[k].dim() == 1 for k in flat)
    save_file({k: v.reshape(hkv, -1) if k in flat else v for k, v in sd.items()}, str(old / "model.safetensors"),
              metadata={"format": "pt"})

    ids = tokens()
    direct, info = NeoLLMForCausalLM.from_pretrained(str(old), output_loading_info=True)
    auto = AutoModelForCausalLM.from_pretrained(str(old), trust_remote_code=True)
    for again in (direct, auto):
        again.eval()
        with torch.no_grad():
            assert torch.equal(again(ids).logits, hf(ids).logits)
        assert again.generation_config.to_dict() == hf.generation_config.to_dict()
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _, back = hf_to_dcp(old, tmp_path / "dcp", step=0), load_model(tmp_path / "dcp" / "step-0", CASES["neollm_135m"])
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k

    empty = tmp_path / "config_only"
    empty.mkdir()
    shutil.copy(old / "config.json", empty / "config.json")
    with pytest.raises(OSError, match="Error no file named model.safetensors, or pytorch_model.bin"):
        NeoLLMForCausalLM.from_pretrained(str(empty))
