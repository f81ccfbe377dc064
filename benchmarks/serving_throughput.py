"""Throughput of a vLLM server started by ``trprompt_dspy.serving``: raw HTTP vs our dspy.LM client path.

Starts one :class:`~trprompt_dspy.serving.VLLMServer` for a preset, records its startup time, then for each
concurrency level sends that many chat requests at once (each forced to ``--max-tokens`` completion tokens
with vLLM's ``ignore_eos``) in two ways:

* **raw**: the ``openai`` client's ``chat.completions.create`` from a thread pool (what vLLM can do);
* **client**: ``dspy.LM("openai/<name>", api_base=...)`` from a thread pool (what the library sees,
  through DSPy and LiteLLM).

It writes ``benchmarks/results/serving-<device>-<date>.json`` with machine facts, per-level tok/s and the
client/raw ratio. Run from the repo root::

    python benchmarks/serving_throughput.py                          # qwen2.5-coder-0.5b-instruct, 1/8/32
    python benchmarks/serving_throughput.py --preset smollm2-135m-instruct --concurrency 1 8 32 64
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

PROMPTS = [
    "Explain step by step how to compute the area of a triangle with base {i} cm and height 7 cm.",
    "Write a short story about a robot who learns to count to {i}.",
    "List the steps to solve {i} * 17 - 4 by hand, one per line.",
    "Describe how a bakery could plan production for {i} customers per day.",
]


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, load, Python and GPU facts."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0))}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().split()
        info["ram_gib"] = round(int(mem[mem.index("MemTotal:") + 1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    info["loadavg_start"] = list(os.getloadavg())
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=False)
        info["gpus"] = [g.strip() for g in out.stdout.splitlines() if g.strip()]
    except (OSError, ValueError):
        info["gpus"] = []
    return info


def _messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": PROMPTS[i % len(PROMPTS)].format(i=i + 3)}]


def run_level(fn, concurrency: int) -> dict[str, Any]:
    """Send ``concurrency`` requests at once through ``fn(i) -> completion tokens``; return the numbers."""
    latencies: list[float] = []

    def one(i: int) -> int:
        t = time.perf_counter()
        n = fn(i)
        latencies.append(time.perf_counter() - t)
        return n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        tokens = sum(pool.map(one, range(concurrency)))
    wall = time.perf_counter() - t0
    return {"requests": concurrency, "completion_tokens": tokens, "wall_s": round(wall, 3),
            "tok_s": round(tokens / wall, 2), "latency_mean_s": round(statistics.mean(latencies), 3),
            "latency_max_s": round(max(latencies), 3)}


def raw_fn(server, max_tokens: int):
    import openai

    client = openai.OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0, timeout=600)

    def fn(i: int) -> int:
        r = client.chat.completions.create(model=server.model_name, messages=_messages(i), max_tokens=max_tokens,
                                           temperature=0.0, extra_body={"ignore_eos": True})
        return int(r.usage.completion_tokens)

    return fn


def client_fn(server, max_tokens: int):
    lm = server.dspy_lm(temperature=0.0, max_tokens=max_tokens, cache=False, num_retries=0,
                        extra_body={"ignore_eos": True})

    def fn(i: int) -> int:
        out = lm.forward(messages=_messages(i))
        usage = getattr(out, "usage", None) or {}
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else getattr(usage, "completion_tokens", 0)
        return int(tokens or 0)

    return fn


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="qwen2.5-coder-0.5b-instruct", help="model preset or folder")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-cache-gb", type=float, default=None)
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--out", default=None, help="output file (default: <out-dir>/serving-<device>-<date>.json)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "LiteLLM", "litellm", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from trprompt_dspy.serving import VLLMServer
    from trprompt_dspy.serving.venv import STAMP_FILE, vllm_venv_dir

    info = machine_info()
    server = VLLMServer(args.preset, device=args.device, max_model_len=args.max_model_len,
                        kv_cache_gb=args.kv_cache_gb, startup_timeout=1200)
    record: dict[str, Any] = {"benchmark": "serving_throughput", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "command": "python benchmarks/serving_throughput.py " + " ".join(argv or sys.argv[1:]),
                              "preset": args.preset, "device": server.device, "max_tokens": args.max_tokens,
                              "max_model_len": args.max_model_len, "machine": info, "levels": []}
    stamp = vllm_venv_dir() / STAMP_FILE
    if stamp.is_file():
        record["vllm"] = json.loads(stamp.read_text())
    with server:
        record["startup_seconds"] = server.startup_seconds
        record["kv_cache_gb"] = server.build_env().get("VLLM_CPU_KVCACHE_SPACE")
        raw, client = raw_fn(server, args.max_tokens), client_fn(server, args.max_tokens)
        raw(0), client(0)  # warm-up (first requests compile/allocate)
        for c in args.concurrency:
            r = run_level(raw, c)
            d = run_level(client, c)
            ratio = round(d["tok_s"] / r["tok_s"], 3) if r["tok_s"] else None
            record["levels"].append({"concurrency": c, "raw": r, "client": d, "client_over_raw": ratio})
            logging.info("concurrency %d: raw %.1f tok/s, client %.1f tok/s (ratio %s)", c, r["tok_s"], d["tok_s"],
                         ratio)
    record["machine"]["loadavg_end"] = list(os.getloadavg())
    out = Path(args.out) if args.out else Path(args.out_dir) / f"serving-{server.device}-{time.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({"startup_seconds": record["startup_seconds"],
                      "levels": [{"c": lv["concurrency"], "raw_tok_s": lv["raw"]["tok_s"],
                                  "client_tok_s": lv["client"]["tok_s"], "ratio": lv["client_over_raw"]}
                                 for lv in record["levels"]]}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
