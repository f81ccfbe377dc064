"""A real vLLM (CPU) server serving SmolLM2 with runtime LoRA: the whole serving path end to end.

Marker ``server``: not in the default suite. ``make test-server`` creates the vLLM venv first
(``trprompt serve --install-only``), then runs ``pytest -m server``. About 2-3 minutes on 2 CPU cores.

What "the same adapter" means here: vLLM and transformers both run bf16, but with different kernels (and
vLLM batches), so two greedy decodes can legitimately part ways at a near-tie token and then drift anywhere.
We therefore use the criterion of vLLM's own model tests (``check_logprobs_close``): decode greedily in both
engines with the top-5 log-probabilities of every step; the token sequences must be identical, or, at the
first position where they differ, each engine's token must be among the other engine's top-5 candidates (a
near-tie), after which the comparison stops. It must hold on *every* prompt, for the trained adapter and for
the bare base model. A wrong or missing LoRA (or a different chat rendering) fails it at once: the chosen
token is then far outside the other engine's top-5.
"""

from __future__ import annotations

import time

import pytest

from trprompt_dspy.backends.prompt_model.base import InstructionRequest, SFTExample
from trprompt_dspy.config import LoraSettings, SFTSettings

pytestmark = pytest.mark.server

PRESET = "smollm2-135m-instruct"
TOP_K = 5
MAX_TOKENS = 32
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


Steps = list[tuple[int, dict[int, float]]]  # (chosen token id, {top-k token id: logprob}) per step


def _vllm_steps(base_url: str, model: str, request: InstructionRequest) -> Steps:
    from trprompt_dspy.backends.prompt_model.base import build_messages
    from trprompt_dspy.serving.http import post_json

    payload = {"model": model, "messages": build_messages(request), "max_tokens": MAX_TOKENS, "temperature": 0.0,
               "logprobs": True, "top_logprobs": TOP_K, "return_tokens_as_token_ids": True}
    content = post_json(f"{base_url}/chat/completions", payload, timeout=300)["choices"][0]["logprobs"]["content"]

    def tid(token: str) -> int:  # "token_id:1234"
        return int(token.rsplit(":", 1)[1])

    return [(tid(c["token"]), {tid(t["token"]): t["logprob"] for t in c["top_logprobs"]}) for c in content]


def _hf_steps(model, tok, request: InstructionRequest) -> Steps:
    import torch

    from trprompt_dspy.backends.prompt_model.base import build_messages

    enc = tok.apply_chat_template(build_messages(request), add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=MAX_TOKENS, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    steps = []
    for token, scores in zip(out.sequences[0, enc["input_ids"].shape[1]:].tolist(), out.scores, strict=False):
        top = torch.topk(torch.log_softmax(scores[0].float(), dim=-1), TOP_K)
        steps.append((token, dict(zip(top.indices.tolist(), top.values.tolist(), strict=True))))
    return steps


def _close(a: Steps, b: Steps, eos_ids: set[int]) -> tuple[bool, str]:
    """vLLM's ``check_logprobs_close``: identical, or each side's token in the other's top-k where they part."""
    for i, ((ta, top_a), (tb, top_b)) in enumerate(zip(a, b, strict=False)):
        if ta != tb:
            return ta in top_b and tb in top_a, f"part at step {i}: {ta} vs {tb}"
    if len(a) == len(b):
        return True, f"identical ({len(a)} tokens)"
    i, longer = min(len(a), len(b)), (a if len(a) > len(b) else b)
    return bool(eos_ids & set(longer[i][1])), f"one side stops at step {i}"


def _parity(server_url: str, vllm_model: str, hf, reqs: list[InstructionRequest]) -> list[tuple[bool, str]]:
    tok = hf.tokenizer
    gen_eos = hf.model.generation_config.eos_token_id  # an id, a list of ids, or None
    eos = {tok.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])} - {None}
    return [_close(_vllm_steps(server_url, vllm_model, r), _hf_steps(hf.model, tok, r), eos) for r in reqs]


