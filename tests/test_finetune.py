"""Tests for trprompt_dspy.backends.prompt_model.lora_training: dataset format, input errors, and real LoRA training on SmolLM2."""

from __future__ import annotations

import hashlib
import json
import math

import pytest

from trprompt_dspy.backends.prompt_model.base import InstructionRequest, SFTExample, build_messages
from trprompt_dspy.backends.prompt_model.lora_training import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MIN_EXAMPLES_FOR_LOSS,
    TRAINING_INFO,
    build_sft_records,
    epoch_mean_losses,
    is_adapter_dir,
    lora_trainer,
    sft_summary,
    train_lora,
)
from trprompt_dspy.config import LoraSettings, SFTSettings

PRESET = "smollm2-135m-instruct"


def make_examples(count: int = 8) -> list[SFTExample]:
    return [
        SFTExample(
            InstructionRequest("qa", "question -> answer", f"question: What is {i} + {i + 3}?",
                               "The answer is correct and concise."),
            f"INSTRUCTION: Add {i} and {i + 3}, then reply with the sum only.",
            score=1.0,
        )
        for i in range(count)
    ]


SMALL_SFT = SFTSettings(num_train_epochs=1, per_device_train_batch_size=4, max_length=256, learning_rate=3e-3)


# ---------------------------------------------------------------------------- unit tests (no model)


def test_build_sft_records_is_conversational_prompt_completion():
    ex = make_examples(1)[0]
    (row,) = build_sft_records([ex])
    assert row["prompt"] == build_messages(ex.request)
    assert row["completion"] == [{"role": "assistant", "content": ex.instruction}]


@pytest.mark.parametrize(
    ("examples", "error", "match"),
    [
        ([], ValueError, "empty list of examples"),
        ("not a list", TypeError, "sequence of SFTExample"),
        ([{"instruction": "x"}], TypeError, r"examples\[0\] must be an SFTExample"),
        ([SFTExample(InstructionRequest("p", "t", "q", "r"), "   ")], ValueError, "empty instruction"),
    ],
)
def test_build_sft_records_rejects_bad_input(examples, error, match):
    with pytest.raises(error, match=match):
        build_sft_records(examples)


def test_train_lora_rejects_empty_examples_before_loading(tmp_path):
    # A nonexistent base path proves nothing is loaded before the examples are checked.
    with pytest.raises(ValueError, match="empty list of examples"):
        train_lora(tmp_path / "no-such-model", [], output_dir=tmp_path / "out", lora=LoraSettings(),
                   sft=SMALL_SFT, seed=0)


def test_train_lora_refuses_non_adapter_output_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty and holds no adapter"):
        train_lora(tmp_path / "no-such-model", make_examples(2), output_dir=out, lora=LoraSettings(),
                   sft=SMALL_SFT, seed=0)
    assert (out / "precious.txt").read_text() == "keep me"


def test_train_lora_needs_model_and_tokenizer_together(tmp_path):
    with pytest.raises(ValueError, match="Pass both model= and tokenizer="):
        train_lora(tmp_path, make_examples(2), output_dir=tmp_path / "out", lora=LoraSettings(),
                   sft=SMALL_SFT, seed=0, model=object())


def _history(losses_per_epoch: list[list[float]]) -> list[dict]:
    """A Trainer log history: one row per step (logging_steps=1), then the end-of-training summary row."""
    rows = []
    for e, losses in enumerate(losses_per_epoch):
        rows += [{"loss": x, "epoch": round(e + (i + 1) / len(losses), 4), "step": len(rows) + 1}
                 for i, x in enumerate(losses)]
    return [*rows, {"train_loss": 9.9, "epoch": float(len(losses_per_epoch)), "step": len(rows)}]


def test_epoch_means_not_first_and_last_batch():
    # The case: the last batch is worse than the first, but the epoch means fall.
    history = _history([[0.8376, 1.4, 1.3, 1.2], [0.9, 0.8, 0.9, 0.8], [0.6, 0.5, 0.7, 1.1646]])
    assert epoch_mean_losses(history) == pytest.approx([1.1844, 0.85, 0.74115], abs=1e-4)
    line = sft_summary(22, 12, 41.0, history)
    assert line.startswith("22 examples, 3 epochs, 12 steps in 41.0 s (3.42 s/step)")
    assert "mean loss first epoch 1.1844 -> last epoch 0.7411" in line
    assert "0.8376" not in line and "too few examples for the loss to mean much" in line


