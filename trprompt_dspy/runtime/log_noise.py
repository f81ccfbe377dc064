"""Keep the console to what a user of the optimizer needs: quiet textgrad, one line for DSPy's truncations.

Two dependencies flood a compile's log if left alone:

* **textgrad** sets its logger (``"textgrad"``) to INFO when it is imported and logs every prompt and
  reply of each op at INFO (nine records per TextGrad step: ``StringBasedFunction``,
  ``_backward_through_llm prompt``, ...). It attaches only a JSON-lines file handler of its own (written
  under ``TEXTGRAD_LOG_DIR``, which :func:`~trprompt_dspy._lazy.import_textgrad` points at a temporary
  folder), but the records also propagate to the root logger: any application that configures logging
  at INFO (``logging.basicConfig(level=logging.INFO)``, the ``trprompt`` CLI) prints them all.
  :func:`quiet_textgrad` sets the logger to WARNING when the library first imports textgrad, unless
  you chose a level yourself. To see the records again::

      logging.getLogger("textgrad").setLevel(logging.INFO)

* **DSPy** logs ``"LM response was truncated; ..."`` on ``"dspy.clients.lm"`` for every reply cut at
  ``max_tokens``, without saying which LM or whether it matters. DSPy's ``"dspy"`` logger has its own
  stderr handler and does not propagate, so these always print. While a compile runs,
  :func:`summarize_truncations` installs a filter on that logger that counts the records per role
  (the role of the running call, from :func:`~trprompt_dspy.runtime.usage.current_role`), drops
  them, and logs one WARNING per role and phase that names the role, the count, the cap and the
  setting that raises it. Each dropped record is still logged at DEBUG on this module's logger::

      logging.getLogger("trprompt_dspy.runtime.log_noise").setLevel(logging.DEBUG)

  (with a handler at DEBUG, e.g. ``logging.basicConfig(level=logging.DEBUG)``); ``dspy.inspect_history()``
  shows the cut replies themselves.

Example:
    >>> import logging
    >>> from trprompt_dspy.runtime.usage import UsageMeter
    >>> dspy_lm_logger = logging.getLogger("dspy.clients.lm")
    >>> limits = {"reward": RoleLimit(max_tokens=256, knob="reward_lm=dspy.LM(..., max_tokens=N)")}
    >>> with summarize_truncations(limits) as summary:
    ...     with UsageMeter().attribute("reward"):
    ...         dspy_lm_logger.warning("LM response was truncated; increase max_tokens or inspect history.")
    ...     summary.counts
    ...     lines = summary.flush("iteration 0")
    {'reward': 1}
    >>> print(lines[0])
    reward LM: 1 reply cut off at max_tokens=256 during iteration 0. To keep them whole: reward_lm=dspy.LM(..., max_tokens=N).
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from trprompt_dspy.runtime.usage import UNATTRIBUTED, current_role

logger = logging.getLogger(__name__)

__all__ = ["TEXTGRAD_LOGGER", "TRUNCATION_LOGGER", "RoleLimit", "TruncationSummary", "quiet_textgrad",
           "role_limits", "summarize_truncations"]

#: The logger textgrad logs every op on (set to INFO by ``import textgrad``).
TEXTGRAD_LOGGER = "textgrad"
#: The level ``textgrad/__init__.py`` gives its logger at import (``logger.setLevel(logging.INFO)``).
_TEXTGRAD_IMPORT_LEVEL = logging.INFO
#: The logger DSPy reports truncated replies on (``dspy/clients/execution.py`` and ``dspy/clients/lm.py``).
TRUNCATION_LOGGER = "dspy.clients.lm"
#: How DSPy's truncation messages start (both the native-engine and the LiteLLM wording).
_TRUNCATION_PREFIX = "LM response was truncated"

_textgrad_lock = threading.Lock()
_textgrad_quieted = False


class _HandledTextGradErrors(logging.Filter):
    """Drop textgrad's ERROR "optimizer response could not be indexed" unless its logger is at DEBUG.

    textgrad logs it when an update reply lacks its ``<IMPROVED_VARIABLE>`` tags; ``loop/refine_reward.py`` handles
    exactly that case (one retry, then t* is kept) and says so in its own INFO line, so the ERROR only alarms.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if "could not be indexed" in record.getMessage():
            return logging.getLogger(TEXTGRAD_LOGGER).isEnabledFor(logging.DEBUG)
        return True


