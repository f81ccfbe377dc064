"""Crash-safe file writes shared by checkpoints, artifacts and adapters.

Every whole-file write goes to a temporary file *in the same folder* (so the final ``os.replace`` is a
rename on one file system), is flushed and fsync'ed, and only then renamed over the destination. A
process killed at any moment therefore leaves either the old file or the new one, plus at most a
temporary file whose name starts with ``.`` and ends with :data:`TEMP_SUFFIX`, which
:func:`remove_stale_temps` deletes on the next run. Folders (LoRA adapters) are built in a staging
folder next to the destination and published with :func:`atomic_replace_dir`.

Example:
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> atomic_write_json(folder / "state.json", {"step": 1})
    >>> json.loads((folder / "state.json").read_text())
    {'step': 1}
    >>> sorted(p.name for p in folder.iterdir())  # no temporary file is left behind
    ['state.json']
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "TEMP_SUFFIX",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_write_jsonl",
    "atomic_replace_dir",
    "staging_dir",
    "remove_stale_temps",
]

#: Temporary files are named ``.<final name>.<random>.tmp``; staging folders ``.<final name>.<random>.stage``.
TEMP_SUFFIX = ".tmp"
STAGE_SUFFIX = ".stage"


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file, fsync, ``os.replace``).

    Args:
        path: The destination; its parent folder is created if needed.
        text: The content (UTF-8).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (non-JSON values are written with ``str()``)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=str))


def atomic_write_jsonl(path: str | os.PathLike[str], records: Iterable[Any]) -> None:
    """Write one JSON document per line to ``path`` atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records))


def staging_dir(final: str | os.PathLike[str]) -> Path:
    """A fresh, empty folder next to ``final`` in which to build it; publish with :func:`atomic_replace_dir`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=STAGE_SUFFIX, dir=final.parent))


def atomic_replace_dir(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Move the finished folder ``src`` to ``dst``, replacing an old ``dst`` (renames only).

    ``dst`` is first renamed aside, so at every moment either the old or the new folder is complete; a
    kill between the two renames leaves ``dst`` missing (the step is redone) and a stale folder that
    :func:`remove_stale_temps` removes.
    """
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        trash = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.old{STAGE_SUFFIX}")
        os.replace(dst, trash)
        os.replace(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dst)


def remove_stale_temps(root: str | os.PathLike[str]) -> int:
    """Delete temporary files and staging folders left under ``root`` by a killed process.

    Only names this module creates (``.<name>.<random>.tmp`` / ``.stage``) are touched.

    Returns:
        How many entries were removed.
    """
    root = Path(root)
    if not root.is_dir():
        return 0
    removed = 0
    for p in sorted(root.rglob(".*"), key=lambda q: len(q.parts), reverse=True):
        if not p.name.startswith(".") or not p.exists():
            continue
        if p.is_file() and p.name.endswith(TEMP_SUFFIX) and p.name.count(".") >= 3:
            p.unlink(missing_ok=True)
            removed += 1
        elif p.is_dir() and p.name.endswith(STAGE_SUFFIX):
            shutil.rmtree(p, ignore_errors=True)
            removed += 1
    if removed:
        logger.info("Removed %d temporary file(s)/folder(s) left by an interrupted run under %s.", removed, root)
    return removed
