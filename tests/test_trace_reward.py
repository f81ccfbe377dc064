"""Trace-built textual rewards, the reward LM's critique filter, and "no instruction" as a candidate."""

from __future__ import annotations

import pytest

from trprompt_dspy.backends.prompt_model.base import NO_INSTRUCTION, SYSTEM_PROMPT, is_no_instruction
from trprompt_dspy.compiled.program import clean_instruction, compose_instructions
from trprompt_dspy.loop.rollouts import Rollout
from trprompt_dspy.loop.sft_data import build_sft_examples
from trprompt_dspy.loop.student_reference import (
    apply_trace_rewards,
    count_against_student,
    merge_critiques,
    no_instruction_candidates,
)
from trprompt_dspy.loop.trace_reward import (
    change_against_student,
    claims_correct,
    contradicts,
    is_restatement,
    merge_critique,
    outcome_change,
    trace_reward,
)

REQ = {"predictor": "predict", "task": "question -> answer", "query": "question: 6*7?", "reward": "t0"}


def _r(score: float, instruction: str | None = "Multiply carefully.", **kw) -> Rollout:
    calls = [] if instruction is None else [{"predictor": "predict", "request": dict(REQ), "instruction": instruction}]
    return Rollout(example_index=0, sample_index=0, inputs={"question": "6*7?"}, gold={"answer": "42"},
                   outputs={"answer": "42" if score else "41"}, score=score, instructions=calls, **kw)


@pytest.mark.parametrize(("student", "cand", "word", "sentence"), [
    (0.0, 1.0, "fixed", "fixed the program's own wrong answer"),
    (1.0, 0.0, "broke", "broke the program's own correct answer"),
    (1.0, 1.0, "kept", "kept the program's own correct answer correct"),
    (0.0, 0.0, "left_wrong", "left the program's own wrong answer wrong"),
])
def test_trace_reward_starts_with_the_verdict_and_says_what_changed(student, cand, word, sentence):
    r = _r(cand, feedback="Expected 42, got 41." if not cand else "Correct: 42.")
    text = trace_reward(r, _r(student, instruction=None))
    assert text.startswith(f"Verdict: the outcome was {'correct' if cand else 'incorrect'} (metric score")
    assert sentence in text
    assert outcome_change(r, _r(student, instruction=None)) == word
    assert "42" not in text, "the gold answer must be redacted from the metric feedback"
    assert "Metric feedback:" in text
    assert not contradicts(text, r.score)


def test_no_instruction_candidate_and_failures_are_described():
    student = _r(0.0, instruction=None, error="program raised AdapterParseError: x", error_kind="parse_error")
    text = trace_reward(student, student)
    assert "No instruction was added: on its own the program answers this query wrongly." in text
    assert "could not be parsed" in text
    # An abstained instructed rollout (empty instruction) is a "no instruction" outcome too.
    assert change_against_student(_r(1.0, instruction=""), None).startswith("No instruction was added")
    # Without the student's answer the change sentence is left out, the verdict stays.
    assert trace_reward(_r(1.0), None).startswith("Verdict: the outcome was correct")


def test_contradiction_and_restatement_detectors():
    assert claims_correct("The program's output is correct and well reasoned.") is True
    assert claims_correct("The output is incorrect.") is False
    assert contradicts("The program's output is correct.", 0.0)
    assert not contradicts("The program's output is correct.", 1.0)
    assert contradicts("The answer is wrong.", 1.0)
    r = Rollout(example_index=0, sample_index=0, inputs={"question": "Roselyn had 20 books and gave away 8."},
                gold={"answer": "12", "gold_code": "books = 20 - 8"}, outputs={"answer": "12"})
    assert is_restatement("Roselyn had [redacted] books before.", r)
    assert is_restatement("8 x 30 = <<8*30=240>>240 minutes", r)
    assert not is_restatement("It subtracted before converting the weekly rate into a daily one.", r)


def test_merge_critique_keeps_only_consistent_informative_critiques():
    wrong = _r(0.0)
    floor = trace_reward(wrong, _r(1.0, instruction=None))
    assert merge_critique(floor, "The program's output is correct.", wrong) == (floor, "contradicts")
    assert merge_critique(floor, "6*7? The answer 41.", wrong) == (floor, "restates")
    assert merge_critique(floor, None, wrong) == (floor, "none")
    merged, why = merge_critique(floor, "Incorrect: it added instead of multiplying; stress the operation word.", wrong)
    assert why == "added" and merged.startswith(floor) and "instead of multiplying" in merged


