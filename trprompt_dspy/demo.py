"""The main job behind ``make demo`` / ``trprompt demo``.

1. Provision the default models (target/reward: Qwen2.5-Coder-0.5B-Instruct; prompt model: SmolLM2-135M).
2. Evaluate the zero-shot CoT program (``programs.math:MathCoT``) on held-out GSM8K dev examples.
3. Compile it with ``TRPromptOptimizer(auto=...)`` on a GSM8K training subset.
4. Evaluate the compiled program on the same held-out examples.
5. Write ``runs/<timestamp>/report.md`` + ``results.json`` and print the table and sample instructions.

The data come from the GSM8K subset bundled with the package (MIT), so the demo needs no download
beyond the model packages.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dspy

logger = logging.getLogger(__name__)

__all__ = ["run_demo"]


def _evaluate(program: dspy.Module, data: list[dspy.Example], metric: Any, num_threads: int
              ) -> tuple[float, list[dict[str, Any]]]:
    result = dspy.Evaluate(devset=data, metric=metric, num_threads=num_threads, display_progress=True,
                           max_errors=len(data) + 1, failure_score=0.0)(program)
    rows = []
    for ex, pred, score in result.results:
        rows.append({"question": ex.question, "gold": ex.answer, "answer": getattr(pred, "answer", None),
                     "instruction": getattr(pred, "query_instruction", None), "correct": bool(float(score))})
    return float(result.score), rows


def run_demo(*, target: str = "qwen2.5-coder-0.5b-instruct", api_base: str | None = None, api_key: str = "EMPTY",
             max_tokens: int = 512, num_threads: int = 8, train_size: int = 48, eval_size: int = 40,
             auto: str = "light", baseline_only: bool = False, runs_dir: Path = Path("runs"), seed: int = 0,
             program: str = "programs.math:MathCoT", seed_with_target: bool = True) -> dict[str, Any]:
    """Run the demo and return its results (also written to ``runs/<timestamp>/``).

    ``seed_with_target`` lets the target LM write iteration 0's instructions (``seed_lm=``): the untrained
    135M prompt model tends to solve the question instead of writing an instruction.
    """
    from trprompt_dspy.datasets import load_dataset, load_fixed_split
    from trprompt_dspy.metrics import gsm8k_feedback_metric, gsm8k_metric
    from trprompt_dspy.models import local_lm, resolve_model

    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    out = runs_dir / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    if api_base:
        lm = dspy.LM(f"openai/{target}", api_base=api_base, api_key=api_key, temperature=0.0, max_tokens=max_tokens)
    else:
        resolve_model(target)
        lm = local_lm(target, max_tokens=max_tokens, temperature=0.0)
    if not baseline_only:
        resolve_model("smollm2-135m-instruct")
    timings["provision"] = time.perf_counter() - t0

    from trprompt_dspy.cli import load_program

    def make_program() -> dspy.Module:
        return load_program(program)

    train = load_dataset("gsm8k", "train", source="bundled", limit=train_size)
    heldout = load_fixed_split("gsm8k", "dev", source="bundled", limit=eval_size)
    results: dict[str, Any] = {"program": program, "target": target, "train_size": len(train), "eval_size": len(heldout),
                               "auto": auto, "seed": seed, "python": platform.python_version()}
    with dspy.context(lm=lm):
        t0 = time.perf_counter()
        base_acc, base_rows = _evaluate(make_program(), heldout, gsm8k_metric, num_threads)
        timings["baseline_eval"] = time.perf_counter() - t0
        results["baseline_accuracy"] = base_acc
        logger.info("Baseline accuracy: %.1f%% on %d held-out GSM8K dev examples", base_acc, len(heldout))
        if not baseline_only:
            from trprompt_dspy.artifact import save_compiled
            from trprompt_dspy.optimizer import TRPromptOptimizer

            t0 = time.perf_counter()
            opt = TRPromptOptimizer(metric=gsm8k_feedback_metric, auto=auto, num_threads=num_threads, seed=seed,
                                    seed_lm=lm if seed_with_target else None, log_dir=out / "log_dir")
            compiled = opt.compile(make_program(), trainset=train)
            timings["compile"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            comp_acc, comp_rows = _evaluate(compiled, heldout, gsm8k_metric, num_threads)
            timings["compiled_eval"] = time.perf_counter() - t0
            save_compiled(compiled, out / "compiled")
            results.update(compiled_accuracy=comp_acc, compile_stats=compiled.detailed_results.to_dict(),
                           examples=comp_rows[:8])
    timings["total"] = time.perf_counter() - t_all
    results["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    results["baseline_examples"] = base_rows[:5]
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    report = _report(results)
    (out / "report.md").write_text(report)
    print(report)
    print(f"\nWritten to {out}/report.md")
    return results


def _report(r: dict[str, Any]) -> str:
    lines = ["# TRPrompt demo", "",
             f"Target `{r['target']}`, GSM8K: {r['train_size']} training examples, "
             f"{r['eval_size']} held-out dev examples, auto={r['auto']!r}, seed {r['seed']}.", "",
             "| program | accuracy (held-out dev) |", "| --- | --- |",
             f"| zero-shot CoT (baseline) | {r['baseline_accuracy']:.1f}% |"]
    if "compiled_accuracy" in r:
        lines.append(f"| TRPrompt-compiled CoT | {r['compiled_accuracy']:.1f}% |")
    lines += ["", "Wall time per phase (s): " + ", ".join(f"{k} {v}" for k, v in r["timings_s"].items())]
    if "compile_stats" in r:
        st = r["compile_stats"]
        lines += ["", f"LM calls: {st['lm_calls']}; failures: {st['failures']}",
                  f"Optimal textual reward t*: {st['t_star_history'][-1]!r}", "",
                  "## Sample per-query instructions", ""]
        for ex in r.get("examples", []):
            lines += [f"- **Q:** {ex['question'][:200]}", f"  - instruction: {ex['instruction']!r}",
                      f"  - answer: {ex['answer']!r} (gold {ex['gold']}, {'correct' if ex['correct'] else 'wrong'})"]
    return "\n".join(lines) + "\n"
