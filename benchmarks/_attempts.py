"""A TRPrompt cell's compile, continued across kills: what each attempt cost, kept on disk as it runs.

A TRPrompt compile on the 1.5B takes over an hour on 2 CPU cores, longer than what is left of a working
session once the other cells have run. TRPrompt checkpoints every step in its ``log_dir`` and a rerun with the
same ``log_dir`` continues from there, but the comparison counts *every* target-LM call a contender spends, and
a killed process takes its counters with it. :class:`CompileAttempts` closes that gap: while an attempt runs it
rewrites ``attempts.json`` in the cell's work dir every ``interval`` seconds (its wall time and its call
counters so far, and the CPU it ran on), so a later ``--resume`` adds what the killed attempts spent to the cell.

What a continued cell reports is the cost of all its attempts together (calls and wall time), which includes
the work a killed attempt did after its last checkpoint and that was done again: an honest upper bound of
the compile's cost, never an undercount, except for at most the last ``interval`` seconds of calls of an
attempt killed between two writes.

Example:
    >>> import tempfile
    >>> from benchmarks._budget import CallMeter
    >>> d = Path(tempfile.mkdtemp())
    >>> meter = CallMeter()
    >>> with meter.phase("compile"):
    ...     meter.record("target", input_tokens=10, output_tokens=5)
    >>> first = CompileAttempts(d, meter, cpu={"model": "x"}, interval=3600)
    >>> first.start(); _ = first.stop(finished=False)  # as if the process were killed after this write
    >>> again = CompileAttempts(d, CallMeter(), cpu={"model": "x"}, interval=3600)
    >>> len(again.prior), again.total_calls()["target"]["calls"]
    (1, 1)
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from benchmarks._budget import CallMeter

logger = logging.getLogger(__name__)

__all__ = ["ATTEMPTS_FILE", "CompileAttempts", "add_summaries"]

#: The file in a cell's work dir that lists its compile attempts.
ATTEMPTS_FILE = "attempts.json"


def add_summaries(*summaries: Mapping[str, Any]) -> dict[str, Any]:
    """Sum :meth:`CallMeter.summary` dicts role by role (``{"target": {"calls": ..}, "total": {..}}``).

    Example:
        >>> add_summaries({"target": {"calls": 2, "latency_s": 1.5}}, {"target": {"calls": 3}, "aux": {"calls": 1}})
        {'target': {'calls': 5, 'latency_s': 1.5}, 'aux': {'calls': 1}}
    """
    out: dict[str, dict[str, Any]] = {}
    for s in summaries:
        for role, counters in s.items():
            into = out.setdefault(role, {})
            for k, v in counters.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    into[k] = round(into.get(k, 0) + v, 6) if isinstance(v, float) else into.get(k, 0) + v
    return out


class CompileAttempts:
    """The compile attempts of one cell: the earlier ones read from ``work_dir/attempts.json``, the current
    one written there every ``interval`` seconds by a daemon thread between :meth:`start` and :meth:`stop`.

    Args:
        work_dir: The cell's work dir (TRPrompt's ``log_dir`` lives under it).
        meter: The cell's meter; this attempt's calls are its ``"compile"`` phase.
        cpu: What the attempt ran on (``trprompt_dspy.models.dtype.cpu_info()``), kept per attempt because a
            continued cell may span machines.
        interval: Seconds between two writes of the running attempt.
    """

    def __init__(self, work_dir: Path, meter: CallMeter, *, cpu: Mapping[str, Any], interval: float = 30.0) -> None:
        self.path = Path(work_dir) / ATTEMPTS_FILE
        self.meter, self.cpu, self.interval = meter, dict(cpu), float(interval)
        self.prior: list[dict[str, Any]] = self._read()
        self._t0: float | None = None
        self._started_at = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._final: dict[str, Any] | None = None

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise RuntimeError(f"{self.path} cannot be read ({exc}); the calls of the earlier attempts are unknown. "
                               "Delete the cell's work dir to start the cell afresh.") from exc
        return list(data.get("attempts") or [])

    def current(self, *, finished: bool) -> dict[str, Any]:
        """This attempt so far: start time, wall seconds, CPU, the meter's compile counters."""
        wall = 0.0 if self._t0 is None else time.perf_counter() - self._t0
        return {"started_at": self._started_at, "wall_s": round(wall, 2), "finished": finished, "cpu": self.cpu,
                "calls": self.meter.summary("compile")}

    def _write(self, *, finished: bool) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        now = self._final if self._final is not None else self.current(finished=finished)
        tmp.write_text(json.dumps({"attempts": [*self.prior, now]}, indent=1), encoding="utf-8")
        os.replace(tmp, self.path)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._write(finished=False)
            except OSError as exc:  # a full disk must not kill the compile; the final write reports it
                logger.warning("could not record the running attempt in %s: %s", self.path, exc)

    def start(self) -> None:
        """Begin timing this attempt, write it once, and keep it up to date in the background."""
        self._t0 = time.perf_counter()
        self._started_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self._write(finished=False)
        self._thread = threading.Thread(target=self._loop, name="compile-attempts", daemon=True)
        self._thread.start()

    def stop(self, *, finished: bool) -> dict[str, Any]:
        """Stop the background writes and record this attempt (``finished``: the compile returned)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._final = self.current(finished=finished)
        self._write(finished=finished)
        return self._final

    def total_calls(self) -> dict[str, Any]:
        """The compile counters of every attempt, this one included."""
        return add_summaries(*(a["calls"] for a in self.prior), self.meter.summary("compile"))

    def total_wall_s(self, current_s: float) -> float:
        """``current_s`` (this attempt's compile seconds) plus the wall time of the earlier attempts."""
        return round(current_s + sum(float(a.get("wall_s") or 0.0) for a in self.prior), 2)

    def describe(self) -> list[dict[str, Any]]:
        """One line per attempt for the cell record: start, wall seconds, calls, CPU model, finished."""
        rows = [*self.prior, self._final or self.current(finished=False)]
        return [{"started_at": a.get("started_at"), "wall_s": a.get("wall_s"), "finished": a.get("finished"),
                 "calls": (a.get("calls") or {}).get("total", {}).get("calls"),
                 "cpu": (a.get("cpu") or {}).get("model")} for a in rows]
