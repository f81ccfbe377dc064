"""Tests for the metric adapter, rollouts, greedy evaluation and SFT-example building."""

from __future__ import annotations

import json
import math
import threading

import dspy
import pytest
from dspy.utils import DummyLM

from trprompt_dspy.backends.prompt_model.base import SFTExample
from trprompt_dspy.backends.prompt_model.fake import FakePromptModel
from trprompt_dspy.compiled.program import install_query_aware
from trprompt_dspy.loop.answer_leaks import REDACTED
from trprompt_dspy.loop.metric_adapter import (
    MetricAdapter,
    MetricResult,
    MetricValueError,
    check_metric_arity,
)
from trprompt_dspy.loop.rollouts import (
    EvalResult,
    Rollout,
    evaluate_program,
    run_rollouts,
)
from trprompt_dspy.loop.sft_data import build_sft_examples
from trprompt_dspy.loop.textual_reward import TextualRewardModel
from trprompt_dspy.runtime.parallel import derive_seed, parallel_map

GOLD = dspy.Example(question="What is 1 + 1?", answer="2").with_inputs("question")

# ------------------------------------------------------------------------------------------ metric adapter


def exact(gold, pred, trace=None):
    return gold.answer == pred.answer


def test_adapter_classic_bool_and_float_metrics():
    assert MetricAdapter(exact)(GOLD, dspy.Prediction(answer="2")) == MetricResult(1.0, None, None)
    assert MetricAdapter(exact)(GOLD, dspy.Prediction(answer="3")).score == 0.0
    assert MetricAdapter(lambda g, p: 0.25)(GOLD, None).score == 0.25


def test_adapter_gepa_feedback_metrics():
    def gepa(gold, pred, trace, pred_name, pred_trace):  # five required args, like GEPA binds
        assert pred_name is None and pred_trace is None
        return dspy.Prediction(score=0.5, feedback="Half right.")

    assert check_metric_arity(gepa) == 5
    assert MetricAdapter(gepa)(GOLD, dspy.Prediction(answer="2")) == MetricResult(0.5, "Half right.", None)

    def gepa_defaults(gold, pred, trace=None, pred_name=None, pred_trace=None):
        return dspy.Prediction(score=True, feedback="")

    res = MetricAdapter(gepa_defaults)(GOLD, None)
    assert res.score == 1.0 and res.feedback is None  # empty feedback is normalised away
    assert MetricAdapter(lambda g, p: {"score": 1, "feedback": "ok"})(GOLD, None) == MetricResult(1.0, "ok", None)


def test_adapter_accepts_numpy_scalars():
    np = pytest.importorskip("numpy")
    assert MetricAdapter(lambda g, p: np.float32(0.75))(GOLD, None).score == 0.75
    assert MetricAdapter(lambda g, p: np.bool_(True))(GOLD, None).score == 1.0
    with pytest.raises(MetricValueError, match="not a numeric"):
        MetricAdapter(lambda g, p: np.array([1.0, 0.0]))(GOLD, None)


def test_adapter_passes_trace_to_three_argument_metrics():
    seen = []
    MetricAdapter(lambda g, p, trace=None: seen.append(trace) or 1.0)(GOLD, None, trace=["step"])
    assert seen == [["step"]]


@pytest.mark.parametrize(
    ("value", "match"),
    [(float("nan"), "non-finite"), (None, "None"), ("1.0", "not a numeric"), ({"feedback": "x"}, "no 'score'"),
     (dspy.Prediction(score=math.inf, feedback="x"), "non-finite")],
)
def test_adapter_rejects_bad_scores_naming_metric_and_value(value, match):
    def my_metric(gold, pred, trace=None):
        return value

    with pytest.raises(MetricValueError, match=match) as info:
        MetricAdapter(my_metric)(GOLD, None)
    assert "my_metric" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_adapter_wrong_arity_and_non_callable():
    with pytest.raises(TypeError, match="cannot be called as metric"):
        MetricAdapter(lambda only_one: 1.0)
    with pytest.raises(TypeError, match="cannot be called as metric"):
        MetricAdapter(lambda a, b, c, d: 1.0)
    with pytest.raises(TypeError, match="callable"):
        MetricAdapter("exact_match")  # type: ignore[arg-type]