@pytest.mark.parametrize(
    ("history", "n", "expected", "absent"),
    [
        (_history([[0.9, 0.7]]), MIN_EXAMPLES_FOR_LOSS, "1 epoch, 2 steps", "too few"),
        (_history([[0.9, 0.7]]), MIN_EXAMPLES_FOR_LOSS, "mean loss 0.8000 (single epoch: nothing to compare", "->"),
        (_history([[1.0, 0.8], [0.6, 0.4]]), MIN_EXAMPLES_FOR_LOSS, "first epoch 0.9000 -> last epoch 0.5000",
         "too few"),
        (_history([[1.0, 0.8], [0.6, 0.4]]), MIN_EXAMPLES_FOR_LOSS - 1, f"< {MIN_EXAMPLES_FOR_LOSS})", "single"),
        ([{"loss": 1.0, "epoch": 0.5}, {"loss": 0.8, "epoch": 1.0}, {"loss": 0.5, "epoch": 1.25}], 40,
         "1.25 epochs, 3 steps", "too few"),  # a partial last epoch is its own group
        ([{"loss": 1.0}, {"loss": 0.5}], 40, "loss n/a", "mean loss"),  # no epoch info: no claim
        ([], 3, "loss n/a", "too few"),
    ],
)
def test_sft_summary_says_what_the_loss_can_mean(history, n, expected, absent):
    line = sft_summary(n, sum(1 for h in history if "loss" in h), 4.0, history)
    assert expected in line and absent not in line


# ---------------------------------------------------------------------------- integration (real SmolLM2)


@pytest.fixture(scope="module")
def base():
    """SmolLM2 loaded once for the module, in the dtype train_lora itself would pick."""
    from trprompt_dspy.backends.prompt_model.lora_training import bf16_supported
    from trprompt_dspy.models import ModelSourceMissingError, load_causal_lm, resolve_model

    try:
        folder = resolve_model(PRESET)
    except ModelSourceMissingError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"SmolLM2 weights not available: {exc}")
    model, tok = load_causal_lm(folder, dtype="bfloat16" if bf16_supported("cpu") else "float32", device="cpu")
    return folder, model, tok


