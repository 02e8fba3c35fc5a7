"""The four lm-eval tasks (ARC-Easy, ARC-Challenge, HellaSwag, MMLU): document processing, prompts
and few-shot selection, following lm-evaluation-harness's task YAMLs.

Every item becomes an ``MCDoc`` (query text, choice strings, gold index). The request for choice
``c`` is ``(context, " " + c)`` with

    context = description + "".join(shot.query + " " + shot.choices[shot.gold] + "\\n\\n"
                                    for shot in shots) + doc.query

(lm-eval: ``target_delimiter`` " ", ``fewshot_delimiter`` "\\n\\n").

* ARC (``arc_easy`` / ``arc_challenge``): query ``"Question: {question}\\nAnswer:"``, choices the
  answer texts, gold ``choices.label.index(answerKey)``; no description.
* HellaSwag: lm-eval's ``process_docs``: query ``preprocess(activity_label + ": " + ctx_a + " " +
  ctx_b.capitalize())``, choices ``preprocess(ending)``, gold ``int(label)``; ``preprocess`` strips,
  replaces " [title]" by ". ", removes ``[...]`` and turns double spaces into single ones.
* MMLU (lm-eval's ``mmlu`` default template): description ``"The following are multiple choice
  questions (with answers) about {subject with spaces}.\\n\\n"``, query ``"{question.strip()}\\nA.
  {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}\\nAnswer:"``, choices ``["A", "B", "C", "D"]``, gold ``answer``.

Few-shot examples (deviation from lm-eval, whose ARC and HellaSwag shots come from the *train*
splits, which the offline source lacks):
* ARC: drawn from the ARC *validation* split of the same task (evaluation is on test), a fixed
  per-item random choice (``seed``, the item's index);
* HellaSwag: another *validation* item (never the item itself), a fixed per-item random choice;
* MMLU: the first ``k`` items of the subject's *dev* split, exactly as lm-eval (``first_n``).
lm-eval's random sampler draws from one shared ``random.Random(1234)`` in document order, so its
shots depend on the evaluation order; ours depend only on (seed, task, item index), so ``--limit``
does not change the shots of the items evaluated.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

__all__ = [
    "MCDoc", "TASKS", "arc_doc", "arc_request_doc", "hellaswag_preprocess", "hellaswag_doc",
    "mmlu_doc", "mmlu_description", "build_context", "select_shots", "requests_for",
]

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
TASKS = ("arc_easy", "arc_challenge", "hellaswag", "mmlu")


@dataclass
class MCDoc:
    query: str
    choices: list[str]
    gold: int
    id: str = ""
    group: str = ""              # MMLU subject
    meta: dict[str, Any] = field(default_factory=dict)


# ---- ARC --------------------------------------------------------------------------------------
def arc_doc(doc: dict[str, Any]) -> MCDoc:
    """HF ``allenai/ai2_arc`` row: id, question, choices {text, label}, answerKey."""
    labels = list(doc["choices"]["label"])
    return MCDoc(query=f"Question: {doc['question']}\nAnswer:", choices=list(doc["choices"]["text"]),
                 gold=labels.index(doc["answerKey"]), id=str(doc.get("id", "")))


def arc_request_doc(doc: dict[str, Any]) -> MCDoc:
    """OLMES request file ``doc``: id, query ("Question: ...\\nAnswer:"), choices, gold. The query
    is lm-eval's ARC ``doc_to_text`` already."""
    return MCDoc(query=doc["query"], choices=list(doc["choices"]), gold=int(doc["gold"]),
                 id=str(doc.get("id", "")))


# ---- HellaSwag --------------------------------------------------------------------------------
def hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    # brackets are artifacts of the WikiHow part of HellaSwag
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_doc(doc: dict[str, Any]) -> MCDoc:
    """HF ``hellaswag`` row: activity_label, ctx_a, ctx_b, endings, label (a string)."""
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return MCDoc(query=hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
                 choices=[hellaswag_preprocess(e) for e in doc["endings"]], gold=int(doc["label"]),
                 id=str(doc.get("ind", "")))


# ---- MMLU -------------------------------------------------------------------------------------
MMLU_CHOICES = ["A", "B", "C", "D"]


def mmlu_description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def mmlu_doc(doc: dict[str, Any], subject: str | None = None) -> MCDoc:
    """HF ``hails/mmlu_no_train`` row: question, subject, choices (4), answer (0-3)."""
    c = doc["choices"]
    if len(c) != 4:
        raise ValueError(f"MMLU item with {len(c)} choices (expected 4)")
    query = (f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:")
    answer = doc["answer"]
    gold = MMLU_CHOICES.index(answer) if isinstance(answer, str) else int(answer)
    return MCDoc(query=query, choices=list(MMLU_CHOICES), gold=gold,
                 group=subject or doc.get("subject", ""))


# ---- prompts ----------------------------------------------------------------------------------
def build_context(doc: MCDoc, shots: Sequence[MCDoc], description: str = "") -> str:
    examples = "".join(s.query + TARGET_DELIMITER + s.choices[s.gold] + FEWSHOT_DELIMITER for s in shots)
    return description + examples + doc.query


def select_shots(task: str, index: int, pool: Sequence[MCDoc], k: int, seed: int = 1234,
                 exclude_self: bool = False) -> list[MCDoc]:
    """``k`` shots for item ``index``: ``first_n`` for MMLU, else a fixed random sample seeded by
    (seed, task, index); with ``exclude_self`` (pool = the evaluated split) never the item itself."""
    if k <= 0:
        return []
    if task == "mmlu":
        if len(pool) < k:
            raise ValueError(f"{k}-shot needs {k} dev items, the subject has {len(pool)}")
        return list(pool[:k])
    candidates = [i for i in range(len(pool)) if not (exclude_self and i == index)]
    if len(candidates) < k:
        raise ValueError(f"{task}: {k}-shot needs {k} few-shot items, only {len(candidates)} available")
    rng = random.Random(f"{seed}:{task}:{index}")
    return [pool[i] for i in rng.sample(candidates, k)]


def requests_for(task: str, docs: Sequence[MCDoc], pool: Sequence[MCDoc] | dict[str, Sequence[MCDoc]],
                 k: int, seed: int = 1234) -> list[tuple[str, list[str]]]:
    """(context, continuations) for every doc. ``pool``: the few-shot items (for MMLU a dict
    subject -> dev items); for HellaSwag the pool is the evaluated split itself."""
    out = []
    for i, doc in enumerate(docs):
        if task == "mmlu":
            shots = select_shots(task, i, pool[doc.group], k, seed)
            description = mmlu_description(doc.group)
        else:
            index = doc.meta.get("index", i)
            shots = select_shots(task, index, pool, k, seed, exclude_self=task == "hellaswag")
            description = ""
        context = build_context(doc, shots, description)
        out.append((context, [TARGET_DELIMITER + c for c in doc.choices]))
    return out
