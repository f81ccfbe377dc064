"""TRPromptOptimizer end to end with scripted LMs and the fake prompt model (fast, no torch)."""

from __future__ import annotations

import json
import re

import dspy
import pytest

from programs.math import MathCoT, PlanAndSolve
from tests.fakes import arithmetic_responder, instruction_following_responder, scripted_lm
from trprompt_dspy import TRPromptOptimizer
from trprompt_dspy.backends.prompt_model.fake import FakePromptModel
from trprompt_dspy.compiled.artifact import load_compiled, save_compiled
from trprompt_dspy.compiled.program import QueryAwarePredict, query_aware_predictors
from trprompt_dspy.config import DEFAULT_SIGNIFICANCE_LEVEL
from trprompt_dspy.runtime.checkpoint import LogDirMismatchError
from trprompt_dspy.testing import addition_examples

# 3 validation examples: even a 3 / 0 lead has sign-test p = 0.125, so the default significance_level (0.05)
# would return the student in every test here. These tests are about the loop; the significance tests set a level.
SMALL = dict(num_iterations=2, queries_per_iteration=3, prompts_per_query=2, textgrad_steps=1,
             textgrad_batch_size=2, val_size=3, significance_level=None)


def numeric_metric(example, pred, trace=None):
    return float(str(getattr(pred, "answer", "")).strip() == str(example.answer))


def feedback_metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
    ok = str(getattr(pred, "answer", "")).strip() == str(gold.answer)
    return dspy.Prediction(score=float(ok), feedback="FEEDBACK-MARKER: " + ("correct" if ok else "wrong sum"))




#: The fake prompt model's instructions hold it; the target answers right only when it sees it, so the
#: compiled program beats the plain student and no-regression selection returns the trained iteration.
MARKER = "state the sum"


@pytest.fixture
def lm():
    target = scripted_lm(instruction_following_responder(MARKER), "target")
    dspy.configure(lm=target)
    return target


def fake_pm() -> FakePromptModel:
    # no digits in the template: the leak guard would drop instructions whose hex digest holds the answer
    return FakePromptModel(template="Add the numbers carefully for {predictor}, then state the sum.")


def compile_small(tmp_path, pm=None, metric=numeric_metric, program=None, **kw):
    pm = pm or fake_pm()
    opt = TRPromptOptimizer(metric=metric, prompt_model=pm, log_dir=tmp_path / "log", display_progress=False,
                            **{**SMALL, **kw})
    compiled = opt.compile(program or MathCoT(), trainset=addition_examples(8), valset=addition_examples(3, start=50))
    return compiled, pm, opt


def test_compile_returns_query_aware_copy_and_stats(tmp_path, lm):
    student = MathCoT()
    compiled, pm, _ = compile_small(tmp_path, program=student)
    # the student is untouched, the compiled program is a different object with query-aware leaves
    assert type(student.cot.predict) is dspy.Predict
    assert [n for n, _ in compiled.named_predictors()] == ["cot.predict"]
    assert isinstance(compiled.cot.predict, QueryAwarePredict) and compiled._compiled
    pred = compiled(question="What is 20 + 22?")
    assert pred.answer == "42" and pred.query_instruction
    # the per-query instruction reached the target LM's system prompt
    assert pred.query_instruction in lm.engine.calls[-1][0]
    res = compiled.detailed_results
    assert len(res.iterations) == 2 and res.iterations[0].num_rollouts == 3 * 2
    assert res.baseline_score == 0.0 and res.best_score == 1.0
    assert res.selected == 0 and res.selected_score == 1.0 and res.val_size == 3
    assert len(pm.train_calls) == 2
    # accumulate=True by default: iteration 1 trains on both iterations' data
    assert len(pm.train_calls[1][0]) > len(pm.train_calls[0][0]) > 0
    assert res.lm_calls["reward"] >= 6 and res.lm_calls["target"] > 0 and res.lm_calls["textgrad"] > 0
    d = res.to_dict()
    assert json.loads(json.dumps(d))["seed"] == 0
    for f in ("rollouts.json", "sft.jsonl", "train.json", "refine.json", "val.json"):
        assert (tmp_path / "log" / "iter_000" / f).exists(), f


