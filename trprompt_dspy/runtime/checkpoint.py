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

Every whole-file write goes through a temporary file and ``os.replace`` (or a directory rename), see
:mod:`trprompt_dspy.runtime.atomic`, so a kill at any moment leaves either the old file or the new one; temporary
files left by a killed run are removed when the folder is reopened. JSONL appends are flushed line by
line; a torn last line is ignored on reading (and terminated before the next append). A checkpoint file
that does not parse or lacks its keys is logged and ignored, and its step redone. ``last_error.json``
records why a compile stopped (e.g. the error budget) until a later run completes.

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
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from trprompt_dspy.errors import TRPromptError
from trprompt_dspy.runtime.atomic import (
    atomic_replace_dir,
    atomic_write_json,
    atomic_write_jsonl,
    remove_stale_temps,
    staging_dir,
)

logger = logging.getLogger(__name__)

__all__ = ["RunDirectory", "LogDirMismatchError", "FORMAT_VERSION", "atomic_write_json", "atomic_replace_dir"]

FORMAT_VERSION = 1


class LogDirMismatchError(TRPromptError, ValueError):
    """``log_dir`` holds a run of a different program, dataset or configuration."""


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
        remove_stale_temps(self.root)
        run_file = self.root / "run.json"
        if not run_file.exists():
            atomic_write_json(run_file, {"format_version": FORMAT_VERSION, "fingerprint": self.fingerprint})
            return False
        saved = self.read_json(run_file)
        if not isinstance(saved, dict) or not isinstance(saved.get("fingerprint"), dict):
            raise LogDirMismatchError(
                f"{run_file} is corrupted, so this log_dir cannot be resumed safely. "
                "Use a new log_dir, or delete the folder to start over."
            )
        version = saved.get("format_version", 0)
        if not isinstance(version, int) or version > FORMAT_VERSION:
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

    def read_json(self, path: str | Path, *, required: Sequence[str] = ()) -> Any | None:
        """Read a checkpoint file; a missing, half-written or incomplete one gives ``None``.

        Args:
            path: The file.
            required: Keys a valid file must hold (it must then be a JSON object). A file that fails to
                parse or lacks one of them is logged and ignored, so its step is redone.
        """
        path = Path(path)
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            logger.warning("Ignoring corrupted checkpoint file %s (%s); that step will be redone.", path, exc)
            return None
        if required and (not isinstance(data, dict) or any(k not in data for k in required)):
            logger.warning("Ignoring incomplete checkpoint file %s (it needs the keys %s); that step will be redone.",
                           path, list(required))
            return None
        return data

    def append_jsonl(self, path: str | Path, record: dict[str, Any]) -> None:
        """Append one JSON line and flush it to disk (thread-safe).

        A torn last line left by a killed writer is terminated first, so the new record stays readable.
        """
        line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
        with self._lock, open(path, "a+b") as f:
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = "\n" + line
            f.write(line.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())

    def read_jsonl(self, path: str | Path) -> list[dict[str, Any]]:
        """Read JSON lines, skipping a torn (partially written) line."""
        return list(_iter_jsonl(Path(path)))

    def write_jsonl(self, path: str | Path, records: list[dict[str, Any]]) -> None:
        atomic_write_jsonl(path, records)

    def staging_dir(self, final: Path) -> Path:
        """A fresh temporary folder next to ``final``; publish it with :func:`atomic_replace_dir`."""
        return staging_dir(final)


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
