"""The scale study's evaluation and curve logic (benchmarks/scale_study.py), with fakes: no model, no server.

The learning curve of issue 24 rests on two things checked here: an adapter cell sends only the questions that
got an instruction to the target (the others are the zero-shot rows, because the compiled program runs the
student's prompt unchanged there), and the curve's rows and slope pair every cell with zero-shot correctly.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import dspy
import pytest
from dspy.utils import DummyLM

from benchmarks import scale_study
from trprompt_dspy.backends.prompt_model.base import NO_INSTRUCTION
from trprompt_dspy.backends.prompt_model.fake import FakePromptModel


def _dev(n: int) -> list[dspy.Example]:
    return [dspy.Example(idx=i, question=f"What is {i} + {i}?", answer=str(2 * i)).with_inputs("question")
            for i in range(n)]


class _Stack:
    def __init__(self, lm: Any, pm: Any) -> None:
        self.target_lm, self.prompt_model, self.num_threads = lm, pm, 2


def _lm(n: int) -> DummyLM:
    """Answers "What is i + i?" right (DummyLM's dict mode matches the question in the last message)."""
    return DummyLM({f"What is {i} + {i}?": {"reasoning": "add", "answer": str(2 * i)} for i in range(n)})


def _prompts(lm: DummyLM) -> list[str]:
    return ["\n".join(m["content"] for m in h["messages"]) for h in lm.history]


@pytest.fixture()
def study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Any, Any]:
    runs = tmp_path / "runs"
    adapter = runs / "adapters-trace-correct-top4" / "n8"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"fake_prompt_model": True}))
    (adapter / "scale_info.json").write_text(json.dumps({"queries": 8, "examples": 5, "steps": 2,
                                                         "recipe": "trace-correct", "top_layers": 4,
                                                         "seconds": 1.0, "losses": [1.0, 0.5]}))
    import trprompt_dspy.tasks.datasets as datasets

    monkeypatch.setattr(datasets, "load_fixed_split", lambda name, split, limit=None: _dev(limit))
    # Even questions: the prompt model abstains; odd ones: an instruction.
    pm = FakePromptModel(lambda req: NO_INSTRUCTION if int(req.query.split("What is ")[1].split(" ")[0]) % 2 == 0
                         else "Add the two numbers.")
    return runs, _lm(8), pm


def test_adapter_cell_runs_only_instructed_questions_and_reuses_zeroshot_rows(study: tuple[Path, Any, Any]) -> None:
    runs, lm, pm = study
    args = argparse.Namespace(runs=str(runs), n=6, cells=["zeroshot", "adapters-trace-correct-top4/n8"])
    scale_study.stage_eval(args, _Stack(lm, pm))
    cells = {c["cell"]: c for c in scale_study.read_jsonl(runs / "cells.jsonl")}
    prompts = _prompts(lm)
    assert len(prompts) == 6 + 3  # zero-shot: all 6; the adapter: only the 3 odd questions
    assert sorted(p.rsplit("What is ", 1)[1][:1] for p in prompts[6:]) == ["1", "3", "5"]
    assert all("Add the two numbers." in p for p in prompts[6:])
    assert not any("Add the two numbers." in p for p in prompts[:6])
    cell = cells["adapters-trace-correct-top4/n8"]
    assert cell["abstained"] == 3 and cell["target_questions_run"] == 3
    reused = [r for r in cell["rows"] if r.get("reused_zeroshot")]
    assert [r["idx"] for r in reused] == [0, 2, 4]
    zs = {r["idx"]: r for r in cells["zeroshot"]["rows"]}
    assert all(r["correct"] == zs[r["idx"]]["correct"] for r in reused)
    assert [r["idx"] for r in cell["rows"]] == list(range(6))
    assert all(r["correct"] == 1 for r in cell["rows"])


def test_adapter_cell_needs_zeroshot_first(study: tuple[Path, Any, Any]) -> None:
    runs, lm, pm = study
    args = argparse.Namespace(runs=str(runs), n=4, cells=["adapters-trace-correct-top4/n8"])
    with pytest.raises(SystemExit, match="zeroshot cell first"):
        scale_study.stage_eval(args, _Stack(lm, pm))
    assert lm.history == []


def _rows(bits: list[int]) -> list[dict[str, int]]:
    return [{"idx": i, "correct": b} for i, b in enumerate(bits)]


def _cell(bits: list[int], queries: int, abstained: int = 0) -> dict[str, Any]:
    return {"rows": _rows(bits), "abstained": abstained, "cell_wall_s": 10.0, "target_prompt_tokens": 1,
            "target_completion_tokens": 2,
            "train": {"queries": queries, "examples": queries // 2, "steps": 3, "recipe": "trace-correct",
                      "top_layers": 4, "seconds": 5.0, "losses": [2.0, 1.0]}}


def test_curve_rows_pair_each_cell_with_zeroshot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scale_study, "POOL_CHUNK_ALONE", {0: False, 128: True})
    cells = {"zeroshot": {"rows": _rows([1, 1, 0, 0])},
             "big": _cell([1, 0, 1, 1], 256, abstained=1), "small": _cell([1, 1, 0, 0], 128, abstained=4)}
    timing = [{"queries": [0, 127], "rollouts": 256, "wall_s": 100.0, "prompt_tokens": 1, "completion_tokens": 2},
              {"queries": [128, 255], "rollouts": 256, "wall_s": 50.0, "prompt_tokens": 3, "completion_tokens": 4}]
    small, big = scale_study.curve_rows(cells, timing)
    assert (small["train_queries"], small["fixed"], small["broken"], small["abstention_rate"]) == (128, 0, 0, 1.0)
    assert (big["accuracy"], big["zeroshot_accuracy"], big["fixed"], big["broken"]) == (75.0, 50.0, 2, 1)
    assert small["wall_s"]["rollouts_measured"] == 100.0 and big["wall_s"]["rollouts_measured"] == 150.0
    # Projected at the alone chunk's rate (256 rollouts in 50 s): 2 rollouts per query.
    assert small["wall_s"]["rollouts"] == 50.0 and big["wall_s"]["rollouts"] == 100.0
    assert big["tokens"]["target_rollouts"] == {"prompt_tokens": 4, "completion_tokens": 6}


def test_slope_per_doubling_is_zero_for_a_flat_curve_and_signed_otherwise() -> None:
    zs = [1, 0] * 10
    flat = {"zeroshot": {"rows": _rows(zs)}, **{f"n{q}": _cell(zs, q) for q in (128, 256, 512)}}
    got = scale_study.slope_per_doubling(flat, ["n128", "n256", "n512"], reps=200)
    assert got["points"] == 0.0 and got["ci95"] == [0.0, 0.0]
    worse = {"zeroshot": {"rows": _rows(zs)}, "n128": _cell(zs, 128),
             "n256": _cell([0, 0] + zs[2:], 256), "n512": _cell([0, 0, 0, 0] + zs[4:], 512)}
    got = scale_study.slope_per_doubling(worse, ["n128", "n256", "n512"], reps=200)
    assert got["points"] == -5.0  # one more question lost (5 points of 20) per doubling
    assert got["ci95"][0] <= -5.0 <= got["ci95"][1] and got["ci95"][1] <= 0.0
