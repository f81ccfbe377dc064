"""A real vLLM (CPU) server serving SmolLM2 with runtime LoRA: the whole serving path end to end.

Marker ``server``: not in the default suite. ``make test-server`` creates the vLLM venv first
(``trprompt serve --install-only``), then runs ``pytest -m server``. About 2-3 minutes on 2 CPU cores.

What "the same instructions" means here: vLLM and transformers both run bf16, but with different kernels
(and vLLM batches), so greedy texts can drift apart after a near-tie token. We compare token ids of the
greedy outputs of the *same adapter* and require, on at least 4 of the 6 prompts, that the first
``PREFIX_TOKENS`` tokens agree (or the whole output when it is shorter), and that the outputs share at
least half of their tokens on average (position-wise, over the longer one). The trained adapter's output is
nearly memorized, so the same check also runs on the bare base model's free-form answers.
"""

from __future__ import annotations

import time

import pytest

from trprompt_dspy.config import LoraSettings, SFTSettings
from trprompt_dspy.prompt_model.base import InstructionRequest, SFTExample

pytestmark = pytest.mark.server

PRESET = "smollm2-135m-instruct"
PREFIX_TOKENS = 8
TRAINED = "INSTRUCTION: Identify every quantity in the query, then compute step by step and state the result."


def _requests() -> list[InstructionRequest]:
    qs = ["question: Tom has 3 boxes of 12 apples. How many apples?", "question: What is 15% of 80?",
          "question: A train goes 60 km/h for 2.5 hours. How far?", "question: Sara had 20 dollars and spent 7.",
          "question: How many legs do 4 spiders have?", "question: Half of 90 plus 5?"]
    return [InstructionRequest("cot.predict", "question -> reasoning, answer", q,
                               "The response reasons step by step and ends with the correct answer.") for q in qs]


@pytest.fixture(scope="module")
def vllm_python():
    from trprompt_dspy.serving.venv import ensure_vllm_python

    try:
        return ensure_vllm_python(device="cpu", install=False)
    except FileNotFoundError as exc:  # the Makefile target installs it; a plain `pytest -m server` must say so
        pytest.fail(f"{exc}\nRun `make test-server` (it creates the vLLM venv first).")


def _agreement(tok, a: str, b: str) -> tuple[bool, float]:
    ta, tb = tok(a, add_special_tokens=False)["input_ids"], tok(b, add_special_tokens=False)["input_ids"]
    short = min(len(ta), len(tb))
    k = min(PREFIX_TOKENS, short) if short else 0
    prefix_ok = ta[:k] == tb[:k] and (short >= PREFIX_TOKENS or len(ta) == len(tb))
    overlap = sum(x == y for x, y in zip(ta, tb, strict=False)) / max(1, max(len(ta), len(tb)))
    return prefix_ok, overlap


def test_real_vllm_server_lora_and_parity_with_hf(vllm_python, tmp_path):
    from trprompt_dspy.prompt_model.hf import HFPromptModel
    from trprompt_dspy.prompt_model.vllm import VLLMPromptModel
    from trprompt_dspy.serving import VLLMServer
    from trprompt_dspy.serving.process import _proc_stat

    t_start = time.perf_counter()
    server = VLLMServer(PRESET, enable_lora=True, max_lora_rank=8, device="cpu", python=vllm_python,
                        max_model_len=2048, log_dir=tmp_path / "logs", startup_timeout=900)
    pids: list[int] = []
    try:
        server.start()
        assert server.startup_seconds and server.startup_seconds > 0
        assert server.models() == [PRESET]
        pids = server.child_pids()
        assert len(pids) >= 2, pids  # API server + engine core at least

        # 1. The plain dspy.LM path.
        lm = server.dspy_lm(temperature=0.0, max_tokens=16, cache=False)
        answer = lm("What is 2 + 3? Reply with the number only.")[0]
        assert isinstance(answer, str) and answer.strip()

        # 2. Train a tiny adapter through the prompt model (TRL in-process) and load it at run time.
        pm = VLLMPromptModel(PRESET, server=server, max_concurrency=8, keep_train_model=False)
        reqs = _requests()
        base_out = pm.generate(reqs, max_new_tokens=32)
        examples = [SFTExample(r, TRAINED) for r in reqs] + [SFTExample(r, TRAINED) for r in reqs[:2]]
        result = pm.train(examples, output_dir=tmp_path / "adapter", lora=LoraSettings(r=8),
                          sft=SFTSettings(learning_rate=2e-3, num_train_epochs=4, max_length=384), seed=0)
        assert result.steps >= 4 and pm.adapter_path == result.adapter_path
        assert pm.active_model in server.models()
        tuned = pm.generate(reqs, max_new_tokens=32)
        assert tuned != base_out, "the runtime-loaded adapter did not change the greedy outputs"
        assert sum(t[0].startswith("INSTRUCTION") for t in tuned) >= 4, tuned
        # the adapter is reachable through dspy.LM under its served name as well
        adapter_lm = server.dspy_lm(model=pm.active_model, temperature=0.0, max_tokens=8, cache=False)
        assert adapter_lm("hello")[0] is not None

        # 3. Same adapter in transformers: greedy instructions agree within the tolerance above.
        hf = HFPromptModel(PRESET, adapter_path=result.adapter_path, dtype="bfloat16", max_batch_size=1)
        hf_out = hf.generate(reqs, max_new_tokens=32)
        checks = [_agreement(hf.tokenizer, v[0], h[0]) for v, h in zip(tuned, hf_out, strict=True)]
        print("vLLM:", [t[0] for t in tuned], "\nHF:  ", [h[0] for h in hf_out], "\nagreement:", checks)
        assert sum(ok for ok, _ in checks) >= 4, checks
        assert sum(o for _, o in checks) / len(checks) >= 0.5, checks
        # ... and so do the bare base models (a harder check: free-form text, no memorized string).
        hf.load_adapter(None)
        hf_base = hf.generate(reqs, max_new_tokens=32)
        base_checks = [_agreement(hf.tokenizer, v[0], h[0]) for v, h in zip(base_out, hf_base, strict=True)]
        print("base vLLM:", [t[0] for t in base_out], "\nbase HF:  ", [h[0] for h in hf_base],
              "\nbase agreement:", base_checks)
        assert sum(ok for ok, _ in base_checks) >= 4, base_checks
        hf.close()

        # 4. Back to the base model; the adapter is unloaded from the server.
        name = pm.active_model
        pm.load_adapter(None)
        assert name not in server.models()
        again = pm.generate(reqs, max_new_tokens=32)  # bf16 batches may round differently: compare behaviour
        assert not any(a[0].startswith("INSTRUCTION") for a in again), again
        pids = sorted(set(pids) | set(server.child_pids()))
    finally:
        server.stop()
    assert server.child_pids() == []
    alive = [p for p in pids if (st := _proc_stat(p)) is not None and st[0] not in ("Z", "X")]
    assert alive == [], f"vLLM processes survived stop(): {alive}"
    print(f"server test took {time.perf_counter() - t_start:.1f} s (startup {server.startup_seconds} s)")
