"""The ``log_dir`` layout: atomic files a person can open, and resume from the last complete step.

::

    log_dir/
      run.json              what was compiled (program structure, data, budget, seed); checked on resume
      state.json            the loop state after the last complete iteration (t*, best iteration, stats)
      iter_000/
        rollouts.partial.jsonl   one line per finished rollout (appended as they finish)
        rollouts.json            all rollouts of the iteration, with textual rewards (phase done)
        sft.jsonl                the synthetic SFT dataset used for this iteration's fine-tune
        adapter/                 the PEFT adapter (safetensors), written atomically
        train.json               the fine-tune's TrainResult (phase done)
        refine.json              the TextGrad refinement of t* (phase done)
        val.json                 validation of the iteration's candidate (phase done)

Every whole-file write goes through a temporary file and ``os.replace`` (or a directory rename), so a
kill at any moment leaves either the old file or the new one. JSONL appends are flushed line by line;
a torn last line is ignored on reading.

Example:
    >>> import tempfile
    >>> run = RunDirectory(tempfile.mkdtemp(), fingerprint={"program": "abc"})
    >>> run.prepare()  # False: a new run, nothing to resume
    False
    >>> run.write_json(run.iter_dir(0) / "val.json", {"score": 0.5})
    >>> run.read_json(run.iter_dir(0) / "val.json")
    {'score': 0.5}
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["RunDirectory", "LogDirMismatchError", "FORMAT_VERSION", "atomic_write_json", "atomic_replace_dir"]

FORMAT_VERSION = 1


class LogDirMismatchError(ValueError):
    """``log_dir`` holds a run of a different program, dataset or configuration."""


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write JSON to ``path`` atomically (temporary file in the same folder, fsync, ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_replace_dir(src: str | Path, dst: str | Path) -> None:
    """Move a finished directory ``src`` to ``dst``, replacing any old ``dst`` (rename-based)."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        trash = dst.with_name(f".{dst.name}.old")
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(dst, trash)
        os.replace(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dst)


class RunDirectory:
    """One compile's checkpoint folder.

    Args:
        root: The ``log_dir`` (created if missing).
        fingerprint: JSON-able description of what is being compiled. Resuming with a different
            fingerprint raises :class:`LogDirMismatchError` instead of mixing two runs.
    """

    def __init__(self, root: str | Path, *, fingerprint: dict[str, Any]) -> None:
        self.root = Path(root).expanduser()
        self.fingerprint = fingerprint
        self._lock = threading.Lock()

    # -- setup -------------------------------------------------------------------------------
    def prepare(self) -> bool:
        """Create or validate the folder. Returns ``True`` when an earlier run is being resumed."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / ".write_probe"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise PermissionError(
                f"log_dir {str(self.root)!r} is not writable ({exc.strerror or exc}). "
                "Pass a folder you can write to, e.g. log_dir='runs/trprompt'."
            ) from exc
        run_file = self.root / "run.json"
        if not run_file.exists():
            atomic_write_json(run_file, {"format_version": FORMAT_VERSION, "fingerprint": self.fingerprint})
            return False
        saved = self.read_json(run_file)
        if saved is None:
            raise LogDirMismatchError(
                f"{run_file} is corrupted, so this log_dir cannot be resumed safely. "
                "Use a new log_dir, or delete the folder to start over."
            )
        if saved.get("format_version", 0) > FORMAT_VERSION:
            raise LogDirMismatchError(
                f"log_dir {str(self.root)!r} was written by a newer trprompt_dspy (format "
                f"{saved.get('format_version')} > {FORMAT_VERSION}). Upgrade trprompt_dspy or use a new log_dir."
            )
        old = saved.get("fingerprint", {})
        diff = sorted(k for k in set(old) | set(self.fingerprint) if old.get(k) != self.fingerprint.get(k))
        if diff:
            raise LogDirMismatchError(
                f"log_dir {str(self.root)!r} holds a run with a different {', '.join(diff)}. "
                "Use a new log_dir for a different program, dataset or configuration, or delete the old one."
            )
        logger.info("Resuming the TRPrompt run in %s", self.root)
        return True

    def iter_dir(self, k: int) -> Path:
        d = self.root / f"iter_{k:03d}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    # -- files -------------------------------------------------------------------------------
    def write_json(self, path: str | Path, obj: Any) -> None:
        atomic_write_json(path, obj)

    def read_json(self, path: str | Path) -> Any | None:
        """Read a JSON file; a missing or corrupted file gives ``None`` (corruption is logged)."""
        path = Path(path)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            logger.warning("Ignoring corrupted checkpoint file %s (%s); that step will be redone.", path, exc)
            return None

    def append_jsonl(self, path: str | Path, record: dict[str, Any]) -> None:
        """Append one JSON line and flush it to disk (thread-safe)."""
        line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
        with self._lock, open(path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def read_jsonl(self, path: str | Path) -> list[dict[str, Any]]:
        """Read JSON lines, skipping a torn (partially written) line."""
        return list(_iter_jsonl(Path(path)))

    def write_jsonl(self, path: str | Path, records: list[dict[str, Any]]) -> None:
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def staging_dir(self, final: Path) -> Path:
        """A fresh temporary folder next to ``final``; publish it with :func:`atomic_replace_dir`."""
        final.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))


def _iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                logger.warning("Skipping a torn line %d in %s (an interrupted write).", n, path)
