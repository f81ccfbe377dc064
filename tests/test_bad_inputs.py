"""Bad input -> a clear error (what was wrong and how to fix it), raised before any expensive work.

One table: each case builds the bad input, and the test checks the exception type, that the message
names what was wrong (``what``) and says how to fix it (``how``), and, for compile-time cases, that no
rollout, fine-tune or (for cases that need no program run) LM call happened first.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dspy
import pytest

from programs.math import MathCoT, PlanAndSolve
from tests.fakes import arithmetic_responder, scripted_lm
from trprompt_dspy import TRPromptOptimizer
from trprompt_dspy.backends.prompt_model.base import InstructionRequest, SFTExample
from trprompt_dspy.backends.prompt_model.fake import FakePromptModel
from trprompt_dspy.compiled.artifact import load_compiled, save_compiled
from trprompt_dspy.compiled.program import install_query_aware
from trprompt_dspy.loop.metric_adapter import MetricValueError
from trprompt_dspy.models.presets import UnknownModelError
from trprompt_dspy.runtime.checkpoint import LogDirMismatchError
from trprompt_dspy.runtime.validation import InputFieldMismatchError, check_input_fields, program_inputs
from trprompt_dspy.serving.http import ServerUnreachableError
from trprompt_dspy.testing import addition_examples

SMALL = dict(num_iterations=1, queries_per_iteration=2, prompts_per_query=1, textgrad_steps=0, val_size=2)


def metric(example, pred, trace=None):
    return float(pred.answer == example.answer)




def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Env:
    tmp: Path
    lm: dspy.LM
    pm: FakePromptModel
    artifact: Path

    def opt(self, **kw) -> TRPromptOptimizer:
        args = dict(metric=metric, prompt_model=self.pm, log_dir=self.tmp / "log", display_progress=False, **SMALL)
        args.update(kw)
        return TRPromptOptimizer(**args)

    def compile(self, program=None, trainset=None, **kw) -> dspy.Module:
        return self.opt(**kw).compile(program or MathCoT(), trainset=addition_examples(6) if trainset is None else trainset)

    def edit_artifact(self, fn: Callable[[Path], None]) -> Path:
        folder = self.tmp / "artifact_copy"
        shutil.copytree(self.artifact, folder)
        fn(folder)
        return folder

    def load(self, fn: Callable[[Path], None]) -> None:
        load_compiled(MathCoT(), self.edit_artifact(fn), prompt_model=FakePromptModel())


def _sidecar(**changes):
    def edit(folder: Path) -> None:
        side = json.loads((folder / "trprompt.json").read_text())
        side.update(changes)
        (folder / "trprompt.json").write_text(json.dumps(side))
    return edit


def _nan_metric(example, pred, trace=None):
    return float("nan")


def _none_metric(example, pred, trace=None):
    return None


def _raising_metric(example, pred, trace=None):
    return pred.final_answer == example.answer  # no such output field


class NoPredictors(dspy.Module):
    def forward(self, question):
        return dspy.Prediction(answer=question)


class RecallThenAnswer(dspy.Module):
    """Two predictors; the second consumes the first one's output, so only ``question`` comes from the example."""

    def __init__(self):
        super().__init__()
        self.recall = dspy.Predict("question -> context")
        self.answer = dspy.ChainOfThought("context, question -> answer")

    def forward(self, question):
        context = self.recall(question=question).context
        return self.answer(context=context, question=question)


class RetrieveThenAnswer(dspy.Module):
    """Forward takes only ``**kwargs`` and makes ``context`` itself: the predictors' inputs are only a guess."""

    def __init__(self):
        super().__init__()
        self.rewrite = dspy.Predict("question -> query")
        self.answer = dspy.Predict("context, question -> answer")

    def forward(self, **kwargs):
        query = self.rewrite(**kwargs).query
        return self.answer(context=f"documents about {query}", **kwargs)


def q_examples(n: int = 4) -> list[dspy.Example]:
    """The issue's trainset: ``q`` where the program is called with ``question``."""
    return [dspy.Example(q=ex.question, answer=ex.answer).with_inputs("q") for ex in addition_examples(n)]


def _mismatch(env: Env, **second) -> None:
    env.compile()
    env.compile(**second)


def _no_lm(env: Env) -> None:
    dspy.configure(lm=None)
    env.compile()


def _unreachable_target(env: Env) -> None:
    dspy.configure(lm=dspy.LM("openai/served", api_base=f"http://127.0.0.1:{unused_port()}/v1", api_key="EMPTY"))
    env.compile()


def _unwritable_log_dir(env: Env) -> None:
    (env.tmp / "a_file").write_text("x")
    env.compile(log_dir=env.tmp / "a_file" / "log")


