"""Letter Concatenation: "Take the second-last letters of the words in "GALLEGOS MORAN" ..." -> "OA"."""

from __future__ import annotations

import random

from fastdca.tasks.base import Example, Task, data_path, format_prompt

__all__ = ["LetterConcatenation", "VARIANTS", "concat_letters"]

# variant -> (index into the word, words used in the instruction)
VARIANTS = {
    "first": (0, "first"),
    "second": (1, "second"),
    "second_last": (-2, "second-last"),
    "last": (-1, "last"),
}


def concat_letters(name: str, variant: str) -> str:
    """The answer: the chosen letter of every word, concatenated (``"GALLEGOS MORAN", "second_last" -> "OA"``)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; variants are {', '.join(VARIANTS)}")
    i = VARIANTS[variant][0]
    words = name.split()
    for w in words:
        if len(w) < 2:
            raise ValueError(f"every word needs at least 2 letters, got {w!r} in {name!r}")
    return "".join(w[i] for w in words)


def _read_names(fname: str) -> list[str]:
    names = [ln.strip().upper() for ln in data_path("census_names", fname).read_text().splitlines()]
    return sorted({n for n in names if len(n) >= 2 and n.isalpha()})


class LetterConcatenation(Task):
    """Two upper-case words, a census first name and a census last name ("GALLEGOS MORAN").

    The names themselves are split, not just the pairs: a seeded ``test_fraction`` of all distinct
    name words is reserved for the test set, so no word of a test item appears anywhere in training
    (in either position). Training mixes ``train_variants`` round-robin (equal counts); the test set is
    ``test_variant`` (the paper reports the second-last variant). The test set depends only on
    ``seed``, ``n_test``, ``test_fraction`` and ``test_variant``, not on ``n_train``.
    """

    name = "letter_concat"
    description = "Letter Concatenation: concatenate the first/second/second-last/last letters of two names"
    causal_layers = 20
    max_new_tokens = 8

    def __init__(self, *, n_train: int = 2000, n_test: int = 100, seed: int = 0,
                 train_variants=("first", "second", "second_last", "last"), test_variant: str = "second_last",
                 test_fraction: float = 0.2):
        super().__init__()
        train_variants = tuple(train_variants)
        for v in (*train_variants, test_variant):
            if v not in VARIANTS:
                raise ValueError(f"unknown variant {v!r}; variants are {', '.join(VARIANTS)}")
        if not train_variants:
            raise ValueError("train_variants is empty")
        if n_train < 0 or n_test < 0:
            raise ValueError("n_train and n_test must be >= 0")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        self.n_train, self.n_test, self.seed = n_train, n_test, seed
        self.train_variants, self.test_variant, self.test_fraction = train_variants, test_variant, test_fraction
        self._pools = None

    def name_pools(self) -> dict[str, tuple[list[str], list[str]]]:
        """{"train": (first names, last names), "test": (...)}; no word is in both splits."""
        if self._pools is None:
            first, last = _read_names("first_names.txt"), _read_names("last_names.txt")
            words = sorted(set(first) | set(last))
            random.Random(f"letter_concat/names/{self.seed}").shuffle(words)
            test_words = set(words[: int(round(len(words) * self.test_fraction))])
            self._pools = {
                "train": ([n for n in first if n not in test_words], [n for n in last if n not in test_words]),
                "test": ([n for n in first if n in test_words], [n for n in last if n in test_words]),
            }
        return self._pools

    def _pairs(self, split: str, n: int) -> list[str]:
        first, last = self.name_pools()[split]
        cap = len(first) * len(last)
        if n > cap // 2:
            raise ValueError(f"n_{split}={n} is too many for the {split} name pools ({cap} pairs)")
        rng = random.Random(f"letter_concat/{split}/{self.seed}")
        seen, out = set(), []
        while len(out) < n:
            pair = f"{rng.choice(first)} {rng.choice(last)}"
            if pair not in seen:
                seen.add(pair)
                out.append(pair)
        return out

    @staticmethod
    def make_example(name: str, variant: str, id: str) -> Example:
        """The example for one name and variant (prompt, target = answer = the letters)."""
        letters = concat_letters(name, variant)
        instruction = (f'Take the {VARIANTS[variant][1]} letters of the words in "{name}" '
                       "and concatenate them.")
        return Example(id=id, prompt=format_prompt(instruction), target=letters, answer=letters,
                       answer_type="letters", meta={"name": name, "variant": variant})

    def _build(self, split):
        if split == "train":
            pairs = self._pairs("train", self.n_train)
            vs = self.train_variants
            return [self.make_example(p, vs[i % len(vs)], f"letter_concat-train-{i}") for i, p in enumerate(pairs)]
        pairs = self._pairs("test", self.n_test)
        return [self.make_example(p, self.test_variant, f"letter_concat-test-{i}") for i, p in enumerate(pairs)]
