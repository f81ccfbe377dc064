"""Start a command in its own process group and stop the whole group, children included.

A vLLM server is several processes (API server, EngineCore, workers). :class:`ProcessGroup` starts the
command with ``start_new_session=True`` (so a terminal's Ctrl-C reaches only us, and we decide how to stop
it), sends its output to a log file, and :meth:`ProcessGroup.stop` escalates SIGINT → SIGTERM → SIGKILL
until no process of the group, nor any descendant that left it, is alive.

Example:
    >>> import sys, tempfile, pathlib
    >>> log = pathlib.Path(tempfile.mkdtemp()) / "sleep.log"
    >>> group = ProcessGroup.start([sys.executable, "-c", "import time; time.sleep(60)"], log_path=log)
    >>> group.alive()
    True
    >>> group.stop(grace_s=5)
    >>> group.alive()
    False
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["ProcessGroup", "descendants", "group_members", "tail"]

logger = logging.getLogger(__name__)


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """``(state, ppid, pgrp)`` of a Linux process from ``/proc/<pid>/stat``; None if gone or unreadable."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw[raw.rfind(")") + 2:].split()  # the command name may contain spaces and parentheses
    try:
        return rest[0], int(rest[1]), int(rest[2])
    except (IndexError, ValueError):
        return None


def _all_pids() -> list[int]:
    try:
        return [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return []


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``.

    On systems without ``/proc`` this only says whether the group exists (``[pgid]`` or ``[]``).
    """
    if not Path("/proc/self/stat").exists():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    out = []
    for pid in _all_pids():
        st = _proc_stat(pid)
        if st is not None and st[2] == pgid and st[0] not in ("Z", "X"):
            out.append(pid)
    return out


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (children, grandchildren...), found through ``/proc``; ``[]`` elsewhere."""
    children: dict[int, list[int]] = {}
    for p in _all_pids():
        st = _proc_stat(p)
        if st is not None and st[0] not in ("Z", "X"):
            children.setdefault(st[1], []).append(p)
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def tail(path: str | os.PathLike[str], lines: int = 40) -> str:
    """The last ``lines`` lines of a text file ('' when it does not exist)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 256 * 1024))
            data = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


class ProcessGroup:
    """A command running as the leader of its own process group, logging to a file.

    Use :meth:`start` to create one. Thread-safe enough for one owner: :meth:`stop` may be called many
    times (also from ``atexit``).
    """

    def __init__(self, proc: subprocess.Popen, log_path: Path) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.pgid = proc.pid  # start_new_session makes the child its own group leader
        self.log_path = log_path
        self._known: set[int] = set()
        self._stopped = False

    @classmethod
    def start(cls, cmd: Sequence[str], *, log_path: str | os.PathLike[str], env: Mapping[str, str] | None = None,
              cwd: str | os.PathLike[str] | None = None) -> ProcessGroup:
        """Start ``cmd`` in a new session/process group; stdout and stderr go to ``log_path`` (appended).

        Raises:
            FileNotFoundError: The executable does not exist.
        """
        log = Path(log_path)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as fh:
            fh.write(f"$ {' '.join(cmd)}\n".encode())
            fh.flush()
            proc = subprocess.Popen(list(cmd), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True)
        logger.debug("Started pid %d (own process group): %s", proc.pid, " ".join(cmd))
        return cls(proc, log)

    def alive(self) -> bool:
        """True while the leader or any other process of its group (or a descendant seen earlier) lives."""
        self.proc.poll()  # reap the leader if it exited, so its zombie does not count
        return bool(self.members())

    def leader_alive(self) -> bool:
        """True while the started process itself is running (also notes its descendants for :meth:`stop`)."""
        self._remember_descendants()
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def members(self) -> list[int]:
        """Live processes of the group plus live descendants that left it."""
        self.proc.poll()
        self._remember_descendants()
        live = set(group_members(self.pgid))
        for pid in list(self._known):
            st = _proc_stat(pid)
            if st is None or st[0] in ("Z", "X"):
                self._known.discard(pid)
            else:
                live.add(pid)
        return sorted(live)

    def _remember_descendants(self) -> None:
        if self.proc.poll() is None:
            self._known.update(descendants(self.pid))

    def _signal_all(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, sig)
        for pid in list(self._known):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def _wait_gone(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not self.members():
                return True
            time.sleep(0.1)
        return not self.members()

    def stop(self, *, grace_s: float = 15.0, term_s: float = 5.0) -> None:
        """Stop the group: SIGINT, then SIGTERM after ``grace_s``, then SIGKILL after ``term_s`` more.

        Returns once no process of the group (nor a descendant that left it) is alive. Safe to call twice.
        """
        self._remember_descendants()
        if not self.members():
            self._stopped = True
            return
        for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, term_s), (signal.SIGKILL, 10.0)):
            logger.debug("Sending %s to process group %d", signal.Signals(sig).name, self.pgid)
            self._signal_all(sig)
            if self._wait_gone(wait_s):
                break
            logger.warning("Process group %d still has %s after %s", self.pgid, self.members(),
                           signal.Signals(sig).name)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=1)
        self._stopped = True
        left = self.members()
        if left:
            logger.error("Processes %s of group %d survived SIGKILL", left, self.pgid)