def test_no_instruction_is_the_abstention_and_runs_the_original_prompt():
    assert NO_INSTRUCTION in SYSTEM_PROMPT
    assert is_no_instruction(NO_INSTRUCTION) and is_no_instruction(" (No instruction). ")
    assert not is_no_instruction("Use no instruction words.")
    assert clean_instruction(f'Instruction: "{NO_INSTRUCTION}"') == ""
    assert compose_instructions("Solve it.", clean_instruction(NO_INSTRUCTION)) == "Solve it."


def test_sft_turns_empty_instructions_into_no_instruction_examples_only_with_abstain():
    cand = _r(1.0, instruction="")
    cand.reward = "Verdict: the outcome was correct (metric score 1). No instruction was added."
    with_abstain, _ = build_sft_examples([cand], abstain=True)
    without, _ = build_sft_examples([cand], abstain=False)
    assert [e.instruction for e in with_abstain] == [NO_INSTRUCTION]
    assert with_abstain[0].request.reward == cand.reward
    assert len(without) == 0 and without.num_empty == 1


def _at(r: Rollout, example: int, sample: int = 0) -> Rollout:
    r.example_index, r.sample_index = example, sample
    return r


def test_no_instruction_candidates_copy_the_students_run_with_empty_instructions_in_the_last_slot():
    live = [_at(_r(1.0), 0), _at(_r(0.0), 0, 1), _at(_r(1.0), 1), _at(_r(1.0), 2)]
    live[0].conditioned_on = "t*"
    students = {0: _at(_r(0.0, instruction=None), 0),
                1: _at(_r(0.0, instruction=None, error="boom", error_kind="server_error"), 1),
                2: _at(_r(0.0, instruction=None, error="cut", error_kind="truncated"), 2)}
    out = no_instruction_candidates(live, students, slot=2)
    # one per query (the first instructed run's requests), none where the student's run failed for the server
    assert [(c.example_index, c.sample_index) for c in out] == [(0, 2), (2, 2)]
    assert out[0].score == 0.0 and out[0].outputs == {"answer": "41"} and out[0].conditioned_on == "t*"
    assert [c["instruction"] for c in out[0].instructions] == [""] and out[0].instructions[0]["request"] == REQ
    assert students[0].sample_index == 0 and students[0].instructions == []  # the cached reference is untouched


def test_count_against_student_counts_only_instructed_runs_with_a_reference():
    students = {0: _at(_r(0.0, instruction=None), 0), 1: _at(_r(1.0, instruction=None), 1)}
    live = [_at(_r(1.0), 0), _at(_r(0.0), 1), _at(_r(1.0, instruction=""), 1, 1),
            _at(_r(1.0), 0, 2),  # the "no instruction" slot: not an instructed run
            _at(_r(1.0), 5)]  # no student reference
    assert count_against_student(live, students, prompts_per_query=2) == {
        "fixed": 1, "broke": 1, "kept": 0, "left_wrong": 0, "abstained": 1}


def test_trace_rewards_then_critiques_merge_in_place_and_report_failures():
    students = {0: _at(_r(1.0, instruction=None), 0)}
    live = [_at(_r(0.0), 0), _at(_r(0.0), 0, 1)]
    live[0].reward_error, live[0].reward_error_kind = "old", "timeout"
    apply_trace_rewards(live, students)
    floor = trace_reward(live[0], students[0])
    assert [r.reward for r in live] == [floor, floor] and live[0].reward_error is None
    good, failed = _at(_r(0.0), 0), _at(_r(0.0), 0, 1)
    good.reward, good.reward_redactions = "Incorrect: it added instead of multiplying; stress the operation.", 1
    failed.reward, failed.reward_error, failed.reward_error_kind = None, "HTTP 500", "server_error"
    why, kinds = merge_critiques(live, [good, failed])
    assert why == {"added": 1, "failed": 1} and kinds == ["server_error"]
    assert live[0].reward.startswith(floor) and "instead of multiplying" in live[0].reward
    assert live[0].reward_redactions == 1 and live[1].reward == floor