def _corrupt_run_json(env: Env) -> None:
    (env.tmp / "log").mkdir()
    (env.tmp / "log" / "run.json").write_text('{"format_version": 1, "fingerp')
    env.compile()


def _newer_run_json(env: Env) -> None:
    (env.tmp / "log").mkdir()
    (env.tmp / "log" / "run.json").write_text(json.dumps({"format_version": 99, "fingerprint": {}}))
    env.compile()


@dataclass
class Case:
    id: str
    run: Callable[[Env], object]
    exc: type[BaseException]
    what: str
    how: str
    no_lm_calls: bool = True


CASES = [
    # --- constructor: budget, knobs, models
    Case("negative min_improvement", lambda e: TRPromptOptimizer(metric=metric, min_improvement=-1), ValueError,
         "min_improvement must be in", r"\[0.0, None\]"),
    Case("unknown auto", lambda e: e.opt(auto="extreme", **{k: None for k in SMALL}), ValueError,
         "auto must be one of.*'extreme'", r"\['heavy', 'light', 'medium'\]"),
    Case("conflicting budget knobs", lambda e: TRPromptOptimizer(metric=metric, auto="light", num_iterations=3),
         ValueError, "auto='light' and num_iterations=3", "either auto=... or explicit counts"),
    Case("zero iterations", lambda e: e.opt(num_iterations=0), ValueError, "got 0", "integer >= 1"),
    Case("negative prompts per query", lambda e: e.opt(prompts_per_query=-2), ValueError, "prompts_per_query.*-2",
         "integer >= 1"),
    Case("zero threads", lambda e: e.opt(num_threads=0), ValueError, "num_threads=0", "integer >= 1"),
    Case("zero metric-call budget", lambda e: e.opt(max_metric_calls=0), ValueError, "max_metric_calls.*got 0",
         "positive integer"),
    Case("negative retries", lambda e: e.opt(max_retries=-1), ValueError, "max_retries=-1", "integer >= 0"),
    Case("error budget above 1", lambda e: e.opt(max_error_rate=1.5), ValueError, "max_error_rate=1.5",
         r"fraction in \[0, 1\]"),
    Case("metric with wrong arity", lambda e: e.opt(metric=lambda pred: 1.0), TypeError,
         r"signature \(pred\)", r"def metric\(example, pred, trace=None\)"),
    Case("metric not callable", lambda e: e.opt(metric="accuracy"), TypeError, "'accuracy'",
         r"callable metric\(example, pred, trace=None\)"),
    Case("unknown preset", lambda e: e.opt(prompt_model="smollm-9000"), UnknownModelError, "smollm-9000",
         "smollm2-135m-instruct"),
    Case("missing model path", lambda e: e.opt(prompt_model=str(e.tmp / "models" / "nope")), FileNotFoundError,
         "does not exist", "existing model folder"),
    Case("prompt model of the wrong type", lambda e: e.opt(prompt_model=42), TypeError, "got int",
         "HFPromptModel"),
    Case("reward_lm given as a string", lambda e: e.opt(reward_lm="gpt-4o"), TypeError, "got str",
         r"dspy.LM"),
    Case("unknown LoRA key", lambda e: e.opt(lora={"rank": 8}), ValueError, r"\['rank'\]", "Valid keys"),
    Case("log_dir is a file", lambda e: (e.tmp / "f").write_text("x") and e.opt(log_dir=e.tmp / "f"), ValueError,
         "exists and is not a folder", "pass a folder path"),
    # --- compile: data, program, metric, LMs, log_dir
    Case("empty trainset", lambda e: e.compile(trainset=[]), ValueError, "trainset is empty",
         r"with_inputs\('question'\)"),
    Case("trainset not a list", lambda e: e.compile(trainset={"q": 1}), TypeError, "got dict",
         "list of dspy.Example"),
    Case("examples without inputs", lambda e: e.compile(trainset=[dspy.Example(question="q", answer="1")] * 3),
         ValueError, r"trainset\[0\] has no input fields", r"Call .with_inputs"),
    Case("examples without gold labels", lambda e: e.compile(trainset=[dspy.Example(question="q").with_inputs(
        "question")] * 3), ValueError, "no gold label fields", "add e.g. answer="),
    Case("input field named q, program wants question", lambda e: e.compile(
        program=dspy.ChainOfThought("question -> answer"), trainset=q_examples()), InputFieldMismatchError,
         r"trainset\[0\] lacks the input field\(s\) \['question'\].*input keys are \['q'\].*4 of 4",
         r"Rename 'q' to 'question'.*dspy.Example\(question=..., answer=...\).with_inputs\('question'\)"),
    Case("input field mismatch, two predictors", lambda e: e.compile(program=RecallThenAnswer(), trainset=q_examples()),
         InputFieldMismatchError, r"\['question'\].*RecallThenAnswer.forward\(question\).*input keys are \['q'\]",
         r"with_inputs\('question'\)"),
    Case("input field mismatch in the valset only", lambda e: e.opt().compile(
        MathCoT(), trainset=addition_examples(6), valset=q_examples(2)), InputFieldMismatchError,
         r"valset\[0\] lacks.*\['question'\]", r"with_inputs\('question'\)"),
    Case("gold label marked as the only input", lambda e: e.compile(trainset=[dspy.Example(
        q="1 + 2?", question="1 + 2?", answer="3").with_inputs("q")] * 3), InputFieldMismatchError,
         r"\['question'\].*all keys: \['answer', 'q', 'question'\]", r"call .with_inputs\('question'\)"),
    Case("input the forward does not take", lambda e: e.compile(trainset=[dspy.Example(
        question="1 + 2?", id="7", answer="3").with_inputs("question", "id")] * 3), InputFieldMismatchError,
         r"marks \['id'\] as inputs, but MathCoT.forward\(question\) takes no such argument",
         r"with_inputs\('question'\)"),
    Case("guessed inputs, none provided", lambda e: e.compile(program=RetrieveThenAnswer(), trainset=q_examples()),
         InputFieldMismatchError, r"\['question', 'context'\].*predictors of RetrieveThenAnswer.*input keys are \['q'\]",
         r"with_inputs\('question', 'context'\).*def forward\(self, question\)"),
    Case("program without predictors", lambda e: e.compile(program=NoPredictors()), ValueError,
         "NoPredictors has no predictors", r"dspy.Predict / ChainOfThought"),
    Case("unknown predictor name", lambda e: e.compile(predictors=["nope"]), ValueError,
         r"\['nope'\] are not in the program", r"its predictors are \['cot.predict'\]"),
    Case("no LM configured", _no_lm, ValueError, "The student has no LM", r"dspy.configure\(lm="),
    Case("unreachable server URL", _unreachable_target, ServerUnreachableError,
         "Cannot reach the target LM server at http://127.0.0.1", "Start the server"),
    Case("unreachable reward server", lambda e: e.compile(reward_lm=dspy.LM(
        "openai/r", api_base=f"http://127.0.0.1:{unused_port()}/v1", api_key="E")), ServerUnreachableError,
         "reward_lm server.*connection refused", "fix api_base"),
    Case("metric that raises", lambda e: e.compile(metric=_raising_metric), ValueError,
         "_raising_metric' raised AttributeError", "fix it, e.g. return 0.0", no_lm_calls=False),
    Case("metric returning NaN", lambda e: e.compile(metric=_nan_metric), MetricValueError, "non-finite score nan",
         "return 0.0 instead", no_lm_calls=False),
    Case("metric returning None", lambda e: e.compile(metric=_none_metric), MetricValueError, "a score of None",
         "return 0.0", no_lm_calls=False),
    Case("unwritable log_dir", _unwritable_log_dir, PermissionError, "is not writable",
         "Pass a folder you can write to"),
    Case("log_dir of another program", lambda e: _mismatch(e, program=PlanAndSolve()), LogDirMismatchError,
         "different program", "Use a new log_dir", no_lm_calls=False),
    Case("log_dir of another config", lambda e: _mismatch(e, prompts_per_query=2), LogDirMismatchError,
         "different budget", "Use a new log_dir", no_lm_calls=False),
    Case("corrupted log_dir", _corrupt_run_json, LogDirMismatchError, "run.json is corrupted", "Use a new log_dir"),
    Case("log_dir from a newer version", _newer_run_json, LogDirMismatchError, "newer trprompt_dspy",
         "Upgrade trprompt_dspy or use a new log_dir"),
    # --- artifacts
    Case("corrupted artifact sidecar", lambda e: e.load(lambda f: (f / "trprompt.json").write_text("{oops")),
         ValueError, r"trprompt.json' is corrupted", "Re-save the program with save_compiled"),
    Case("corrupted program state", lambda e: e.load(lambda f: (f / "program.json").write_text('{"cot.pre')),
         ValueError, r"program.json' is corrupted", "Re-save the program with save_compiled"),
    Case("artifact from a newer format", lambda e: e.load(_sidecar(format_version=7)), ValueError,
         "newer trprompt_dspy.*format_version 7", "Upgrade trprompt_dspy"),
    Case("adapter path escaping with ..", lambda e: e.load(_sidecar(adapter_path="../../elsewhere")), ValueError,
         "leaves the artifact folder", "Keep the adapter inside the artifact folder"),
    Case("absolute adapter path", lambda e: e.load(_sidecar(adapter_path="/etc")), ValueError,
         "Refusing absolute adapter_path", "Keep the adapter inside the artifact folder"),
    Case("pickle program file", lambda e: e.load(_sidecar(program_file="../program.pkl")), ValueError,
         r"program_file.*'../program.pkl'", "never load pickles"),
    Case("pickle inside the adapter folder", lambda e: e.load(
        lambda f: (f / "adapter" / "adapter_model.bin").write_bytes(pickle.dumps({"w": 1}))), ValueError,
         r"pickle-based files \['adapter_model.bin'\]", "safe_serialization=True"),
]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("artifact")
    pm = FakePromptModel()
    req = InstructionRequest("cot.predict", "question -> answer", "question: 1 + 2?", "Good.")
    pm.train([SFTExample(req, "Add the numbers.")], output_dir=folder / "trained")
    program = install_query_aware(MathCoT(), prompt_model=pm, optimal_reward="Correct and brief.")
    return save_compiled(program, folder / "saved")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_a_clear_early_error(case, tmp_path, artifact):
    lm = scripted_lm(arithmetic_responder, "target")
    dspy.configure(lm=lm)
    pm = FakePromptModel(template="Add the numbers carefully for {predictor}, then state the sum.")
    env = Env(tmp_path, lm, pm, artifact)
    with pytest.raises(case.exc) as info:
        case.run(env)
    message = str(info.value)
    assert re.search(case.what, message), f"{case.id}: message does not say what: {message}"
    assert re.search(case.how, message), f"{case.id}: message does not say how to fix: {message}"
    if case.no_lm_calls:
        assert lm.engine.calls == [] and pm.calls == [], f"{case.id}: work started before the check"
    if "log_dir of another" not in case.id:
        assert not any(c.temperature > 0 for c in pm.calls) and pm.train_calls == [], f"{case.id}: rollouts ran"


