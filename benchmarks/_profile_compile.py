"""One small TRPrompt compile with the default model stack, in its own process, for the cost profile.

Run by ``benchmarks/test_cost_profile.py`` as a subprocess so its peak RSS is its own: it loads the
target (in-process HF engine) and the prompt model, warms both with one call, records the peak RSS of
the loaded stack (the baseline), compiles ``MathCoT`` for **one** TRPrompt iteration on bundled GSM8K
examples, records the peak RSS again and the iteration's per-phase wall times, saves the compiled
program with :func:`trprompt_dspy.compiled.artifact.save_compiled` and writes ``profile.json`` to the output folder.

Usage::

    python -m benchmarks._profile_compile OUT_DIR [--target qwen2.5-coder-0.5b-instruct] [--queries 4]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports ``ru_maxrss`` in KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kib / 1024 if sys.platform != "darwin" else kib / 2**20, 1)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--target", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--prompt-model", default="smollm2-135m-instruct")
    p.add_argument("--queries", type=int, default=4, help="queries_per_iteration")
    p.add_argument("--val-size", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--num-threads", type=int, default=4)
    args = p.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    import dspy

    from programs.math import MathCoT
    from trprompt_dspy import TRPromptOptimizer
    from trprompt_dspy.backends.prompt_model.base import InstructionRequest
    from trprompt_dspy.backends.prompt_model.hf import HFPromptModel
    from trprompt_dspy.compiled.artifact import save_compiled
    from trprompt_dspy.models import local_lm
    from trprompt_dspy.tasks.datasets import load_dataset, load_fixed_split
    from trprompt_dspy.tasks.metrics import gsm8k_feedback_metric

    rss_start = peak_rss_mb()
    t0 = time.perf_counter()
    lm = local_lm(args.target, max_tokens=args.max_tokens, temperature=0.0)
    pm = HFPromptModel(args.prompt_model)
    lm("Say OK.")  # load + warm both models
    pm.generate([InstructionRequest("cot.predict", "question -> answer", "question: 1 + 1?", "Correct.")],
                max_new_tokens=8)
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss_mb()

    train = load_dataset("gsm8k", "train", source="bundled", limit=4 * args.queries)
    val = load_fixed_split("gsm8k", "dev", source="bundled", limit=args.val_size)
    opt = TRPromptOptimizer(metric=gsm8k_feedback_metric, prompt_model=pm, seed_lm=lm, num_iterations=1,
                            queries_per_iteration=args.queries, prompts_per_query=2, textgrad_steps=1,
                            textgrad_batch_size=2, val_size=args.val_size, num_threads=args.num_threads, seed=0,
                            log_dir=out / "log_dir", display_progress=False)
    t0 = time.perf_counter()
    with dspy.context(lm=lm):
        compiled = opt.compile(MathCoT(), trainset=train, valset=val)
    compile_s = time.perf_counter() - t0
    rss_compile = peak_rss_mb()
    save_compiled(compiled, out / "compiled")
    res = compiled.detailed_results.to_dict()
    profile = {
        "target": args.target, "prompt_model": args.prompt_model, "queries_per_iteration": args.queries,
        "val_size": args.val_size, "max_tokens": args.max_tokens, "num_threads": args.num_threads,
        "load_s": round(load_s, 2), "compile_s": round(compile_s, 2),
        "iteration_seconds": res["iterations"][0]["seconds"] if res["iterations"] else {},
        "lm_calls": res["lm_calls"], "peak_rss_mb": {"start": rss_start, "stack_loaded": rss_loaded,
                                                      "after_compile": rss_compile},
    }
    (out / "profile.json").write_text(json.dumps(profile, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