def test_textual_rewards_come_from_feedback_and_condition_training(tmp_path, lm):
    # The paper's recipe: the reward LM's critique alone, no "no instruction" candidate.
    compiled, pm, _ = compile_small(tmp_path, metric=feedback_metric, textual_rewards="critique", abstain=False)
    reward_prompts = [u for s, u in lm.engine.calls if "FEEDBACK-MARKER" in u]
    assert reward_prompts, "the metric's feedback text must reach the reward model"
    examples = pm.train_calls[0][0]
    # SFT examples are conditioned on the rollout's textual reward, not on t*
    assert {e.request.reward for e in examples} == {"The outcome was good: the arithmetic was handled step by step."}


def test_default_rewards_are_built_from_the_trace_and_never_contradict_the_metric(tmp_path, lm):
    from trprompt_dspy.backends.prompt_model.base import NO_INSTRUCTION
    from trprompt_dspy.loop.trace_reward import contradicts

    compiled, pm, _ = compile_small(tmp_path, metric=feedback_metric, num_iterations=1, textgrad_steps=0)
    examples = pm.train_calls[0][0]
    assert examples and all(e.request.reward.startswith("Verdict: the outcome was") for e in examples)
    assert not any(contradicts(e.request.reward, e.score) for e in examples)
    assert all("FEEDBACK-MARKER" in e.request.reward for e in examples), "the metric's feedback is part of it"
    # The student's own answers were computed once, kept, and are the "no instruction" candidates.
    students = (tmp_path / "log" / "student_rollouts.jsonl").read_text().splitlines()
    abstain = [e for e in examples if e.instruction == NO_INSTRUCTION]
    assert abstain and len(abstain) <= len(students)
    assert all("No instruction was added" in e.request.reward for e in abstain)
    instructed = [e for e in examples if e.instruction != NO_INSTRUCTION]
    assert instructed and all(any(w in e.request.reward for w in ("fixed", "broke", "kept", "left"))
                              for e in instructed)
    # The scripted reward LM calls every outcome good: its critique is kept only where the metric agrees.
    critique = "The outcome was good: the arithmetic was handled step by step."
    for e in instructed:
        assert (critique in e.request.reward) == (e.score >= 1.0)
    it = compiled.detailed_results.iterations[0]
    assert sum(it.against_student.values()) == it.num_rollouts
    assert it.abstention_rate is not None and 0.0 <= it.abstention_rate <= 1.0


def test_an_unparseable_reply_is_an_outcome_the_trace_built_reward_describes(tmp_path):
    from tests.fakes import ScriptedEngine

    follow = instruction_following_responder(MARKER)

    def target(system, user):  # on questions with an even first number an instruction makes the reply unparseable
        m = re.search(r"What is (\d+) \+", user)
        if "Instruction for this input" in system and m and int(m.group(1)) % 2 == 0:
            return "I cannot format this."
        return follow(system, user)

    dspy.configure(lm=dspy.LM("local/target", engine=ScriptedEngine(target), cache=False, num_retries=0))
    compiled, pm, _ = compile_small(tmp_path, metric=feedback_metric, num_iterations=1, textgrad_steps=0)
    examples = pm.train_calls[0][0]
    broken = [e for e in examples if "could not be parsed" in e.request.reward]
    assert broken, "a parse failure caused by the instruction must be trained on, not dropped"
    assert all(e.request.reward.startswith("Verdict: the outcome was incorrect") for e in broken)


def test_budget_knobs_reach_their_consumers(tmp_path, lm):
    compiled, pm, _ = compile_small(tmp_path, num_iterations=1, queries_per_iteration=4, prompts_per_query=3,
                                    textgrad_steps=0, sampling_temperature=0.7, seed=3,
                                    sft={"num_train_epochs": 3.0, "accumulate": False}, lora={"r": 4})
    res = compiled.detailed_results
    assert res.iterations[0].num_rollouts == 12 and res.lm_calls.get("textgrad", 0) == 0
    sampled = [c for c in pm.calls if c.temperature > 0]
    assert sampled and {c.temperature for c in sampled} == {0.7}
    examples, out_dir, seed = pm.train_calls[0]
    assert seed == 3 and len(examples) == 12 + 4  # 4 queries x 3 instructions, and "no instruction" per query
    meta = json.loads((tmp_path / "log" / "iter_000" / "train.json").read_text())
    assert meta["num_examples"] == 16