@pytest.mark.parametrize("program", [MathCoT(), PlanAndSolve(), RecallThenAnswer(), dspy.Predict("question -> answer"),
                                     dspy.ChainOfThought("question -> answer")], ids=lambda p: type(p).__name__)
def test_valid_programs_pass_the_input_field_check(program, caplog):
    with caplog.at_level("WARNING"):
        check_input_fields(program, addition_examples(3), "trainset")
    assert program_inputs(program).required == ("question",) and not caplog.records


def test_guessed_inputs_partly_missing_only_warn(caplog):
    spec = program_inputs(RetrieveThenAnswer())  # forward(**kwargs) makes `context` itself
    assert spec.required == ("question", "context") and spec.certain is False
    with caplog.at_level("WARNING"):
        check_input_fields(RetrieveThenAnswer(), addition_examples(2), "trainset")
    assert "['context']" in caplog.text and "fine if forward fills them in itself" in caplog.text


def test_optional_and_extra_inputs_are_accepted():
    examples = [dspy.Example(question="1 + 2?", hint="add", answer="3").with_inputs("question", "hint")]
    check_input_fields(dspy.ChainOfThought("question, hint: str | None -> answer"), [examples[0].without("hint")
                                                                                   .with_inputs("question")], "t")
    check_input_fields(dspy.ChainOfThought("question -> answer"), examples, "trainset")  # **kwargs takes hint

    class WithDefault(dspy.Module):
        def __init__(self):
            super().__init__()
            self.qa = dspy.Predict("question -> answer")

        def forward(self, question, hint=None):
            return self.qa(question=question)

    check_input_fields(WithDefault(), examples, "trainset")
    assert program_inputs(WithDefault()).accepted == ("question", "hint")


def test_table_has_at_least_25_cases():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)


def test_loading_an_artifact_never_unpickles(artifact, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle must never be used to load an artifact")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    assert {p.suffix for p in artifact.rglob("*") if p.is_file()} <= {".json", ".safetensors"}
    program = load_compiled(MathCoT(), artifact, prompt_model=FakePromptModel())
    assert program.cot.predict.optimal_reward == "Correct and brief."


def test_unknown_artifact_keys_load_with_a_warning(artifact, tmp_path, caplog):
    folder = tmp_path / "a"
    shutil.copytree(artifact, folder)
    _sidecar(from_the_future={"x": 1})(folder)
    with caplog.at_level("WARNING"):
        load_compiled(MathCoT(), folder, prompt_model=FakePromptModel())
    assert "from_the_future" in caplog.text
