"""One calling convention for the user's metric, whatever contract it follows.

DSPy metrics come in two shapes, and TRPrompt accepts both:

* the classic ``metric(example, pred, trace=None) -> float | bool`` (``dspy.Evaluate``, ``BootstrapFewShot``);
* the GEPA feedback metric ``metric(gold, pred, trace, pred_name, pred_trace) -> dspy.Prediction(score=...,
  feedback=...)``, whose feedback text is a free source of signal for the textual reward model.

:class:`MetricAdapter` calls either kind and returns a :class:`MetricResult` with a float score and the
feedback text (if any). A metric that *raises* on one example yields ``MetricResult(error=...)`` with the
failure score, so one odd example never aborts a batch; a metric that *returns* something that is not a
score (``None``, ``NaN``, a string, a plain ``dict`` without ``"score"``) raises :class:`MetricValueError`
(a ``ValueError`` naming the metric and the bad value) because that is almost always a bug in the metric.
The caller decides whether to abort (``run_rollouts`` aborts only when *every* call failed).

Example:
    >>> import dspy
    >>> def exact(gold, pred, trace=None):
    ...     return gold.answer == pred.answer
    >>> adapter = MetricAdapter(exact)
    >>> gold = dspy.Example(question="2+2?", answer="4").with_inputs("question")
    >>> adapter(gold, dspy.Prediction(answer="4"))
    MetricResult(score=1.0, feedback=None, error=None)
    >>> def gepa(gold, pred, trace, pred_name, pred_trace):
    ...     return dspy.Prediction(score=0.0, feedback="Expected 4.")
    >>> MetricAdapter(gepa)(gold, dspy.Prediction(answer="5")).feedback
    'Expected 4.'
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from trprompt_dspy.errors import TRPromptError

logger = logging.getLogger(__name__)

__all__ = ["MetricResult", "MetricValueError", "MetricAdapter", "check_metric_arity", "metric_name"]


@dataclass(frozen=True)
class MetricResult:
    """The normalised outcome of one metric call.

    Attributes:
        score: The score as a float (``True`` -> 1.0). The failure score when ``error`` is set.
        feedback: The metric's feedback text (GEPA-style metrics), else ``None``.
        error: Why no real score exists (the metric raised), else ``None``.
    """

    score: float
    feedback: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class MetricValueError(TRPromptError, ValueError):
    """The metric returned a value that is not a usable score (None, NaN, text, ...)."""


def metric_name(metric: Any) -> str:
    """A readable name for a metric callable (function name, class name or repr)."""
    name = getattr(metric, "__qualname__", None) or getattr(metric, "__name__", None)
    if name is None:
        name = type(metric).__name__
    return str(name)


def _binds(sig: inspect.Signature, n: int) -> bool:
    try:
        sig.bind(*([None] * n))
    except TypeError:
        return False
    return True


def check_metric_arity(metric: Any) -> int:
    """Check that ``metric`` can be called as ``metric(example, pred)`` or ``metric(example, pred, trace)``.

    GEPA-style metrics whose five parameters ``(gold, pred, trace, pred_name, pred_trace)`` have no
    defaults are accepted too; they are called with ``pred_name=None, pred_trace=None`` (the module-level
    score, as GEPA itself does).

    Args:
        metric: The user's metric.

    Returns:
        The number of positional arguments the metric will be called with: 2, 3 or 5.

    Raises:
        TypeError: ``metric`` is not callable, or its signature accepts neither 2, 3 nor 5 positional
            arguments.

    Example:
        >>> check_metric_arity(lambda gold, pred, trace=None: 1.0)
        3
        >>> check_metric_arity(lambda gold, pred: 1.0)
        2
    """
    if not callable(metric):
        raise TypeError(
            f"metric must be a callable metric(example, pred, trace=None); got {metric!r} "
            f"of type {type(metric).__name__}."
        )
    try:
        sig = inspect.signature(metric)
    except (TypeError, ValueError):
        # Builtins / C callables without a signature: use the universal dspy.Evaluate call.
        return 2
    for n in (3, 2, 5):
        if _binds(sig, n):
            return n
    raise TypeError(
        f"metric {metric_name(metric)!r} has signature {sig}, which cannot be called as "
        "metric(example, pred) or metric(example, pred, trace). Define it as "
        "`def metric(example, pred, trace=None): ...` (or the GEPA form "
        "`def metric(gold, pred, trace=None, pred_name=None, pred_trace=None): ...`)."
    )


class MetricAdapter:
    """Call a DSPy metric of either contract and normalise its result.

    Args:
        metric: ``metric(example, pred, trace=None) -> float | bool`` or a GEPA feedback metric returning
            ``dspy.Prediction(score=..., feedback=...)``. Mappings with a ``"score"`` key are accepted too.
        failure_score: The score recorded when the metric raises.
        raise_errors: Re-raise exceptions from the metric instead of recording them.

    Raises:
        TypeError: The metric has the wrong arity (see :func:`check_metric_arity`).

    Example:
        >>> MetricAdapter(lambda g, p, trace=None: 0.5)(None, None).score
        0.5
    """

    def __init__(self, metric: Callable[..., Any], *, failure_score: float = 0.0, raise_errors: bool = False):
        if isinstance(metric, MetricAdapter):
            metric = metric.metric
        self._nargs = check_metric_arity(metric)
        self.metric = metric
        self.name = metric_name(metric)
        if not isinstance(failure_score, numbers.Real) or not math.isfinite(float(failure_score)):
            raise ValueError(f"failure_score must be a finite number; got {failure_score!r}.")
        self.failure_score = float(failure_score)
        self.raise_errors = raise_errors

    def __repr__(self) -> str:
        return f"MetricAdapter({self.name}, nargs={self._nargs})"

    def __call__(self, example: Any, pred: Any, trace: Any = None, *, strict: bool = False) -> MetricResult:
        """Score one prediction.

        Args:
            example: The gold ``dspy.Example``.
            pred: The program's prediction.
            trace: Passed on to 3- and 5-argument metrics. TRPrompt passes ``None`` (like ``dspy.Evaluate``)
                so metrics that switch to a strict boolean when tracing still return their real score.
            strict: Re-raise an exception from the metric (as ``raise_errors=True`` does), e.g. for a
                smoke test before a run.

        Returns:
            A :class:`MetricResult`.

        Raises:
            MetricValueError: The metric returned something that is not a finite score.
        """
        try:
            if self._nargs == 2:
                raw = self.metric(example, pred)
            elif self._nargs == 3:
                raw = self.metric(example, pred, trace)
            else:
                raw = self.metric(example, pred, trace, None, None)
        except Exception as exc:  # the metric's own failure on this example
            if self.raise_errors or strict:
                raise
            logger.debug("metric %s raised on one example: %r", self.name, exc)
            return MetricResult(self.failure_score, None, f"metric {self.name!r} raised {type(exc).__name__}: {exc}")
        score, feedback = self._normalise(raw)
        return MetricResult(score, feedback, None)

    def _normalise(self, raw: Any) -> tuple[float, str | None]:
        feedback: Any = None
        value: Any = raw
        if isinstance(raw, Mapping) or (hasattr(raw, "keys") and hasattr(raw, "__getitem__") and not isinstance(raw, str)):
            keys = set(raw.keys())
            if "score" not in keys:
                raise MetricValueError(
                    f"metric {self.name!r} returned {raw!r}, which has no 'score' key. Return a number, a bool, "
                    "or dspy.Prediction(score=<float>, feedback=<str>)."
                )
            value = raw["score"]
            feedback = raw["feedback"] if "feedback" in keys else None
        elif hasattr(raw, "score") and not isinstance(raw, numbers.Number):
            value = raw.score
            feedback = getattr(raw, "feedback", None)
        score = self._to_float(value, raw)
        if feedback is not None and not isinstance(feedback, str):
            feedback = str(feedback)
        if feedback is not None and not feedback.strip():
            feedback = None
        return score, feedback

    def _to_float(self, value: Any, raw: Any) -> float:
        if value is None:
            raise MetricValueError(
                f"metric {self.name!r} returned a score of None (full value: {raw!r}). A metric must return a "
                "number or bool for every example; return 0.0 for a wrong or unparsable prediction."
            )
        if not isinstance(value, str | numbers.Real) and callable(getattr(value, "item", None)):
            with contextlib.suppress(Exception):  # numpy / torch scalars and 0-d arrays
                value = value.item()
        if isinstance(value, bool):
            return 1.0 if value else 0.0
        if isinstance(value, str) or not isinstance(value, numbers.Real):
            raise MetricValueError(
                f"metric {self.name!r} returned {value!r} of type {type(value).__name__}, which is not a "
                "numeric score. Return a float/int/bool or dspy.Prediction(score=<float>, feedback=<str>)."
            )
        score = float(value)
        if not math.isfinite(score):
            raise MetricValueError(
                f"metric {self.name!r} returned a non-finite score {score!r} (full value: {raw!r}). Guard "
                "divisions by zero and empty predictions in the metric and return 0.0 instead."
            )
        return score
