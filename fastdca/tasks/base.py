"""The task interface: examples, the prompt template, scoring; and user data files in the LLM-Adapters format."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from fastdca.tasks.answers import (
    extract_choice, extract_number, extract_text, extract_word, normalize_text, numbers_equal, parse_number,
)

__all__ = [
    "Example", "Task", "FileTask", "DataFormatError", "format_prompt", "read_records", "load_file_task",
    "PROMPT", "PROMPT_WITH_INPUT", "data_path", "ANSWER_TYPES",
]

# The Alpaca / LLaMA-Adapter / LLM-Adapters prompt: the frame DCA's released code trains with.
PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

ANSWER_TYPES = ("number", "choice", "letters", "text")


def format_prompt(instruction: str, input: str = "") -> str:
    """The full prompt text for an instruction (and optional input)."""
    if input and input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction.strip(), input=input.strip())
    return PROMPT.format(instruction=instruction.strip())


def data_path(*parts: str):
    """A file shipped in ``fastdca/tasks/data`` (an importlib.resources Traversable)."""
    return resources.files("fastdca.tasks").joinpath("data", *parts)


@dataclass(frozen=True)
class Example:
    """One item of a task.

    prompt: the full text given to the model (template applied); target: the text the model is
    trained to continue it with (no EOS); answer: the gold answer the extraction is compared with
    (None for training-only records); answer_type: "number", "choice", "letters" or "text";
    choices: option texts for multiple choice (answer is then a letter "A", "B", ...);
    meta: anything else (variant, source, ...).
    """

    id: str
    prompt: str
    target: str
    answer: str | None
    answer_type: str = "text"
    choices: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict, compare=False, hash=False)


class Task:
    """Base class. Subclasses set the class attributes and implement ``_build(split)``."""

    name: str = ""
    description: str = ""
    causal_layers: int | None = None  # the paper's L' for this task (None: the config's default)
    max_new_tokens: int = 32
    splits: tuple[str, ...] = ("train", "test")

    def __init__(self):
        self._cache: dict[str, list[Example]] = {}

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r})"

    def examples(self, split: str = "test") -> list[Example]:
        """The examples of ``split`` ("train" or "test"), deterministic for the task's parameters."""
        if split not in self.splits:
            raise ValueError(f"task {self.name!r} has no split {split!r}; its splits are {', '.join(self.splits)}")
        if split not in self._cache:
            self._cache[split] = self._build(split)
        return list(self._cache[split])

    def _build(self, split: str) -> list[Example]:
        raise NotImplementedError

    # -- scoring --------------------------------------------------------------------------------
    def extract_answer(self, text: str, example: Example) -> str | None:
        """The answer a generated response gives, in the form of ``example.answer``; None if none."""
        kind = example.answer_type
        if kind == "number":
            return extract_number(text, fallback=self.number_fallback)
        if kind == "choice":
            return extract_choice(text, example.choices)
        if kind == "letters":
            return extract_word(text)
        return extract_text(text)

    number_fallback = "last"

    def answers_match(self, predicted: str | None, example: Example) -> bool:
        if example.answer is None:
            raise ValueError(f"example {example.id!r} of task {self.name!r} has no gold answer to score against")
        if predicted is None:
            return False
        kind = example.answer_type
        if kind == "number":
            return numbers_equal(predicted, example.answer)
        if kind in ("choice", "letters"):
            return predicted.strip().upper() == example.answer.strip().upper()
        return normalize_text(predicted) == normalize_text(example.answer)

    def is_correct(self, text: str, example: Example) -> bool:
        """Whether a generated response (the continuation after the prompt) answers ``example`` right."""
        return self.answers_match(self.extract_answer(text, example), example)

    def score(self, texts: Sequence[str], examples: Sequence[Example]) -> list[dict[str, Any]]:
        """One record per example: id, prediction (extracted), answer, correct, response (raw text)."""
        if len(texts) != len(examples):
            raise ValueError(f"got {len(texts)} responses for {len(examples)} examples")
        out = []
        for t, ex in zip(texts, examples):
            pred = self.extract_answer(t, ex)
            out.append({"id": ex.id, "prediction": pred, "answer": ex.answer,
                        "correct": self.answers_match(pred, ex), "response": t})
        return out

    def accuracy(self, texts: Sequence[str], examples: Sequence[Example]) -> float:
        """Fraction of responses that are correct (0.0 for no examples)."""
        rows = self.score(texts, examples)
        return sum(r["correct"] for r in rows) / len(rows) if rows else 0.0


