"""Date Understanding (BIG-bench), Math401, and the arithmetic word problems (AddSub, SVAMP, MultiArith,
SingleEq, GSM8K) with LLM-Adapters' math_data.json as their training mix."""

from __future__ import annotations

import functools
import json
import random
import re

from fastdca.tasks.answers import parse_number
from fastdca.tasks.base import Example, Task, data_path, format_prompt, seeded_split

__all__ = ["DateUnderstanding", "Math401", "WordProblems", "WORD_PROBLEM_FILES"]

LETTERS = "ABCDEFGHIJ"


class DateUnderstanding(Task):
    """BIG-bench date_understanding, multiple choice. The options are shuffled per item with a seeded
    RNG (in the source the right one is nearly always first); the target is "(C) 05/01/2021" and the
    gold answer the letter. No official split: a seeded ``test_size`` of the 369 items is the test set."""

    name = "date_understanding"
    description = "Date Understanding (BIG-bench), multiple choice"
    causal_layers = 10
    max_new_tokens = 16

    def __init__(self, *, test_size: int = 100, seed: int = 0):
        super().__init__()
        self.test_size, self.seed = test_size, seed

    def _all(self):
        raw = json.loads(data_path("bigbench", "date_understanding.json").read_text())["examples"]
        out = []
        for i, ex in enumerate(raw):
            opts = list(ex["target_scores"].items())
            random.Random(f"date_understanding/options/{self.seed}/{i}").shuffle(opts)
            choices = tuple(o for o, _ in opts)
            k = next(j for j, (_, s) in enumerate(opts) if s == 1)
            instruction = (ex["input"].strip() + "\nOptions:\n"
                           + "\n".join(f"({LETTERS[j]}) {c}" for j, c in enumerate(choices)))
            out.append(Example(id=f"date_understanding-{i}", prompt=format_prompt(instruction),
                               target=f"({LETTERS[k]}) {choices[k]}", answer=LETTERS[k], answer_type="choice",
                               choices=choices, meta={"index": i}))
        return out

    def _build(self, split):
        train, test = seeded_split(self._all(), self.test_size, self.seed, "date_understanding")
        return train if split == "train" else test


class Math401(Task):
    """Math401 arithmetic ("5+9=" -> "14"). No official split: a seeded ``test_size`` of the 393 distinct
    queries (401 items, 8 repeated) is the test set. Answers are compared as numbers within 1e-3 (the gold answers have 4 decimals)."""

    name = "math401"
    description = "Math401 arithmetic expressions"
    causal_layers = 1
    max_new_tokens = 24
    number_fallback = "first"

    def __init__(self, *, test_size: int = 100, seed: int = 0):
        super().__init__()
        self.test_size, self.seed = test_size, seed

    def _all(self):
        out, seen = [], set()
        for i, line in enumerate(data_path("math401", "math401.jsonl").read_text().splitlines()):
            if not line.strip():
                continue
            rec = json.loads(line)
            q, r = rec["query"].strip(), str(rec["response"]).strip()
            if q in seen:  # 8 queries occur twice in the file; keep one so none is in both splits
                continue
            seen.add(q)
            out.append(Example(id=f"math401-{i}", prompt=format_prompt(f"Calculate: {q}"), target=r, answer=r,
                               answer_type="number", meta={"query": q}))
        return out

    def _build(self, split):
        train, test = seeded_split(self._all(), self.test_size, self.seed, "math401")
        return train if split == "train" else test


WORD_PROBLEM_FILES = {
    "addsub": ("AddSub", "AddSub_test.json"),
    "svamp": ("SVAMP", "SVAMP_test.json"),
    "multiarith": ("MultiArith", "MultiArith_test.json"),
    "singleeq": ("SingleEq", "SingleEq_test.json"),
    "gsm8k": ("GSM8K", "gsm8k_test.json"),
}


def _norm(q: str) -> str:
    # letters and digits only: the sets share questions that differ in spacing and punctuation
    # ("Vince 's" / "Vince's"), and AddSub and SingleEq overlap
    return re.sub(r"[^a-z0-9]", "", q.lower())


def _records(fname):
    return json.loads(data_path("llm_adapters", fname).read_text())


@functools.lru_cache(maxsize=None)
def _word_problem_splits():
    """{task: test records}, and the training mix: math_data.json minus every test question.

    math_data.json holds ~80% of each set; each set's test split is the rest of its file (questions
    deduplicated, compared by their letters and digits only); the mix drops every question that is in any test split."""
    mix = _records("math_data.json")
    mix_q = {_norm(r["instruction"]) for r in mix}
    tests, own = {}, {}
    for key, (_, fname) in WORD_PROBLEM_FILES.items():
        seen, test = set(), []
        recs = _records(fname)
        for r in recs:
            q = _norm(r["instruction"])
            if q not in mix_q and q not in seen:
                seen.add(q)
                test.append(r)
        tests[key] = test
        own[key] = {_norm(r["instruction"]) for r in recs}
    held_out = {_norm(r["instruction"]) for t in tests.values() for r in t}
    train = [r for r in mix if _norm(r["instruction"]) not in held_out]
    return tests, train, own


class WordProblems(Task):
    """An arithmetic word-problem set packaged by LLM-Adapters (chain-of-thought outputs, numeric answers).

    test: the items of the set's file that are not in math_data.json. train: ``train_source="mix"``
    (default) the whole math_data.json mix minus every test question of all five sets;
    ``"own"``: only this set's part of it. The target is the chain of thought ("... The answer is 4.");
    the gold answer is the ``answer`` field, compared as a number with the number after the last
    "answer is" (else the last number) of the response.
    """

    causal_layers = 3
    max_new_tokens = 256

    def __init__(self, key: str, *, train_source: str = "mix"):
        super().__init__()
        if key not in WORD_PROBLEM_FILES:
            raise ValueError(f"unknown word-problem set {key!r}; known: {', '.join(WORD_PROBLEM_FILES)}")
        if train_source not in ("mix", "own"):
            raise ValueError(f"train_source must be 'mix' or 'own', got {train_source!r}")
        self.name, self.train_source = key, train_source
        self.description = f"{WORD_PROBLEM_FILES[key][0]} arithmetic word problems (LLM-Adapters)"

    @staticmethod
    def _example(rec, id):
        target = rec["output"].strip()
        if target.startswith("A:"):
            target = target[2:].strip()
        answer = str(rec["answer"]).strip()
        if not target:  # a few records have an empty output: train on the bare answer
            v = parse_number(answer)
            target = f"The answer is {int(v) if v is not None and v.is_integer() else answer}."
        return Example(id=id, prompt=format_prompt(rec["instruction"], rec.get("input", "")), target=target,
                       answer=answer, answer_type="number")

    def _build(self, split):
        tests, train, own = _word_problem_splits()
        if split == "test":
            return [self._example(r, f"{self.name}-test-{i}") for i, r in enumerate(tests[self.name])]
        if self.train_source == "own":
            train = [r for r in train if _norm(r["instruction"]) in own[self.name]]
        exs = [self._example(r, f"math_data-{i}") for i, r in enumerate(train)]
        # AQuA items in the mix have option letters as answers: keep them as training text, typed "choice"
        return [e if re.fullmatch(r"[-\d.,/]+", e.answer) else
                Example(e.id, e.prompt, e.target, e.answer, "choice") for e in exs]
