"""LoRA fine-tuning of the prompt model with TRL's ``SFTTrainer``.

TRPrompt trains its prompt model Π on *(request → instruction)* pairs. This module turns a list of
:class:`~trprompt_dspy.backends.prompt_model.base.SFTExample` into TRL's *conversational prompt-completion*
dataset (the prompt is :func:`~trprompt_dspy.backends.prompt_model.base.build_messages`, the completion is the
instruction as an assistant turn), so the loss covers only the instruction tokens, and trains a
**fresh** LoRA adapter on top of frozen base weights.

* :func:`train_lora` — train, save the adapter atomically (safetensors + ``adapter_config.json``) and
  return a :class:`~trprompt_dspy.backends.prompt_model.base.TrainResult`.
* :func:`lora_trainer` — the context manager underneath: wraps a base model in a fresh adapter, yields
  the ``SFTTrainer`` and always unwraps the base afterwards (useful to inspect batches).
* :func:`build_sft_records` — the dataset rows, for inspection.

The base model is never modified: the adapter is injected for training and removed again
(``PeftModel.unload``), even when training fails.

Example:
    >>> from trprompt_dspy.backends.prompt_model.base import InstructionRequest, SFTExample
    >>> req = InstructionRequest("qa", "question -> answer", "question: 2+3?", "Correct answer.")
    >>> row = build_sft_records([SFTExample(req, "Add the numbers.")])[0]
    >>> [m["role"] for m in row["prompt"]], row["completion"]
    (['system', 'user'], [{'role': 'assistant', 'content': 'Add the numbers.'}])

    Training (needs the ``train`` extra and a local model)::

        from trprompt_dspy.config import LoraSettings, SFTSettings
        from trprompt_dspy.models import resolve_model
        result = train_lora(resolve_model("smollm2-135m-instruct"), examples, output_dir="runs/adapter",
                            lora=LoraSettings(), sft=SFTSettings(num_train_epochs=1), seed=0,
                            base_model_id="smollm2-135m-instruct")
        result.losses, result.adapter_path
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from trprompt_dspy._lazy import require
from trprompt_dspy.backends.prompt_model.base import SFTExample, TrainResult, build_messages
from trprompt_dspy.config import LoraSettings, SFTSettings
from trprompt_dspy.runtime.atomic import atomic_replace_dir, atomic_write_json, atomic_write_text, staging_dir

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "TRAINING_INFO",
    "build_sft_records",
    "epoch_mean_losses",
    "sft_summary",
    "MIN_EXAMPLES_FOR_LOSS",
    "lora_trainer",
    "train_lora",
    "bf16_supported",
    "is_adapter_dir",
]

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: JSON written next to the adapter: the TrainResult, settings, seed and base model id.
TRAINING_INFO = "trprompt_training.json"
#: Below this many training examples the SFT loss says little: an epoch is a handful of batches (8 at the
#: default batch of 4), so its mean moves with dropout and with which examples share a batch, and a falling
#: loss mostly shows the adapter memorizing a few instructions. The summary line says so next to the numbers.
MIN_EXAMPLES_FOR_LOSS = 32


def build_sft_records(examples: Sequence[SFTExample]) -> list[dict[str, Any]]:
    """Turn examples into TRL conversational prompt-completion rows.

    Args:
        examples: The supervised examples (request → instruction).

    Returns:
        One ``{"prompt": [system, user], "completion": [assistant]}`` dict per example, in order.

    Raises:
        ValueError: ``examples`` is empty, holds a non-:class:`SFTExample`, or an empty instruction.
    """
    if isinstance(examples, (str, bytes)) or not isinstance(examples, Sequence):
        raise TypeError(f"examples must be a sequence of SFTExample; got {type(examples).__name__}.")
    if len(examples) == 0:
        raise ValueError("Cannot fine-tune on an empty list of examples: pass at least one SFTExample "
                         "(check the rollout filter, e.g. SFTSettings.min_score, which may drop every example).")
    rows = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, SFTExample):
            raise TypeError(f"examples[{i}] must be an SFTExample; got {type(ex).__name__}: {ex!r:.200}.")
        if not ex.instruction.strip():
            raise ValueError(f"examples[{i}] has an empty instruction; drop it or give it text. Request: "
                             f"{ex.request!r:.200}.")
        rows.append({"prompt": build_messages(ex.request),
                     "completion": [{"role": "assistant", "content": ex.instruction}]})
    return rows


def epoch_mean_losses(log_history: Sequence[dict[str, Any]]) -> list[float]:
    """Mean training loss of each epoch, in order, from a ``Trainer``'s ``state.log_history``.

    Each logged ``loss`` (one per ``logging_steps``; one per step by default) counts toward the epoch its
    ``epoch`` value falls in: ``(0, 1]`` is the first, ``(1, 2]`` the second, and so on; a partial last epoch
    (``num_train_epochs=2.5``) is a group of its own. Unlike the first and last single-batch losses, the first
    and last epoch means cover the same examples, so they can be compared. Returns ``[]`` when the entries
    carry no ``epoch``.

    Example:
        >>> history = [{"loss": 1.0, "epoch": 0.5}, {"loss": 0.8, "epoch": 1.0}, {"loss": 0.9, "epoch": 1.5},
        ...            {"loss": 0.5, "epoch": 2.0}, {"train_loss": 0.8, "epoch": 2.0}]
        >>> [round(x, 4) for x in epoch_mean_losses(history)]
        [0.9, 0.7]
    """
    by_epoch: dict[int, list[float]] = {}
    for entry in log_history:
        if "loss" not in entry:
            continue  # the final summary row carries train_loss, evaluation rows eval_loss
        if entry.get("epoch") is None:
            return []
        index = max(1, math.ceil(float(entry["epoch"]) - 1e-6))  # epoch 1.0 closes the first epoch
        by_epoch.setdefault(index, []).append(float(entry["loss"]))
    return [sum(v) / len(v) for _, v in sorted(by_epoch.items())]


def sft_summary(num_examples: int, steps: int, seconds: float, log_history: Sequence[dict[str, Any]]) -> str:
    """The "LoRA SFT done" line without the adapter path: size, time and the mean loss of the first and last epoch.

    The first and last *batch* losses compare different examples and on a small dataset read as noise (or
    as "training made it worse"); epoch means do not. With fewer than :data:`MIN_EXAMPLES_FOR_LOSS` examples,
    or a single epoch, the line says why the number means little.

    Example:
        >>> history = [{"loss": 1.2, "epoch": 0.5}, {"loss": 0.7, "epoch": 1.0}, {"loss": 0.6, "epoch": 1.5},
        ...            {"loss": 0.4, "epoch": 2.0}]
        >>> sft_summary(22, 4, 41.0, history)
        '22 examples, 2 epochs, 4 steps in 41.0 s (10.25 s/step); mean loss first epoch 0.9500 -> last epoch 0.5000 (too few examples for the loss to mean much: 22 < 32)'
        >>> sft_summary(64, 16, 8.0, [{"loss": 0.9, "epoch": 0.5}, {"loss": 0.7, "epoch": 1.0}])
        '64 examples, 1 epoch, 16 steps in 8.0 s (0.50 s/step); mean loss 0.8000 (single epoch: nothing to compare it with)'
    """
    means = epoch_mean_losses(log_history)
    epochs = max((float(h["epoch"]) for h in log_history if h.get("epoch") is not None), default=0.0)
    parts = [f"{num_examples} examples, {epochs:.3g} epoch{'' if epochs == 1 else 's'}, {steps} steps in "
             f"{seconds:.1f} s ({seconds / max(1, steps):.2f} s/step)"]
    if not means:
        parts.append("; loss n/a")
    elif len(means) == 1:
        parts.append(f"; mean loss {means[0]:.4f} (single epoch: nothing to compare it with)")
    else:
        parts.append(f"; mean loss first epoch {means[0]:.4f} -> last epoch {means[-1]:.4f}")
    if means and num_examples < MIN_EXAMPLES_FOR_LOSS:
        parts.append(f" (too few examples for the loss to mean much: {num_examples} < {MIN_EXAMPLES_FOR_LOSS})")
    return "".join(parts)


def bf16_supported(device: str = "cpu") -> bool:
    """Whether bf16 compute is native on ``device`` (GPU: compute capability 8.0+; CPU: AVX512-BF16 or AMX).

    One rule for serving, the in-process engine and training: :func:`trprompt_dspy.models.dtype.native_bf16`.
    """
    from trprompt_dspy.models.dtype import native_bf16

    return native_bf16(str(device))


def is_adapter_dir(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` holds a saved PEFT adapter (``adapter_config.json`` + safetensors weights)."""
    p = Path(path)
    return (p / ADAPTER_CONFIG).is_file() and (p / ADAPTER_WEIGHTS).is_file()


