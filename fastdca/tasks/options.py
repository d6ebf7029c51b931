"""A task's keyword options from the command line (`--task-option KEY=VALUE` of train, eval and sweep)."""

from __future__ import annotations


def parse_task_options(items) -> dict:
    """["n_train=1200", "train_variants=second_last,last"] -> {"n_train": 1200, "train_variants": ("second_last", "last")}:
    integers and floats as numbers, a comma makes a tuple, anything else stays text."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--task-option takes KEY=VALUE; got {item!r}")
        parts = [_number_or_text(v) for v in value.split(",")]
        options[key] = tuple(parts) if "," in value or key.endswith("variants") else parts[0]
    return options


def _number_or_text(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
