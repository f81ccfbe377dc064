"""The model stack: every TRPrompt role as a ``dspy.LM`` or prompt model, and the servers behind them.

TRPrompt has four roles: the **target** (the program's LM, frozen), the **textual reward** model, the
**TextGrad** engine and the **prompt model** Π (fine-tuned with LoRA). The paper runs one model in all
of them. For a local target this library does the same by default (*single-base mode*)::

               one vLLM server (target's base weights, --enable-lora, continuous batching)
    target ──────► base name       reward LM ──► base name       TextGrad LM ──► base name
    prompt model ► adapter "trprompt-<8 hex>" (loaded at run time after each fine-tune)
    training: TRL SFTTrainer + PEFT LoRA in-process on the same HF folder → adapter → loaded into the server

Every role's requests share one batch, the prompt model is as capable as the target, and the compiled
program's extra cost is one short generation per predictor call. With an API target (no local
weights) the prompt model is a separate local model (:data:`~trprompt_dspy.models.presets.DEFAULT_PROMPT_MODEL`).

Two entry points, one set of rules:

* :class:`ModelStack` builds the whole stack from names (what the CLI, the demo and the benchmarks
  use) and stops its servers on exit.
* :func:`resolve_prompt_model` turns the optimizer's ``prompt_model=`` argument into a prompt model for
  a given target LM (what ``TRPromptOptimizer.compile`` uses): ``"auto"`` (default) is single-base
  whenever the target LM was built by this library on local weights (:func:`local_base_of`).

Example:
    >>> stack = ModelStack("qwen2.5-coder-0.5b-instruct", backend="vllm")   # checks names; starts nothing
    >>> stack.single_base
    True
    >>> ModelStack("my-model", backend="api", api_base="http://127.0.0.1:8000/v1", prompt_model="same")
    Traceback (most recent call last):
    ...
    ValueError: prompt_model='same' puts the prompt model on the target's own weights, but backend='api' serves the target from an OpenAI-compatible endpoint with no local weights. Pass prompt_model='auto' or a local preset such as 'smollm2-135m-instruct'.

    With the servers (minutes on CPU)::

        with ModelStack("qwen2.5-coder-0.5b-instruct") as stack:
            dspy.configure(lm=stack.target_lm)
            opt = TRPromptOptimizer(metric=gsm8k_feedback_metric, auto="light", prompt_model=stack.prompt_model)
            compiled = opt.compile(program, trainset=train)
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Literal

from trprompt_dspy.backends.prompt_model.base import PromptModel
from trprompt_dspy.models.local_base import LocalBase, local_base_of, mark_local_base
from trprompt_dspy.models.presets import (
    DEFAULT_PROMPT_MODEL,
    DEFAULT_TARGET_MODEL,
    get_preset,
    is_preset_name,
)

__all__ = ["AUTO", "SAME", "Backend", "DEFAULT_TARGET_MAX_TOKENS", "LocalBase", "ModelStack", "local_base_of",
           "mark_local_base", "prompt_model_factory", "resolve_prompt_model"]

#: The target's completion budget in the stacks the CLI, the demo and the benchmarks build.
DEFAULT_TARGET_MAX_TOKENS = 512

logger = logging.getLogger(__name__)

Backend = Literal["vllm", "hf", "api"]
BACKENDS: tuple[str, ...] = ("vllm", "hf", "api")
#: ``prompt_model="auto"``: single-base for a local target, else :data:`DEFAULT_PROMPT_MODEL`.
AUTO = "auto"
#: ``prompt_model="same"``: a LoRA adapter on the target's own weights (an error for a non-local target).
SAME = "same"
#: Prefix that asks for a prompt model on its own vLLM server (``"vllm:smollm2-135m-instruct"``).
VLLM_PREFIX = "vllm:"


def check_prompt_model_spec(spec: Any, what: str = "prompt_model") -> None:
    """Fail fast on a bad ``prompt_model=`` (or, with ``what``, target) value: a misspelt preset, a missing
    folder, a wrong type."""
    if spec is None or isinstance(spec, PromptModel):
        return
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError("prompt_model must be a PromptModel (e.g. HFPromptModel(...)), 'auto', 'same', a model "
                        f"preset name, an HF id or a local path; got {type(spec).__name__}.")
    ref = os.fspath(spec)
    if ref in (AUTO, SAME):
        return
    if ref.startswith(VLLM_PREFIX):
        ref = ref[len(VLLM_PREFIX):]
    path = Path(ref).expanduser()
    if path.exists():
        return
    looks_like_path = (ref.startswith(("/", "./", "../", "~", ".\\", "..\\")) or path.is_absolute()
                       or "\\" in ref or ref.count("/") > 1 or ref.endswith("/"))
    if looks_like_path:
        raise FileNotFoundError(
            f"{what} path {ref!r} does not exist. Pass an existing model folder (with config.json), a "
            "preset name (see trprompt_dspy.list_presets()), 'auto', 'same' or a Hugging Face id such as 'org/name'."
        )
    if "/" in ref:  # an HF id: checked when loaded
        return
    get_preset(ref)  # raises UnknownModelError listing the presets


def resolve_prompt_model(spec: Any, target_lm: Any = None, *, max_concurrency: int = 16) -> PromptModel:
    """A fresh prompt model for ``spec`` (the optimizer's ``prompt_model=``) and the program's target LM.

    Args:
        spec: A :class:`~trprompt_dspy.backends.prompt_model.base.PromptModel` (returned as is); ``"auto"`` or
            ``None`` (single-base when ``target_lm`` runs on local weights built by this library, else
            :data:`DEFAULT_PROMPT_MODEL` in-process); ``"same"`` (single-base, or an error); ``"vllm:<model>"``
            (a prompt model on its own vLLM server); any other preset / HF id / folder (in-process HF + PEFT).
        target_lm: The target ``dspy.LM``.
        max_concurrency: Requests in flight at once for a vLLM-backed prompt model.

    Raises:
        ValueError: ``"same"`` with a target that has no local weights, or one on a server without LoRA.
    """
    if isinstance(spec, PromptModel):
        return spec
    check_prompt_model_spec(spec)
    ref = AUTO if spec is None else os.fspath(spec)
    base = local_base_of(target_lm)
    if ref == SAME or (ref == AUTO and base is not None and (base.base_url is None or base.lora)):
        if base is None:
            raise ValueError(
                f"prompt_model='same' puts the prompt model on the target's own weights, but the target LM "
                f"{getattr(target_lm, 'model', target_lm)!r} was not built on local weights by this library "
                "(an API model, or a dspy.LM made by hand). Build it with ModelStack(...).target_lm, "
                "VLLMServer(...).dspy_lm() or trprompt_dspy.models.local_lm(...), or pass a local preset such as "
                f"prompt_model={DEFAULT_PROMPT_MODEL!r}.")
        return _single_base_prompt_model(base, max_concurrency=max_concurrency)
    if ref == AUTO:
        if base is not None:
            logger.info("The target's vLLM server at %s has no LoRA support (start it with enable_lora=True for "
                        "single-base mode); using %s as a separate prompt model.", base.base_url,
                        DEFAULT_PROMPT_MODEL)
        ref = DEFAULT_PROMPT_MODEL
    if ref.startswith(VLLM_PREFIX):
        from trprompt_dspy.backends.prompt_model.vllm import VLLMPromptModel

        return VLLMPromptModel(ref[len(VLLM_PREFIX):], max_concurrency=max_concurrency)
    from trprompt_dspy.backends.prompt_model.hf import HFPromptModel

    return HFPromptModel(ref)


def _single_base_prompt_model(base: LocalBase, *, max_concurrency: int) -> PromptModel:
    if base.base_url is None:
        from trprompt_dspy.backends.prompt_model.hf import HFPromptModel

        logger.info("Single-base mode (in-process): the prompt model is a LoRA adapter on %s.", base.model)
        return HFPromptModel(base.model)
    if not base.lora:
        raise ValueError(f"prompt_model='same' needs the target's vLLM server at {base.base_url} to load LoRA "
                         "adapters; start it with VLLMServer(..., enable_lora=True) or `trprompt serve MODEL "
                         "--enable-lora`.")
    from trprompt_dspy.backends.prompt_model.vllm import VLLMPromptModel

    logger.info("Single-base mode: the prompt model is a LoRA adapter on %s, served by %s.", base.model,
                base.base_url)
    # The base is as large as the target: load it for each fine-tune and free it afterwards, instead of
    # keeping a second copy of the target's weights in this process for the whole compile.
    return VLLMPromptModel(base.model, base_url=base.base_url, served_model_name=base.served_name,
                           server_lora_rank=base.max_lora_rank, max_concurrency=max_concurrency,
                           keep_train_model=False)


class ModelStack:
    """Build every role from names: target, textual reward, TextGrad (one ``dspy.LM``) and the prompt model.

    Args:
        target: Preset, HF folder or hub id of the target (with ``backend="api"``: the served model name).
        prompt_model: ``"auto"`` (default: ``"same"`` for a local target, :data:`DEFAULT_PROMPT_MODEL` for
            an API one), ``"same"`` (a LoRA adapter on the target's weights, single-base mode), or a
            preset / folder for a separate prompt model.
        backend: ``"vllm"`` (one local vLLM server; a second one only for a separate prompt model),
            ``"hf"`` (in-process transformers) or ``"api"`` (``api_base`` serves the target).
        api_base: OpenAI-compatible URL for ``backend="api"``.
        api_key: Its key.
        max_tokens: The target's completion budget.
        num_threads: Concurrent requests (``None``: 32 with vLLM, 16 with an API, 8 in-process).
        cache: DSPy's response cache for the target (off: wall times stay real).
        dtype: Weight dtype for the served and in-process models (``"auto"``: :mod:`trprompt_dspy.models.dtype`).
        need_prompt_model: Build no prompt model (a baseline-only run).
        log_dir: Folder for the server logs.
        max_lora_rank: ``--max-lora-rank`` of the server that loads adapters (default 16); training refuses a
            larger ``LoraSettings.r`` before it starts. vLLM pads every adapter to it (with the corrected CPU
            LoRA ops a rank-16 server ran rank-8 adapters within 10 % of a rank-8 one; 2x slower without them).
        server_options: More :class:`~trprompt_dspy.serving.VLLMServer` arguments (``max_model_len``, ``device``...).

    Attributes (after :meth:`start` / ``with``):
        target_lm: The target ``dspy.LM`` (also :attr:`reward_lm` and :attr:`textgrad_lm`).
        prompt_model: The prompt model (``None`` with ``need_prompt_model=False``).
        servers: ``{role: {"model", "base_url", "startup_seconds", "dtype"}}`` for every server started.

    Raises:
        ValueError: An unknown backend, ``backend="api"`` without ``api_base`` (or ``api_base`` without it),
            ``prompt_model="same"`` with an API target.
        UnknownModelError: A misspelt preset name (before any model loads).

    Example:
        Building one checks the names and decides the mode; ``start()`` (or ``with``) starts the servers:

        >>> stack = ModelStack("qwen-0.5b")
        >>> stack.single_base, stack.prompt_model_base, stack.num_threads
        (True, 'qwen2.5-coder-0.5b-instruct', 32)
        >>> ModelStack("gpt-4o-mini", backend="api", api_base="http://127.0.0.1:8000/v1").prompt_model_base
        'smollm2-135m-instruct'
    """

    def __init__(self, target: str = DEFAULT_TARGET_MODEL, *, prompt_model: str = AUTO, backend: str = "vllm",
                 api_base: str | None = None, api_key: str = "EMPTY", max_tokens: int = DEFAULT_TARGET_MAX_TOKENS,
                 num_threads: int | None = None, cache: bool = False, dtype: str = "auto",
                 need_prompt_model: bool = True, log_dir: str | os.PathLike[str] | None = None,
                 max_lora_rank: int | None = None, server_options: dict[str, Any] | None = None) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}.")
        if backend == "api" and not api_base:
            raise ValueError("backend='api' needs api_base (an OpenAI-compatible URL such as "
                             "http://127.0.0.1:8000/v1); or use backend='vllm' to start a server here.")
        if api_base and backend != "api":
            raise ValueError(f"api_base={api_base!r} is only used with backend='api'; pass backend='api' too.")
        if not isinstance(target, (str, os.PathLike)) or not os.fspath(target).strip():
            raise ValueError(f"target must be a preset name, a model folder or a served model name; got {target!r}.")
        target = os.fspath(target)
        if backend != "api":
            check_prompt_model_spec(target if not Path(target).expanduser().exists() else None, what="target")
        if isinstance(prompt_model, PromptModel):
            raise TypeError("ModelStack builds the prompt model from a name; pass the PromptModel object to "
                            "TRPromptOptimizer(prompt_model=...) directly instead.")
        check_prompt_model_spec(prompt_model)
        if prompt_model == SAME and backend == "api":
            raise ValueError(
                "prompt_model='same' puts the prompt model on the target's own weights, but backend='api' serves "
                "the target from an OpenAI-compatible endpoint with no local weights. Pass prompt_model='auto' or "
                f"a local preset such as {DEFAULT_PROMPT_MODEL!r}.")
        from trprompt_dspy.models.dtype import DTYPES

        if dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {DTYPES}; got {dtype!r}.")
        max_lora_rank = 16 if max_lora_rank is None else max_lora_rank
        if isinstance(max_lora_rank, bool) or not isinstance(max_lora_rank, int) or max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be a positive integer; got {max_lora_rank!r}.")
        self.max_lora_rank = max_lora_rank
        for key in ("model", "enable_lora", "dtype", "log_dir", "max_lora_rank"):
            if key in (server_options or {}):
                raise ValueError(f"server_options must not set {key!r}: ModelStack sets it.")
        self.target, self.prompt_model_spec, self.backend = target, prompt_model, backend
        self.api_base, self.api_key, self.max_tokens = api_base, api_key, max_tokens
        self.num_threads = num_threads or {"vllm": 32, "api": 16, "hf": 8}[backend]
        self.cache, self.dtype, self.need_prompt_model = cache, dtype, need_prompt_model
        self.log_dir, self.server_options = log_dir, dict(server_options or {})
        self.target_lm = self.prompt_model = None
        self.servers = {}
        self._exit = contextlib.ExitStack()

    # ------------------------------------------------------------------ derived
    @property
    def single_base(self) -> bool:
        """Whether the prompt model is a LoRA adapter on the target's weights."""
        if self.prompt_model_spec == SAME:
            return True
        return self.prompt_model_spec == AUTO and self.backend != "api"

    @property
    def prompt_model_base(self) -> str:
        """The prompt model's base weights (preset name or folder)."""
        if self.single_base:
            return _canonical(self.target)
        return DEFAULT_PROMPT_MODEL if self.prompt_model_spec == AUTO else _canonical(
            self.prompt_model_spec.removeprefix(VLLM_PREFIX))

    @property
    def reward_lm(self) -> Any:
        """The textual reward model: the target LM (the paper's setup)."""
        return self.target_lm

    @property
    def textgrad_lm(self) -> Any:
        """TextGrad's engine: the target LM."""
        return self.target_lm

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for reports."""
        return {"target": self.target, "backend": self.backend, "single_base": self.single_base,
                "prompt_model": self.prompt_model_base if self.need_prompt_model else None,
                "num_threads": self.num_threads, "servers": self.servers}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> ModelStack:
        """Provision the weights and start what the roles need (idempotent)."""
        if self.target_lm is not None:
            return self
        try:
            {"api": self._start_api, "hf": self._start_hf, "vllm": self._start_vllm}[self.backend]()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop the servers started here (the work using them must have finished)."""
        self._exit.close()
        self._exit = contextlib.ExitStack()

    def __enter__(self) -> ModelStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def prompt_model_for(self, description: dict[str, Any], adapter: str | None) -> PromptModel:
        """The prompt model a saved compiled program needs (``load_compiled(..., prompt_model_factory=...)``).

        Raises:
            ValueError: The artifact's adapter was trained on other base weights than this stack's prompt model.
        """
        from trprompt_dspy.backends.prompt_model.pinned import PinnedPromptModel

        self.start()
        saved = description.get("base_model")
        if saved is not None and _canonical(str(saved)) != _canonical(self.prompt_model_base) \
                and Path(str(saved)).name != Path(self.prompt_model_base).name:
            raise ValueError(f"The compiled program's adapter was trained on {saved!r}, but this stack's prompt "
                             f"model runs {self.prompt_model_base!r}; load it with a stack whose target (single-base) "
                             f"or prompt_model is {saved!r}.")
        if self.prompt_model is None:
            self.prompt_model = self._build_prompt_model()
        return PinnedPromptModel(self.prompt_model, adapter)

    # ------------------------------------------------------------------ backends
    def _target_lm_kwargs(self) -> dict[str, Any]:
        return {"temperature": 0.0, "max_tokens": self.max_tokens, "cache": self.cache}

    def _start_api(self) -> None:
        import dspy

        self.target_lm = dspy.LM(f"openai/{self.target}", api_base=self.api_base, api_key=self.api_key,
                                 **self._target_lm_kwargs())
        if self.need_prompt_model:
            self.prompt_model = self._build_prompt_model()

    def _start_hf(self) -> None:
        from trprompt_dspy.models import local_lm, resolve_model

        resolve_model(self.target)
        self.target_lm = local_lm(self.target, max_tokens=self.max_tokens, temperature=0.0, cache=self.cache,
                                  dtype=self.dtype)
        if self.need_prompt_model:
            self.prompt_model = self._build_prompt_model()

    def _start_vllm(self) -> None:
        from trprompt_dspy.serving import VLLMServer

        lora = self.need_prompt_model and self.single_base
        log_dir = None if self.log_dir is None else Path(self.log_dir)
        server = self._exit.enter_context(VLLMServer(self.target, enable_lora=lora, dtype=self.dtype,
                                                     max_lora_rank=self.max_lora_rank, log_dir=log_dir,
                                                     **self.server_options))
        self._exit.callback(self._close_prompt_model)  # runs before the server stops
        self.servers["target"] = _server_info(server)
        self.target_lm = server.dspy_lm(**self._target_lm_kwargs())
        self._server = server
        if self.need_prompt_model:
            self.prompt_model = self._build_prompt_model()

    def _build_prompt_model(self) -> PromptModel:
        if self.single_base:
            return resolve_prompt_model(SAME, self.target_lm, max_concurrency=self.num_threads)
        ref = self.prompt_model_base
        if self.backend == "vllm":
            from trprompt_dspy.backends.prompt_model.vllm import VLLMPromptModel
            from trprompt_dspy.serving import VLLMServer

            log_dir = None if self.log_dir is None else Path(self.log_dir)
            server = self._exit.enter_context(VLLMServer(ref, enable_lora=True, dtype=self.dtype, log_dir=log_dir,
                                                         max_lora_rank=self.max_lora_rank, **self.server_options))
            self.servers["prompt_model"] = _server_info(server)
            return VLLMPromptModel(ref, server=server, max_concurrency=self.num_threads)
        from trprompt_dspy.backends.prompt_model.hf import HFPromptModel
        from trprompt_dspy.models import resolve_model

        resolve_model(ref)
        return HFPromptModel(ref, dtype=self.dtype)

    def _close_prompt_model(self) -> None:
        close = getattr(self.prompt_model, "close", None)
        if callable(close):
            with contextlib.suppress(Exception):
                close()


def prompt_model_factory(backend: Literal["hf", "vllm"] = "hf", *, base_url: str | None = None,
                         max_concurrency: int = 8) -> Any:
    """A ``prompt_model_factory`` for :func:`~trprompt_dspy.compiled.artifact.load_compiled` without a stack.

    The factory builds the saved program's prompt model on its recorded base weights (default
    :data:`DEFAULT_PROMPT_MODEL` when none is recorded): in-process (``"hf"``) or on a vLLM server
    (``"vllm"``: ``base_url`` of a running one, or a fresh server when ``None``).

    Example:
        >>> build = prompt_model_factory("hf")
        >>> callable(build)
        True
    """
    if backend not in ("hf", "vllm"):
        raise ValueError(f"backend must be 'hf' or 'vllm'; got {backend!r}.")
    if base_url and backend != "vllm":
        raise ValueError("base_url is only used with backend='vllm'.")

    def build(description: dict[str, Any], adapter: str | None) -> PromptModel:
        base = description.get("base_model") or DEFAULT_PROMPT_MODEL
        if backend == "vllm":
            from trprompt_dspy.backends.prompt_model.vllm import VLLMPromptModel

            return VLLMPromptModel(base, base_url=base_url, adapter_path=adapter, max_concurrency=max_concurrency)
        from trprompt_dspy.backends.prompt_model.hf import HFPromptModel

        return HFPromptModel(base, adapter_path=adapter)

    return build


def _canonical(ref: str) -> str:
    return get_preset(ref).name if is_preset_name(ref) else ref


def _server_info(server: Any) -> dict[str, Any]:
    return {"model": getattr(server, "model_name", None), "base_url": getattr(server, "base_url", None),
            "startup_seconds": round(float(getattr(server, "startup_seconds", 0.0) or 0.0), 1),
            "dtype": getattr(server, "resolved_dtype", None), "lora": getattr(server, "enable_lora", None)}
