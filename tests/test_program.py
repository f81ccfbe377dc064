"""QueryAwarePredict, instruction_context, install/attach and save/load of compiled programs."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil

import dspy
import pytest
from dspy.utils import DummyLM

from trprompt_dspy.backends.prompt_model.base import SFTExample
from trprompt_dspy.backends.prompt_model.fake import FakePromptModel
from trprompt_dspy.compiled.artifact import load_compiled, save_compiled
from trprompt_dspy.compiled.program import (
    InstructionCall,
    QueryAwarePredict,
    attach_prompt_model,
    clean_instruction,
    compose_instructions,
    describe_task,
    install_query_aware,
    instruction_context,
    query_aware_predictors,
    render_query,
)

REWARD = "The answer is correct and uses digits only."


class QA(dspy.Module):
    def __init__(self):
        super().__init__()
        self.qa = dspy.Predict("question -> answer")

    def forward(self, question):
        return self.qa(question=question)


class CoTProgram(dspy.Module):
    def __init__(self):
        super().__init__()
        self.cot = dspy.ChainOfThought("question -> answer")

    def forward(self, question):
        return self.cot(question=question)


class TwoStage(dspy.Module):
    def __init__(self):
        super().__init__()
        self.draft = dspy.Predict("question -> draft")
        self.final = dspy.ChainOfThought("question, draft -> answer")

    def forward(self, question):
        draft = self.draft(question=question).draft
        return self.final(question=question, draft=draft)


def system_message(lm: DummyLM, index: int = -1) -> str:
    return lm.history[index]["messages"][0]["content"]


@pytest.fixture
def qa_lm():
    lm = DummyLM({"## question ##": {"reasoning": "think", "answer": "4"}})
    dspy.configure(lm=lm)
    return lm


def test_instruction_reaches_system_message_and_prediction(qa_lm):
    pm = FakePromptModel(lambda req: f"Add the two numbers for {req.predictor}.")
    program = install_query_aware(QA(), prompt_model=pm, optimal_reward=REWARD)
    assert [n for n, _ in program.named_predictors()] == ["qa"]
    assert isinstance(program.qa, QueryAwarePredict) and program.qa.role == "qa"

    pred = program(question="2+2?")

    assert pred.answer == "4"
    assert pred.query_instruction == "Add the two numbers for qa."
    system = system_message(qa_lm)
    assert "Given the fields `question`, produce the fields `answer`." in system  # base instructions kept
    assert "Instruction for this input:" in system and "Add the two numbers for qa." in system
    [req] = pm.requests
    assert (req.predictor, req.query, req.reward) == ("qa", "question: 2+2?", REWARD)
    assert req.task == describe_task(program.qa.signature)
    assert program.qa.signature.instructions == dspy.Signature("question -> answer").instructions  # not mutated


def test_chain_of_thought_leaf(qa_lm):
    pm = FakePromptModel()
    program = install_query_aware(CoTProgram(), prompt_model=pm, optimal_reward=REWARD)
    assert [n for n, _ in program.named_predictors()] == ["cot.predict"]
    pred = program(question="What is 2+2?")
    assert pred.reasoning == "think" and pred.answer == "4"
    assert pred.query_instruction.startswith("Solve step by step. [cot.predict|")
    assert pred.query_instruction in system_message(qa_lm)
    assert pm.requests[0].task.startswith("question -> reasoning, answer")


def test_two_stage_program_each_predictor_gets_its_own_instruction():
    lm = DummyLM({"DRAFT-XYZ": {"reasoning": "r", "answer": "final"}, "## question ##": {"draft": "DRAFT-XYZ"}})
    dspy.configure(lm=lm)
    pm = FakePromptModel(lambda req: f"Guidance for {req.predictor}.")
    program = install_query_aware(TwoStage(), prompt_model=pm, optimal_reward=REWARD)
    assert [n for n, _ in program.named_predictors()] == ["draft", "final.predict"]

    pred = program(question="Q?")

    assert pred.answer == "final" and pred.query_instruction == "Guidance for final.predict."
    assert [r.predictor for r in pm.requests] == ["draft", "final.predict"]
    assert pm.requests[1].query == "question: Q?\ndraft: DRAFT-XYZ"
    assert "Guidance for draft." in system_message(lm, -2)
    assert "Guidance for final.predict." in system_message(lm, -1)


def test_select_predictors_and_bad_names():
    pm = FakePromptModel()
    program = install_query_aware(TwoStage(), prompt_model=pm, optimal_reward=REWARD, predictors=["final.predict"])
    assert [n for n, _ in query_aware_predictors(program)] == ["final.predict"]
    assert type(program.draft) is dspy.Predict
    with pytest.raises(ValueError, match=r"Unknown predictor name\(s\) \['nope'\].*'draft', 'final.predict'"):
        install_query_aware(TwoStage(), prompt_model=pm, optimal_reward=REWARD, predictors=["nope"])
    with pytest.raises(ValueError, match="generation has unknown key"):
        install_query_aware(QA(), prompt_model=pm, optimal_reward=REWARD, generation={"top_p": 0.9})
    with pytest.raises(ValueError, match=r"lacks a string for predictor\(s\) \['draft'\]"):
        install_query_aware(TwoStage(), prompt_model=pm, optimal_reward={"final.predict": "x"})


def test_bare_predict_returns_new_leaf(qa_lm):
    leaf = install_query_aware(dspy.Predict("question -> answer"), prompt_model=FakePromptModel(),
                               optimal_reward=REWARD)
    assert isinstance(leaf, QueryAwarePredict) and leaf.role == "self"
    assert leaf(question="1+3?").answer == "4"


def test_demos_lm_and_config_are_kept(qa_lm):
    program = QA()
    program.qa.demos = [dspy.Example(question="1+1?", answer="2")]
    program.qa.config = {"temperature": 0.3}
    own_lm = DummyLM({"## question ##": {"answer": "own"}})
    program.qa.lm = own_lm
    install_query_aware(program, prompt_model=FakePromptModel(), optimal_reward=REWARD)
    assert program.qa.demos[0].answer == "2" and program.qa.config == {"temperature": 0.3}
    assert program(question="2+2?").answer == "own"
    assert "1+1?" in json.dumps(own_lm.history[-1]["messages"])


def test_instruction_context_overrides_and_records(qa_lm):
    attached, override = FakePromptModel(template="attached"), FakePromptModel(template="override {reward}")
    program = install_query_aware(TwoStage(), prompt_model=attached, optimal_reward=REWARD)
    dspy.configure(lm=DummyLM({"DRAFT": {"reasoning": "r", "answer": "a"}, "## question ##": {"draft": "DRAFT"}}))
    calls: list[InstructionCall] = []
    outer = instruction_context(prompt_model=override, reward={"draft": "R-draft"}, temperature=0.7, seed=5,
                                recorder=calls)
    with outer, instruction_context(reward={"draft": "R-inner"}):  # nested: the inner one inherits the rest
        pred = program(question="Q?")
    assert attached.generate_calls == 0 and override.generate_calls == 2
    assert [(c.temperature, c.seed) for c in override.calls] == [(0.7, 5), (0.7, 5)]
    assert [c.predictor_name for c in calls] == ["draft", "final.predict"]
    assert calls[0].request.reward == "R-inner" and calls[1].request.reward == REWARD  # mapping falls back
    assert calls[1].instruction == pred.query_instruction and "(variant" in pred.query_instruction
    # Outside the block the attached model and greedy settings are back.
    program(question="Q?")
    assert attached.generate_calls == 2 and attached.calls[0].temperature == 0.0 and attached.calls[0].seed is None


def test_seeded_sampling_is_reproducible(qa_lm):
    program = install_query_aware(QA(), prompt_model=FakePromptModel(), optimal_reward=REWARD)
    outs = []
    for seed in (1, 1, 2):
        with instruction_context(temperature=1.0, seed=seed):
            outs.append(program(question="2+2?").query_instruction)
    assert outs[0] == outs[1] != outs[2]


def test_missing_prompt_model_is_a_clear_error(qa_lm):
    program = install_query_aware(QA(), prompt_model=None, optimal_reward=REWARD)
    with pytest.raises(RuntimeError, match="attach_prompt_model.*load_compiled"):
        program(question="2+2?")
    attach_prompt_model(program, FakePromptModel())
    assert program(question="2+2?").answer == "4"
    with pytest.raises(ValueError, match="has no QueryAwarePredict"):
        attach_prompt_model(QA(), FakePromptModel())
    with pytest.raises(TypeError, match="recorder must be a list"), instruction_context(recorder=()):
        pass


def test_empty_instruction_falls_back_to_base_instructions(qa_lm):
    program = install_query_aware(QA(), prompt_model=FakePromptModel(empty_if=lambda r: True), optimal_reward=REWARD)
    pred = program(question="2+2?")
    assert pred.query_instruction == "" and pred.answer == "4"
    assert "Instruction for this input" not in system_message(qa_lm)


def test_trace_step_rebuilds_the_request(qa_lm):
    program = install_query_aware(QA(), prompt_model=FakePromptModel(), optimal_reward=REWARD)
    calls: list[InstructionCall] = []
    with dspy.context(trace=[]), instruction_context(recorder=calls):
        pred = program(question="2+2?")
        trace = list(dspy.settings.trace)
    [(step_pred, inputs, out)] = trace
    assert step_pred is program.qa and out.query_instruction == pred.query_instruction
    assert step_pred.build_request(step_pred.signature, inputs) == calls[0].request


def test_async_acall(qa_lm):
    program = install_query_aware(dspy.ChainOfThought("question -> answer"),
                                  prompt_model=FakePromptModel(template="Async."), optimal_reward=REWARD)
    pred = asyncio.run(program.acall(question="2+2?"))
    assert pred.answer == "4" and pred.query_instruction == "Async."
    assert "Async." in system_message(qa_lm)


def test_pure_helpers():
    sig = dspy.Signature("question, context -> answer", "Answer briefly.")
    assert describe_task(sig) == "question, context -> answer\nInstructions: Answer briefly."
    query = render_query(sig, {"context": {"b": 1, "a": [2]}, "question": "Why?", "extra": "ignored"})
    assert query == 'question: Why?\ncontext: {"a": [2], "b": 1}'
    long = render_query(sig, {"question": "x" * 5000})
    assert len(long) < 2100 and long.endswith("[3000 more characters]")
    assert clean_instruction('  Instruction: "Add them."  ') == "Add them."
    assert len(clean_instruction("word " * 1000)) <= 1200
    assert compose_instructions("Base.", "") == "Base."
    assert compose_instructions("Base.", "Do X.") == "Base.\n\nInstruction for this input:\nDo X."


def test_copies_keep_state_and_share_prompt_model(qa_lm, tmp_path):
    pm = FakePromptModel()
    program = install_query_aware(CoTProgram(), prompt_model=pm, optimal_reward=REWARD,
                                  generation={"max_new_tokens": 64})
    program.cot.predict.demos = [dspy.Example(question="q", reasoning="r", answer="a")]
    for copy_ in (program.deepcopy(), program.reset_copy()):
        leaf = copy_.cot.predict
        assert isinstance(leaf, QueryAwarePredict) and leaf is not program.cot.predict
        assert leaf.prompt_model is pm and leaf.optimal_reward == REWARD and leaf.role == "cot.predict"
        assert leaf.generation == {"temperature": 0.0, "max_new_tokens": 64}
    assert program.reset_copy().cot.predict.demos == [] and len(program.deepcopy().cot.predict.demos) == 1
    # Plain DSPy JSON save/load keeps the extra state too.
    program.save(str(tmp_path / "p.json"))
    fresh = install_query_aware(CoTProgram(), prompt_model=pm, optimal_reward="other")
    fresh.load(str(tmp_path / "p.json"))
    assert fresh.cot.predict.optimal_reward == REWARD and fresh.cot.predict.generation["max_new_tokens"] == 64


def _trained_program(tmp_path, pm: FakePromptModel) -> TwoStage:
    program = install_query_aware(TwoStage(), prompt_model=pm, optimal_reward=REWARD)
    program(question="Q?")
    examples = [SFTExample(req, f"Trained instruction for {req.predictor}.", 1.0) for req in pm.requests]
    pm.train(examples, output_dir=tmp_path / "run" / "adapter_iter1")
    (tmp_path / "run" / "adapter_iter1" / "optimizer.bin").write_bytes(b"pickle-ish")
    return program


@pytest.fixture
def two_stage_lm():
    lm = DummyLM({"DRAFT-XYZ": {"reasoning": "r", "answer": "final"}, "## question ##": {"draft": "DRAFT-XYZ"}})
    dspy.configure(lm=lm)
    return lm


def test_save_load_round_trip(tmp_path, two_stage_lm):
    pm = FakePromptModel(memorize=True)
    program = _trained_program(tmp_path, pm)
    before = program(question="Q?")
    assert before.query_instruction == "Trained instruction for final.predict."

    out = save_compiled(program, tmp_path / "artifact")

    side = json.loads((out / "trprompt.json").read_text())
    assert side["format_version"] == 1 and side["adapter_path"] == "adapter"
    assert side["base_model"] == "fake/prompt-model" and side["optimal_reward"] == REWARD
    assert sorted(side["predictors"]) == ["draft", "final.predict"] and side["versions"]["dspy"] == dspy.__version__
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "fake_adapter.json"]
    assert str(tmp_path) not in (out / "trprompt.json").read_text()  # nothing absolute
    assert json.loads((out / "program.json").read_text())["draft"]["optimal_reward"] == REWARD

    fresh_pm = FakePromptModel(memorize=True)
    loaded = load_compiled(TwoStage(), out, prompt_model=fresh_pm)
    assert fresh_pm.adapter_path == str((out / "adapter").resolve())
    after = loaded(question="Q?")
    assert after.query_instruction == before.query_instruction and after.answer == "final"
    assert [r.reward for r in fresh_pm.requests] == [REWARD, REWARD]
    assert [n for n, _ in query_aware_predictors(loaded)] == ["draft", "final.predict"]

    seen = {}

    def factory(describe, adapter):
        seen.update(describe=describe, adapter=adapter)
        return FakePromptModel(memorize=True, base_model=describe["base_model"])

    via_factory = load_compiled(TwoStage(), out, prompt_model_factory=factory)
    assert seen["describe"]["backend"] == "fake" and seen["adapter"] == str((out / "adapter").resolve())
    assert via_factory(question="Q?").query_instruction == before.query_instruction

    unattached = load_compiled(TwoStage(), out)
    with pytest.raises(RuntimeError, match="attach_prompt_model"):
        unattached(question="Q?")


def test_load_into_wrong_program_class(tmp_path, two_stage_lm):
    out = save_compiled(_trained_program(tmp_path, FakePromptModel()), tmp_path / "artifact")
    program = QA()
    with pytest.raises(ValueError, match=r"predictor\(s\) \['draft', 'final.predict'\].*TwoStage"):
        load_compiled(program, out, prompt_model=FakePromptModel())
    assert type(program.qa) is dspy.Predict  # untouched


@pytest.mark.parametrize("bad, message", [
    ("../outside", "leaves the artifact folder"),
    ("/etc", "Refusing absolute adapter_path"),
    ("C:\\adapters\\x", "Refusing absolute adapter_path"),
])
def test_refuses_escaping_adapter_paths(tmp_path, two_stage_lm, bad, message):
    out = save_compiled(_trained_program(tmp_path, FakePromptModel()), tmp_path / "artifact")
    side = json.loads((out / "trprompt.json").read_text())
    side["adapter_path"] = bad
    (out / "trprompt.json").write_text(json.dumps(side))
    pm = FakePromptModel()
    with pytest.raises(ValueError, match=message):
        load_compiled(TwoStage(), out, prompt_model=pm)
    assert pm.adapter_path is None


def test_refuses_newer_format_and_warns_on_unknown_keys(tmp_path, two_stage_lm, caplog):
    out = save_compiled(_trained_program(tmp_path, FakePromptModel()), tmp_path / "artifact")
    side = json.loads((out / "trprompt.json").read_text())
    (out / "trprompt.json").write_text(json.dumps({**side, "format_version": 2}))
    with pytest.raises(ValueError, match="newer trprompt_dspy.*format_version 2.*Upgrade"):
        load_compiled(TwoStage(), out, prompt_model=FakePromptModel())
    (out / "trprompt.json").write_text(json.dumps({**side, "future_field": 1}))
    with caplog.at_level(logging.WARNING, logger="trprompt_dspy.compiled.program"):
        load_compiled(TwoStage(), out, prompt_model=FakePromptModel())
    assert "future_field" in caplog.text


def test_save_needs_query_aware_predictors_and_one_prompt_model(tmp_path):
    with pytest.raises(ValueError, match="has no QueryAwarePredict"):
        save_compiled(QA(), tmp_path / "x")
    program = install_query_aware(TwoStage(), prompt_model=None, optimal_reward=REWARD)
    with pytest.raises(ValueError, match="none is attached; pass prompt_model"):
        save_compiled(program, tmp_path / "x")
    out = save_compiled(program, tmp_path / "x", prompt_model=FakePromptModel())  # base model, no adapter
    assert json.loads((out / "trprompt.json").read_text())["adapter_path"] is None
    assert not (out / "adapter").exists()


def test_batch_does_not_serialise_prompt_model_calls(qa_lm):
    pm = FakePromptModel(delay=0.1)
    program = install_query_aware(QA(), prompt_model=pm, optimal_reward=REWARD)
    examples = [dspy.Example(question=f"{i}+1?").with_inputs("question") for i in range(8)]
    with instruction_context(reward="batched reward"):  # propagates into the batch workers
        results = program.batch(examples, num_threads=4, disable_progress_bar=True)
    assert [r.answer for r in results] == ["4"] * 8
    assert pm.generate_calls == 8 and pm.max_concurrency >= 2 and len(pm.thread_ids) >= 2
    assert {r.reward for r in pm.requests} == {"batched reward"}


def test_refuses_adapter_symlink_out_of_the_folder(tmp_path, two_stage_lm):
    out = save_compiled(_trained_program(tmp_path, FakePromptModel()), tmp_path / "artifact")
    shutil.rmtree(out / "adapter")
    (out / "adapter").symlink_to(tmp_path / "run" / "adapter_iter1", target_is_directory=True)
    with pytest.raises(ValueError, match="outside"):
        load_compiled(TwoStage(), out, prompt_model=FakePromptModel())


def test_prompt_model_is_runtime_only(qa_lm):
    import copy

    import cloudpickle

    pm = FakePromptModel()
    program = install_query_aware(QA(), prompt_model=pm, optimal_reward=REWARD)
    assert copy.copy(program.qa).prompt_model is pm
    restored = cloudpickle.loads(cloudpickle.dumps(program))  # e.g. save_program=True: the prompt model is not pickled
    assert restored.qa.prompt_model is None and restored.qa.optimal_reward == REWARD
    assert "prompt_model" not in program.qa.dump_state()
