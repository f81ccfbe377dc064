"""Peak memory and wall time of one LoRA SFT run of the prompt model, per placement and gradient checkpointing.

Why: in single-base mode the training copy of the base weights shares the machine with the vLLM server. On a
24 GB machine a TRPrompt compile with the 1.5B died at the start of its second SFT (the comparison's TRPrompt
cell, 2026-12-07): that SFT held longer examples, and every-layer LoRA keeps the activations of all layers
for the backward pass. This measures the training process alone, so the server's share has to be added.

Each configuration runs in a fresh subprocess (peak RSS: ``ru_maxrss``, ``_profile_compile.peak_rss_mb``) on
the same synthetic SFT examples (190-word queries by default, batch 4, one epoch). Ratios
are against every-layer LoRA without checkpointing, measured in the same invocation.

    python -m benchmarks.sft_memory --preset qwen2.5-coder-1.5b-instruct --out sft-memory-qwen1.5b-<date>
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import json, sys, time
from benchmarks._profile_compile import peak_rss_mb
from trprompt_dspy.backends.prompt_model.base import InstructionRequest, SFTExample
from trprompt_dspy.backends.prompt_model.lora_training import train_lora
from trprompt_dspy.config import LoraSettings, SFTSettings
folder, words, n, top, gc, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1", sys.argv[6]
ex = [SFTExample(InstructionRequest(predictor="cot.predict", task="question -> reasoning, answer",
                                   query="question: " + " ".join(f"w{i}" for i in range(words)),
                                   reward="The answer was wrong. " * 20), "Compute step by step.") for _ in range(n)]
t = time.perf_counter()
r = train_lora(folder, ex, output_dir=out, seed=0, lora=LoraSettings(top_layers=None if top == "all" else int(top)),
               sft=SFTSettings(num_train_epochs=1, gradient_checkpointing=gc))
print(json.dumps({"wall_s": round(time.perf_counter() - t, 1), "peak_rss_mb": int(peak_rss_mb()), "steps": r.steps}))
"""


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.compare_optimizers import machine_info
    from trprompt_dspy.models.provision import resolve_model

    p = argparse.ArgumentParser(prog="python -m benchmarks.sft_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--words", type=int, default=190, help="query length in words")
    p.add_argument("--examples", type=int, default=8)
    p.add_argument("--out", default=None, help="result name under benchmarks/results (default: print only)")
    args = p.parse_args(argv)
    folder = str(resolve_model(args.preset))
    rows = []
    for top, gc in (("all", False), ("all", True), ("4", False), ("4", True)):
        work = REPO_ROOT / "runs" / "sft-memory" / f"{top}-gc{int(gc)}"
        proc = subprocess.run([sys.executable, "-c", _CHILD, folder, str(args.words), str(args.examples), top,
                               "1" if gc else "0", str(work)], capture_output=True, text=True, check=False,
                              cwd=REPO_ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"top_layers={top} gradient_checkpointing={gc} failed:\n{proc.stderr[-2000:]}")
        rows.append({"top_layers": top, "gradient_checkpointing": gc, **json.loads(proc.stdout.strip().splitlines()[-1])})
    base = rows[0]
    for r in rows:
        r["peak_rss_ratio"] = round(r["peak_rss_mb"] / base["peak_rss_mb"], 2)
        r["wall_ratio"] = round(r["wall_s"] / base["wall_s"], 2)
    report = {"preset": args.preset, "words": args.words, "examples": args.examples, "batch": 4, "rows": rows,
              "note": "wall_s includes loading the base weights; peak RSS is the training process only",
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine_info()}
    if args.out:
        path = REPO_ROOT / "benchmarks" / "results" / f"{args.out}.json"
        path.write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(json.dumps(rows, indent=1))
    return report


if __name__ == "__main__":
    main()