def test_seed_changes_sampled_queries(tmp_path, lm):
    def queries(seed):
        c, pm, _ = compile_small(tmp_path / str(seed), num_iterations=1, textgrad_steps=0, seed=seed)
        rs = json.loads((tmp_path / str(seed) / "log" / "iter_000" / "rollouts.json").read_text())
        return sorted(r["inputs"]["question"] for r in rs)

    assert queries(0) != queries(1)


def test_max_metric_calls_stops_early(tmp_path, lm):
    compiled, pm, _ = compile_small(tmp_path, num_iterations=5, max_metric_calls=12)
    assert 1 <= len(compiled.detailed_results.iterations) < 5


def test_multi_predictor_program_gets_instructions_for_every_predictor(tmp_path, lm):
    compiled, pm, _ = compile_small(tmp_path, program=PlanAndSolve(), num_iterations=1)
    names = [n for n, _ in query_aware_predictors(compiled)]
    assert names == ["plan", "solve.predict"]
    assert {r.predictor for r in pm.requests} >= {"plan", "solve.predict"}
    assert compiled(question="What is 1 + 2?").answer == "3"


def test_resume_reuses_finished_iterations(tmp_path, lm):
    first, _, _ = compile_small(tmp_path)
    calls_before = len(lm.engine.calls)
    pm2 = fake_pm()
    compiled, _, _ = compile_small(tmp_path, pm=pm2)
    # nothing is re-run: only the smoke test (1 call) touches the target again
    assert len(lm.engine.calls) - calls_before <= 1
    assert pm2.train_calls == [] and len(compiled.detailed_results.iterations) == 2
    # the tokens of the first run are carried over (state.json), and no reward was asked for again
    before, after = first.detailed_results.lm_tokens_by_role, compiled.detailed_results.lm_tokens_by_role
    assert after["reward"] == before["reward"] and after["textgrad"] == before["textgrad"]
    assert after["target"]["prompt_tokens"] >= before["target"]["prompt_tokens"] > 0


def test_log_dir_from_a_different_config_is_refused(tmp_path, lm):
    compile_small(tmp_path, num_iterations=1)
    with pytest.raises(LogDirMismatchError, match="budget"):
        compile_small(tmp_path, num_iterations=1, prompts_per_query=3)
    with pytest.raises(LogDirMismatchError, match="metric"):
        compile_small(tmp_path, num_iterations=1, metric=feedback_metric)


def test_a_finished_run_can_be_extended_with_more_iterations(tmp_path, lm):
    compile_small(tmp_path, num_iterations=1)
    pm = fake_pm()
    compiled, _, _ = compile_small(tmp_path, pm=pm, num_iterations=2)
    assert len(compiled.detailed_results.iterations) == 2
    assert len(pm.train_calls) == 1  # only the new iteration trained


def test_a_bare_predict_student_becomes_query_aware(tmp_path, lm):
    pm = fake_pm()
    opt = TRPromptOptimizer(metric=numeric_metric, prompt_model=pm, log_dir=tmp_path / "log",
                            display_progress=False, **{**SMALL, "num_iterations": 1})
    compiled = opt.compile(dspy.Predict("question -> answer"), trainset=addition_examples(8), valset=addition_examples(2, 50))
    assert isinstance(compiled, QueryAwarePredict)
    assert compiled(question="What is 2 + 3?").query_instruction


def test_stacking_on_another_optimizers_program_keeps_its_demos_and_instructions(tmp_path, lm):
    """Compiling a program another optimizer produced (demos + rewritten instructions) adds the per-query
    instruction on top: the demos and the base instruction still reach the target, the input is untouched."""
    base = MathCoT()
    base.cot.predict.demos = [dspy.Example(question="What is 1 + 1?", reasoning="1 plus 1.", answer="2")]
    base.cot.predict.signature = base.cot.predict.signature.with_instructions("BASE-INSTRUCTION: show the work.")
    compiled, _, _ = compile_small(tmp_path, program=base)
    assert compiled.detailed_results.selected == 0  # the trained iteration, not the student
    leaf = compiled.cot.predict
    assert isinstance(leaf, QueryAwarePredict) and [d.answer for d in leaf.demos] == ["2"]
    assert leaf.signature.instructions == "BASE-INSTRUCTION: show the work."  # the stored base is not rewritten
    pred = compiled(question="What is 20 + 22?")
    prompt = "\n".join(str(m) for m in lm.engine.calls[-1])
    assert pred.answer == "42" and "BASE-INSTRUCTION: show the work." in prompt and "What is 1 + 1?" in prompt
    assert pred.query_instruction in prompt
    assert prompt.index("BASE-INSTRUCTION") < prompt.index(pred.query_instruction)  # base first, then per query
    assert len(base.cot.predict.demos) == 1 and type(base.cot.predict) is dspy.Predict  # the base is untouched


