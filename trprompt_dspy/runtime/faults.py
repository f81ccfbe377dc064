"""Fault tolerance for LM and prompt-model calls: classify failures, retry transient ones, budget the rest.

Three pieces, used by the optimizer's loop:

* :func:`classify_error` names what went wrong (``"timeout"``, ``"server_error"``, ``"connection"``,
  ``"rate_limit"``, ``"parse_error"``, ``"empty_completion"``, ...). It walks the exception's cause chain
  and recognises DSPy's ``LM*Error`` classes, litellm / openai / httpx / requests exceptions (by class
  name and HTTP status, so none of those libraries is imported) and Python's own ``TimeoutError`` /
  ``ConnectionError``.
* :class:`RetryPolicy` re-runs a call whose failure is transient (:data:`TRANSIENT_KINDS`) with
  exponential backoff and seeded jitter; ``sleep`` is injectable so tests run instantly.
* :class:`ErrorBudget` counts operations and failures (after retries) by kind and raises
  :class:`ErrorBudgetExceededError` once the failure rate goes above ``max_error_rate`` (or a phase
  failed completely), so a broken server stops the compile early with a resumable checkpoint.

:class:`GuardedPromptModel` applies the same retry policy to a prompt model and counts empty and
over-long instructions (the program falls back to the base instructions / truncates them).

Example:
    >>> classify_error(TimeoutError("read timed out"))
    'timeout'
    >>> delays = []
    >>> policy = RetryPolicy(max_retries=2, base_delay=0.5, jitter=0.0, sleep=delays.append)
    >>> calls = iter([ConnectionRefusedError("refused"), "ok"])
    >>> def flaky():
    ...     item = next(calls)
    ...     if isinstance(item, Exception):
    ...         raise item
    ...     return item
    >>> policy.call(flaky), delays
    ('ok', [0.5])
"""

from __future__ import annotations

import logging
import math
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from trprompt_dspy.errors import TRPromptError

logger = logging.getLogger(__name__)

__all__ = [
    "CompileError",
    "ErrorBudgetExceededError",
    "EmptyCompletionError",
    "PromptModelError",
    "TRANSIENT_KINDS",
    "classify_error",
    "describe_failure_kinds",
    "FAILURE_WORDS",
    "is_transient",
    "RetryPolicy",
    "ErrorBudget",
    "GuardedPromptModel",
]

T = TypeVar("T")

#: Failure kinds that are worth retrying: the same request may succeed a moment later.
TRANSIENT_KINDS = frozenset({"timeout", "server_error", "connection", "rate_limit"})


class CompileError(TRPromptError, RuntimeError):
    """The compile cannot continue (e.g. every rollout failed); the checkpoint in log_dir is kept.

    Example:
        >>> try:
        ...     raise CompileError("every rollout failed; fix the target LM and re-run with the same log_dir")
        ... except RuntimeError as exc:
        ...     print(type(exc).__name__)
        CompileError
    """


class ErrorBudgetExceededError(CompileError):
    """Too many LM / prompt-model calls failed; the compile stopped with a resumable checkpoint.

    Attributes:
        failures: Failed operations by kind (after retries), e.g. ``{"connection": 12}``.
        rate: Failed / attempted operations when the budget was exceeded.
        log_dir: The checkpoint folder; re-run ``compile`` with the same ``log_dir`` to resume.

    Example:
        >>> err = ErrorBudgetExceededError("too many failures", failures={"connection": 12}, rate=0.6,
        ...                                log_dir="runs/x")
        >>> isinstance(err, CompileError), err.failures["connection"], err.log_dir
        (True, 12, 'runs/x')
    """

    def __init__(self, message: str, *, failures: Mapping[str, int], rate: float, log_dir: str | None) -> None:
        super().__init__(message)
        self.failures = dict(failures)
        self.rate = rate
        self.log_dir = log_dir


class EmptyCompletionError(TRPromptError, ValueError):
    """An LM returned an empty completion where text was required."""


class PromptModelError(TRPromptError, RuntimeError):
    """The prompt model failed to write an instruction (after retries); ``__cause__`` holds why."""


# --------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------

_TIMEOUT_NAMES = ("Timeout", "TimedOut", "Deadline")
_CONNECTION_NAMES = ("Connect", "Connection", "Transport", "RemoteProtocolError", "NetworkError", "ReadError",
                     "ProtocolError", "ServerDisconnected", "IncompleteRead")
