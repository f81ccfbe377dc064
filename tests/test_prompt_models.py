"""Prompt-model backends: the test fake and the dspy.LM-backed instruction writer."""

from __future__ import annotations

import json
import threading
import warnings

import dspy
import pytest
from dspy.lm15 import Message, Response, TextPart, Usage
from dspy.utils import DummyLM

from trprompt_dspy.backends.prompt_model.base import (
    SYSTEM_PROMPT,
    InstructionRequest,
    PromptModel,
    SFTExample,
    build_messages,
)
from trprompt_dspy.backends.prompt_model.fake import FakePromptModel
from trprompt_dspy.backends.prompt_model.lm_writer import LMInstructionWriter

REQ = InstructionRequest("qa", "question -> answer", "question: What is 2 + 3?", "The answer is correct.")
REQ2 = InstructionRequest("qa", "question -> answer", "question: What is 7 * 6?", "The answer is correct.")


# ---------------------------------------------------------------------------- FakePromptModel
def test_fake_is_a_prompt_model_and_deterministic():
    pm = FakePromptModel()
    assert isinstance(pm, PromptModel)
    first = pm.generate([REQ, REQ2], n=2)
    assert first == pm.generate([REQ, REQ2], n=2)
    assert first[0][0] == first[0][1] and first[0][0] != first[1][0]
    assert first[0][0].startswith("Solve step by step. [qa|") and len(first[0][0]) == len("Solve step by step. [qa|12345678]")
    assert pm.generate_calls == 2 and len(pm.requests) == 4 and [c.n for c in pm.calls] == [2, 2]


def test_fake_sampling_respects_seed_and_temperature():
    pm = FakePromptModel(template="Do it.")
    [a] = pm.generate([REQ], temperature=0.9, n=3, seed=7)
    [b] = pm.generate([REQ], temperature=0.9, n=3, seed=7)
    [c] = pm.generate([REQ], temperature=0.9, n=3, seed=8)
    assert a == b and a != c and len(set(a)) == 3 and all(s.startswith("Do it. (variant ") for s in a)
    unseeded = {pm.generate([REQ], temperature=0.9, n=1)[0][0] for _ in range(5)}
    assert len(unseeded) > 1
    assert pm.generate([REQ], temperature=0.0, n=2, seed=1) == [["Do it.", "Do it."]]


def test_fake_function_template_truncation_and_empty():
    pm = FakePromptModel(lambda r: f"Focus on {r.query.split(': ')[1]} {r.reward}")
    assert pm.generate([REQ]) == [["Focus on What is 2 + 3? The answer is correct."]]
    assert pm.generate([REQ], max_new_tokens=3) == [["Focus on What"]]
    assert FakePromptModel(empty_if=lambda r: "7" in r.query).generate([REQ, REQ2])[1] == [""]
    with pytest.raises(ValueError, match="n must be a positive integer"):
        pm.generate([REQ], n=0)
    with pytest.raises(TypeError, match=r"requests\[0\] must be an InstructionRequest"):
        pm.generate(["question: hi"])


def test_fake_train_writes_json_adapter_and_memorizes(tmp_path):
    pm = FakePromptModel(memorize=True)
    examples = [SFTExample(REQ, "Low.", 0.0), SFTExample(REQ, "High.", 1.0), SFTExample(REQ2, "Other.", None)]
    result = pm.train(examples, output_dir=tmp_path / "a1", lora=None, sft=None, seed=3)
    assert result.num_examples == 3 and result.adapter_path == str(tmp_path / "a1") and result.final_loss is not None
    config = json.loads((tmp_path / "a1" / "adapter_config.json").read_text())
    assert config["num_examples"] == 3 and config["seed"] == 3
    assert pm.adapter_path == str(tmp_path / "a1") and pm.describe()["adapter_path"] == str(tmp_path / "a1")
    assert pm.generate([REQ, REQ2]) == [["High."], ["Other."]]
    assert pm.train_calls[0][0] == examples and pm.calls[-1].adapter_path == str(tmp_path / "a1")

    pm.load_adapter(None)
    assert pm.adapter_path is None and pm.generate([REQ])[0][0].startswith("Solve step by step.")
    other = FakePromptModel(memorize=True)
    other.load_adapter(tmp_path / "a1")
    assert other.generate([REQ]) == [["High."]]
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        other.load_adapter(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="at least one SFTExample"):
        pm.train([], output_dir=tmp_path / "a2", lora=None, sft=None)


