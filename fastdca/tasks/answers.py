"""Answer extraction and comparison, shared by the tasks.

Numbers are compared as numbers ("1,234.0" == "1234", "$12" == "12.00", "2/3" == "0.6667" within the
tolerance); multiple-choice answers by option letter or, failing that, by the option's text; letter
strings case-insensitively.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

__all__ = [
    "parse_number", "numbers_equal", "extract_number", "extract_choice", "extract_word", "extract_text",
    "truncate_response", "normalize_text", "ABS_TOL",
]

ABS_TOL = 1e-3  # LLM-Adapters' convention: |prediction - label| < 0.001

# A number: optional sign (not when the '-' follows a digit, letter or ')' -- "5-3" is a subtraction),
# digits with optional thousands separators, optional decimals, optional "/denominator".
_NUM = r"(?:(?<![\w)])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+(?:\.\d+)?)?|(?:(?<![\w)])-)?\.\d+"
_NUM_RE = re.compile(_NUM)
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:|=)\s*:?", re.IGNORECASE)
# Where a generated response ends: the next template section, or a new turn.
_STOP_RE = re.compile(r"\n?###|<\|im_end\|>|<\|endoftext\|>|</s>")


def truncate_response(text: str) -> str:
    """Cut a generated response at the next ``### ...`` template section or end-of-text marker."""
    m = _STOP_RE.search(text)
    return text[: m.start()] if m else text


def parse_number(s) -> float | None:
    """``"1,234.0" -> 1234.0``, ``"$12" -> 12.0``, ``"50%" -> 50.0``, ``"2/3" -> 0.666..``; None if not a number."""
    if isinstance(s, bool) or s is None:
        return None
    if isinstance(s, (int, float)):
        return float(s) if math.isfinite(s) else None
    t = str(s).strip().replace(",", "").replace("$", "").rstrip("%").strip().rstrip(".")
    if not t:
        return None
    try:
        if "/" in t:
            num, den = t.split("/", 1)
            d = float(den)
            return float(num) / d if d != 0 else None
        v = float(t)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def numbers_equal(a, b, abs_tol: float = ABS_TOL) -> bool:
    """True when ``a`` and ``b`` parse as numbers within ``abs_tol`` of each other."""
    x, y = parse_number(a), parse_number(b)
    if x is None or y is None:
        return False
    return abs(x - y) < abs_tol or math.isclose(x, y, rel_tol=1e-9)


def _after_answer_is(text: str) -> str | None:
    ms = list(_ANSWER_IS_RE.finditer(text))
    return text[ms[-1].end():] if ms else None


def extract_number(text: str, fallback: str = "last") -> str | None:
    """The predicted number in a response, as a string with separators removed.

    The first number after the last "answer is"/"answer:" wins; otherwise ``fallback``: ``"last"``
    (the last number in the text, LLM-Adapters' rule for chains of thought) or ``"first"`` (the
    first number after the last '=' if there is one, else the first number: for direct answers).
    """
    text = truncate_response(text)
    tail = _after_answer_is(text)
    if tail is not None:
        m = _NUM_RE.search(tail)
        if m:
            return m.group(0).replace(",", "")
    if fallback == "last":
        nums = _NUM_RE.findall(text)
        return nums[-1].replace(",", "") if nums else None
    if fallback == "first":
        if "=" in text:
            m = _NUM_RE.search(text.rsplit("=", 1)[1])
            if m:
                return m.group(0).replace(",", "")
        m = _NUM_RE.search(text)
        return m.group(0).replace(",", "") if m else None
    raise ValueError(f"fallback must be 'last' or 'first', got {fallback!r}")


def extract_choice(text: str, choices: Sequence[str] = (), letters: str = "ABCDEFGHIJ") -> str | None:
    """The option letter a response picks, or None.

    In order: a letter after "answer is" ("(C)", "C", "C)"); the first "(C)" in the text; a letter
    opening the response ("C)", "C.", "C:" or "C" alone); the option whose text occurs first.
    ``choices`` are the option texts in letter order; letters beyond ``len(choices)`` are not valid
    when choices are given.
    """
    text = truncate_response(text)
    valid = letters[: len(choices)] if choices else letters
    tail = _after_answer_is(text)
    if tail is not None:
        m = re.match(r"\s*\(?([A-Z])\b\)?", tail)
        if m and m.group(1) in valid:
            return m.group(1)
    m = re.search(r"\(([A-Z])\)", text)
    if m and m.group(1) in valid:
        return m.group(1)
    m = re.match(r"\s*([A-Z])(?:[).:]|\s|$)", text)
    if m and m.group(1) in valid:
        return m.group(1)
    best = None
    for i, c in enumerate(choices):
        c = str(c).strip()
        if not c:
            continue
        pos = text.find(c)
        if pos >= 0 and (best is None or pos < best[0] or (pos == best[0] and len(c) > best[1])):
            best = (pos, len(c), valid[i])
    return best[2] if best else None


def extract_word(text: str) -> str | None:
    """A letter-string answer, upper-cased: the word after "answer is", else the first all-upper-case
    word of two or more letters, else the first word; None if the response has no letters."""
    text = truncate_response(text)
    tail = _after_answer_is(text)
    if tail is not None:
        m = re.search(r"[A-Za-z]+", tail)
        if m:
            return m.group(0).upper()
    m = re.search(r"\b[A-Z]{2,}\b", text)
    if m:
        return m.group(0)
    m = re.search(r"[A-Za-z]+", text)
    return m.group(0).upper() if m else None


def normalize_text(s: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]", " ", str(s).lower()).split())


def extract_text(text: str) -> str | None:
    """A free-text answer: the rest of the sentence after "answer is", else the first non-empty line."""
    text = truncate_response(text)
    tail = _after_answer_is(text)
    if tail is not None:
        tail = tail.strip().split("\n", 1)[0]
        tail = re.split(r"\.(?:\s|$)", tail, maxsplit=1)[0]
        return tail.strip() or None
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return None