def seeded_split(items: list, test_size: int, seed: int, salt: str) -> tuple[list, list]:
    """Deterministic (train, test) split of ``items``: a seeded shuffle of the indices; each split keeps
    the original order."""
    if not 0 < test_size < len(items):
        raise ValueError(f"test_size must be between 1 and {len(items) - 1}, got {test_size}")
    idx = list(range(len(items)))
    random.Random(f"{salt}/{seed}").shuffle(idx)
    test = sorted(idx[:test_size])
    train = sorted(idx[test_size:])
    return [items[i] for i in train], [items[i] for i in test]


# -- user data files ----------------------------------------------------------------------------

class DataFormatError(ValueError):
    """A data file that is not valid LLM-Adapters JSON/JSONL; the message names the file and line/record."""


_KNOWN_KEYS = ("instruction", "input", "output", "answer")


def _check_record(rec, where: str) -> dict:
    if not isinstance(rec, dict):
        raise DataFormatError(f"{where}: expected a JSON object with keys instruction/input/output/answer, "
                              f"got {type(rec).__name__}")
    if "instruction" not in rec:
        raise DataFormatError(f"{where}: missing the key 'instruction' (keys present: {sorted(rec)})")
    if "output" not in rec and "answer" not in rec:
        raise DataFormatError(f"{where}: needs an 'output' (training target) or an 'answer' (gold answer)")
    out = {}
    for k in _KNOWN_KEYS:
        v = rec.get(k)
        if v is None:
            out[k] = None if k in ("output", "answer") else ""
        elif k == "answer" and isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = str(v)
        elif isinstance(v, str):
            out[k] = v
        else:
            raise DataFormatError(f"{where}: {k!r} must be a string, got {type(v).__name__}")
    if not out["instruction"].strip():
        raise DataFormatError(f"{where}: 'instruction' is empty")
    return out