class _ProgressCallback:
    """Factory for a ``TrainerCallback`` that logs loss lines and optionally drives a tqdm bar."""

    @staticmethod
    def create(display_progress: bool) -> Any:
        transformers = require("transformers", extra="train")

        class ProgressLogger(transformers.TrainerCallback):
            def __init__(self) -> None:
                self.bar = None
                self.start = time.perf_counter()

            def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
                self.start = time.perf_counter()
                logger.info("LoRA SFT: %d steps (%s epochs, batch %d x accumulation %d)", state.max_steps,
                            args.num_train_epochs, args.per_device_train_batch_size,
                            args.gradient_accumulation_steps)
                if display_progress:
                    from tqdm.auto import tqdm

                    self.bar = tqdm(total=state.max_steps, desc="LoRA SFT", unit="step")

            def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
                if self.bar is not None:
                    self.bar.update(state.global_step - self.bar.n)

            def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
                if not logs or "loss" not in logs:
                    return
                elapsed = time.perf_counter() - self.start
                # Five progress lines per run at INFO (first, every fifth of the way, last); every step at DEBUG.
                every = max(1, -(-state.max_steps // 5))
                shown = state.global_step in (1, state.max_steps) or state.global_step % every == 0
                logger.log(logging.INFO if shown else logging.DEBUG, "LoRA SFT step %d/%d: loss %.4f (%.1f s/step)",
                           state.global_step, state.max_steps, float(logs["loss"]), elapsed / max(1, state.global_step))
                if self.bar is not None:
                    self.bar.set_postfix(loss=f"{float(logs['loss']):.4f}")

            def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
                if self.bar is not None:
                    self.bar.close()
                    self.bar = None

        return ProgressLogger()


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Silence datasets' and transformers' own progress bars for the duration, then restore them."""
    datasets = require("datasets", extra="train")
    hf_logging = require("transformers.utils.logging", extra="train")
    ds_was_off = datasets.utils.logging.is_progress_bar_enabled() is False
    tf_was_on = hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not ds_was_off:
            datasets.enable_progress_bars()
        if tf_was_on:
            hf_logging.enable_progress_bar()


def check_adapter_dir(path: str | os.PathLike[str]) -> Path:
    """Resolve ``path`` and check that it is a PEFT adapter folder; raise a how-to-fix error otherwise.

    Example:
        >>> check_adapter_dir("no/such/adapter")
        Traceback (most recent call last):
        ...
        FileNotFoundError: Adapter folder 'no/such/adapter' does not exist; pass the output_dir of a previous train() (it holds adapter_config.json and adapter_model.safetensors), or None.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"Adapter folder {str(path)!r} does not exist; pass the output_dir of a previous "
                                "train() (it holds adapter_config.json and adapter_model.safetensors), or None.")
    if not is_adapter_dir(p):
        found = sorted(x.name for x in p.iterdir())[:10] if p.is_dir() else []
        raise ValueError(f"{str(path)!r} is not a PEFT adapter folder: expected {ADAPTER_CONFIG} and "
                         f"adapter_model.safetensors, found {found}.")
    return p.resolve()


def _layer_index(name: str) -> int | None:
    """The transformer layer a parameter belongs to (``model.layers.12.self_attn...`` -> 12), else ``None``."""
    head, sep, tail = name.partition(".layers.")
    if not sep:
        return None
    first = tail.split(".", 1)[0]
    return int(first) if first.isdigit() else None


def freeze_lower_layers(peft_model: Any, top_layers: int) -> int:
    """Leave only the LoRA weights of the top ``top_layers`` layers trainable; return how many tensors were frozen.

    The frozen LoRA weights keep their initialization (B = 0: no effect), and autograd no longer needs anything
    below the lowest trainable layer, so the backward pass stops there.

    Raises:
        ValueError: The model has no numbered ``.layers.`` or fewer layers than ``top_layers``.
    """
    layers = {_layer_index(n) for n, _ in peft_model.named_parameters()} - {None}
    if not layers:
        raise ValueError("LoraSettings.top_layers needs a model whose layers are named '...layers.<i>...'.")
    n_layers = max(layers) + 1
    if top_layers > n_layers:
        raise ValueError(f"LoraSettings.top_layers={top_layers} but the model has {n_layers} layers.")
    low = n_layers - top_layers
    frozen = 0
    for name, param in peft_model.named_parameters():
        idx = _layer_index(name)
        if "lora_" in name and idx is not None and idx < low and param.requires_grad:
            param.requires_grad_(False)
            frozen += 1
    logger.info("LoRA trains the top %d of %d layers (%d adapter tensors below stay at zero).", top_layers,
                n_layers, frozen)
    return frozen


def _checkpointing(model: Any) -> bool:
    if hasattr(model, "is_activation_checkpointing"):  # transformers >= 5 name
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))  # pragma: no cover - transformers 4.x