def quiet_textgrad(level_before_import: int | None) -> None:
    """Set the ``textgrad`` logger to WARNING after the library's first import of textgrad, unless you set a level.

    ``import textgrad`` overwrites the logger's level with INFO, so a level chosen before the import can
    only be seen by the importer: :func:`~trprompt_dspy._lazy.import_textgrad` passes it here.

    * ``level_before_import`` is a level other than ``NOTSET``: you chose it before textgrad was
      imported, and it is put back.
    * ``level_before_import`` is ``NOTSET`` (you chose none), or ``None`` (textgrad was already imported
      elsewhere) and the level is still textgrad's own INFO (or NOTSET): it becomes WARNING.
    * Any other level is yours and is kept.

    Only the first call acts: a level you set later (``logging.getLogger("textgrad").setLevel(logging.INFO)``)
    is never changed again in this process.
    """
    global _textgrad_quieted
    with _textgrad_lock:
        if _textgrad_quieted:
            return
        _textgrad_quieted = True
        tg_logger = logging.getLogger(TEXTGRAD_LOGGER)
        tg_logger.addFilter(_HandledTextGradErrors())
        if level_before_import is not None and level_before_import != logging.NOTSET:
            tg_logger.setLevel(level_before_import)
        elif tg_logger.level in (logging.NOTSET, _TEXTGRAD_IMPORT_LEVEL):
            tg_logger.setLevel(logging.WARNING)
            logger.debug("textgrad logs at WARNING from now on; logging.getLogger('textgrad').setLevel(logging.INFO) "
                         "shows its per-op records again.")


@dataclass(frozen=True)
class RoleLimit:
    """What caps one role's replies, for the summary line.

    Attributes:
        max_tokens: The cap (``None``: unknown, e.g. the LM's default); a tuple when the role's LMs differ.
        knob: Where to raise it, written as the setting to change.
        effect: What a cut reply costs the compile (one sentence, or ``""``).
    """

    max_tokens: int | tuple[int | None, ...] | None
    knob: str
    effect: str = ""


#: Summary wording of a role with no :class:`RoleLimit` (calls outside any role included).
_UNKNOWN_LIMIT = RoleLimit(None, "raise max_tokens of the dspy.LM that made these calls")
#: How each role is named in the summary line.
_ROLE_NAMES = {"target": "target LM", "reward": "reward LM", "textgrad": "TextGrad LM",
               "seed_writer": "seed LM", UNATTRIBUTED: "LM (no role)"}


def lm_max_tokens(lm: Any) -> int | None:
    """The ``max_tokens`` a ``dspy.LM`` was built with (or ``max_completion_tokens``); ``None`` if it set none."""
    kwargs = getattr(lm, "kwargs", None) or {}
    value = kwargs.get("max_tokens", kwargs.get("max_completion_tokens"))
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def role_limits(*, target_lms: Sequence[Any], reward_lm: Any, textgrad_max_tokens: int | None,
                seed_lm: Any = None, instruction_tokens: int | None = None) -> dict[str, RoleLimit]:
    """The cap of each role of a compile and the setting that raises it.

    Args:
        target_lms: The program's LMs (the target). Their ``max_tokens`` is yours: ``dspy.LM(..., max_tokens=N)``.
        reward_lm: The reward LM (by default one of ``target_lms``; then raising it means passing ``reward_lm=``).
        textgrad_max_tokens: The cap of every TextGrad call: ``textgrad_lm``'s own ``max_tokens``, or
            ``trprompt_dspy.loop.run.TEXTGRAD_MAX_TOKENS`` when it set none (``textgrad_max_tokens()`` there).
        seed_lm: The iteration-0 instruction writer, if any.
        instruction_tokens: Its cap (``max_instruction_tokens``).

    Returns:
        ``{role: RoleLimit}`` for ``"target"``, ``"reward"``, ``"textgrad"`` and, with a seed LM, ``"seed_writer"``.
    """
    caps = tuple(dict.fromkeys(lm_max_tokens(lm) for lm in target_lms))
    shared = any(reward_lm is lm for lm in target_lms)
    limits = {
        "target": RoleLimit(
            caps[0] if len(caps) == 1 else caps,
            "raise max_tokens of your program's dspy.LM (dspy.LM(..., max_tokens=N); `trprompt compile "
            "--max-tokens N`; ModelStack(max_tokens=N))",
            "A cut-off answer can lose its output fields and score as a failure."),
        "reward": RoleLimit(
            lm_max_tokens(reward_lm),
            "pass reward_lm=dspy.LM(..., max_tokens=N) (reward_lm defaults to the target LM)" if shared
            else "raise max_tokens of reward_lm (dspy.LM(..., max_tokens=N))",
            "Cut-off critiques are still used as textual rewards (one cut before its field is a reward failure)."),
        "textgrad": RoleLimit(
            textgrad_max_tokens,
            "pass textgrad_lm=dspy.LM(..., max_tokens=N) (an LM without max_tokens gets "
            "trprompt_dspy.loop.run.TEXTGRAD_MAX_TOKENS)",
            "A cut-off update can lose its <IMPROVED_VARIABLE> tags; that step is then abandoned and t* kept."),
    }
    if seed_lm is not None:
        limits["seed_writer"] = RoleLimit(instruction_tokens, "raise TRPromptOptimizer(max_instruction_tokens=N)",
                                          "Cut-off instructions are used as written.")
    return limits


