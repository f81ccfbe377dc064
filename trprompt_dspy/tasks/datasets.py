"""GSM8K, GSM-Hard, MATH and MATH-500 as lists of ``dspy.Example``.

Every example has the input field ``question`` (``.with_inputs("question")``) and the gold field
``answer``, normalised for the metrics in :mod:`trprompt_dspy.tasks.metrics`:

* GSM8K: ``answer`` is the number after ``####`` without commas (``"-5"``, ``"1600"``); the worked
  solution is kept as ``gold_reasoning``.
* GSM-Hard: ``answer`` is the float ``target`` as a string (``"3431580"``, ``"14053029.666666666"``);
  PAL's program is kept as ``gold_code``.
* MATH / MATH-500: ``answer`` is the content of the last ``\\boxed{}`` of the solution; ``gold_reasoning``
  (the solution), ``level`` (int or ``None``) and ``type`` (subject) are kept.

Each example also carries ``idx``, its 0-based record index in the source file.

Where the data comes from (``source``):

* ``"local"``: the JSONL files of the shared data folder (layout in its README.md), read with the
  Hugging Face ``datasets`` JSON loader. The folder is ``data_dir`` if given, else ``$TRPROMPT_SHARED_DATA``,
  else ``<repo>/../shared/data``.
* ``"bundled"``: a small GSM8K subset shipped in ``trprompt_dspy/tasks/data`` (200 train, 100 dev, 100 test).
* ``"hub"``: the Hugging Face hub (needs internet).
* ``"auto"`` (default): local, falling back to the bundled subset for GSM8K.

Example:
    >>> from trprompt_dspy.tasks.datasets import load_dataset, load_fixed_split, split_dataset
    >>> train = load_dataset("gsm8k", "train", source="bundled", limit=50)
    >>> train[0].answer, list(train[0].inputs().keys())
    ('121', ['question'])
    >>> dev = load_fixed_split("gsm8k", "dev", source="bundled")
    >>> a, b = split_dataset(train, fractions=(0.8, 0.2), seed=0)
    >>> len(a), len(b)
    (40, 10)
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import dspy

from trprompt_dspy._lazy import require
from trprompt_dspy.tasks.math_equivalence import extract_boxed

logger = logging.getLogger(__name__)

__all__ = [
    "DATASET_NAMES",
    "SHARED_DATA_ENV",
    "BUNDLED_DATA_DIR",
    "load_dataset",
    "load_fixed_split",
    "split_dataset",
    "resolve_data_dir",
]

DatasetName = Literal["gsm8k", "gsmhard", "math", "math500"]
Source = Literal["auto", "local", "hub", "bundled"]

DATASET_NAMES: tuple[str, ...] = ("gsm8k", "gsmhard", "math", "math500")
SHARED_DATA_ENV = "TRPROMPT_SHARED_DATA"
BUNDLED_DATA_DIR = Path(__file__).resolve().parent / "data"
_DEFAULT_SHARED_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"  # <repo>/../shared/data
_SOURCES = ("auto", "local", "hub", "bundled")

# (name, split) -> file under the shared data dir.
_LOCAL_FILES: dict[tuple[str, str], str] = {
    ("gsm8k", "train"): "gsm8k/train.jsonl",
    ("gsm8k", "test"): "gsm8k/test.jsonl",
    ("gsmhard", "test"): "gsmhard/gsmhardv2.jsonl",
    ("math", "test"): "math/test.jsonl",
    ("math500", "test"): "math500/test.jsonl",
}
# (name, split) -> (hub id, config, hub split).
_HUB_IDS: dict[tuple[str, str], tuple[str, str | None, str]] = {
    ("gsm8k", "train"): ("openai/gsm8k", "main", "train"),
    ("gsm8k", "test"): ("openai/gsm8k", "main", "test"),
    ("gsmhard", "test"): ("reasoning-machines/gsm-hard", None, "train"),  # its only split
    ("math", "train"): ("DigitalLearningGmbH/MATH-lighteval", "default", "train"),
    ("math", "test"): ("DigitalLearningGmbH/MATH-lighteval", "default", "test"),
    ("math500", "test"): ("HuggingFaceH4/MATH-500", None, "test"),
}
_BUNDLED_FILES: dict[str, str] = {
    "train": "gsm8k_train_subset.jsonl",
    "dev": "gsm8k_dev.jsonl",
    "test": "gsm8k_test_subset.jsonl",
}
_BUNDLED_NOTE = {
    "train": "200 records of the 7,373-record train pool",
    "dev": "all 100 fixed dev records",
    "test": "the first 100 of the 500 fixed test records",
}


# ---------------------------------------------------------------------------------------------------
# Record -> dspy.Example
# ---------------------------------------------------------------------------------------------------


def _level(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    digits = "".join(ch for ch in str(value) if ch.isdigit())
    return int(digits) if digits else None


def _format_target(value: Any) -> str:
    number = float(value)
    if number.is_integer() and abs(number) < 1e16:
        return str(int(number))
    return repr(number)


def _gsm8k_example(row: dict[str, Any], idx: int) -> dspy.Example:
    reasoning, _, final = row["answer"].rpartition("####")
    return dspy.Example(
        question=row["question"],
        answer=final.strip().replace(",", ""),
        gold_reasoning=reasoning.strip(),
        idx=int(row["idx"]) if row.get("idx") is not None else idx,  # bundled rows record their source line
    ).with_inputs("question")


def _gsmhard_example(row: dict[str, Any], idx: int) -> dspy.Example:
    return dspy.Example(
        question=row["input"], answer=_format_target(row["target"]), gold_code=row.get("code"), idx=idx
    ).with_inputs("question")


def _math_example(row: dict[str, Any], idx: int) -> dspy.Example:
    answer = row.get("answer") or extract_boxed(row["solution"])
    if answer is None:
        raise ValueError(
            f"MATH record {idx} has no \\boxed{{}} answer in its solution: {row['solution'][-200:]!r}"
        )
    return dspy.Example(
        question=row["problem"],
        answer=answer,
        gold_reasoning=row["solution"],
        level=_level(row.get("level")),
        type=row.get("type") or row.get("subject"),
        idx=idx,
        **({"unique_id": row["unique_id"]} if row.get("unique_id") else {}),
    ).with_inputs("question")


_CONVERTERS: dict[str, Callable[[dict[str, Any], int], dspy.Example]] = {
    "gsm8k": _gsm8k_example,
    "gsmhard": _gsmhard_example,
    "math": _math_example,
    "math500": _math_example,
}


# ---------------------------------------------------------------------------------------------------
# Validation and file resolution
# ---------------------------------------------------------------------------------------------------


def _check_name(name: str, allowed: Sequence[str]) -> str:
    if name not in allowed:
        raise ValueError(f"Unknown dataset name {name!r}; valid names are: {', '.join(allowed)}.")
    return name


def _check_choice(label: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"Invalid {label}={value!r}; use one of: {', '.join(map(repr, allowed))}.")
    return value


def _check_limit(limit: int | None) -> int | None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}.")
    return limit


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the shared data folder: ``data_dir``, else ``$TRPROMPT_SHARED_DATA``, else ``<repo>/../shared/data``.

    The folder is not required to exist; loaders check the files they need.

    Example:
        >>> resolve_data_dir("data/mydata")
        PosixPath('data/mydata')
    """
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(SHARED_DATA_ENV)
    if env:
        return Path(env).expanduser()
    return _DEFAULT_SHARED_DIR


