"""TRPrompt at the paper's data scale: one rollout pool, prompt models trained on nested subsets, a learning curve.

Issue 24. Stages, each resumable from files under ``--runs`` (re-run the same command after a kill):

* ``pool`` — for each of the first ``--pool`` queries of a fixed ``Random(0)`` order of the GSM-Hard train
  pool: the **student's own answer** (the plain program, greedy; the "no instruction" candidate) and one
  instruction sampled from the **untrained** single-base prompt model (t*_0, the optimizer's default sampling
  temperature) with the target's answer to it. Appended to ``pool.jsonl`` as each query finishes, in chunks
  of ``--chunk`` queries (student and instructed rollouts of a chunk together), with the chunk's wall time and
  target tokens in ``pool_timing.jsonl`` (rollouts/hour).
* ``rewards`` — the textual rewards of every candidate: the trace-built reward
  (:mod:`trprompt_dspy.loop.trace_reward`, no LM) for all of them, and the reward LM's critique (the
  current recipe) for the first ``--lm-rewards`` instructed rollouts; contradiction and restatement rates of
  both on the same rollouts.
* ``train`` — one LoRA SFT pass over the pool's SFT examples in a fixed order, saving the adapter after the
  first n queries for each n of ``--sizes`` (nested subsets; the same examples, the same order, one epoch).
* ``eval`` — zero-shot and each adapter on the first ``--n`` fixed GSM-Hard **dev** questions (never test).
* ``report`` — ``benchmarks/results/<out>.{json,md,png}``.

    python -m benchmarks.scale_study pool --pool 512
    python -m benchmarks.scale_study rewards --lm-rewards 64
    python -m benchmarks.scale_study train --sizes 64 128 256 512
    python -m benchmarks.scale_study eval --n 100
    python -m benchmarks.scale_study report --out scale-gsmhard-qwen1.5b-<date>

Run it alone on the machine: wall times and throughput are part of the result.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

logger = logging.getLogger("benchmarks.scale_study")
RESULTS = REPO / "benchmarks" / "results"
PROGRAM = "programs.math:MathCoT"
DATASET = "gsmhard"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_jsonl(path: Path, rec: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(rec) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def pool_queries(n: int) -> list[Any]:
    """The first ``n`` train-pool questions in a fixed Random(0) order (``idx`` is the dataset index)."""
    from trprompt_dspy.tasks.datasets import load_fixed_split

    pool = load_fixed_split(DATASET, "train")
    order = list(range(len(pool)))
    random.Random(0).shuffle(order)
    return [pool[i].with_inputs("question") for i in order[:n]]


def _usage_since(lm: Any, seen: int) -> dict[str, int]:
    usage = [entry.get("usage") or {} for entry in lm.history[seen:]]
    return {"calls": len(usage), "prompt_tokens": sum(int(u.get("prompt_tokens") or 0) for u in usage),
            "completion_tokens": sum(int(u.get("completion_tokens") or 0) for u in usage)}


def stage_pool(args: argparse.Namespace, stack: Any) -> None:
    import dspy

    from trprompt_dspy.apps.programs import load_program
    from trprompt_dspy.backends.prompt_model.base import DEFAULT_MAX_INSTRUCTION_TOKENS
    from trprompt_dspy.compiled.program import install_query_aware
    from trprompt_dspy.loop.metric_adapter import MetricAdapter
    from trprompt_dspy.loop.rollouts import run_rollouts
    from trprompt_dspy.models.dtype import cpu_info
    from trprompt_dspy.optimizer import DEFAULT_INITIAL_REWARD
    from trprompt_dspy.tasks.metrics import get_metric

    runs = Path(args.runs)
    pool_path, timing_path = runs / "pool.jsonl", runs / "pool_timing.jsonl"
    done = {(r["kind"], r["example_index"]) for r in read_jsonl(pool_path)}
    queries = pool_queries(args.pool)
    metric = MetricAdapter(get_metric(DATASET, feedback=True))
    lm = stack.target_lm
    pm = stack.prompt_model
    pm.load_adapter(None)
    student = load_program(PROGRAM)
    program = install_query_aware(load_program(PROGRAM), prompt_model=pm, optimal_reward=DEFAULT_INITIAL_REWARD,
                                  generation={"temperature": 0.0, "max_new_tokens": DEFAULT_MAX_INSTRUCTION_TOKENS})
    cpu = cpu_info()
    from concurrent.futures import ThreadPoolExecutor

    def run(kind: str, todo: list[int]) -> tuple[str, list[Any], float]:
        prog, writer, temp = (student, None, 0.0) if kind == "student" else (program, pm, args.temperature)
        t0 = time.perf_counter()
        with dspy.context(lm=lm):
            out = run_rollouts(prog, [queries[i] for i in todo], indices=todo, prompt_model=writer,
                               reward_text=DEFAULT_INITIAL_REWARD if writer else None, samples_per_query=1,
                               temperature=temp, seed=args.seed, metric=metric, num_threads=args.threads,
                               on_result=lambda r: save(kind, r))
        return kind, out, time.perf_counter() - t0

    def save(kind: str, r: Any) -> None:
        rec = r.to_dict()
        rec["kind"] = kind
        rec["idx"] = queries[r.example_index].get("idx")
        append_jsonl(pool_path, rec)

    # The student's and the instructed rollouts of a chunk run side by side (2 x --threads requests in flight), so
    # the server's batch stays full; a killed run resumes with the queries whose rollouts are missing.
    for start in range(0, len(queries), args.chunk):
        idx = list(range(start, min(start + args.chunk, len(queries))))
        jobs = {kind: [i for i in idx if (kind, i) not in done] for kind in ("student", "instructed")}
        jobs = {k: v for k, v in jobs.items() if v}
        if not jobs:
            continue
        seen, t0 = len(lm.history), time.perf_counter()
        with ThreadPoolExecutor(max_workers=2) as ex:
            results = list(ex.map(lambda kv: run(*kv), jobs.items()))
        wall = time.perf_counter() - t0
        n = sum(len(out) for _, out, _ in results)
        for kind, out, _ in results:
            done.update((kind, r.example_index) for r in out)
        append_jsonl(timing_path, {"queries": [idx[0], idx[-1]], "rollouts": n, "wall_s": round(wall, 1),
                                   **_usage_since(lm, seen), "cpu": cpu["model"], "concurrency": 2 * args.threads,
                                   "max_tokens": args.max_tokens,
                                   "accuracy": {k: round(sum(r.score for r in out) / len(out), 3)
                                                for k, out, _ in results}})
        logger.info("pool %d-%d: %d rollouts in %.0f s (%.0f rollouts/h); accuracy %s", idx[0], idx[-1], n, wall,
                    3600 * n / wall, {k: round(sum(r.score for r in out) / len(out), 3) for k, out, _ in results})


# ---------------------------------------------------------------------------------------------- rewards
def load_pool(runs: Path) -> dict[int, dict[str, Any]]:
    """``{example_index: {"student": Rollout, "instructed": Rollout}}`` for the queries with both candidates."""
    from trprompt_dspy.loop.rollouts import Rollout

    by: dict[int, dict[str, Any]] = {}
    for rec in read_jsonl(runs / "pool.jsonl"):
        kind = rec.pop("kind")
        rec.pop("idx", None)
        by.setdefault(rec["example_index"], {})[kind] = Rollout.from_dict(rec)
    return {i: c for i, c in sorted(by.items()) if len(c) == 2}


def stage_rewards(args: argparse.Namespace, stack: Any) -> None:
    """Trace-built rewards for every candidate; the reward LM's critique for the first ``--lm-rewards``."""
    from trprompt_dspy.loop.textual_reward import TextualRewardModel
    from trprompt_dspy.loop.trace_reward import trace_reward

    runs = Path(args.runs)
    pool = load_pool(runs)
    path = runs / "lm_rewards.jsonl"
    have = {r["example_index"] for r in read_jsonl(path)}
    todo = [i for i in list(pool)[: args.lm_rewards] if i not in have]
    # In chunks of 128 (each saved as it finishes), so a killed run loses at most one chunk.
    for start in range(0, len(todo), 128):
        rollouts = [pool[i]["instructed"] for i in todo[start:start + 128]]
        t0 = time.perf_counter()
        seen = len(stack.target_lm.history)
        TextualRewardModel(stack.target_lm).score_rollouts(rollouts, num_threads=stack.num_threads)
        wall = time.perf_counter() - t0
        for r in rollouts:
            append_jsonl(path, {"example_index": r.example_index, "reward": r.reward, "error": r.reward_error})
        usage = _usage_since(stack.target_lm, seen)
        append_jsonl(runs / "lm_rewards_timing.jsonl", {"critiques": len(rollouts), "wall_s": round(wall, 1), **usage,
                                                       "concurrency": stack.num_threads})
        logger.info("reward LM: %d critiques in %.0f s (%s)", len(rollouts), wall, usage)
    with (runs / "trace_rewards.jsonl").open("w") as fh:
        for i, c in pool.items():
            for kind in ("student", "instructed"):
                fh.write(json.dumps({"example_index": i, "kind": kind,
                                     "reward": trace_reward(c[kind], c["student"])}) + "\n")


