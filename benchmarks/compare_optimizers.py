"""TRPrompt against DSPy's optimizers on the same program, target LM, data and target-LM call budget.

For every dataset, seed and contender (zero-shot CoT, LabeledFewShot, BootstrapFewShot, COPRO,
MIPROv2, SIMBA, GEPA, TRPrompt) this compiles the program on the training pool (dev examples for
selection where the optimizer takes a valset), evaluates it on the fixed test indices of
``splits.json``, and records accuracy, per-example correctness, the calls and tokens the target model
served during compile (counted by a wrapper LM, see ``benchmarks/_budget.py``) and wall times.

Budget (``--budget-calls``):

* ``trprompt`` (default): TRPrompt runs first with ``auto="light"``; its *measured* compile calls on
  the target model become the budget of every other contender in that (dataset, seed).
* a number ``N``: every contender (TRPrompt included) is sized to ``N`` calls.
* ``native``: each optimizer runs its own light preset or DSPy's defaults; calls are only reported.

How each optimizer is sized is in ``benchmarks/_contenders.py``; optimizers that cannot spend the
budget (zero-shot, LabeledFewShot, BootstrapFewShot) report what they actually used. In ``native`` mode
``--cap-calls N`` sizes only the contenders whose own preset is predicted to exceed ``N`` (SIMBA's
defaults cost thousands of calls) to ``N``, and says so in the cell's plan note. ``--cap-calls-for NAME=N``
caps one contender alone (e.g. ``mipro=400`` when its light preset does not fit the time a machine has left);
the cell records that cap, and ``--resume`` reruns a finished cell whose recorded cap differs.

**Stacked TRPrompt** (``trprompt_stacked``): TRPrompt compiled on the program another contender produced,
its demos and instructions kept. The base is the finished non-TRPrompt contender of the same dataset and
seed with the highest *dev* accuracy (``--dev-eval`` evaluates every compiled program on the dev split;
ties go to the contender listed first, the cheaper one) or the one ``--stack-on`` names; the test split
never chooses it. Each compiled non-TRPrompt program is saved as DSPy JSON state under
``<name>.programs/`` so the stacked cell (and a reader) can load it.

**Single-base TRPrompt**: ``--serve PRESET --prompt-model same`` starts one vLLM server with LoRA through
:class:`~trprompt_dspy.backends.stack.ModelStack`; the target, the optimizers' proposer / reflection /
reward / TextGrad calls and TRPrompt's prompt model (a LoRA adapter on the same weights) all use it.

Outputs, under ``--results-dir`` (default ``benchmarks/results``): ``<name>.json`` (settings, machine,
versions, every cell with per-example correctness, summary rows, significance tests), ``<name>.md``
(tables) and ``<name>.png`` (accuracy vs calls). ``<name>.cells.jsonl`` holds finished cells as they
complete; ``--resume`` skips them, and continues a TRPrompt cell whose compile was killed from its checkpoints
(``benchmarks/_attempts.py``: the calls and wall time of every attempt are added up, each attempt's CPU kept).

Examples::

    # tiny smoke run on the in-process HF target (CPU)
    python -m benchmarks.compare_optimizers --dataset gsm8k --test-size 10 --train-size 20 --dev-size 10 \\
        --seeds 0 --optimizers zeroshot labeled bootstrap --out compare-smoke
    # the 1.5B comparison: one server for every role, single-base TRPrompt, SIMBA capped, stacked TRPrompt
    python -m benchmarks.compare_optimizers --serve qwen2.5-coder-1.5b-instruct --prompt-model same \\
        --dataset gsmhard --seeds 0 --train-size 200 --dev-size 50 --test-size 200 --budget-calls native \\
        --cap-calls 700 --dev-eval --num-threads 32 --max-tokens 768 --resume \\
        --optimizers zeroshot bootstrap mipro gepa simba trprompt trprompt_stacked --out compare-vllm-qwen1.5b-DATE
    # against a vLLM server (any OpenAI-compatible endpoint)
    python -m benchmarks.compare_optimizers --api-base http://127.0.0.1:8000/v1 \\
        --model Qwen/Qwen2.5-Coder-0.5B-Instruct --dataset gsm8k --dataset gsmhard --dataset math500 --seeds 0 1
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import logging
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo root importable (benchmarks, programs)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dspy  # noqa: E402

from benchmarks._attempts import ATTEMPTS_FILE, CompileAttempts  # noqa: E402
from benchmarks._budget import CallMeter, counting_lm  # noqa: E402
from benchmarks._contenders import (  # noqa: E402
    CONTENDERS,
    DETERMINISTIC,
    TRPROMPT_CONTENDERS,
    CompileInput,
    PlanInput,
    compile_contender,
    plan_contender,
)
from benchmarks._report import (  # noqa: E402
    markdown_report,
    pairwise_tests,
    plot_accuracy_vs_calls,
    significance,
    summarize,
)

logger = logging.getLogger("benchmarks.compare_optimizers")

__all__ = ["main", "build_parser", "run_comparison", "load_benchmark_data"]

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASETS = {"gsm8k": "gsm8k", "gsmhard": "gsmhard", "math500": "math"}  # CLI name -> splits.json name
_CALC_RE = re.compile(r"<<[^>]*>>")


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------


def load_benchmark_data(dataset: str, *, train_size: int, dev_size: int, test_size: int,
                        data_dir: str | None = None, source: str = "auto") -> dict[str, list[dspy.Example]]:
    """Train (a ``Random(0)`` sample of the train pool), dev and test (first ``n`` fixed indices).

    Training examples get a ``reasoning`` field from the gold solution (GSM8K calculator annotations
    removed), so labeled demos are complete chain-of-thought demos.
    """
    from trprompt_dspy.tasks.datasets import load_fixed_split

    if dataset not in DATASETS:
        raise ValueError(f"Unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}.")
    name = DATASETS[dataset]
    pool = load_fixed_split(name, "train", source=source, data_dir=data_dir)
    rng = random.Random(0)
    train = rng.sample(pool, min(train_size, len(pool)))
    train = [ex.copy(reasoning=_CALC_RE.sub("", ex.gold_reasoning)) if ex.get("gold_reasoning") else ex
             for ex in train]
    train = [ex.with_inputs("question") for ex in train]
    dev = load_fixed_split(name, "dev", source=source, data_dir=data_dir, limit=dev_size)
    test = load_fixed_split(name, "test", source=source, data_dir=data_dir, limit=test_size)
    return {"train": train, "dev": dev, "test": test}


# ---------------------------------------------------------------------------------------------------
# Models and environment
# ---------------------------------------------------------------------------------------------------


def _program_spec(spec: str) -> str:
    if ":" not in spec:
        raise SystemExit(f"--program must look like 'module:Class' (e.g. math:MathCoT); got {spec!r}.")
    mod, cls = spec.split(":", 1)
    return f"programs.{mod}:{cls}" if "." not in mod and mod in {"math"} else spec


def build_lm(*, model: str | None, api_base: str | None, api_key: str, max_tokens: int,
             temperature: float) -> dspy.BaseLM:
    """An OpenAI-compatible client (``api_base``) or the in-process HF engine for a preset / path."""
    if api_base:
        if not model:
            raise SystemExit("--api-base needs --model (the model name the server serves).")
        name = model if "/" in model and model.split("/", 1)[0] in {"openai", "hosted_vllm"} else f"openai/{model}"
        return dspy.LM(name, api_base=api_base, api_key=api_key, max_tokens=max_tokens, temperature=temperature,
                       cache=False)
    from trprompt_dspy.models import local_lm

    return local_lm(model, max_tokens=max_tokens, temperature=temperature, cache=False)


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """Platform, CPU, memory, accelerator, package versions and the git commit."""
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        info["memory_gb"] = None
    gpu: Any = None
    torch = sys.modules.get("torch")  # only when already loaded (the in-process engine); never imported here
    if torch is not None:
        try:
            if torch.cuda.is_available():
                gpu = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        except Exception as exc:  # noqa: BLE001 - informational only
            gpu = f"unknown ({type(exc).__name__})"
    if gpu is None and shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip()
            gpu = [line.strip() for line in out.splitlines() if line.strip()] or None
        except (OSError, subprocess.SubprocessError):
            gpu = None
    info["gpu"] = gpu
    info["versions"] = {d: _version(d) for d in ("trprompt-dspy", "dspy", "gepa", "textgrad", "torch", "transformers",
                                                  "peft", "trl", "vllm", "optuna", "litellm", "matplotlib")}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        info["git"] = {"commit": commit or None, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        info["git"] = None
    from trprompt_dspy.models.dtype import cpu_info

    info["cpu"] = cpu_info()  # model name and the AVX/AMX flags: bf16 speed differs 4x between machines of one kind
    bf16 = "native bf16" if info["cpu"].get("native_bf16") else "no native bf16"
    info["summary"] = (f"{info['cpu'].get('model') or info['processor']} ({bf16}), {info['cpu_count']} CPUs, "
                       f"{info['memory_gb']} GB RAM, "
                       f"GPU: {gpu or 'none'}, Python {info['python']}")
    return info


# ---------------------------------------------------------------------------------------------------
# One cell
# ---------------------------------------------------------------------------------------------------


def evaluate_program(program: dspy.Module, test: list[dspy.Example], metric: Any, num_threads: int
                     ) -> tuple[float, list[dict[str, Any]]]:
    """Accuracy and per-example outcomes (``idx``, ``correct``, the predicted ``answer``) on ``test``."""
    result = dspy.Evaluate(devset=test, metric=metric, num_threads=num_threads, display_progress=False,
                           max_errors=len(test) + 1, failure_score=0.0, provide_traceback=False)(program)
    rows = []
    for ex, pred, score in result.results:
        answer = getattr(pred, "answer", None) if pred is not None else None
        rows.append({"idx": ex.get("idx"), "correct": int(bool(float(score))),
                     "answer": None if answer is None else str(answer)[:200]})
    accuracy = sum(r["correct"] for r in rows) / len(rows) if rows else 0.0
    return accuracy, rows


def _record_cpu(program_path: Path, cpu: dict[str, Any]) -> None:
    """Add the CPU the program was compiled on to its saved DSPy state (``metadata.cpu``; ``load`` ignores it)."""
    state = json.loads(program_path.read_text(encoding="utf-8"))
    state.setdefault("metadata", {})["cpu"] = cpu
    program_path.write_text(json.dumps(state, indent=2), encoding="utf-8")


def _pm_stats(prompt_model: Any) -> dict[str, int] | None:
    """The prompt model's instruction counters (``None`` for a name or a backend that keeps none)."""
    from trprompt_dspy.backends.prompt_model.base import instruction_stats

    return None if isinstance(prompt_model, str) else instruction_stats(prompt_model)