def weights_digest(model) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.mark.integration
def test_labels_mask_every_prompt_token(base):
    _, model, tok = base
    examples = make_examples(4)
    with lora_trainer(model, tok, examples, lora=LoraSettings(), sft=SMALL_SFT, seed=0) as trainer:
        batch = next(iter(trainer.get_train_dataloader()))
        assert type(trainer.model).__name__ == "PeftModelForCausalLM"
    assert not hasattr(model, "peft_config")  # the adapter is gone again
    assert not any("lora" in name for name, _ in model.named_parameters())

    prompts = [tok.apply_chat_template(build_messages(ex.request), add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"] for ex in examples]
    assert batch["input_ids"].shape[0] == 4
    seen = set()
    for ids, labels, mask in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                 batch["attention_mask"].tolist(), strict=True):
        real = [i for i, m in enumerate(mask) if m]
        ids_real, labels_real = [ids[i] for i in real], [labels[i] for i in real]
        match = [k for k, p in enumerate(prompts) if ids_real[: len(p)] == p]
        assert len(match) == 1, "each row must start with exactly one example's templated prompt"
        k = match[0]
        seen.add(k)
        n_prompt = len(prompts[k])
        assert all(label == -100 for label in labels_real[:n_prompt]), "prompt tokens must not carry loss"
        completion = labels_real[n_prompt:]
        assert completion and all(label != -100 for label in completion)
        assert completion == ids_real[n_prompt:]
        text = tok.decode(completion)
        assert text.startswith(examples[k].instruction) and "<|im_end|>" in text  # learns to stop
        from trprompt_dspy.models.hf_runtime import terminator_ids

        # the completion carries a token generation stops at, so a trained adapter ends its instruction
        assert set(completion) & terminator_ids(model, tok)
        assert all(labels[i] == -100 for i, m in enumerate(mask) if not m), "padding must not carry loss"
    assert seen == {0, 1, 2, 3}


@pytest.mark.integration
def test_train_lora_trains_fresh_adapter_and_keeps_base(base, tmp_path, caplog):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    folder, model, tok = base
    before = weights_digest(model)
    out = tmp_path / "run" / "adapter"

    with caplog.at_level("INFO", logger="trprompt_dspy.backends.prompt_model.lora_training"):
        result = train_lora(folder, make_examples(8), output_dir=out, lora=LoraSettings(), sft=SMALL_SFT, seed=3,
                            model=model, tokenizer=tok, base_model_id=PRESET)

    assert weights_digest(model) == before, "training must never change the base weights"
    assert not hasattr(model, "peft_config") and not model.training
    assert result.adapter_path == str(out.resolve()) and is_adapter_dir(out)
    assert result.num_examples == 8 and result.steps == 2  # 8 examples / batch 4, 1 epoch
    assert len(result.losses) == 2 and all(math.isfinite(x) and x > 0 for x in result.losses)
    assert result.epoch_losses == pytest.approx([sum(result.losses) / 2])  # one epoch: the mean of its steps
    (done,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("LoRA SFT done")]
    assert "8 examples, 1 epoch, 2 steps" in done and "single epoch" in done and "too few examples" in done
    assert result.seconds > 0
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["adapter"], "no temp folders left behind"
    assert sorted(p.name for p in out.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS, TRAINING_INFO])
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert cfg["base_model_name_or_path"] == PRESET
    assert cfg["r"] == 8 and sorted(cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    info = json.loads((out / TRAINING_INFO).read_text())
    assert info["result"]["losses"] == result.losses and info["seed"] == 3 and info["base_model"] == PRESET

    weights = safetensors_torch.load_file(str(out / ADAPTER_WEIGHTS))
    lora_b = [t for name, t in weights.items() if "lora_B" in name]
    assert len(lora_b) == 30 * 4  # 30 layers x q/k/v/o
    # PEFT initializes lora_B to zero, so non-zero B means the adapter weights were trained.
    assert all(torch.count_nonzero(t) > 0 for t in lora_b)

    # A second run with the same seed, loading the base itself by preset name into the same folder, must
    # reproduce the adapter exactly: the adapter is fresh each time (not continued) and training is seeded.
    again = train_lora(PRESET, make_examples(8), output_dir=out, lora=LoraSettings(), sft=SMALL_SFT, seed=3)
    assert again.losses == pytest.approx(result.losses, rel=1e-3)
    weights2 = safetensors_torch.load_file(str(out / ADAPTER_WEIGHTS))
    assert weights2.keys() == weights.keys()
    assert all(torch.allclose(weights[k].float(), weights2[k].float(), atol=1e-4) for k in weights)
    assert json.loads((out / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == PRESET


@pytest.mark.integration
def test_lora_trainer_restores_base_after_failure(base):
    _, model, tok = base
    sft = SFTSettings(**{**SMALL_SFT.to_dict(), "gradient_checkpointing": True})
    embeddings = model.get_input_embeddings()
    hooks_before = len(embeddings._forward_hooks)
    with pytest.raises(RuntimeError, match="boom"), lora_trainer(model, tok, make_examples(4), lora=LoraSettings(),
                                                                 sft=sft, seed=0) as trainer:
        trainer.train()  # one real step with activation checkpointing, then a failure
        raise RuntimeError("boom")
    assert not hasattr(model, "peft_config") and not model.training
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert not model.is_activation_checkpointing, "checkpointing must be switched off again"
    assert len(embeddings._forward_hooks) == hooks_before, "the input-grad hook must be removed"
    assert model.config.use_cache is not False


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_lora_trainer_rejects_model_with_adapter(base, tmp_path):
    peft = pytest.importorskip("peft")
    _, model, tok = base
    wrapped = peft.get_peft_model(model, LoraSettings().to_peft())
    try:
        with pytest.raises(ValueError, match="bare base model"), lora_trainer(
                wrapped, tok, make_examples(2), lora=LoraSettings(), sft=SMALL_SFT, seed=0):
            pass
    finally:
        wrapped.unload()
    assert not hasattr(model, "peft_config")
