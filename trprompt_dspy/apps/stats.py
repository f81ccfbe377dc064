"""Paired statistics for comparing two programs on the same examples (the demo report, the benchmarks).

Both tests compare two optimizers *on the same test examples*. With several seeds the per-example
outcomes are paired by (seed, example): seed ``s`` of A against seed ``s`` of B.

* :func:`mcnemar_exact` — the exact (binomial) McNemar test on the discordant pairs.
* :func:`wilson` — a 95 % interval of one accuracy.
* :func:`paired_bootstrap` — resamples test examples (the same draw for every seed and both optimizers)
  and reports the accuracy difference, a 95 % percentile interval and a two-sided p-value. Seeded, so
  the same inputs always give the same numbers.

Example:
    >>> mcnemar_exact(b=5, c=0)["p_value"]
    0.0625
    >>> mean_std([0.5, 0.7])
    (0.6, 0.1414)
    >>> a = [[1, 1, 0, 1], [1, 0, 0, 1]]
    >>> b = [[0, 1, 0, 0], [0, 0, 0, 1]]
    >>> r = paired_bootstrap(a, b, iterations=2000, seed=0)
    >>> r["diff"], r == paired_bootstrap(a, b, iterations=2000, seed=0)
    (0.375, True)
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

from trprompt_dspy.runtime.paired import mcnemar_exact  # one definition, shared with the loop's selection

__all__ = ["mean_std", "discordant_counts", "mcnemar_exact", "paired_bootstrap", "wilson"]


def mean_std(values: Sequence[float], digits: int = 4) -> tuple[float, float]:
    """Mean and sample standard deviation (``n - 1``; 0.0 for a single value), rounded.

    Raises:
        ValueError: ``values`` is empty.
    """
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std needs at least one value; got an empty sequence.")
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return round(mean, digits), round(std, digits)


def _check_paired(a: Sequence[Sequence[Any]], b: Sequence[Sequence[Any]]) -> None:
    if len(a) != len(b) or not a:
        raise ValueError(f"Pass the same non-zero number of seeds for both optimizers; got {len(a)} and {len(b)}.")
    for i, (ra, rb) in enumerate(zip(a, b, strict=True)):
        if len(ra) != len(rb) or not ra:
            raise ValueError(
                f"Seed row {i}: both optimizers must be scored on the same non-empty example list; "
                f"got {len(ra)} and {len(rb)} outcomes."
            )
    if len({len(r) for r in a}) != 1:
        raise ValueError(f"Every seed must cover the same examples; row lengths differ: {[len(r) for r in a]}.")


def discordant_counts(a: Sequence[Sequence[Any]], b: Sequence[Sequence[Any]]) -> tuple[int, int]:
    """``(b, c)``: pairs where only A is correct, and where only B is correct (pooled over seeds).

    Example:
        >>> discordant_counts([[1, 0, 1, 1]], [[0, 0, 1, 0]])
        (2, 0)
    """
    _check_paired(a, b)
    only_a = sum(1 for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True) if bool(x) and not bool(y))
    only_b = sum(1 for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True) if bool(y) and not bool(x))
    return only_a, only_b


def paired_bootstrap(a: Sequence[Sequence[Any]], b: Sequence[Sequence[Any]], *, iterations: int = 10_000,
                     seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap over test examples of the accuracy difference A - B (averaged over seeds).

    Each replicate draws ``n`` example positions with replacement (``random.Random(seed)``) and applies
    the same draw to every seed row of A and B.

    Args:
        a: Per-seed lists of 0/1 outcomes of optimizer A (one row per seed, same example order).
        b: The same for optimizer B.
        iterations: Bootstrap replicates.
        seed: Seed of the resampling.

    Returns:
        ``diff`` (observed mean difference), ``ci95`` (2.5 / 97.5 percentiles), ``p_value`` (two-sided:
        twice the smaller share of replicates on either side of 0, at most 1), ``iterations``, ``seed``.
    """
    _check_paired(a, b)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive int; got {iterations!r}.")
    n = len(a[0])
    # Per-example difference averaged over seeds: resampling examples then averaging is the same as
    # resampling these per-example means.
    d = [sum(float(bool(ra[i])) - float(bool(rb[i])) for ra, rb in zip(a, b, strict=True)) / len(a) for i in range(n)]
    observed = sum(d) / n
    rng = random.Random(seed)
    reps = []
    for _ in range(iterations):
        reps.append(sum(d[rng.randrange(n)] for _ in range(n)) / n)
    reps.sort()
    lo = reps[max(0, math.floor(0.025 * iterations))]
    hi = reps[min(iterations - 1, math.ceil(0.975 * iterations) - 1)]
    le = sum(1 for r in reps if r <= 0) / iterations
    ge = sum(1 for r in reps if r >= 0) / iterations
    return {"diff": round(observed, 6), "ci95": [round(lo, 6), round(hi, 6)],
            "p_value": round(min(1.0, 2.0 * min(le, ge)), 6), "iterations": iterations, "seed": seed}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson 95 % interval of a proportion ``k / n`` (``(0.0, 0.0)`` for ``n = 0``).

    Example:
        >>> [round(x, 3) for x in wilson(25, 100)]
        [0.175, 0.343]
    """
    if n == 0:
        return 0.0, 0.0
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)