_SERVER_NAMES = ("InternalServerError", "ServerError", "ServiceUnavailable", "BadGateway", "GatewayTimeout",
                 "APIStatusError5")
_RATE_NAMES = ("RateLimit", "TooManyRequests")
_AUTH_NAMES = ("AuthError", "Authentication", "PermissionDenied", "LMBillingError")


def _status(exc: BaseException) -> int | None:
    for attr in ("status", "status_code", "http_status", "code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and 100 <= value < 600:
            return value
    response = getattr(exc, "response", None)
    value = getattr(response, "status_code", None)
    return value if isinstance(value, int) and 100 <= value < 600 else None


def _names(exc: BaseException) -> list[str]:
    return [c.__name__ for c in type(exc).__mro__ if c not in (BaseException, Exception, object)]


#: How OpenAI-compatible servers word a prompt that does not fit the context ("This model's maximum context
#: length is 2048 tokens. However, your prompt contains at least 2049 input tokens ..." from vLLM).
_CONTEXT_TEXT = re.compile(r"maximum context length|context length|context window|too many tokens", re.IGNORECASE)


def _kind_of(exc: BaseException) -> str | None:
    names = _names(exc)
    joined = " ".join(names)
    if isinstance(exc, ErrorBudgetExceededError):
        return "error_budget"
    if isinstance(exc, PromptModelError):
        return "prompt_model_error"
    if isinstance(exc, EmptyCompletionError):
        return "empty_completion"
    if "MetricValueError" in names:
        return "metric_error"
    if "AdapterParseError" in names:
        text = str(exc).lower()
        return "empty_completion" if "empty or null response" in text else "parse_error"
    if "ContextWindowExceeded" in joined:
        return "context_window"
    status = _status(exc)
    if isinstance(exc, TimeoutError) or any(n in joined for n in _TIMEOUT_NAMES) or status in (408, 504):
        return "timeout"
    if any(n in joined for n in _RATE_NAMES) or status == 429:
        return "rate_limit"
    if any(n in joined for n in _AUTH_NAMES) or status in (401, 402, 403):
        return "auth"
    if (status is not None and status >= 500) or any(n in joined for n in _SERVER_NAMES):
        return "server_error"
    if isinstance(exc, ConnectionError) or any(n in joined for n in _CONNECTION_NAMES):
        return "connection"
    if status is not None and 400 <= status < 500:
        # OpenAI-compatible servers (vLLM) answer a prompt longer than the context with a plain 400.
        return "context_window" if _CONTEXT_TEXT.search(str(exc)) else "bad_request"
    return None


def classify_error(exc: BaseException) -> str:
    """Name the kind of an LM / prompt-model failure.

    The exception and its ``__cause__`` / ``__context__`` chain are inspected, outermost first; DSPy wraps
    engine errors (``LMUnexpectedError`` around a ``TimeoutError``), so the first recognised link wins.

    Returns:
        One of ``timeout``, ``server_error``, ``connection``, ``rate_limit`` (transient, see
        :data:`TRANSIENT_KINDS`), ``parse_error``, ``empty_completion``, ``context_window``, ``auth``,
        ``bad_request``, ``metric_error``, ``prompt_model_error``, ``error_budget`` or ``other``.

    Example:
        >>> class APIStatusError(Exception):
        ...     status_code = 503
        >>> classify_error(RuntimeError("wrapped")), classify_error(APIStatusError("unavailable"))
        ('other', 'server_error')
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 12:
        seen.add(id(current))
        kind = _kind_of(current)
        if kind is not None:
            return kind
        current = current.__cause__ or current.__context__
    return "other"


#: How each failure kind of a program run reads in a log line or a report, as ``(one, several)``: the one place
#: the words come from. Besides :func:`classify_error`'s kinds there is ``truncated``, which
#: :func:`~trprompt_dspy.loop.rollouts.run_rollouts` gives to an unparseable (or empty) answer when DSPy
#: reported the LM reply behind it as cut at ``max_tokens``.
FAILURE_WORDS: dict[str, tuple[str, str]] = {
    "parse_error": ("unparseable answer", "unparseable answers"),
    "truncated": ("answer truncated at max_tokens", "answers truncated at max_tokens"),
    "empty_completion": ("empty answer", "empty answers"),
    "timeout": ("timed-out call", "timed-out calls"),
    "server_error": ("failed call (server error)", "failed calls (server errors)"),
    "connection": ("failed call (connection)", "failed calls (connection)"),
    "rate_limit": ("rate-limited call", "rate-limited calls"),
    "context_window": ("prompt too long for the context window", "prompts too long for the context window"),
    "auth": ("call refused for credentials", "calls refused for credentials"),
    "bad_request": ("request the server rejected", "requests the server rejected"),
    "metric_error": ("metric failure", "metric failures"),
    "prompt_model_error": ("prompt-model failure", "prompt-model failures"),
    "error_budget": ("stop by the error budget", "stops by the error budget"),
    "other": ("program exception", "program exceptions"),
}


def describe_failure_kinds(counts: Mapping[str, int]) -> str:
    """Failures by kind in plain words, most frequent first: ``"7 unparseable answers, 3 timed-out calls"``.

    Kinds without an entry in :data:`FAILURE_WORDS` are named as they are; zero counts are left out.

    Example:
        >>> describe_failure_kinds({"timeout": 1, "parse_error": 7, "truncated": 3, "odd_kind": 2})
        '7 unparseable answers, 3 answers truncated at max_tokens, 2 odd_kind, 1 timed-out call'
        >>> describe_failure_kinds({})
        ''
    """
    parts = []
    for kind, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if n > 0:
            one, several = FAILURE_WORDS.get(kind, (kind, kind))
            parts.append(f"{n} {one if n == 1 else several}")
    return ", ".join(parts)


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same call may succeed (timeouts, 5xx, dropped connections, rate limits)."""
    return classify_error(exc) in TRANSIENT_KINDS


# --------------------------------------------------------------------------------------------------
# Retries
# --------------------------------------------------------------------------------------------------


@dataclass
class RetryPolicy:
    """Retry transient failures with exponential backoff and jitter.

    The delay before retry ``a`` (1-based) is ``min(max_delay, base_delay * 2 ** (a - 1))`` times a random
    factor in ``[1 - jitter, 1 + jitter]`` drawn from an RNG seeded with ``seed``; a ``retry_after``
    attribute on the exception (seconds, as rate-limit errors carry) takes precedence.

    Args:
        max_retries: Retries after the first attempt (0 disables retrying).
        base_delay: Seconds before the first retry.
        max_delay: Cap on one delay.
        jitter: Relative jitter in ``[0, 1]``.
        seed: Seeds the jitter RNG (``None``: fresh entropy).
        sleep: The sleep function (inject a fake one in tests).
        on_retry: Called as ``on_retry(kind, attempt, exc)`` before each retry (e.g. to count it).

    Example:
        >>> RetryPolicy(base_delay=1.0, jitter=0.0).delay(3)
        4.0
    """

    max_retries: int = 2
    base_delay: float = 0.5
    max_delay: float = 8.0
    jitter: float = 0.25
    seed: int | None = 0
    sleep: Callable[[float], None] = time.sleep
    on_retry: Callable[[str, int, BaseException], None] | None = None
    _rng: random.Random = field(init=False, repr=False)
    _lock: threading.Lock = field(init=False, repr=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0; got max_retries={self.max_retries!r}.")
        for name in ("base_delay", "max_delay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number of seconds >= 0; got {name}={value!r}.")
        if not isinstance(self.jitter, int | float) or not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1]; got jitter={self.jitter!r}.")
        if not callable(self.sleep):
            raise TypeError(f"sleep must be callable(seconds); got {self.sleep!r}.")
        self._rng = random.Random(self.seed)

    def delay(self, attempt: int, exc: BaseException | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        hint = getattr(exc, "retry_after", None) if exc is not None else None
        if isinstance(hint, int | float) and not isinstance(hint, bool) and math.isfinite(hint) and hint >= 0:
            return float(min(hint, self.max_delay))
        base = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        if self.jitter:
            with self._lock:
                base *= 1 + self._rng.uniform(-self.jitter, self.jitter)
        return float(max(0.0, min(base, self.max_delay)))

    def should_retry(self, exc: BaseException, attempt: int) -> bool:
        """Whether failure number ``attempt`` (1-based) of a call should be retried; waits if so."""
        kind = classify_error(exc)
        if kind not in TRANSIENT_KINDS or attempt > self.max_retries:
            return False
        if self.on_retry is not None:
            self.on_retry(kind, attempt, exc)
        wait = self.delay(attempt, exc)
        logger.info("Transient %s (%s: %.200s); retry %d/%d in %.2f s.", kind, type(exc).__name__, exc, attempt,
                    self.max_retries, wait)
        if wait > 0:
            self.sleep(wait)
        return True

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call ``fn(*args, **kwargs)``, retrying transient failures; re-raise the last failure."""
        attempt = 0
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                attempt += 1
                if not self.should_retry(exc, attempt):
                    raise


# --------------------------------------------------------------------------------------------------
# Error budget
# --------------------------------------------------------------------------------------------------


class ErrorBudget:
    """Stop a compile whose calls fail too often, instead of training on garbage.

    Each phase reports how many operations it ran (program runs, reward critiques, TextGrad steps) and
    which failed for good (after retries). The budget is exceeded when, over the whole compile, more than
    ``max_error_rate`` of at least ``min_operations`` operations failed, when more than ``max_errors``
    failed, or when every operation of a phase of at least 2 failed (a server that went down).

    Args:
        max_error_rate: Largest tolerated failure rate, in ``[0, 1]``; 1.0 never stops on the rate.
        max_errors: Largest tolerated number of failures (``None``: no absolute cap).
        min_operations: Operations needed before the rate is enforced (small samples are noisy).

    Example:
        >>> budget = ErrorBudget(max_error_rate=0.5, min_operations=4)
        >>> budget.record("rollouts", total=10, failures={"timeout": 2})
        >>> budget.rate
        0.2
    """

    def __init__(self, max_error_rate: float = 0.5, *, max_errors: int | None = None, min_operations: int = 8) -> None:
        if isinstance(max_error_rate, bool) or not isinstance(max_error_rate, int | float) \
                or not 0.0 <= float(max_error_rate) <= 1.0:
            raise ValueError(f"max_error_rate must be a fraction in [0, 1] (e.g. 0.5); got max_error_rate="
                             f"{max_error_rate!r}.")
        if max_errors is not None and (isinstance(max_errors, bool) or not isinstance(max_errors, int)
                                       or max_errors < 0):
            raise ValueError(f"max_errors must be an integer >= 0 or None; got max_errors={max_errors!r}.")
        if isinstance(min_operations, bool) or not isinstance(min_operations, int) or min_operations < 1:
            raise ValueError(f"min_operations must be a positive integer; got {min_operations!r}.")
        self.max_error_rate = float(max_error_rate)
        self.max_errors = max_errors
        self.min_operations = min_operations
        self.operations = 0
        self.failures: Counter[str] = Counter()
        self._lock = threading.Lock()

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    @property
    def rate(self) -> float:
        return self.failed / self.operations if self.operations else 0.0

    def record(self, phase: str, *, total: int, failures: Mapping[str, int] | Sequence[str],
               log_dir: str | Path | None = None, systemic: bool = True) -> None:
        """Add one phase's outcome and raise if the budget is now exceeded.

        Args:
            phase: What ran (``"rollouts"``, ``"validation"``...), for the message.
            total: Operations the phase ran.
            failures: Failed operations by kind (a mapping, or one kind per failure).
            log_dir: The checkpoint folder, quoted in the error so the user can resume.
            systemic: Whether a phase in which every operation failed stops the compile by itself
                (``False`` for optional steps such as TextGrad, whose failure only skips a refinement).

        Raises:
            ErrorBudgetExceededError: The budget is exceeded.
        """
        counts = Counter(failures) if not isinstance(failures, Mapping) else Counter(dict(failures))
        n_failed = sum(counts.values())
        with self._lock:
            self.operations += total
            self.failures.update(counts)
            rate, failed, ops, by_kind = self.rate, self.failed, self.operations, dict(self.failures)
        reason = None
        if systemic and total >= 2 and n_failed >= total:
            reason = f"every one of the {total} operations of the {phase} phase failed ({dict(counts)})"
        elif self.max_errors is not None and failed > self.max_errors:
            reason = f"{failed} operations failed, more than max_errors={self.max_errors}"
        elif ops >= self.min_operations and rate > self.max_error_rate:
            reason = (f"{failed} of {ops} operations failed ({rate:.0%}), more than "
                      f"max_error_rate={self.max_error_rate:g}")
        if reason is None:
            return
        resume = (f" The checkpoint in log_dir={str(log_dir)!r} is kept: fix the cause, then call compile again "
                  "with the same log_dir to resume." if log_dir is not None else "")
        raise ErrorBudgetExceededError(
            f"Stopping the compile during {phase}: {reason}. Failures by kind so far: {by_kind}. Check that the "
            "LM servers are up and answering in the expected format (for transient errors raise max_retries; to "
            f"tolerate more failures raise max_error_rate).{resume}",
            failures=by_kind, rate=rate, log_dir=None if log_dir is None else str(log_dir))


# --------------------------------------------------------------------------------------------------
# Prompt-model guard
# --------------------------------------------------------------------------------------------------


class GuardedPromptModel:
    """Wrap a prompt model: retry transient failures, count empty and over-long instructions.

    Over-long instructions are cut at ``max_chars`` (at a word boundary); empty ones are passed on as
    ``""``, for which the program falls back to the predictor's own instructions. Counts go to
    ``count(kind, n)`` (e.g. :meth:`trprompt_dspy.runtime.usage.UsageMeter.fail`) as
    ``prompt_model_empty_instruction`` / ``prompt_model_overlong_instruction``; a failure that survives the
    retries is re-raised as :class:`PromptModelError`.

    Args:
        inner: The prompt model.
        retry: The retry policy (``None``: no retries).
        max_chars: Longest instruction kept whole.
        count: ``count(kind, n)`` callback.

    Example:
        >>> from trprompt_dspy.backends.prompt_model.fake import FakePromptModel
        >>> from trprompt_dspy.backends.prompt_model.base import InstructionRequest
        >>> seen = Counter()
        >>> pm = GuardedPromptModel(FakePromptModel(lambda r: "word " * 500), max_chars=100,
        ...                         count=lambda kind, n=1: seen.update({kind: n}))
        >>> len(pm.generate([InstructionRequest("qa", "q -> a", "q: 1", "Good.")], max_new_tokens=600)[0][0]) <= 100
        True
        >>> dict(seen)
        {'prompt_model_overlong_instruction': 1}
    """

    def __init__(self, inner: Any, *, retry: RetryPolicy | None = None, max_chars: int = 1200,
                 count: Callable[..., None] | None = None) -> None:
        self.inner = inner
        self.retry = retry
        self.max_chars = max_chars
        self._count = count

    # The PromptModel protocol, delegated.
    @property
    def adapter_path(self) -> str | None:
        return self.inner.adapter_path

    @property
    def trainable(self) -> bool:
        return bool(getattr(self.inner, "trainable", True))

    def train(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.train(*args, **kwargs)

    def load_adapter(self, path: Any) -> None:
        self.inner.load_adapter(path)

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()

    def __deepcopy__(self, memo: dict[int, Any]) -> GuardedPromptModel:
        return self

    def __repr__(self) -> str:
        return f"GuardedPromptModel({self.inner!r})"

    def generate(self, requests: Sequence[Any], **kwargs: Any) -> list[list[str]]:
        """``inner.generate`` with retries; empty and over-long outputs are counted (long ones cut)."""
        try:
            out = self.retry.call(self.inner.generate, requests, **kwargs) if self.retry else \
                self.inner.generate(requests, **kwargs)
        except Exception as exc:
            raise PromptModelError(f"the prompt model failed ({classify_error(exc)}): {type(exc).__name__}: "
                                   f"{exc}") from exc
        if not isinstance(out, list):
            return out  # the program reports the contract violation with the backend's name
        empty = overlong = 0
        fixed: list[Any] = []
        for row in out:
            if not isinstance(row, list):
                fixed.append(row)
                continue
            new_row = []
            for text in row:
                if not isinstance(text, str) or not text.strip():
                    empty += 1
                    new_row.append("" if not isinstance(text, str) else text)
                elif len(text) > self.max_chars:
                    overlong += 1
                    cut = text[: self.max_chars]
                    space = cut.rfind(" ")
                    new_row.append((cut[:space] if space > self.max_chars // 2 else cut).rstrip())
                else:
                    new_row.append(text)
            fixed.append(new_row)
        if self._count is not None:
            if empty:
                self._count("prompt_model_empty_instruction", empty)
            if overlong:
                self._count("prompt_model_overlong_instruction", overlong)
        return fixed
