"""Saving and loading compiled programs: ``program.json`` + ``adapter/`` (safetensors) + ``trprompt.json``.

A compiled program is saved as a folder::

    artifact/
      program.json     DSPy's own JSON state (instructions, demos, t*, generation settings per predictor)
      adapter/         the prompt model's PEFT LoRA adapter (safetensors + adapter_config.json)
      trprompt.json    sidecar: format_version, base model id, adapter path (relative), t*, versions

Loading never unpickles anything: build the same program class, then call :func:`load_compiled`::

    program = load_compiled(MathCoT(), "artifact", prompt_model=HFPromptModel("smollm2-135m-instruct"))
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import dspy

from trprompt_dspy.backends.prompt_model.base import PromptModel
from trprompt_dspy.compiled.program import (
    QueryAwarePredict,
    install_query_aware,
    query_aware_predictors,
)
from trprompt_dspy.results import STUDENT
from trprompt_dspy.runtime.atomic import atomic_replace_dir, atomic_write_text, staging_dir

__all__ = ["save_compiled", "load_compiled", "FORMAT_VERSION"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_UNSAFE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy"}
_SIDECAR_KEYS = {"format_version", "selected", "created_at", "program_file", "program_class", "prompt_model", "base_model",
                 "adapter_path", "optimal_reward", "generation", "predictors", "versions"}


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for dist, key in (("trprompt-dspy", "trprompt_dspy"), ("dspy", "dspy"), ("transformers", "transformers"),
                      ("peft", "peft")):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    return out


def _copy_adapter(src: Path, dest: Path) -> None:
    if not src.is_dir():
        raise FileNotFoundError(f"The prompt model's adapter_path {str(src)!r} is not a folder; cannot save it.")
    tmp = staging_dir(dest)
    copied, skipped = [], []
    try:
        for f in sorted(src.iterdir()):
            if not f.is_file() or f.name.startswith("."):
                continue
            if f.suffix.lower() in _UNSAFE_SUFFIXES:
                skipped.append(f.name)
                continue
            shutil.copyfile(f, tmp / f.name)
            copied.append(f.name)
        if not copied:
            raise ValueError(f"Adapter folder {str(src)!r} holds no files that can be saved safely (skipped "
                             f"{skipped}); save adapters with safetensors (safe_serialization=True).")
        if skipped:
            logger.warning("save_compiled: not copying pickle-based adapter files %s (only safetensors/JSON).", skipped)
        atomic_replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _single_prompt_model(preds: list[tuple[str, QueryAwarePredict]], given: PromptModel | None) -> PromptModel:
    if given is not None:
        return given
    def key(pm: Any) -> tuple[int, str | None]:  # pinned views of one model with one adapter are one model
        return id(getattr(pm, "model", pm)), getattr(pm, "adapter_path", None)

    models = {key(p.prompt_model): p.prompt_model for _, p in preds if p.prompt_model is not None}
    if len(models) != 1:
        what = "none is attached" if not models else f"{len(models)} different ones are attached"
        raise ValueError(f"save_compiled needs the program's prompt model but {what}; pass prompt_model=... .")
    return next(iter(models.values()))


def save_compiled(program: dspy.Module, path_dir: str | Path, *, prompt_model: PromptModel | None = None) -> Path:
    """Save a compiled program as a folder: ``program.json`` + ``adapter/`` + ``trprompt.json``.

    Files are written atomically; the sidecar ``trprompt.json`` is written last. The adapter is the
    prompt model's active adapter folder (pickle files such as ``*.bin``/``*.pt`` are never copied).

    Args:
        program: A program with :class:`QueryAwarePredict` predictors.
        path_dir: Output folder (created if needed; an existing save there is replaced).
        prompt_model: The prompt model to describe and take the adapter from; default: the one attached.

    Returns:
        The folder path.

    Example:
        >>> save_compiled(compiled, "artifacts/qa")                             # doctest: +SKIP
        >>> loaded = load_compiled(MyProgram(), "artifacts/qa", prompt_model=pm)  # doctest: +SKIP
    """
    preds = query_aware_predictors(program)
    if not preds and getattr(program, "trprompt_selected", None) == STUDENT:
        return _save_student(program, Path(path_dir))
    if not preds:
        raise ValueError(f"{type(program).__name__} has no QueryAwarePredict; nothing TRPrompt-specific to save. "
                         "Use program.save(...) for plain programs.")
    pm = _single_prompt_model(preds, prompt_model)
    out = Path(path_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"save_compiled needs a folder path; {str(out)!r} is a file.")
    out.mkdir(parents=True, exist_ok=True)
    program_text = _program_text(program)
    adapter_rel = None
    if pm.adapter_path:
        _copy_adapter(Path(pm.adapter_path), out / "adapter")
        adapter_rel = "adapter"
    atomic_write_text(out / "program.json", program_text)
    description = dict(pm.describe())
    if "adapter_path" in description:  # the artifact's copy, relative; never this machine's training folder
        description["adapter_path"] = adapter_rel
    first = preds[0][1]
    sidecar = {
        "format_version": FORMAT_VERSION,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "program_file": "program.json",
        "program_class": f"{type(program).__module__}.{type(program).__qualname__}",
        "prompt_model": description,
        "base_model": description.get("base_model") or description.get("model"),
        "adapter_path": adapter_rel,
        "optimal_reward": first.optimal_reward,
        "generation": dict(first.generation),
        "predictors": {n: {"role": p.role, "optimal_reward": p.optimal_reward, "generation": dict(p.generation)}
                       for n, p in preds},
        "versions": _versions(),
    }
    atomic_write_text(out / "trprompt.json", json.dumps(sidecar, indent=2, ensure_ascii=False, default=str))
    logger.info("Saved compiled program (%d query-aware predictors) to %s", len(preds), out)
    return out


def _program_text(program: dspy.Module) -> str:
    from dspy.utils.saving import get_dependency_versions

    state = program.dump_state(json_mode=True)
    state["metadata"] = {"dependency_versions": get_dependency_versions()}
    try:
        return json.dumps(state, indent=2, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"The program state is not JSON-serialisable ({exc}); TRPrompt artifacts are JSON-only.") from exc


def _save_student(program: dspy.Module, out: Path) -> Path:
    """Save a compile that returned the student (no iteration beat it): its state and a sidecar saying so."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"save_compiled needs a folder path; {str(out)!r} is a file.")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "program.json", _program_text(program))
    sidecar = {
        "format_version": FORMAT_VERSION,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "program_file": "program.json",
        "program_class": f"{type(program).__module__}.{type(program).__qualname__}",
        "selected": STUDENT, "predictors": {}, "adapter_path": None, "versions": _versions(),
    }
    atomic_write_text(out / "trprompt.json", json.dumps(sidecar, indent=2, ensure_ascii=False, default=str))
    logger.info("Saved the student program to %s (the compile selected the student: no iteration beat it).", out)
    return out


