"""The trainable prompt model: a local Hugging Face causal LM plus a LoRA adapter.

:class:`HFPromptModel` implements :class:`~trprompt_dspy.backends.prompt_model.base.PromptModel` in-process
with transformers and PEFT:

* **generate** renders each request with :func:`~trprompt_dspy.backends.prompt_model.base.build_messages` and
  runs :func:`~trprompt_dspy.models.hf_runtime.generate_chats`. Calls from many threads are merged by a
  :class:`~trprompt_dspy.models.batching.MicroBatcher`: all greedy requests can share one left-padded
  batch, and so can sampling calls with equal settings (a merged batch samples with its first call's
  seed). With ``reproducible_sampling=True`` a seeded call instead runs on its own, so its samples depend
  only on its own requests and seed (slower under concurrency).
* **train** fine-tunes a fresh adapter with :func:`~trprompt_dspy.backends.prompt_model.lora_training.train_lora` on the *same*
  loaded base weights (the adapter is injected for training and removed again, so the base never
  changes), saves it and makes it the active adapter.
* **load_adapter** switches adapters (or back to the bare base with ``None``).

The model loads lazily on first use. Deep copies return the same object, so DSPy's program copies share
one loaded model.

Reproducibility: greedy decoding (``temperature=0``) repeats exactly for the same calls, and so does
seeded sampling with ``reproducible_sampling=True`` (or when calls are not concurrent). In bfloat16 on CPU, though, matrix kernels round differently for different batch sizes, so a
request's greedy text can change when concurrent calls put it in a batch with other requests. Use
``dtype="float32"`` (batch-independent in our tests) or ``max_batch_size=1`` when every single request
must be bit-for-bit reproducible regardless of concurrency.

Example:
    >>> from trprompt_dspy.backends.prompt_model.hf import HFPromptModel
    >>> pm = HFPromptModel("smollm2-135m-instruct")                                  # doctest: +SKIP
    >>> req = InstructionRequest("qa", "question -> answer", "question: 2+3?", "Correct.")  # doctest: +SKIP
    >>> pm.generate([req], max_new_tokens=48)                                        # doctest: +SKIP
    [['Answer the question by adding the two numbers ...']]
    >>> pm.train(examples, output_dir="runs/it1/adapter", lora=LoraSettings(), sft=SFTSettings())  # doctest: +SKIP
    >>> pm.describe()["adapter_path"]                                                # doctest: +SKIP
    '.../runs/it1/adapter'
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trprompt_dspy._lazy import require
from trprompt_dspy.backends.prompt_model.base import (
    DEFAULT_MAX_INSTRUCTION_TOKENS,
    INSTRUCTION_STOP,
    InstructionRequest,
    InstructionStats,
    SFTExample,
    TrainResult,
    build_messages,
    check_generate_args,
)
from trprompt_dspy.config import LoraSettings, SFTSettings
from trprompt_dspy.models.batching import MicroBatcher
from trprompt_dspy.models.presets import DEFAULT_PROMPT_MODEL, get_preset, is_preset_name

__all__ = ["HFPromptModel"]

logger = logging.getLogger(__name__)

_DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class _Job:
    """One unit of generation work: chats sharing the sampling settings below."""

    chats: tuple[tuple[dict[str, str], ...], ...]
    max_new_tokens: tuple[int, ...]
    temperature: float
    n: int
    seed: int | None
    key: tuple

    @property
    def size(self) -> int:
        return len(self.chats) * self.n


def _model_id(model: str | os.PathLike[str]) -> str:
    """Preset name for presets and aliases, otherwise the id or path exactly as given."""
    text = os.fspath(model)
    return get_preset(text).name if is_preset_name(text) else text


def _check_adapter_dir(path: str | os.PathLike[str]) -> Path:
    from trprompt_dspy.backends.prompt_model.lora_training import check_adapter_dir

    return check_adapter_dir(path)


class HFPromptModel:
    """A local transformers prompt model with LoRA training (implements ``PromptModel``).

    Args:
        model: Preset name (default ``"smollm2-135m-instruct"``), model folder, ``.gguf`` file or hub id;
            resolved with :func:`trprompt_dspy.models.resolve_model`.
        adapter_path: A LoRA adapter folder to activate on load.
        dtype: Weight dtype for generation and training: ``"auto"`` (default: bfloat16 where the hardware
            computes it natively, float32 elsewhere; :mod:`trprompt_dspy.models.dtype`), ``"bfloat16"``,
            ``"float32"`` or ``"float16"`` (GPU only).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA when available.
        max_batch_size: Most sequences (requests × n) per ``generate`` batch.
        batch_wait_s: How long the batcher waits for concurrent calls to join a batch.
        allow_download: Let ``resolve_model`` download missing weights.
        display_progress: Show a tqdm bar while training.

    Raises:
        ValueError: Bad ``dtype``/``max_batch_size``, or ``adapter_path`` is not an adapter folder.
        FileNotFoundError: ``adapter_path`` does not exist.

    Example:
        Building one is cheap: the weights load on the first ``generate`` or ``train``.

        >>> pm = HFPromptModel("smollm2-135m-instruct", max_batch_size=16)
        >>> pm.describe()["base_model"], pm.adapter_path
        ('smollm2-135m-instruct', None)
        >>> pm.generate([request], max_new_tokens=48)   # loads SmolLM2 (train extra)  # doctest: +SKIP
        [['Add the two numbers, then state the sum.']]
    """

    def __init__(self, model: str | os.PathLike[str] = DEFAULT_PROMPT_MODEL, *,
                 adapter_path: str | os.PathLike[str] | None = None, dtype: str = "auto",
                 device: str | None = None, max_batch_size: int = 16, batch_wait_s: float = 0.02,
                 allow_download: bool = False, display_progress: bool = False,
                 reproducible_sampling: bool = False) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}; got {dtype!r}.")
        self.model_ref = os.fspath(model)
        self.model_id = _model_id(model)
        self.dtype = dtype
        self.device = device
        self.allow_download = allow_download
        self.display_progress = display_progress
        self.reproducible_sampling = bool(reproducible_sampling)
        self._adapter_path: str | None = None if adapter_path is None else str(_check_adapter_dir(adapter_path))
        self._folder: Path | None = None
        self._base: Any = None  # the bare transformers model (never modified)
        self._active: Any = None  # the base, or a PeftModel wrapping it
        self._tokenizer: Any = None
        self._load_lock = threading.Lock()
        self._model_lock = threading.RLock()  # held while generating, training or switching adapters
        #: Instructions written and how many hit ``max_new_tokens`` before the end-of-turn token.
        self.instruction_stats = InstructionStats()
        self._batcher: MicroBatcher[_Job, list[list[str]]] = MicroBatcher(
            self._run_jobs, max_batch_size=max_batch_size, max_wait_s=batch_wait_s, key=lambda job: job.key,
            size=lambda job: job.size, name="trprompt-hf-prompt-model")

    # ------------------------------------------------------------------ PromptModel protocol

    @property
    def adapter_path(self) -> str | None:
        """The active adapter folder, or ``None`` for the bare base model."""
        return self._adapter_path

    def generate(self, requests: Sequence[InstructionRequest], *, temperature: float = 0.0, n: int = 1,
                 max_new_tokens: int = DEFAULT_MAX_INSTRUCTION_TOKENS, seed: int | None = None) -> list[list[str]]:
        """Write ``n`` instructions per request (thread-safe; concurrent calls are batched).

        Args:
            requests: The requests; the result has one list per request, in order.
            temperature: 0 is greedy and deterministic; > 0 samples.
            n: Instructions per request.
            max_new_tokens: Token budget per instruction.
            seed: Makes sampling reproducible: the same call with the same seed gives the same samples.

        Returns:
            ``n`` strings per request (``""`` for a request whose prompt does not fit the context).

        Raises:
            TypeError: A request is not an :class:`InstructionRequest`.
            ValueError: ``n < 1``, ``temperature < 0`` or ``max_new_tokens < 1``.
        """
        requests = check_generate_args(requests, n=n, temperature=temperature, max_new_tokens=max_new_tokens)
        if not requests:
            return []
        self._ensure_loaded()
        chats = [tuple(build_messages(r)) for r in requests]
        budgets = self._fit_budgets(chats, max_new_tokens)
        live = [i for i, b in enumerate(budgets) if b > 0]
        outputs: list[list[str]] = [[""] * n for _ in requests]
        if not live:
            return outputs
        jobs = self._make_jobs([chats[i] for i in live], [budgets[i] for i in live], float(temperature), n, seed)
        results = [row for job_rows in self._batcher.map(jobs) for row in job_rows]
        if temperature == 0 and n > 1:
            results = [row * n for row in results]  # greedy samples are identical: decode once
        for i, row in zip(live, results, strict=True):
            outputs[i] = row
        return outputs

    def train(self, examples: Sequence[SFTExample], *, output_dir: str | Path, lora: LoraSettings,
              sft: SFTSettings, seed: int = 0) -> TrainResult:
        """Fine-tune a fresh LoRA adapter on the base weights, save it and make it active.

        Generation waits while training runs. On failure the previously active adapter stays active.

        Args:
            examples: Supervised examples (request → instruction); must not be empty.
            output_dir: Adapter folder to write (replaced if it already holds an adapter).
            lora: Adapter settings.
            sft: Trainer settings.
            seed: Seed for adapter init, data order and dropout.

        Returns:
            The :class:`TrainResult` (losses per logging step, steps, seconds, adapter path).
        """
        from trprompt_dspy.backends.prompt_model.lora_training import build_sft_records, train_lora

        build_sft_records(examples)  # fail on bad input before waiting for the model
        lora, sft = LoraSettings.from_value(lora), SFTSettings.from_value(sft)
        self._ensure_loaded()
        with self._model_lock:
            previous = self._adapter_path
            self._set_adapter(None)
            try:
                result = train_lora(self._folder, examples, output_dir=output_dir, lora=lora, sft=sft, seed=seed,
                                    model=self._base, tokenizer=self._tokenizer, base_model_id=self.model_id,
                                    display_progress=self.display_progress)
            except BaseException:
                if previous is not None:
                    self._set_adapter(previous)
                raise
            self._set_adapter(result.adapter_path)
        return result

    def load_adapter(self, path: str | os.PathLike[str] | None) -> None:
        """Activate the adapter in ``path``, or the bare base model with ``None``.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: ``path`` is not a PEFT adapter folder.
        """
        target = None if path is None else str(_check_adapter_dir(path))
        if self._base is None:  # not loaded yet: remember it for the lazy load
            with self._load_lock:
                if self._base is None:
                    self._adapter_path = target
                    return
        with self._model_lock:
            self._set_adapter(target)

    def describe(self) -> dict[str, Any]:
        """JSON-able description for artifacts and logs."""
        return {"backend": "hf", "base_model": self.model_id, "adapter_path": self._adapter_path,
                "dtype": self._loaded_dtype() or self.dtype, "device": self.device or self._loaded_device()}

    # ------------------------------------------------------------------ extras

    @property
    def model(self) -> Any:
        """The active transformers model (the base, or a ``PeftModel`` around it); loads on first use."""
        self._ensure_loaded()
        return self._active

    @property
    def base_model(self) -> Any:
        """The base transformers model; loads on first use.

        Its weights never change, but while an adapter is active PEFT wraps its attention projections
        in place (the original weights live on as ``*.base_layer.weight``).
        """
        self._ensure_loaded()
        return self._base

    @property
    def tokenizer(self) -> Any:
        """The tokenizer (left padding); loads on first use."""
        self._ensure_loaded()
        return self._tokenizer

    def batch_stats(self) -> dict[str, int]:
        """Batcher counters: ``items`` (jobs), ``batches`` and ``max_batch``."""
        return self._batcher.stats()

    def close(self) -> None:
        """Stop the batching thread and free the model (it reloads lazily on the next call)."""
        self._batcher.close()
        with self._load_lock, self._model_lock:  # same order as _ensure_loaded
            if self._active is not None and self._active is not self._base:
                self._active.unload()
            self._base = self._active = self._tokenizer = None

    def __deepcopy__(self, memo: dict) -> HFPromptModel:
        return self  # DSPy deep-copies programs; all copies share one loaded model

    def __copy__(self) -> HFPromptModel:
        return self

    def __repr__(self) -> str:
        return f"HFPromptModel({self.model_id!r}, adapter_path={self._adapter_path!r}, dtype={self.dtype!r})"

    # ------------------------------------------------------------------ internals

    def _ensure_loaded(self) -> None:
        if self._base is not None:
            return
        with self._load_lock:
            if self._base is not None:
                return
            from trprompt_dspy.models.hf_runtime import load_causal_lm
            from trprompt_dspy.models.provision import resolve_model

            folder = resolve_model(self.model_ref, allow_download=self.allow_download)
            base, tokenizer = load_causal_lm(folder, dtype=self.dtype, device=self.device)
            with self._model_lock:
                self._folder, self._base, self._active, self._tokenizer = folder, base, base, tokenizer
                wanted, self._adapter_path = self._adapter_path, None
                if wanted is not None:
                    self._attach(wanted)

    def _loaded_dtype(self) -> str | None:
        base = self._base
        return None if base is None else str(getattr(base, "dtype", "")).removeprefix("torch.") or None

    def _loaded_device(self) -> str | None:
        base = self._base
        return None if base is None else str(base.device)

    def _set_adapter(self, path: str | None) -> None:
        """Swap the active adapter (caller holds ``_model_lock``); on failure the base stays bare."""
        peft = require("peft", extra="train")
        if isinstance(self._active, peft.PeftModel):
            self._active.unload()
        self._active, self._adapter_path = self._base, None
        if path is not None:
            self._attach(path)

    def _attach(self, path: str) -> None:
        peft = require("peft", extra="train")
        with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            self._active = peft.PeftModel.from_pretrained(self._base, path, is_trainable=False).eval()
        self._adapter_path = path
        logger.info("HFPromptModel %s: adapter %s active", self.model_id, path)

    def _fit_budgets(self, chats: list[tuple[dict[str, str], ...]], max_new_tokens: int) -> list[int]:
        """Per-chat token budgets clamped to the context window (0: the prompt alone does not fit)."""
        limit = getattr(self._base.config, "max_position_embeddings", None)
        if not limit:
            return [max_new_tokens] * len(chats)
        budgets = []
        with self._model_lock:  # the tokenizer is not thread-safe
            for chat in chats:
                ids = self._tokenizer.apply_chat_template(list(chat), add_generation_prompt=True, tokenize=True,
                                                          return_dict=True)["input_ids"]
                room = limit - len(ids)
                if room <= 0:
                    logger.warning("Prompt of %d tokens does not fit the %d-token context of %s; returning ''.",
                                   len(ids), limit, self.model_id)
                budgets.append(max(0, min(max_new_tokens, room)))
        return budgets

    def _make_jobs(self, chats: list[tuple[dict[str, str], ...]], budgets: list[int], temperature: float, n: int,
                   seed: int | None) -> list[_Job]:
        if temperature == 0:  # greedy: one job per chat, all mergeable
            return [_Job((c,), (b,), 0.0, 1, None, ("greedy",)) for c, b in zip(chats, budgets, strict=True)]
        if seed is None or not self.reproducible_sampling:  # mergeable with equal settings
            return [_Job((c,), (b,), temperature, n, seed, ("sample", temperature, n))
                    for c, b in zip(chats, budgets, strict=True)]
        # Seeded: this call's chats in fixed chunks, each with a derived seed, never merged with other calls.
        per_chunk = max(1, self._batcher.max_batch_size // n)
        call = uuid.uuid4().hex
        return [_Job(tuple(chats[i:i + per_chunk]), tuple(budgets[i:i + per_chunk]), temperature, n,
                     seed + i // per_chunk, ("seeded", call, i)) for i in range(0, len(chats), per_chunk)]

    def _run_jobs(self, jobs: list[_Job]) -> list[list[list[str]]]:
        """Batcher callback: one ``generate_chats`` for jobs sharing a key; returns rows per job."""
        from trprompt_dspy.models.hf_runtime import generate_chats

        chats = [list(c) for job in jobs for c in job.chats]
        budgets = [b for job in jobs for b in job.max_new_tokens]
        first = jobs[0]
        with self._model_lock:
            results = generate_chats(self._active, self._tokenizer, chats, max_new_tokens=budgets,
                                     temperature=first.temperature, top_p=1.0, n=first.n, seed=first.seed,
                                     stop=INSTRUCTION_STOP)
        rows = [r.texts for r in results]
        for r in results:
            for i, (reason, tokens) in enumerate(zip(r.finish_reasons, r.completion_tokens, strict=False)):
                self.instruction_stats.record(hit_cap=reason == "length", completion_tokens=tokens,
                                              prompt_tokens=r.prompt_tokens if i == 0 else 0)
        out, start = [], 0
        for job in jobs:
            out.append(rows[start:start + len(job.chats)])
            start += len(job.chats)
        return out