def test_adapter_records_metric_exceptions_unless_asked_to_raise():
    def broken(gold, pred, trace=None):
        return pred.missing_field

    res = MetricAdapter(broken, failure_score=-1)(GOLD, dspy.Prediction(answer="2"))
    assert res.score == -1.0 and not res.ok and "broken" in res.error and "AttributeError" in res.error
    with pytest.raises(AttributeError):
        MetricAdapter(broken, raise_errors=True)(GOLD, dspy.Prediction(answer="2"))
    with pytest.raises(AttributeError):
        MetricAdapter(broken)(GOLD, dspy.Prediction(answer="2"), None, strict=True)


# ------------------------------------------------------------------------------------------ rollouts


def examples(n=3):
    return [dspy.Example(question=f"What is {i} + 1?", answer=str(i + 1)).with_inputs("question") for i in range(n)]


def student_lm(n=3, wrong=()):
    """DummyLM answering 'What is i + 1?' (wrongly for i in ``wrong``), with reasoning."""
    return DummyLM({f"What is {i} + 1?": {"reasoning": f"{i} plus one", "answer": str(i + 1 + (i in wrong))}
                    for i in range(n)})


def qa_program():
    return install_query_aware(dspy.ChainOfThought("question -> answer"), prompt_model=None, optimal_reward="t*")


class Flaky(dspy.Module):
    def __init__(self):
        super().__init__()
        self.qa = dspy.ChainOfThought("question -> answer")

    def forward(self, question):
        if question.startswith("What is 1 "):
            raise RuntimeError("flaky failure")
        return self.qa(question=question)


def test_run_rollouts_m_per_query_with_distinct_seeds_and_recorded_instructions():
    pm = FakePromptModel()
    with dspy.context(lm=student_lm(wrong={2})):
        rollouts = run_rollouts(qa_program(), examples(), prompt_model=pm, reward_text="Be exact.",
                                samples_per_query=3, temperature=0.7, seed=11, metric=exact, num_threads=3)
    assert [r.key for r in rollouts] == [(i, m) for i in range(3) for m in range(3)]
    assert len({r.seed for r in rollouts}) == 9
    assert all(r.seed == derive_seed(11, r.example_index, r.sample_index) for r in rollouts)
    # the prompt model saw the reward, the temperature and the per-rollout seed
    assert sorted(c.seed for c in pm.calls) == sorted(r.seed for r in rollouts)
    assert {c.temperature for c in pm.calls} == {0.7}
    assert {req.reward for req in pm.requests} == {"Be exact."}
    assert [r.score for r in rollouts] == [1.0] * 6 + [0.0] * 3
    r = rollouts[0]
    assert r.inputs == {"question": "What is 0 + 1?"} and r.gold == {"answer": "1"}
    assert r.outputs == {"reasoning": "0 plus one", "answer": "1"}  # no query_instruction
    assert r.trace == [{"predictor": "predict", "inputs": {"question": "What is 0 + 1?"},
                        "outputs": {"reasoning": "0 plus one", "answer": "1"}}]
    assert len(r.instructions) == 1 and r.instructions[0]["predictor"] == "predict"
    assert r.instructions[0]["request"]["query"] == "question: What is 0 + 1?"
    assert r.instructions[0]["instruction"].startswith("Solve step by step.")
    assert r.conditioned_on == "Be exact." and r.error is None
    # samples of one query differ (temperature > 0 with distinct seeds)
    assert len({x.instructions[0]["instruction"] for x in rollouts[:3]}) == 3


def test_rollout_json_round_trip():
    pm = FakePromptModel()
    with dspy.context(lm=student_lm()):
        (r,) = run_rollouts(qa_program(), examples(1), prompt_model=pm, reward_text="t", metric=exact)
    r.reward, r.reward_redactions = "Good.", 1
    again = Rollout.from_dict(json.loads(json.dumps(r.to_dict())))
    assert again == r
    with pytest.raises(ValueError, match="sample_index"):
        Rollout.from_dict({"example_index": 0})