def test_no_completed_iteration_returns_the_student(tmp_path, lm):
    compiled, pm, _ = compile_small(tmp_path, max_metric_calls=2)  # the baseline alone uses the budget
    assert compiled.detailed_results.best_iteration is None and compiled.detailed_results.iterations == ()
    assert type(compiled.cot.predict) is dspy.Predict


def test_a_fresh_run_does_not_inherit_the_previous_compiles_adapter(tmp_path, lm):
    pm = fake_pm()
    compile_small(tmp_path / "a", pm=pm, num_iterations=1)
    assert pm.adapter_path is not None
    start = len(pm.calls)
    compile_small(tmp_path / "b", pm=pm, num_iterations=1)
    first_sampled = next(c for c in pm.calls[start:] if c.temperature > 0)
    # run b's rollouts sampled from the initial (bare) prompt model, not from run a's adapter
    assert first_sampled.adapter_path is None


def test_save_and_load_round_trip(tmp_path, lm):
    compiled, pm, _ = compile_small(tmp_path, num_iterations=1)
    save_compiled(compiled, tmp_path / "artifact")
    fresh = load_compiled(MathCoT(), tmp_path / "artifact", prompt_model=pm)
    q = "What is 5 + 6?"
    assert fresh(question=q).query_instruction == compiled(question=q).query_instruction
    assert fresh.cot.predict.optimal_reward == compiled.cot.predict.optimal_reward


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(metric=lambda: 1, auto="light"), TypeError, "metric"),
    (dict(auto="extreme"), ValueError, "auto must be one of"),
    (dict(auto="light", num_iterations=2), ValueError, "either auto"),
    (dict(auto="light", min_improvement=-0.1), ValueError, "min_improvement"),
    (dict(num_iterations=-1), ValueError, "num_iterations"),
    (dict(auto="light", num_threads=0), ValueError, "num_threads"),
    (dict(auto="light", prompt_model=42), TypeError, "prompt_model"),
    (dict(auto="light", prompt_model="no-such-preset"), ValueError, "no-such-preset"),
    (dict(auto="light", reward_lm="gpt-4"), TypeError, "reward_lm"),
    (dict(auto="light", lora={"rank": 8}), ValueError, "Unknown LoRA"),
    (dict(auto="light", sft={"extra": {"max_seq_length": 9}}), ValueError, "max_length"),
    (dict(auto="light", initial_reward="  "), ValueError, "initial_reward"),
    (dict(auto="light", predictors="cot.predict"), TypeError, "predictors"),
    (dict(auto="light", predictors=[]), ValueError, "selects nothing"),
    (dict(auto="light", sampling_temperature=-1), ValueError, "sampling_temperature"),
    (dict(auto="light", seed=-5), ValueError, "seed"),
])
def test_constructor_rejects_bad_arguments(kwargs, exc, match):
    kwargs = {"metric": numeric_metric, **kwargs}
    with pytest.raises(exc, match=match):
        TRPromptOptimizer(prompt_model=kwargs.pop("prompt_model", FakePromptModel()), **kwargs)


@pytest.mark.parametrize("case,match", [
    ("empty", "trainset is empty"),
    ("no_inputs", "no input fields"),
    ("teacher", "teacher"),
    ("unknown_predictor", "not in the program"),
    ("one_example", "at least 2"),
])
def test_compile_rejects_bad_input_before_work(tmp_path, lm, case, match):
    pm = FakePromptModel()
    opt = TRPromptOptimizer(metric=numeric_metric, prompt_model=pm, log_dir=tmp_path, display_progress=False,
                            predictors=["nope"] if case == "unknown_predictor" else None, **SMALL)
    train = {"empty": [], "no_inputs": [dspy.Example(question="q", answer="1")],
             "one_example": addition_examples(1)}.get(case, addition_examples(4))
    with pytest.raises((ValueError, TypeError), match=match):
        opt.compile(MathCoT(), trainset=train, teacher=MathCoT() if case == "teacher" else None)
    assert pm.calls == [] and len(lm.engine.calls) == 0


