"""Input checks that run before any expensive work, with errors that say what to fix.

Example:
    >>> import dspy
    >>> validate_dataset([dspy.Example(question="1+1?", answer="2").with_inputs("question")], "trainset")
    >>> validate_dataset([], "trainset")
    Traceback (most recent call last):
    ...
    ValueError: trainset is empty. Pass a list of dspy.Example objects, e.g. [dspy.Example(question=..., answer=...).with_inputs('question')].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import dspy

__all__ = ["validate_dataset", "validate_program", "check_positive_int", "check_number"]


def validate_dataset(examples: Any, name: str) -> None:
    """Check that ``examples`` is a non-empty list of ``dspy.Example`` with inputs and labels set."""
    if examples is None or isinstance(examples, (str, bytes, dict)) or not isinstance(examples, Sequence):
        raise TypeError(f"{name} must be a list of dspy.Example objects; got {type(examples).__name__}.")
    if len(examples) == 0:
        raise ValueError(
            f"{name} is empty. Pass a list of dspy.Example objects, e.g. "
            "[dspy.Example(question=..., answer=...).with_inputs('question')]."
        )
    for i, ex in enumerate(examples):
        if not isinstance(ex, dspy.Example):
            raise TypeError(f"{name}[{i}] is a {type(ex).__name__}, not a dspy.Example.")
        if ex._input_keys is None:
            raise ValueError(
                f"{name}[{i}] has no input fields set. Call .with_inputs(...) on every example, e.g. "
                f"dspy.Example(question=..., answer=...).with_inputs('question'). Keys: {sorted(ex.keys())}."
            )
        if not ex.labels().keys():
            raise ValueError(
                f"{name}[{i}] has no gold label fields (every key is an input: {sorted(ex.inputs().keys())}). "
                "TRPrompt's textual rewards compare outputs with gold answers; add e.g. answer=... to each example."
            )


def validate_program(program: Any) -> list[str]:
    """Check that ``program`` is a ``dspy.Module`` with predictors; return their names."""
    if not isinstance(program, dspy.Module):
        raise TypeError(f"student must be a dspy.Module (e.g. dspy.ChainOfThought(...)); got {type(program).__name__}.")
    names = [n for n, _ in program.named_predictors()]
    if not names:
        raise ValueError(
            f"The student program {type(program).__name__} has no predictors to optimize "
            "(no dspy.Predict / ChainOfThought inside, or all of them are in sub-modules marked _compiled=True)."
        )
    return names


def check_positive_int(name: str, value: Any, *, minimum: int = 1, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {name}={value!r}.")


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        raise ValueError(f"{name} must be a number; got {name}={value!r}.")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{low}, {high}]; got {name}={value!r}.")
