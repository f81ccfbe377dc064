"""The main job behind ``make demo`` / ``trprompt demo``.

1. Provision the default model (Qwen2.5-Coder-0.5B-Instruct in every role).
2. Start the serving stack (:class:`~trprompt_dspy.backends.stack.ModelStack`): ``backend="vllm"`` starts **one**
   vLLM server with LoRA enabled; the target, the textual reward model and TextGrad use its base weights
   and the prompt model is a LoRA adapter on them (single-base mode, ``prompt_model="auto"``). ``"hf"``
   runs in-process with transformers; ``"api"`` uses an OpenAI-compatible endpoint you already run
   (``api_base``) and a separate in-process prompt model.
3. Evaluate the zero-shot CoT program (``programs.math:MathCoT``) on held-out GSM8K dev examples.
4. Compile it with ``TRPromptOptimizer(auto=...)`` on a GSM8K training subset.
5. Evaluate the compiled program on the same held-out examples.
6. Write ``runs/<timestamp>/report.md`` + ``results.json`` + PNG plots, print the table, stop the servers.
   The report, and the console after it, lead with the compile's decision in plain words
   (:func:`~trprompt_dspy.apps.decision.decision_summary`, kept as ``results["decision"]``); failed program
   runs are counted by phase and kind (``results["errors_by_phase"]`` for the held-out evaluations,
   ``compile_stats["errors_by_phase"]`` for the compile).

The data come from the GSM8K subset bundled with the package (MIT), so the demo needs no download
beyond the model packages.

Example (the in-process stack, baseline only; minutes on a laptop CPU)::

    from trprompt_dspy.apps.demo import run_demo
    results = run_demo(backend="hf", baseline_only=True, eval_size=10)
    print(results["baseline_accuracy"])
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

from trprompt_dspy.apps.defaults import DEMO_EVAL_SIZE, DEMO_TRAIN_SIZE
from trprompt_dspy.apps.programs import DEFAULT_PROGRAM
from trprompt_dspy.backends.stack import AUTO, DEFAULT_TARGET_MAX_TOKENS, Backend
from trprompt_dspy.config import DEFAULT_AUTO, DEFAULT_SEED, DEFAULT_SIGNIFICANCE_LEVEL
from trprompt_dspy.models.presets import DEFAULT_TARGET_MODEL

logger = logging.getLogger(__name__)

__all__ = ["run_demo"]



def _evaluate(program: dspy.Module, data: list[dspy.Example], metric: Any, num_threads: int, desc: str
              ) -> tuple[float, list[dict[str, Any]], dict[str, int]]:
    """Accuracy (%), per-question rows and the failed runs by kind, with the library's greedy evaluator.

    ``desc`` names the evaluation on its progress bar and in its failure line (``"held-out evaluation (baseline)"``).

    Not ``dspy.Evaluate``: its straggler logic re-submits the last unfinished examples after 120 s, so an
    example that fails the same way every time (greedy decoding) and takes longer than that is re-submitted
    forever on a slow CPU (seen with Qwen-1.5B on GSM-Hard, 2026-12-01).
    """
    from trprompt_dspy.loop.rollouts import evaluate_program, failure_breakdown

    result = evaluate_program(program, data, metric=metric, num_threads=num_threads, display_progress=True,
                              desc=desc)
    rows = []
    for r in result.rollouts:
        ex = data[r.example_index]
        instruction = " | ".join(str(c.get("instruction") or "") for c in r.instructions) or None
        rows.append({"question": ex.question, "gold": ex.answer, "answer": r.outputs.get("answer"),
                     "instruction": instruction, "correct": bool(float(r.score))})
    return 100.0 * result.score, rows, failure_breakdown(result.rollouts)


def run_demo(*, target: str = DEFAULT_TARGET_MODEL, prompt_model: str = AUTO,
             backend: Backend = "vllm", api_base: str | None = None, api_key: str = "EMPTY",
             max_tokens: int = DEFAULT_TARGET_MAX_TOKENS, num_threads: int | None = None,
             train_size: int = DEMO_TRAIN_SIZE, eval_size: int = DEMO_EVAL_SIZE, auto: str = DEFAULT_AUTO,
             baseline_only: bool = False, runs_dir: str | Path = "runs", seed: int = DEFAULT_SEED,
             program: str = DEFAULT_PROGRAM, seed_with_target: bool | None = None,
             cache: bool = False, dtype: str = "auto",
             significance_level: float | None = DEFAULT_SIGNIFICANCE_LEVEL) -> dict[str, Any]:
    """Run the demo and return its results (also written to ``runs/<timestamp>/``).

    Args:
        target: Preset, HF folder or (with ``backend="api"``) the served model name of the target LM, which
            also plays the textual reward model and TextGrad's engine.
        prompt_model: ``"auto"`` (default: a LoRA adapter on the target's own weights for a local target, the
            single-base mode; SmolLM2-135M for an API target), ``"same"``, or a preset / folder of a separate
            prompt model (fine-tuned with LoRA).
        backend: ``"vllm"`` (start one local vLLM server; the fastest on CPU and GPU), ``"hf"`` (in-process
            transformers) or ``"api"`` (``api_base`` serves the target).
        num_threads: Concurrent requests; ``None`` picks 32 for vLLM, 16 for an API, 8 in-process.
        seed_with_target: Let the target LM write iteration 0's instructions (``seed_lm=``). Default: only
            when the prompt model is a separate small model (the untrained 135M model tends to solve the
            question instead of writing an instruction); in single-base mode the untrained prompt model *is*
            the target, so iteration 0 is the same either way.
        dtype: Weight dtype of the served/in-process models; ``"auto"``: bfloat16 where native, else float32.
        cache: Reuse DSPy's on-disk response cache for the target LM. Off by default so that the wall
            times in the report are real (a re-run would otherwise replay the baseline from the cache).
        significance_level: ``TRPromptOptimizer(significance_level=)``: the sign-test level a trained iteration
            must pass against the plain program on the held-out validation examples (``None``: any lead).

    Raises:
        ValueError: An unknown backend, or ``backend="api"`` without ``api_base``.
    """
    from trprompt_dspy.apps.programs import load_program
    from trprompt_dspy.apps.report import render_report, write_plots
    from trprompt_dspy.backends.stack import ModelStack
    from trprompt_dspy.models.dtype import cpu_info
    from trprompt_dspy.tasks.datasets import load_dataset, load_fixed_split

    stack = ModelStack(target, prompt_model=prompt_model, backend=backend, api_base=api_base, api_key=api_key,
                       max_tokens=max_tokens, num_threads=num_threads, cache=cache, dtype=dtype,
                       need_prompt_model=not baseline_only)  # checks every name before anything starts
    load_program(program)  # fail fast on a bad module:Class before starting servers
    if seed_with_target is None:
        seed_with_target = not stack.single_base

    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(runs_dir) / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    stack.log_dir = out / "servers"
    train = load_dataset("gsm8k", "train", source="bundled", limit=train_size)
    heldout = load_fixed_split("gsm8k", "dev", source="bundled", limit=eval_size)
    results: dict[str, Any] = {"program": program, "target": target,
                               "prompt_model": stack.prompt_model_base if not baseline_only else None,
                               "single_base": stack.single_base, "cpu": cpu_info(), "seed_with_target": seed_with_target,
                               "backend": backend, "cache": cache, "train_size": len(train), "eval_size": len(heldout), "auto": auto,
                               "seed": seed, "significance_level": significance_level,
                               "python": platform.python_version(), "machine": platform.machine(),
                               "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    t0 = time.perf_counter()
    interrupted = False
    with stack:
        timings["start_models"] = time.perf_counter() - t0
        results["servers"] = stack.servers
        results["num_threads"] = stack.num_threads
        try:
            _run_phases(stack, program, train, heldout, auto, seed, seed_with_target, baseline_only, out, results,
                        timings, load_program, significance_level)
        except KeyboardInterrupt:
            interrupted = True
            _quiet_after_interrupt()
            logger.warning("Interrupted: the work in flight is being dropped; stopping the servers next.")
        t0 = time.perf_counter()
    timings["stop_models"] = time.perf_counter() - t0
    if interrupted:
        raise KeyboardInterrupt
    timings["total"] = time.perf_counter() - t_all
    results["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    plots = write_plots(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    report = render_report(results, plots=plots)
    (out / "report.md").write_text(report)
    results["report_path"] = str(out / "report.md")
    return results


def _run_phases(stack: Any, program: str, train: list[dspy.Example], heldout: list[dspy.Example], auto: str,
                seed: int, seed_with_target: bool, baseline_only: bool, out: Path, results: dict[str, Any],
                timings: dict[str, float], load_program: Any, significance_level: float | None) -> None:
    """Baseline eval, compile, compiled eval (each timed) on a started :class:`~trprompt_dspy.backends.stack.ModelStack`."""
    from trprompt_dspy.backends.prompt_model.base import cap_report, instruction_stats
    from trprompt_dspy.tasks.metrics import gsm8k_feedback_metric, gsm8k_metric

    with dspy.context(lm=stack.target_lm):
        t0 = time.perf_counter()
        base_acc, base_rows, base_errors = _evaluate(load_program(program), heldout, gsm8k_metric, stack.num_threads,
                                                     "held-out evaluation (baseline)")
        timings["baseline_eval"] = time.perf_counter() - t0
        results.update(baseline_accuracy=base_acc, baseline_rows=base_rows,
                       errors_by_phase={"held-out evaluation (baseline)": base_errors})
        logger.info("Baseline accuracy: %.1f%% on %d held-out GSM8K dev examples", base_acc, len(heldout))
        if baseline_only:
            return
        from trprompt_dspy.compiled.artifact import save_compiled
        from trprompt_dspy.optimizer import TRPromptOptimizer

        t0 = time.perf_counter()
        opt = TRPromptOptimizer(metric=gsm8k_feedback_metric, auto=auto, num_threads=stack.num_threads,
                                seed=seed, prompt_model=stack.prompt_model,
                                seed_lm=stack.target_lm if seed_with_target else None, log_dir=out / "log_dir",
                                significance_level=significance_level)
        compiled = opt.compile(load_program(program), trainset=train)
        timings["compile"] = time.perf_counter() - t0
        stats = compiled.detailed_results.to_dict()
        for it in stats.get("iterations") or []:
            for phase, secs in (it.get("seconds") or {}).items():
                timings[f"compile.iter{it['iteration']}.{phase}"] = secs
        before = instruction_stats(stack.prompt_model)
        t0 = time.perf_counter()
        comp_acc, comp_rows, comp_errors = _evaluate(compiled, heldout, gsm8k_metric, stack.num_threads,
                                                     "held-out evaluation (compiled)")
        timings["compiled_eval"] = time.perf_counter() - t0
        results["errors_by_phase"]["held-out evaluation (compiled)"] = comp_errors
        capped = cap_report(before, instruction_stats(stack.prompt_model), opt.max_instruction_tokens)
        if capped:
            results["compiled_instructions"] = capped
        save_compiled(compiled, out / "compiled")
        results.update(compiled_accuracy=comp_acc, compiled_rows=comp_rows, compile_stats=stats)
        from trprompt_dspy.apps.decision import decision_summary

        results["decision"] = decision_summary(stats, significance_level=significance_level, target=results["target"])


def _quiet_after_interrupt() -> None:
    """After Ctrl-C, worker threads still finishing their requests must not flood the log with errors."""
    for name in ("dspy", "LiteLLM", "litellm", "httpx", "trprompt_dspy.runtime.faults", "trprompt_dspy.loop.rollouts"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