def reward_rates(runs: Path) -> dict[str, Any]:
    """Contradiction and restatement rates before (the reward LM alone) and after (trace-built + filtered critique)."""
    from trprompt_dspy.loop.trace_reward import contradicts, is_restatement, merge_critique, trace_reward

    pool = load_pool(runs)
    lm = {r["example_index"]: r for r in read_jsonl(runs / "lm_rewards.jsonl") if r.get("reward")}
    before = {"n": 0, "contradictions": 0, "restatements": 0}
    after = {"n": 0, "contradictions": 0, "restatements": 0, "critiques_added": 0, "critiques_dropped": {}}
    for i, rec in lm.items():
        r, student = pool[i]["instructed"], pool[i]["student"]
        before["n"] += 1
        before["contradictions"] += contradicts(rec["reward"], r.score)
        before["restatements"] += is_restatement(rec["reward"], r)
        merged, why = merge_critique(trace_reward(r, student), rec["reward"], r)
        after["n"] += 1
        after["contradictions"] += contradicts(merged, r.score)
        after["restatements"] += is_restatement(merged, r)
        if why == "added":
            after["critiques_added"] += 1
        else:
            after["critiques_dropped"][why] = after["critiques_dropped"].get(why, 0) + 1
    for d in (before, after):
        d["contradiction_rate"] = round(d["contradictions"] / d["n"], 3) if d["n"] else None
        d["restatement_rate"] = round(d["restatements"] / d["n"], 3) if d["n"] else None
    return {"before": before, "after": after}


# ---------------------------------------------------------------------------------------------- SFT
def trace_t_star() -> str:
    """What the compile conditions a trained prompt model on (``TRPromptRun._conditioning``) with t* = t*_0."""
    from trprompt_dspy.loop.textual_reward import CORRECT_VERDICT
    from trprompt_dspy.optimizer import DEFAULT_INITIAL_REWARD

    return f"{CORRECT_VERDICT} {DEFAULT_INITIAL_REWARD}"


def sft_examples(pool: dict[int, dict[str, Any]], recipe: str,
                 critiques_path: Path | None = None) -> list[tuple[int, Any]]:
    """``(example_index, SFTExample)`` in pool order, built by the library (``build_sft_examples(abstain=True)``).

    * ``trace`` — both candidates of every query (the instruction and "no instruction"), trace-built rewards.
    * ``trace-correct`` — the same, only candidates whose outcome was correct (``min_score=1.0``).
    * ``critique`` — the recipe before issue 24 (``textual_rewards="critique", abstain=False``): the instructed
      candidate only, its reward the reward LM's critique (``lm_rewards.jsonl``; queries without one are skipped).
    """
    import dataclasses

    from trprompt_dspy.loop.sft_data import build_sft_examples
    from trprompt_dspy.loop.trace_reward import trace_reward

    out = []
    critiques = ({r["example_index"]: r["reward"] for r in read_jsonl(critiques_path) if r.get("reward")}
                 if recipe == "critique" else {})
    for i, c in pool.items():
        ins, student = c["instructed"], c["student"]
        if not ins.instructions:
            continue
        if recipe == "critique":
            if i in critiques:
                examples, _ = build_sft_examples([dataclasses.replace(ins, reward=critiques[i])], abstain=False)
                out += [(i, e) for e in examples]
            continue
        # The "no instruction" candidate, as the compile builds it (TRPromptRun._no_instruction_candidates).
        none = dataclasses.replace(student, instructions=[{**x, "instruction": ""} for x in ins.instructions])
        cands = [dataclasses.replace(r, reward=trace_reward(r, student)) for r in (none, ins)]
        examples, _ = build_sft_examples(cands, abstain=True, min_score=1.0 if recipe == "trace-correct" else None)
        out += [(i, e) for e in examples]
    return out


