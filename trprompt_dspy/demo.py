"""The main job behind ``make demo`` / ``trprompt demo``.

1. Provision the default model (Qwen2.5-Coder-0.5B-Instruct in every role).
2. Start the serving stack (:class:`~trprompt_dspy.stack.ModelStack`): ``backend="vllm"`` starts **one**
   vLLM server with LoRA enabled; the target, the textual reward model and TextGrad use its base weights
   and the prompt model is a LoRA adapter on them (single-base mode, ``prompt_model="auto"``). ``"hf"``
   runs in-process with transformers; ``"api"`` uses an OpenAI-compatible endpoint you already run
   (``api_base``) and a separate in-process prompt model.
3. Evaluate the zero-shot CoT program (``programs.math:MathCoT``) on held-out GSM8K dev examples.
4. Compile it with ``TRPromptOptimizer(auto=...)`` on a GSM8K training subset.
5. Evaluate the compiled program on the same held-out examples.
6. Write ``runs/<timestamp>/report.md`` + ``results.json`` + PNG plots, print the table, stop the servers.

The data come from the GSM8K subset bundled with the package (MIT), so the demo needs no download
beyond the model packages.

Example (the in-process stack, baseline only; minutes on a laptop CPU)::

    from trprompt_dspy.demo import run_demo
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
from typing import Any, Literal

import dspy

from trprompt_dspy.models.presets import DEFAULT_TARGET_MODEL

logger = logging.getLogger(__name__)

__all__ = ["run_demo", "Backend"]

Backend = Literal["vllm", "hf", "api"]


def _evaluate(program: dspy.Module, data: list[dspy.Example], metric: Any, num_threads: int
              ) -> tuple[float, list[dict[str, Any]]]:
    result = dspy.Evaluate(devset=data, metric=metric, num_threads=num_threads, display_progress=True,
                           max_errors=len(data) + 1, failure_score=0.0)(program)
    rows = []
    for ex, pred, score in result.results:
        rows.append({"question": ex.question, "gold": ex.answer, "answer": getattr(pred, "answer", None),
                     "instruction": getattr(pred, "query_instruction", None), "correct": bool(float(score))})
    return float(result.score), rows


def run_demo(*, target: str = DEFAULT_TARGET_MODEL, prompt_model: str = "auto",
             backend: Backend = "vllm", api_base: str | None = None, api_key: str = "EMPTY",
             max_tokens: int = 512, num_threads: int | None = None, train_size: int = 48, eval_size: int = 40,
             auto: str = "light", baseline_only: bool = False, runs_dir: str | Path = "runs", seed: int = 0,
             program: str = "programs.math:MathCoT", seed_with_target: bool | None = None,
             cache: bool = False, dtype: str = "auto") -> dict[str, Any]:
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

    Raises:
        ValueError: An unknown backend, or ``backend="api"`` without ``api_base``.
    """
    from trprompt_dspy.cli import load_program
    from trprompt_dspy.datasets import load_dataset, load_fixed_split
    from trprompt_dspy.models.dtype import cpu_info
    from trprompt_dspy.report import render_report, write_plots
    from trprompt_dspy.stack import ModelStack

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
                               "seed": seed, "python": platform.python_version(), "machine": platform.machine(),
                               "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    t0 = time.perf_counter()
    interrupted = False
    with stack:
        timings["start_models"] = time.perf_counter() - t0
        results["servers"] = stack.servers
        results["num_threads"] = stack.num_threads
        try:
            _run_phases(stack, program, train, heldout, auto, seed, seed_with_target, baseline_only, out, results,
                        timings, load_program)
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
                timings: dict[str, float], load_program: Any) -> None:
    """Baseline eval, compile, compiled eval (each timed) on a started :class:`~trprompt_dspy.stack.ModelStack`."""
    from trprompt_dspy.metrics import gsm8k_feedback_metric, gsm8k_metric
    from trprompt_dspy.prompt_model.base import cap_report, instruction_stats

    with dspy.context(lm=stack.target_lm):
        t0 = time.perf_counter()
        base_acc, base_rows = _evaluate(load_program(program), heldout, gsm8k_metric, stack.num_threads)
        timings["baseline_eval"] = time.perf_counter() - t0
        results.update(baseline_accuracy=base_acc, baseline_rows=base_rows)
        logger.info("Baseline accuracy: %.1f%% on %d held-out GSM8K dev examples", base_acc, len(heldout))
        if baseline_only:
            return
        from trprompt_dspy.artifact import save_compiled
        from trprompt_dspy.optimizer import TRPromptOptimizer

        t0 = time.perf_counter()
        opt = TRPromptOptimizer(metric=gsm8k_feedback_metric, auto=auto, num_threads=stack.num_threads,
                                seed=seed, prompt_model=stack.prompt_model,
                                seed_lm=stack.target_lm if seed_with_target else None, log_dir=out / "log_dir")
        compiled = opt.compile(load_program(program), trainset=train)
        timings["compile"] = time.perf_counter() - t0
        stats = compiled.detailed_results.to_dict()
        for it in stats.get("iterations") or []:
            for phase, secs in (it.get("seconds") or {}).items():
                timings[f"compile.iter{it['iteration']}.{phase}"] = secs
        before = instruction_stats(stack.prompt_model)
        t0 = time.perf_counter()
        comp_acc, comp_rows = _evaluate(compiled, heldout, gsm8k_metric, stack.num_threads)
        timings["compiled_eval"] = time.perf_counter() - t0
        capped = cap_report(before, instruction_stats(stack.prompt_model), opt.max_instruction_tokens)
        if capped:
            results["compiled_instructions"] = capped
        save_compiled(compiled, out / "compiled")
        results.update(compiled_accuracy=comp_acc, compiled_rows=comp_rows, compile_stats=stats)


def _quiet_after_interrupt() -> None:
    """After Ctrl-C, worker threads still finishing their requests must not flood the log with errors."""
    for name in ("dspy", "LiteLLM", "litellm", "httpx", "trprompt_dspy.faults", "trprompt_dspy.rollouts"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