def _remove_new_hooks(module: Any, keep: set[int]) -> None:
    """Drop forward hooks added since ``keep`` was taken.

    With activation checkpointing, TRL and the Trainer each register an input-grad hook on the input
    embeddings, and ``disable_input_require_grads`` only knows the last one.
    """
    for key in [k for k in module._forward_hooks if k not in keep]:
        for hooks in (module._forward_hooks, getattr(module, "_forward_hooks_with_kwargs", {}),
                      getattr(module, "_forward_hooks_always_called", {})):
            hooks.pop(key, None)


def _model_device(model: Any) -> str:
    try:
        return str(next(model.parameters()).device)
    except StopIteration:  # pragma: no cover - a model without parameters
        return "cpu"


@contextlib.contextmanager
def lora_trainer(model: Any, tokenizer: Any, examples: Sequence[SFTExample], *, lora: LoraSettings,
                 sft: SFTSettings, seed: int, work_dir: str | os.PathLike[str] | None = None,
                 display_progress: bool = False) -> Iterator[Any]:
    """Wrap ``model`` in a fresh LoRA adapter and yield a ready ``trl.SFTTrainer``; unwrap it afterwards.

    The adapter's initialization, data order and dropout are seeded with ``seed``. On exit (also after an
    exception) the adapter layers are removed, the model is back in eval mode and settings the trainer
    touched (gradient checkpointing, input-grad hooks, ``use_cache``, ``requires_grad``) are restored, so
    the base weights and behaviour are unchanged.

    Args:
        model: A bare ``transformers`` causal LM (not a ``PeftModel``).
        tokenizer: Its tokenizer, with a chat template.
        examples: Training examples (see :func:`build_sft_records`).
        lora: Adapter settings.
        sft: Trainer settings.
        seed: Seed for adapter init, shuffling and dropout.
        work_dir: Scratch folder for the trainer (default: a temporary folder, removed on exit).
        display_progress: Show a tqdm bar in addition to the per-step log lines.

    Yields:
        The ``SFTTrainer``; ``trainer.model`` is the ``PeftModel`` being trained.

    Example:
        >>> with lora_trainer(model, tok, examples, lora=LoraSettings(), sft=SFTSettings(), seed=0) as tr:  # doctest: +SKIP
        ...     batch = next(iter(tr.get_train_dataloader()))   # labels are -100 on prompt tokens
    """
    torch = require("torch", extra="train")
    transformers = require("transformers", extra="train")
    peft = require("peft", extra="train")
    trl = require("trl", extra="train")
    datasets = require("datasets", extra="train")

    rows = build_sft_records(examples)
    if isinstance(model, peft.PeftModel) or hasattr(model, "peft_config"):
        raise ValueError("lora_trainer needs the bare base model, but the model already carries a PEFT adapter; "
                         "unload it first (PeftModel.unload()) so a fresh adapter is trained on the base weights.")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int; got {seed!r}.")
    device = _model_device(model)
    use_cpu = not device.startswith("cuda")
    config_snapshot = {"use_cache": getattr(model.config, "use_cache", None), "checkpointing": _checkpointing(model)}
    grads_snapshot = {name: p.requires_grad for name, p in model.named_parameters()}
    embeddings = model.get_input_embeddings()
    hooks_snapshot = set(embeddings._forward_hooks)
    own_work_dir = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="trprompt_sft_")) if own_work_dir else Path(work_dir)
    peft_model = trainer = None
    try:
        transformers.set_seed(seed)
        with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            peft_model = peft.get_peft_model(model, lora.to_peft())
        if lora.top_layers is not None:
            freeze_lower_layers(peft_model, lora.top_layers)
        args = sft.to_trl(output_dir=str(work), seed=seed, use_cpu=use_cpu,
                          bf16_supported=bf16_supported("cuda" if not use_cpu else "cpu"),
                          every_layer=lora.top_layers is None)
        with _quiet_progress_bars():
            trainer = trl.SFTTrainer(model=peft_model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                     processing_class=tokenizer,
                                     callbacks=[_ProgressCallback.create(display_progress)])
        trainer.remove_callback(transformers.PrinterCallback)  # it print()s every log dict when tqdm is off
        kept = len(trainer.train_dataset)
        if kept < len(rows):
            logger.warning("LoRA SFT: %d of %d examples were dropped because their prompt alone is longer than "
                           "max_length=%d; raise SFTSettings.max_length to keep them.", len(rows) - kept, len(rows),
                           sft.max_length)
        if kept == 0:
            raise ValueError(f"Every one of the {len(rows)} examples has a prompt longer than "
                             f"max_length={sft.max_length} tokens, so nothing is left to train on; raise "
                             "SFTSettings.max_length.")
        yield trainer
    finally:
        if trainer is not None:
            with contextlib.suppress(Exception):
                trainer.accelerator.free_memory()
        if peft_model is not None:
            restored = peft_model.unload()
            if restored is not model:  # pragma: no cover - peft always unwraps in place
                raise RuntimeError("PEFT returned a different base model object while unloading the adapter.")
        if _checkpointing(model) and not config_snapshot["checkpointing"]:
            if hasattr(model, "activation_checkpointing_disable"):  # transformers >= 5 name
                model.activation_checkpointing_disable()
            else:  # pragma: no cover - transformers 4.x
                model.gradient_checkpointing_disable()
        with contextlib.suppress(Exception):
            model.disable_input_require_grads()
        _remove_new_hooks(embeddings, hooks_snapshot)
        if config_snapshot["use_cache"] is not None:
            model.config.use_cache = config_snapshot["use_cache"]
        for name, p in model.named_parameters():
            p.requires_grad_(grads_snapshot.get(name, p.requires_grad))
        model.eval()
        trainer = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if own_work_dir:
            shutil.rmtree(work, ignore_errors=True)


