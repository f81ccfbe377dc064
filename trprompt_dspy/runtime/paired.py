"""Exact paired tests on two programs scored on the same examples (selection, reports, benchmarks).

Two programs answered the same examples; only the examples where they differ say which is better. These are
counted as ``better`` / ``worse`` (or ``b`` / ``c``), and the exact binomial tests below ask how likely a split
at least this lopsided is if neither program were better (each discordant example a fair coin).

* :func:`mcnemar_exact` — two-sided: "do the programs differ?" (reports, benchmarks).
* :func:`sign_test_greater` — one-sided: "is the candidate better?" (``TRPromptOptimizer(significance_level=)``).
* :func:`paired_counts` — ``(better, worse)`` from two per-example score lists (any metric: ``>`` / ``<``).

They live under ``runtime/`` so that the loop (selection) and the apps (reports) share one definition.

Example:
    >>> paired_counts([1, 0, 0, 1, 0], [1, 1, 1, 0, 0])
    (2, 1)
    >>> round(sign_test_greater(better=5, worse=3), 4)      # a 2-example lead on 50 is not evidence
    0.3633
    >>> round(sign_test_greater(better=6, worse=0), 4)
    0.0156
    >>> mcnemar_exact(b=5, c=0)["p_value"]
    0.0625
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["mcnemar_exact", "paired_counts", "sign_test_greater"]


def _check_count(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be a non-negative int count of discordant pairs; got {v!r}.")


def mcnemar_exact(b: int, c: int) -> dict[str, Any]:
    """Exact two-sided McNemar test: ``p = min(1, 2 * P[X <= min(b, c)])`` with ``X ~ Binomial(b + c, 1/2)``.

    Args:
        b: Discordant pairs where only A is correct.
        c: Discordant pairs where only B is correct.

    Returns:
        ``{"b": b, "c": c, "p_value": p}`` (``p = 1.0`` when there is no discordant pair).

    Example:
        >>> round(mcnemar_exact(b=10, c=2)["p_value"], 4)
        0.0386
    """
    _check_count("b", b)
    _check_count("c", c)
    n = b + c
    if n == 0:
        return {"b": b, "c": c, "p_value": 1.0}
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return {"b": b, "c": c, "p_value": min(1.0, 2.0 * tail)}


def sign_test_greater(better: int, worse: int) -> float:
    """One-sided exact sign test: ``P[X >= better]`` with ``X ~ Binomial(better + worse, 1/2)``.

    The probability that a candidate no better than the baseline would win at least ``better`` of the
    ``better + worse`` examples on which the two differ. ``1.0`` when they never differ.

    Example:
        >>> sign_test_greater(better=0, worse=0)
        1.0
        >>> round(sign_test_greater(better=8, worse=1), 4)
        0.0195
    """
    _check_count("better", better)
    _check_count("worse", worse)
    n = better + worse
    if n == 0:
        return 1.0
    return sum(math.comb(n, i) for i in range(better, n + 1)) / 2**n


def paired_counts(baseline: Sequence[float], candidate: Sequence[float]) -> tuple[int, int]:
    """``(better, worse)``: examples where ``candidate`` scored above / below ``baseline``.

    Raises:
        ValueError: the two lists do not have the same length (they must score the same examples, in order).
    """
    if len(baseline) != len(candidate):
        raise ValueError(f"Both score lists must cover the same examples in the same order; got {len(baseline)} "
                         f"and {len(candidate)} scores.")
    pairs = list(zip(baseline, candidate, strict=True))
    return sum(1 for s, c in pairs if c > s), sum(1 for s, c in pairs if c < s)