class TruncationSummary(logging.Filter):
    """A filter for DSPy's ``"dspy.clients.lm"`` logger that counts truncated replies per role and drops the records.

    Install it with :func:`summarize_truncations`; call :meth:`flush` at the end of each phase.

    Args:
        limits: ``{role: RoleLimit}`` for the summary's wording (see :func:`role_limits`).
        calls: Returns the LM calls per role so far (``lambda: meter.snapshot()["calls"]``); with it the
            summary says "N of M replies". ``None``: "N replies".
    """

    def __init__(self, limits: Mapping[str, RoleLimit] | None = None, *,
                 calls: Callable[[], Mapping[str, int]] | None = None) -> None:
        super().__init__()
        self.limits = dict(limits or {})
        self._calls = calls
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._calls_at_start = self._call_counts()

    @property
    def counts(self) -> dict[str, int]:
        """Truncated replies per role since the last :meth:`flush`."""
        with self._lock:
            return dict(self._counts)

    def count(self, record: logging.LogRecord) -> bool:
        """Count ``record`` if it is a DSPy truncation warning; ``True`` when it was counted."""
        if not str(record.msg).startswith(_TRUNCATION_PREFIX):
            return False
        role = current_role() or UNATTRIBUTED
        with self._lock:
            self._counts[role] += 1
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s: one reply cut off (DSPy: %s)", _ROLE_NAMES.get(role, role), record.getMessage())
        return True

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.count(record)

    def flush(self, phase: str) -> list[str]:
        """Log one WARNING per role with truncated replies since the last flush, and start counting again.

        Args:
            phase: Where they happened, for the message (``"iteration 0"``, ``"the baseline"``).

        Returns:
            The lines logged (empty when no reply was cut).
        """
        calls_now = self._call_counts()
        with self._lock:
            counts, self._counts = dict(self._counts), Counter()
            calls_before, self._calls_at_start = self._calls_at_start, calls_now
        lines = []
        for role in sorted(counts):
            n = counts[role]
            limit = self.limits.get(role, _UNKNOWN_LIMIT)
            total = calls_now.get(role, 0) - calls_before.get(role, 0) if calls_now is not None else 0
            of_total = f" of {total}" if total >= n and role != UNATTRIBUTED else ""
            noun = "reply" if n == 1 and not of_total else "replies"
            cap = limit.max_tokens
            if isinstance(cap, tuple):
                cap_text = "max_tokens=" + "/".join("default" if c is None else str(c) for c in cap)
            else:
                cap_text = f"max_tokens={cap}" if cap is not None else "its max_tokens"
            line = (f"{_ROLE_NAMES.get(role, role)}: {n}{of_total} {noun} cut off at {cap_text} during {phase}. "
                    + (f"{limit.effect} " if limit.effect else "") + f"To keep them whole: {limit.knob}.")
            logger.warning("%s", line)
            lines.append(line)
        return lines

    def _call_counts(self) -> dict[str, int] | None:
        return dict(self._calls()) if self._calls is not None else None


_active: contextvars.ContextVar[TruncationSummary | None] = contextvars.ContextVar("trprompt_truncations",
                                                                                   default=None)
_installed: list[TruncationSummary] = []
_install_lock = threading.Lock()


class _Dispatch(logging.Filter):
    """The one filter on DSPy's logger: hands each record to the summary of the compile that made it.

    The compile is found through a context variable (copied into the library's worker threads); a record
    from a thread that did not copy it (e.g. ``dspy.Parallel`` inside your program) goes to the only
    running summary, or passes through untouched when several compiles run at once.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        summary = _active.get()
        if summary is None:
            with _install_lock:
                summary = _installed[0] if len(_installed) == 1 else None
        return summary is None or summary.filter(record)


_DISPATCH = _Dispatch()


@contextmanager
def summarize_truncations(limits: Mapping[str, RoleLimit] | None = None, *,
                          calls: Callable[[], Mapping[str, int]] | None = None,
                          final_phase: str = "the compile") -> Iterator[TruncationSummary]:
    """Replace DSPy's per-reply truncation warnings by one summary line per role while the block runs.

    The filter is removed when the block ends, also on an exception, and whatever was counted since the
    last :meth:`TruncationSummary.flush` is reported as ``final_phase``. Blocks may run at once in
    several threads (concurrent compiles); each counts its own calls.

    Args:
        limits: ``{role: RoleLimit}`` (see :func:`role_limits`).
        calls: LM calls per role so far, for "N of M" (see :class:`TruncationSummary`).
        final_phase: The phase named by the summary logged on exit.

    Yields:
        The :class:`TruncationSummary`; call its ``flush(phase)`` at the end of each phase.
    """
    summary = TruncationSummary(limits, calls=calls)
    dspy_logger = logging.getLogger(TRUNCATION_LOGGER)
    with _install_lock:
        if not _installed:
            dspy_logger.addFilter(_DISPATCH)
        _installed.append(summary)
    token = _active.set(summary)
    try:
        yield summary
    finally:
        _active.reset(token)
        with _install_lock:
            _installed.remove(summary)
            if not _installed:
                dspy_logger.removeFilter(_DISPATCH)
        summary.flush(final_phase)
