"""Reasoning tasks for DCA fine-tuning and evaluation, with their data shipped in ``fastdca/tasks/data``.

    >>> from fastdca.tasks import get_task
    >>> task = get_task("letter_concat")
    >>> ex = task.examples("test")[0]           # Example(id, prompt, target, answer, answer_type, ...)
    >>> task.is_correct(generated_text, ex)     # extraction + comparison
    >>> task.accuracy(generated_texts, examples)
    >>> task.causal_layers                      # the paper's L' for this task

``get_task`` also takes the path of a user file in the LLM-Adapters JSON/JSONL format.
"""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path

from fastdca.tasks.answers import (
    extract_choice, extract_number, extract_text, extract_word, normalize_text, numbers_equal, parse_number,
    truncate_response,
)
from fastdca.tasks.base import (
    DataFormatError, Example, FileTask, Task, format_prompt, load_file_task, read_records,
)
from fastdca.tasks.letters import VARIANTS, LetterConcatenation, concat_letters
from fastdca.tasks.reasoning import WORD_PROBLEM_FILES, DateUnderstanding, Math401, WordProblems

__all__ = [
    "TASKS", "get_task", "task_names", "Example", "Task", "FileTask", "DataFormatError", "format_prompt",
    "read_records", "load_file_task", "LetterConcatenation", "DateUnderstanding", "Math401", "WordProblems",
    "VARIANTS", "concat_letters", "parse_number", "numbers_equal", "extract_number", "extract_choice",
    "extract_word", "extract_text", "normalize_text", "truncate_response",
]

#: name -> factory(**kwargs) -> Task
TASKS = {
    "letter_concat": LetterConcatenation,
    "date_understanding": DateUnderstanding,
    "math401": Math401,
    **{key: functools.partial(WordProblems, key) for key in WORD_PROBLEM_FILES},
}

_ALIASES = {
    "letter_concatenation": "letter_concat", "letters": "letter_concat", "last_letter": "letter_concat",
    "date": "date_understanding", "dates": "date_understanding",
    "add_sub": "addsub", "multi_arith": "multiarith", "single_eq": "singleeq", "gsm_8k": "gsm8k",
}


def task_names() -> list[str]:
    """The registered task names."""
    return list(TASKS)


def get_task(name: str | os.PathLike, **kwargs) -> Task:
    """A task by name (case-insensitive; '-' and ' ' read as '_'), with its keyword parameters, e.g.
    ``get_task("letter_concat", n_train=4000, seed=1)``; or a :class:`FileTask` when ``name`` is the
    path of an LLM-Adapters JSON/JSONL file. Unknown names raise ValueError listing the known ones."""
    if isinstance(name, os.PathLike):
        return load_file_task(name, **kwargs)
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"task name must be a non-empty string; known tasks: {', '.join(TASKS)}")
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    key = _ALIASES.get(key, key)
    if key in TASKS:
        try:
            return TASKS[key](**kwargs)
        except TypeError as error:      # an option the task does not take
            params = [p for p in inspect.signature(TASKS[key]).parameters]
            raise ValueError(f"task {key!r} does not take the options {sorted(kwargs)} ({error}); its options: "
                             f"{', '.join(params)}") from None
    looks_like_path = name.endswith((".json", ".jsonl")) or os.sep in name or "/" in name
    if looks_like_path or Path(name).is_file():
        if not Path(name).exists():
            raise ValueError(f"task data file {name!r} does not exist (known task names: {', '.join(TASKS)})")
        return load_file_task(name, **kwargs)
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} "
                     "(or the path of an LLM-Adapters JSON/JSONL file)")
