"""Count the calls and tokens that reach an LM, per phase and role, through a wrapper ``dspy.LM``.

:func:`counting_lm` returns a real ``dspy.LM`` whose engine forwards every completion to another LM
(``inner``) and records it in a :class:`CallMeter`. Because the count happens at the engine, it is
exact: ``n=3`` counts 3 completions, ``lm.copy(temperature=1.0)`` and ``program.deepcopy()`` share the
same counter, and calls from DSPy's worker threads are counted under a lock. Token counts come from the
``usage`` each response carries (the provider's own numbers, not an estimate).

The comparison gives each optimizer two wrappers around the *same* target model: role ``"target"`` for
the student program's own calls and role ``"aux"`` for the optimizer's proposer / reflection / reward /
TextGrad calls when those use the target model. :meth:`CallMeter.phase` separates compile from evaluation.

The wrapper builds on the inner LM's generation settings (``temperature``, ``max_tokens``...) and sends
each request to it as an explicit ``dspy.lm15.Request``; build the inner LM with ``cache=False`` so that
every counted call is a real model call.

Example:
    >>> import dspy
    >>> from dspy.utils import DummyLM
    >>> meter = CallMeter()
    >>> lm = counting_lm(DummyLM([{"answer": "4"}, {"answer": "5"}]), meter, role="target")
    >>> with meter.phase("compile"), dspy.context(lm=lm):
    ...     dspy.Predict("question -> answer")(question="2+2?").answer
    '4'
    >>> meter.calls("compile"), meter.calls("compile", role="aux"), meter.calls("eval")
    (1, 0, 0)
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import dspy

__all__ = ["CallMeter", "CountingEngine", "Usage", "counting_lm"]

_ROLES = ("target", "aux")


@dataclass
class Usage:
    """Counters of one (phase, role) cell: completions, tokens, failures and summed model latency."""

    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    errors: int = 0
    latency_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "errors": self.errors, "latency_s": round(self.latency_s, 3)}


class CallMeter:
    """Thread-safe counters keyed by (phase, role); the phase is set with :meth:`phase`.

    Calls made while no phase is active are counted under phase ``"other"``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cells: dict[tuple[str, str], Usage] = {}
        self._phase = "other"

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[CallMeter]:
        """Attribute every call made inside the block to phase ``name`` (phases do not nest)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"phase name must be a non-empty string; got {name!r}.")
        with self._lock:
            previous, self._phase = self._phase, name
        try:
            yield self
        finally:
            with self._lock:
                self._phase = previous

    def record(self, role: str, *, input_tokens: int = 0, output_tokens: int = 0, latency_s: float = 0.0,
               error: bool = False) -> None:
        """Count one completion of ``role`` in the current phase."""
        with self._lock:
            cell = self._cells.setdefault((self._phase, role), Usage())
            cell.calls += 1
            cell.input_tokens += int(input_tokens or 0)
            cell.output_tokens += int(output_tokens or 0)
            cell.latency_s += float(latency_s)
            cell.errors += int(bool(error))

    def usage(self, phase: str, role: str) -> Usage:
        """A copy of the counters of one (phase, role) cell (zeros if nothing was counted)."""
        with self._lock:
            return replace(self._cells.get((phase, role), Usage()))

    def calls(self, phase: str, role: str | None = "target") -> int:
        """Completions in ``phase`` for ``role`` (``None``: all roles together)."""
        with self._lock:
            return sum(u.calls for (p, r), u in self._cells.items() if p == phase and (role is None or r == role))

    def summary(self, phase: str) -> dict[str, Any]:
        """``{"target": {...}, "aux": {...}, "total": {...}}`` counters of ``phase`` as plain dicts."""
        out: dict[str, Any] = {}
        total = Usage()
        roles = sorted({r for (p, r) in self._cells if p == phase} | set(_ROLES))
        for role in roles:
            u = self.usage(phase, role)
            out[role] = u.to_dict()
            total.calls += u.calls
            total.input_tokens += u.input_tokens
            total.output_tokens += u.output_tokens
            total.errors += u.errors
            total.latency_s += u.latency_s
        out["total"] = total.to_dict()
        return out

    def reset(self) -> None:
        with self._lock:
            self._cells.clear()


class CountingEngine:
    """A DSPy 3.4 engine (``complete(Request) -> Response``) that forwards to ``inner`` and counts.

    Deep copies return ``self`` so every copy of a program (GEPA, MIPROv2 and SIMBA copy programs for
    every candidate) keeps counting into the same meter.
    """

    def __init__(self, inner: dspy.BaseLM, meter: CallMeter, role: str) -> None:
        if not isinstance(inner, dspy.BaseLM):
            raise TypeError(f"inner must be a dspy.LM (or dspy.BaseLM); got {type(inner).__name__}.")
        if not isinstance(meter, CallMeter):
            raise TypeError(f"meter must be a CallMeter; got {type(meter).__name__}.")
        if not isinstance(role, str) or not role:
            raise ValueError(f"role must be a non-empty string such as 'target' or 'aux'; got {role!r}.")
        self.inner, self.meter, self.role = inner, meter, role

    def complete(self, request: Any) -> Any:
        start = time.perf_counter()
        try:
            response = self.inner(replace(request, model=self.inner.model))
        except Exception:
            self.meter.record(self.role, latency_s=time.perf_counter() - start, error=True)
            raise
        usage = getattr(response, "usage", None)
        self.meter.record(self.role, input_tokens=getattr(usage, "input_tokens", 0) or 0,
                          output_tokens=getattr(usage, "output_tokens", 0) or 0,
                          latency_s=time.perf_counter() - start)
        return response

    def close(self) -> None:  # the inner LM owns its connection
        pass

    def __deepcopy__(self, memo: dict[int, Any]) -> CountingEngine:
        return self


def counting_lm(inner: dspy.BaseLM, meter: CallMeter, *, role: str = "target") -> dspy.LM:
    """Wrap ``inner`` in a ``dspy.LM`` that counts each completion into ``meter`` under ``role``.

    Args:
        inner: Any ``dspy.LM`` (in-process engine, OpenAI-compatible server, ``DummyLM``...).
        meter: Where the counts go.
        role: ``"target"`` (the student program's calls) or ``"aux"`` (optimizer-side calls on the same model).

    Returns:
        A ``dspy.LM`` with the inner LM's model name and generation settings, no cache and no retries
        of its own (the inner LM's retries still apply).
    """
    from dspy.clients.backend_selection import CLIENT_KEYS

    engine = CountingEngine(inner, meter, role)  # validates the arguments
    settings = {k: v for k, v in dict(getattr(inner, "kwargs", {}) or {}).items()
                if k not in CLIENT_KEYS and k not in ("rollout_id", "n") and v is not None}
    return dspy.LM(inner.model, engine=engine, cache=False, num_retries=0,
                   model_type=getattr(inner, "model_type", "chat"), **settings)