def _pm_delta(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, int] | None:
    if before is None or after is None:
        return None
    return {k: int(after.get(k, 0)) - int(before.get(k, 0)) for k in after}


def _optimizer_stats(compiled: Any) -> dict[str, Any] | None:
    """TRPrompt's own record of the compile: calls, selection (what ``compile`` returned and why), iterations
    (with what each iteration's instructions did against the student's answers and what became of the reward
    LM's critiques)."""
    res = getattr(compiled, "detailed_results", None)
    if res is not None and hasattr(res, "to_dict"):
        d = res.to_dict()
        out = {k: d.get(k) for k in ("lm_calls", "lm_tokens", "failures", "best_iteration", "best_score",
                                     "baseline_score", "seconds", "budget", "selected", "selected_score",
                                     "selection_p_value", "val_size", "instructions")}
        out["iterations"] = [{k: it.get(k) for k in ("iteration", "val_score", "rollout_score", "num_rollouts",
                                                     "num_sft_examples", "sft_steps", "abstention_rate", "seconds",
                                                     "against_student", "critiques", "t_star_accepted")}
                             for it in d.get("iterations") or ()]
        return out
    return None


def run_cell(*, dataset: str, optimizer: str, seed: int, budget: int | None, data: dict[str, list[dspy.Example]],
             make_program: Any, target_inner: dspy.BaseLM, aux_inner: dspy.BaseLM | None, args: argparse.Namespace,
             work_dir: Path, base_program: dspy.Module | None = None, program_path: Path | None = None
             ) -> dict[str, Any]:
    """Plan, compile and evaluate one (dataset, optimizer, seed); failures are recorded, not raised.

    ``base_program`` is the program a stacked TRPrompt starts from; ``program_path`` is where the compiled
    program's DSPy state is saved (non-TRPrompt contenders). With ``args.dev_eval`` the compiled program is
    also scored on the dev split (``cell["dev"]``), which is what picks the stacked contender's base.
    """
    from trprompt_dspy.tasks.metrics import get_metric

    meter = CallMeter()
    target = counting_lm(target_inner, meter, role="target")
    aux = counting_lm(aux_inner or target_inner, meter, role="aux")
    metric, feedback = get_metric(dataset), get_metric(dataset, feedback=True)
    student = make_program()
    p = len(student.predictors())
    plan = plan_contender(optimizer, PlanInput(num_predictors=p, train_size=len(data["train"]),
                                               dev_size=len(data["dev"]), budget=budget, demos=args.demos,
                                               cap=contender_cap(args, optimizer) if budget is None else None))
    from trprompt_dspy.models.dtype import cpu_info

    cell: dict[str, Any] = {"dataset": dataset, "optimizer": optimizer, "seed": seed, "budget": budget, "cpu": cpu_info(),
                            "num_predictors": p, "plan": {"settings": plan.settings, "predicted_calls": plan.predicted_calls,
                                                          "note": plan.note}}
    if optimizer in (getattr(args, "cap_calls_for", None) or {}):
        cell["cap_calls_for"] = args.cap_calls_for[optimizer]
    if optimizer == "copro":
        cell["plan"]["settings"] = {**plan.settings, "init_temperature": args.copro_temperature}
    logger.info("[%s | %s | seed %d] budget %s, settings %s", dataset, optimizer, seed, budget, plan.settings)
    # GEPA and TRPrompt resume from their logs, so a rerun starts afresh to count every call; except a TRPrompt
    # cell under --resume whose earlier attempts were recorded (benchmarks/_attempts.py): it continues, and the
    # calls and wall time of every attempt are added up.
    attempts = None
    if optimizer in TRPROMPT_CONTENDERS:
        if work_dir.exists() and not (getattr(args, "resume", False) and (work_dir / ATTEMPTS_FILE).exists()):
            shutil.rmtree(work_dir)  # a fresh run, or one left by a harness that did not record its attempts
        attempts = CompileAttempts(work_dir, meter, cpu=cell["cpu"])
        if attempts.prior:
            logger.info("[%s | %s | seed %d] continuing from the checkpoints of %d earlier attempt(s) (%.0f s, "
                        "%d target calls so far)", dataset, optimizer, seed, len(attempts.prior),
                        attempts.total_wall_s(0.0), attempts.total_calls().get("target", {}).get("calls", 0))
    elif work_dir.exists():
        shutil.rmtree(work_dir)
    random.seed(seed)
    ci = CompileInput(target=target, aux=aux, metric=metric, feedback_metric=feedback, trainset=data["train"],
                      devset=data["dev"], seed=seed, num_threads=args.num_threads, work_dir=work_dir,
                      prompt_model=getattr(args, "prompt_model_instance", None) or args.prompt_model,
                      seed_with_target=not args.no_seed_with_target,
                      extra={"copro_temperature": args.copro_temperature},
                      base_program=None if base_program is None else base_program.deepcopy())
    pm_before = _pm_stats(ci.prompt_model)
    t0 = time.perf_counter()
    if attempts is not None:
        attempts.start()
    try:
        with meter.phase("compile"):
            compiled = compile_contender(optimizer, plan, student, ci)
    except KeyboardInterrupt:  # stopped by hand (Ctrl-C, SIGINT): record this attempt for --resume, then stop
        if attempts is not None:
            attempts.stop(finished=False)
        raise
    except Exception as exc:  # noqa: BLE001 - one failing optimizer must not end the comparison
        logger.exception("[%s | %s | seed %d] compile failed", dataset, optimizer, seed)
        wall, calls = round(time.perf_counter() - t0, 2), meter.summary("compile")
        if attempts is not None:  # the checkpoints stay: a rerun with --resume continues from them
            attempts.stop(finished=False)
            wall, calls = attempts.total_wall_s(wall), attempts.total_calls()
        cell.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                    traceback=scrub_paths(traceback.format_exc())[-4000:], compile={"wall_s": wall, "calls": calls})
        if attempts is not None:
            cell["compile"]["attempts"] = attempts.describe()
        return cell
    compile_s = time.perf_counter() - t0
    if attempts is not None:
        attempts.stop(finished=True)
    if program_path is not None and optimizer not in TRPROMPT_CONTENDERS:
        try:
            program_path.parent.mkdir(parents=True, exist_ok=True)
            compiled.save(str(program_path))
            _record_cpu(program_path, cell["cpu"])
            cell["program_file"] = program_path.name
        except Exception as exc:  # noqa: BLE001 - the cell's numbers stand without the saved state
            logger.warning("[%s | %s | seed %d] could not save the compiled program to %s: %s", dataset, optimizer,
                           seed, program_path, exc)
    if getattr(args, "dev_eval", False):
        t0 = time.perf_counter()
        with meter.phase("dev"), dspy.context(lm=target):
            dev_acc, dev_rows = evaluate_program(compiled, data["dev"], metric, args.num_threads)
        cell["dev"] = {"accuracy": round(dev_acc, 6), "n": len(dev_rows), "wall_s": round(time.perf_counter() - t0, 2),
                       "calls": meter.summary("dev"), "per_example": [{"idx": r["idx"], "correct": r["correct"]} for r in dev_rows]}
        logger.info("[%s | %s | seed %d] dev accuracy %.1f%%", dataset, optimizer, seed, 100 * dev_acc)
    pm_compiled = _pm_stats(ci.prompt_model)
    t0 = time.perf_counter()
    with meter.phase("eval"), dspy.context(lm=target):
        accuracy, rows = evaluate_program(compiled, data["test"], metric, args.num_threads)
    summary = meter.summary("compile") if attempts is None else attempts.total_calls()
    pm_evaluated = _pm_stats(ci.prompt_model)
    counts_aux = aux_inner is None
    cell.update(
        status="ok", accuracy=round(accuracy, 6),
        budget_calls=summary["total"]["calls"] if counts_aux else summary["target"]["calls"],
        compile={"wall_s": round(compile_s if attempts is None else attempts.total_wall_s(compile_s), 2),
                 "calls": summary},
        eval={"wall_s": round(time.perf_counter() - t0, 2), "calls": meter.summary("eval"), "n": len(rows)},
        optimizer_stats=_optimizer_stats(compiled), per_example=rows,
    )
    if attempts is not None and attempts.prior:  # a continued compile: what each attempt spent, on which CPU
        cell["compile"]["attempts"] = attempts.describe()
    if optimizer in TRPROMPT_CONTENDERS and pm_before is not None:
        # The prompt model is served outside the counting wrapper: its own counters (instructions, tokens).
        cell["compile"]["prompt_model"] = _pm_delta(pm_before, pm_compiled)
        if attempts is not None and attempts.prior:
            cell["compile"]["prompt_model_scope"] = "the last attempt only (the prompt model's counters live in memory)"
        cell["eval"]["prompt_model"] = _pm_delta(pm_compiled, pm_evaluated)
    logger.info("[%s | %s | seed %d] accuracy %.1f%%, %d compile calls, compile %.0f s", dataset, optimizer, seed,
                100 * accuracy, cell["budget_calls"], compile_s)
    return cell