def test_on_result_and_skip_for_resume():
    pm = FakePromptModel()
    seen: list[tuple[int, int]] = []
    caller = threading.get_ident()
    threads = set()

    def on_result(r):
        threads.add(threading.get_ident())
        seen.append(r.key)

    with dspy.context(lm=student_lm()):
        out = run_rollouts(qa_program(), examples(), prompt_model=pm, reward_text="t", samples_per_query=2,
                           metric=exact, num_threads=2, on_result=on_result, skip={(0, 0), (2, 1)},
                           indices=[10, 0, 2])
    expected = {(10, 0), (10, 1), (0, 0), (0, 1), (2, 0), (2, 1)} - {(0, 0), (2, 1)}
    assert sorted(seen) == sorted(expected) and len(seen) == 4
    assert [r.key for r in out] == sorted(expected)
    assert threads == {caller}  # on_result runs in the calling thread (safe for file appends)
    assert len(pm.calls) == 4


def test_program_failures_are_recorded_not_raised():
    prog = install_query_aware(Flaky(), prompt_model=None, optimal_reward="t*")
    with dspy.context(lm=student_lm()):
        out = run_rollouts(prog, examples(), prompt_model=FakePromptModel(), reward_text="t", metric=exact,
                           num_threads=2, failure_score=-1.0, display_progress=True)
    bad = out[1]
    assert bad.error is not None and "flaky failure" in bad.error and bad.score == -1.0 and bad.outputs == {}
    assert [r.error for r in (out[0], out[2])] == [None, None]
    assert out[0].instructions[0]["predictor"] == "qa.predict"


def test_missing_prompt_model_and_student_lm_errors_are_recorded():
    with dspy.context(lm=student_lm()):
        (r,) = run_rollouts(qa_program(), examples(1), prompt_model=None, reward_text="t", metric=exact)
    assert "no prompt model" in r.error
    (r,) = run_rollouts(qa_program(), examples(1), prompt_model=FakePromptModel(), reward_text="t", metric=exact)
    assert r.error is not None and r.score == 0.0  # no LM configured for the student


def test_metric_failing_everywhere_raises_but_one_failure_is_recorded():
    def nan_metric(gold, pred, trace=None):
        return float("nan")

    with dspy.context(lm=student_lm()), pytest.raises(ValueError, match="nan_metric"):
        run_rollouts(qa_program(), examples(2), prompt_model=FakePromptModel(), reward_text="t", metric=nan_metric)

    def sometimes_nan(gold, pred, trace=None):
        return float("nan") if gold.answer == "1" else 1.0

    with dspy.context(lm=student_lm()):
        out = run_rollouts(qa_program(), examples(2), prompt_model=FakePromptModel(), reward_text="t",
                           metric=sometimes_nan)
    assert "non-finite" in out[0].error and out[0].score == 0.0 and out[1].score == 1.0


def test_run_rollouts_validates_inputs():
    kw = dict(prompt_model=FakePromptModel(), reward_text="t", metric=exact)
    with pytest.raises(ValueError, match="with_inputs"):
        run_rollouts(qa_program(), [dspy.Example(question="q", answer="a")], **kw)
    with pytest.raises(ValueError, match="samples_per_query"):
        run_rollouts(qa_program(), examples(1), samples_per_query=0, **kw)
    with pytest.raises(ValueError, match="indices"):
        run_rollouts(qa_program(), examples(2), indices=[1], **kw)
    with pytest.raises(TypeError, match="metric"):
        run_rollouts(qa_program(), examples(1), prompt_model=None, reward_text="t", metric=lambda x: 1)


def test_evaluate_program_is_greedy_and_ordered():
    pm = FakePromptModel()
    with dspy.context(lm=student_lm(wrong={1})):
        res = evaluate_program(qa_program(), examples(), metric=exact, num_threads=3, reward_text="t*",
                               prompt_model=pm)
    assert isinstance(res, EvalResult)
    assert res.scores == [1.0, 0.0, 1.0] and res.score == pytest.approx(2 / 3)
    assert [r.example_index for r in res.rollouts] == [0, 1, 2]
    assert {c.temperature for c in pm.calls} == {0.0}
    assert res.num_errors == 0 and json.loads(json.dumps(res.to_dict()))["score"] == res.score
    with pytest.raises(ValueError, match="at least one"):
        evaluate_program(qa_program(), [], metric=exact)


