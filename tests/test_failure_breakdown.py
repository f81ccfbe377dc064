"""Failed program runs named by kind and phase: the log line, the truncated kind, the meter and detailed_results."""

from __future__ import annotations

import dataclasses
import json
import logging

import dspy
import pytest

from trprompt_dspy import TRPromptOptimizer
from trprompt_dspy.compiled.program import install_query_aware
from trprompt_dspy.loop.rollouts import (
    Rollout,
    describe_failures,
    evaluate_program,
    failure_breakdown,
    run_rollouts,
)
from trprompt_dspy.results import TRPromptResult
from trprompt_dspy.runtime.faults import FAILURE_WORDS, TRANSIENT_KINDS, describe_failure_kinds
from trprompt_dspy.runtime.log_noise import summarize_truncations
from trprompt_dspy.runtime.usage import UsageMeter
from trprompt_dspy.testing import (
    FakePromptModel,
    ScriptedEngine,
    addition_examples,
    arithmetic_responder,
    scripted_lm,
)

COMPLETED = "[[ ## completed ## ]]"


class CutEngine(ScriptedEngine):
    """Replies like :func:`arithmetic_responder`; for the questions in ``cut`` the reply stops before its answer
    field and is reported as cut at max_tokens (``finish_reason="length"``), as a server does."""

    def __init__(self, cut: tuple[str, ...] = (), garbage: tuple[str, ...] = ()) -> None:
        self.cut, self.garbage = cut, garbage
        super().__init__(self._reply)

    def _reply(self, system: str, user: str) -> str:
        if any(q in user for q in self.garbage):
            return "%%%% no fields at all"
        reply = arithmetic_responder(system, user)
        return reply.partition("[[ ## answer ## ]]")[0] if any(q in user for q in self.cut) else reply

    def complete(self, request):  # noqa: ANN001, ANN201
        response = super().complete(request)
        if COMPLETED not in response.text and "%%%%" not in response.text:
            response = dataclasses.replace(response, finish_reason="length")
        return response


def cut_lm(**kw) -> dspy.LM:
    return dspy.LM("local/cut", engine=CutEngine(**kw), cache=False)


def exact(gold, pred, trace=None):
    return float(gold.answer == pred.answer)


def test_every_kind_has_words_and_counts_read_in_plain_words():
    assert set(FAILURE_WORDS) >= TRANSIENT_KINDS
    assert {"parse_error", "truncated", "empty_completion", "metric_error", "other"} <= set(FAILURE_WORDS)
    assert describe_failure_kinds({"parse_error": 1, "server_error": 2}) == \
        "2 failed calls (server errors), 1 unparseable answer"


def test_breakdown_counts_runs_kinds_and_instructions():
    runs = [Rollout(0, 0, instructions=[{"instruction": "Add."}]),
            Rollout(1, 0, instructions=[{"instruction": "Add."}], error="x", error_kind="parse_error"),
            Rollout(2, 0, instructions=[{"instruction": "  "}], error="x", error_kind="timeout"),
            Rollout(3, 0, error="x")]
    counts = failure_breakdown(runs)
    assert counts == {"runs": 4, "failed": 3, "instructed": 2, "failed_instructed": 1, "parse_error": 1,
                      "timeout": 1, "other": 1}
    assert describe_failures("rollouts", counts) == (
        "rollouts: 3 of 4 program runs failed: 1 program exception, 1 unparseable answer, 1 timed-out call; "
        "1 of the 3 had a prompt-model instruction (2 of the 4 runs had one).")
    assert failure_breakdown([]) == {"runs": 0, "failed": 0, "instructed": 0, "failed_instructed": 0}


def test_a_reply_cut_at_max_tokens_is_reported_as_truncated_not_unparseable(caplog):
    data = addition_examples(3)
    lm = cut_lm(cut=(data[1].question,), garbage=(data[2].question,))
    with dspy.context(lm=lm), caplog.at_level(logging.INFO, logger="trprompt_dspy.loop.rollouts"):
        res = evaluate_program(dspy.ChainOfThought("question -> answer"), data, metric=exact, desc="validation")
    assert [r.error_kind for r in res.rollouts] == [None, "truncated", "parse_error"]
    assert res.rollouts[1].error.startswith("program raised") and "cut at max_tokens" in res.rollouts[1].error
    assert ("validation: 2 of 3 program runs failed: 1 unparseable answer, 1 answer truncated at max_tokens."
            in caplog.messages)
    assert not any("rollouts had errors" in m for m in caplog.messages)


