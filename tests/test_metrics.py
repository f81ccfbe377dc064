"""Tests for trprompt_dspy.tasks.metrics: answer extraction, GSM8K/GSM-Hard/MATH metrics, feedback, registry."""

from __future__ import annotations

import inspect
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import dspy
import pytest

from trprompt_dspy.tasks.metrics import (
    FEEDBACK_METRICS,
    METRICS,
    extract_boxed,
    extract_number,
    get_metric,
    gsm8k_feedback_metric,
    gsm8k_metric,
    gsmhard_feedback_metric,
    gsmhard_lenient_metric,
    gsmhard_metric,
    math_answers_equal,
    math_feedback_metric,
    math_metric,
    normalize_math_answer,
)


def ex(answer: str) -> dspy.Example:
    return dspy.Example(question="q", answer=answer).with_inputs("question")


# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,234", 1234.0),
        ("She pays $1,200.50 in total.", 1200.5),
        ("42 dollars", 42.0),
        ("12 apples", 12.0),
        ("-5", -5.0),
        ("The temperature drops to -5 degrees.", -5.0),
        ("\u22127", -7.0),  # Unicode minus sign
        ("-$5", -5.0),
        ("$-5", -5.0),
        ("The answer is -12.", -12.0),
        ("3.75", 3.75),
        (r"\boxed{-3}", -3.0),
        (r"first \boxed{2}, corrected: \boxed{7}", 7.0),
        (r"\boxed{\frac{3}{4}}", 0.75),
        (r"\boxed{1,000}", 1000.0),
        ("Answer: 18\nCheck: 18 + 2 = 20", 18.0),
        ("final answer is 4, because 2+2", 4.0),
        ("Natalia sold 48/2 = 24 clips.\n#### 72", 72.0),
        ("#### -12", -12.0),
        ("3/4", 0.75),
        ("-3/4", -0.75),
        ("5 - 3 = 2", 2.0),  # a spaced minus is subtraction, not a sign
        ("x = 3-5", 5.0),  # a hyphen glued to a digit is not a sign either
        ("14053029.666666666", 14053029.666666666),
        ("1.5e6", 1500000.0),
        ("It costs \\$1,000.", 1000.0),
        ("50%", 50.0),
        ("10{,}000", 10000.0),
        (7, 7.0),
        (2.5, 2.5),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", [None, "", "no digits here", True])
def test_extract_number_none(text):
    assert extract_number(text) is None


def test_extract_boxed_balanced_and_last():
    assert extract_boxed(r"\boxed{1} then \boxed{\frac{1}{\sqrt{2}}}.") == r"\frac{1}{\sqrt{2}}"
    assert extract_boxed(r"\boxed 5$") == "5"
    assert extract_boxed(r"\boxed{unclosed") is None
    assert extract_boxed("nothing") is None


# --------------------------------------------------------------------------- GSM8K / GSM-Hard


def test_gsm8k_metric_keeps_negative_sign():
    # dspy.datasets.gsm8k.parse_integer_answer drops the minus, so -5 == 5 there; not here.
    assert gsm8k_metric(ex("-5"), dspy.Prediction(answer="-5"))
    assert not gsm8k_metric(ex("-5"), dspy.Prediction(answer="5"))
    assert not gsm8k_metric(ex("5"), dspy.Prediction(answer="-5"))


def test_gsm8k_metric_formats():
    assert gsm8k_metric(ex("1600"), dspy.Prediction(answer="$1,600"))
    assert gsm8k_metric(ex("1,600"), "1600 dollars")
    assert gsm8k_metric(ex("Work: 48/2 = 24\n#### 72"), "The answer is 72.")
    assert gsm8k_metric(ex("10"), {"answer": "10.0"})
    assert not gsm8k_metric(ex("10"), "10.5")
    assert not gsm8k_metric(ex("72"), "no idea")


def test_gsm8k_metric_missing_answer_is_zero_not_error():
    assert gsm8k_metric(ex("3"), dspy.Prediction(reasoning="3")) is False
    assert gsm8k_metric(ex("3"), None) is False
    fb = gsm8k_feedback_metric(ex("3"), dspy.Prediction(reasoning="3"))
    assert fb.score == 0.0 and "no 'answer' field" in fb.feedback


def test_gold_without_answer_raises_clear_error():
    with pytest.raises(ValueError, match="no 'answer' field"):
        gsm8k_metric(dspy.Example(question="q"), "3")
    with pytest.raises(ValueError, match="contains no number"):
        gsm8k_metric(ex("n/a"), "3")


