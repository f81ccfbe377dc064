"""Tests for the TextGrad refinement of the optimal textual reward t*."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dspy
import pytest

from tests.fakes import arithmetic_responder, scripted_lm
from trprompt_dspy._lazy import import_textgrad
from trprompt_dspy.backends.prompt_model.fake import FakePromptModel
from trprompt_dspy.backends.textgrad_engine import DSPyTextGradEngine
from trprompt_dspy.compiled.program import install_query_aware
from trprompt_dspy.loop.refine_reward import (
    OPTIMAL_REWARD_ROLE,
    refine_optimal_reward,
    render_outcome_report,
)
from trprompt_dspy.loop.rollouts import EvalResult, Rollout, evaluate_program

tg = import_textgrad()
BACKWARD_MARK = "You are part of an optimization system that improves a given text"
TGD_MARK = "<IMPROVED_VARIABLE>"


class ScriptedEngine(tg.EngineLM):
    """A fake TextGrad engine: loss/gradient calls get numbered feedback, TGD calls get ``updates`` in order."""

    def __init__(self, updates):
        self.model_string = "scripted"
        self.updates = list(updates)
        self.calls: list[tuple[str, str]] = []

    def generate(self, content, system_prompt=None, **kwargs):
        self.calls.append((system_prompt or "", content))
        if TGD_MARK in (system_prompt or ""):
            return self.updates.pop(0)
        return f"GRADIENT-{len(self.calls)}: stress checking each step."

    def __call__(self, content, **kwargs):
        return self.generate(content, **kwargs)

    def tgd_calls(self):
        return [c for s, c in self.calls if TGD_MARK in s]


def make_eval(score_of, log=None):
    """An ``evaluate(t)`` over one fixed example whose score is ``score_of(t)``."""

    def evaluate(t):
        if log is not None:
            log.append(t)
        s = score_of(t)
        r = Rollout(0, 0, inputs={"question": "What is 6 times 7?"}, gold={"answer": "42"},
                    instructions=[{"predictor": "p", "request": {}, "instruction": "Multiply."}],
                    outputs={"answer": "42" if s else "41"}, score=s, feedback="Off by one." if not s else None)
        return EvalResult(s, [s], [r])

    return evaluate


def test_accepted_improvement_with_engine_computed_gradient():
    engine = ScriptedEngine(["<IMPROVED_VARIABLE>Check every step carefully.</IMPROVED_VARIABLE>"])
    res = refine_optimal_reward("Be correct.", evaluate=make_eval(lambda t: 1.0 if "carefully" in t else 0.0),
                                engine=engine, steps=1)
    assert res.value == "Check every step carefully." and res.accepted
    assert (res.initial_score, res.final_score) == (0.0, 1.0)
    (h,) = res.history
    assert h["accepted"] and h["score_before"] == 0.0 and h["score_after"] == 1.0 and h["error"] is None
    # loss forward, gradient on the outcome report, gradient on t*, TGD update
    assert len(engine.calls) == 4
    backward = [c for s, c in engine.calls if s.startswith(BACKWARD_MARK)]
    t_grad_prompt = [c for c in backward if f"<ROLE> {OPTIMAL_REWARD_ROLE} </ROLE>" in c]
    assert len(t_grad_prompt) == 1 and "<VARIABLE> Be correct. </VARIABLE>" in t_grad_prompt[0]
    assert h["gradient"].startswith("GRADIENT-3")  # the engine's reply to the t* gradient prompt
    (update_prompt,) = engine.tgd_calls()
    assert h["gradient"] in update_prompt and "Do not state any specific answer" in update_prompt
    # the loss saw the minibatch outcome, without the gold answer
    loss_input = engine.calls[0][1]
    assert "What is 6 times 7?" in loss_input and "Off by one." in loss_input and "incorrect" in loss_input
    assert "42" not in loss_input.replace("Gold", "")


def test_rejected_when_score_drops():
    engine = ScriptedEngine(["<IMPROVED_VARIABLE>Answer fast.</IMPROVED_VARIABLE>"])
    res = refine_optimal_reward("Be correct.", evaluate=make_eval(lambda t: 0.0 if "fast" in t else 1.0),
                                engine=engine, steps=1)
    assert res.value == "Be correct." and not res.accepted
    assert res.history[0]["candidate"] == "Answer fast." and res.history[0]["score_after"] == 0.0
    assert res.history[0]["error"] is None and res.history[0]["error_kind"] is None
    assert res.final_score == 1.0


def test_missing_tags_retry_once_then_keep_previous():
    engine = ScriptedEngine(["Sure, here it is: be careful.", "still no tags"])
    log: list[str] = []
    res = refine_optimal_reward("Be correct.", evaluate=make_eval(lambda t: 0.5, log), engine=engine, steps=1)
    assert res.value == "Be correct." and not res.accepted
    assert len(engine.tgd_calls()) == 2
    assert "IMPROVED_VARIABLE" in res.history[0]["error"] and res.history[0]["candidate"] is None
    assert res.history[0]["error_kind"] == "missing_tags"
    assert log == ["Be correct."]  # nothing new was evaluated


def test_missing_tags_then_success_on_retry_and_multiple_steps():
    engine = ScriptedEngine(["no tags", "<IMPROVED_VARIABLE>Be careful.</IMPROVED_VARIABLE>",
                             "<IMPROVED_VARIABLE>Be careful and verify.</IMPROVED_VARIABLE>"])
    res = refine_optimal_reward("Be correct.", evaluate=make_eval(lambda t: len(t) / 100), engine=engine, steps=2)
    assert res.value == "Be careful and verify." and res.accepted
    assert [h["accepted"] for h in res.history] == [True, True]
    assert res.history[1]["score_before"] == res.history[0]["score_after"]


def test_engine_failure_is_recorded_and_t_star_kept():
    class Broken(ScriptedEngine):
        def generate(self, content, system_prompt=None, **kwargs):
            raise ConnectionError("server down")

    res = refine_optimal_reward("Be correct.", evaluate=make_eval(lambda t: 0.5), engine=Broken([]), steps=2)
    assert res.value == "Be correct." and not res.accepted and res.final_score == 0.5
    assert [h["error_kind"] for h in res.history] == ["engine", "engine"]
    assert "server down" in res.history[0]["error"]


def _long_minibatch(n=8):
    rollouts = [Rollout(i, 0, inputs={"question": f"Question {i}: " + "a farmer counts the sheep again. " * 20},
                        outputs={"reasoning": "First I add the numbers. " * 30, "answer": "7"}, score=0.0,
                        feedback="The final answer is wrong; the reasoning skipped a quantity. " * 3)
                for i in range(n)]
    return EvalResult(0.0, [0.0] * n, rollouts)


class ContextLimitedEngine(ScriptedEngine):
    """Rejects any prompt longer than ``limit`` characters the way vLLM does (a 400 naming the context)."""

    def __init__(self, updates, limit):
        super().__init__(updates)
        self.limit, self.rejected = limit, 0

    def generate(self, content, system_prompt=None, **kwargs):
        from dspy.utils.exceptions import LMInvalidRequestError

        if len(system_prompt or "") + len(str(content)) > self.limit:
            self.rejected += 1
            raise LMInvalidRequestError("This model's maximum context length is 2048 tokens. However, your prompt "
                                        "contains at least 2049 input tokens.", status=400)
        return super().generate(content, system_prompt=system_prompt, **kwargs)


def test_a_report_too_long_for_the_engine_context_is_cut_and_the_step_retried():
    batch = _long_minibatch()
    full = len(render_outcome_report(batch.rollouts))
    engine = ContextLimitedEngine(["<IMPROVED_VARIABLE>Check each quantity.</IMPROVED_VARIABLE>"], limit=9000)
    res = refine_optimal_reward("Be correct.", evaluate=lambda t: EvalResult(1.0, [1.0], batch.rollouts[:1]),
                                engine=engine, steps=1, initial=batch)
    (h,) = res.history
    assert engine.rejected >= 1  # the uncut report (with TextGrad's template around it) did not fit
    assert h["error"] is None and res.accepted and res.value == "Check each quantity."
    assert h["report_chars"] <= full // 2
    assert all(len(sp) + len(str(c)) <= 9000 for sp, c in engine.calls)  # every call that ran fit the context


def test_a_context_the_report_can_never_fit_fails_the_step_after_bounded_retries():
    engine = ContextLimitedEngine(["<IMPROVED_VARIABLE>x</IMPROVED_VARIABLE>"], limit=100)
    res = refine_optimal_reward("Be correct.", evaluate=make_eval(lambda t: 0.5), engine=engine, steps=1,
                                initial=_long_minibatch())
    (h,) = res.history
    assert h["error_kind"] == "engine" and h["cause"] == "context_window" and res.value == "Be correct."
    assert 2 <= engine.rejected <= 4


def test_report_max_chars_bounds_the_report_and_keeps_failures_first():
    batch = _long_minibatch(6)
    batch.rollouts[5].score = 1.0
    for limit in (5000, 2000, 600):
        report = render_outcome_report(batch.rollouts, max_chars=limit)
        assert len(report) <= limit and report.startswith("Minibatch: 1 of 6 correct")
        assert "Example 1 (incorrect" in report
    assert "(correct, score 1)" not in render_outcome_report(batch.rollouts, max_chars=900)  # the correct example goes first
    with pytest.raises(ValueError, match="max_chars"):
        render_outcome_report(batch.rollouts, max_chars=0)


def test_leaking_candidate_is_rejected_without_evaluation():
    engine = ScriptedEngine(["<IMPROVED_VARIABLE>The result should be 42.</IMPROVED_VARIABLE>"])
    log: list[str] = []
    res = refine_optimal_reward("Be correct.", evaluate=make_eval(lambda t: 1.0, log), engine=engine, steps=1)
    assert res.value == "Be correct." and "gold answer" in res.history[0]["error"]
    assert res.history[0]["error_kind"] == "leak"
    assert log == ["Be correct."]


def test_steps_zero_initial_and_argument_checks():
    engine = ScriptedEngine([])
    res = refine_optimal_reward("t", evaluate=lambda t: pytest.fail("must not evaluate"), engine=engine, steps=0)
    assert (res.value, res.accepted, res.history) == ("t", False, [])
    init = make_eval(lambda t: 0.3)("t")
    engine = ScriptedEngine(["<IMPROVED_VARIABLE>t2</IMPROVED_VARIABLE>"])
    log: list[str] = []
    res = refine_optimal_reward("t", evaluate=make_eval(lambda t: 0.3, log), engine=engine, steps=1, initial=init)
    assert log == ["t2"] and res.accepted  # an equal non-zero score is accepted (no drop)
    engine = ScriptedEngine(["<IMPROVED_VARIABLE>Minimum Pair Output</IMPROVED_VARIABLE>"])
    res = refine_optimal_reward("t", evaluate=make_eval(lambda t: 0.0), engine=engine, steps=1)
    assert res.value == "t" and not res.accepted  # a tie at zero says nothing about the candidate
    assert res.history[0]["error_kind"] == "zero_tie" and res.history[0]["score_after"] == 0.0
    with pytest.raises(ValueError, match="t_star"):
        refine_optimal_reward("  ", evaluate=lambda t: init, engine=engine, steps=1)
    with pytest.raises(ValueError, match="steps"):
        refine_optimal_reward("t", evaluate=lambda t: init, engine=engine, steps=-1)
    with pytest.raises(TypeError, match="engine"):
        refine_optimal_reward("t", evaluate=lambda t: init, engine=None, steps=1)


def test_user_global_backward_engine_is_left_in_place():
    other = ScriptedEngine([])
    singleton = tg.SingletonBackwardEngine()
    tg.set_backward_engine(other, override=True)
    try:
        engine = ScriptedEngine(["<IMPROVED_VARIABLE>Be careful.</IMPROVED_VARIABLE>"])
        res = refine_optimal_reward("Be correct.", evaluate=make_eval(lambda t: 1.0), engine=engine, steps=1)
        assert res.accepted and other.calls == [] and singleton.get_engine() is other
    finally:
        singleton.engine = None


def test_render_outcome_report_lists_failures_first():
    rs = [Rollout(0, 0, inputs={"q": "a"}, outputs={"x": "1"}, score=1.0),
          Rollout(1, 0, inputs={"q": "b"}, gold={"x": "7"}, error="boom", score=0.0)]
    text = render_outcome_report(rs)
    assert text.splitlines()[0] == "Minibatch: 1 of 2 correct (mean score 0.5)."
    assert text.index("q: b") < text.index("q: a") and "(no output: boom)" in text and "7" not in text
    assert "Gold: x: 7" in render_outcome_report(rs, include_gold=True)


# ------------------------------------------------------------------------------------------ DSPy engine


def test_dspy_engine_is_an_engine_lm_and_counts_usage():
    lm = scripted_lm(lambda system, user: f"echo[{system}|{user}]")
    engine = DSPyTextGradEngine(lm, temperature=0.0, max_tokens=64)
    assert isinstance(engine, tg.EngineLM) and isinstance(engine, DSPyTextGradEngine)
    assert engine("hello world", system_prompt="sys") == "echo[sys|hello world]"
    assert engine.generate(["part one", b"img"]) == f"echo[{engine.system_prompt}|part one]"
    assert engine.usage() == {"calls": 2, "input_tokens": 4, "output_tokens": 2 + 9}
    with pytest.raises(TypeError, match="dspy.LM"):
        DSPyTextGradEngine("gpt-4o")


def test_end_to_end_with_real_program_and_dspy_engine():
    lm = scripted_lm(arithmetic_responder)
    program = install_query_aware(dspy.Predict("question -> answer"), prompt_model=None, optimal_reward="t0")
    batch = [dspy.Example(question=f"What is {i} + 2?", answer=str(i + 2)).with_inputs("question") for i in range(2)]
    pm = FakePromptModel()

    def evaluate(t):
        return evaluate_program(program, batch, metric=lambda g, p, trace=None: g.answer == p.answer,
                                reward_text=t, prompt_model=pm)

    engine = DSPyTextGradEngine(lm)
    with dspy.context(lm=lm):
        res = refine_optimal_reward("A good answer is correct.", evaluate=evaluate, engine=engine, steps=1)
    assert res.accepted and res.value == "The response adds the two numbers carefully and states the sum."
    assert engine.calls == 4 and res.final_score == 1.0
    assert {req.reward for req in pm.requests} == {"A good answer is correct.", res.value}


def test_importing_refine_does_not_import_textgrad():
    code = "import sys, trprompt_dspy.loop.refine_reward; assert 'textgrad' not in sys.modules, 'textgrad imported'"
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=repo)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize("question, candidate, gold, copied", [
    ("A farmer has 12 cows and buys 5 more cows at the market on Monday. How many cows now?",
     "The optimal reward: a farmer has 12 cows and buys 5 more cows at the market.", "17", "a farmer has 12 cows"),
    # Seen in the GSM-Hard study: a tie-accepted t* pasted one query's quantities in LaTeX (no 8-word run shared).
    ("A teapot holds 1.5 quarts. 16 students each drank 2 quarts. How many teapots were emptied?",
     "The response uses every quantity in \\(1.5 \\text{ quarts and } 16 \\text{ students}\\) and ends with the "
     "correct final answer.", "21", "numbers 1.5, 16"),
], ids=["words", "numbers"])
def test_candidate_that_restates_a_query_is_rejected_without_evaluation(question, candidate, gold, copied):
    engine = ScriptedEngine([f"<IMPROVED_VARIABLE>{candidate}</IMPROVED_VARIABLE>"])
    log: list[str] = []

    def evaluate(t):
        log.append(t)
        r = Rollout(0, 0, inputs={"question": question}, gold={"answer": gold},
                    instructions=[{"predictor": "p", "request": {}, "instruction": "Add."}],
                    outputs={"answer": "16"}, score=0.0, feedback=f"Expected {gold}.")
        return EvalResult(0.0, [0.0], [r])

    res = refine_optimal_reward("Be correct.", evaluate=evaluate, engine=engine, steps=1)
    assert res.value == "Be correct." and res.history[0]["error_kind"] == "copies_query"
    assert copied in res.history[0]["error"]
    assert log == ["Be correct."]  # the candidate was never evaluated