def test_fake_records_concurrency_across_threads():
    pm = FakePromptModel(delay=0.3)  # long enough to overlap even on a busy 2-core machine
    threads = [threading.Thread(target=pm.generate, args=([REQ],)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pm.generate_calls == 4 and pm.max_concurrency >= 2 and len(pm.thread_ids) == 4


# ---------------------------------------------------------------------------- LMInstructionWriter
class RecordingEngine:
    """A canonical lm15 engine: answers with the config it saw; can fail for chosen queries."""

    def __init__(self, fail_if: str | None = None):
        self.requests = []
        self.fail_if = fail_if
        self._lock = threading.Lock()

    def complete(self, request):
        with self._lock:
            self.requests.append(request)
        user = request.messages[-1].text
        if self.fail_if is not None and self.fail_if in user:
            raise ValueError("backend rejected this request")
        text = f"  Instruction #{request.config.seed} at T={request.config.temperature} max={request.config.max_tokens}  "
        return Response(id=None, model=request.model, message=Message.assistant([TextPart(text)]),
                        finish_reason="stop", usage=Usage(input_tokens=1, output_tokens=1))

    def close(self):
        pass


def make_writer(**engine_kw) -> tuple[LMInstructionWriter, RecordingEngine, dspy.LM]:
    engine = RecordingEngine(**engine_kw)
    lm = dspy.LM("local/writer", engine=engine, cache=False)
    return LMInstructionWriter(lm, num_threads=4), engine, lm


def test_writer_sends_build_messages_without_deprecated_apis():
    writer, engine, lm = make_writer()
    assert isinstance(writer, PromptModel)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        out = writer.generate([REQ, REQ2], n=3)
    assert out == [["Instruction #None at T=0.0 max=48"] * 3] * 2
    assert len(engine.requests) == 2  # greedy: one call per request, repeated n times
    expected = build_messages(REQ)
    sent = engine.requests[0]
    assert sent.system == SYSTEM_PROMPT == expected[0]["content"]
    assert [m.text for m in sent.messages] == [expected[1]["content"]]
    assert len(lm.history) == 2


def test_writer_sampling_uses_seeds_and_rollout_ids():
    writer, engine, lm = make_writer()
    [samples] = writer.generate([REQ], temperature=0.8, n=3, seed=10, max_new_tokens=40)
    assert samples == [f"Instruction #{s} at T=0.8 max=40" for s in (10, 11, 12)]
    assert sorted(h["kwargs"].get("rollout_id") for h in lm.history) == [1_000_030, 1_000_031, 1_000_032]
    writer.generate([REQ], temperature=0.8, n=2)
    assert [h["kwargs"].get("cache") for h in lm.history[-2:]] == [False, False]
    capped = LMInstructionWriter(lm, max_tokens=512)
    assert capped.generate([REQ], max_new_tokens=40) == [["Instruction #None at T=0.0 max=512"]]


def test_writer_failures_one_bad_request_vs_systemic():
    writer, _, _ = make_writer(fail_if="7 * 6")
    assert writer.generate([REQ, REQ2]) == [["Instruction #None at T=0.0 max=48"], [""]]
    with pytest.raises(RuntimeError, match="all 2 calls to 'local/writer' failed"):
        writer.generate([REQ2, REQ2])


def test_writer_cannot_train_or_load_adapters(tmp_path):
    writer, _, _ = make_writer()
    with pytest.raises(TypeError, match="cannot be fine-tuned"):
        writer.train([SFTExample(REQ, "x")], output_dir=tmp_path, lora=None, sft=None)
    with pytest.raises(ValueError, match="has no adapters"):
        writer.load_adapter(tmp_path)
    writer.load_adapter(None)
    assert writer.adapter_path is None and writer.describe()["base_model"] == "local/writer"
    with pytest.raises(TypeError, match="needs a dspy.LM"):
        LMInstructionWriter("openai/gpt-4o-mini")


def test_writer_drives_a_query_aware_program():
    from trprompt_dspy.compiled.program import install_query_aware

    target = DummyLM({"## question ##": {"reasoning": "r", "answer": "5"}})
    dspy.configure(lm=target)
    writer, engine, _ = make_writer()
    program = install_query_aware(dspy.ChainOfThought("question -> answer"), prompt_model=writer,
                                  optimal_reward="Correct.")
    pred = program(question="2+3?")
    assert pred.answer == "5" and pred.query_instruction == "Instruction #None at T=0.0 max=48"
    assert "Predictor: predict" in engine.requests[-1].messages[-1].text
    assert "question: 2+3?" in engine.requests[-1].messages[-1].text
    assert pred.query_instruction in target.history[-1]["messages"][0]["content"]


@pytest.mark.parametrize("requests,kw,exc,match", [
    ("not a list", {}, TypeError, "sequence of InstructionRequest"),
    ([{"query": "q"}], {}, TypeError, r"requests\[0\]"),
    ([], {"n": 0}, ValueError, "n must be a positive integer"),
    ([], {"temperature": -0.1}, ValueError, "temperature"),
    ([], {"max_new_tokens": 0}, ValueError, "max_new_tokens"),
])
def test_every_backend_validates_generate_arguments(requests, kw, exc, match):
    from trprompt_dspy.backends.prompt_model.base import check_generate_args
    from trprompt_dspy.backends.prompt_model.hf import HFPromptModel

    args = {"n": 1, "temperature": 0.0, "max_new_tokens": 16, **kw}
    with pytest.raises(exc, match=match):
        check_generate_args(requests, **args)
    # the real HF backend rejects the same input before loading any weights
    with pytest.raises(exc, match=match):
        HFPromptModel("smollm2-135m-instruct").generate(requests, **args)
