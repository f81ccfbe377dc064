"""The accuracy study: which TRPrompt configuration improves a program, measured on a dev split.

Every configuration ("cell") is evaluated on the **same** fixed dev questions (``splits.json``; never
the test split) and compared with zero-shot CoT on those questions with paired statistics: accuracy with
a Wilson 95 % interval, the discordant pairs (questions the configuration fixed / broke) and the exact
McNemar p-value. All roles run on **one** vLLM server in single-base mode
(:class:`~trprompt_dspy.backends.stack.ModelStack`); a cell that asks for another prompt model builds it
in-process next to that server.

Cells (``--cells``, in the order given; each is appended to ``<out>.cells.jsonl`` when it finishes, and a
re-run skips finished cells, so a killed study resumes; a killed compile resumes from its ``log_dir``):

* ``zeroshot`` — the plain program (the reference for every other cell); other plain programs in :data:`PLAIN`
  (the same program re-run on another machine, the two-predictor ``PlanAndSolve``).
* ``writer-*`` — an untrained writer writes each instruction from t*_0 (:data:`WRITERS`): the bare prompt
  model (``writer-untrained``, what iteration 0 of a single-base compile starts from, also at other
  instruction budgets and on ``PlanAndSolve``), the target ``dspy.LM`` through ``LMInstructionWriter``
  (``writer-seedlm``) or a separate small prompt model (``writer-smollm2``, ``writer-qwen0.5b``).
* ``trprompt-*`` — a compile on a train-pool sample (valset held out of it, disjoint from the rollout
  queries) with the optimizer settings in :data:`CELLS`, then the compiled program on the dev questions.
  A cell with ``share`` first copies the finished steps it has in common with another cell's compile
  (:func:`share_steps`), so it pays only for the steps it changes.

    python -m benchmarks.ablation_study --target qwen2.5-coder-1.5b-instruct --dataset gsmhard --n 100 \\
        --cells zeroshot writer-untrained trprompt-light --out ablation-gsmhard-qwen1.5b-<date>

Writes ``benchmarks/results/<out>.cells.jsonl`` (per-question outcomes), ``<out>.json`` and ``<out>.md``
(``<out>.notes.json``, a list of strings, if present, is rendered as notes: how a cell was run).
Run it alone on the machine: wall times are part of the result.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from trprompt_dspy.apps.stats import mcnemar_exact, wilson  # noqa: E402
from trprompt_dspy.config import AUTO_BUDGETS  # noqa: E402

logger = logging.getLogger("benchmarks.ablation_study")
RESULTS = REPO / "benchmarks" / "results"

#: Checkpoint files a cell may copy from another cell's ``log_dir`` before its compile starts, because they are
#: exactly what its own compile would compute first (same program, data, valset, models, seed, t*_0 and
#: iteration-0 writer): the student's validation score and iteration 0's rollouts with their textual rewards;
#: ``SHARE_TRAINED`` adds iteration 0's SFT data and adapter (same SFT settings too). The copied folder has no
#: ``run.json``, so the compile writes its own fingerprint and resumes from the copied steps.
SHARE_BASELINE = ("baseline.json",)
SHARE_ROLLOUTS = (*SHARE_BASELINE, "iter_000/rollouts.json")
SHARE_TRAINED = (*SHARE_ROLLOUTS, "iter_000/sft.jsonl", "iter_000/train.json", "iter_000/adapter")
#: All of iteration 0 (its t* step and validation too): a longer run of the same recipe resumes at iteration 1.
SHARE_ITERATION = (*SHARE_TRAINED, "iter_000/refine.json", "iter_000/val.json")

#: Compile cells: optimizer keyword arguments (``seed_lm=True``: the target LM writes iteration 0).
#: ``program`` picks another program; ``predictors`` restricts the query-aware predictors.
CELLS: dict[str, dict[str, Any]] = {
    "trprompt-light": {"opt": {"auto": "light"}},
    # The light budget stopped after its first iteration; it shares trprompt-light's log_dir (num_iterations is
    # not part of the run fingerprint), so trprompt-light later resumes from it and adds iteration 1.
    "trprompt-light-k1": {"opt": {**AUTO_BUDGETS["light"], "num_iterations": 1}, "log_dir": "trprompt-light"},
    "trprompt-light-seedlm": {"opt": {"auto": "light"}, "seed_lm": True},
    "trprompt-light-smollm2": {"opt": {"auto": "light", "prompt_model": "smollm2-135m-instruct"}},
    "trprompt-light-filtered": {"opt": {"auto": "light", "sft": {"min_score": 1.0}}},
    "trprompt-light-no-textgrad": {"opt": {"num_iterations": 2, "textgrad_steps": 0}},
    "trprompt-light-budget32": {"opt": {"auto": "light", "max_instruction_tokens": 32}},
    "trprompt-light-budget96": {"opt": {"auto": "light", "max_instruction_tokens": 96}},
    "trprompt-medium": {"opt": {"auto": "medium"}},
    # One iteration each, sharing the light run's finished steps (see SHARE_*): only what they change is re-run.
    # t* fixed at t*_0: the k1 adapter itself, without the accepted TextGrad step.
    "trprompt-light-k1-no-textgrad": {"opt": {**AUTO_BUDGETS["light"], "num_iterations": 1, "textgrad_steps": 0},
                                      "share": ("trprompt-light", SHARE_TRAINED)},
    # Rewards that start with the metric's verdict; the trained prompt model is conditioned on the correct one.
    "trprompt-light-k1-verdict": {"opt": {**AUTO_BUDGETS["light"], "num_iterations": 1, "reward_verdict": True},
                                  "share": ("trprompt-light", SHARE_ROLLOUTS)},
    # SFT only on the instructions whose rollout was correct (rejection sampling).
    "trprompt-light-k1-filtered": {"opt": {**AUTO_BUDGETS["light"], "num_iterations": 1, "sft": {"min_score": 1.0}},
                                   "share": ("trprompt-light", SHARE_ROLLOUTS)},
    # As many correct as incorrect outcomes in the SFT data (the paper's diagnosis of small gains).
    "trprompt-light-k1-balanced": {"opt": {**AUTO_BUDGETS["light"], "num_iterations": 1, "sft": {"balance": True}},
                                   "share": ("trprompt-light", SHARE_ROLLOUTS)},
    # The filtered recipe's adapter with t* kept at t*_0 (the TextGrad step of the best recipe, isolated).
    "trprompt-light-k1-filtered-no-textgrad": {
        "opt": {**AUTO_BUDGETS["light"], "num_iterations": 1, "textgrad_steps": 0, "sft": {"min_score": 1.0}},
        "share": ("trprompt-light-k1-filtered", SHARE_TRAINED)},
    # The filtered recipe's second iteration (the full light budget), resumed from its finished iteration 0.
    # ``eval: "last"``: the dev questions are answered by the last iteration, whichever the valset preferred.
    "trprompt-light-filtered-k2": {"opt": {"auto": "light", "sft": {"min_score": 1.0}},
                                   "share": ("trprompt-light-k1-filtered", SHARE_ITERATION), "eval": "last"},
    # Run on the Intel Xeon (AMX) machine: one change each against the filtered recipe (trprompt-light-k1-filtered,
    # EPYC). They share the student's validation score computed on this machine by the first of them.
    "trprompt-light-k1-filtered-budget32": {
        "opt": {**AUTO_BUDGETS["light"], "num_iterations": 1, "sft": {"min_score": 1.0}, "max_instruction_tokens": 32}},
    # The budget32 adapter with a larger TextGrad step: 2 steps on 8-query minibatches instead of 1 on 4.
    "trprompt-light-k1-filtered-budget32-tg2x8": {
        "opt": {**AUTO_BUDGETS["light"], "num_iterations": 1, "sft": {"min_score": 1.0}, "max_instruction_tokens": 32,
                "textgrad_steps": 2, "textgrad_batch_size": 8},
        "share": ("trprompt-light-k1-filtered-budget32", SHARE_TRAINED)},
    # The same 2 x 8 TextGrad step after the outcome report was made to fit the engine's context (a step whose
    # prompt the server rejects as too long is retried with a report half as long): the batch/steps row itself.
    "trprompt-light-k1-filtered-budget32-tg2x8-fit": {
        "opt": {**AUTO_BUDGETS["light"], "num_iterations": 1, "sft": {"min_score": 1.0}, "max_instruction_tokens": 32,
                "textgrad_steps": 2, "textgrad_batch_size": 8},
        "share": ("trprompt-light-k1-filtered-budget32", SHARE_TRAINED)},
    # The budget32 compile again with its TextGrad step (accepted on a 0.25 tie) decided on the valset instead:
    # the same adapter and the same refined t*, both t* scored on the 50 validation examples.
    "trprompt-light-k1-filtered-budget32-tgval": {
        "opt": {**AUTO_BUDGETS["light"], "num_iterations": 1, "sft": {"min_score": 1.0}, "max_instruction_tokens": 32,
                "textgrad_acceptance": "validation"},
        "share": ("trprompt-light-k1-filtered-budget32", (*SHARE_TRAINED, "iter_000/refine.json"))},
    # Four times the queries of one light iteration (48 x 2 rollouts): the queries-per-iteration point of the curve.
    "trprompt-light-k1-filtered-q48": {
        "opt": {**AUTO_BUDGETS["light"], "num_iterations": 1, "queries_per_iteration": 48, "sft": {"min_score": 1.0}},
        "share": ("trprompt-light-k1-filtered-budget32", SHARE_BASELINE)},
    # A separate prompt model (SmolLM2-135M + LoRA, in-process) trained on the same recipe.
    "trprompt-light-k1-filtered-smollm2": {
        "opt": {**AUTO_BUDGETS["light"], "num_iterations": 1, "sft": {"min_score": 1.0},
                "prompt_model": "smollm2-135m-instruct"},
        "share": ("trprompt-light-k1-filtered-budget32", SHARE_BASELINE)},
    # The same with Qwen2.5-Coder-0.5B + LoRA as the separate prompt model (the study's last prompt-model row).
    "trprompt-light-k1-filtered-qwen0.5b": {
        "opt": {**AUTO_BUDGETS["light"], "num_iterations": 1, "sft": {"min_score": 1.0},
                "prompt_model": "qwen2.5-coder-0.5b-instruct"},
        "share": ("trprompt-light-k1-filtered-budget32", SHARE_BASELINE)},
    # The two-predictor PlanAndSolve program compiled with the filtered recipe (instructions for both predictors).
    "trprompt-light-k1-filtered-plansolve": {
        "opt": {**AUTO_BUDGETS["light"], "num_iterations": 1, "sft": {"min_score": 1.0}},
        "program": "programs.math:PlanAndSolve"},
}

#: Plain programs (no instructions): the reference ``zeroshot`` (MathCoT, against which every cell is compared),
#: the same program again on another machine (``zeroshot-repeat``: whether greedy outcomes carry across CPUs,
#: i.e. whether cells run on different machines may be paired), and the two-predictor ``PlanAndSolve``.
PLAIN: dict[str, dict[str, Any]] = {
    "zeroshot": {},
    "zeroshot-repeat": {},
    "zeroshot-plansolve": {"program": "programs.math:PlanAndSolve"},
}

#: Untrained writers (no compile): ``writer`` is ``"prompt_model"`` (the bare base model through its chat
#: template, as iteration 0 of every compile), ``"seed_lm"`` (the target ``dspy.LM`` through
#: ``LMInstructionWriter``, what ``seed_lm=`` uses) or another ``prompt_model=`` spec (a separate prompt
#: model, e.g. a preset run in-process); ``max_new_tokens`` is the instruction budget; ``program`` another
#: program and ``predictors`` the query-aware predictors (default: all).
WRITERS: dict[str, dict[str, Any]] = {
    "writer-untrained": {"writer": "prompt_model"},
    "writer-seedlm": {"writer": "seed_lm"},
    "writer-untrained-budget32": {"writer": "prompt_model", "max_new_tokens": 32},
    "writer-untrained-budget96": {"writer": "prompt_model", "max_new_tokens": 96},
    "writer-smollm2": {"writer": "smollm2-135m-instruct"},
    "writer-qwen0.5b": {"writer": "qwen2.5-coder-0.5b-instruct"},
    # PlanAndSolve: an instruction for each of its two predictors, or for the answering one (``solve``) only.
    "writer-untrained-plansolve": {"writer": "prompt_model", "program": "programs.math:PlanAndSolve"},
    "writer-untrained-plansolve-solve": {"writer": "prompt_model", "program": "programs.math:PlanAndSolve",
                                         "predictors": ["solve.predict"]},
}


#: Pairs of cells that differ in one step, compared with each other (first vs second) in the report.
PAIRS: tuple[tuple[str, str, str], ...] = (
    ("trprompt-light-k1-no-textgrad", "writer-untrained", "fine-tuning (t* fixed at t*_0)"),
    ("trprompt-light-k1", "trprompt-light-k1-no-textgrad", "the accepted TextGrad step"),
    ("trprompt-light-k1-verdict", "trprompt-light-k1", "verdict-grounded rewards"),
    ("trprompt-light-k1-balanced", "trprompt-light-k1", "balanced SFT data"),
    ("trprompt-light-k1-filtered", "trprompt-light-k1", "SFT on correct outcomes only"),
    ("trprompt-light", "trprompt-light-k1", "a second iteration"),
    ("writer-seedlm", "writer-untrained", "iteration-0 writer: seed_lm (LMInstructionWriter) vs the bare prompt model"),
    ("trprompt-light-k1-filtered", "trprompt-light-k1-filtered-no-textgrad", "the accepted TextGrad step (filtered SFT)"),
    ("trprompt-light-k1-filtered-no-textgrad", "trprompt-light-k1-no-textgrad", "SFT on correct outcomes only (t* at t*_0)"),
    ("trprompt-light-filtered-k2", "trprompt-light-k1-filtered", "a second iteration (filtered SFT)"),
    ("writer-untrained-budget32", "writer-untrained", "instruction budget 32 vs 48 tokens (untrained)"),
    ("writer-untrained-budget96", "writer-untrained", "instruction budget 96 vs 48 tokens (untrained)"),
    ("writer-smollm2", "writer-untrained", "prompt model: SmolLM2-135M vs the target's own weights (untrained)"),
    ("trprompt-light-k1-filtered-budget32", "writer-untrained-budget32", "fine-tuning, filtered SFT (32-token budget)"),
    ("trprompt-light-k1-filtered-budget32", "trprompt-light-k1-filtered", "instruction budget 32 vs 48 (filtered SFT)"),
    ("trprompt-light-k1-filtered-budget32-tg2x8", "trprompt-light-k1-filtered-budget32",
     "TextGrad 2 x 8 queries (both steps failed: 2048-token context, t* = t*_0) vs 1 x 4 (accepted on a tie)"),
    ("trprompt-light-k1-filtered-budget32-tg2x8-fit", "trprompt-light-k1-filtered-budget32",
     "TextGrad 2 x 8 queries (report cut to fit the context) vs 1 x 4"),
    ("trprompt-light-k1-filtered-budget32-tg2x8-fit", "trprompt-light-k1-filtered-budget32-tg2x8",
     "TextGrad 2 x 8 queries vs t* = t*_0 (same adapter)"),
    ("trprompt-light-k1-filtered-budget32-tgval", "trprompt-light-k1-filtered-budget32",
     "TextGrad accepted on validation vs on its minibatch (same adapter, same candidate t*)"),
    ("trprompt-light-k1-filtered-q48", "trprompt-light-k1-filtered", "48 vs 12 queries per iteration (filtered SFT)"),
    ("trprompt-light-k1-filtered-smollm2", "writer-smollm2", "fine-tuning SmolLM2 (filtered SFT)"),
    ("trprompt-light-k1-filtered-smollm2", "trprompt-light-k1-filtered",
     "trained prompt model: SmolLM2-135M vs the target's own weights (filtered SFT)"),
    ("writer-qwen0.5b", "writer-untrained", "prompt model: Qwen-0.5B vs the target's own weights (untrained)"),
    ("trprompt-light-k1-filtered-qwen0.5b", "writer-qwen0.5b", "fine-tuning Qwen-0.5B (filtered SFT)"),
    ("trprompt-light-k1-filtered-qwen0.5b", "trprompt-light-k1-filtered-smollm2",
     "trained prompt model: Qwen-0.5B vs SmolLM2-135M (filtered SFT)"),
    ("zeroshot-repeat", "zeroshot", "the same plain program on another CPU (reproducibility of greedy outcomes)"),
    ("zeroshot-plansolve", "zeroshot-repeat", "PlanAndSolve vs MathCoT (plain programs, same CPU)"),
    ("writer-untrained-plansolve", "zeroshot-plansolve", "PlanAndSolve: instructions for both predictors (untrained)"),
    ("writer-untrained-plansolve-solve", "zeroshot-plansolve",
     "PlanAndSolve: an instruction for the solve predictor only (untrained)"),
    ("writer-untrained-plansolve-solve", "writer-untrained-plansolve", "PlanAndSolve: one predictor vs both"),
    ("trprompt-light-k1-filtered-plansolve", "zeroshot-plansolve", "PlanAndSolve compiled (filtered SFT, both predictors)"),
    ("trprompt-light-k1-filtered-plansolve", "writer-untrained-plansolve", "fine-tuning on PlanAndSolve (filtered SFT)"),
)


def compare(rows: list[dict[str, Any]], ref: list[dict[str, Any]]) -> dict[str, Any]:
    """Paired comparison of one cell's per-question outcomes with the reference cell's.

    Example:
        >>> a = [{"idx": i, "correct": c} for i, c in enumerate([1, 1, 0, 1])]
        >>> b = [{"idx": i, "correct": c} for i, c in enumerate([0, 1, 0, 0])]
        >>> r = compare(a, b)
        >>> r["fixed"], r["broken"], r["delta_points"]
        (2, 0, 50.0)
    """
    by_idx = {r["idx"]: r["correct"] for r in ref}
    if sorted(by_idx) != sorted(r["idx"] for r in rows):
        raise ValueError("A cell and the reference must cover the same questions (same --dataset and --n).")
    fixed = sum(1 for r in rows if r["correct"] and not by_idx[r["idx"]])
    broken = sum(1 for r in rows if not r["correct"] and by_idx[r["idx"]])
    n = len(rows)
    k = sum(r["correct"] for r in rows)
    lo, hi = wilson(k, n)
    return {"n": n, "correct": k, "accuracy": round(100 * k / n, 1), "ci95": [round(100 * lo, 1), round(100 * hi, 1)],
            "fixed": fixed, "broken": broken, "delta_points": round(100 * (fixed - broken) / n, 1),
            "mcnemar_p": round(mcnemar_exact(fixed, broken)["p_value"], 4)}


def share_steps(source: Path, dest: Path, files: tuple[str, ...]) -> dict[str, Any]:
    """Copy finished checkpoint ``files`` of ``source`` (a compile's ``log_dir``) into a new ``dest``.

    Done only when ``dest`` does not exist yet (a resumed cell keeps what it has). The adapter path recorded in
    a copied ``train.json`` is pointed at the copy.

    Example:
        >>> import tempfile
        >>> src, dst = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp()) / "cell"
        >>> _ = (src / "baseline.json").write_text('{"score": 0.5}')
        >>> share_steps(src, dst, ("baseline.json",))["files"], (dst / "baseline.json").exists()
        (['baseline.json'], True)
    """
    import shutil

    record = {"from": source.name, "files": list(files)}
    if dest.exists():
        return {**record, "copied": False}
    missing = [f for f in files if not (source / f).exists()]
    if missing:
        raise FileNotFoundError(f"Cannot share {missing} from {source}: run that cell's compile first.")
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        if (source / f).is_dir():
            shutil.copytree(source / f, dest / f)
        else:
            shutil.copy2(source / f, dest / f)
    train = dest / "iter_000" / "train.json"
    if train.exists():
        info = json.loads(train.read_text())
        info["adapter_path"] = str(dest / "iter_000" / "adapter")
        train.write_text(json.dumps(info, indent=2))
    return {**record, "copied": True}


_NEGATED = ("incorrect", "not correct", "wrong", "not accurate", "inaccurate", "does not match", "doesn't match")


def reward_agreement(rollouts: list[dict[str, Any]]) -> dict[str, int]:
    """How often the reward LM's first sentence contradicts the metric (a keyword heuristic, for the record).

    A critique "claims correct" when its first sentence says "correct" and none of :data:`_NEGATED`. Counted
    over rollouts with a reward: wrong outcomes (score 0) whose critique claims correct, and right ones
    (score 1) whose critique does not.

    Example:
        >>> reward_agreement([{"score": 0.0, "reward": "The output is correct. Good."},
        ...                   {"score": 0.0, "reward": "The output is incorrect."},
        ...                   {"score": 1.0, "reward": "Correct, and clear."}])
        {'wrong': 2, 'wrong_called_correct': 1, 'right': 1, 'right_not_called_correct': 0}
    """
    import re

    def claims_correct(text: str) -> bool:
        first = re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0].lower()
        return "correct" in first and not any(n in first for n in _NEGATED)

    rewarded = [r for r in rollouts if r.get("reward")]
    wrong = [r for r in rewarded if float(r["score"]) <= 0.0]
    right = [r for r in rewarded if float(r["score"]) >= 1.0]
    return {"wrong": len(wrong), "wrong_called_correct": sum(claims_correct(r["reward"]) for r in wrong),
            "right": len(right), "right_not_called_correct": sum(not claims_correct(r["reward"]) for r in right)}


def _read_cells(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    cells = {}
    for line in path.read_text().splitlines():
        if line.strip():
            c = json.loads(line)
            cells[c["cell"]] = c
    return cells


def _evaluate(program: Any, data: list[Any], metric: Any, lm: Any, threads: int) -> dict[str, Any]:
    """Greedy evaluation with the library's own evaluator (``loop.rollouts.evaluate_program``).

    Not ``dspy.Evaluate``: its straggler logic re-submits the last <= 3 unfinished examples after 120 s, and an
    example that fails deterministically (greedy decoding: the same unparseable 768-token reply every time)
    and takes longer than that is re-submitted forever (seen on 2026-12-01: 118 submissions for 100
    questions, 20 minutes, never returning).
    """
    from trprompt_dspy.loop.rollouts import evaluate_program

    seen = len(lm.history)
    t0 = time.perf_counter()
    result = evaluate_program(program, data, metric=metric, num_threads=threads, display_progress=True)
    wall = time.perf_counter() - t0
    usage = [entry.get("usage") or {} for entry in lm.history[seen:]]
    completion = sum(int(u.get("completion_tokens") or 0) for u in usage)
    rows = []
    for r in result.rollouts:
        ex = data[r.example_index]
        row = {"idx": ex.get("idx"), "correct": int(bool(float(r.score))), "answer": (r.outputs.get("answer") or "")[:120]}
        if r.instructions:
            row["instruction"] = " | ".join(str(c.get("instruction") or "") for c in r.instructions)[:400]
        if r.error:
            row["error_kind"] = r.error_kind
        rows.append(row)
    rows.sort(key=lambda r: r["idx"])
    return {"rows": rows, "eval_wall_s": round(wall, 1), "target_calls": len(usage), "evaluator": "evaluate_program",
            "target_prompt_tokens": sum(int(u.get("prompt_tokens") or 0) for u in usage),
            "target_completion_tokens": completion, "target_tok_per_s": round(completion / wall, 1) if wall else None}


def run_cell(name: str, *, stack: Any, program_spec: str, dev: list[Any], train: list[Any], dataset: str,
             seed: int, runs: Path) -> dict[str, Any]:
    """Run one cell and return its record (outcomes, timings, compile statistics)."""
    import dspy

    from trprompt_dspy.apps.programs import load_program
    from trprompt_dspy.backends.prompt_model.base import DEFAULT_MAX_INSTRUCTION_TOKENS
    from trprompt_dspy.backends.prompt_model.lm_writer import LMInstructionWriter
    from trprompt_dspy.backends.stack import resolve_prompt_model
    from trprompt_dspy.compiled.program import install_query_aware
    from trprompt_dspy.optimizer import DEFAULT_INITIAL_REWARD, TRPromptOptimizer
    from trprompt_dspy.tasks.metrics import get_metric

    metric = get_metric(dataset)
    lm, threads = stack.target_lm, stack.num_threads
    rec: dict[str, Any] = {"cell": name}
    with dspy.context(lm=lm):
        if name in PLAIN:
            spec = PLAIN[name]
            rec["program"] = spec.get("program", program_spec)
            rec.update(_evaluate(load_program(rec["program"]), dev, metric, lm, threads))
        elif name in WRITERS:
            spec = WRITERS[name]
            stack.prompt_model.load_adapter(None)
            if spec["writer"] == "prompt_model":
                writer = stack.prompt_model
            elif spec["writer"] == "seed_lm":
                writer = LMInstructionWriter(lm, num_threads=threads)
            else:
                writer = resolve_prompt_model(spec["writer"], lm, max_concurrency=threads)
            budget = spec.get("max_new_tokens", DEFAULT_MAX_INSTRUCTION_TOKENS)
            rec["program"] = spec.get("program", program_spec)
            program = install_query_aware(load_program(rec["program"]), prompt_model=writer,
                                          optimal_reward=DEFAULT_INITIAL_REWARD, predictors=spec.get("predictors"),
                                          generation={"temperature": 0.0, "max_new_tokens": budget})
            rec["writer"] = {"kind": spec["writer"], "max_new_tokens": budget, "predictors": spec.get("predictors")}
            try:
                rec.update(_evaluate(program, dev, metric, lm, threads))
            finally:
                if writer is not stack.prompt_model and hasattr(writer, "close"):
                    writer.close()  # a separate prompt model's weights are freed before the next cell
        elif name in CELLS:
            spec = CELLS[name]
            kwargs = dict(spec["opt"])
            kwargs.setdefault("prompt_model", stack.prompt_model)
            # The study evaluates the trained program itself; what the no-regression guard would have returned
            # (the student unless the best iteration beat it on the valset) is derived below from the same scores.
            kwargs.setdefault("min_improvement", None)
            opt = TRPromptOptimizer(metric=get_metric(dataset, feedback=True), num_threads=threads, seed=seed,
                                    seed_lm=lm if spec.get("seed_lm") else None, log_dir=runs / spec.get("log_dir", name),
                                    display_progress=False, **kwargs)
            if spec.get("share"):
                rec["shared"] = share_steps(runs / spec["share"][0], runs / spec.get("log_dir", name), spec["share"][1])
            rec["program"] = spec.get("program", program_spec)
            t0 = time.perf_counter()
            compiled = opt.compile(load_program(rec["program"]), trainset=train)
            rec["compile_wall_s"] = round(time.perf_counter() - t0, 1)
            stats = compiled.detailed_results.to_dict()
            rec["compile"] = {k: stats.get(k) for k in (
                "selected", "baseline_score", "best_score", "best_iteration", "lm_calls", "lm_tokens", "seconds",
                "instructions", "t_star_history", "budget", "failures", "selection_p_value", "lm_tokens_by_role")}
            rec["compile"]["iterations"] = [{k: it.get(k) for k in (
                "iteration", "rollout_score", "val_score", "t_star_accepted", "num_rollouts", "num_sft_examples",
                "sft_steps", "seconds")} for it in stats["iterations"]]
            rec["val_size"] = stats.get("val_size")
            log_dir = runs / spec.get("log_dir", name)
            rec["reward_agreement"] = {d.name: reward_agreement(json.loads((d / "rollouts.json").read_text()))
                                       for d in sorted(log_dir.glob("iter_*")) if (d / "rollouts.json").exists()}
            best, student = stats.get("best_score"), stats.get("baseline_score")
            rec["guarded_selected"] = (stats.get("best_iteration") if best is not None and student is not None
                                       and best > student else "student")
            if spec.get("eval") == "last" and stats["iterations"]:
                compiled = _iteration_program(stack, spec.get("program", program_spec), log_dir,
                                              stats["iterations"][-1], kwargs.get("max_instruction_tokens"))
                rec["evaluated_iteration"] = stats["iterations"][-1]["iteration"]
            else:
                rec["evaluated_iteration"] = stats.get("best_iteration")
            rec.update(_evaluate(compiled, dev, metric, lm, threads))
        else:
            raise ValueError(f"Unknown cell {name!r}; choose from {', '.join(PLAIN)}, {', '.join(WRITERS)}, {', '.join(CELLS)}.")
    return rec


def _iteration_program(stack: Any, program_spec: str, log_dir: Path, it: dict[str, Any],
                       max_instruction_tokens: int | None) -> Any:
    """The program of one finished iteration: its adapter, conditioned on its t* (no verdict prefix)."""
    from trprompt_dspy.apps.programs import load_program
    from trprompt_dspy.backends.prompt_model.base import DEFAULT_MAX_INSTRUCTION_TOKENS
    from trprompt_dspy.backends.prompt_model.pinned import PinnedPromptModel
    from trprompt_dspy.compiled.program import install_query_aware

    adapter = log_dir / f"iter_{it['iteration']:03d}" / "adapter"
    path = str(adapter) if adapter.is_dir() else None
    stack.prompt_model.load_adapter(path)
    return install_query_aware(load_program(program_spec), prompt_model=PinnedPromptModel(stack.prompt_model, path),
                               optimal_reward=it["t_star"],
                               generation={"temperature": 0.0,
                                           "max_new_tokens": max_instruction_tokens or DEFAULT_MAX_INSTRUCTION_TOKENS})


_PLAN = re.compile(r"(^|\n)\s*(\d+[.)]|step \d+)", re.IGNORECASE)
_FINAL = ".!?)\"'"


def instruction_styles(rows: list[dict[str, Any]], ref: list[dict[str, Any]]) -> dict[str, int] | None:
    """How many of a cell's instructions are numbered plans, and what they did against the reference cell.

    Fine-tuning on iteration-0 rollouts moves the writer towards their most frequent style; this records
    whether that style fixes or breaks answers. ``None`` for a cell without instructions.

    Example:
        >>> rows = [{"idx": 0, "correct": 0, "instruction": "1. Add.\\n2. Check."}, {"idx": 1, "correct": 1,
        ...          "instruction": "Add the numbers."}]
        >>> rows.append({"idx": 2, "correct": 0, "instruction": "First add the"})
        >>> instruction_styles(rows, [{"idx": 0, "correct": 1}, {"idx": 1, "correct": 0}, {"idx": 2, "correct": 1}])
        {'numbered_plans': 1, 'plans_fixed': 0, 'plans_broken': 1, 'other_fixed': 1, 'other_broken': 1, 'cut': 1, \
'cut_fixed': 0, 'cut_broken': 1}

    ``cut`` counts instructions that end without final punctuation: almost always ones stopped by the
    instruction budget (``max_new_tokens``) mid-sentence.
    """
    if not any(r.get("instruction") for r in rows):
        return None
    by_idx = {r["idx"]: r["correct"] for r in ref}
    out = dict.fromkeys(("numbered_plans", "plans_fixed", "plans_broken", "other_fixed", "other_broken", "cut",
                         "cut_fixed", "cut_broken"), 0)
    for r in rows:
        text = (r.get("instruction") or "").strip()
        kind = "plans" if _PLAN.search(text) else "other"
        fixed, broken = bool(r["correct"] and not by_idx[r["idx"]]), bool(not r["correct"] and by_idx[r["idx"]])
        out["numbered_plans"] += kind == "plans"
        out[f"{kind}_fixed"] += fixed
        out[f"{kind}_broken"] += broken
        if text and text[-1] not in _FINAL:
            out["cut"] += 1
            out["cut_fixed"] += fixed
            out["cut_broken"] += broken
    return out


#: Runs of the reference program (zero-shot MathCoT): the first one on a cell's CPU model is that cell's reference.
REFERENCES = ("zeroshot", "zeroshot-repeat")


def reference_for(name: str, cells: dict[str, dict[str, Any]]) -> str | None:
    """The zero-shot cell a cell is compared with: the first of :data:`REFERENCES` run on the same CPU model.

    Greedy decoding is not bit-identical across CPUs (another vector unit, other kernels): the reference re-run
    on an Intel Xeon changed 24 of the EPYC run's 100 answers and 5 outcomes. A cell is therefore paired with
    the zero-shot run from its own kind of machine; the reference runs themselves with ``zeroshot``.

    Example:
        >>> cells = {"zeroshot": {"cpu": {"model": "A"}}, "zeroshot-repeat": {"cpu": {"model": "B"}},
        ...          "x": {"cpu": {"model": "B"}}, "y": {"cpu": {"model": "A"}}}
        >>> [reference_for(n, cells) for n in ("x", "y", "zeroshot-repeat")]
        ['zeroshot-repeat', 'zeroshot', 'zeroshot']
    """
    if "zeroshot" not in cells:
        return None
    if name in REFERENCES:
        return "zeroshot"
    model = (cells[name].get("cpu") or {}).get("model")
    return next((r for r in REFERENCES if r in cells and (cells[r].get("cpu") or {}).get("model") == model),
                "zeroshot")


def _selected_label(selected: Any) -> str:
    """What the guarded compile returned, as a table cell: ``student``, ``iteration 0`` ..., or ``-`` (no compile).

    Example:
        >>> [_selected_label(v) for v in ("student", 0, None)]
        ['student', 'iteration 0', '-']
    """
    if selected is None:
        return "-"
    return selected if isinstance(selected, str) else f"iteration {selected}"


def summarize(cells: dict[str, dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    table = []
    for name, c in cells.items():
        ref_name = reference_for(name, cells)
        ref = cells[ref_name] if ref_name else None
        row = {"cell": name, "reference": ref_name, "cpu_model": (c.get("cpu") or {}).get("model"),
               **(compare(c["rows"], ref["rows"]) if ref else {}),
               "eval_wall_s": c.get("eval_wall_s"), "compile_wall_s": c.get("compile_wall_s"),
               "target_tok_per_s": c.get("target_tok_per_s"),
               "target_completion_tokens_per_q": round(c["target_completion_tokens"] / len(c["rows"]), 1),
               "target_calls_per_q": round(c["target_calls"] / len(c["rows"]), 2),
               "evaluator": c.get("evaluator", "dspy.Evaluate"), "command": c.get("command"),
               "errors": sum(1 for r in c["rows"] if r.get("error_kind")),
               "shared": c.get("shared"),
               "instruction_styles": instruction_styles(c["rows"], ref["rows"]) if ref else None}
        if "compile" in c:
            comp = c["compile"]
            row.update(selected=c.get("guarded_selected"), val_baseline=comp.get("baseline_score"),
                       val_best=comp.get("best_score"), val_size=c.get("val_size"), lm_calls=comp.get("lm_calls"),
                       val_sign_p=comp.get("selection_p_value"))
        table.append(row)
    pairs = [{"cell": a, "against": b, "step": step, **compare(cells[a]["rows"], cells[b]["rows"])}
             for a, b, step in PAIRS if a in cells and b in cells]
    cpus = {}
    for c in cells.values():
        if c.get("cpu"):
            cpus.setdefault(c["cpu"]["model"], {**c["cpu"], "server_dtype": c.get("server_dtype")})
    return {**meta, "cpus": list(cpus.values()), "table": table, "pairs": pairs}


def render(summary: dict[str, Any]) -> str:
    cpus = "; ".join(f"{cpu['model']} ({cpu['cores']} cores; native bf16: {cpu['native_bf16']}; flags "
                     f"{', '.join(cpu['flags']) or 'none'}; server dtype {cpu.get('server_dtype')})"
                     for cpu in summary.get("cpus") or [summary["cpu"]])
    lines = [f"# TRPrompt ablation on {summary['dataset']} dev ({summary['target']}, single-base, one vLLM server)", "",
             f"{summary['n']} fixed dev questions (`splits.json`; the test split is not used); each cell against "
             f"zero-shot CoT on the same questions. CPUs: {cpus}; seed {summary['seed']}; "
             f"train pool sample {summary['train_size']}.", "",
             "*vs* names the zero-shot run each cell is compared with: the one on the same CPU model "
             "(greedy outcomes differ across CPUs; see the `zeroshot-repeat` pair).", "",
             "Each compile cell is evaluated with its best iteration (`min_improvement=None`); *guard* is what the "
             "lead-only no-regression rule returns (the student unless the best iteration beat it on the valset; the "
             "default until 2026-12-02, when `significance_level=0.05` became the default); "
             "*val p* is the one-sided sign-test p of the best iteration against the student on the valset "
             "(`selection_p_value`; recorded by compiles from 2026-12-02 on). With the current default an iteration "
             "is returned only when *val p* < 0.05.",
             "",
             "| cell | CPU | vs | acc % | 95 % CI | fixed | broken | Δ points | McNemar p | guard | val student → best (n) "
             "| val p | compile s | eval s | target tok/s | target calls/q | completion tok/q |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in summary["table"]:
        val = (f"{r['val_baseline']:.3f} → {r['val_best']:.3f} ({r['val_size']})"
               if r.get("val_baseline") is not None and r.get("val_best") is not None else "-")
        lines.append(f"| {r['cell']} | {r.get('cpu_model')} | {r.get('reference')} | {r.get('accuracy')} | {r.get('ci95')} | {r.get('fixed')} | {r.get('broken')} | "
                     f"{r.get('delta_points')} | {r.get('mcnemar_p')} | {_selected_label(r.get('selected'))} | {val} | "
                     f"{'-' if r.get('val_sign_p') is None else round(r['val_sign_p'], 3)} | "
                     f"{r.get('compile_wall_s') or '-'} | {r.get('eval_wall_s')} | {r.get('target_tok_per_s')} | "
                     f"{r.get('target_calls_per_q')} | {r.get('target_completion_tokens_per_q')} |")
    styled = [r for r in summary["table"] if r.get("instruction_styles")]
    if styled:
        lines += ["", "Instruction styles on the dev questions (a numbered plan: a line starting `1.` or `Step 1`; cut "
                  "mid-sentence: no final punctuation, i.e. stopped by the instruction budget), with "
                  "the questions each style fixed / broke against zero-shot:", "",
                  "| cell | numbered plans | plans fixed / broken | other fixed / broken | cut mid-sentence | "
                  "cut fixed / broken |", "| --- | --- | --- | --- | --- | --- |"]
        for r in styled:
            st = r["instruction_styles"]
            lines.append(f"| {r['cell']} | {st['numbered_plans']} | {st['plans_fixed']} / {st['plans_broken']} | "
                         f"{st['other_fixed']} / {st['other_broken']} | {st.get('cut', '-')} | "
                         f"{st.get('cut_fixed', '-')} / {st.get('cut_broken', '-')} |")
    if summary.get("pairs"):
        lines += ["", "Cells that differ in one step, paired with each other on the same dev questions:", "",
                  "| step | cell | against | fixed | broken | Δ points | McNemar p |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for q in summary["pairs"]:
            lines.append(f"| {q['step']} | {q['cell']} | {q['against']} | {q['fixed']} | {q['broken']} | "
                         f"{q['delta_points']} | {q['mcnemar_p']} |")
    notes = summary.get("notes") or []
    commands = sorted({r["command"] for r in summary["table"] if r.get("command")} or {summary["command"]})
    lines += ["", "Cells: " + "; ".join(f"`{k}` = {v}" for k, v in {**PLAIN, **WRITERS, **CELLS}.items()), "",
              *(["Notes:", "", *(f"- {n}" for n in notes), ""] if notes else []),
              "Reproduce (each finished cell is kept; a re-run skips it):", "",
              *(f"    {c}" for c in commands), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--dataset", default="gsmhard", choices=["gsmhard", "gsm8k"])
    parser.add_argument("--program", default="programs.math:MathCoT")
    parser.add_argument("--n", type=int, default=100, help="first n fixed dev questions")
    parser.add_argument("--train-size", type=int, default=300, help="Random(0) sample of the train pool")
    parser.add_argument("--cells", nargs="+", default=["zeroshot", "writer-untrained", "trprompt-light"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=768)
    parser.add_argument("--runs", default="runs/ablation", help="log_dir root of the compiles (resumable)")
    parser.add_argument("--out", required=True, help="result name, e.g. ablation-gsmhard-qwen1.5b-<date>")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "LiteLLM", "litellm", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import random

    from trprompt_dspy.backends.stack import ModelStack
    from trprompt_dspy.models.dtype import cpu_info
    from trprompt_dspy.tasks.datasets import load_fixed_split

    dev = load_fixed_split(args.dataset, "dev", limit=args.n)
    pool = load_fixed_split(args.dataset, "train")
    train = [ex.with_inputs("question") for ex in random.Random(0).sample(pool, min(args.train_size, len(pool)))]
    cells_path = RESULTS / f"{args.out}.cells.jsonl"
    done = _read_cells(cells_path)
    todo = [c for c in args.cells if c not in done]
    logger.info("Cells done: %s; to run: %s", sorted(done), todo)
    runs = Path(args.runs)
    stack = ModelStack(args.target, max_tokens=args.max_tokens, log_dir=runs / "servers")
    meta = {"dataset": args.dataset, "split": "dev", "n": len(dev), "target": args.target, "seed": args.seed,
            "train_size": len(train), "cpu": cpu_info(), "program": args.program,
            "command": "python -m benchmarks.ablation_study " + " ".join(argv if argv is not None else sys.argv[1:])}
    if todo:
        with stack:
            meta["server"] = stack.servers.get("target", next(iter(stack.servers.values()), {}))
            for name in todo:
                logger.info("==> cell %s", name)
                t0 = time.perf_counter()
                rec = run_cell(name, stack=stack, program_spec=args.program, dev=dev, train=train,
                               dataset=args.dataset, seed=args.seed, runs=runs)
                rec.update(cell_wall_s=round(time.perf_counter() - t0, 1), cpu=meta["cpu"], command=meta["command"],
                           server_dtype=meta["server"].get("dtype"),
                           finished_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"))
                RESULTS.mkdir(parents=True, exist_ok=True)
                with cells_path.open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                done[name] = rec
                logger.info("cell %s: %.1f %% in %.0f s", name, 100 * sum(r["correct"] for r in rec["rows"])
                            / len(rec["rows"]), rec["cell_wall_s"])
    else:
        meta["server"] = {"dtype": next(iter(done.values())).get("server_dtype")}
    notes_path = RESULTS / f"{args.out}.notes.json"
    meta["notes"] = json.loads(notes_path.read_text()) if notes_path.exists() else []
    summary = summarize(done, meta)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (RESULTS / f"{args.out}.md").write_text(render(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
