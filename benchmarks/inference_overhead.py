"""Inference overhead of a TRPrompt-compiled program against the plain one, on the real serving setup.

Both programs run on **one** vLLM server started by :class:`~trprompt_dspy.backends.stack.ModelStack` in
single-base mode (the target's base weights with LoRA enabled; the compiled program's prompt model is an
adapter on them, loaded at run time), on the same GSM8K dev questions, at each concurrency level. For
each (program, concurrency) cell it records wall time, target-LM calls, prompt/completion tokens per
question, the prompt model's calls and tokens per question, and the share of instructions that hit the
token cap; then the compiled/plain ratios of the same run. The CPU model and its bf16 flags are recorded
(the ratio and the absolute numbers depend on them). Run it alone on the machine.

The compiled program is a saved artifact (``--compiled runs/<demo>/compiled``: a trained adapter) or,
without one, the untrained single-base writer (the base weights write each instruction; the cost is the
same kind: one short generation per predictor call).

    python -m benchmarks.inference_overhead --compiled runs/<stamp>/compiled --n 40 --concurrency 16 1 \\
        --out overhead-vllm-qwen0.5b-<date>

Writes ``benchmarks/results/<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

logger = logging.getLogger("benchmarks.inference_overhead")
RESULTS = REPO / "benchmarks" / "results"


def _run_cell(program: Any, data: list[Any], lm: Any, threads: int, pm: Any) -> dict[str, Any]:
    import dspy

    from trprompt_dspy.backends.prompt_model.base import instruction_stats
    from trprompt_dspy.runtime.usage import UsageMeter
    from trprompt_dspy.tasks.metrics import gsm8k_metric

    meter = UsageMeter()
    meter.assign(lm, "target")
    before = instruction_stats(pm) if pm is not None else None
    seen = len(lm.history)
    with dspy.context(lm=lm, callbacks=[meter.callback("other")]):
        t0 = time.perf_counter()
        result = dspy.Evaluate(devset=data, metric=gsm8k_metric, num_threads=threads, display_progress=False,
                               max_errors=len(data) + 1, failure_score=0.0)(program)
        wall = time.perf_counter() - t0
    usage = [entry.get("usage") or {} for entry in lm.history[seen:]]  # the target LM's own call records
    prompt_tok = sum(int(u.get("prompt_tokens") or 0) for u in usage)
    completion_tok = sum(int(u.get("completion_tokens") or 0) for u in usage)
    n = len(data)
    calls = meter.snapshot()["calls"]
    cell: dict[str, Any] = {
        "questions": n, "wall_s": round(wall, 1), "s_per_question": round(wall / n, 2),
        "accuracy": round(float(result.score), 1), "target_calls_per_question": round(calls.get("target", 0) / n, 3),
        "target_prompt_tokens_per_question": round(prompt_tok / n, 1),
        "target_completion_tokens_per_question": round(completion_tok / n, 1),
        "instructions": [getattr(pred, "query_instruction", None) for _, pred, _ in result.results][:5],
    }
    if before is not None:
        after = instruction_stats(pm)
        made = after["instructions"] - before["instructions"]
        cell.update({
            "prompt_model_calls_per_question": round(made / n, 3),
            "prompt_model_prompt_tokens_per_question": round((after["prompt_tokens"] - before["prompt_tokens"]) / n, 1),
            "prompt_model_completion_tokens_per_question":
                round((after["completion_tokens"] - before["completion_tokens"]) / n, 1),
            "instructions_hit_cap": after["hit_cap"] - before["hit_cap"],
            "instructions_hit_cap_rate": round((after["hit_cap"] - before["hit_cap"]) / made, 4) if made else 0.0,
        })
    return cell


def _render(rec: dict[str, Any]) -> str:
    cpu = rec["cpu"]
    lines = [f"# Inference overhead: TRPrompt-compiled vs plain program ({rec['target']}, one vLLM server)", "",
             f"Run {rec['started_utc']}; CPU {cpu['model']} ({cpu['cores']} cores; native bf16: "
             f"{cpu['native_bf16']}; flags {', '.join(cpu['flags']) or 'none'}); server dtype {rec['server']['dtype']}, "
             f"start {rec['server']['startup_seconds']} s; {rec['n']} GSM8K dev questions; compiled program: "
             f"{rec['compiled_source']}.", "",
             "| concurrency | program | wall s | s/question | acc % | target calls/q | target prompt tok/q "
             "| target completion tok/q | prompt-model calls/q | prompt-model tok/q (in/out) | capped instructions |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for level in rec["levels"]:
        for name in ("plain", "compiled"):
            c = level[name]
            pm = (f"{c.get('prompt_model_calls_per_question', 0)} | {c.get('prompt_model_prompt_tokens_per_question', 0)}"
                  f" / {c.get('prompt_model_completion_tokens_per_question', 0)} | "
                  f"{c.get('instructions_hit_cap', 0)} ({100 * c.get('instructions_hit_cap_rate', 0):.1f} %)"
                  if name == "compiled" else "0 | - | -")
            lines.append(f"| {level['concurrency']} | {name} | {c['wall_s']} | {c['s_per_question']} | {c['accuracy']} | "
                         f"{c['target_calls_per_question']} | {c['target_prompt_tokens_per_question']} | "
                         f"{c['target_completion_tokens_per_question']} | {pm} |")
    lines += ["", "| concurrency | wall-time ratio compiled/plain | target prompt-token ratio | all generated tokens ratio |",
              "| --- | --- | --- | --- |"]
    for level in rec["levels"]:
        r = level["ratios"]
        lines.append(f"| {level['concurrency']} | **{r['wall']:.2f}x** | {r['target_prompt_tokens']:.2f}x | "
                     f"{r['generated_tokens']:.2f}x |")
    lines += ["", "Reproduce: `" + rec["command"] + "`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--compiled", default=None, help="a save_compiled folder (e.g. a demo run's compiled/)")
    parser.add_argument("--program", default="programs.math:MathCoT")
    parser.add_argument("--n", type=int, default=40, help="GSM8K dev questions (fixed split, bundled)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 1])
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--out", default=None, help="result name (default overhead-vllm-<target>-<date>)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("httpx", "LiteLLM", "litellm", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from trprompt_dspy.apps.programs import load_program
    from trprompt_dspy.backends.prompt_model.pinned import PinnedPromptModel
    from trprompt_dspy.backends.stack import ModelStack
    from trprompt_dspy.compiled.artifact import load_compiled
    from trprompt_dspy.compiled.program import install_query_aware
    from trprompt_dspy.models.dtype import cpu_info
    from trprompt_dspy.optimizer import DEFAULT_INITIAL_REWARD
    from trprompt_dspy.tasks.datasets import load_fixed_split

    data = load_fixed_split("gsm8k", "dev", source="bundled", limit=args.n)
    stamp = datetime.now(timezone.utc)
    out = args.out or f"overhead-vllm-{args.target.split('-instruct')[0]}-{stamp:%Y-%m-%d}"
    rec: dict[str, Any] = {"target": args.target, "n": len(data), "cpu": cpu_info(), "python": platform.python_version(),
                           "started_utc": stamp.isoformat(timespec="seconds"), "levels": [],
                           "command": "python -m benchmarks.inference_overhead " + " ".join(argv or sys.argv[1:])}
    stack = ModelStack(args.target, max_tokens=args.max_tokens, num_threads=max(args.concurrency),
                       log_dir=REPO / "runs" / "overhead-servers")
    with stack:
        rec["server"] = stack.servers["target"]
        if args.compiled:
            compiled = load_compiled(load_program(args.program), args.compiled,
                                     prompt_model_factory=stack.prompt_model_for)
            rec["compiled_source"] = f"trained artifact {Path(args.compiled).name} (adapter loaded at run time)"
        else:
            compiled = install_query_aware(load_program(args.program), prompt_model=PinnedPromptModel(
                stack.prompt_model, None), optimal_reward=DEFAULT_INITIAL_REWARD)
            rec["compiled_source"] = "untrained single-base writer (base weights, initial t*)"
        pm = next(p.prompt_model for _, p in compiled.named_predictors() if getattr(p, "prompt_model", None))
        warm = load_fixed_split("gsm8k", "train", source="bundled", limit=2)
        _run_cell(compiled, warm, stack.target_lm, 2, pm)  # warm-up: adapter load, first-request compile
        for level in args.concurrency:
            logger.info("concurrency %d: plain program", level)
            plain = _run_cell(load_program(args.program), data, stack.target_lm, level, None)
            logger.info("concurrency %d: plain %.1f s; compiled program", level, plain["wall_s"])
            comp = _run_cell(compiled, data, stack.target_lm, level, pm)
            logger.info("concurrency %d: compiled %.1f s (%.2fx)", level, comp["wall_s"], comp["wall_s"] / plain["wall_s"])
            gen_plain = plain["target_completion_tokens_per_question"]
            gen_comp = comp["target_completion_tokens_per_question"] + comp.get(
                "prompt_model_completion_tokens_per_question", 0)
            rec["levels"].append({"concurrency": level, "plain": plain, "compiled": comp, "ratios": {
                "wall": round(comp["wall_s"] / plain["wall_s"], 3),
                "target_prompt_tokens": round(comp["target_prompt_tokens_per_question"]
                                              / max(1e-9, plain["target_prompt_tokens_per_question"]), 3),
                "generated_tokens": round(gen_comp / max(1e-9, gen_plain), 3)}})
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / f"{out}.json").write_text(json.dumps(rec, indent=2, default=str))  # a finished level is kept
    (RESULTS / f"{out}.md").write_text(_render(rec))
    print(_render(rec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