def test_parallel_map_order_callback_and_errors():
    done = []
    assert parallel_map(lambda x: x * 2, [3, 1, 2], num_threads=3, on_done=lambda i, r: done.append((i, r))) == [6, 2, 4]
    assert sorted(done) == [(0, 6), (1, 2), (2, 4)]
    with dspy.context(adapter=dspy.JSONAdapter()):  # dspy.context reaches the workers
        seen = parallel_map(lambda _: type(dspy.settings.adapter).__name__, [0, 1], num_threads=2)
    assert seen == ["JSONAdapter", "JSONAdapter"]

    def boom(x):
        raise KeyError(x)

    with pytest.raises(KeyError):
        parallel_map(boom, [1, 2], num_threads=2)
    with pytest.raises(ValueError, match="num_threads"):
        parallel_map(boom, [1], num_threads=0)


# ------------------------------------------------------------------------------------------ SFT examples


def test_sft_examples_use_the_rollout_reward_and_drop_leaky_instructions():
    def writer(req):
        return "The answer is 2." if "1 + 1" in req.query else "Add one to the number carefully."

    pm = FakePromptModel(writer)
    with dspy.context(lm=student_lm()):
        rollouts = run_rollouts(qa_program(), examples(3), prompt_model=pm, reward_text="initial t",
                                samples_per_query=2, temperature=0.0, metric=exact)
    grader = DummyLM({"What is 2 + 1?": {"textual_reward": "Correct, 3 is right; the instruction was clear."},
                      "## query ##": {"textual_reward": "Correct; the instruction was clear."}})
    TextualRewardModel(grader).score_rollouts(rollouts)
    assert rollouts[4].reward == f"Correct, {REDACTED} is right; the instruction was clear."
    rollouts[5].reward = None  # e.g. the reward model failed on this one
    batch, n_leaky = build_sft_examples(rollouts)
    assert n_leaky == batch.num_leaky == 2 and batch.num_no_reward == 1
    assert batch.num_duplicates == 1  # rollouts (0, 0) and (0, 1) are identical at temperature 0
    assert len(batch) == 2 and all(isinstance(e, SFTExample) for e in batch)
    by_query = {e.request.query: e for e in batch}
    e0 = by_query["question: What is 0 + 1?"]
    assert e0.request.reward == "Correct; the instruction was clear." != "initial t"
    assert e0.instruction == "Add one to the number carefully." and e0.score == 1.0
    assert by_query["question: What is 2 + 1?"].request.reward.startswith(f"Correct, {REDACTED}")
    assert batch.stats()["num_examples"] == 2
    # without the filter the leaky instructions are kept
    unfiltered, n_leaky = build_sft_examples(rollouts, leak_filter=False)
    assert n_leaky == 0 and len(unfiltered) == 3
    low, _ = build_sft_examples(rollouts, min_score=2.0)
    assert len(low) == 0 and low.num_low_score == 5


def test_sft_rewards_can_start_with_the_metric_verdict():
    from trprompt_dspy.loop.textual_reward import verdict_sentence

    call = {"predictor": "p", "instruction": "Add the numbers.",
            "request": {"predictor": "p", "task": "question -> answer", "query": "question: q", "reward": "t"}}
    rollouts = [Rollout(example_index=i, sample_index=0, inputs={"question": f"q{i}"}, gold={"answer": "7"},
                        outputs={"answer": "x"}, score=s, instructions=[{**call, "request": {**call["request"],
                        "query": f"question: q{i}"}}], reward="It was right.")
                for i, s in enumerate((1.0, 0.0, 0.5))]
    batch, _ = build_sft_examples(rollouts, verdict=True)
    assert [e.request.reward for e in batch] == [f"{verdict_sentence(s)} It was right." for s in (1.0, 0.0, 0.5)]
    assert "incorrect (metric score 0)" in batch[1].request.reward
    plain, _ = build_sft_examples(rollouts)
    assert {e.request.reward for e in plain} == {"It was right."}
