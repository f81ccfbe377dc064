"""Tests for trprompt_dspy.tasks.datasets: bundled subset, shared-data layout, fixed splits, splitting, errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import datasets as hf_datasets
import dspy
import pytest

import trprompt_dspy.tasks.datasets as tds
from trprompt_dspy.tasks.datasets import (
    BUNDLED_DATA_DIR,
    SHARED_DATA_ENV,
    load_dataset,
    load_fixed_split,
    resolve_data_dir,
    split_dataset,
)
from trprompt_dspy.tasks.metrics import extract_number, gsm8k_metric, math_metric

REPO = Path(__file__).resolve().parents[1]
SHARED = resolve_data_dir()
needs_shared = pytest.mark.skipif(
    not (SHARED / "splits.json").is_file(),
    reason=f"shared data folder not found at {SHARED} (set {SHARED_DATA_ENV} to run these tests)",
)


@pytest.fixture
def no_shared_data(monkeypatch, tmp_path):
    """Pretend no shared data folder exists (no env var, default location missing)."""
    monkeypatch.delenv(SHARED_DATA_ENV, raising=False)
    monkeypatch.setattr(tds, "_DEFAULT_SHARED_DIR", tmp_path / "missing")


# --------------------------------------------------------------------------- bundled subset


def test_bundled_gsm8k_sizes_and_fields():
    train = load_dataset("gsm8k", "train", source="bundled")
    test = load_dataset("gsm8k", "test", source="bundled")
    dev = load_fixed_split("gsm8k", "dev", source="bundled")
    assert (len(train), len(test), len(dev)) == (200, 100, 100)
    for example in train[:20] + test[:20] + dev[:20]:
        assert isinstance(example, dspy.Example)
        assert set(example.inputs().keys()) == {"question"}
        assert "," not in example.answer and "####" not in example.answer
        assert float(example.answer).is_integer()
        assert example.gold_reasoning and "####" not in example.gold_reasoning
        assert gsm8k_metric(example, dspy.Prediction(answer=example.answer))
    assert test[0].idx == 0 and test[0].answer == "18"  # Janet's ducks


def test_bundled_train_excludes_fixed_dev_and_is_sorted():
    train = load_dataset("gsm8k", "train", source="bundled")
    dev = load_fixed_split("gsm8k", "dev", source="bundled")
    train_idx = [e.idx for e in train]
    assert train_idx == sorted(train_idx) and len(set(train_idx)) == 200
    assert not set(train_idx) & {e.idx for e in dev}


def test_bundled_fixed_splits_and_limit():
    assert [e.idx for e in load_fixed_split("gsm8k", "test", source="bundled", limit=3)] == [0, 2, 3]
    assert len(load_fixed_split("gsm8k", "train", source="bundled", limit=7)) == 7
    assert len(load_dataset("gsm8k", "train", source="bundled", limit=0)) == 0


def test_auto_falls_back_to_bundled_without_shared_data(no_shared_data):
    assert len(load_dataset("gsm8k", "test")) == 100
    assert len(load_fixed_split("gsm8k", "dev")) == 100


def test_bundled_only_for_gsm8k():
    with pytest.raises(ValueError, match="Only GSM8K is bundled"):
        load_dataset("math", "test", source="bundled")
    with pytest.raises(ValueError, match="Only GSM8K is bundled"):
        load_fixed_split("gsmhard", "dev", source="bundled")


def test_bundled_readme_has_attribution():
    text = (BUNDLED_DATA_DIR / "README.md").read_text(encoding="utf-8")
    assert "openai/grade-school-math" in text and "MIT" in text and "Cobbe" in text
    assert not list(BUNDLED_DATA_DIR.glob("*math*"))  # MATH must never be bundled


# --------------------------------------------------------------------------- errors


def test_missing_file_error_names_path_and_fixes(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("gsm8k", "train", source="local", data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "gsm8k" / "train.jsonl") in message
    assert SHARED_DATA_ENV in message and "data_dir" in message and "source='bundled'" in message


def test_explicit_env_dir_is_not_silently_replaced(monkeypatch, tmp_path):
    monkeypatch.setenv(SHARED_DATA_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="splits.json"):
        load_fixed_split("math", "dev")
    with pytest.raises(FileNotFoundError, match=r"gsm8k.test\.jsonl"):
        load_dataset("gsm8k", "test")  # auto does not fall back when a location was given explicitly


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"name": "squad"}, "Unknown dataset name 'squad'"),
        ({"name": "gsm8k", "split": "validation"}, "Invalid split='validation'"),
        ({"name": "gsm8k", "source": "web"}, "Invalid source='web'"),
        ({"name": "gsm8k", "limit": -1}, "limit must be a non-negative int"),
        ({"name": "gsmhard", "split": "train"}, r"load_fixed_split\('gsmhard', 'train'\)"),
        ({"name": "math500", "split": "train", "source": "hub"}, "no 'train' split on the hub"),
    ],
)
def test_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_dataset(**kwargs)


def test_fixed_split_bad_arguments():
    with pytest.raises(ValueError, match="Invalid which='val'"):
        load_fixed_split("gsm8k", "val")
    with pytest.raises(ValueError, match="Unknown dataset name 'math500'"):
        load_fixed_split("math500", "test")
    with pytest.raises(ValueError, match="source='local'"):
        load_fixed_split("gsm8k", "dev", source="hub")


# --------------------------------------------------------------------------- local files via env var / data_dir


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_local_layout_from_env_var(monkeypatch, tmp_path):
    _write_jsonl(
        tmp_path / "gsm8k" / "test.jsonl",
        [
            {"question": "Q0", "answer": "It drops 12 degrees.\n#### -12"},
            {"question": "Q1", "answer": "1000 + 600 = 1600\n#### 1,600"},
        ],
    )
    _write_jsonl(
        tmp_path / "math" / "test.jsonl",
        [
            {
                "problem": "P",
                "level": "Level 2",
                "type": "Algebra",
                "solution": r"So $\boxed{\frac{1}{2}}$.",
                "idx": 0,
            }
        ],
    )
    monkeypatch.setenv(SHARED_DATA_ENV, str(tmp_path))
    gsm = load_dataset("gsm8k", "test", source="local")
    assert [(e.question, e.answer, e.idx) for e in gsm] == [("Q0", "-12", 0), ("Q1", "1600", 1)]
    assert gsm[0].gold_reasoning == "It drops 12 degrees."
    (m,) = load_dataset("math", "test")
    assert (m.answer, m.level, m.type) == (r"\frac{1}{2}", 2, "Algebra")
    assert math_metric(m, dspy.Prediction(answer="0.5"))


# --------------------------------------------------------------------------- hub code path (no network)


def test_hub_failure_gives_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(hf_datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match=r"'openai/gsm8k'.*no network.*source='local'"):
        load_dataset("gsm8k", "test", source="hub")


def test_hub_rows_are_converted(monkeypatch):
    calls = []

    def fake_hub(repo, config=None, *, split):
        calls.append((repo, config, split))
        rows = [{"input": "Big eggs?", "code": "def solution(): ...", "target": 14053029.666666666}] * 3
        return hf_datasets.Dataset.from_list(rows)

    monkeypatch.setattr(hf_datasets, "load_dataset", fake_hub)
    examples = load_dataset("gsmhard", "test", source="hub", limit=2)
    assert calls == [("reasoning-machines/gsm-hard", None, "train")]
    assert [e.answer for e in examples] == ["14053029.666666666"] * 2
    assert examples[0].inputs().toDict() == {"question": "Big eggs?"}


# --------------------------------------------------------------------------- split_dataset


def test_split_dataset_deterministic_and_disjoint():
    items = list(range(103))
    a1 = split_dataset(items, fractions=(0.6, 0.2, 0.2), seed=3)
    a2 = split_dataset(items, fractions=(0.6, 0.2, 0.2), seed=3)
    b = split_dataset(items, fractions=(0.6, 0.2, 0.2), seed=4)
    assert a1 == a2 and a1 != b
    assert [len(p) for p in a1] == [61, 20, 22]  # fractions summing to 1: the last part takes the remainder
    assert sorted(x for part in a1 for x in part) == items
    small, rest = split_dataset(items, sizes=(5, 10), seed=0)
    assert (len(small), len(rest)) == (5, 10) and not set(small) & set(rest)
    assert items == list(range(103))  # input untouched


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({}, "exactly one of fractions"),
        ({"fractions": (0.5,), "sizes": (1,)}, "exactly one of fractions"),
        ({"fractions": (0.7, 0.5)}, "summing to at most 1"),
        ({"fractions": (-0.1,)}, r"values in \[0, 1\]"),
        ({"sizes": (8, 5)}, "more than the 10 examples"),
        ({"sizes": (2.5,)}, "non-negative ints"),
    ],
)
def test_split_dataset_errors(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        split_dataset(list(range(10)), **kwargs)


# --------------------------------------------------------------------------- the shared data folder


@needs_shared
def test_shared_full_splits():
    assert len(load_dataset("gsm8k", "train", source="local")) == 7473
    gsm_test = load_dataset("gsm8k", "test", source="local")
    assert len(gsm_test) == 1319 and gsm_test[0].answer == "18"
    hard = load_dataset("gsmhard", "test", source="local")
    assert len(hard) == 1319 and all(extract_number(e.answer) is not None for e in hard)
    assert sum("." in e.answer for e in hard) == 303  # non-integer targets, per the data README
    math_test = load_dataset("math", "test", source="local", limit=50)
    assert all(e.answer and e.level in (1, 2, 3, 4, 5) and e.type for e in math_test)
    assert len(load_dataset("math500", "test", source="local")) == 500


@needs_shared
def test_shared_gsm8k_negative_answers_survive():
    everything = load_dataset("gsm8k", "train", source="local") + load_dataset(
        "gsm8k", "test", source="local"
    )
    negatives = [e for e in everything if e.answer.startswith("-")]
    assert len(negatives) == 5  # per the data README
    assert all(extract_number(e.answer) < 0 for e in negatives)


@needs_shared
def test_shared_fixed_splits_sizes_and_disjointness():
    splits = json.loads((SHARED / "splits.json").read_text(encoding="utf-8"))
    expected = {"gsm8k": (7373, 100, 500), "gsmhard": (719, 100, 500), "math": (4400, 100, 500)}
    for name, sizes in expected.items():
        train, dev, test = (load_fixed_split(name, w, source="local") for w in ("train", "dev", "test"))
        assert (len(train), len(dev), len(test)) == sizes
        assert [e.idx for e in dev] == splits[name]["dev"]["indices"]
        assert not {e.idx for e in train} & {e.idx for e in dev}
    hard_ids = [
        {e.idx for e in load_fixed_split("gsmhard", w, source="local")} for w in ("train", "dev", "test")
    ]
    assert len(set().union(*hard_ids)) == 1319
    math500_lines = set(splits["math"]["math500_positions_in_math_test"]["indices"])
    assert not {e.idx for e in load_fixed_split("math", "train", source="local")} & math500_lines
    m500 = load_fixed_split("math", "test", source="local", limit=1)[0]
    assert m500.answer == r"\left( 3, \frac{\pi}{2} \right)" and m500.unique_id == "test/precalculus/807.json"


@needs_shared
def test_bundled_subset_matches_shared_source():
    lines = (SHARED / "gsm8k" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    for name in ("gsm8k_train_subset.jsonl", "gsm8k_dev.jsonl"):
        for line in (BUNDLED_DATA_DIR / name).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            assert json.loads(lines[row["idx"]]) == {"question": row["question"], "answer": row["answer"]}
    local_test = load_fixed_split("gsm8k", "test", source="local", limit=100)
    bundled_test = load_fixed_split("gsm8k", "test", source="bundled")
    assert [e.toDict() for e in local_test] == [e.toDict() for e in bundled_test]


@needs_shared
def test_make_bundled_subset_script_is_reproducible():
    spec = importlib.util.spec_from_file_location(
        "make_bundled_subset", REPO / "scripts" / "make_bundled_subset.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert (
        script.main(["--data-dir", str(SHARED), "--check"]) == 0
    )  # the committed files are what it generates