def stage_train(args: argparse.Namespace) -> None:
    """One SFT pass in pool order; the adapter after the first n queries is saved for each n in ``--sizes``."""
    import torch
    import transformers

    from trprompt_dspy.backends.prompt_model.lora_training import _finish_adapter_folder, lora_trainer
    from trprompt_dspy.config import LoraSettings, SFTSettings
    from trprompt_dspy.models import resolve_model
    from trprompt_dspy.models.dtype import cpu_info
    from trprompt_dspy.models.hf_runtime import load_causal_lm

    runs = Path(args.runs)
    pool = load_pool(runs)
    rows = sft_examples(pool, args.recipe, runs / "lm_rewards.jsonl")
    order = list(pool)
    ends = {}  # size -> number of examples covering the first `size` queries
    for n in args.sizes:
        keep = set(order[:n])
        ends[n] = sum(1 for i, _ in rows if i in keep)
    out_root = runs / f"adapters-{args.recipe}-top{args.top_layers}"
    todo = [n for n in args.sizes if not (out_root / f"n{n}" / "adapter_model.safetensors").exists()]
    if not todo:
        logger.info("all adapters exist under %s", out_root)
        return
    # One pass in pool order (nested subsets: the adapter after n queries has seen exactly their examples).
    # max_length 2048: one of the 504 critique-recipe examples (a long critique) is over 1024 tokens; none of the
    # trace recipes' examples is, so for them this changes nothing.
    sft = SFTSettings(num_train_epochs=1, per_device_train_batch_size=args.batch, learning_rate=args.lr,
                      group_by_length=False, max_length=2048, extra={"train_sampling_strategy": "sequential"})
    lora = LoraSettings(top_layers=args.top_layers or None)
    model, tok = load_causal_lm(resolve_model(args.target), dtype="auto", device="cpu")
    examples = [e for _, e in rows[: max(ends.values())]]
    bs = args.batch

    class SaveAt(transformers.TrainerCallback):
        def on_step_end(self, a, state, control, **kw):  # noqa: ANN001
            for n, e in ends.items():
                if state.global_step == -(-e // bs) and n in todo:
                    folder = out_root / f"n{n}"
                    kw["model"].save_pretrained(str(folder), safe_serialization=True, save_embedding_layers=False)
                    _finish_adapter_folder(folder, args.target)
                    (folder / "scale_info.json").write_text(json.dumps({
                        "queries": n, "examples": e, "steps": state.global_step, "recipe": args.recipe,
                        "top_layers": args.top_layers, "seconds": round(time.perf_counter() - t0, 1),
                        "cpu": cpu_info(), "torch_threads": torch.get_num_threads(), "dtype": str(model.dtype),
                        "losses": [h["loss"] for h in state.log_history if "loss" in h]}))
                    logger.info("saved adapter after %d queries (%d examples, step %d, %.0f s)", n, e,
                                state.global_step, time.perf_counter() - t0)

    with lora_trainer(model, tok, examples, lora=lora, sft=sft, seed=args.seed) as trainer:
        if len(trainer.train_dataset) != len(examples):
            raise RuntimeError("examples were dropped for length; raise max_length")
        tokens = sum(len(x["input_ids"]) for x in trainer.train_dataset)
        logger.info("SFT %s: %d examples, %d tokens, top %s layers trainable, torch threads %d", args.recipe,
                    len(examples), tokens, args.top_layers or "all", torch.get_num_threads())
        trainer.add_callback(SaveAt())
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    append_jsonl(runs / "train_timing.jsonl", {"recipe": args.recipe, "top_layers": args.top_layers, "cpu": cpu_info(),
                                               "examples": len(examples), "tokens": tokens, "wall_s": round(wall, 1),
                                               "examples_per_h": round(3600 * len(examples) / wall),
                                               "tokens_per_s": round(tokens / wall, 1)})


def matmul_gflops(dtype: Any, n: int = 2048, reps: int = 6) -> float:
    """This machine's sustained matmul rate (GFLOP/s) in ``dtype``, the ceiling SFT is held against."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return round(2 * n**3 * reps / (time.perf_counter() - t0) / 1e9, 1)


def padded_tokens(trainer: Any) -> int:
    """Tokens the trainer's batches hold, padding included (one pass over its dataloader, same order as training)."""
    total = 0
    for batch in trainer.get_train_dataloader():
        total += int(batch["input_ids"].numel())
    return total


def stage_sft_bench(args: argparse.Namespace) -> None:
    """Tokens/s of LoRA SFT steps with every layer trainable vs the top ``--top-layers`` only (same examples)."""
    import torch

    from trprompt_dspy.backends.prompt_model.lora_training import lora_trainer
    from trprompt_dspy.config import LoraSettings, SFTSettings
    from trprompt_dspy.models import resolve_model
    from trprompt_dspy.models.dtype import cpu_info
    from trprompt_dspy.models.hf_runtime import load_causal_lm

    runs = Path(args.runs)
    rows = sft_examples(load_pool(runs), args.recipe, runs / "lm_rewards.jsonl")
    examples = [e for _, e in rows[: args.batch * args.bench_steps]]
    model, tok = load_causal_lm(resolve_model(args.target), dtype="auto", device="cpu")
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    rec: dict[str, Any] = {"cpu": cpu_info(), "dtype": str(model.dtype), "torch_threads": torch.get_num_threads(),
                           "matmul_gflops": {"float32": matmul_gflops(torch.float32),
                                             "bfloat16": matmul_gflops(torch.bfloat16)},
                           "non_embedding_params": n_params, "runs": []}
    for top, grouped in ((0, False), (0, True), (args.top_layers, True)):
        sft = SFTSettings(num_train_epochs=1, per_device_train_batch_size=args.batch, group_by_length=grouped)
        with lora_trainer(model, tok, examples, lora=LoraSettings(top_layers=top or None), sft=sft,
                          seed=args.seed) as trainer:
            padded = padded_tokens(trainer)
            tokens = sum(len(x["input_ids"]) for x in trainer.train_dataset)
            t0 = time.perf_counter()
            trainer.train()
            wall = time.perf_counter() - t0
        tps = tokens / wall
        rec["runs"].append({"top_layers": top or "all", "group_by_length": grouped, "padded_tokens": padded,
                            "examples": len(examples), "tokens": tokens,
                            "wall_s": round(wall, 1), "tokens_per_s": round(tps, 1),
                            "examples_per_h": round(3600 * len(examples) / wall),
                            # LoRA SFT costs about 4N FLOP per token with every layer in the backward pass
                            # (forward 2N + activation gradients 2N; no weight gradients for frozen weights).
                            "gflops_at_4n": round(4 * n_params * tps / 1e9, 1)})
        logger.info("SFT bench %s", rec["runs"][-1])
    base = rec["runs"][0]["tokens_per_s"]
    rec["speedup_grouped_vs_before"] = round(rec["runs"][1]["tokens_per_s"] / base, 2)
    rec["speedup_top_grouped_vs_before"] = round(rec["runs"][2]["tokens_per_s"] / base, 2)
    append_jsonl(runs / "sft_bench.jsonl", rec)
    logger.info("SFT bench: %s", json.dumps(rec))


# ---------------------------------------------------------------------------------------------- eval
def instructions_for(pm: Any, program: Any, dev: list[Any]) -> tuple[list[str], list[str], dict[str, Any]]:
    """The rendered query and cleaned instruction the compiled ``program`` gets per dev question (``""``: abstains).

    Asks ``pm`` exactly as :meth:`QueryAwarePredict.query_instruction` does (same request, greedy, same token
    budget), all questions concurrently; returns the instructions and the prompt model's wall time and tokens.
    """
    from trprompt_dspy.backends.prompt_model.base import DEFAULT_MAX_INSTRUCTION_TOKENS
    from trprompt_dspy.compiled.program import clean_instruction, query_aware_predictors

    [(_, qp)] = query_aware_predictors(program)
    requests = [qp.build_request(qp.signature, {"question": ex.question}) for ex in dev]
    before = pm.instruction_stats.snapshot() if hasattr(pm, "instruction_stats") else {}
    t0 = time.perf_counter()
    raw = pm.generate(requests, temperature=0.0, n=1, max_new_tokens=DEFAULT_MAX_INSTRUCTION_TOKENS)
    wall = time.perf_counter() - t0
    after = pm.instruction_stats.snapshot() if hasattr(pm, "instruction_stats") else {}
    usage = {k: after.get(k, 0) - before.get(k, 0) for k in ("prompt_tokens", "completion_tokens", "hit_cap")}
    return ([r.query for r in requests], [clean_instruction(r[0]) for r in raw],
            {"wall_s": round(wall, 1), "questions": len(requests), **usage})


#: One record per evaluated cell, per split. The test file is written only by ``eval --split test`` for the
#: configuration that led zero-shot on dev by >= 3 points (the issue's rule), and for zero-shot next to it.
CELLS_FILE = {"dev": "cells.jsonl", "test": "cells-test.jsonl"}


def stage_eval(args: argparse.Namespace, stack: Any) -> None:
    """Zero-shot and each adapter on the first ``--n`` dev questions; one record per cell in ``cells.jsonl``.

    An adapter cell runs in two steps. (1) The trained prompt model writes each dev question's instruction
    (greedy, as the compiled program asks for it). (2) The target answers the questions that got an instruction,
    through the query-aware program fed those instructions. Where the prompt model abstained, the compiled
    program runs the student's predictor unchanged, byte for byte the zero-shot prompt: that row is the
    zero-shot cell's row of the same session (``reused_zeroshot``), not a second greedy run of the same prompt
    whose only difference would be vLLM's batch-order noise. Zero-shot therefore has to run first.
    """
    import dspy

    from benchmarks.ablation_study import _evaluate
    from trprompt_dspy.apps.programs import load_program
    from trprompt_dspy.backends.prompt_model.base import DEFAULT_MAX_INSTRUCTION_TOKENS
    from trprompt_dspy.backends.prompt_model.fake import FakePromptModel
    from trprompt_dspy.backends.prompt_model.pinned import PinnedPromptModel
    from trprompt_dspy.compiled.program import install_query_aware
    from trprompt_dspy.models.dtype import cpu_info
    from trprompt_dspy.optimizer import DEFAULT_INITIAL_REWARD
    from trprompt_dspy.tasks.datasets import load_fixed_split
    from trprompt_dspy.tasks.metrics import get_metric

    runs = Path(args.runs)
    split = getattr(args, "split", "dev")
    cells_path = runs / CELLS_FILE[split]
    dev = load_fixed_split(DATASET, split, limit=args.n)
    metric = get_metric(DATASET)
    lm, pm = stack.target_lm, stack.prompt_model
    generation = {"temperature": 0.0, "max_new_tokens": DEFAULT_MAX_INSTRUCTION_TOKENS}
    for cell in args.cells:
        done = {c["cell"]: c for c in read_jsonl(cells_path)}
        if cell in done:
            continue
        t0 = time.perf_counter()
        with dspy.context(lm=lm):
            if cell == "zeroshot":
                rec = _evaluate(load_program(PROGRAM), dev, metric, lm, stack.num_threads)
            else:
                if "zeroshot" not in done:
                    raise SystemExit("run the zeroshot cell first (adapter cells reuse its rows where they abstain)")
                zs = {r["idx"]: r for r in done["zeroshot"]["rows"]}
                folder = runs / cell
                info = json.loads((folder / "scale_info.json").read_text())
                pm.load_adapter(str(folder))
                pinned = PinnedPromptModel(pm, str(folder))
                t_star = DEFAULT_INITIAL_REWARD if info["recipe"] == "critique" else trace_t_star()
                program = install_query_aware(load_program(PROGRAM), prompt_model=pinned,
                                              optimal_reward=t_star, generation=generation)
                queries, instructions, pm_usage = instructions_for(pinned, program, dev)
                by_query = {q: ins for q, ins in zip(queries, instructions, strict=True) if ins}
                todo = [ex for ex, ins in zip(dev, instructions, strict=True) if ins]
                fixed = FakePromptModel(lambda req, table=by_query: table[req.query])
                program = install_query_aware(load_program(PROGRAM), prompt_model=fixed,
                                              optimal_reward=t_star, generation=generation)
                rec = _evaluate(program, todo, metric, lm, stack.num_threads) if todo else {
                    "rows": [], "eval_wall_s": 0.0, "target_calls": 0, "target_prompt_tokens": 0,
                    "target_completion_tokens": 0}
                asked = {r["idx"] for r in rec["rows"]}
                for ex in dev:
                    if ex.get("idx") not in asked:
                        rec["rows"].append({**zs[ex.get("idx")], "instruction": "", "reused_zeroshot": True})
                rec["rows"].sort(key=lambda r: r["idx"])
                rec.update(train=info, prompt_model=pm_usage, abstained=len(dev) - len(todo),
                           target_questions_run=len(todo))
        rec.update(cell=cell, cell_wall_s=round(time.perf_counter() - t0, 1), cpu=cpu_info())
        append_jsonl(cells_path, rec)
        logger.info("cell %s: %.1f %% in %.0f s", cell, 100 * sum(r["correct"] for r in rec["rows"]) / len(rec["rows"]),
                    rec["cell_wall_s"])


# ---------------------------------------------------------------------------------------------- report
#: Rollouts/hour and SFT examples/hour of the compile loop before this work, on the same kind of Intel Xeon (AMX),
#: from the committed study (``ablation-gsmhard-qwen1.5b-2026-12-01.cells.jsonl``): the iteration-0 phases of the
#: compile cells that ran their own rollouts (rollouts: program runs with instructions + reward-LM critiques at
#: 32 concurrent requests; SFT: the iteration's LoRA step, every layer, batch 4, model load included).
BEFORE_SOURCE = "benchmarks/results/ablation-gsmhard-qwen1.5b-2026-12-01.cells.jsonl"


def before_rates() -> dict[str, Any]:
    cells = [json.loads(line) for line in (REPO / BEFORE_SOURCE).read_text().splitlines() if line.strip()]
    n_r = s_r = n_e = s_e = 0.0
    used = []
    for c in cells:
        if "compile" not in c or "Xeon" not in (c.get("cpu") or {}).get("model", ""):
            continue
        for it in c["compile"]["iterations"]:
            sec = it.get("seconds") or {}
            if (sec.get("rollouts") or 0) > 10 and (sec.get("sft") or 0) > 10:  # phases resumed from disk: ~0 s
                if "smollm2" in c["cell"] or "qwen0.5b" in c["cell"]:
                    continue  # another prompt model
                n_r += it["num_rollouts"]
                s_r += sec["rollouts"]
                n_e += it["num_sft_examples"]
                s_e += sec["sft"]
                used.append(c["cell"])
    return {"source": BEFORE_SOURCE, "cells": used, "rollouts_per_h": round(3600 * n_r / s_r) if s_r else None,
            "sft_examples_per_h": round(3600 * n_e / s_e) if s_e else None,
            "note": "rollouts include the reward LM's critique of each; SFT includes loading the model"}


#: The recipe whose nested adapters make the learning curve (trace-built rewards, "no instruction" candidates,
#: only candidates whose outcome was correct).
CURVE_RECIPE = "trace-correct"
#: The curve's LoRA placement (top 4 of 28 layers); other placements are side rows, not points of the slope.
CURVE_TOP_LAYERS = 4


def _pool_seconds(timing: list[dict[str, Any]], queries: int) -> tuple[float, dict[str, int]]:
    """Wall seconds and target tokens of the pool chunks that cover the first ``queries`` training queries."""
    wall, tokens = 0.0, {"prompt_tokens": 0, "completion_tokens": 0}
    for t in timing:
        if t["queries"][0] < queries:
            wall += t["wall_s"]
            for k in tokens:
                tokens[k] += t[k]
    return wall, tokens


def curve_rows(cells: dict[str, Any], timing: list[dict[str, Any]],
               critique_timing: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per evaluated adapter, paired against the zero-shot cell of the same session.

    A ``critique`` row also pays for the reward LM: its critiques' wall time and tokens, at the mean per critique
    of ``critique_timing`` (``lm_rewards_timing.jsonl``) times the training queries.
    """
    done = sum(t["critiques"] for t in critique_timing or [])
    per = ({k: sum(t[k] for t in critique_timing) / done for k in ("wall_s", "prompt_tokens", "completion_tokens")}
           if done else None)
    from benchmarks.ablation_study import compare

    if "zeroshot" not in cells:
        return []
    zs = cells["zeroshot"]
    zs_acc = compare(zs["rows"], zs["rows"])["accuracy"]
    alone = [t for t in timing if POOL_CHUNK_ALONE.get(t["queries"][0]) is True]
    rate = 3600 * sum(t["rollouts"] for t in alone) / sum(t["wall_s"] for t in alone) if alone else None
    rows = []
    for name, c in cells.items():
        if name == "zeroshot":
            continue
        cmp = compare(c["rows"], zs["rows"])
        n_q = c["train"]["queries"]
        pool_s, pool_tokens = _pool_seconds(timing, n_q)
        rows.append({
            "cell": name, "recipe": c["train"]["recipe"], "top_layers": c["train"]["top_layers"],
            "train_queries": n_q, "sft_examples": c["train"]["examples"], "sft_steps": c["train"]["steps"],
            "dev_n": cmp["n"], "accuracy": cmp["accuracy"], "ci95": cmp["ci95"], "zeroshot_accuracy": zs_acc,
            "delta_points": cmp["delta_points"], "fixed": cmp["fixed"], "broken": cmp["broken"],
            "p_value": cmp["mcnemar_p"], "abstention_rate": round(c["abstained"] / cmp["n"], 3),
            # What a compile on these n queries costs on this machine: the pool's rollouts of those queries
            # (student + instructed), one SFT pass over their examples (the nested pass's time at the save point),
            # and the dev evaluation. No reward LM: the rewards are built from the metric's trace.
            # rollouts: 2 per query (student + instructed) at the rate of the chunks that ran alone;
            # rollouts_measured: the wall time of the chunks as they ran (the first shared the cores).
            "wall_s": {"rollouts": round(2 * n_q * 3600 / rate, 1) if rate else None,
                       "rollouts_measured": round(pool_s, 1), "sft": c["train"]["seconds"],
                       "reward_lm": round(per["wall_s"] * n_q, 1) if c["train"]["recipe"] == "critique" and per else 0,
                       "eval": c["cell_wall_s"]},
            "tokens": {"target_rollouts": pool_tokens,
                       "reward_lm": ({k: round(per[k] * n_q) for k in ("prompt_tokens", "completion_tokens")}
                                     if c["train"]["recipe"] == "critique" and per else 0),
                       "target_eval": {"prompt_tokens": c["target_prompt_tokens"],
                                       "completion_tokens": c["target_completion_tokens"]},
                       "prompt_model_eval": {k: c.get("prompt_model", {}).get(k) for k in
                                             ("prompt_tokens", "completion_tokens")}},
            "target_questions_run": c.get("target_questions_run"),
            # instructions that ended at the prompt model's token cap (DEFAULT_MAX_INSTRUCTION_TOKENS): cut mid-plan
            "instructions_hit_cap": (c.get("prompt_model") or {}).get("hit_cap"),
            "first_loss": (c["train"]["losses"] or [None])[0], "last_loss": (c["train"]["losses"] or [None])[-1],
        })
    return sorted(rows, key=lambda r: (r["recipe"] != CURVE_RECIPE, r["train_queries"]))


def split_test_row(runs: Path) -> dict[str, Any] | None:
    """The test-split comparison (``cells-test.jsonl``): the dev-chosen configuration against zero-shot."""
    from benchmarks.ablation_study import compare

    cells = {c["cell"]: c for c in read_jsonl(runs / CELLS_FILE["test"])}
    others = [c for name, c in cells.items() if name != "zeroshot"]
    if "zeroshot" not in cells or not others:
        return None
    c = others[0]
    cmp = compare(c["rows"], cells["zeroshot"]["rows"])
    return {"cell": c["cell"], "n": cmp["n"], "accuracy": cmp["accuracy"], "ci95": cmp["ci95"],
            "zeroshot_accuracy": compare(cells["zeroshot"]["rows"], cells["zeroshot"]["rows"])["accuracy"],
            "fixed": cmp["fixed"], "broken": cmp["broken"], "p_value": cmp["mcnemar_p"],
            "abstention_rate": round(c["abstained"] / cmp["n"], 3), "eval_wall_s": c["cell_wall_s"],
            "zeroshot_eval_wall_s": cells["zeroshot"]["cell_wall_s"]}


def slope_per_doubling(cells: dict[str, Any], names: list[str], reps: int = 5000, seed: int = 0) -> dict[str, Any] | None:
    """Least-squares slope of (accuracy - zero-shot) in points against log2(training queries), with a paired
    bootstrap over the dev questions (the same resampled questions for every cell and for zero-shot) for its
    95 % interval.

    Example:
        >>> rows = lambda bits: [{"idx": i, "correct": b} for i, b in enumerate(bits)]
        >>> cells = {"zeroshot": {"rows": rows([0, 0, 0, 0])},
        ...          "a": {"rows": rows([0, 0, 0, 0]), "train": {"queries": 1}},
        ...          "b": {"rows": rows([1, 0, 0, 0]), "train": {"queries": 2}},
        ...          "c": {"rows": rows([1, 1, 0, 0]), "train": {"queries": 4}}}
        >>> slope_per_doubling(cells, ["a", "b", "c"], reps=50)["points"]
        25.0
    """
    import math

    if "zeroshot" not in cells or len(names) < 2:
        return None
    zs = {r["idx"]: r["correct"] for r in cells["zeroshot"]["rows"]}
    idx = sorted(zs)
    xs = [math.log2(cells[n]["train"]["queries"]) for n in names]
    ys = [{r["idx"]: r["correct"] for r in cells[n]["rows"]} for n in names]
    mx = sum(xs) / len(xs)
    sxx = sum((x - mx) ** 2 for x in xs)

    def slope(sample: list[int]) -> float:
        base = sum(zs[i] for i in sample)
        d = [100 * (sum(y[i] for i in sample) - base) / len(sample) for y in ys]
        md = sum(d) / len(d)
        return sum((x - mx) * (v - md) for x, v in zip(xs, d, strict=True)) / sxx

    rng = random.Random(seed)
    boots = sorted(slope([rng.choice(idx) for _ in idx]) for _ in range(reps))
    return {"points": round(slope(idx), 2), "ci95": [round(boots[int(0.025 * reps)], 2),
                                                     round(boots[int(0.975 * reps) - 1], 2)],
            "cells": names, "method": "OLS of (accuracy - zero-shot) on log2(train queries); paired bootstrap "
                                      f"over dev questions, {reps} resamples"}


def plot_curve(s: dict[str, Any], path: Path) -> None:
    """Accuracy against training queries (log scale), 95 % intervals, zero-shot as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    rows = s["curve"]
    zs = rows[0]["zeroshot_accuracy"]
    ax.axhline(zs, color="grey", lw=1, label=f"zero-shot CoT ({zs} %)")
    # One series per (recipe, LoRA placement): only the curve's own placement is joined into the curve.
    series = sorted({(r["recipe"], r["top_layers"]) for r in rows},
                    key=lambda k: (k != (CURVE_RECIPE, CURVE_TOP_LAYERS), k[0], k[1] or 0))
    for recipe, top in series:
        pts = [r for r in rows if r["recipe"] == recipe and r["top_layers"] == top]
        x = [r["train_queries"] for r in pts]
        y = [r["accuracy"] for r in pts]
        err = [[r["accuracy"] - r["ci95"][0] for r in pts], [r["ci95"][1] - r["accuracy"] for r in pts]]
        marker = "o" if (recipe, top) == (CURVE_RECIPE, CURVE_TOP_LAYERS) else ("s" if top == CURVE_TOP_LAYERS else "D")
        layers = f"top {top} layers" if top else "every layer"
        ax.errorbar(x, y, yerr=err, marker=marker, capsize=3, label=f"TRPrompt, {recipe} rewards, {layers}")
        for r in pts:
            ax.annotate(f"+{r['fixed']}/-{r['broken']}, abstains {round(100 * r['abstention_rate'])} %",
                        (r["train_queries"], r["accuracy"]), textcoords="offset points", xytext=(6, 6), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training queries (GSM-Hard train, nested subsets)")
    ax.set_ylabel(f"accuracy on {rows[0]['dev_n']} GSM-Hard dev questions (%)")
    ax.set_title(f"{s['target']}, single-base, 2-core CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


#: What shared the cores with a row's SFT or evaluation, as measured: appended to the report's "ran alone" line.
SHARED_NOTE = (", except about 20 s of unit tests in the first 5 minutes of the 61-minute critique-recipe SFT "
               "pass, and about 15 s of report scripts and unit tests during the every-layer SFT pass")

#: Whether each pool chunk (by its first query) had the machine to itself, from the session notes of 2026-12-07.
#: Chunk 0 shared the 2 cores with the test suite. Chunk 128 was run without other jobs as far as that session
#: knew, yet at half the rate of chunks 256 and 384 (run alone in the next session, nothing else started): an
#: unnoticed process probably shared the cores, so its rate is not counted as the "after" figure.
POOL_CHUNK_ALONE: dict[int, bool | str] = {0: False, 128: "uncertain", 256: True, 384: True}


def stage_report(args: argparse.Namespace) -> None:
    runs = Path(args.runs)
    pool = load_pool(runs)
    timing = read_jsonl(runs / "pool_timing.jsonl")
    counts = dict.fromkeys(("fixed", "broke", "kept", "left_wrong", "abstained"), 0)
    from trprompt_dspy.loop.trace_reward import outcome_change

    for c in pool.values():
        ins = c["instructed"]
        if not any((x.get("instruction") or "").strip() for x in ins.instructions):
            counts["abstained"] += 1
        else:
            counts[outcome_change(ins, c["student"])] += 1
    alone = [t for t in timing if POOL_CHUNK_ALONE.get(t["queries"][0]) is True]
    n_roll = sum(t["rollouts"] for t in alone)
    wall = sum(t["wall_s"] for t in alone)
    after_sft = read_jsonl(runs / "sft_bench.jsonl")
    cells = {c["cell"]: c for c in read_jsonl(runs / "cells.jsonl")}
    curve = curve_rows(cells, timing, read_jsonl(runs / "lm_rewards_timing.jsonl"))
    rates = reward_rates(runs)
    summary = {
        "issue": 24, "dataset": DATASET, "target": args.target, "program": PROGRAM,
        "pool": {"queries": len(pool), "max_tokens": timing[0]["max_tokens"] if timing else None,
                 "student_accuracy": round(sum(c["student"].score for c in pool.values()) / max(1, len(pool)), 3),
                 "instructed_accuracy": round(sum(c["instructed"].score for c in pool.values()) / max(1, len(pool)), 3),
                 "instructions_against_student": counts},
        "throughput": {"before": before_rates(),
                       "after": {"rollouts": int(n_roll), "wall_s": round(wall, 1),
                                 "rollouts_per_h": round(3600 * n_roll / wall) if wall else None,
                                 "completion_tokens_per_s": round(sum(t["completion_tokens"] for t in alone) / wall, 1)
                                 if wall else None, "concurrency": timing[0]["concurrency"] if timing else None,
                                 "note": "student + instructed rollouts side by side; no reward LM (trace-built rewards); "
                                         "the chunks that ran alone",
                                 "chunks": [{"queries": t["queries"], "rollouts": t["rollouts"], "wall_s": t["wall_s"],
                                             "rollouts_per_h": round(3600 * t["rollouts"] / t["wall_s"]),
                                             "completion_tokens_per_s": round(t["completion_tokens"] / t["wall_s"], 1),
                                             "ran_alone": POOL_CHUNK_ALONE.get(t["queries"][0])} for t in timing]},
                       "sft_bench": after_sft[-1] if after_sft else None,
                       "sft_passes": read_jsonl(runs / "train_timing.jsonl")},
        **rates,
        "curve": curve, "slope_per_doubling": slope_per_doubling(cells, [
            r["cell"] for r in curve if r["recipe"] == CURVE_RECIPE and r["top_layers"] == CURVE_TOP_LAYERS]),
        "zeroshot": ({k: cells["zeroshot"].get(k) for k in ("eval_wall_s", "target_calls", "target_prompt_tokens",
                                                           "target_completion_tokens", "target_tok_per_s", "cpu")}
                     if "zeroshot" in cells else None),
        "test": split_test_row(runs),
    }
    summary["contradiction_rate"] = {"before": rates["before"]["contradiction_rate"],
                                     "after": rates["after"]["contradiction_rate"], "n": rates["before"]["n"]}
    summary["restatement_rate"] = {"before": rates["before"]["restatement_rate"],
                                   "after": rates["after"]["restatement_rate"], "n": rates["before"]["n"]}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (RESULTS / f"{args.out}.md").write_text(render(summary))
    if curve:
        plot_curve(summary, RESULTS / f"{args.out}.png")
    logger.info("wrote %s", RESULTS / f"{args.out}.json")


def render(s: dict[str, Any]) -> str:
    """The result as Markdown (every figure is also in the json next to it)."""
    p, t = s["pool"], s["throughput"]
    b, a = t["before"], t["after"]
    lines = [f"# TRPrompt at scale on {s['dataset']} ({s['target']}, single-base, one vLLM server)", "",
             "Issue 24. Training queries: the first n of a fixed Random(0) order of the GSM-Hard train pool (719); "
             "the dev questions are the fixed `splits.json` dev indices; the test split is not used.", "",
             "## Rollout pool", "",
             f"{p['queries']} training queries, each with the student's own answer (greedy) and one instruction "
             f"from the untrained single-base prompt model (t*_0, temperature 0.9) with the target's answer; "
             f"target max_tokens {p['max_tokens']}.", "",
             "| | value |", "| --- | --- |",
             f"| student accuracy on the pool | {p['student_accuracy']} |",
             f"| instructed accuracy on the pool | {p['instructed_accuracy']} |",
             *(f"| instructions {k} (against the student) | {v} |" for k, v in p["instructions_against_student"].items()),
             "", "## Throughput (Intel Xeon, 2 cores, AMX)", "",
             "| step | before | after |", "| --- | --- | --- |",
             f"| rollouts/hour | {b['rollouts_per_h']} ({b['note'].split(';')[0]}) | {a['rollouts_per_h']} "
             f"({a['concurrency']} concurrent, {a['completion_tokens_per_s']} completion tok/s) |",
             f"| SFT examples/hour | {b['sft_examples_per_h']} | "
             + ("; ".join(f"{x['examples_per_h']} ({x['recipe']}, top {x['top_layers'] or 'all'} layers, "
                          f"{x['examples']} examples, {x['tokens_per_s']} tokens/s)" for x in t.get("sft_passes") or [])
                or "see the SFT bench below") + " |", "",
             "Pool chunks (0-127 shared the 2 cores with the test suite; 128-255 was thought to run alone but ran at "
             "half the rate of the later chunks, so only 256-511 count for the 'after' figure):", "",
             "| queries | rollouts | wall s | rollouts/hour | completion tok/s | ran alone |",
             "| --- | --- | --- | --- | --- | --- |",
             *(f"| {c['queries'][0]}-{c['queries'][1]} | {c['rollouts']} | {c['wall_s']} | {c['rollouts_per_h']} | "
               f"{c['completion_tokens_per_s']} | {c['ran_alone']} |" for c in a["chunks"]), "",
             f"Before: {b['source']} (cells {', '.join(sorted(set(b['cells'])))}). After: the pool's chunks that "
             "ran alone (`pool_timing` in the json).", ""]
    bench = t.get("sft_bench")
    if bench:
        lines += ["### SFT bench (same examples, batch 4, one pass)", "",
                  f"Matmul rate on this machine, torch {bench['torch_threads']} threads: fp32 "
                  f"{bench['matmul_gflops']['float32']} GFLOP/s, bf16 {bench['matmul_gflops']['bfloat16']} GFLOP/s; "
                  f"model dtype {bench['dtype']}.", "",
                  "| LoRA layers | batches | tokens | padded tokens | wall s | tokens/s | examples/h | GFLOP/s at 4N |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in bench["runs"]:
            lines.append(f"| {r['top_layers']} | {'length-grouped' if r['group_by_length'] else 'random'} | "
                         f"{r['tokens']} | {r['padded_tokens']} | {r['wall_s']} | {r['tokens_per_s']} | "
                         f"{r['examples_per_h']} | {r['gflops_at_4n']} |")
        lines += ["", f"Speed-up against the previous default (every layer, random batches): length grouping "
                  f"{bench['speedup_grouped_vs_before']}x, plus the top {bench['runs'][-1]['top_layers']} layers only "
                  f"{bench['speedup_top_grouped_vs_before']}x.", ""]
    cr, rr = s["contradiction_rate"], s["restatement_rate"]
    lines += ["## Textual rewards on the same rollouts", "",
              f"{cr['n']} instructed rollouts of the pool, each with the reward LM's critique (before: the critique "
              "alone, the recipe until now) and the trace-built reward with the critique merged only where it agrees "
              "with the verdict and adds something (after).", "",
              "| | before | after |", "| --- | --- | --- |",
              f"| contradicts the metric's verdict | {cr['before']} | {cr['after']} |",
              f"| only restates the question, answer or gold solution | {rr['before']} | {rr['after']} |",
              f"| critiques kept / dropped | - | {s['after']['critiques_added']} / {s['after']['critiques_dropped']} |",
              ""]
    lines += ["## Learning curve", ""]
    if s["curve"]:
        z = s["zeroshot"] or {}
        lines += [f"Dev: the first {s['curve'][0]['dev_n']} fixed GSM-Hard dev questions, greedy, every row paired "
                  f"against zero-shot CoT run in the same session ({z.get('eval_wall_s')} s, "
                  f"{z.get('target_completion_tokens')} target completion tokens). Adapters: one LoRA SFT pass "
                  "(1 epoch, constant learning rate, batch 4, top 4 layers) over the pool's examples in pool order, "
                  "saved after the first n queries (nested subsets); at inference the prompt model is conditioned "
                  "on the correct verdict and t*_0, greedy. Where it abstains the compiled program runs the "
                  "student's prompt unchanged, so those rows are zero-shot's rows. "
                  + ("The `critique` row is the recipe before issue 24 on the same rollouts: the reward LM's critique "
                     "alone as each instruction's reward, no \"no instruction\" candidate, conditioned on t*_0 alone "
                     "(as the compile does for it). " if any(r["recipe"] == "critique" for r in s["curve"]) else
                     "The recipe before issue 24 (critique rewards, no abstention) on the same rollouts is not "
                     "evaluated yet. ")
                  + "p: exact McNemar against zero-shot.", "",
                  "| cell | recipe | train queries | SFT examples | acc % | 95 % CI | zero-shot % | fixed | broken | "
                  "p | abstention | rollouts s | reward LM s | SFT s | eval s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in s["curve"]:
            w = r["wall_s"]
            lines.append(f"| {r['cell']} | {r['recipe']} | {r['train_queries']} | {r['sft_examples']} | "
                         f"{r['accuracy']} | {r['ci95']} | {r['zeroshot_accuracy']} | {r['fixed']} | {r['broken']} | "
                         f"{r['p_value']} | {r['abstention_rate']} | {w['rollouts']} | {w['reward_lm']} | {w['sft']} | {w['eval']} |")
        sl = s.get("slope_per_doubling")
        if sl:
            lines += ["", f"Slope per doubling of training queries ({CURVE_RECIPE} cells): {sl['points']} points "
                      f"(95 % interval {sl['ci95']}; {sl['method']}).", ""]
        lines += ["Rollouts s: 2 rollouts per training query (student and instructed; target only, no reward LM) "
                  "at the rate of the pool chunks that ran alone (`wall_s.rollouts_measured` in the json has the "
                  "chunks' own wall times). SFT s: the nested pass's time when that adapter was saved. Tokens per role "
                  "are in the json (`curve[].tokens`).", ""]
        lines += ["Ran alone on the machine: the SFT passes and evaluations of the rows above (nothing else was "
                  f"started while they ran{SHARED_NOTE}).", ""]
    else:
        lines.append("Not run yet: no adapter has been evaluated on dev (see the issue's note for the cost).")
    te = s.get("test")
    if te:
        lines += ["", "## Test split (the configuration chosen on dev, run once)", "",
                  f"The first {te['n']} fixed GSM-Hard **test** indices, {te['cell']} against zero-shot CoT, both run "
                  "in the same session; p: exact McNemar.", "",
                  "| cell | n | acc % | 95 % CI | zero-shot % | fixed | broken | p | abstention |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
                  f"| {te['cell']} | {te['n']} | {te['accuracy']} | {te['ci95']} | {te['zeroshot_accuracy']} | "
                  f"{te['fixed']} | {te['broken']} | {te['p_value']} | {te['abstention_rate']} |", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=["pool", "rewards", "sft-bench", "train", "eval", "report"])
    parser.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--runs", default="runs/scale")
    parser.add_argument("--pool", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=768)
    parser.add_argument("--threads", type=int, default=32, help="concurrent requests per rollout kind")
    parser.add_argument("--lm-rewards", type=int, default=64, help="instructed rollouts critiqued by the reward LM")
    parser.add_argument("--recipe", default="trace-correct", choices=["trace", "trace-correct", "critique"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--top-layers", type=int, default=4, help="train LoRA on the top k layers only (0: all)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--bench-steps", type=int, default=6)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--n", type=int, default=100, help="first n fixed questions of --split")
    parser.add_argument("--split", default="dev", choices=["dev", "test"],
                        help="test only for a configuration chosen on dev (never tune on it)")
    parser.add_argument("--cells", nargs="+", default=["zeroshot"])
    parser.add_argument("--out", default="scale-gsmhard-qwen1.5b")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "LiteLLM", "litellm", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.stage in ("train", "sft-bench"):
        (stage_train if args.stage == "train" else stage_sft_bench)(args)
        return 0
    if args.stage == "report":
        stage_report(args)
        return 0
    from trprompt_dspy.backends.stack import ModelStack

    stack = ModelStack(args.target, max_tokens=args.max_tokens, log_dir=Path(args.runs) / "servers",
                       num_threads=2 * args.threads)
    with stack:
        {"pool": stage_pool, "rewards": stage_rewards, "eval": stage_eval}[args.stage](args, stack)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
