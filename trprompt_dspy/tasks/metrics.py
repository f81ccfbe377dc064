"""Answer extraction and scoring for GSM8K, GSM-Hard and MATH.

Every metric takes ``(gold, pred, trace=None, pred_name=None, pred_trace=None)`` so it works with
``dspy.Evaluate``, ``BootstrapFewShot`` and GEPA (which binds five positional arguments). ``gold`` is a
``dspy.Example`` with an ``answer`` field; ``pred`` may be a ``dspy.Prediction``, anything with an
``.answer`` attribute, a mapping with an ``"answer"`` key, or a plain string. A prediction without an
answer scores 0 instead of raising.

* Plain metrics (``gsm8k_metric``, ``gsmhard_metric``, ``gsmhard_lenient_metric``, ``math_metric``)
  return a ``bool``.
* Feedback metrics (``*_feedback_metric``) return ``dspy.Prediction(score=float, feedback=str)``, the
  GEPA contract. ``dspy.Prediction`` supports ``+`` and ``float()``, so ``dspy.Evaluate`` averages them.

MATH equivalence itself (normalisation, the sympy check) lives in :mod:`trprompt_dspy.tasks.math_equivalence`;
its public functions are re-exported here.

Example:
    >>> import dspy
    >>> gold = dspy.Example(question="2-7?", answer="-5").with_inputs("question")
    >>> gsm8k_metric(gold, dspy.Prediction(answer="The answer is -5."))
    True
    >>> gsm8k_feedback_metric(gold, dspy.Prediction(answer="5")).feedback
    'Expected -5, got 5.'
    >>> math_metric(dspy.Example(answer="\\\\frac{1}{2}"), "\\\\boxed{0.5}")
    True
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import dspy

from trprompt_dspy.tasks.math_equivalence import (
    MATH_EQUIV_TIMEOUT_S,
    extract_boxed,
    math_answer_of,
    math_answers_equal,
    normalize_math_answer,
)

logger = logging.getLogger(__name__)

__all__ = [
    "MATH_EQUIV_TIMEOUT_S",
    "extract_boxed",
    "extract_number",
    "normalize_math_answer",
    "math_answers_equal",
    "gsm8k_metric",
    "gsmhard_metric",
    "gsmhard_lenient_metric",
    "math_metric",
    "gsm8k_feedback_metric",
    "gsmhard_feedback_metric",
    "math_feedback_metric",
    "METRICS",
    "FEEDBACK_METRICS",
    "get_metric",
]

GSM8K_TOLERANCE = 1e-6
GSMHARD_TOLERANCE = 1e-3

_FEEDBACK_SNIPPET_CHARS = 200

# ---------------------------------------------------------------------------------------------------
# Number extraction (GSM8K / GSM-Hard)
# ---------------------------------------------------------------------------------------------------

# A number token. A sign counts only when glued to the digits ("-5", "-$5", "$-5"), so "5 - 3" and
# "3-5" never produce -3 / -5. "\u2212" is the Unicode minus sign. "1,234" is one number; "3/4" is a fraction.
_NUMBER_RE = re.compile(
    r"(?<![\w.])"
    r"(?P<sign>[-\u2212])?(?:\\?\$)?(?P<sign2>[-\u2212])?"
    r"(?P<body>\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?P<exp>[eE][-+]?\d+(?![\w.]))?"
    r"(?:\s*/\s*(?P<den>\d+)(?![\d.]))?"
)
_ANSWER_MARKER_RE = re.compile(r"\banswer\b\s*(?:is\b|:|=)\s*[:=]?", re.IGNORECASE)
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*([-\u2212]?[\d.,]+)\s*\}\s*\{\s*([\d.,]+)\s*\}")
_LATEX_FRAC_SHORT_RE = re.compile(r"\\[dt]?frac(\d)(\d)")


def _delatex_numbers(text: str) -> str:
    """Rewrite the LaTeX that wraps plain numbers so the number regex can read them."""
    text = text.replace("{,}", ",").replace("\\!", "").replace("\\%", "%")
    text = re.sub(r"(?<=\d)\\,(?=\d{3})", "", text)  # thin-space thousands separator
    text = _LATEX_FRAC_SHORT_RE.sub(r"\1/\2", text)
    return _LATEX_FRAC_RE.sub(r"\1/\2", text)


def _number_values(text: str) -> list[float]:
    values: list[float] = []
    for m in _NUMBER_RE.finditer(text):
        value = float(m.group("body").replace(",", "") + (m.group("exp") or ""))
        if m.group("den") is not None:
            den = float(m.group("den"))
            if den == 0:
                continue
            value /= den
        if m.group("sign") or m.group("sign2"):
            value = -value
        if math.isfinite(value):
            values.append(value)
    return values


def extract_number(text: Any) -> float | None:
    r"""Extract the final numeric answer from free text.

    Looks, in order, at the last ``\boxed{...}``, the text after the last ``####``, the text after the
    last "answer is" / "Answer:" / "answer =", and finally the whole text. Inside a boxed or marked
    segment the first number wins; otherwise the last number in the text wins. Handles thousands commas
    ("1,234"), currency ("$1,200.50", "\$5"), trailing units ("42 dollars"), negatives ("-5"; DSPy's own
    GSM8K parser drops the sign), decimals, scientific notation and fractions ("3/4", ``\frac{3}{4}``).

    Args:
        text: Model output; non-strings (ints, floats) are converted with ``str``.

    Returns:
        The number as a float, or ``None`` when the text holds no number.

    Example:
        >>> extract_number("She pays $1,200.50 in total.")
        1200.5
        >>> extract_number("so x = -5.\n#### -5")
        -5.0
        >>> extract_number(r"\boxed{\frac{3}{4}}")
        0.75
    """
    if text is None or isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return float(text) if math.isfinite(text) else None
    text = _delatex_numbers(str(text))
    segments: list[str] = []
    boxed = extract_boxed(text)
    if boxed is not None:
        segments.append(boxed)
    if "####" in text:
        segments.append(text.rsplit("####", 1)[1])
    markers = list(_ANSWER_MARKER_RE.finditer(text))
    if markers:
        segments.append(text[markers[-1].end() :])
    for segment in segments:
        values = _number_values(segment)
        if values:
            return values[0]
    values = _number_values(text)
    return values[-1] if values else None


# ---------------------------------------------------------------------------------------------------
# Shared helpers for the metric wrappers
# ---------------------------------------------------------------------------------------------------


def _answer_text(obj: Any, field: str = "answer") -> str | None:
    """Read the answer field of a Prediction/Example/mapping, or take a plain string/number as is."""
    if obj is None:
        return None
    if isinstance(obj, str):
        return obj
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return str(obj)
    if isinstance(obj, Mapping):
        value = obj.get(field)
    else:
        try:
            value = getattr(obj, field)
        except (AttributeError, KeyError):
            value = None
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def _snippet(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _FEEDBACK_SNIPPET_CHARS else text[: _FEEDBACK_SNIPPET_CHARS - 3] + "..."


def _fmt_number(value: float) -> str:
    if value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value)


def _gold_text(gold: Any) -> str:
    text = _answer_text(gold)
    if text is None:
        raise ValueError(
            f"The gold example has no 'answer' field (got {type(gold).__name__}: {gold!r:.200}). Build "
            "examples with trprompt_dspy.tasks.datasets.load_dataset(...) or dspy.Example(question=..., answer=...)."
        )
    return text


def _missing_answer_feedback(pred: Any) -> str:
    return (
        f"The prediction has no 'answer' field (got {type(pred).__name__}); the program must output "
        "an 'answer' field holding the final answer."
    )


def _judge_numeric(gold: Any, pred: Any, equal: Callable[[float, float], bool]) -> tuple[float, str]:
    gold_raw = _gold_text(gold)
    gold_value = extract_number(gold_raw)
    if gold_value is None:
        raise ValueError(
            f"The gold answer {gold_raw!r:.200} contains no number; check the dataset field 'answer'."
        )
    pred_raw = _answer_text(pred)
    if pred_raw is None:
        return 0.0, _missing_answer_feedback(pred)
    pred_value = extract_number(pred_raw)
    if pred_value is None:
        return 0.0, f"No final number found in the answer field: '{_snippet(pred_raw)}'."
    if equal(pred_value, gold_value):
        return 1.0, f"Correct: {_fmt_number(gold_value)}."
    return 0.0, f"Expected {_fmt_number(gold_value)}, got {_fmt_number(pred_value)}."


def _gsm8k_equal(pred: float, gold: float) -> bool:
    return abs(pred - gold) <= GSM8K_TOLERANCE


def _gsmhard_equal(pred: float, gold: float) -> bool:
    # The relative term only matters beyond ~1e12, where doubles cannot resolve 1e-3 anyway.
    return abs(pred - gold) < GSMHARD_TOLERANCE or math.isclose(pred, gold, rel_tol=1e-12)


def _gsmhard_lenient_equal(pred: float, gold: float) -> bool:
    return _gsmhard_equal(pred, gold) or round(pred, 2) == round(gold, 2)


# ---------------------------------------------------------------------------------------------------
# Numeric metrics
# ---------------------------------------------------------------------------------------------------


def gsm8k_metric(
    example: Any, pred: Any, trace: Any = None, pred_name: Any = None, pred_trace: Any = None
) -> bool:
    """GSM8K exact match: the number in ``pred.answer`` equals the gold number (tolerance 1e-6).

    The gold may be a bare number string ("-5", "1,600") or the original GSM8K "... #### N" text.

    Example:
        >>> gsm8k_metric(dspy.Example(answer="1600"), dspy.Prediction(answer="$1,600"))
        True
    """
    return _judge_numeric(example, pred, _gsm8k_equal)[0] == 1.0


def gsmhard_metric(
    example: Any, pred: Any, trace: Any = None, pred_name: Any = None, pred_trace: Any = None
) -> bool:
    """GSM-Hard match: ``abs(pred - target) < 1e-3`` (targets are floats such as ``14053029.666666666``).

    Example:
        >>> gsmhard_metric(dspy.Example(answer="-9825743600.0"), "-9,825,743,600")
        True
    """
    return _judge_numeric(example, pred, _gsmhard_equal)[0] == 1.0


def gsmhard_lenient_metric(
    example: Any, pred: Any, trace: Any = None, pred_name: Any = None, pred_trace: Any = None
) -> bool:
    """GSM-Hard match that also accepts answers equal after rounding both to 2 decimals.

    Example:
        >>> gsmhard_lenient_metric(dspy.Example(answer="14053029.666666666"), "14053029.67")
        True
    """
    return _judge_numeric(example, pred, _gsmhard_lenient_equal)[0] == 1.0


def gsm8k_feedback_metric(
    gold: Any, pred: Any, trace: Any = None, pred_name: Any = None, pred_trace: Any = None
) -> dspy.Prediction:
    """GEPA-style GSM8K metric: ``dspy.Prediction(score=1.0|0.0, feedback=...)``.

    Feedback is "Correct: 42.", "Expected 42, got 40." or "No final number found in the answer field: '...'".
    """
    score, feedback = _judge_numeric(gold, pred, _gsm8k_equal)
    return dspy.Prediction(score=score, feedback=feedback)


def gsmhard_feedback_metric(
    gold: Any, pred: Any, trace: Any = None, pred_name: Any = None, pred_trace: Any = None
) -> dspy.Prediction:
    """GEPA-style GSM-Hard metric (strict 1e-3 tolerance) returning ``dspy.Prediction(score, feedback)``."""
    score, feedback = _judge_numeric(gold, pred, _gsmhard_equal)
    return dspy.Prediction(score=score, feedback=feedback)


def _judge_math(gold: Any, pred: Any) -> tuple[float, str]:
    gold_answer = math_answer_of(_gold_text(gold)).strip()
    pred_raw = _answer_text(pred)
    if pred_raw is None:
        return 0.0, _missing_answer_feedback(pred)
    pred_answer = math_answer_of(pred_raw).strip()
    if not normalize_math_answer(pred_answer):
        return 0.0, f"No final answer found in the answer field: '{_snippet(pred_raw)}'."
    if math_answers_equal(pred_answer, gold_answer):
        return 1.0, f"Correct: {gold_answer}."
    return 0.0, f"Expected {gold_answer}, got {_snippet(pred_answer)}."


def math_metric(
    example: Any, pred: Any, trace: Any = None, pred_name: Any = None, pred_trace: Any = None
) -> bool:
    r"""MATH answer equivalence (see :func:`math_answers_equal`) between ``pred.answer`` and ``example.answer``.

    Example:
        >>> math_metric(dspy.Example(answer=r"\frac{\sqrt{3}}{2}"), r"$\boxed{\dfrac{\sqrt3}{2}}$")
        True
    """
    return _judge_math(example, pred)[0] == 1.0


def math_feedback_metric(
    gold: Any, pred: Any, trace: Any = None, pred_name: Any = None, pred_trace: Any = None
) -> dspy.Prediction:
    """GEPA-style MATH metric: ``dspy.Prediction(score=1.0|0.0, feedback="Expected ..., got ...")``."""
    score, feedback = _judge_math(gold, pred)
    return dspy.Prediction(score=score, feedback=feedback)


# ---------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------

METRICS: dict[str, Callable[..., bool]] = {
    "gsm8k": gsm8k_metric,
    "gsmhard": gsmhard_metric,
    "math": math_metric,
}
FEEDBACK_METRICS: dict[str, Callable[..., dspy.Prediction]] = {
    "gsm8k": gsm8k_feedback_metric,
    "gsmhard": gsmhard_feedback_metric,
    "math": math_feedback_metric,
}
_ALIASES = {"math500": "math", "gsm-hard": "gsmhard", "gsm_hard": "gsmhard"}


def get_metric(name: str, feedback: bool = False) -> Callable[..., Any]:
    """Look up a metric by dataset name.

    Args:
        name: ``"gsm8k"``, ``"gsmhard"`` or ``"math"`` (``"math500"`` is an alias of ``"math"``).
        feedback: Return the GEPA-style variant producing ``dspy.Prediction(score, feedback)``.

    Returns:
        The metric function.

    Raises:
        ValueError: Unknown name; the message lists the valid ones.

    Example:
        >>> get_metric("gsm8k", feedback=True).__name__
        'gsm8k_feedback_metric'
    """
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    table = FEEDBACK_METRICS if feedback else METRICS
    if key not in table:
        raise ValueError(
            f"Unknown metric name {name!r}; valid names are: {', '.join(table)} "
            f"(aliases: {', '.join(sorted(_ALIASES))})."
        )
    return table[key]
