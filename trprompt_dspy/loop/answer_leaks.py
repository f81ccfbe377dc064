"""The answer-leak guard: gold answers never reach the prompt model (rewards, instructions, t*).

The textual reward is fed back to the prompt model, which would otherwise learn to copy answers into
instructions; an untrained small prompt model also tends to solve the question instead of writing an
instruction. The leak guard enforces that after the fact:

* :func:`redact_answer_leaks` replaces gold values in a text with ``[redacted]``;
* :func:`leaks_answer` is the matching predicate;
* :func:`instruction_leaks_answer` flags instructions that contain the final answer (an untrained small
  prompt model tends to solve the question instead of writing an instruction).

Numbers match by value (gold ``42`` matches ``42``, ``42.0``, ``$42``, ``-42``; gold ``42000`` matches
``42,000``), strings match case-insensitively as whole words. A gold value that also occurs in the
``context`` (normally the query itself, e.g. "3 friends share ..." with answer 3, or multiple-choice
options) only counts when it is stated as an answer ("the answer is 3", "= 3", "option B"). Very short
alphabetic golds (``"B"``, ``"yes"``) are always matched in that answer-cue mode only, so ordinary words
are left alone.

Example:
    >>> redact_answer_leaks("You said $1,250.00 but the total should have been checked.", ["1250"])
    ('You said [redacted] but the total should have been checked.', 1)
    >>> leaks_answer("Add the 3 bags first.", ["3"], context="Tom has 3 bags of 4 apples.")
    False
    >>> instruction_leaks_answer("The answer is 3.", ["3"], query="Tom has 3 bags.")
    True
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import dspy

__all__ = ["REDACTED", "gold_values_of", "leaks_answer", "redact_answer_leaks", "instruction_leaks_answer"]

REDACTED = "[redacted]"

_NUMBER_RE = re.compile(
    r"(?<![\w.])(?P<lead>\$\s?)?(?P<sign>[-\u2212])?(?P<lead2>\$\s?)?"
    r"(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)(?P<pct>\s?%)?"
)
_CUE_WORDS = r"(?:answer|result|total|solution|final|output|option|choice|letter)"
_CUE_BEFORE = re.compile(
    rf"(?:{_CUE_WORDS}\s*(?:is|was|should\s+be|would\s+be|will\s+be|equals|of)?\s*[:=,]?"
    r"|=|\u2248|equals|\\boxed\{|####)"
    r"\s*[*_`\"'(\[]*\s*$",
    re.IGNORECASE,
)
_CUE_WINDOW = 48
_SHORT_ALPHA = 3  # alphabetic golds this short are only matched after an answer cue


@dataclass(frozen=True)
class _Gold:
    text: str
    number: Decimal | None  # absolute value for numeric golds
    pattern: re.Pattern[str] | None  # for text golds
    cue_only: bool


def _parse_number(text: str) -> Decimal | None:
    s = text.strip().replace("\u2212", "-").replace("$", "").replace(" ", "").rstrip("%")
    if not re.fullmatch(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+", s):
        return None
    try:
        return abs(Decimal(s.replace(",", "")))
    except InvalidOperation:
        return None


def _flatten(value: Any) -> Iterable[Any]:
    if value is None:
        return
    if isinstance(value, str | bytes):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _flatten(v)
    elif isinstance(value, Iterable):
        for v in value:
            yield from _flatten(v)
    else:
        yield value


def gold_values_of(source: Any) -> list[str]:
    """The gold values to guard, as strings.

    Args:
        source: A ``dspy.Example`` (its ``labels()`` are used), a mapping of label fields, or an iterable of
            values. Nested lists/dicts are flattened.

    Returns:
        Non-empty stripped strings, without duplicates, in order.

    Example:
        >>> import dspy
        >>> gold_values_of(dspy.Example(question="q", answer=42).with_inputs("question"))
        ['42']
    """
    if isinstance(source, dspy.Example):
        try:
            source = dict(source.labels())
        except ValueError:  # with_inputs() not called: every field is a candidate
            source = dict(source)
    seen: dict[str, None] = {}
    for v in _flatten(source):
        if isinstance(v, bytes):
            continue
        s = str(v).strip()
        if s:
            seen.setdefault(s, None)
    return list(seen)


def _compile_golds(gold_values: Iterable[Any]) -> list[_Gold]:
    golds: list[_Gold] = []
    for value in gold_values_of(gold_values):
        number = _parse_number(value)
        if number is not None:
            golds.append(_Gold(value, number, None, False))
            continue
        core = value.strip().strip(".,;:!?\"'`").strip()
        if not core:
            continue
        short_alpha = len(core) <= _SHORT_ALPHA and core.isalpha()
        flags = 0 if len(core) == 1 else re.IGNORECASE
        golds.append(_Gold(core, None, re.compile(rf"(?<!\w){re.escape(core)}(?!\w)", flags), short_alpha))
        # A short answer such as "42 apples" also leaks through its number.
        if len(core.split()) <= 5:
            for m in _NUMBER_RE.finditer(core):
                num = _parse_number(m.group("num"))
                if num is not None:
                    golds.append(_Gold(m.group("num"), num, None, False))
    return golds


def _number_spans(text: str) -> list[tuple[int, int, Decimal]]:
    spans = []
    for m in _NUMBER_RE.finditer(text):
        try:
            value = abs(Decimal(m.group("num").replace(",", "")))
        except InvalidOperation:
            continue
        spans.append((m.start(), m.end(), value))
    return spans


def _has_cue(text: str, start: int) -> bool:
    return bool(_CUE_BEFORE.search(text[max(0, start - _CUE_WINDOW):start]))


def _leak_spans(text: str, gold_values: Iterable[Any], context: str | None) -> list[tuple[int, int]]:
    if not text:
        return []
    golds = _compile_golds(gold_values)
    if not golds:
        return []
    context = context or ""
    spans: list[tuple[int, int]] = []
    numeric = [g for g in golds if g.number is not None]
    if numeric:
        context_numbers = {v for _, _, v in _number_spans(context)}
        for start, end, value in _number_spans(text):
            for g in numeric:
                if value == g.number:
                    in_context = value in context_numbers
                    if not in_context or _has_cue(text, start):
                        spans.append((start, end))
                    break
    for g in golds:
        if g.pattern is None:
            continue
        in_context = bool(g.pattern.search(context))
        for m in g.pattern.finditer(text):
            if (g.cue_only or in_context) and not _has_cue(text, m.start()):
                continue
            spans.append((m.start(), m.end()))
    # Merge overlapping spans.
    spans.sort()
    merged: list[tuple[int, int]] = []
    for s, e in spans:
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(e, merged[-1][1]))
        else:
            merged.append((s, e))
    return merged


def leaks_answer(text: str, gold_values: Iterable[Any], *, context: str | None = None) -> bool:
    """Whether ``text`` states one of the gold values.

    Args:
        text: The text to check (a textual reward, an instruction, the optimal reward t*).
        gold_values: Gold values (strings or numbers), e.g. from :func:`gold_values_of`.
        context: Text whose own mentions of a gold value are legitimate (the query). Gold values occurring
            in it only count in ``text`` when stated as an answer ("the answer is 3").

    Example:
        >>> leaks_answer("The capital you want is paris.", ["Paris"])
        True
    """
    return bool(_leak_spans(text, gold_values, context))


def redact_answer_leaks(
    text: str, gold_values: Iterable[Any], *, context: str | None = None, placeholder: str = REDACTED
) -> tuple[str, int]:
    """Replace every leaked gold value in ``text`` by ``placeholder``.

    Args:
        text: The text to clean.
        gold_values: Gold values (see :func:`leaks_answer`).
        context: See :func:`leaks_answer`.
        placeholder: The replacement text.

    Returns:
        ``(clean_text, number_of_redactions)``.

    Example:
        >>> redact_answer_leaks("It should be 42.0, not 41.", [42])
        ('It should be [redacted], not 41.', 1)
    """
    spans = _leak_spans(text, gold_values, context)
    for s, e in reversed(spans):
        text = text[:s] + placeholder + text[e:]
    return text, len(spans)


def instruction_leaks_answer(instruction: str, gold_values: Iterable[Any], *, query: str | None = None) -> bool:
    """Whether a prompt-model instruction gives away the final answer of its query.

    Numbers and names that appear in the query itself are allowed unless stated as the answer.

    Example:
        >>> instruction_leaks_answer("Multiply 6 by 7 carefully.", ["42"], query="What is 6 times 7?")
        False
        >>> instruction_leaks_answer("Multiply 6 by 7 to get 42.", ["42"], query="What is 6 times 7?")
        True
    """
    return leaks_answer(instruction, gold_values, context=query)