def _read_sidecar(folder: Path) -> dict[str, Any]:
    side = folder / "trprompt.json"
    if not side.is_file() or not (folder / "program.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a save_compiled folder: it needs trprompt.json and "
                                "program.json.")
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(side)!r} is corrupted (not valid JSON: {exc}). Re-save the program with "
                         "save_compiled, or restore the artifact folder from a copy.") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{str(side)!r} must hold a JSON object; got {type(data).__name__}.")
    version = data.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{str(side)!r} has an invalid format_version {version!r}; expected an integer >= 1.")
    if version > FORMAT_VERSION:
        raise ValueError(f"{str(side)!r} was written by a newer trprompt_dspy (format_version {version}); this "
                         f"version reads format_version <= {FORMAT_VERSION}. Upgrade trprompt_dspy to load it.")
    unknown = sorted(set(data) - _SIDECAR_KEYS)
    if unknown:
        logger.warning("Ignoring unknown key(s) %s in %s.", unknown, side)
    if data.get("selected") == STUDENT and data.get("predictors") == {}:
        return data
    if not isinstance(data.get("predictors"), dict) or not data["predictors"]:
        raise ValueError(f"{str(side)!r} lists no query-aware predictors ('predictors' must be a non-empty object).")
    return data


_KEEP_INSIDE = " Keep the adapter inside the artifact folder (save_compiled writes adapter_path='adapter')."


def _resolve_adapter(folder: Path, rel: Any) -> Path | None:
    if rel is None:
        return None
    if not isinstance(rel, str) or not rel.strip():
        raise ValueError(f"adapter_path in trprompt.json must be a relative path string or null; got {rel!r}.")
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        raise ValueError(f"Refusing absolute adapter_path {rel!r} in trprompt.json; it must be relative to the folder."
                         f"{_KEEP_INSIDE}")
    if ".." in PurePosixPath(rel.replace("\\", "/")).parts:
        raise ValueError(f"Refusing adapter_path {rel!r} in trprompt.json: it leaves the artifact folder ('..')."
                         f"{_KEEP_INSIDE}")
    path = (folder / rel).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise ValueError(f"Refusing adapter_path {rel!r}: it resolves to {str(path)!r}, outside {str(folder)!r}."
                         f"{_KEEP_INSIDE}")
    if not path.is_dir():
        raise FileNotFoundError(f"The adapter folder {str(path)!r} named in trprompt.json does not exist.")
    unsafe = sorted(f.name for f in path.iterdir() if f.suffix.lower() in _UNSAFE_SUFFIXES)
    if unsafe:
        raise ValueError(f"Refusing to load the adapter folder {str(path)!r}: it holds pickle-based files {unsafe}. "
                         "TRPrompt artifacts hold JSON and safetensors only; re-save the adapter with "
                         "safe_serialization=True.")
    return path


