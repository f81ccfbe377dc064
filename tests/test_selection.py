"""No-regression selection from scores alone (loop/selection.py) and the paired tests under it (runtime/paired.py)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest

from trprompt_dspy.apps import stats
from trprompt_dspy.loop.selection import select_candidate, selection_p_value
from trprompt_dspy.runtime import paired
from trprompt_dspy.runtime.paired import mcnemar_exact, paired_counts, sign_test_greater


def _scores(better: int, worse: int, same_right: int = 10, same_wrong: int = 32) -> tuple[list[int], list[int]]:
    """Student and iteration scores on a valset where the iteration wins ``better`` and loses ``worse`` examples."""
    student = [0] * better + [1] * worse + [1] * same_right + [0] * same_wrong
    iteration = [1] * better + [0] * worse + [1] * same_right + [0] * same_wrong
    return student, iteration


def _select(student, iteration, **kw):
    return select_candidate(best_iteration=0, best_score=sum(iteration) / len(iteration),
                            student_score=sum(student) / len(student), min_improvement=kw.pop("min_improvement", 0.0),
                            val_size=len(student), log_dir=Path("runs/x"), student_scores=student,
                            iteration_scores=iteration, **kw)


@pytest.mark.parametrize("better,worse,expected", [(5, 3, 0.36328125), (6, 0, 1 / 64), (0, 4, 1.0), (3, 0, 0.125)])
def test_sign_test_matches_the_binomial_tail(better, worse, expected):
    n = better + worse
    assert sign_test_greater(better, worse) == pytest.approx(expected)
    assert sign_test_greater(better, worse) == pytest.approx(
        sum(math.comb(n, i) for i in range(better, n + 1)) / 2**n)


def test_the_one_sided_test_is_half_the_two_sided_one_when_the_candidate_leads():
    for b, c in [(6, 0), (9, 3), (14, 8)]:
        assert sign_test_greater(b, c) == pytest.approx(mcnemar_exact(b, c)["p_value"] / 2)


def test_there_is_one_definition_of_the_mcnemar_test():
    assert stats.mcnemar_exact is paired.mcnemar_exact


@pytest.mark.parametrize("call", [lambda: sign_test_greater(-1, 2), lambda: sign_test_greater(1.5, 2),
                                  lambda: sign_test_greater(True, 2)])
def test_counts_must_be_non_negative_ints(call):
    with pytest.raises(ValueError, match="non-negative int count"):
        call()


def test_paired_counts_work_for_any_metric_and_need_aligned_lists():
    assert paired_counts([0.5, 0.2, 1.0], [0.7, 0.2, 0.0]) == (1, 1)
    with pytest.raises(ValueError, match="same examples in the same order; got 2 and 3"):
        paired_counts([1, 0], [1, 0, 1])


def test_a_two_example_lead_on_50_is_returned_without_a_level_and_refused_at_5_percent(caplog):
    student, iteration = _scores(better=5, worse=3)  # the q48 cell of the GSM-Hard study: 14/50 vs 12/50
    assert len(student) == 50 and selection_p_value(student, iteration) == pytest.approx(0.36328125)
    assert _select(student, iteration) == 0
    with caplog.at_level(logging.WARNING, logger="trprompt_dspy.loop.selection"):
        assert _select(student, iteration, significance_level=0.05) == "student"
    assert "not significantly" in caplog.text and "p = 0.363" in caplog.text and "5 examples better, 3 worse" in caplog.text


def test_a_clear_win_passes_the_test():
    student, iteration = _scores(better=8, worse=1)
    assert selection_p_value(student, iteration) == pytest.approx(10 / 512)
    assert _select(student, iteration, significance_level=0.05) == 0


def test_the_margin_still_applies_before_the_test():
    student, iteration = _scores(better=8, worse=1)  # +7 examples of 51: 0.137 above the student
    assert _select(student, iteration, significance_level=0.05, min_improvement=0.2) == "student"


def test_without_per_example_scores_a_level_keeps_the_student(caplog):
    with caplog.at_level(logging.WARNING, logger="trprompt_dspy.loop.selection"):
        got = select_candidate(best_iteration=1, best_score=0.9, student_score=0.1, min_improvement=0.0, val_size=50,
                               log_dir=Path("runs/x"), significance_level=0.05)
    assert got == "student" and "no per-example scores" in caplog.text
    assert selection_p_value([], []) is None and selection_p_value([1, 0], [1]) is None