def test_gsmhard_float_targets():
    gold = ex("14053029.666666666")
    assert gsmhard_metric(gold, "14053029.6666667")
    assert not gsmhard_metric(gold, "14053029.67")  # off by 3.3e-3
    assert gsmhard_lenient_metric(gold, "14053029.67")
    assert not gsmhard_lenient_metric(gold, "14053029.6")
    assert gsmhard_metric(ex("-9825743600.0"), "-9,825,743,600")
    assert gsmhard_metric(ex("3244047.0999999996"), "3244047.1")
    assert gsmhard_metric(ex("9284017268534.4"), "9284017268534.4")
    assert not gsmhard_metric(ex("0.5"), "0.502")


def test_numeric_feedback_texts():
    assert gsm8k_feedback_metric(ex("42"), "42").feedback == "Correct: 42."
    wrong = gsm8k_feedback_metric(ex("42"), dspy.Prediction(answer="40"))
    assert (wrong.score, wrong.feedback) == (0.0, "Expected 42, got 40.")
    none = gsm8k_feedback_metric(ex("42"), "I am not sure " * 40)
    assert none.score == 0.0
    assert none.feedback.startswith("No final number found in the answer field: 'I am not sure")
    assert none.feedback.endswith("...'.") and len(none.feedback) < 260
    hard = gsmhard_feedback_metric(ex("0.75"), "3/4")
    assert (hard.score, hard.feedback) == (1.0, "Correct: 0.75.")


# --------------------------------------------------------------------------- MATH


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        (r"\dfrac{1}{2}", "0.5"),
        (r"\frac12", r"\frac{1}{2}"),
        ("0.5", r"\frac12"),
        ("1/2", r"\tfrac{1}{2}"),
        (r"\boxed{-3}", "-3"),
        (r"The answer is $\boxed{\dfrac{\sqrt3}{2}}$.", r"\frac{\sqrt{3}}{2}"),
        (r"\sqrt{12}", r"2\sqrt{3}"),
        (r"30^\circ", "30"),
        (r"30^{\circ}", "30"),
        ("(1, 2]", "(1,2]"),
        (r"\left[ -1, 3 \right)", "[-1,3)"),
        (r"(3,\pi/2)", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\{2,1\}", r"\{1,2\}"),
        ("3, 7, 5", "3, 5, 7"),
        (r"1+\sqrt{19}, 1-\sqrt{19}", r"1 \pm \sqrt{19}"),
        (r"(0,9) \cup (9,36)", r"(0,9)\cup(9,36)"),
        (r"(2,\infty)", r"(2, \infty)"),
        (
            r"\begin{pmatrix} \frac15 \\ -\frac{18}{5} \end{pmatrix}",
            r"\begin{pmatrix} 1/5 \\ -18/5 \end{pmatrix}",
        ),
        ("9i+6", "6+9i"),
        ("-80+15x", "15x - 80"),
        ("x^2+2x+1", "(x+1)^2"),
        (r"5\text{ cm}", "5"),
        (r"8\sqrt{3} \text { square inches}", r"8\sqrt3"),
        ("12 inches", "12"),
        (r"\$36", "36"),
        (r"10\%", "10"),
        ("1,000", "1000"),
        ("y = -2x", "-2x"),
        (r"\frac{9}{5}", r"1\frac{4}{5}"),
        ("137.5", r"137 \frac{1}{2}"),
        (".0000672", "0.0000672"),
        (r"\text{(B)}", "B"),
        (r"\text{Evelyn}", "Evelyn"),
        (r"\log_2 8", "3"),
        (r"2\pi", r"\pi\cdot 2"),
    ],
)
def test_math_equivalent(pred, gold):
    assert math_answers_equal(pred, gold)
    assert math_metric(ex(gold), dspy.Prediction(answer=pred))


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("[-1,3)", "(-1,3)"),  # interval ends must match
        ("(1,2)", "(1,2]"),
        ("(3,5,7)", "3, 5, 7"),  # tuple vs list
        ("0.333", r"\frac13"),  # close is not equal
        ("3", "4"),
        (r"\sqrt{2}", "1.414"),
        ("", "1"),
        ("-5", "5"),
        ("x+1", "x-1"),
        (r"2^{2^{2^{2^{2}}}}", "3"),  # exponent guard: refused quickly instead of computing 2^65536
    ],
)
def test_math_not_equivalent(pred, gold):
    start = time.monotonic()
    assert not math_answers_equal(pred, gold)
    assert time.monotonic() - start < 2.0