def _program_file(folder: Path, name: Any) -> Path:
    """The program state file named in the sidecar: a ``.json`` file directly inside the folder, valid JSON."""
    if not isinstance(name, str) or not name.endswith(".json") or PurePosixPath(name.replace("\\", "/")).name != name:
        raise ValueError(f"program_file in trprompt.json must be a .json file name inside the artifact folder "
                         f"(e.g. 'program.json'); got {name!r}. TRPrompt artifacts never load pickles.")
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"The program state {str(path)!r} named in trprompt.json does not exist; "
                                "re-save the program with save_compiled.")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{str(path)!r} is corrupted (not valid JSON: {exc}). Re-save the program with "
                         "save_compiled, or restore the artifact folder from a copy.") from exc
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object (DSPy program state); got {type(state).__name__}. "
                         "Re-save the program with save_compiled.")
    return path


def load_compiled(
    program: dspy.Module,
    path_dir: str | Path,
    *,
    prompt_model: PromptModel | None = None,
    prompt_model_factory: Callable[[dict[str, Any], str | None], PromptModel] | None = None,
) -> dspy.Module:
    """Load a :func:`save_compiled` folder into a fresh instance of the same program class.

    The saved predictors become :class:`QueryAwarePredict` again, the JSON state is loaded (never a
    pickle), and the saved adapter is loaded into ``prompt_model`` (or into the one
    ``prompt_model_factory(describe_dict, adapter_abs_path)`` builds) and attached. Without either the
    program loads but calling it raises until :func:`attach_prompt_model` is used.

    Args:
        program: An **uncompiled instance of the class that was compiled**, e.g. ``MyProgram()``.
        path_dir: The folder :func:`save_compiled` wrote.
        prompt_model: A prompt model on the same base weights as when saving.
        prompt_model_factory: Alternative to ``prompt_model``: builds one from the saved ``describe()``.

    Returns:
        The program (``program`` itself, or a new predictor if ``program`` is a bare ``dspy.Predict``).

    Example:
        >>> pm = TransformersPromptModel("meta-llama/Llama-3.2-1B-Instruct")     # doctest: +SKIP
        >>> program = load_compiled(MyProgram(), "artifacts/qa", prompt_model=pm)  # doctest: +SKIP
    """
    if prompt_model is not None and prompt_model_factory is not None:
        raise ValueError("Pass prompt_model or prompt_model_factory, not both.")
    if not isinstance(program, dspy.Module):
        raise TypeError(f"program must be a dspy.Module instance (e.g. MyProgram()); got {type(program).__name__}.")
    folder = Path(path_dir)
    side = _read_sidecar(folder)
    if side.get("selected") == STUDENT:
        program.load(str(_program_file(folder, side.get("program_file", "program.json"))))
        program.trprompt_selected = STUDENT
        logger.info("%s holds the student program (the compile selected the student); it runs without a "
                    "prompt model.", folder)
        return program
    adapter = _resolve_adapter(folder, side.get("adapter_path"))
    names = [n for n, _ in program.named_predictors()]
    saved = side["predictors"]
    missing = [n for n in saved if n not in names]
    if missing:
        raise ValueError(f"The saved program has predictor(s) {missing} that {type(program).__name__} lacks (it has "
                         f"{names}). Load into a fresh instance of the class that was saved: {side.get('program_class')}.")
    rewards = {n: str((saved[n] or {}).get("optimal_reward", side.get("optimal_reward") or "")) for n in saved}
    path = str(_program_file(folder, side.get("program_file", "program.json")))
    trial = program.deepcopy()  # fail on a copy before touching the caller's program
    trial = install_query_aware(trial, prompt_model=None, optimal_reward=rewards, predictors=list(saved))
    trial.load(path)
    if prompt_model is None and prompt_model_factory is not None:
        prompt_model = prompt_model_factory(dict(side.get("prompt_model") or {}), str(adapter) if adapter else None)
        if not isinstance(prompt_model, PromptModel):
            raise TypeError(f"prompt_model_factory must return a PromptModel; got {type(prompt_model).__name__}.")
    if prompt_model is not None:
        mine, theirs = prompt_model.describe().get("base_model"), side.get("base_model")
        if mine and theirs and mine != theirs:
            logger.warning("load_compiled: the adapter was trained on %r but the prompt model is %r.", theirs, mine)
        current = prompt_model.adapter_path
        if adapter is None:
            if current is not None:
                prompt_model.load_adapter(None)
        elif current is None or Path(current).resolve() != adapter:
            prompt_model.load_adapter(adapter)
        # The loaded program owns its adapter: loading another artifact into the same prompt model, or
        # compiling with it, must not change what this program writes.
        from trprompt_dspy.backends.prompt_model.pinned import PinnedPromptModel

        prompt_model = PinnedPromptModel(prompt_model, None if adapter is None else str(adapter))
    program = install_query_aware(program, prompt_model=prompt_model, optimal_reward=rewards, predictors=list(saved))
    program.load(path)  # restores demos, signatures, optimal_reward, role and generation
    return program