def test_missing_lm_and_broken_metric_fail_fast(tmp_path):
    opt = TRPromptOptimizer(metric=numeric_metric, prompt_model=FakePromptModel(), log_dir=tmp_path / "a",
                            display_progress=False, **SMALL)
    with pytest.raises(ValueError, match="no LM"):
        opt.compile(MathCoT(), trainset=addition_examples(4))

    def nan_metric(example, pred, trace=None):
        return float("nan")

    dspy.configure(lm=scripted_lm(arithmetic_responder))
    opt = TRPromptOptimizer(metric=nan_metric, prompt_model=FakePromptModel(), log_dir=tmp_path / "b",
                            display_progress=False, **SMALL)
    with pytest.raises(ValueError, match="nan_metric"):
        opt.compile(MathCoT(), trainset=addition_examples(4))


def test_an_untrainable_prompt_model_is_refused_up_front():
    from trprompt_dspy.backends.prompt_model.lm_writer import LMInstructionWriter

    with pytest.raises(TypeError, match="cannot be fine-tuned"):
        TRPromptOptimizer(metric=numeric_metric, auto="light",
                          prompt_model=LMInstructionWriter(scripted_lm(arithmetic_responder)))


# -- no-regression selection: the student is candidate 0 ------------------------------------------------
@pytest.mark.parametrize("helps,margin,expected", [
    (True, 0.0, 0),           # the instructions fix every answer: the trained iteration is returned
    (True, 1.0, "student"),   # ... but not by more than a margin of 1.0
    (None, 0.0, "student"),   # a tie (the student is already right everywhere) keeps the student
    (False, 0.0, "student"),  # the instructions break every answer: the student is returned
])
def test_compile_never_returns_a_program_below_the_student_on_the_valset(tmp_path, helps, margin, expected):
    responder = arithmetic_responder if helps is None else instruction_following_responder(MARKER, helps=helps)
    dspy.configure(lm=scripted_lm(responder, "target"))
    student = MathCoT()
    compiled, _, _ = compile_small(tmp_path, program=student, min_improvement=margin)
    res = compiled.detailed_results
    assert res.selected == expected and compiled is not student
    assert res.selected_score >= res.baseline_score
    assert res.selected_score == (res.baseline_score if expected == "student" else res.best_score)
    assert len(res.iterations) == 2  # every iteration ran; selection only decides what is returned
    if expected == "student":
        assert type(compiled.cot.predict) is dspy.Predict and compiled._compiled
        assert "query_instruction" not in compiled(question="What is 2 + 3?")
    else:
        assert isinstance(compiled.cot.predict, QueryAwarePredict)
    # the returned program really scores what the record says on the valset
    score = dspy.Evaluate(devset=addition_examples(3, start=50), metric=numeric_metric, display_progress=False)(compiled)
    assert float(score.score) / 100 == res.selected_score


@pytest.mark.parametrize("level,expected", [
    (None, 0),          # a lead is enough: the iteration that fixes all 3 validation answers is returned
    (0.05, "student"),  # 3 better / 0 worse has p = 1/8: not evidence at 5 %
    (0.2, 0),           # ... but it is at 20 %
])
def test_significance_level_asks_the_valset_for_evidence_not_just_a_lead(tmp_path, level, expected):
    dspy.configure(lm=scripted_lm(instruction_following_responder(MARKER, helps=True), "target"))
    compiled, _, _ = compile_small(tmp_path, significance_level=level)
    res = compiled.detailed_results
    assert res.best_score == 1.0 > res.baseline_score == 0.0  # the same lead in every case
    assert res.selection_p_value == pytest.approx(0.125)      # recorded whether or not it decides
    assert res.selected == expected
    assert isinstance(compiled.cot.predict, QueryAwarePredict) == (expected != "student")
    assert json.loads(json.dumps(res.to_dict()))["selection_p_value"] == pytest.approx(0.125)


def test_the_default_asks_for_a_significant_lead():
    assert TRPromptOptimizer(metric=numeric_metric).significance_level == DEFAULT_SIGNIFICANCE_LEVEL == 0.05


@pytest.mark.parametrize("kw,match", [
    (dict(significance_level=0), r"would refuse every iteration: pass a level in \(0, 1\]"),
    (dict(significance_level=1.5), r"significance_level must be in \[0.0, 1.0\]"),
    (dict(significance_level="5%"), "significance_level must be a number"),
])
def test_significance_level_is_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        TRPromptOptimizer(metric=numeric_metric, auto="light", **kw)