def test_real_vllm_server_lora_and_parity_with_hf(vllm_python, tmp_path):
    from trprompt_dspy.backends.prompt_model.hf import HFPromptModel
    from trprompt_dspy.backends.prompt_model.vllm import VLLMPromptModel
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

        # 3. Same adapter in transformers: greedy decodes agree up to near-ties (see the module docstring).
        hf = HFPromptModel(PRESET, adapter_path=result.adapter_path, dtype=server.resolved_dtype, max_batch_size=1)
        checks = _parity(server.base_url, pm.active_model, hf, reqs)
        print("adapter parity:", checks)
        assert all(ok for ok, _ in checks), checks
        # ... and so do the bare base models (free-form text, no memorized string).
        hf.load_adapter(None)
        base_checks = _parity(server.base_url, PRESET, hf, reqs)
        print("base parity:", base_checks)
        assert all(ok for ok, _ in base_checks), base_checks
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


def test_single_base_stack_serves_target_and_prompt_model_from_one_server(vllm_python, tmp_path):
    """ModelStack in single-base mode: one vLLM process serves the target (base name) and the prompt model (a
    LoRA adapter loaded at run time); a saved compiled program writes identical greedy instructions on reload."""
    import dspy

    from trprompt_dspy.backends.prompt_model.pinned import PinnedPromptModel
    from trprompt_dspy.backends.prompt_model.vllm import VLLMPromptModel
    from trprompt_dspy.backends.stack import ModelStack, local_base_of
    from trprompt_dspy.compiled.artifact import load_compiled, save_compiled
    from trprompt_dspy.compiled.program import install_query_aware

    stack = ModelStack(PRESET, max_tokens=16, num_threads=8, log_dir=tmp_path / "logs",
                       max_lora_rank=8, server_options={"python": vllm_python, "device": "cpu",
                                       "startup_timeout": 900})
    assert stack.single_base
    with stack:
        assert list(stack.servers) == ["target"] and stack.servers["target"]["lora"] is True
        pm = stack.prompt_model
        assert isinstance(pm, VLLMPromptModel) and pm.base_url == stack.servers["target"]["base_url"]
        assert local_base_of(stack.target_lm).lora and stack.reward_lm is stack.textgrad_lm is stack.target_lm
        reqs = _requests()
        examples = [SFTExample(r, TRAINED) for r in reqs] + [SFTExample(r, TRAINED) for r in reqs[:2]]
        result = pm.train(examples, output_dir=tmp_path / "adapter", lora=LoraSettings(r=8),
                          sft=SFTSettings(learning_rate=2e-3, num_train_epochs=4, max_length=384), seed=0)
        tuned = pm.generate(reqs, max_new_tokens=32)  # connects, loads the adapter at run time, generates
        from trprompt_dspy.serving.http import get_json

        names = [c["id"] for c in get_json(f"{pm.base_url}/models", timeout=30)["data"]]
        assert PRESET in names and pm.active_model in names and pm.active_model != PRESET  # one process, both
        assert sum(t[0].startswith("INSTRUCTION") for t in tuned) >= 4, tuned
        # the target keeps answering from the base weights on the same server
        assert stack.target_lm("What is 2 + 3? Reply with the number only.", temperature=0.0)[0].strip()

        program = install_query_aware(dspy.Predict("question -> answer"),
                                      prompt_model=PinnedPromptModel(pm, result.adapter_path),
                                      optimal_reward="The response is correct.")
        save_compiled(program, tmp_path / "artifact")
        instructions = [program.predictors()[0].prompt_model.generate([r], max_new_tokens=32)[0][0] for r in reqs]
        reloaded = load_compiled(dspy.Predict("question -> answer"), tmp_path / "artifact",
                                 prompt_model_factory=stack.prompt_model_for)
        again = [reloaded.predictors()[0].prompt_model.generate([r], max_new_tokens=32)[0][0] for r in reqs]
        assert again == instructions
        pm.load_adapter(None)  # a later compile starting from the bare base leaves the saved program pinned
        assert [reloaded.predictors()[0].prompt_model.generate([r], max_new_tokens=32)[0][0] for r in reqs] == \
            instructions