def test_truncations_are_seen_while_the_compile_summarizes_them_and_only_for_the_program():
    data = addition_examples(2)
    lm = cut_lm(cut=(data[0].question,))
    program = dspy.ChainOfThought("question -> answer")
    with dspy.context(lm=lm), summarize_truncations() as summary:  # drops DSPy's records: counted first anyway
        res = evaluate_program(program, data, metric=exact)
        assert summary.counts  # the compile's own one-line summary still counts them
    assert [r.error_kind for r in res.rollouts] == ["truncated", None]
    meter = UsageMeter()
    with dspy.context(lm=lm), meter.attribute("reward"):  # a cut reply of another role is not the program's
        res = evaluate_program(program, data, metric=exact)
    assert [r.error_kind for r in res.rollouts] == ["parse_error", None]


def test_progress_bars_are_labelled_by_phase(monkeypatch):
    import tqdm.auto

    labels = []

    class Bar:
        def __init__(self, total, desc, leave):
            labels.append(desc)

        def update(self, n):
            pass

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    with dspy.context(lm=scripted_lm(arithmetic_responder)):
        evaluate_program(dspy.Predict("question -> answer"), addition_examples(1), metric=exact, display_progress=True)
        run_rollouts(install_query_aware(dspy.Predict("question -> answer"), prompt_model=None, optimal_reward="t"),
                     addition_examples(1), prompt_model=FakePromptModel(), reward_text="t", metric=exact,
                     display_progress=True, desc="student rollouts")
    assert labels == ["evaluation", "student rollouts"]


def test_the_meter_sums_phases_and_resumes_them():
    meter = UsageMeter()
    meter.add_phase("validation", {"runs": 4, "failed": 1, "parse_error": 1})
    meter.add_phase("validation", {"runs": 4, "failed": 2, "timeout": 2})
    snap = json.loads(json.dumps(meter.snapshot()))  # as state.json keeps it
    assert snap["errors_by_phase"] == {"validation": {"runs": 8, "failed": 3, "parse_error": 1, "timeout": 2}}
    resumed = UsageMeter()
    resumed.restore(snap)
    assert resumed.snapshot()["errors_by_phase"] == snap["errors_by_phase"]
    old = UsageMeter()
    old.restore({"calls": {"target": 3}, "failures": {"program_error": 1}})  # a state.json from before the field
    assert old.snapshot()["errors_by_phase"] == {} and old.calls["target"] == 3


def test_result_without_errors_by_phase_still_builds():
    r = TRPromptResult(iterations=(), best_iteration=None, baseline_score=0.5, best_score=0.5, t_star_history=("t",),
                       lm_calls={}, lm_tokens={}, failures={}, seed=0, log_dir="runs/x", budget={}, seconds=1.0)
    assert r.errors_by_phase == {} and r.to_dict()["errors_by_phase"] == {}


def test_compile_reports_failures_by_phase(tmp_path):
    train, val = addition_examples(6), addition_examples(4, start=50)
    target = cut_lm(cut=(val[1].question,))
    opt = TRPromptOptimizer(metric=exact, prompt_model=FakePromptModel(template="Add the numbers for {predictor}."),
                            reward_lm=scripted_lm(arithmetic_responder), textgrad_lm=scripted_lm(arithmetic_responder),
                            num_iterations=1, queries_per_iteration=2, prompts_per_query=1, textgrad_steps=0,
                            val_size=4, log_dir=tmp_path / "log", display_progress=False, significance_level=None)
    with dspy.context(lm=target):
        compiled = opt.compile(dspy.ChainOfThought("question -> answer"), trainset=train, valset=val)
    by_phase = compiled.detailed_results.errors_by_phase
    assert by_phase["baseline evaluation"] == {"runs": 4, "failed": 1, "instructed": 0, "failed_instructed": 0,
                                               "truncated": 1}
    assert by_phase["validation"]["truncated"] == 1 and by_phase["validation"]["failed_instructed"] == 1
    assert by_phase["rollouts"]["failed"] == 0
    assert compiled.detailed_results.failures["program_truncated"] == 2
    state = json.loads((tmp_path / "log" / "state.json").read_text())
    assert state["meter"]["errors_by_phase"] == by_phase
    baseline = json.loads((tmp_path / "log" / "baseline.json").read_text())
    assert baseline["inputs"][1] == {"question": val[1].question}


@pytest.mark.parametrize("phase", ["validation", "baseline evaluation"])
def test_describe_failures_of_a_phase_without_failures_is_none(phase):
    assert describe_failures(phase, {"runs": 5, "failed": 0, "instructed": 5}) is None
