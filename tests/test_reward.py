"""Tests for the answer-leak guard and the textual reward model."""

from __future__ import annotations

import dspy
import pytest
from dspy.utils import DummyLM

from trprompt_dspy.loop.answer_leaks import (
    REDACTED,
    gold_values_of,
    instruction_leaks_answer,
    leaks_answer,
    redact_answer_leaks,
)
from trprompt_dspy.loop.rollouts import Rollout
from trprompt_dspy.loop.textual_reward import TextualRewardModel

# ------------------------------------------------------------------------------------------ leak guard


@pytest.mark.parametrize(
    "text",
    ["The answer is 42.", "It is 42.0 here", "costs $42 in total", "got -42 instead", "It was 42.00.", "(42)"],
)
def test_numeric_gold_forms_are_redacted(text):
    clean, n = redact_answer_leaks(text, ["42"])
    assert n == 1
    assert "42" not in clean and REDACTED in clean


@pytest.mark.parametrize("text", ["142 apples", "4.2 km", "420 people", "42,000 dollars", "v1.42", "x42"])
def test_other_numbers_are_left_alone(text):
    assert redact_answer_leaks(text, ["42"]) == (text, 0)
    assert not leaks_answer(text, [42])


def test_thousands_separator_and_currency_gold():
    assert redact_answer_leaks("They earned 42,000 dollars.", ["42000"]) == (f"They earned {REDACTED} dollars.", 1)
    assert redact_answer_leaks("Total: $1,250.50 and 1250.5 again", ["$1,250.50"]) == (
        f"Total: {REDACTED} and {REDACTED} again", 2)
    assert leaks_answer("about 0.5 of it", ["0.50"])


def test_string_gold_is_case_insensitive_whole_word():
    clean, n = redact_answer_leaks("PARIS is right; paris again, not Parisian.", ["Paris"])
    assert n == 2
    assert clean == f"{REDACTED} is right; {REDACTED} again, not Parisian."
    assert not leaks_answer("a Parisian café", ["Paris"])


def test_gold_in_context_only_counts_as_stated_answer():
    query = "Tom has 3 bags with 4 apples each. How many bags does he have?"
    assert not leaks_answer("Start from the 3 bags mentioned.", ["3"], context=query)
    assert leaks_answer("So the answer is 3.", ["3"], context=query)
    assert leaks_answer("Total = 3", ["3"], context=query)
    assert leaks_answer("The correct answer, 3, was missed.", ["3"], context=query)
    clean, n = redact_answer_leaks("Use the 3 bags; the answer is 3.", ["3"], context=query)
    assert n == 1 and clean == f"Use the 3 bags; the answer is {REDACTED}."


def test_short_alpha_golds_only_match_after_an_answer_cue():
    assert not leaks_answer("A good instruction would help. No doubt.", ["A"])
    assert not leaks_answer("There is no need to hurry.", ["no"])
    assert leaks_answer("The correct option is (A).", ["A"])
    assert leaks_answer("The answer: no", ["no"])


def test_gold_values_of_example_lists_and_numbers():
    ex = dspy.Example(question="q", answer=42, aliases=["forty-two", " 42 "]).with_inputs("question")
    assert gold_values_of(ex) == ["42", "forty-two"]
    assert gold_values_of({"answer": None, "x": ""}) == []
    # a short string answer also leaks through its number
    assert leaks_answer("You need 12 more.", ["12 apples"])


def test_instruction_leak_filter():
    query = "question: What is 6 times 7?"
    assert not instruction_leaks_answer("Multiply 6 by 7 carefully and check.", ["42"], query=query)
    assert instruction_leaks_answer("Multiply 6 by 7 to get 42.", ["42"], query=query)
    assert not instruction_leaks_answer("", ["42"], query=query)
    assert not instruction_leaks_answer("anything", [], query=query)


# ------------------------------------------------------------------------------------------ reward model


def _rollout(**kw):
    base = dict(
        example_index=0, sample_index=0, inputs={"question": "What is 6 times 7?"}, gold={"answer": "42"},
        instructions=[{"predictor": "predict", "request": {"predictor": "predict", "task": "question -> answer",
                                                           "query": "question: What is 6 times 7?", "reward": "t0"},
                       "instruction": "Multiply the two numbers."}],
        outputs={"reasoning": "6*7 is 41", "answer": "41"},
        trace=[{"predictor": "predict", "inputs": {"question": "What is 6 times 7?"},
                "outputs": {"reasoning": "6*7 is 41", "answer": "41"}}],
        score=0.0, feedback="Expected a different number.",
    )
    base.update(kw)
    return Rollout(**base)


def test_reward_inputs_carry_everything_the_grader_needs():
    inputs = TextualRewardModel(DummyLM([{}])).reward_inputs(_rollout())
    assert inputs["query"] == "question: What is 6 times 7?"
    assert "Multiply the two numbers." in inputs["instructions_used"]
    assert "6*7 is 41" in inputs["program_output"] and "answer: 41" in inputs["program_output"]
    assert inputs["gold_answer"] == "answer: 42"
    assert inputs["metric_score"] == "0"
    assert inputs["metric_feedback"] == "Expected a different number."
    assert inputs["task"] == "question -> answer"


def test_score_rollouts_writes_redacted_rewards_and_prompt_forbids_the_answer():
    lm = DummyLM({"## query ##": {"textual_reward": "Wrong: the product is 42, not 41. Stress checking."}})
    rollouts = [_rollout(), _rollout(sample_index=1)]
    out = TextualRewardModel(lm).score_rollouts(rollouts, num_threads=2)
    assert out == rollouts
    for r in rollouts:
        assert r.reward == f"Wrong: the product is {REDACTED}, not 41. Stress checking."
        assert r.reward_redactions == 1 and r.reward_error is None
    messages = lm.history[-1]["messages"]
    system = messages[0]["content"]
    assert "NEVER state" in system and "textual_reward" in system
    assert "42" in messages[-1]["content"]  # the grader does see the gold answer


def test_score_rollouts_records_failures_instead_of_raising():
    lm = DummyLM({"## query ##": {"unrelated": "x"}})  # no textual_reward field -> parse error
    r = _rollout(reward="stale", reward_redactions=3)
    TextualRewardModel(lm).score_rollouts([r])
    assert r.reward is None and r.reward_redactions == 0
    assert r.reward_error is not None and "textual_reward" in r.reward_error


def test_reward_model_uses_settings_lm_at_call_time_and_errors_without_one():
    model = TextualRewardModel()
    with pytest.raises(RuntimeError, match="no LM"):
        model.score_rollouts([_rollout()])
    with dspy.context(lm=DummyLM({"## query ##": {"textual_reward": "Fine."}})):
        r = model.score_rollouts([_rollout()])[0]
    assert r.reward == "Fine."


def test_reward_model_validates_arguments():
    with pytest.raises(TypeError, match="dspy.LM"):
        TextualRewardModel("openai/gpt-4o")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_field_chars"):
        TextualRewardModel(None, max_field_chars=3)


def test_adapter_markers_copied_into_a_critique_are_removed():
    from trprompt_dspy.testing import scripted_lm

    lm = scripted_lm(lambda s, u: "[[ ## textual_reward ## ]]\nClear plan; it used every quantity. [[ ## completed ## ]]"
                     "\n\n[[ ## completed ## ]]", "reward")
    r = Rollout(example_index=0, sample_index=0, inputs={"question": "6*7?"}, gold={"answer": "42"},
                outputs={"answer": "41"}, score=0.0)
    TextualRewardModel(lm).score_rollouts([r])
    assert r.reward == "Clear plan; it used every quantity."