def test_tokens_are_counted_per_role_and_add_up_to_the_per_model_totals(tmp_path, lm):
    # one LM object serves target, reward and TextGrad: per model name DSPy sees a single total
    compiled, _, _ = compile_small(tmp_path)
    res = compiled.detailed_results
    by_role, by_model = res.lm_tokens_by_role, res.lm_tokens
    assert set(by_role) == {"target", "reward", "textgrad"} and len(by_model) == 1
    for field in ("prompt_tokens", "completion_tokens"):
        assert all(usage[field] > 0 for usage in by_role.values())
        assert sum(usage[field] for usage in by_role.values()) == sum(u[field] for u in by_model.values())
    assert json.loads(json.dumps(res.to_dict()))["lm_tokens_by_role"] == by_role


def test_min_improvement_none_returns_the_best_iteration_even_below_the_student(tmp_path):
    dspy.configure(lm=scripted_lm(instruction_following_responder(MARKER, helps=False), "target"))
    compiled, _, _ = compile_small(tmp_path, min_improvement=None)
    res = compiled.detailed_results
    assert res.selected == 0 and res.best_score == 0.0 < res.baseline_score == 1.0
    assert isinstance(compiled.cot.predict, QueryAwarePredict)


def test_a_student_selection_saves_and_loads_as_the_plain_program(tmp_path):
    dspy.configure(lm=scripted_lm(arithmetic_responder, "target"))
    student = MathCoT()
    student.cot.predict.signature = student.cot.predict.signature.with_instructions("Custom student instructions.")
    compiled, _, _ = compile_small(tmp_path, program=student)
    assert compiled.detailed_results.selected == "student"
    assert compiled.cot.predict.signature.instructions == "Custom student instructions."  # kept as given
    save_compiled(compiled, tmp_path / "artifact")
    side = json.loads((tmp_path / "artifact" / "trprompt.json").read_text())
    assert side["selected"] == "student" and side["predictors"] == {} and side["adapter_path"] is None
    loaded = load_compiled(MathCoT(), tmp_path / "artifact")
    assert type(loaded.cot.predict) is dspy.Predict
    assert loaded.cot.predict.signature.instructions == "Custom student instructions."
    assert loaded(question="What is 2 + 3?").answer == "5"


def test_no_budget_argument_means_auto_light():
    from trprompt_dspy.config import AUTO_BUDGETS, DEFAULT_AUTO

    opt = TRPromptOptimizer(metric=numeric_metric)
    assert DEFAULT_AUTO == "light" and opt.budget.__dict__ == {**AUTO_BUDGETS["light"], "max_metric_calls": None}
    assert opt.budget.val_size >= 50


# -- verdict-grounded textual rewards --------------------------------------------------------------------
def test_reward_verdict_grounds_the_sft_rewards_and_the_trained_conditioning(tmp_path, lm):
    from trprompt_dspy.loop.textual_reward import CORRECT_VERDICT, with_verdict
    from trprompt_dspy.optimizer import DEFAULT_INITIAL_REWARD

    compiled, pm, _ = compile_small(tmp_path, metric=feedback_metric, reward_verdict=True, textual_rewards="critique",
                                    abstain=False)
    critique = "The outcome was good: the arithmetic was handled step by step."  # the scripted reward LM's
    examples = pm.train_calls[0][0]
    assert examples and {e.request.reward for e in examples} == {with_verdict(critique, e.score) for e in examples}
    # iteration 0's untrained model sees t*_0 alone; once trained, it is conditioned on the correct verdict first
    def conditioning(k):
        saved = json.loads((tmp_path / "log" / f"iter_{k:03d}" / "rollouts.json").read_text())
        return {c["request"]["reward"] for r in saved for c in r["instructions"]}

    assert conditioning(0) == {DEFAULT_INITIAL_REWARD}
    t_after_0 = compiled.detailed_results.iterations[0].t_star
    assert conditioning(1) == {f"{CORRECT_VERDICT} {t_after_0}"}
    res = compiled.detailed_results
    for _, p in query_aware_predictors(compiled):
        assert p.optimal_reward == f"{CORRECT_VERDICT} {res.iterations[res.selected].t_star}"
    # the option is part of the run's fingerprint: a plain run cannot resume this log_dir
    with pytest.raises(LogDirMismatchError, match="algorithm"):
        compile_small(tmp_path, metric=feedback_metric)


