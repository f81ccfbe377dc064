"""One lock for "only one of us does this": threads of this process and (on POSIX) other processes.

Used where two compiles, tests or CLI calls may race to build the same thing (a model conversion, the vLLM
venv). The file lock is ``fcntl.flock`` on ``path``; on Windows only the in-process thread lock applies.

Example:
    >>> import tempfile, pathlib
    >>> with exclusive(pathlib.Path(tempfile.mkdtemp()) / "demo.lock"):
    ...     pass
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["exclusive"]

_guard = threading.Lock()
_thread_locks: dict[str, threading.Lock] = {}


@contextlib.contextmanager
def exclusive(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on the lock file ``path`` (created with its folder if missing)."""
    path = Path(path)
    with _guard:
        tlock = _thread_locks.setdefault(str(path.resolve()), threading.Lock())
    path.parent.mkdir(parents=True, exist_ok=True)
    with tlock, open(path, "a+b") as fh:
        try:
            import fcntl
        except ImportError:  # Windows: thread lock only
            yield
            return
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
