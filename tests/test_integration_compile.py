"""End-to-end compiles with real models (integration; CPU, small budgets).

1. Real prompt model (SmolLM2-135M + LoRA trained by TRL), scripted target/reward: the optimizer's
   plumbing around a real adapter — adapter weights change, base weights do not, the compiled program
   runs, saves, loads and gives the same instructions under greedy decoding.
2. Everything real: SmolLM2 prompt model, Qwen2.5-Coder-0.5B as target, reward and TextGrad model
   (marked ``slow``: about 6 minutes on 2 CPU cores; `make test-slow` and CI run it after the default suite).
"""

from __future__ import annotations

import hashlib

import dspy
import pytest

from programs.math import MathCoT
from tests.fakes import arithmetic_responder, scripted_lm
from trprompt_dspy import TRPromptOptimizer
from trprompt_dspy.compiled.artifact import load_compiled, save_compiled
from trprompt_dspy.tasks.datasets import load_fixed_split
from trprompt_dspy.tasks.metrics import gsm8k_feedback_metric

pytestmark = pytest.mark.integration

# min_improvement=None: these tests check the real-model plumbing (train, save, reload) on the trained program,
# which must come back even when it ties with the student on 2 validation examples (selection: test_optimizer).
TINY = dict(num_iterations=1, queries_per_iteration=2, prompts_per_query=2, textgrad_steps=0,
            textgrad_batch_size=2, val_size=2, min_improvement=None)
SFT = {"num_train_epochs": 1.0, "per_device_train_batch_size": 4, "max_length": 384}


def _digest(tensor) -> str:
    return hashlib.sha256(tensor.detach().float().cpu().numpy().tobytes()).hexdigest()


def _addition_data(n: int, offset: int = 0) -> list[dspy.Example]:
    return [dspy.Example(question=f"What is {i} + {i + 3}?", answer=str(2 * i + 3)).with_inputs("question")
            for i in range(offset, offset + n)]


@pytest.fixture(scope="module")
def prompt_model():
    from trprompt_dspy.backends.prompt_model.hf import HFPromptModel

    return HFPromptModel("smollm2-135m-instruct")


def test_real_prompt_model_is_trained_saved_and_reloaded(tmp_path, prompt_model):
    base_q = prompt_model.base_model.model.layers[0].self_attn.q_proj.weight \
        if hasattr(prompt_model.base_model, "model") else None
    base_before = _digest(base_q) if base_q is not None else None
    dspy.configure(lm=scripted_lm(arithmetic_responder))
    opt = TRPromptOptimizer(metric=lambda ex, p, trace=None: float(p.answer == ex.answer),
                            prompt_model=prompt_model, log_dir=tmp_path / "log", sft=SFT,
                            max_instruction_tokens=48, display_progress=False, **TINY)
    compiled = opt.compile(MathCoT(), trainset=_addition_data(6), valset=_addition_data(2, offset=40))
    stats = compiled.detailed_results
    assert stats.iterations[0].sft_steps >= 1 and stats.iterations[0].sft_loss
    # the trained adapter is active and has non-zero LoRA B matrices (PEFT initialises B to zero)
    adapter = prompt_model.adapter_path
    assert adapter and adapter.endswith("adapter")
    from safetensors.torch import load_file

    weights = load_file(f"{adapter}/adapter_model.safetensors")
    lora_b = [t for k, t in weights.items() if "lora_B" in k]
    assert lora_b and any(float(t.abs().sum()) > 0 for t in lora_b)
    if base_before is not None:
        assert _digest(prompt_model.base_model.model.layers[0].self_attn.q_proj.weight) == base_before

    q = "What is 12 + 15?"
    first = compiled(question=q)
    assert first.query_instruction and first.answer == "27"
    save_compiled(compiled, tmp_path / "artifact")
    from trprompt_dspy.backends.prompt_model.hf import HFPromptModel

    fresh_pm = HFPromptModel("smollm2-135m-instruct")
    reloaded = load_compiled(MathCoT(), tmp_path / "artifact", prompt_model=fresh_pm)
    assert reloaded(question=q).query_instruction == first.query_instruction


