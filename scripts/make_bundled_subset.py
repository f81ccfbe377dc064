"""Regenerate the small GSM8K subset bundled in ``trprompt_dspy/tasks/data/``.

The subset lets tests and demos run without the shared data folder. It holds:

* ``gsm8k_train_subset.jsonl``: 200 records of GSM8K ``train.jsonl``, drawn with
  ``random.Random(seed).sample(train_pool, 200)`` where ``train_pool`` is every train index that is not in
  the fixed dev split of ``splits.json``; written in ascending index order.
* ``gsm8k_dev.jsonl``: the first 100 fixed GSM8K dev indices (that is, all of them).
* ``gsm8k_test_subset.jsonl``: the first 100 fixed GSM8K test indices (of 500).

Each line is ``{"idx": <0-based line in the upstream file>, "question": ..., "answer": ...}`` with the
upstream fields unchanged. GSM8K is MIT-licensed (Cobbe et al., 2021, github.com/openai/grade-school-math).

Usage:
    python scripts/make_bundled_subset.py                      # uses $TRPROMPT_SHARED_DATA or ../shared/data
    python scripts/make_bundled_subset.py --data-dir /path/to/shared/data --check
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trprompt_dspy.tasks.datasets import BUNDLED_DATA_DIR, resolve_data_dir  # noqa: E402

N_TRAIN, N_DEV, N_TEST = 200, 100, 100


def _rows(path: Path, indices: list[int]) -> list[dict]:
    import datasets

    ds = datasets.load_dataset("json", data_files=str(path), split="train").select(indices)
    return [
        {"idx": idx, "question": row["question"], "answer": row["answer"]}
        for idx, row in zip(indices, ds, strict=True)
    ]


def build(data_dir: Path, seed: int) -> dict[str, list[dict]]:
    """Return {file name: records} for the bundled subset."""
    splits = json.loads((data_dir / "splits.json").read_text(encoding="utf-8"))["gsm8k"]
    dev, test = splits["dev"]["indices"], splits["test"]["indices"]
    n_train_file = splits["train_pool"]["n"] + len(dev)
    pool = sorted(set(range(n_train_file)) - set(dev))
    train_idx = sorted(random.Random(seed).sample(pool, N_TRAIN))
    return {
        "gsm8k_train_subset.jsonl": _rows(data_dir / "gsm8k/train.jsonl", train_idx),
        "gsm8k_dev.jsonl": _rows(data_dir / "gsm8k/train.jsonl", dev[:N_DEV]),
        "gsm8k_test_subset.jsonl": _rows(data_dir / "gsm8k/test.jsonl", test[:N_TEST]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-dir",
        default=None,
        help="shared data folder (default: $TRPROMPT_SHARED_DATA or ../shared/data)",
    )
    parser.add_argument("--out-dir", default=str(BUNDLED_DATA_DIR), help="where to write the JSONL files")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for the 200-record train sample (default 0)"
    )
    parser.add_argument(
        "--check", action="store_true", help="only verify that the files in --out-dir are up to date"
    )
    args = parser.parse_args(argv)

    data_dir = resolve_data_dir(args.data_dir)
    if not (data_dir / "splits.json").is_file():
        parser.error(f"{data_dir / 'splits.json'} not found; pass --data-dir or set TRPROMPT_SHARED_DATA.")
    out_dir = Path(args.out_dir)
    stale = []
    for name, records in build(data_dir, args.seed).items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        path = out_dir / name
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path} ({len(records)} records)")
    if stale:
        print("out of date: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
