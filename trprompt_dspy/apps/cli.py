"""The trprompt command line: models, evaluate, compile and demo.

Examples::

    trprompt models list
    trprompt models fetch smollm2-135m-instruct qwen2.5-coder-0.5b-instruct
    trprompt models path smollm2-135m-instruct
    trprompt evaluate --dataset gsm8k --split dev --limit 20 --target qwen2.5-coder-0.5b-instruct
    trprompt compile --dataset gsm8k --train-size 48 --auto light --out runs/my-compile
    trprompt demo
    trprompt serve qwen2.5-coder-0.5b-instruct --enable-lora     # vLLM server; prints the dspy.LM line

Programs are given as ``module:Class`` (default ``programs.math:MathCoT``, run from the repo root).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from trprompt_dspy.apps.defaults import DEMO_EVAL_SIZE, DEMO_TRAIN_SIZE
from trprompt_dspy.apps.programs import DEFAULT_PROGRAM, load_program
from trprompt_dspy.backends.stack import AUTO, DEFAULT_TARGET_MAX_TOKENS
from trprompt_dspy.config import AUTO_BUDGETS, DEFAULT_AUTO, DEFAULT_SEED
from trprompt_dspy.models.presets import DEFAULT_PROMPT_MODEL, DEFAULT_TARGET_MODEL

__all__ = ["main", "build_parser", "prompt_model_factory_for"]

logger = logging.getLogger(__name__)


def _add_target_args(p: argparse.ArgumentParser, *, num_threads: int | None = 8) -> None:
    p.add_argument("--target", default=DEFAULT_TARGET_MODEL,
                   help="target model: a preset, HF id or local path (in-process), or an OpenAI-compatible "
                        "model name with --api-base (default: %(default)s)")
    p.add_argument("--api-base", default=None, help="OpenAI-compatible server URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default="EMPTY")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_TARGET_MAX_TOKENS, help="target max new tokens (default: %(default)s)")
    p.add_argument("--num-threads", type=int, default=num_threads,
                   help="parallel program runs / concurrent requests (default: %s)"
                        % (num_threads or "32 with vLLM, 16 with an API, 8 in-process"))


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="gsm8k", choices=["gsm8k", "gsmhard", "math"],
                   help="dataset; the fixed dev/test/train indices come from splits.json (default: %(default)s)")
    p.add_argument("--data-dir", default=None, help="local data folder (the layout of shared/data)")
    p.add_argument("--source", default="auto", choices=["auto", "local", "bundled"],
                   help="local JSONL (--data-dir / TRPROMPT_SHARED_DATA) or the bundled GSM8K subset")
    p.add_argument("--program", default=DEFAULT_PROGRAM, help="module:Class (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trprompt", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    from trprompt_dspy.models.cli import add_models_subcommand

    add_models_subcommand(sub)

    from trprompt_dspy.serving.cli import add_serve_subcommand

    add_serve_subcommand(sub)

    ev = sub.add_parser("evaluate", help="evaluate a program (or a compiled artifact) on a dataset split")
    _add_data_args(ev)
    _add_target_args(ev)
    ev.add_argument("--split", default="dev", choices=["dev", "test"], help="fixed split (default: %(default)s)")
    ev.add_argument("--limit", type=int, default=20)
    ev.add_argument("--compiled", default=None, help="folder written by `trprompt compile` / save_compiled")
    ev.add_argument("--prompt-backend", default="hf", choices=["hf", "vllm"],
                    help="how the compiled program's prompt model runs: in-process transformers (hf) or a vLLM "
                         "server with the adapter loaded at run time (vllm; --prompt-api-base, or one is started)")
    ev.add_argument("--prompt-api-base", default=None,
                    help="running vLLM server for --prompt-backend vllm (started with --enable-lora)")

    comp = sub.add_parser("compile", help="compile a program with TRPromptOptimizer and save it")
    _add_data_args(comp)
    _add_target_args(comp)
    comp.add_argument("--train-size", type=int, default=48)
    comp.add_argument("--val-size", type=int, default=None)
    comp.add_argument("--auto", default=DEFAULT_AUTO, choices=list(AUTO_BUDGETS))
    comp.add_argument("--prompt-model", default=AUTO,
                      help="'auto' (default: a LoRA adapter on the target's own weights when the target is local, "
                           f"else {DEFAULT_PROMPT_MODEL}), 'same', or a preset / HF id / folder")
    comp.add_argument("--seed", type=int, default=DEFAULT_SEED)
    comp.add_argument("--log-dir", default=None, help="checkpoint folder (re-run with it to resume)")
    comp.add_argument("--out", required=True, help="folder for the compiled program")

    demo = sub.add_parser("demo", help="the main job: baseline vs TRPrompt-compiled CoT on GSM8K, with a report")
    _add_target_args(demo, num_threads=None)
    demo.add_argument("--backend", default="vllm", choices=["vllm", "hf", "api"],
                      help="where the models run: local vLLM servers started for the run, in-process "
                           "transformers, or the OpenAI-compatible --api-base (default: %(default)s)")
    demo.add_argument("--cache", action="store_true",
                      help="reuse DSPy's response cache for the target (faster re-runs; the report's times are then "
                           "not real)")
    demo.add_argument("--prompt-model", default=AUTO,
                      help="'auto' (default: single-base, a LoRA adapter on the target's own weights served by the "
                           f"same vLLM server; {DEFAULT_PROMPT_MODEL} with --api-base), 'same', or a preset / folder")
    demo.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"],
                      help="weight dtype; auto = bfloat16 where the hardware computes it natively, else float32")
    demo.add_argument("--train-size", type=int, default=DEMO_TRAIN_SIZE)
    demo.add_argument("--eval-size", type=int, default=DEMO_EVAL_SIZE)
    demo.add_argument("--auto", default=DEFAULT_AUTO, choices=list(AUTO_BUDGETS))
    demo.add_argument("--baseline-only", action="store_true", help="only evaluate the uncompiled program")
    demo.add_argument("--runs-dir", default="runs")
    demo.add_argument("--seed", type=int, default=DEFAULT_SEED)
    demo.add_argument("--program", default=DEFAULT_PROGRAM, help="module:Class (default: %(default)s)")
    demo.add_argument("--seed-with-target", dest="seed_with_target", action="store_true", default=None,
                      help="let the target write iteration 0's instructions (default: only with a separate prompt model)")
    demo.add_argument("--no-seed-with-target", dest="seed_with_target", action="store_false",
                      help="let the untrained prompt model write iteration 0's instructions")
    return parser


def make_target_lm(args: argparse.Namespace) -> Any:
    """A ``dspy.LM`` for the target: an OpenAI-compatible server or an in-process local model (via ``ModelStack``)."""
    from trprompt_dspy.backends.stack import ModelStack

    stack = ModelStack(args.target, backend="api" if args.api_base else "hf", api_base=args.api_base,
                       api_key=args.api_key, max_tokens=args.max_tokens, need_prompt_model=False,
                       cache=bool(args.api_base))
    return stack.start().target_lm


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import dspy

    from trprompt_dspy.tasks.datasets import load_fixed_split
    from trprompt_dspy.tasks.metrics import get_metric

    program = load_program(args.program)
    if args.compiled:
        from trprompt_dspy.compiled.artifact import load_compiled

        program = load_compiled(program, args.compiled, prompt_model_factory=prompt_model_factory_for(args))
    data = load_fixed_split(args.dataset, args.split, data_dir=args.data_dir, source=args.source, limit=args.limit)
    lm = make_target_lm(args)
    with dspy.context(lm=lm):
        result = dspy.Evaluate(devset=data, metric=get_metric(args.dataset), num_threads=args.num_threads,
                               display_progress=True, max_errors=len(data) + 1)(program)
    print(f"{args.dataset} {args.split} (n={len(data)}): accuracy {result.score:.1f}%")
    return 0


def prompt_model_factory_for(args: argparse.Namespace) -> Any:
    """The ``load_compiled`` factory that ``trprompt evaluate --compiled`` uses: ``--prompt-backend`` (``hf`` or
    ``vllm``), ``--prompt-api-base`` and ``--num-threads`` mapped onto
    :func:`~trprompt_dspy.backends.stack.prompt_model_factory`."""
    from trprompt_dspy.backends.stack import prompt_model_factory

    if args.prompt_api_base and args.prompt_backend != "vllm":
        raise SystemExit("--prompt-api-base needs --prompt-backend vllm.")
    return prompt_model_factory(args.prompt_backend, base_url=args.prompt_api_base,
                                max_concurrency=max(1, args.num_threads))


def _cmd_compile(args: argparse.Namespace) -> int:
    import dspy

    from trprompt_dspy.compiled.artifact import save_compiled
    from trprompt_dspy.optimizer import TRPromptOptimizer
    from trprompt_dspy.tasks.datasets import load_fixed_split
    from trprompt_dspy.tasks.metrics import get_metric

    program = load_program(args.program)
    train = load_fixed_split(args.dataset, "train", source=args.source, data_dir=args.data_dir, limit=args.train_size)
    val = load_fixed_split(args.dataset, "dev", source=args.source, data_dir=args.data_dir, limit=args.val_size)
    lm = make_target_lm(args)
    opt = TRPromptOptimizer(metric=get_metric(args.dataset, feedback=True), auto=args.auto,
                            prompt_model=args.prompt_model, num_threads=args.num_threads, seed=args.seed,
                            log_dir=args.log_dir)
    with dspy.context(lm=lm):
        compiled = opt.compile(program, trainset=train, valset=val)
    save_compiled(compiled, args.out)
    res = compiled.detailed_results
    best = "n/a" if res.best_score is None else f"{res.best_score:.3f}"
    chosen = "the student (no iteration beat it)" if res.selected == "student" else f"iteration {res.selected}"
    print(f"validation ({res.val_size} examples): student {res.baseline_score:.3f}, best iteration {best}; "
          f"returned {chosen}; saved to {args.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from trprompt_dspy.apps.demo import run_demo

    backend = "api" if args.api_base and args.backend == "vllm" else args.backend
    results = run_demo(target=args.target, prompt_model=args.prompt_model, backend=backend, api_base=args.api_base,
                       api_key=args.api_key, max_tokens=args.max_tokens, num_threads=args.num_threads,
                       train_size=args.train_size, eval_size=args.eval_size, auto=args.auto,
                       baseline_only=args.baseline_only, runs_dir=Path(args.runs_dir), seed=args.seed,
                       program=args.program, seed_with_target=args.seed_with_target, cache=args.cache,
                       dtype=args.dtype)
    report = Path(results["report_path"])
    print(report.read_text())
    print(f"Report, plots and results.json: {report.parent}")
    if results.get("decision"):  # the report opens with it; repeated here so the run ends with what happened
        print("\n" + "\n".join(results["decision"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    from trprompt_dspy.serving.cli import split_passthrough

    argv, passthrough = split_passthrough(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        args.extra = passthrough  # vLLM api_server flags given after `--`
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "LiteLLM", "litellm", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    handlers = {"evaluate": _cmd_evaluate, "compile": _cmd_compile, "demo": _cmd_demo}
    try:
        return args.func(args) if args.command in ("models", "serve") else handlers[args.command](args)
    except (ValueError, TypeError, FileNotFoundError, PermissionError, RuntimeError) as exc:
        print(f"trprompt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
