"""The main job behind ``make demo`` / ``trprompt demo``.

1. Provision the default models (target/reward: Qwen2.5-Coder-0.5B-Instruct; prompt model: SmolLM2-135M).
2. Start the serving stack: ``backend="vllm"`` starts a vLLM server for the target (and one with LoRA
   enabled for the prompt model); ``"hf"`` runs both in-process with transformers; ``"api"`` uses an
   OpenAI-compatible endpoint you already run (``api_base``) and an in-process prompt model.
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

import contextlib
import json
import logging
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import dspy

logger = logging.getLogger(__name__)

__all__ = ["run_demo", "Backend"]

Backend = Literal["vllm", "hf", "api"]
_BACKENDS = ("vllm", "hf", "api")


@dataclass
class _Stack:
    """The LMs a demo run uses, and the servers behind them (stopped on exit)."""

    lm: Any
    prompt_model: Any
    num_threads: int
    servers: dict[str, dict[str, Any]] = field(default_factory=dict)


@contextlib.contextmanager
def _model_stack(*, backend: str, target: str, prompt_model: str, api_base: str | None, api_key: str,
                 max_tokens: int, num_threads: int | None, need_prompt_model: bool,
                 log_dir: Path, cache: bool = False) -> Iterator[_Stack]:
    from trprompt_dspy.models import local_lm, resolve_model

    if backend == "api":
        if not api_base:
            raise ValueError("backend='api' needs api_base (an OpenAI-compatible URL such as "
                             "http://127.0.0.1:8000/v1); or use backend='vllm' to start a server here.")
        lm = dspy.LM(f"openai/{target}", api_base=api_base, api_key=api_key, temperature=0.0, max_tokens=max_tokens,
                     cache=cache)
        pm = _hf_prompt_model(prompt_model) if need_prompt_model else None
        yield _Stack(lm=lm, prompt_model=pm, num_threads=num_threads or 16)
        return
    if backend == "hf":
        resolve_model(target)
        lm = local_lm(target, max_tokens=max_tokens, temperature=0.0, cache=cache)
        pm = _hf_prompt_model(prompt_model) if need_prompt_model else None
        yield _Stack(lm=lm, prompt_model=pm, num_threads=num_threads or 8)
        return

    from trprompt_dspy.prompt_model.vllm import VLLMPromptModel
    from trprompt_dspy.serving import VLLMServer

    with contextlib.ExitStack() as stack:
        server = stack.enter_context(VLLMServer(target, log_dir=log_dir))
        servers = {"target": _server_info(server)}
        lm = server.dspy_lm(temperature=0.0, max_tokens=max_tokens, cache=cache)
        pm = None
        if need_prompt_model:
            pm_server = stack.enter_context(VLLMServer(prompt_model, enable_lora=True, log_dir=log_dir))
            servers["prompt_model"] = _server_info(pm_server)
            pm = VLLMPromptModel(prompt_model, server=pm_server, max_concurrency=num_threads or 32)
        yield _Stack(lm=lm, prompt_model=pm, num_threads=num_threads or 32, servers=servers)


def _server_info(server: Any) -> dict[str, Any]:
    return {"model": getattr(server, "model_name", None), "base_url": getattr(server, "base_url", None),
            "startup_seconds": round(float(getattr(server, "startup_seconds", 0.0) or 0.0), 1)}


def _hf_prompt_model(name: str) -> Any:
    from trprompt_dspy.models import resolve_model
    from trprompt_dspy.prompt_model.hf import HFPromptModel

    resolve_model(name)
    return HFPromptModel(name)


def _evaluate(program: dspy.Module, data: list[dspy.Example], metric: Any, num_threads: int
              ) -> tuple[float, list[dict[str, Any]]]:
    result = dspy.Evaluate(devset=data, metric=metric, num_threads=num_threads, display_progress=True,
                           max_errors=len(data) + 1, failure_score=0.0)(program)
    rows = []
    for ex, pred, score in result.results:
        rows.append({"question": ex.question, "gold": ex.answer, "answer": getattr(pred, "answer", None),
                     "instruction": getattr(pred, "query_instruction", None), "correct": bool(float(score))})
    return float(result.score), rows


def run_demo(*, target: str = "qwen2.5-coder-0.5b-instruct", prompt_model: str = "smollm2-135m-instruct",
             backend: Backend = "vllm", api_base: str | None = None, api_key: str = "EMPTY",
             max_tokens: int = 512, num_threads: int | None = None, train_size: int = 48, eval_size: int = 40,
             auto: str = "light", baseline_only: bool = False, runs_dir: str | Path = "runs", seed: int = 0,
             program: str = "programs.math:MathCoT", seed_with_target: bool = True,
             cache: bool = False) -> dict[str, Any]:
    """Run the demo and return its results (also written to ``runs/<timestamp>/``).

    Args:
        target: Preset, HF folder or (with ``backend="api"``) the served model name of the target LM, which
            also plays the textual reward model and TextGrad's engine.
        prompt_model: Preset / HF id / folder of the prompt model (fine-tuned with LoRA).
        backend: ``"vllm"`` (start local vLLM servers; the fastest on CPU and GPU), ``"hf"`` (in-process
            transformers) or ``"api"`` (``api_base`` serves the target).
        num_threads: Concurrent requests; ``None`` picks 32 for vLLM, 16 for an API, 8 in-process.
        seed_with_target: Let the target LM write iteration 0's instructions (``seed_lm=``): the untrained
            135M prompt model tends to solve the question instead of writing an instruction.
        cache: Reuse DSPy's on-disk response cache for the target LM. Off by default so that the wall
            times in the report are real (a re-run would otherwise replay the baseline from the cache).

    Raises:
        ValueError: An unknown backend, or ``backend="api"`` without ``api_base``.
    """
    from trprompt_dspy.cli import load_program
    from trprompt_dspy.datasets import load_dataset, load_fixed_split
    from trprompt_dspy.metrics import gsm8k_feedback_metric, gsm8k_metric
    from trprompt_dspy.report import render_report, write_plots

    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}; got {backend!r}.")
    if api_base and backend != "api":
        raise ValueError(f"api_base={api_base!r} is only used with backend='api'; pass backend='api' too.")
    load_program(program)  # fail fast on a bad module:Class before starting servers

    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    out = Path(runs_dir) / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    train = load_dataset("gsm8k", "train", source="bundled", limit=train_size)
    heldout = load_fixed_split("gsm8k", "dev", source="bundled", limit=eval_size)
    results: dict[str, Any] = {"program": program, "target": target, "prompt_model": prompt_model,
                               "backend": backend, "cache": cache, "train_size": len(train), "eval_size": len(heldout), "auto": auto,
                               "seed": seed, "python": platform.python_version(), "machine": platform.machine(),
                               "started_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    t0 = time.perf_counter()
    with _model_stack(backend=backend, target=target, prompt_model=prompt_model, api_base=api_base,
                      api_key=api_key, max_tokens=max_tokens, num_threads=num_threads,
                      need_prompt_model=not baseline_only, log_dir=out / "servers", cache=cache) as stack:
        timings["start_models"] = time.perf_counter() - t0
        results["servers"] = stack.servers
        results["num_threads"] = stack.num_threads
        with dspy.context(lm=stack.lm):
            t0 = time.perf_counter()
            base_acc, base_rows = _evaluate(load_program(program), heldout, gsm8k_metric, stack.num_threads)
            timings["baseline_eval"] = time.perf_counter() - t0
            results.update(baseline_accuracy=base_acc, baseline_rows=base_rows)
            logger.info("Baseline accuracy: %.1f%% on %d held-out GSM8K dev examples", base_acc, len(heldout))
            if not baseline_only:
                from trprompt_dspy.artifact import save_compiled
                from trprompt_dspy.optimizer import TRPromptOptimizer

                t0 = time.perf_counter()
                opt = TRPromptOptimizer(metric=gsm8k_feedback_metric, auto=auto, num_threads=stack.num_threads,
                                        seed=seed, prompt_model=stack.prompt_model,
                                        seed_lm=stack.lm if seed_with_target else None, log_dir=out / "log_dir")
                compiled = opt.compile(load_program(program), trainset=train)
                timings["compile"] = time.perf_counter() - t0
                stats = compiled.detailed_results.to_dict()
                for it in stats.get("iterations") or []:
                    for phase, secs in (it.get("seconds") or {}).items():
                        timings[f"compile.iter{it['iteration']}.{phase}"] = secs
                t0 = time.perf_counter()
                comp_acc, comp_rows = _evaluate(compiled, heldout, gsm8k_metric, stack.num_threads)
                timings["compiled_eval"] = time.perf_counter() - t0
                save_compiled(compiled, out / "compiled")
                results.update(compiled_accuracy=comp_acc, compiled_rows=comp_rows, compile_stats=stats)
        t0 = time.perf_counter()
    timings["stop_models"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all
    results["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    plots = write_plots(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    report = render_report(results, plots=plots)
    (out / "report.md").write_text(report)
    results["report_path"] = str(out / "report.md")
    return results
