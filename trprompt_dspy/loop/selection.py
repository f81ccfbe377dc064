"""No-regression selection: the student as given is candidate 0.

``compile`` returns the best iteration only if it beats the student on the valset; otherwise a copy of
the student. This module decides which, from scores alone, so the rule is testable without a compile.

Beating the student by a few examples is weak evidence: on 50 validation examples one example is 2 points,
and greedy serving is not even reproducible to a few examples (bf16 batching). ``significance_level`` asks
more: the iteration must also win an exact one-sided sign test against the student over the examples where
the two differ (:func:`~trprompt_dspy.runtime.paired.sign_test_greater`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from trprompt_dspy.results import STUDENT
from trprompt_dspy.runtime.paired import paired_counts, sign_test_greater

logger = logging.getLogger(__name__)

__all__ = ["discordance", "select_candidate", "selection_p_value"]


def discordance(student_scores: Sequence[float], iteration_scores: Sequence[float]) -> str:
    """``" (F examples better, B worse)"``: an iteration against the student on the valset, example by example.

    A lead of two examples out of 50 is within noise: in the GSM-Hard study an iteration selected at 14/50
    vs 12/50 (5 better, 3 worse) scored 8 points below zero-shot on 100 dev questions. Empty when the two
    score lists do not line up.

    Example:
        >>> discordance([1, 0, 0, 1], [1, 1, 1, 0])
        ' (2 examples better, 1 worse)'
    """
    if not student_scores or len(student_scores) != len(iteration_scores):
        return ""
    better, worse = paired_counts(student_scores, iteration_scores)
    return f" ({better} examples better, {worse} worse)"


def selection_p_value(student_scores: Sequence[float], iteration_scores: Sequence[float]) -> float | None:
    """One-sided exact sign-test p-value that the iteration beats the student on the valset, example by example.

    ``None`` when the two score lists do not line up (a run directory written before per-example scores
    were kept), so no test can be made.

    Example:
        >>> selection_p_value([0] * 5 + [1] * 45, [1] * 5 + [0] * 3 + [1] * 42)   # 5 better, 3 worse
        0.36328125
        >>> selection_p_value([], []) is None
        True
    """
    if not student_scores or len(student_scores) != len(iteration_scores):
        return None
    return sign_test_greater(*paired_counts(student_scores, iteration_scores))


def select_candidate(*, best_iteration: int | None, best_score: float | None, student_score: float | None,
                     min_improvement: float | None, val_size: int, log_dir: Path,
                     student_scores: Sequence[float] = (), iteration_scores: Sequence[float] = (),
                     significance_level: float | None = None) -> int | str:
    """The candidate ``compile`` returns: the best iteration only if it beats the student on the valset.

    The student as given is candidate 0, scored on the same valset as every iteration (``student_score``).
    An iteration is returned only if its score exceeds the student's by more than ``min_improvement``
    (strictly: a tie keeps the student); otherwise :data:`~trprompt_dspy.results.STUDENT`, so the result is
    never below the student on the valset. ``min_improvement=None`` turns the guard off (the best iteration
    is returned whatever it scored: for studies of the trained program itself).

    With ``significance_level`` (e.g. ``0.05``) an iteration that clears the margin is returned only if its
    :func:`selection_p_value` is below that level too; otherwise, or when the per-example scores do not line
    up, the student. On 50 examples a lead of 5 better / 3 worse (p = 0.36) keeps the student; 6 / 0
    (p = 0.016) returns the iteration.

    Example:
        >>> select_candidate(best_iteration=0, best_score=0.5, student_score=0.5, min_improvement=0.0,
        ...                  val_size=2, log_dir=Path("."))
        'student'
    """
    if best_iteration is None:
        logger.warning("No TRPrompt iteration completed (budget exhausted); returning a copy of the student.")
        return STUDENT
    if min_improvement is None or student_score is None or best_score > student_score + min_improvement:
        if min_improvement is not None and significance_level is not None and student_score is not None:
            p = selection_p_value(student_scores, iteration_scores)
            if p is None or p >= significance_level:
                logger.warning(
                    "Iteration %d beat the student on the valset (%.3f vs %.3f%s), but not significantly "
                    "(one-sided sign test p = %s, significance_level=%g): returning a copy of the student. "
                    "The trained adapters stay in %s.", best_iteration, best_score, student_score,
                    discordance(student_scores, iteration_scores),
                    "n/a, no per-example scores" if p is None else f"{p:.3g}", significance_level, log_dir)
                return STUDENT
        if min_improvement is None and student_score is not None and best_score <= student_score:
            logger.warning("min_improvement=None: returning iteration %d (%.3f on the valset) although the "
                           "student scored %.3f.", best_iteration, best_score, student_score)
        else:
            p = selection_p_value(student_scores, iteration_scores)
            logger.info("Selected iteration %d: %.3f on %d validation examples vs the student's %.3f%s%s.",
                        best_iteration, best_score, val_size, student_score or 0.0,
                        discordance(student_scores, iteration_scores),
                        "" if p is None else f"; one-sided sign test p = {p:.3g}")
        return int(best_iteration)
    logger.warning(
        "No iteration beat the student on the valset (best: iteration %d with %.3f vs the student's %.3f on %d "
        "examples; min_improvement=%g): returning a copy of the student. The trained adapters stay in %s.",
        best_iteration, best_score, student_score, val_size, min_improvement, log_dir)
    return STUDENT
