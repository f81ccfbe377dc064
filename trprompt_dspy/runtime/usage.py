"""Count LM calls per role (target, reward, TextGrad, prompt writer) and failures by kind.

DSPy's own usage tracker keys token counts by model name, which cannot tell the target from the reward
model when both are the same LM. :class:`UsageMeter` therefore counts *calls* per role through DSPy
callbacks installed with ``dspy.context(callbacks=...)`` (which DSPy propagates into worker threads),
and takes token totals per model name from DSPy's tracker.

Example:
    >>> meter = UsageMeter()
    >>> meter.count("prompt_model", 3)
    >>> meter.fail("program_error")
    >>> meter.calls["prompt_model"], meter.failures["program_error"]
    (3, 1)
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from dspy.utils.callback import BaseCallback

__all__ = ["UsageMeter"]


class _RoleCallback(BaseCallback):
    def __init__(self, meter: UsageMeter, default_role: str) -> None:
        self.meter, self.default_role = meter, default_role
        self._roles: dict[str, str] = {}
        self._lock = threading.Lock()

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        role = self.meter.roles.get(id(instance), self.default_role)
        with self._lock:
            self._roles[call_id] = role
        self.meter.count(role)

    def on_lm_end(self, call_id: str, outputs: Any, exception: Exception | None = None) -> None:
        with self._lock:
            role = self._roles.pop(call_id, self.default_role)
        if exception is not None:
            self.meter.fail(f"{role}_lm_error")


class UsageMeter:
    """Thread-safe counters of LM calls per role and of failures per kind."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.roles: dict[int, str] = {}
        self._shared: set[int] = set()
        self._lock = threading.Lock()

    def assign(self, lm: Any, role: str) -> None:
        """Attribute every call of this LM object to ``role``, whatever phase makes it.

        An LM object that serves several roles (e.g. the target doubling as reward model) is attributed
        by phase instead: to the ``default_role`` of the callback active when it is called.
        """
        if lm is None:
            return
        if self.roles.get(id(lm), role) != role:
            self._shared.add(id(lm))
        self.roles[id(lm)] = role
        for shared in self._shared:
            self.roles.pop(shared, None)

    def callback(self, default_role: str) -> BaseCallback:
        """A DSPy callback that counts calls of unassigned LMs as ``default_role``."""
        return _RoleCallback(self, default_role)

    def count(self, role: str, n: int = 1) -> None:
        with self._lock:
            self.calls[role] += n

    def fail(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self.failures[kind] += n

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {"calls": dict(self.calls), "failures": dict(self.failures)}

    def restore(self, snap: dict[str, dict[str, int]] | None) -> None:
        """Continue counting from a checkpointed snapshot (resume)."""
        if snap:
            with self._lock:
                self.calls.update(snap.get("calls", {}))
                self.failures.update(snap.get("failures", {}))
