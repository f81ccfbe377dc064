"""A < 5 minute check of the vLLM serving stack on a machine with an NVIDIA GPU.

Steps (each timed; the JSON summary goes to ``benchmarks/results/gpu-check-<date>.json``):

1. Create the GPU vLLM venv if needed (``trprompt serve --install-only --device gpu``: plain ``vllm``;
   several GB on first use, not counted in the 5 minutes).
2. Start a vLLM server for the target (default ``qwen2.5-coder-0.5b-instruct``) and measure throughput
   at 1/8/32 concurrent requests, raw and through ``dspy.LM`` (the same code as ``serving_throughput.py``).
3. One TRPromptOptimizer compile iteration with a tiny budget: the target served by step 2's server,
   the prompt model (SmolLM2) served by a second vLLM server with LoRA (``VLLMPromptModel``), trained
   with TRL on the GPU and loaded into the server at run time.

Both servers share the GPU, so each gets a slice of its memory (``--gpu-memory-utilization``). Run from
the repo root after ``make models``::

    python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --target qwen2.5-coder-1.5b-instruct --gpu-share 0.4
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for p in (str(REPO), str(REPO / "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--prompt-model", default="smollm2-135m-instruct")
    ap.add_argument("--gpu-share", type=float, default=0.35, help="GPU memory fraction per server")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "LiteLLM", "litellm", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import dspy
    from serving_throughput import client_fn, machine_info, raw_fn, run_level

    from trprompt_dspy.serving import VLLMServer, detect_device, install_vllm_venv

    if detect_device() != "gpu":
        print("gpu_check: no nvidia-smi on PATH; this check is for GPU machines "
              "(use benchmarks/serving_throughput.py on CPU).", file=sys.stderr)
        return 2
    report: dict[str, Any] = {"check": "gpu_check", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "machine": machine_info(), "target": args.target, "prompt_model": args.prompt_model}
    t = time.perf_counter()
    python = install_vllm_venv(device="gpu")
    report["venv_seconds"] = round(time.perf_counter() - t, 1)
    t_all = time.perf_counter()
    share = ["--gpu-memory-utilization", str(args.gpu_share)]
    work = Path(tempfile.mkdtemp(prefix="trprompt_gpu_check_"))
    try:
        with VLLMServer(args.target, device="gpu", python=python, extra_args=share, max_model_len=4096,
                        log_dir=work / "logs") as target:
            report["target_startup_seconds"] = target.startup_seconds
            raw, client = raw_fn(target, 128), client_fn(target, 128)
            raw(0), client(0)
            report["levels"] = []
            for c in args.concurrency:
                r, d = run_level(raw, c), run_level(client, c)
                report["levels"].append({"concurrency": c, "raw_tok_s": r["tok_s"], "client_tok_s": d["tok_s"],
                                         "client_over_raw": round(d["tok_s"] / r["tok_s"], 3) if r["tok_s"] else None})
                logging.info("c=%d raw %.0f tok/s, client %.0f tok/s", c, r["tok_s"], d["tok_s"])
            if not args.skip_compile:
                report["compile"] = _compile_once(target, args.prompt_model, python, share, work, dspy)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["total_seconds"] = round(time.perf_counter() - t_all, 1)
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"gpu-check-{time.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=1))
    print(f"wrote {out}")
    return 0


def _compile_once(target: Any, prompt_model: str, python: Path, share: list[str], work: Path,
                  dspy: Any) -> dict[str, Any]:
    """One TRPrompt iteration (4 queries x 2 prompts, no TextGrad, 4 validation examples)."""
    from programs.math import MathCoT
    from trprompt_dspy.backends.prompt_model.vllm import VLLMPromptModel
    from trprompt_dspy.optimizer import TRPromptOptimizer
    from trprompt_dspy.serving import VLLMServer
    from trprompt_dspy.tasks.datasets import load_fixed_split
    from trprompt_dspy.tasks.metrics import get_metric

    t0 = time.perf_counter()
    train = load_fixed_split("gsm8k", "train", source="bundled", limit=8)
    val = load_fixed_split("gsm8k", "dev", source="bundled", limit=4)
    with VLLMServer(prompt_model, device="gpu", python=python, enable_lora=True, extra_args=share,
                    log_dir=work / "logs") as pm_server:
        pm = VLLMPromptModel(prompt_model, server=pm_server)
        opt = TRPromptOptimizer(metric=get_metric("gsm8k", feedback=True), prompt_model=pm, num_iterations=1,
                                queries_per_iteration=4, prompts_per_query=2, textgrad_steps=0, val_size=4,
                                num_threads=16, seed=0, log_dir=str(work / "compile"))
        with dspy.context(lm=target.dspy_lm(temperature=0.0, max_tokens=384)):
            compiled = opt.compile(MathCoT(), trainset=train, valset=val)
        res = compiled.detailed_results
        return {"seconds": round(time.perf_counter() - t0, 1), "pm_startup_seconds": pm_server.startup_seconds,
                "baseline_score": res.baseline_score, "best_score": res.best_score,
                "adapter_loaded": pm.active_model, "prompt_model": pm.describe()}


if __name__ == "__main__":
    raise SystemExit(main())
