"""A prompt model served by vLLM: fast batched generation, LoRA training with TRL/PEFT.

:class:`VLLMPromptModel` implements :class:`~trprompt_dspy.backends.prompt_model.base.PromptModel`:

* **generate** renders each request with :func:`~trprompt_dspy.backends.prompt_model.base.build_messages` (the
  rendering the HF backend and training use) and sends one OpenAI chat-completions request per query from
  a thread pool, so the server's continuous batching sees them all at once. ``n``, ``temperature``,
  ``seed`` and ``max_new_tokens`` map onto the request (``temperature=0`` is greedy; a seeded request
  samples the same way whatever else the server is running).
* **train** fine-tunes a fresh adapter in-process with :func:`~trprompt_dspy.backends.prompt_model.lora_training.train_lora` (TRL +
  PEFT, on the local HF base folder the server serves), then loads it into the running server
  (``/v1/load_lora_adapter``) under a unique name and sends later requests to that name. The previous
  adapter is unloaded once no request uses it any more.
* **load_adapter** does the same for an existing adapter folder; ``None`` goes back to the base model.

The server is either started by this object on first use (a :class:`~trprompt_dspy.serving.VLLMServer`
with LoRA enabled, stopped by :meth:`VLLMPromptModel.close` or at exit), or an existing one given as
``server=`` or ``base_url=`` (started with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``).

Example:
    >>> from trprompt_dspy.backends.prompt_model.vllm import VLLMPromptModel
    >>> pm = VLLMPromptModel("smollm2-135m-instruct")           # starts vLLM on first use  # doctest: +SKIP
    >>> pm.generate([req], max_new_tokens=48)                    # doctest: +SKIP
    [['Add the two numbers ...']]
    >>> pm.train(examples, output_dir="runs/it1/adapter", lora=LoraSettings(), sft=SFTSettings())  # doctest: +SKIP
    >>> pm.describe()["active_model"]                            # doctest: +SKIP
    'trprompt-3f2a9c1d'
    >>> pm.close()                                               # doctest: +SKIP
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

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
from trprompt_dspy.models.presets import DEFAULT_PROMPT_MODEL, get_preset, is_preset_name
from trprompt_dspy.serving.http import ServerRequestError, get_json, post_json

__all__ = ["VLLMPromptModel"]

logger = logging.getLogger(__name__)


def _check_adapter_dir(path: str | os.PathLike[str]) -> str:
    from trprompt_dspy.backends.prompt_model.lora_training import check_adapter_dir

    return str(check_adapter_dir(path))


class VLLMPromptModel:
    """A prompt model whose generation runs on a vLLM server (implements ``PromptModel``).

    Args:
        model: Base model: preset name (default ``"smollm2-135m-instruct"``), HF folder or ``.gguf`` file. It is
            what a started server serves and what LoRA training loads, so it must be the server's base model.
        base_url: Use an already running server (``http://host:port/v1``) instead of starting one.
        server: Use this :class:`~trprompt_dspy.serving.VLLMServer` (started on first use if it is not yet).
        served_model_name: The base model's name on a ``base_url`` server (default: discovered from ``/v1/models``).
        adapter_path: Adapter folder to activate on first use.
        server_options: Keyword arguments for the :class:`~trprompt_dspy.serving.VLLMServer` started here
            (e.g. ``{"max_model_len": 4096, "device": "gpu"}``); LoRA is always enabled.
        max_lora_rank: ``--max-lora-rank`` of a server started here; training refuses a larger ``LoraSettings.r``.
        server_lora_rank: The ``--max-lora-rank`` of a ``base_url`` server, when known (training then refuses a
            larger ``LoraSettings.r`` before it starts instead of failing when the adapter is loaded).
        max_concurrency: Requests in flight at once (the server batches them).
        request_timeout: Seconds per HTTP request.
        api_key: Sent as a bearer token (vLLM ignores it unless started with ``--api-key``).
        allow_download: Let ``resolve_model`` download missing base weights.
        keep_train_model: Keep the base model loaded in this process between ``train`` calls (faster; costs RAM).
        display_progress: Show a tqdm bar while training.
        adapter_prefix: Adapters get names ``<prefix>-<8 hex>`` on the server.

    Raises:
        ValueError: Bad sizes or both ``base_url`` and ``server``.

    Example:
        >>> pm = VLLMPromptModel("smollm2-135m-instruct", base_url="http://127.0.0.1:8012/v1")
        >>> pm.adapter_path is None            # nothing is contacted until the first generate/train
        True
        >>> from trprompt_dspy import TRPromptOptimizer                         # doctest: +SKIP
        >>> TRPromptOptimizer(metric=my_metric, auto="light", prompt_model=pm)  # doctest: +SKIP
    """

    trainable = True

    def __init__(self, model: str | os.PathLike[str] = DEFAULT_PROMPT_MODEL, *, base_url: str | None = None,
                 server: Any = None, served_model_name: str | None = None,
                 adapter_path: str | os.PathLike[str] | None = None, server_options: dict[str, Any] | None = None,
                 max_lora_rank: int = 16, server_lora_rank: int | None = None, max_concurrency: int = 16,
                 request_timeout: float = 300.0,
                 api_key: str = "EMPTY", allow_download: bool = False, keep_train_model: bool = True,
                 display_progress: bool = False, adapter_prefix: str = "trprompt") -> None:
        if base_url is not None and server is not None:
            raise ValueError("Pass base_url= or server=, not both.")
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"max_concurrency must be a positive integer; got {max_concurrency!r}.")
        if isinstance(max_lora_rank, bool) or not isinstance(max_lora_rank, int) or max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be a positive integer; got {max_lora_rank!r}.")
        if base_url is not None and not str(base_url).startswith(("http://", "https://")):
            raise ValueError(f"base_url must look like 'http://127.0.0.1:8000/v1'; got {base_url!r}.")
        opts = dict(server_options or {})
        for key in ("enable_lora", "model"):
            if key in opts:
                raise ValueError(f"server_options must not set {key!r}: the prompt model sets it.")
        self.model_ref = os.fspath(model)
        self.model_id = get_preset(self.model_ref).name if is_preset_name(self.model_ref) else self.model_ref
        self.max_lora_rank = max_lora_rank
        self.server_lora_rank = server_lora_rank
        self.max_concurrency = max_concurrency
        self.request_timeout = float(request_timeout)
        self.api_key = api_key
        self.allow_download = allow_download
        self.keep_train_model = keep_train_model
        self.display_progress = display_progress
        self.adapter_prefix = adapter_prefix
        self._server_options = opts
        self._server = server
        self._owns_server = False
        self._base_url = None if base_url is None else str(base_url).rstrip("/")
        self._base_name = served_model_name
        self._adapter_path: str | None = None if adapter_path is None else _check_adapter_dir(adapter_path)
        self._active_name: str | None = None  # the served name requests go to; None until connected
        self._max_model_len: int | None = None
        self._connected = False
        self._lock = threading.RLock()  # state: connection, active adapter, in-flight counts
        self._train_lock = threading.Lock()
        self._inflight: collections.Counter[str] = collections.Counter()
        self._retired: set[str] = set()
        self._executor: ThreadPoolExecutor | None = None
        self._train_model: Any = None
        self._train_tokenizer: Any = None
        self._folder: Path | None = None
        #: Instructions written and how many hit ``max_new_tokens`` (vLLM's ``finish_reason == "length"``).
        self.instruction_stats = InstructionStats()

    # ------------------------------------------------------------------ PromptModel protocol

    @property
    def adapter_path(self) -> str | None:
        """The active adapter folder, or ``None`` for the bare base model."""
        return self._adapter_path

    def generate(self, requests: Sequence[InstructionRequest], *, temperature: float = 0.0, n: int = 1,
                 max_new_tokens: int = DEFAULT_MAX_INSTRUCTION_TOKENS, seed: int | None = None) -> list[list[str]]:
        """Write ``n`` instructions per request through the server (thread-safe; requests run concurrently).

        Args:
            requests: The requests; the result has one list per request, in order.
            temperature: 0 is greedy; > 0 samples.
            n: Instructions per request.
            max_new_tokens: Token budget per instruction (cut to what fits the server's context).
            seed: Per-request sampling seed (vLLM seeds each request separately, so it is reproducible).

        Returns:
            ``n`` strings per request (``""`` for a request the server rejects, e.g. a prompt that does not fit).

        Raises:
            ServerUnreachableError: The server does not answer.
            ServerRequestError: A systemic error (unknown model, server error).
        """
        requests = check_generate_args(requests, n=n, temperature=temperature, max_new_tokens=max_new_tokens)
        if not requests:
            return []
        self._ensure_connected()
        per_request_n = 1 if temperature == 0 else n
        name = self._acquire()
        try:
            assert self._executor is not None
            futures = [self._executor.submit(self._complete, name, r, float(temperature), per_request_n,
                                             max_new_tokens, seed) for r in requests]
            rows = [f.result() for f in futures]
        finally:
            self._release(name)
        if per_request_n != n:
            rows = [row * n for row in rows]  # greedy samples are identical: decode once
        return rows

    def train(self, examples: Sequence[SFTExample], *, output_dir: str | Path, lora: LoraSettings,
              sft: SFTSettings, seed: int = 0) -> TrainResult:
        """Train a fresh LoRA adapter in-process (TRL/PEFT), save it, load it into the server and activate it.

        Generation keeps using the previous adapter until the new one is loaded. On failure the previous
        adapter stays active.

        Raises:
            ValueError: Empty/invalid examples, or ``lora.r`` above ``max_lora_rank`` of a server started here.
        """
        from trprompt_dspy.backends.prompt_model.lora_training import build_sft_records, train_lora

        build_sft_records(examples)  # fail on bad input before loading anything
        lora, sft = LoraSettings.from_value(lora), SFTSettings.from_value(sft)
        if self._server_rank_limit() is not None and lora.r > self._server_rank_limit():
            raise ValueError(f"LoRA rank r={lora.r} exceeds the server's --max-lora-rank {self._server_rank_limit()}; "
                             f"lower LoraSettings.r, or serve with a larger rank (ModelStack(..., max_lora_rank={lora.r}), "
                             f"VLLMServer(..., max_lora_rank={lora.r}) or VLLMPromptModel(..., max_lora_rank={lora.r})).")
        with self._train_lock:
            folder = self._base_folder()
            model, tokenizer = self._training_base(folder)
            result = train_lora(folder, examples, output_dir=output_dir, lora=lora, sft=sft, seed=seed, model=model,
                                tokenizer=tokenizer, base_model_id=self.model_id,
                                display_progress=self.display_progress)
            del model, tokenizer
            if not self.keep_train_model:
                import gc

                gc.collect()  # the training copy of the base weights is freed here
        self.load_adapter(result.adapter_path)
        return result

    def load_adapter(self, path: str | os.PathLike[str] | None) -> None:
        """Activate the adapter in ``path`` (loaded into the server at run time), or the base with ``None``.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: ``path`` is not a PEFT adapter folder.
            ServerRequestError: The server refused the adapter (rank too high, LoRA not enabled...).
        """
        target = None if path is None else _check_adapter_dir(path)
        with self._lock:
            if not self._connected:  # remembered for the lazy connection
                self._adapter_path = target
                return
        self._activate(target)

    def describe(self) -> dict[str, Any]:
        """JSON-able description for artifacts and logs."""
        return {"backend": "vllm", "base_model": self.model_id, "adapter_path": self._adapter_path,
                "base_url": self.base_url, "served_model": self._base_name, "active_model": self._active_name}

    # ------------------------------------------------------------------ extras

    @property
    def base_url(self) -> str | None:
        """The server's OpenAI base URL (``None`` before a server started here is up)."""
        if self._base_url is None and self._server is not None and self._server.running:
            return self._server.base_url
        return self._base_url

    @property
    def server(self) -> Any:
        """The :class:`~trprompt_dspy.serving.VLLMServer` in use (``None`` with ``base_url=``)."""
        return self._server

    @property
    def active_model(self) -> str | None:
        """The served name requests go to now (the base name or an adapter's unique name)."""
        return self._active_name

    def dspy_lm(self, **kwargs: Any) -> Any:
        """A ``dspy.LM`` for the active model (base or adapter) on the server."""
        import dspy

        self._ensure_connected()
        return dspy.LM(f"openai/{self._active_name}", api_base=self.base_url, api_key=self.api_key, **kwargs)

    def close(self) -> None:
        """Unload adapters loaded here, stop a server started here and free the training model."""
        with self._lock:
            executor, self._executor = self._executor, None
            connected, self._connected = self._connected, False
            adapter = self._active_name if self._active_name != self._base_name else None
            self._active_name = None
        if executor is not None:
            executor.shutdown(wait=True)
        if self._owns_server and self._server is not None:
            self._server.stop()
            self._base_url = None
        elif connected:
            for name in {adapter, *self._retired} - {None}:
                self._unload(name)
        self._retired.clear()
        self._train_model = self._train_tokenizer = None

    def __deepcopy__(self, memo: dict) -> VLLMPromptModel:
        return self  # DSPy deep-copies programs; all copies share one server connection

    def __copy__(self) -> VLLMPromptModel:
        return self

    def __repr__(self) -> str:
        return f"VLLMPromptModel({self.model_id!r}, base_url={self.base_url!r}, adapter_path={self._adapter_path!r})"

    # ------------------------------------------------------------------ internals

    def _server_rank_limit(self) -> int | None:
        if self._server is not None:
            return getattr(self._server, "max_lora_rank", None)
        return self.server_lora_rank if self._base_url is not None else self.max_lora_rank

    def _base_folder(self) -> Path:
        if self._folder is None:
            from trprompt_dspy.models.provision import resolve_model

            self._folder = resolve_model(self.model_ref, allow_download=self.allow_download)
        return self._folder

    def _training_base(self, folder: Path) -> tuple[Any, Any]:
        if not self.keep_train_model:
            return None, None
        if self._train_model is None:
            from trprompt_dspy._lazy import require
            from trprompt_dspy.backends.prompt_model.lora_training import bf16_supported
            from trprompt_dspy.models.hf_runtime import load_causal_lm

            torch = require("torch", extra="train")
            device = "cuda" if torch.cuda.is_available() else "cpu"
            dtype = "bfloat16" if bf16_supported(device) else "float32"
            self._train_model, self._train_tokenizer = load_causal_lm(folder, dtype=dtype, device=device)
        return self._train_model, self._train_tokenizer

    def _ensure_connected(self) -> None:
        if self._connected:
            return
        with self._lock:
            if self._connected:
                return
            if self._base_url is None:
                if self._server is None:
                    from trprompt_dspy.serving.server import VLLMServer

                    opts = {"max_lora_rank": self.max_lora_rank, "allow_download": self.allow_download,
                            **self._server_options}
                    self._server = VLLMServer(self.model_ref, enable_lora=True, **opts)
                    self._owns_server = True
                if not self._server.running:
                    self._server.start()
                url, self._base_name = self._server.base_url, self._base_name or self._server.model_name
            else:
                url = self._base_url
            cards = get_json(f"{url}/models", timeout=30, api_key=self.api_key).get("data", [])
            bases = [c for c in cards if not c.get("parent")]
            if self._base_name is None:
                if not bases:
                    raise RuntimeError(f"The server at {url} lists no base model in /models; pass served_model_name=.")
                self._base_name = bases[0]["id"]
            card = next((c for c in cards if c.get("id") == self._base_name), None)
            if card is None:
                raise ValueError(f"The server at {url} does not serve {self._base_name!r}; it serves "
                                 f"{[c.get('id') for c in cards]}. Pass served_model_name= with one of them.")
            self._max_model_len = card.get("max_model_len")
            self._executor = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="trprompt-vllm")
            self._base_url, self._active_name, self._connected = url, self._base_name, True
            wanted, self._adapter_path = self._adapter_path, None
        if wanted is not None:
            self._activate(wanted)

    def _activate(self, path: str | None) -> None:
        """Load ``path`` under a fresh name (or pick the base), switch to it and retire the previous adapter."""
        self._ensure_connected()
        name = self._base_name
        if path is not None:
            name = f"{self.adapter_prefix}-{uuid.uuid4().hex[:8]}"
            from trprompt_dspy.serving.server import load_lora_adapter

            load_lora_adapter(str(self._base_url), name, path)
        with self._lock:
            previous = self._active_name
            self._active_name, self._adapter_path = name, path
            retire = previous if previous not in (None, self._base_name, name) else None
            unload_now = retire is not None and self._inflight[retire] == 0
            if retire is not None and not unload_now:
                self._retired.add(retire)  # unloaded by the last generate() still using it
        if unload_now:
            self._unload(retire)
        logger.info("VLLMPromptModel %s: now generating with %s (%s)", self.model_id, name, path or "base model")

    def _acquire(self) -> str:
        with self._lock:
            name = str(self._active_name)
            self._inflight[name] += 1
            return name

    def _release(self, name: str) -> None:
        with self._lock:
            self._inflight[name] -= 1
            unload_now = self._inflight[name] <= 0 and name in self._retired
            if unload_now:
                self._retired.discard(name)
                del self._inflight[name]
        if unload_now:
            self._unload(name)

    def _unload(self, name: str) -> None:
        from trprompt_dspy.serving.server import unload_lora_adapter

        try:
            unload_lora_adapter(str(self._base_url), name)
        except Exception as exc:  # noqa: BLE001 - a stale adapter on the server is harmless; keep going
            logger.warning("Could not unload adapter %s from %s: %s", name, self._base_url, exc)

    def _complete(self, name: str, request: InstructionRequest, temperature: float, n: int, max_new_tokens: int,
                  seed: int | None) -> list[str]:
        messages = build_messages(request)
        payload: dict[str, Any] = {"model": name, "messages": messages, "max_tokens": max_new_tokens,
                                   "temperature": temperature, "n": n, "stop": list(INSTRUCTION_STOP)}
        if temperature > 0:
            payload["top_p"] = 1.0
        if seed is not None:
            payload["seed"] = int(seed)
        url = f"{self._base_url}/chat/completions"
        try:
            answer = post_json(url, payload, timeout=self.request_timeout, api_key=self.api_key)
        except ServerRequestError as exc:
            if exc.status != 400:
                raise
            room = self._room(name, messages)
            if room is None or room <= 0 or room >= max_new_tokens:
                logger.warning("The server rejected a prompt-model request (returning ''): %s", exc.body[:300])
                return [""] * n
            payload["max_tokens"] = room  # the prompt fits, but not with the full budget
            try:
                answer = post_json(url, payload, timeout=self.request_timeout, api_key=self.api_key)
            except ServerRequestError as again:
                if again.status != 400:
                    raise
                logger.warning("The server rejected a prompt-model request (returning ''): %s", again.body[:300])
                return [""] * n
        choices = sorted(answer.get("choices", []), key=lambda c: c.get("index", 0))
        texts = [((c.get("message") or {}).get("content") or "").strip() for c in choices]
        usage = answer.get("usage") or {}
        for i, c in enumerate(choices):
            self.instruction_stats.record(hit_cap=c.get("finish_reason") == "length",
                                          prompt_tokens=int(usage.get("prompt_tokens") or 0) if i == 0 else 0,
                                          completion_tokens=int(usage.get("completion_tokens") or 0) if i == 0 else 0)
        return (texts + [""] * n)[:n]

    def _room(self, name: str, messages: list[dict[str, str]]) -> int | None:
        """Tokens left for the completion after the rendered prompt (``/tokenize``), or None if unknown."""
        root = str(self._base_url)[:-3] if str(self._base_url).endswith("/v1") else str(self._base_url)
        try:
            info = post_json(f"{root}/tokenize", {"model": name, "messages": messages, "add_generation_prompt": True},
                             timeout=60, api_key=self.api_key)
        except Exception:  # noqa: BLE001 - best effort; the caller falls back to ''
            return None
        limit = info.get("max_model_len") or self._max_model_len
        count = info.get("count")
        return None if not limit or count is None else int(limit) - int(count)