# ---------------------------------------------------------------------------------------------------
# The whole comparison
# ---------------------------------------------------------------------------------------------------


def scrub_paths(text: str) -> str:
    """Replace this machine's paths in ``text`` (site-packages, the repo, the home folder) by placeholders.

    Example:
        >>> import site
        >>> scrub_paths(f'File "{REPO_ROOT}/benchmarks/x.py"')
        'File "<repo>/benchmarks/x.py"'
    """
    import site
    import sysconfig

    roots = {sysconfig.get_paths().get("purelib"), sysconfig.get_paths().get("platlib"), *site.getsitepackages()}
    for root in sorted((r for r in roots if r), key=len, reverse=True):
        text = text.replace(root, "<site-packages>")
    text = text.replace(str(REPO_ROOT), "<repo>")
    home = str(Path.home())
    return text.replace(home, "~") if len(home) > 1 else text


def contender_cap(args: argparse.Namespace, optimizer: str) -> int | None:
    """The call cap of one contender in ``native`` mode: its ``--cap-calls-for`` entry, else ``--cap-calls``."""
    return (getattr(args, "cap_calls_for", None) or {}).get(optimizer, getattr(args, "cap_calls", None))


def _fingerprint(args: argparse.Namespace, dataset: str) -> str:
    served = bool(args.api_base or args.serve)  # --serve X [--report-only] is the same setting as --api-base + --model X
    keys = {"dataset": dataset, "program": args.program, "target": args.model or args.serve or args.target,
            "api_base": served, "aux": args.reflection_model, "train": args.train_size,
            "dev": args.dev_size, "test": args.test_size, "budget": args.budget_calls, "demos": args.demos,
            "prompt_model": args.prompt_model, "max_tokens": args.max_tokens, "seed_writer": not args.no_seed_with_target}
    if getattr(args, "cap_calls", None):  # only when set, so that earlier runs keep their fingerprint
        keys["cap_calls"] = args.cap_calls
    if getattr(args, "max_model_len", None):
        keys["max_model_len"] = args.max_model_len
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def _read_cells(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    cells = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                cells.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s line %d is not valid JSON (an interrupted write?); ignoring it.", path, n)
    return cells


def _append_cell(path: Path, cell: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(cell, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def merge_cells(into: Path, sources: list[Path]) -> int:
    """Append the cells of other runs' ``.cells.jsonl`` files to ``into``; returns how many were added.

    Lets (dataset, seed) pairs run as separate processes against one server (each with its own
    ``--out``), then be reported together. A cell already in ``into`` (same dataset, optimizer, seed,
    fingerprint and finish time) is not added twice; cells of other settings are kept but ignored by
    the report, which only reads cells whose fingerprint matches the current flags.
    """
    def key(c: dict[str, Any]) -> tuple[Any, ...]:
        return (c.get("dataset"), c.get("optimizer"), c.get("seed"), c.get("fingerprint"), c.get("finished_at"))

    seen = {key(c) for c in _read_cells(into)}
    added = 0
    for src in sources:
        if not src.is_file():
            raise SystemExit(f"--merge: {src} is not a file; give the .cells.jsonl of another run.")
        if src.resolve() == into.resolve():
            continue
        for cell in _read_cells(src):
            if key(cell) not in seen:
                _append_cell(into, cell)
                seen.add(key(cell))
                added += 1
    logger.info("Merged %d cells from %d file(s) into %s.", added, len(sources), into)
    return added


def choose_stack_base(done: dict[tuple[str, str, int], dict[str, Any]], dataset: str, seed: int,
                      forced: str | None = None) -> tuple[str, dict[str, Any]]:
    """The contender a stacked TRPrompt builds on: the highest dev accuracy among the finished others.

    Returns ``(optimizer, stacked_on)`` where ``stacked_on`` records the rule and every candidate's dev
    accuracy. Ties go to the contender listed first in ``CONTENDERS`` (the cheaper one). ``forced`` names
    the base instead (it must have finished).

    Raises:
        LookupError: No finished non-TRPrompt cell (with a dev score, unless forced) for ``dataset``/``seed``.

    Example:
        >>> done = {("gsmhard", o, 0): {"status": "ok", "dev": {"accuracy": a}, "program_file": f"{o}.json"}
        ...         for o, a in (("zeroshot", 0.3), ("bootstrap", 0.36), ("mipro", 0.36), ("trprompt", 0.5))}
        >>> choose_stack_base(done, "gsmhard", 0)[0]
        'bootstrap'
    """
    cands = {opt: c for (d, opt, s), c in done.items()
             if d == dataset and s == seed and opt not in TRPROMPT_CONTENDERS and c.get("status") == "ok"}
    scores = {opt: c["dev"]["accuracy"] for opt, c in cands.items() if isinstance(c.get("dev"), dict)}
    if forced is not None:
        if forced not in cands:
            raise LookupError(f"--stack-on {forced}: no finished {forced} cell for {dataset} seed {seed}; run it first "
                              f"(finished: {', '.join(sorted(cands)) or 'none'}).")
        choice, rule = forced, "named by --stack-on"
    else:
        if not scores:
            raise LookupError(f"no finished non-TRPrompt cell with a dev score for {dataset} seed {seed}: run the "
                              "other contenders with --dev-eval first (or name the base with --stack-on).")
        choice = max(sorted(scores, key=CONTENDERS.index), key=lambda o: scores[o])
        rule = "highest dev accuracy among the finished non-TRPrompt contenders; ties to the one listed first"
    if not cands[choice].get("program_file"):
        raise LookupError(f"the {choice} cell for {dataset} seed {seed} saved no program state; rerun it.")
    return choice, {"optimizer": choice, "rule": rule, "dev_accuracy": scores.get(choice),
                    "candidates": dict(sorted(scores.items(), key=lambda kv: CONTENDERS.index(kv[0])))}


def _pending_row(value: str) -> dict[str, str]:
    """``--pending 'LABEL=WHY'`` -> ``{"label": LABEL, "reason": WHY}`` (both required)."""
    label, sep, reason = value.partition("=")
    if not sep or not label.strip() or not reason.strip():
        raise argparse.ArgumentTypeError(f"expected LABEL=WHY (a row name and why it did not run); got {value!r}.")
    return {"label": label.strip(), "reason": reason.strip()}


def _budget_mode(value: str) -> int | str:
    if value in ("trprompt", "native"):
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budget-calls must be a positive int, 'trprompt' or 'native'; got {value!r}.") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"--budget-calls must be positive; got {n}.")
    return n


def _named_cap(value: str) -> tuple[str, int]:
    name, sep, n = value.partition("=")
    if not sep or name not in CONTENDERS or not n.strip().isdigit() or int(n) < 1:
        raise argparse.ArgumentTypeError(
            f"--cap-calls-for takes NAME=N with NAME one of {', '.join(CONTENDERS)} and N >= 1 target-LM calls "
            f"(e.g. mipro=400); got {value!r}.")
    return name, int(n)


def run_comparison(args: argparse.Namespace, *, target_inner: dspy.BaseLM | None = None,
                   aux_inner: dspy.BaseLM | None = None, prompt_model: Any = None) -> dict[str, Any]:
    """Run (or resume) every cell, then write ``<name>.json``, ``<name>.md`` and ``<name>.png``.

    ``target_inner``/``aux_inner`` override the LMs built from the flags (tests pass scripted LMs);
    ``prompt_model`` is a :class:`~trprompt_dspy.backends.prompt_model.base.PromptModel` instance for the
    TRPrompt contenders instead of ``--prompt-model`` (single-base mode passes the served one).
    """
    if prompt_model is not None:
        args.prompt_model_instance = prompt_model
    from trprompt_dspy.apps.programs import load_program

    t_start = time.perf_counter()
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    cells_path = results_dir / f"{args.out}.cells.jsonl"
    programs_dir = results_dir / f"{args.out}.programs"
    if cells_path.exists() and not (args.resume or args.overwrite or args.report_only):
        raise SystemExit(f"{cells_path} exists: pass --resume to continue that run, --overwrite to start again, "
                         f"or a new --out name.")
    if args.overwrite and cells_path.exists():
        cells_path.unlink()
    if args.merge:
        merge_cells(cells_path, [Path(m) for m in args.merge])
    optimizers = sorted(set(args.optimizers), key=CONTENDERS.index)
    if args.budget_calls == "trprompt":
        if "trprompt" not in optimizers:
            raise SystemExit("--budget-calls trprompt takes the budget from TRPrompt's run; include trprompt in "
                             "--optimizers or give a number (or 'native').")
        optimizers.remove("trprompt")
        optimizers.insert(0, "trprompt")
    fingerprints = {d: _fingerprint(args, d) for d in args.dataset}
    done: dict[tuple[str, str, int], dict[str, Any]] = {}
    for c in _read_cells(cells_path):
        own_cap = (getattr(args, "cap_calls_for", None) or {}).get(c.get("optimizer"))
        if c.get("fingerprint") == fingerprints.get(c.get("dataset")) and c.get("status") == "ok" \
                and c.get("cap_calls_for") == own_cap:  # a per-contender cap that changed reruns that cell
            done[(c["dataset"], c["optimizer"], c["seed"])] = c
    if done:
        logger.info("Resuming: %d finished cells found in %s.", len(done), cells_path)

    if not args.report_only:
        if target_inner is None:
            target_inner = build_lm(model=args.model or args.target, api_base=args.api_base, api_key=args.api_key,
                                    max_tokens=args.max_tokens, temperature=0.0)
        if aux_inner is None and args.reflection_model:
            aux_inner = build_lm(model=args.reflection_model, api_base=args.reflection_api_base or args.api_base,
                                 api_key=args.api_key, max_tokens=args.max_tokens, temperature=0.0)
        args.target_lm_name = getattr(target_inner, "model", None)
        spec = _program_spec(args.program)
        for dataset in args.dataset:
            data = load_benchmark_data(dataset, train_size=args.train_size, dev_size=args.dev_size,
                                       test_size=args.test_size, data_dir=args.data_dir, source=args.source)
            for seed in args.seeds:
                budget: int | None = args.budget_calls if isinstance(args.budget_calls, int) else None
                for opt in optimizers:
                    key = (dataset, opt, seed)
                    if key in done:
                        cell = done[key]
                    elif opt in DETERMINISTIC and seed != args.seeds[0] and (dataset, opt, args.seeds[0]) in done:
                        src = done[(dataset, opt, args.seeds[0])]
                        cell = {**src, "seed": seed, "reused_from_seed": args.seeds[0]}
                    elif args.budget_calls == "trprompt" and opt != "trprompt" and budget is None and opt not in (
                            "zeroshot", "labeled"):
                        cell = {"dataset": dataset, "optimizer": opt, "seed": seed, "status": "skipped",
                                "error": "no budget: the TRPrompt cell of this dataset and seed did not finish"}
                    else:
                        work = Path(args.work_dir) / args.out / f"{dataset}-{opt}-s{seed}"
                        base_program, stacked_on = None, None
                        if opt == "trprompt_stacked":
                            try:
                                base_name, stacked_on = choose_stack_base(done, dataset, seed, args.stack_on)
                            except LookupError as exc:
                                stacked_on = str(exc)
                            else:
                                base_program = load_program(spec)
                                base_program.load(str(programs_dir / done[(dataset, base_name, seed)]["program_file"]))
                                logger.info("[%s | seed %d] stacking TRPrompt on %s (dev %s)", dataset, seed, base_name,
                                            stacked_on["dev_accuracy"])
                        if opt == "trprompt_stacked" and base_program is None:
                            cell = {"dataset": dataset, "optimizer": opt, "seed": seed, "status": "skipped",
                                    "error": f"no base program: {stacked_on}"}
                        else:
                            cell = run_cell(dataset=dataset, optimizer=opt, seed=seed, budget=budget, data=data,
                                            make_program=lambda: load_program(spec), target_inner=target_inner,
                                            aux_inner=aux_inner, args=args, work_dir=work, base_program=base_program,
                                            program_path=programs_dir / f"{dataset}-{opt}-s{seed}.json")
                            if stacked_on is not None:
                                cell["stacked_on"] = stacked_on
                    if key not in done:
                        cell["fingerprint"] = fingerprints[dataset]
                        cell["command"] = "python -m benchmarks.compare_optimizers " + " ".join(args.argv)
                        cell["finished_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
                        _append_cell(cells_path, cell)
                        if cell.get("status") == "ok":
                            done[key] = cell
                    if opt == "trprompt" and args.budget_calls == "trprompt" and cell.get("status") == "ok":
                        budget = int(cell["budget_calls"])
                        logger.info("[%s | seed %d] budget for the other optimizers: %d target-LM calls "
                                    "(TRPrompt auto='light', measured).", dataset, seed, budget)
    cells = [c for c in _read_cells(cells_path) if c.get("fingerprint") == fingerprints.get(c.get("dataset"))]
    latest: dict[tuple[str, str, int], dict[str, Any]] = {}
    for c in cells:  # the last record of a cell wins (a retried failure is replaced by its success)
        key = (c["dataset"], c["optimizer"], c["seed"])
        if c.get("status") == "ok" or latest.get(key, {}).get("status") != "ok":
            latest[key] = c
    cells = [latest[k] for k in sorted(latest, key=lambda k: (k[0], CONTENDERS.index(k[1]), k[2]))]
    return write_outputs(args, cells, wall_s=time.perf_counter() - t_start)


def write_outputs(args: argparse.Namespace, cells: list[dict[str, Any]], *, wall_s: float) -> dict[str, Any]:
    results_dir = Path(args.results_dir)
    rows = summarize(cells)
    sig = significance(cells, iterations=args.bootstrap_iterations, seed=0)
    pairs = pairwise_tests(cells)
    target = getattr(args, "target_lm_name", None) or args.model or args.serve or args.target
    meta = {"name": args.out, "program": _program_spec(args.program), "target": target,
            "api_base": args.api_base, "served_preset": args.serve, "aux_model": args.reflection_model, "budget_counts_aux": not args.reflection_model,
            "train_size": args.train_size, "dev_size": args.dev_size, "test_size": args.test_size, "seeds": args.seeds,
            "datasets": args.dataset, "optimizers": args.optimizers, "budget_mode": args.budget_calls,
            "prompt_model": args.prompt_model, "num_threads": args.num_threads, "max_tokens": args.max_tokens,
            "cap_calls": getattr(args, "cap_calls", None), "cap_calls_for": getattr(args, "cap_calls_for", None) or {},
            "dev_eval": getattr(args, "dev_eval", False),
            "servers": getattr(args, "servers", None),
            "copro_temperature": getattr(args, "copro_temperature", 1.4),
            "pending": list(getattr(args, "pending", None) or []),
            "command": "python -m benchmarks.compare_optimizers " + " ".join(args.argv), "wall_s": round(wall_s, 1),
            "cells_wall_s": round(sum(c.get("compile", {}).get("wall_s", 0) + c.get("eval", {}).get("wall_s", 0)
                                      for c in cells if c.get("reused_from_seed") is None), 1),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine_info()}
    png = results_dir / f"{args.out}.png"
    plot_accuracy_vs_calls(rows, png, title=f"{args.out}: accuracy vs target-LM calls")
    md = markdown_report(meta, rows, sig, plot_name=png.name, pairwise=pairs)
    (results_dir / f"{args.out}.md").write_text(md, encoding="utf-8")
    report = {"meta": meta, "summary": rows, "significance": sig, "pairwise": pairs, "cells": cells}
    (results_dir / f"{args.out}.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    logger.info("Wrote %s.{json,md,png}", results_dir / args.out)
    return report


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare_optimizers",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--dataset", action="append", choices=sorted(DATASETS),
                   help="dataset (repeat for several); default gsm8k")
    d.add_argument("--train-size", type=int, default=200, help="examples sampled from the training pool")
    d.add_argument("--dev-size", type=int, default=50, help="fixed dev examples (selection / valset)")
    d.add_argument("--test-size", type=int, default=100, help="first N fixed test indices of splits.json")
    d.add_argument("--data-dir", default=None, help="shared data folder (default: $TRPROMPT_SHARED_DATA or ../shared/data)")
    d.add_argument("--source", default="auto", choices=["auto", "local", "bundled"])
    r = p.add_argument_group("run")
    r.add_argument("--program", default="math:MathCoT", help="module:Class; math:MathCoT or math:PlanAndSolve")
    r.add_argument("--optimizers", nargs="+", default=list(CONTENDERS), choices=CONTENDERS, metavar="NAME",
                   help=f"contenders ({', '.join(CONTENDERS)})")
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    r.add_argument("--budget-calls", type=_budget_mode, default="trprompt",
                   help="target-LM calls per compile: an int, 'trprompt' (TRPrompt light's measured calls) or 'native'")
    r.add_argument("--cap-calls", type=int, default=None, metavar="N",
                   help="native mode: size a contender whose own preset is predicted to exceed N target-LM calls to N")
    r.add_argument("--cap-calls-for", type=_named_cap, action="append", default=None, metavar="NAME=N",
                   help="native mode: cap one contender at N target-LM calls (repeatable); overrides --cap-calls")
    r.add_argument("--dev-eval", action="store_true",
                   help="also score every compiled program on the dev split (picks the stacked contender's base)")
    r.add_argument("--stack-on", default=None, metavar="NAME",
                   help="trprompt_stacked: build on this contender's program instead of the best one on dev")
    r.add_argument("--demos", type=int, default=4, help="labeled demos (LabeledFewShot k, max_labeled_demos)")
    r.add_argument("--num-threads", type=int, default=8)
    r.add_argument("--bootstrap-iterations", type=int, default=10_000)
    r.add_argument("--copro-temperature", type=float, default=1.4,
                   help="COPRO's init_temperature (DSPy's default 1.4 makes a 0.5B proposer emit unparseable text)")
    m = p.add_argument_group("models")
    m.add_argument("--target", default="qwen2.5-coder-0.5b-instruct", help="in-process HF preset / folder / HF id")
    m.add_argument("--api-base", default=None, help="OpenAI-compatible server URL (e.g. vLLM); needs --model")
    m.add_argument("--model", default=None, help="model name served at --api-base")
    m.add_argument("--serve", default=None, metavar="PRESET",
                   help="start a vLLM server for this preset / folder for the run (sets --api-base and --model)")
    m.add_argument("--max-model-len", type=int, default=None,
                   help="--serve: the server's context length (default: VLLMServer's 2048); demos need more")
    m.add_argument("--api-key", default="EMPTY")
    m.add_argument("--max-tokens", type=int, default=512)
    m.add_argument("--reflection-model", default=None,
                   help="separate proposer/reflection/reward model (default: the target model itself)")
    m.add_argument("--reflection-api-base", default=None)
    m.add_argument("--prompt-model", default="smollm2-135m-instruct",
                   help="TRPrompt's trainable prompt model; 'same' (with --serve): a LoRA adapter on the served "
                        "target (single-base mode, one server with LoRA for every role)")
    m.add_argument("--no-seed-with-target", action="store_true",
                   help="TRPrompt: let the untrained prompt model write iteration 0's instructions")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, help="result name (default compare-<UTC date>)")
    o.add_argument("--results-dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    o.add_argument("--work-dir", default=str(REPO_ROOT / "runs" / "bench"), help="optimizer logs/checkpoints")
    o.add_argument("--resume", action="store_true", help="skip the cells already in <out>.cells.jsonl; continue a killed TRPrompt compile from "
                        "its checkpoints (the calls and wall time of every attempt are added up)")
    o.add_argument("--overwrite", action="store_true", help="discard an existing <out>.cells.jsonl")
    o.add_argument("--report-only", action="store_true", help="only rebuild json/md/png from <out>.cells.jsonl")
    o.add_argument("--pending", action="append", default=[], metavar="LABEL=WHY", type=_pending_row,
                   help="a contender the comparison names but has not run, listed in the report with the reason "
                        "(repeatable), e.g. 'TRPrompt, best scale-study configuration=none found'")
    o.add_argument("--merge", nargs="+", default=[], metavar="CELLS_JSONL",
                   help="first append the cells of other runs (their .cells.jsonl) to <out>.cells.jsonl")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("train_size", "dev_size", "test_size", "num_threads", "max_tokens", "bootstrap_iterations"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}.")
    if args.demos < 0:
        p.error(f"--demos must be >= 0; got {args.demos}.")
    if args.serve and (args.api_base or args.model):
        p.error("--serve starts its own server: drop --api-base/--model (or drop --serve to use yours).")
    if args.max_model_len is not None and (args.max_model_len <= args.max_tokens or not args.serve):
        p.error(f"--max-model-len sets the context of the server --serve starts and must exceed --max-tokens "
                f"({args.max_tokens}); got {args.max_model_len}.")
    if args.api_base and not args.model:
        p.error("--api-base needs --model (the name the server serves, e.g. Qwen/Qwen2.5-Coder-0.5B-Instruct).")
    if args.cap_calls is not None and args.cap_calls < 1:
        p.error(f"--cap-calls must be >= 1; got {args.cap_calls}.")
    if args.cap_calls is not None and args.budget_calls != "native":
        p.error("--cap-calls applies to --budget-calls native only (a numeric budget already sizes every contender).")
    caps = dict(args.cap_calls_for or [])
    if len(caps) != len(args.cap_calls_for or []):
        p.error(f"--cap-calls-for names a contender twice: {args.cap_calls_for}.")
    if caps and args.budget_calls != "native":
        p.error("--cap-calls-for applies to --budget-calls native only (a numeric budget already sizes every contender).")
    args.cap_calls_for = caps
    if args.stack_on is not None and (args.stack_on not in CONTENDERS or args.stack_on in TRPROMPT_CONTENDERS):
        others = ", ".join(c for c in CONTENDERS if c not in TRPROMPT_CONTENDERS)
        p.error(f"--stack-on must name a non-TRPrompt contender ({others}); got {args.stack_on!r}.")
    if args.prompt_model == "same" and not args.serve:
        p.error("--prompt-model same puts the prompt model on the served target's weights: add --serve PRESET.")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds has duplicates: {args.seeds}.")


def main(argv: list[str] | None = None, **overrides: Any) -> dict[str, Any]:
    """Parse ``argv`` and run the comparison; ``overrides`` are passed to :func:`run_comparison`."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    args.dataset = args.dataset or ["gsm8k"]
    args.out = args.out or f"compare-{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d}"
    _check_args(parser, args)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.serve and args.prompt_model == "same" and not args.report_only:
        from trprompt_dspy.backends.stack import ModelStack

        # One server with LoRA: target, optimizer-side calls and TRPrompt's prompt model (single-base mode).
        options = {} if args.max_model_len is None else {"max_model_len": args.max_model_len}
        stack = ModelStack(args.serve, prompt_model="same", max_tokens=args.max_tokens, num_threads=args.num_threads,
                           log_dir=Path(args.work_dir) / args.out / "servers", server_options=options)
        with stack:
            info = stack.servers["target"]
            args.api_base, args.model, args.servers = info["base_url"], args.serve, stack.servers
            overrides.setdefault("prompt_model", stack.prompt_model)
            logger.info("Single-base: serving %s with vLLM at %s (LoRA on, started in %.0f s).", args.serve,
                        args.api_base, info["startup_seconds"])
            overrides.setdefault("target_inner", stack.target_lm)
            return run_comparison(args, **overrides)
    if args.serve and not args.report_only:
        from trprompt_dspy.serving import VLLMServer

        options = {} if args.max_model_len is None else {"max_model_len": args.max_model_len}
        with VLLMServer(args.serve, **options) as server:  # stopped (process group and all) on exit, error or Ctrl-C
            args.api_base, args.model = server.base_url, server.model_name
            logger.info("Serving %s with vLLM at %s (started in %.0f s).", args.serve, args.api_base,
                        server.startup_seconds)
            return run_comparison(args, **overrides)
    return run_comparison(args, **overrides)


if __name__ == "__main__":
    main()
    raise SystemExit(0)