def read_records(path: str | os.PathLike) -> list[dict]:
    """Read and validate a file in the LLM-Adapters format.

    Either a JSON array of objects, or JSON Lines (one object a line; blank lines skipped). Each object
    needs ``instruction`` and at least one of ``output`` / ``answer``; ``input`` is optional. Errors
    raise :class:`DataFormatError` naming the file and the line (and record number).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if not p.is_file():
        raise DataFormatError(f"data path {str(path)!r} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{p}: not UTF-8 text ({e})") from None
    stripped = text.lstrip()
    if not stripped:
        raise DataFormatError(f"{p}: the file is empty")
    records = []
    if stripped[0] == "[":
        dec = json.JSONDecoder()
        pos = text.index("[") + 1
        n = len(text)

        def line_of(i):
            return text.count("\n", 0, i) + 1

        def skip_ws(i):
            while i < n and text[i] in " \t\r\n":
                i += 1
            return i

        pos = skip_ws(pos)
        if pos < n and text[pos] == "]":
            raise DataFormatError(f"{p}: the JSON array is empty")
        while True:
            pos = skip_ws(pos)
            start = pos
            try:
                obj, pos = dec.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{p}, line {e.lineno}, column {e.colno} (record {len(records) + 1}): "
                                      f"invalid JSON: {e.msg}") from None
            records.append(_check_record(obj, f"{p}, line {line_of(start)} (record {len(records) + 1})"))
            pos = skip_ws(pos)
            if pos < n and text[pos] == ",":
                pos += 1
                continue
            if pos < n and text[pos] == "]":
                if text[pos + 1:].strip():
                    raise DataFormatError(f"{p}, line {line_of(pos + 1)}: unexpected text after the JSON array")
                break
            raise DataFormatError(f"{p}, line {line_of(pos)}: expected ',' or ']' after record {len(records)}")
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                hint = "" if stripped[0] == "{" else " (expected a JSON array or JSON Lines)"
                raise DataFormatError(f"{p}, line {lineno}, column {e.colno}: invalid JSON: {e.msg}{hint}") from None
            records.append(_check_record(obj, f"{p}, line {lineno} (record {len(records) + 1})"))
    return records


def _infer_answer_type(answer: str | None) -> str:
    if answer is None:
        return "text"
    if parse_number(answer) is not None:
        return "number"
    a = answer.strip().strip("()")
    if len(a) == 1 and a.isalpha() and a.isupper():
        return "choice"
    return "text"


class FileTask(Task):
    """A task read from a user's LLM-Adapters JSON/JSONL file.

    Without ``test_size`` every split ("train", "test", "all") is the whole file: train on one file
    and evaluate on another, as LLM-Adapters does. With ``test_size`` the file is split with a seeded
    shuffle. The target is ``output`` (``answer`` when there is no output); the gold answer is
    ``answer`` (else the number or "answer is ..." extracted from ``output``). ``answer_type`` "auto"
    decides per record: numbers are compared as numbers, a single capital letter as an option letter,
    anything else as normalised text.
    """

    splits = ("train", "test", "all")

    def __init__(self, path: str | os.PathLike, *, name: str | None = None, answer_type: str = "auto",
                 causal_layers: int | None = None, max_new_tokens: int = 256, test_size: int | None = None,
                 seed: int = 0):
        super().__init__()
        if answer_type != "auto" and answer_type not in ANSWER_TYPES:
            raise ValueError(f"answer_type must be 'auto' or one of {ANSWER_TYPES}, got {answer_type!r}")
        self.path = Path(path)
        self.name = name or self.path.stem
        self.description = f"LLM-Adapters-format data from {self.path}"
        self.answer_type = answer_type
        self.causal_layers = causal_layers
        self.max_new_tokens = max_new_tokens
        self.test_size = test_size
        self.seed = seed
        self.records = read_records(self.path)  # validate eagerly: errors before any training starts
        if test_size is not None and not 0 < test_size < len(self.records):
            raise ValueError(f"test_size must be between 1 and {len(self.records) - 1} for {self.path}, "
                             f"got {test_size}")

    def _example(self, i: int, rec: dict) -> Example:
        answer = rec["answer"]
        kind = self.answer_type
        if answer is None and rec["output"] is not None:
            # no gold answer given: take it from the output's "answer is ..." / last number
            if kind in ("auto", "number"):
                answer = extract_number(rec["output"])
            if answer is None and kind in ("auto", "text", "letters"):
                answer = extract_text(rec["output"])
        if kind == "auto":
            kind = _infer_answer_type(answer)
        if kind == "choice" and answer is not None:
            answer = answer.strip().strip("()").upper()
        target = rec["output"] if rec["output"] is not None else rec["answer"]
        target = target.strip()
        return Example(id=f"{self.name}-{i}", prompt=format_prompt(rec["instruction"], rec["input"]),
                       target=target, answer=answer, answer_type=kind, meta={"line_record": i + 1})

    def _build(self, split):
        exs = [self._example(i, r) for i, r in enumerate(self.records)]
        if self.test_size is None or split == "all":
            return exs
        train, test = seeded_split(exs, self.test_size, self.seed, f"file/{self.name}")
        return train if split == "train" else test


def load_file_task(path: str | os.PathLike, **kwargs) -> FileTask:
    """A :class:`FileTask` for a user data file (validated now; errors name the line)."""
    return FileTask(path, **kwargs)