def _check_output_dir(output_dir: Path) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output_dir {str(output_dir)!r} exists and is not a folder; pass a folder path.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not is_adapter_dir(output_dir):
        raise ValueError(f"output_dir {str(output_dir)!r} is not empty and holds no adapter; refusing to replace "
                         "its contents. Pass a new or empty folder (an existing adapter folder is replaced).")


def _publish(staging: Path, output_dir: Path) -> None:
    """Move the finished ``staging`` folder to ``output_dir`` (renames only; an old adapter is replaced)."""
    if output_dir.is_dir() and not any(output_dir.iterdir()):
        output_dir.rmdir()
    atomic_replace_dir(staging, output_dir)


def _load_base(base_model: str | os.PathLike[str]) -> tuple[Any, Any]:
    """Load a base model for training in the dtype that fits the hardware (``dtype="auto"``)."""
    torch = require("torch", extra="train")
    from trprompt_dspy.models.hf_runtime import load_causal_lm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_causal_lm(base_model, dtype="auto", device=device)


def train_lora(
    base_model_path: str | os.PathLike[str],
    examples: Sequence[SFTExample],
    *,
    output_dir: str | os.PathLike[str],
    lora: LoraSettings,
    sft: SFTSettings,
    seed: int,
    model: Any = None,
    tokenizer: Any = None,
    base_model_id: str | None = None,
    display_progress: bool = False,
) -> TrainResult:
    """Train a fresh LoRA adapter on the base model and save it atomically to ``output_dir``.

    The loss covers only the instruction (completion) tokens. The adapter folder holds
    ``adapter_model.safetensors``, ``adapter_config.json`` (whose ``base_model_name_or_path`` is
    ``base_model_id``, not a machine-local path) and ``trprompt_training.json``; it appears under
    ``output_dir`` only once complete (written to a sibling temp folder, then renamed). An existing
    adapter in ``output_dir`` is replaced.

    Args:
        base_model_path: Folder of the base model (e.g. ``resolve_model("smollm2-135m-instruct")``), or any
            name :func:`trprompt_dspy.models.resolve_model` understands (a preset name...). Not loaded
            when ``model`` is given.
        examples: The supervised examples; must not be empty.
        output_dir: Where the adapter is written.
        lora: Adapter settings (``LoraSettings.to_peft``).
        sft: Trainer settings (``SFTSettings.to_trl``).
        seed: Seed for adapter init, data order and dropout.
        model: An already loaded bare base model to train on (left unchanged afterwards).
        tokenizer: Its tokenizer (required with ``model``).
        base_model_id: Id recorded in ``adapter_config.json`` (default: the model name passed, or the
            folder name of ``base_model_path``).
        display_progress: Show a tqdm bar besides the per-step log lines.

    Returns:
        The :class:`TrainResult` with one loss per logging step (``sft.logging_steps``).

    Raises:
        ValueError: Empty or invalid examples, a non-empty non-adapter ``output_dir``, or ``model``
            without ``tokenizer``.
    """
    t0 = time.perf_counter()
    build_sft_records(examples)  # validate before any loading
    if (model is None) != (tokenizer is None):
        raise ValueError("Pass both model= and tokenizer= (an already loaded base), or neither to load "
                         f"{str(base_model_path)!r}.")
    out = Path(output_dir).expanduser().resolve()
    _check_output_dir(out)
    if base_model_id is None:
        base_model_id = _default_model_id(base_model_path)
    if model is None:
        logger.info("Loading base model %s for LoRA training", base_model_id)
        with _quiet_progress_bars():
            model, tokenizer = _load_base(base_model_path)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(out)
    try:
        with lora_trainer(model, tokenizer, examples, lora=lora, sft=sft, seed=seed,
                          display_progress=display_progress) as trainer:
            num_kept = len(trainer.train_dataset)
            t_train = time.perf_counter()
            trainer.train()
            train_seconds = time.perf_counter() - t_train
            history = list(trainer.state.log_history)
            steps = int(trainer.state.global_step)
            # base_model_name_or_path is rewritten afterwards; setting it here makes PEFT look it up on the hub.
            trainer.model.save_pretrained(str(staging), safe_serialization=True, save_embedding_layers=False)
        _finish_adapter_folder(staging, base_model_id)
        losses = [float(h["loss"]) for h in history if "loss" in h]
        result = TrainResult(adapter_path=str(out), num_examples=num_kept, steps=steps, losses=losses,
                             seconds=round(time.perf_counter() - t0, 3), epoch_losses=epoch_mean_losses(history))
        info = {"result": result.to_dict(), "base_model": base_model_id, "seed": seed, "lora": lora.to_dict(),
                "sft": sft.to_dict(), "train_seconds": round(train_seconds, 3),
                "seconds_per_step": round(train_seconds / max(1, steps), 3), "log_history": history}
        atomic_write_json(staging / TRAINING_INFO, info)
        _publish(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("LoRA SFT done: %s; adapter at %s", sft_summary(num_kept, steps, train_seconds, history), out)
    return result


def _default_model_id(base_model_path: str | os.PathLike[str]) -> str:
    """Preset name for presets, the folder name for local folders, else the id as given (a hub id)."""
    from trprompt_dspy.models.presets import get_preset, is_preset_name

    text = os.fspath(base_model_path)
    if is_preset_name(text):
        return get_preset(text).name
    path = Path(text).expanduser()
    return path.name if path.exists() else text


def _finish_adapter_folder(folder: Path, base_model_id: str) -> None:
    """Check the saved files and make ``adapter_config.json`` name ``base_model_id``, not a local path."""
    if not is_adapter_dir(folder):
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise RuntimeError(f"PEFT did not write {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (found {found}); "
                           "check the installed peft version.")
    cfg_path = folder / ADAPTER_CONFIG
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base_model_id
    atomic_write_text(cfg_path, json.dumps(cfg, indent=2, sort_keys=True))
    readme = folder / "README.md"  # PEFT's auto-generated model card names the local path; not needed
    if readme.is_file():
        readme.unlink()
