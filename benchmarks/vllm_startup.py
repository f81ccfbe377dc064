"""vLLM start-up time on this machine: first start, repeated starts, and with extra flags.

Starts :class:`~trprompt_dspy.serving.VLLMServer` for a preset several times in a row (each stopped before
the next) and records the seconds from process start to the first answer of ``/v1/models``, plus where the
time goes, read from the server log: Python imports of the API server, engine core and worker processes,
weight loading, and engine init (profile, KV cache, warm-up). Variants add flags, e.g. ``--enforce-eager``.

    python -m benchmarks.vllm_startup --preset qwen2.5-coder-0.5b-instruct --repeats 2 \\
        --variant "" --variant "--enforce-eager" --out vllm-startup-cpu-<date>

Writes ``benchmarks/results/<out>.json``. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"
_STAMP = re.compile(r"(\d\d-\d\d \d\d:\d\d:\d\d)")
_MARKS = {"api_server_up": "non-default args", "engine_core_start": "Initializing a V1 LLM engine",
          "weights_loaded": "Loading weights took", "engine_ready": "init engine (profile, create kv cache",
          "routes_up": "Starting vLLM API server"}


def _phases(log: Path, started_wall: float) -> dict[str, Any]:
    """Seconds after launch at which each marker line appears in the server log (1 s resolution)."""
    out: dict[str, Any] = {}
    year = datetime.fromtimestamp(started_wall).year
    for line in log.read_text(errors="replace").splitlines():
        for key, needle in _MARKS.items():
            if key in out or needle not in line:
                continue
            m = _STAMP.search(line)
            if m:
                t = datetime.strptime(f"{year}-{m.group(1)}", "%Y-%m-%d %H:%M:%S").timestamp()
                out[key] = round(t - started_wall, 1)
        m = re.search(r"Loading weights took ([\d.]+) seconds", line)
        if m:
            out["weights_load_s"] = float(m.group(1))
        m = re.search(r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s", line)
        if m:
            out["engine_init_s"] = float(m.group(1))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variant", action="append", default=None,
                        help="extra api_server flags as one string (repeatable; '' is the default command)")
    parser.add_argument("--enable-lora", action="store_true", default=True)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from trprompt_dspy.models.dtype import cpu_info
    from trprompt_dspy.serving import VLLMServer

    variants = args.variant if args.variant is not None else ["", "--enforce-eager"]
    stamp = datetime.now(timezone.utc)
    rec: dict[str, Any] = {"preset": args.preset, "cpu": cpu_info(), "started_utc": stamp.isoformat(timespec="seconds"),
                           "lora": args.enable_lora, "runs": [],
                           "command": "python -m benchmarks.vllm_startup " + " ".join(
                               shlex.quote(a) for a in (argv or sys.argv[1:]))}
    logs = REPO / "runs" / "vllm-startup"
    for variant in variants:
        for i in range(args.repeats):
            server = VLLMServer(args.preset, enable_lora=args.enable_lora, extra_args=shlex.split(variant),
                                log_dir=logs)
            wall = time.time()
            with server:
                run = {"variant": variant or "(default)", "repeat": i, "startup_s": server.startup_seconds,
                       "dtype": server.resolved_dtype, **_phases(Path(server.log_path), wall)}
            rec["runs"].append(run)
            logging.info("%s", run)
            time.sleep(2)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = args.out or f"vllm-startup-cpu-{stamp:%Y-%m-%d}"
    (RESULTS / f"{out}.json").write_text(json.dumps(rec, indent=2))
    print(json.dumps(rec, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    raise SystemExit(main())
