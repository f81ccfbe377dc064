"""A small, generic micro-batcher: collect work items from many threads and run them in batches.

Callers :meth:`MicroBatcher.submit` items and get a :class:`~concurrent.futures.Future` back. One
worker thread takes the first waiting item, waits up to ``max_wait_s`` for more, groups the items by
``key(item)`` (only items with equal keys share a batch), cuts each group into batches whose total
``size(item)`` stays within ``max_batch_size`` and calls ``run_batch(items) -> results`` once per
batch. An exception in ``run_batch`` fails exactly the futures of that batch.

It knows nothing about models; :class:`~trprompt_dspy.backends.prompt_model.hf.HFPromptModel` uses it to merge
greedy generation requests arriving from DSPy's worker threads into one left-padded ``generate``.

Example:
    >>> batcher = MicroBatcher(lambda xs: [x * 10 for x in xs], max_batch_size=4)
    >>> batcher.map([1, 2, 3])
    [10, 20, 30]
    >>> batcher.close()
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

__all__ = ["MicroBatcher"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

_STOP = object()


class MicroBatcher(Generic[T, R]):
    """Merge concurrently submitted items into batches run by one worker thread.

    Args:
        run_batch: Called with a non-empty list of items sharing one key; must return one result per
            item, in order.
        max_batch_size: Most total ``size`` per batch (an item larger than this runs alone).
        max_wait_s: How long the worker waits for more items after the first one arrives.
        key: Items with equal keys may share a batch (default: all items may).
        size: Cost of an item against ``max_batch_size`` (default 1).
        name: Name of the worker thread (shows up in debuggers and logs).

    Raises:
        ValueError: ``max_batch_size < 1`` or ``max_wait_s < 0``.
    """

    def __init__(self, run_batch: Callable[[list[T]], Sequence[R]], *, max_batch_size: int = 16,
                 max_wait_s: float = 0.02, key: Callable[[T], Hashable] | None = None,
                 size: Callable[[T], int] | None = None, name: str = "trprompt-batcher") -> None:
        if not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1; got {max_batch_size!r}.")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0; got {max_wait_s!r}.")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = float(max_wait_s)
        self._key = key or (lambda item: None)
        self._size = size or (lambda item: 1)
        self._name = name
        self._queue: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stats = {"items": 0, "batches": 0, "max_batch": 0}

    def submit(self, item: T) -> Future:
        """Queue one item; the returned future resolves to its result (or its batch's exception)."""
        future: Future = Future()
        self._ensure_worker()
        self._queue.put((item, future))
        return future

    def submit_many(self, items: Iterable[T]) -> list[Future]:
        """Queue several items at once (they are seen together, so they can share a batch)."""
        pairs = [(item, Future()) for item in items]
        if pairs:
            self._ensure_worker()
            for pair in pairs:
                self._queue.put(pair)
        return [f for _, f in pairs]

    def map(self, items: Iterable[T]) -> list[R]:
        """Submit ``items``, wait, and return their results in order (re-raises the first failure)."""
        return [f.result() for f in self.submit_many(items)]

    def stats(self) -> dict[str, int]:
        """Counters: ``items`` run, ``batches`` run and the largest batch (in items)."""
        with self._lock:
            return dict(self._stats)

    def close(self, timeout: float = 60.0) -> None:
        """Finish the queued items, then stop the worker (a later ``submit`` starts a new one)."""
        with self._lock:
            worker, self._worker = self._worker, None
            if worker is not None:
                self._queue.put(_STOP)
        if worker is not None:
            worker.join(timeout=timeout)

    # ------------------------------------------------------------------ internals

    def _ensure_worker(self) -> None:
        with self._lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._worker.start()

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            pending, stop_after = [first], False
            deadline = time.monotonic() + self.max_wait_s
            while sum(self._size(item) for item, _ in pending) < self.max_batch_size:
                try:
                    got = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if got is _STOP:
                    stop_after = True
                    break
                pending.append(got)
            for batch in self._batches(pending):
                self._run(batch)
            if stop_after:
                return

    def _batches(self, pending: list[tuple[T, Future]]) -> list[list[tuple[T, Future]]]:
        groups: dict[Hashable, list[tuple[T, Future]]] = {}
        for pair in pending:
            groups.setdefault(self._key(pair[0]), []).append(pair)
        batches = []
        for pairs in groups.values():
            current: list[tuple[T, Future]] = []
            used = 0
            for pair in pairs:
                cost = max(1, int(self._size(pair[0])))
                if current and used + cost > self.max_batch_size:
                    batches.append(current)
                    current, used = [], 0
                current.append(pair)
                used += cost
            if current:
                batches.append(current)
        return batches

    def _run(self, batch: list[tuple[T, Future]]) -> None:
        live = [(item, f) for item, f in batch if f.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            results = list(self._run_batch([item for item, _ in live]))
            if len(results) != len(live):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(live)} items.")
        except BaseException as exc:  # noqa: BLE001 - every waiting caller must be released
            for _, f in live:
                f.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        with self._lock:
            self._stats["items"] += len(live)
            self._stats["batches"] += 1
            self._stats["max_batch"] = max(self._stats["max_batch"], len(live))
        for (_, f), result in zip(live, results, strict=True):
            f.set_result(result)

    def __repr__(self) -> str:
        return f"MicroBatcher(max_batch_size={self.max_batch_size}, max_wait_s={self.max_wait_s})"

    def __getstate__(self) -> Any:  # pragma: no cover - guard against accidental pickling
        raise TypeError("MicroBatcher holds a thread and a queue and cannot be pickled.")
