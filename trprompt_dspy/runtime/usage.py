"""Count LM calls and tokens per role (target, reward, TextGrad, prompt writer) and failures by kind.

DSPy's own usage tracker keys token counts by model name, which cannot tell the target from the reward
model when both are the same LM (single-base: one server, one model name, every role). :class:`UsageMeter`
therefore counts *calls* per role through DSPy callbacks installed with ``dspy.context(callbacks=...)``
(which DSPy propagates into worker threads). While a call runs, its role is held in a context variable,
and the tracker of :meth:`UsageMeter.tracking` (a DSPy ``UsageTracker``) files the call's token usage
under that role as well as under the model name. Code that calls an LM without the counting callback
(the TextGrad engine) names its role with :meth:`UsageMeter.attribute`; usage with no role at all is
filed as ``"unattributed"``. A prompt model that is not a ``dspy.LM`` (in-process or vLLM adapters)
reports no token usage to DSPy and is counted in calls only.

Example:
    >>> meter = UsageMeter()
    >>> meter.count("prompt_model", 3)
    >>> meter.fail("program_error")
    >>> meter.calls["prompt_model"], meter.failures["program_error"]
    (3, 1)
    >>> with meter.tracking() as tracker, meter.attribute("reward"):
    ...     tracker.add_usage("openai/m", {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14})
    >>> meter.tokens["reward"]
    {'prompt_tokens': 10, 'completion_tokens': 4, 'total_tokens': 14}
"""

from __future__ import annotations

import contextvars
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from dspy.utils.callback import BaseCallback
from dspy.utils.usage_tracker import UsageTracker

__all__ = ["UNATTRIBUTED", "UsageMeter", "current_role"]

#: The role of token usage recorded while no role was named (neither by the callback nor by ``attribute``).
UNATTRIBUTED = "unattributed"
#: Token counts summed per role (other usage fields, e.g. nested details, are left to DSPy's tracker).
_TOKEN_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")
_current_role: contextvars.ContextVar[str | None] = contextvars.ContextVar("trprompt_lm_role", default=None)


def current_role() -> str | None:
    """The role of the LM call running in this context (thread or task), or ``None`` outside any role.

    Set by :meth:`UsageMeter.callback` while a DSPy LM call runs and by :meth:`UsageMeter.attribute`;
    code that runs inside the call (DSPy's own logging, for instance) can read it to know whose call it is.
    """
    return _current_role.get()


class _RoleCallback(BaseCallback):
    def __init__(self, meter: UsageMeter, default_role: str) -> None:
        self.meter, self.default_role = meter, default_role
        self._roles: dict[str, str] = {}
        self._lock = threading.Lock()

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        role = self.meter.roles.get(id(instance), self.default_role)
        token = _current_role.set(role)  # the call runs in this context (thread or task): its usage is filed here
        with self._lock:
            self._roles[call_id] = (role, token)
        self.meter.count(role)

    def on_lm_end(self, call_id: str, outputs: Any, exception: Exception | None = None) -> None:
        with self._lock:
            role, token = self._roles.pop(call_id, (self.default_role, None))
        if token is not None:
            # ValueError: the call ended in another context than it started in; there is nothing to restore there
            with suppress(ValueError):
                _current_role.reset(token)
        if exception is not None:
            self.meter.fail(f"{role}_lm_error")


class _RoleUsageTracker(UsageTracker):
    """DSPy's usage tracker (per model name) that also files each entry under the running call's role."""

    def __init__(self, meter: UsageMeter) -> None:
        super().__init__()
        self.meter = meter

    def add_usage(self, lm: str, usage_entry: dict[str, Any]) -> None:
        super().add_usage(lm, usage_entry)
        self.meter.add_tokens(_current_role.get() or UNATTRIBUTED, usage_entry)


class UsageMeter:
    """Thread-safe counters of LM calls per role and of failures per kind."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.tokens: dict[str, dict[str, int]] = {}
        self.phases: dict[str, Counter[str]] = {}
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

    def add_phase(self, phase: str, counts: dict[str, int]) -> None:
        """Add a batch's counts (e.g. :func:`~trprompt_dspy.loop.rollouts.failure_breakdown`) to ``phase``'s totals.

        Example:
            >>> meter = UsageMeter()
            >>> meter.add_phase("validation", {"runs": 50, "failed": 2, "timeout": 2})
            >>> meter.add_phase("validation", {"runs": 50, "failed": 0})
            >>> meter.snapshot()["errors_by_phase"]
            {'validation': {'runs': 100, 'failed': 2, 'timeout': 2}}
        """
        with self._lock:
            self.phases.setdefault(phase, Counter()).update({k: int(v) for k, v in counts.items()})

    def add_tokens(self, role: str, usage: dict[str, Any]) -> None:
        """Add one call's token usage (``prompt_tokens``, ``completion_tokens``, ``total_tokens``) to ``role``."""
        counts = {k: int(usage[k]) for k in _TOKEN_FIELDS
                  if isinstance(usage.get(k), (int, float)) and not isinstance(usage.get(k), bool)}
        if not counts:
            return
        with self._lock:
            totals = self.tokens.setdefault(role, {})
            for k, v in counts.items():
                totals[k] = totals.get(k, 0) + v

    @contextmanager
    def attribute(self, role: str) -> Iterator[None]:
        """File the token usage of LM calls made inside this block (without the counting callback) under ``role``."""
        token = _current_role.set(role)
        try:
            yield
        finally:
            _current_role.reset(token)

    @contextmanager
    def tracking(self) -> Iterator[UsageTracker]:
        """Like ``dspy.utils.usage_tracker.track_usage()``, and also count tokens per role into this meter.

        Entries roll up into an enclosing DSPy tracker on exit, as with ``track_usage``.
        """
        import dspy

        tracker = _RoleUsageTracker(self)
        parent = dspy.settings.usage_tracker
        with dspy.context(usage_tracker=tracker):
            try:
                yield tracker
            finally:
                if parent is not None:
                    for lm, entries in tracker.usage_data.items():
                        parent.usage_data[lm].extend(entries)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"calls": dict(self.calls), "failures": dict(self.failures),
                    "tokens": {role: dict(t) for role, t in self.tokens.items()},
                    "errors_by_phase": {phase: dict(c) for phase, c in self.phases.items()}}

    def restore(self, snap: dict[str, Any] | None) -> None:
        """Continue counting from a checkpointed snapshot (resume)."""
        if snap:
            with self._lock:
                self.calls.update(snap.get("calls", {}))
                self.failures.update(snap.get("failures", {}))
            for role, usage in (snap.get("tokens") or {}).items():
                self.add_tokens(role, usage)
            for phase, counts in (snap.get("errors_by_phase") or {}).items():  # absent before 2026-12
                self.add_phase(phase, counts)