@pytest.mark.slow
def test_full_real_stack_compile(tmp_path, prompt_model):
    from trprompt_dspy.models import get_preset, local_lm
    from trprompt_dspy.models.provision import cache_dir

    if not (cache_dir() / get_preset("qwen2.5-coder-0.5b-instruct").name / "config.json").exists():
        pytest.skip("Qwen2.5-Coder-0.5B is not provisioned (run: trprompt models fetch qwen2.5-coder-0.5b-instruct)")
    qwen = local_lm("qwen2.5-coder-0.5b-instruct", max_tokens=384, temperature=0.0)
    train = load_fixed_split("gsm8k", "train", source="bundled", limit=6)
    val = load_fixed_split("gsm8k", "dev", source="bundled", limit=2)
    dspy.configure(lm=qwen)
    opt = TRPromptOptimizer(metric=gsm8k_feedback_metric, prompt_model=prompt_model, log_dir=tmp_path / "log",
                            sft=SFT, max_instruction_tokens=48, num_threads=4, display_progress=False,
                            seed_lm=qwen, **{**TINY, "textgrad_steps": 1})
    compiled = opt.compile(MathCoT(), trainset=train, valset=val)
    stats = compiled.detailed_results
    it = stats.iterations[0]
    assert it.num_rollouts == 4 and it.num_sft_examples >= 1 and it.sft_steps >= 1
    assert stats.lm_calls.get("reward", 0) >= 1 and stats.lm_calls.get("textgrad", 0) >= 1
    pred = compiled(question=val[0].question)
    assert isinstance(pred.query_instruction, str)


class _LenientAdapter(dspy.ChatAdapter):
    """SmolLM2 rarely keeps DSPy's field markers; for plumbing, take its whole reply as the answer."""

    def parse(self, signature, completion):
        try:
            return super().parse(signature, completion)
        except Exception:  # noqa: BLE001 - the test checks the stack, not SmolLM2's formatting
            return {name: completion.strip()[:200] for name in signature.output_fields}


def test_single_base_compile_in_process(tmp_path):
    """Single-base mode end to end with real weights: the target is a local model and ``prompt_model`` is left
    at its default, so the prompt model is a LoRA adapter on the target's own base (SmolLM2 in both roles)."""
    from trprompt_dspy.backends.prompt_model.hf import HFPromptModel
    from trprompt_dspy.backends.prompt_model.pinned import PinnedPromptModel
    from trprompt_dspy.models import local_lm

    target = local_lm("smollm2-135m-instruct", max_tokens=24, temperature=0.0)
    reward = scripted_lm(arithmetic_responder)
    program = dspy.Predict("question -> answer")
    opt = TRPromptOptimizer(metric=lambda ex, p, trace=None: float(ex.answer in str(p.answer)),
                            reward_lm=reward, textgrad_lm=reward, log_dir=tmp_path / "log", sft=SFT,
                            display_progress=False, max_error_rate=1.0, num_threads=2, **TINY)
    assert opt.prompt_model == "auto"
    with dspy.context(lm=target, adapter=_LenientAdapter()):
        compiled = opt.compile(program, trainset=_addition_data(6), valset=_addition_data(2, offset=40))
        stats = compiled.detailed_results
        assert stats.prompt_model["backend"] == "hf" and stats.prompt_model["base_model"] == "smollm2-135m-instruct"
        assert stats.iterations[0].sft_steps >= 1
        assert stats.instructions["instructions"] >= 4 and stats.instructions["max_instruction_tokens"] == 48
        pm = compiled.prompt_model if hasattr(compiled, "prompt_model") else None
        pm = pm or next(p.prompt_model for _, p in compiled.named_predictors())
        assert isinstance(pm, PinnedPromptModel) and isinstance(pm.model, HFPromptModel)
        assert pm.adapter_path is not None and pm.adapter_path.endswith("adapter")
        pred = compiled(question="What is 12 + 15?")
        assert isinstance(pred.query_instruction, str) and pred.query_instruction
        assert opt.prompt_model == "auto"  # compile never replaces the optimizer's argument