def test_reward_verdict_must_be_a_bool():
    with pytest.raises(TypeError, match="reward_verdict must be True or False"):
        TRPromptOptimizer(metric=numeric_metric, reward_verdict="yes")


def test_balanced_sft_trains_on_as_many_good_outcomes_as_bad(tmp_path, lm):
    # the instruction holds the marker (so the target answers right) when the first operand is a multiple of 4
    def writer(req):
        first = int(re.search(r"\d+", req.query).group())
        return "Add carefully, then state the sum." if first % 4 == 0 else "Add the numbers carefully."

    plain, pm_plain, _ = compile_small(tmp_path / "plain", pm=FakePromptModel(writer), num_iterations=1,
                                       queries_per_iteration=6, textgrad_steps=0)
    unbalanced = [e.score for e in pm_plain.train_calls[0][0]]
    assert unbalanced.count(1.0) != unbalanced.count(0.0)  # the data to balance
    _, pm, _ = compile_small(tmp_path / "balanced", pm=FakePromptModel(writer), num_iterations=1,
                             queries_per_iteration=6, textgrad_steps=0, sft={"balance": True})
    scores = [e.score for e in pm.train_calls[0][0]]
    assert scores.count(1.0) == scores.count(0.0) == min(unbalanced.count(1.0), unbalanced.count(0.0)) > 0
    saved = (tmp_path / "balanced" / "log" / "iter_000" / "sft.jsonl").read_text().splitlines()
    assert len(saved) == len(scores)


# -- TextGrad acceptance on validation -------------------------------------------------------------------
@pytest.mark.parametrize("acceptance", ["minibatch", "validation"])
def test_textgrad_acceptance_on_validation_takes_back_a_t_star_that_loses_on_the_valset(tmp_path, lm, monkeypatch,
                                                                                       acceptance):
    import trprompt_dspy.loop.refine_reward as refine_module

    bad = "CANDIDATE: answer as briefly as possible."

    def refine(t_star, **kw):  # a TextGrad step that won its minibatch with a t* that breaks every answer
        return refine_module.RefineResult(bad, True, [{"step": 1, "accepted": True, "error": None}], 0.5, 1.0)

    monkeypatch.setattr(refine_module, "refine_optimal_reward", refine)
    # the instruction holds the marker (so the target answers right) unless Π is conditioned on the candidate
    pm = FakePromptModel(lambda req: "Add the numbers." if "CANDIDATE" in req.reward else
                         "Add the numbers carefully, then state the sum.")
    compiled, _, _ = compile_small(tmp_path, pm=pm, num_iterations=1, textgrad_acceptance=acceptance,
                                   textual_rewards="critique", abstain=False)
    res = compiled.detailed_results
    (it,) = res.iterations
    val = json.loads((tmp_path / "log" / "iter_000" / "val.json").read_text())
    if acceptance == "validation":
        assert it.t_star != bad and not it.t_star_accepted and it.val_score == 1.0
        assert [c["score"] for c in val["t_star_candidates"]] == [0.0, 1.0] and val["t_star"] == it.t_star
        assert res.selected == 0  # the iteration with its previous t* beats the student
        assert all(p.optimal_reward == it.t_star for _, p in query_aware_predictors(compiled))
    else:
        assert it.t_star == bad and it.t_star_accepted and it.val_score == 0.0 and "t_star_candidates" not in val
        assert res.selected == "student"
    # resuming the finished run keeps the decision that validation made
    again, _, _ = compile_small(tmp_path, pm=pm, num_iterations=1, textgrad_acceptance=acceptance,
                                textual_rewards="critique", abstain=False)
    assert again.detailed_results.iterations[0].t_star == it.t_star


def test_textgrad_acceptance_must_be_a_known_rule():
    with pytest.raises(ValueError, match="textgrad_acceptance must be one of 'minibatch', 'validation'"):
        TRPromptOptimizer(metric=numeric_metric, textgrad_acceptance="valset")


def test_the_selection_log_counts_the_valset_examples_the_iteration_won_and_lost(tmp_path, lm, caplog):
    with caplog.at_level("INFO", logger="trprompt_dspy.loop.selection"):
        compiled, _, _ = compile_small(tmp_path, num_iterations=1)
    assert compiled.detailed_results.selected == 0
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Selected iteration")]
    assert line.endswith("vs the student's 0.000 (3 examples better, 0 worse); one-sided sign test p = 0.125.")