def test_normalize_math_answer():
    assert normalize_math_answer(r"$x = \dfrac12$.") == r"\frac{1}{2}"
    assert normalize_math_answer(r"\left( 3, \frac{\pi}{2} \right)") == r"(3,\frac{\pi}{2})"
    assert normalize_math_answer(r"10{,}000") == "10000"
    assert normalize_math_answer(r"1,\!000") == "1000"


def _equiv_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "trprompt-math-equiv"]


def test_math_pathological_input_finishes_under_timeout():
    math_answers_equal("x+1", "1+x")  # warm up: import sympy outside the timed part
    start = time.monotonic()
    # Without the timeout this simplify() runs for minutes (expanding two 200th powers).
    equal = math_answers_equal("(x+y+z+w+1)^{200}", "(x+y+z+w+2)^{200}", timeout=0.3)
    elapsed = time.monotonic() - start
    assert equal is False
    assert elapsed < 5.0, f"sympy comparison was not bounded by its timeout ({elapsed:.2f}s)"
    deadline = time.monotonic() + 5.0
    while _equiv_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _equiv_threads(), "the timed-out sympy worker kept running instead of stopping"


def test_math_timeout_works_inside_worker_threads():
    # dspy.Evaluate calls metrics from worker threads, where signal-based timeouts cannot be used.
    math_answers_equal("x+1", "1+x")
    with ThreadPoolExecutor(max_workers=2) as pool:
        start = time.monotonic()
        futures = [
            pool.submit(math_answers_equal, "(a+b+c+d+1)^{150}", "(a+b+c+d)^{150}", timeout=0.3)
            for _ in range(2)
        ]
        results = [f.result(timeout=30) for f in futures]
    assert results == [False, False]
    assert time.monotonic() - start < 8.0


def test_math_feedback_texts():
    ok = math_feedback_metric(ex(r"\frac{1}{2}"), r"\boxed{0.5}")
    assert (ok.score, ok.feedback) == (1.0, r"Correct: \frac{1}{2}.")
    bad = math_feedback_metric(ex(r"\frac{1}{2}"), dspy.Prediction(answer=r"so \boxed{0.4}"))
    assert (bad.score, bad.feedback) == (0.0, r"Expected \frac{1}{2}, got 0.4.")
    empty = math_feedback_metric(ex("3"), dspy.Prediction(answer="  "))
    assert empty.score == 0.0 and empty.feedback.startswith("No final answer found")
    missing = math_feedback_metric(ex("3"), dspy.Prediction(reasoning="3"))
    assert missing.score == 0.0 and "no 'answer' field" in missing.feedback


# --------------------------------------------------------------------------- registry and DSPy integration


def test_registry_and_get_metric():
    assert set(METRICS) == set(FEEDBACK_METRICS) == {"gsm8k", "gsmhard", "math"}
    assert get_metric("gsm8k") is gsm8k_metric
    assert get_metric("GSM8K", feedback=True) is gsm8k_feedback_metric
    assert get_metric("math500") is math_metric
    with pytest.raises(ValueError, match=r"Unknown metric name 'squad'.*gsm8k, gsmhard, math"):
        get_metric("squad")


@pytest.mark.parametrize("metric", [*METRICS.values(), *FEEDBACK_METRICS.values(), gsmhard_lenient_metric])
def test_metrics_accept_gepa_five_argument_call(metric):
    inspect.signature(metric).bind(None, None, None, None, None)  # what GEPA checks in its constructor
    out = metric(ex("2"), dspy.Prediction(answer="2"), None, "predict", [])
    assert float(out) == 1.0


class _Echo(dspy.Module):
    """A program without an LM: answers from a lookup table."""

    def __init__(self, answers: dict[str, str]) -> None:
        super().__init__()
        self.answers = answers

    def forward(self, question: str) -> dspy.Prediction:
        return dspy.Prediction(answer=self.answers[question])


@pytest.mark.parametrize(
    "metric",
    [gsm8k_metric, gsm8k_feedback_metric, math_metric, math_feedback_metric, gsmhard_feedback_metric],
)
def test_dspy_evaluate_sums_metric_values(metric):
    devset = [
        dspy.Example(question=q, answer=a).with_inputs("question")
        for q, a in [("a", "-5"), ("b", "1600"), ("c", "0.5"), ("d", "7")]
    ]
    program = _Echo({"a": "-5", "b": "$1,600", "c": r"\frac{1}{2}", "d": "5"})
    result = dspy.Evaluate(devset=devset, metric=metric, num_threads=2, display_progress=False)(program)
    assert result.score == pytest.approx(75.0)
    scores = [float(score) for _, _, score in result.results]
    assert sorted(scores) == [0.0, 1.0, 1.0, 1.0]