def _explicit_location(data_dir: Any) -> bool:
    return data_dir is not None or bool(os.environ.get(SHARED_DATA_ENV))


def _missing_file_error(what: str, path: Path, *, bundled_ok: bool) -> FileNotFoundError:
    fixes = [
        f"set the environment variable {SHARED_DATA_ENV} to the folder that holds the data files",
        "pass data_dir=<that folder>",
    ]
    if bundled_ok:
        fixes.append("use source='bundled' for the small GSM8K subset shipped with trprompt_dspy")
    fixes.append("use source='hub' (needs internet)")
    return FileNotFoundError(
        f"{what}: expected the file {path}, which does not exist. To fix: {'; or '.join(fixes)}."
    )


def _read_jsonl(path: Path, indices: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Read a JSONL file with the Hugging Face ``datasets`` JSON loader, optionally selecting rows."""
    hf = require("datasets", extra="core")
    ds = hf.load_dataset("json", data_files=str(path), split="train")
    if indices is not None:
        bad = [i for i in indices if not 0 <= i < len(ds)]
        if bad:
            raise IndexError(f"{path} has {len(ds)} records; indices out of range: {bad[:5]}")
        ds = ds.select(indices)
    return ds.to_list()


def _convert(
    name: str, rows: list[dict[str, Any]], indices: Sequence[int] | None, limit: int | None
) -> list[dspy.Example]:
    positions = list(indices) if indices is not None else list(range(len(rows)))
    examples = [_CONVERTERS[name](row, idx) for row, idx in zip(rows, positions, strict=True)]
    return examples if limit is None else examples[:limit]


# ---------------------------------------------------------------------------------------------------
# Public loaders
# ---------------------------------------------------------------------------------------------------


def _load_bundled(which: str, limit: int | None) -> list[dspy.Example]:
    path = BUNDLED_DATA_DIR / _BUNDLED_FILES[which]
    if not path.is_file():
        raise FileNotFoundError(
            f"The bundled GSM8K subset file {path} is missing; reinstall trprompt-dspy or regenerate it with "
            "`python scripts/make_bundled_subset.py`."
        )
    rows = _read_jsonl(path)
    if limit is None or limit > len(rows):
        logger.info(
            "Using the bundled GSM8K %s subset (%s): %d examples.", which, _BUNDLED_NOTE[which], len(rows)
        )
    return _convert("gsm8k", rows, None, limit)


def _load_hub(name: str, split: str, limit: int | None) -> list[dspy.Example]:
    repo, config, hub_split = _HUB_IDS[(name, split)]
    hf = require("datasets", extra="core")
    try:
        ds = (
            hf.load_dataset(repo, config, split=hub_split)
            if config
            else hf.load_dataset(repo, split=hub_split)
        )
    except Exception as exc:  # offline, gated, renamed...: all mean "use the local copy"
        raise RuntimeError(
            f"Could not load {repo!r} (config={config!r}, split={hub_split!r}) from the Hugging Face hub: "
            f"{type(exc).__name__}: {exc}. Without internet use source='local' (set {SHARED_DATA_ENV} or pass "
            "data_dir=...)" + (" or source='bundled'." if name == "gsm8k" else ".")
        ) from exc
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return _convert(name, ds.to_list(), None, None)


def load_dataset(
    name: DatasetName,
    split: Literal["train", "test"] = "train",
    *,
    source: Source = "auto",
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
) -> list[dspy.Example]:
    """Load a full upstream split as ``dspy.Example`` objects (inputs: ``question``; gold: ``answer``).

    Available splits: GSM8K train/test; GSM-Hard test (its single 1,319-record split); MATH test
    (5,000 records; MATH train only from the hub); MATH-500 test. For the fixed dev/test/train-pool
    index lists use :func:`load_fixed_split`.

    Args:
        name: ``"gsm8k"``, ``"gsmhard"``, ``"math"`` or ``"math500"``.
        split: ``"train"`` or ``"test"``.
        source: ``"auto"``, ``"local"``, ``"hub"`` or ``"bundled"`` (see the module docstring).
        data_dir: Shared data folder (overrides ``$TRPROMPT_SHARED_DATA``).
        limit: Keep only the first ``limit`` examples.

    Returns:
        The examples, in file order.

    Raises:
        ValueError: Unknown name, split or source, or a split this dataset does not have.
        FileNotFoundError: The local file is missing; the message names the path and the fixes.
        RuntimeError: ``source="hub"`` and the hub could not be reached.

    Example:
        >>> test = load_dataset("gsm8k", "test", source="bundled", limit=3)
        >>> [ex.answer for ex in test]
        ['18', '70000', '540']
    """
    _check_name(name, DATASET_NAMES)
    _check_choice("split", split, ("train", "test"))
    _check_choice("source", source, _SOURCES)
    _check_limit(limit)
    if source == "hub":
        if (name, split) not in _HUB_IDS:
            raise ValueError(f"{name} has no {split!r} split on the hub; use split='test'.")
        return _load_hub(name, split, limit)
    if source == "bundled":
        if name != "gsm8k":
            raise ValueError(
                f"Only GSM8K is bundled with trprompt_dspy (MATH may not be redistributed); for {name!r} use "
                f"source='local' with {SHARED_DATA_ENV}/data_dir, or source='hub'."
            )
        return _load_bundled(split, limit)
    if (name, split) not in _LOCAL_FILES:
        hint = f"load_fixed_split({name!r}, 'train') for its train pool"
        if name == "math":
            hint += ", or source='hub' for the official MATH train split"
        raise ValueError(f"The local {name} data has no {split!r} split; use split='test', {hint}.")
    path = resolve_data_dir(data_dir) / _LOCAL_FILES[(name, split)]
    if not path.is_file():
        if source == "auto" and name == "gsm8k" and not _explicit_location(data_dir):
            logger.warning("%s not found; falling back to the bundled GSM8K %s subset.", path, split)
            return _load_bundled(split, limit)
        raise _missing_file_error(f"{name} {split} data not found", path, bundled_ok=name == "gsm8k")
    return _convert(name, _read_jsonl(path), None, limit)


def _read_splits(base: Path) -> dict[str, Any]:
    path = base / "splits.json"
    if not path.is_file():
        raise _missing_file_error("The fixed split index file was not found", path, bundled_ok=True)
    with path.open(encoding="utf-8") as fh:
        return json.load(fh)


def load_fixed_split(
    name: Literal["gsm8k", "gsmhard", "math"],
    which: Literal["train", "dev", "test"] = "dev",
    *,
    source: Literal["auto", "local", "bundled"] = "auto",
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
) -> list[dspy.Example]:
    """Load a fixed split defined by ``splits.json`` in the shared data folder.

    * GSM8K: dev = 100 train records, test = 500 test records, train = the train pool (train minus dev).
    * GSM-Hard: dev = 100, test = 500, train = the other 719 records.
    * MATH: dev = 100 non-MATH-500 test records, test = MATH-500, train = the remaining 4,400 records.

    With ``source="bundled"`` (or ``"auto"`` when no shared folder exists) GSM8K comes from the subset
    shipped in the package: all 100 dev records, the first 100 test records, 200 train-pool records.

    Args:
        name: ``"gsm8k"``, ``"gsmhard"`` or ``"math"``.
        which: ``"dev"``, ``"test"`` or ``"train"`` (the train pool).
        source: ``"auto"``, ``"local"`` or ``"bundled"``.
        data_dir: Shared data folder (overrides ``$TRPROMPT_SHARED_DATA``).
        limit: Keep only the first ``limit`` examples (indices are in ascending order).

    Returns:
        The examples, ordered by their index in the source file.

    Example:
        >>> dev = load_fixed_split("gsm8k", "dev", source="bundled")
        >>> len(dev), dev[0].idx
        (100, 9)
    """
    _check_name(name, ("gsm8k", "gsmhard", "math"))
    _check_choice("which", which, ("train", "dev", "test"))
    if source == "hub":
        raise ValueError(
            "load_fixed_split indexes the local files, whose record order the hub copies need not share; use "
            "source='local' (or 'bundled' for GSM8K), or load_dataset(..., source='hub') and split_dataset()."
        )
    _check_choice("source", source, ("auto", "local", "bundled"))
    _check_limit(limit)
    if source == "bundled" and name != "gsm8k":
        raise ValueError(
            f"Only GSM8K is bundled; for {name!r} use source='local' with {SHARED_DATA_ENV} or data_dir."
        )
    base = resolve_data_dir(data_dir)
    if name == "gsm8k" and (
        source == "bundled" or (source == "auto" and not _explicit_location(data_dir) and not base.is_dir())
    ):
        if source == "auto":
            logger.warning("No shared data folder at %s; using the bundled GSM8K subset.", base)
        return _load_bundled(which, limit)
    splits = _read_splits(base)
    entry = splits[name]
    if name == "math" and which == "test":
        path = base / _LOCAL_FILES[("math500", "test")]
        if not path.is_file():
            raise _missing_file_error("MATH-500 data not found", path, bundled_ok=False)
        return _convert("math500", _read_jsonl(path), None, limit)
    key = "train_pool" if which == "train" else which
    if "indices" in entry[key]:
        rel_file, indices = entry[key]["file"], list(entry[key]["indices"])
    else:  # train pools defined by a rule: everything in the file that is not excluded
        rel_file = entry[key]["file"]
        excluded = set(entry["dev"]["indices"])
        if name == "math":
            excluded |= set(entry["math500_positions_in_math_test"]["indices"])
        total = entry["train_pool"]["n"] + len(excluded)
        indices = [i for i in range(total) if i not in excluded]
    path = base / rel_file
    if not path.is_file():
        raise _missing_file_error(f"{name} data not found", path, bundled_ok=name == "gsm8k")
    if limit is not None:
        indices = indices[:limit]
    return _convert(name, _read_jsonl(path, indices), indices, None)


def split_dataset(
    examples: Sequence[Any],
    *,
    fractions: Sequence[float] | None = None,
    sizes: Sequence[int] | None = None,
    seed: int = 0,
) -> tuple[list[Any], ...]:
    """Shuffle ``examples`` with ``random.Random(seed)`` and cut them into consecutive parts.

    Give exactly one of ``fractions`` (each in [0, 1], summing to at most 1; when they sum to 1 the last
    part takes the rounding remainder) or ``sizes`` (non-negative counts summing to at most ``len(examples)``).
    The same seed always gives the same parts.

    Args:
        examples: The examples to split (not modified).
        fractions: Part sizes as fractions of ``len(examples)``.
        sizes: Part sizes as counts.
        seed: Shuffle seed.

    Returns:
        One list per fraction/size, in the order given.

    Example:
        >>> split_dataset(list(range(10)), sizes=(3, 2), seed=0)
        ([7, 8, 1], [5, 3])
    """
    if (fractions is None) == (sizes is None):
        raise ValueError(
            f"Pass exactly one of fractions=... or sizes=... (got fractions={fractions!r}, sizes={sizes!r})."
        )
    n = len(examples)
    if fractions is not None:
        fracs = [float(f) for f in fractions]
        if not fracs or any(not 0.0 <= f <= 1.0 for f in fracs) or sum(fracs) > 1.0 + 1e-9:
            raise ValueError(
                f"fractions must be values in [0, 1] summing to at most 1, got {list(fractions)!r}."
            )
        counts = [math.floor(f * n + 1e-9) for f in fracs]
        if abs(sum(fracs) - 1.0) <= 1e-9:
            counts[-1] = n - sum(counts[:-1])
    else:
        counts = list(sizes)  # type: ignore[arg-type]
        if not counts or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
            raise ValueError(f"sizes must be non-negative ints, got {list(sizes)!r}.")  # type: ignore[arg-type]
        if sum(counts) > n:
            raise ValueError(f"sizes {counts} add up to {sum(counts)}, more than the {n} examples given.")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    parts, start = [], 0
    for count in counts:
        parts.append([examples[i] for i in order[start : start + count]])
        start += count
    return tuple(parts)
