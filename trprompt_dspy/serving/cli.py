"""``trprompt serve``: run a vLLM server for a local model until Ctrl-C.

Examples::

    trprompt serve qwen2.5-coder-0.5b-instruct                 # free port, prints the dspy.LM line
    trprompt serve smollm2-135m-instruct --port 8011 --enable-lora --max-lora-rank 8
    trprompt serve ./my-model --device gpu --tensor-parallel-size 2 -- --gpu-memory-utilization 0.8
    trprompt serve --install-only                              # just create the vLLM venv
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from typing import Any

__all__ = ["add_serve_subcommand", "run_serve", "split_passthrough"]


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split ``trprompt serve ... -- EXTRA`` into the arguments before ``--`` and vLLM's extra flags.

    Only a ``serve`` command line is split; others are returned unchanged with no extras.

    Example:
        >>> split_passthrough(["serve", "m", "--port", "1", "--", "--seed", "0"])
        (['serve', 'm', '--port', '1'], ['--seed', '0'])
        >>> split_passthrough(["models", "list"])
        (['models', 'list'], [])
    """
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    if "serve" not in argv[:cut]:
        return argv, []
    return argv[:cut], argv[cut + 1:]


def _lora_module(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--lora-module must look like NAME=ADAPTER_FOLDER; got {text!r}")
    return name, path


def add_serve_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``trprompt serve`` to an ``argparse`` sub-parser collection; returns the new parser."""
    p = subparsers.add_parser(
        "serve", help="serve a model with vLLM (OpenAI-compatible) until Ctrl-C",
        description="Start a vLLM OpenAI-compatible server for a model preset or folder, print the dspy.LM line "
                    "to use it, and block until Ctrl-C. Arguments after `--` go to vLLM's api_server verbatim.")
    p.add_argument("model", nargs="?", help="preset name (e.g. qwen2.5-coder-0.5b-instruct), HF folder or .gguf file")
    p.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: %(default)s)")
    p.add_argument("--served-model-name", default=None, help="name clients use (default: the preset/folder name)")
    p.add_argument("--max-model-len", type=int, default=2048, help="context length (default: %(default)s)")
    p.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters, loadable at run time")
    p.add_argument("--max-lora-rank", type=int, default=16, help="largest adapter rank (default: %(default)s)")
    p.add_argument("--lora-module", action="append", type=_lora_module, default=[], metavar="NAME=FOLDER",
                   help="adapter to load at start (repeatable; implies --enable-lora)")
    p.add_argument("--kv-cache-gb", type=float, default=None, help="CPU KV-cache GiB (default: 2, or 1 if RAM is low)")
    p.add_argument("--device", default="auto", choices=["cpu", "gpu", "auto"],
                   help="vLLM build: auto = gpu when nvidia-smi exists (default: %(default)s)")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--startup-timeout", type=float, default=900.0, help="seconds (default: %(default)s)")
    p.add_argument("--install-only", action="store_true", help="create the vLLM venv, print its python and exit")
    p.add_argument("--reinstall", action="store_true", help="with --install-only: recreate the vLLM venv")
    p.set_defaults(func=run_serve, extra=[])
    return p


def run_serve(args: argparse.Namespace) -> int:
    """Run ``trprompt serve`` for parsed ``args``; returns the exit code."""
    from trprompt_dspy.serving.server import VLLMServer
    from trprompt_dspy.serving.venv import install_vllm_venv

    if args.install_only:
        python = install_vllm_venv(device=args.device, reinstall=args.reinstall)
        print(python)
        return 0
    if not args.model:
        raise ValueError("trprompt serve needs a MODEL (a preset such as qwen2.5-coder-0.5b-instruct, or a folder); "
                         "or pass --install-only.")
    server = VLLMServer(args.model, port=args.port, host=args.host, served_model_name=args.served_model_name,
                        max_model_len=args.max_model_len, enable_lora=args.enable_lora or bool(args.lora_module),
                        max_lora_rank=args.max_lora_rank, lora_modules=dict(args.lora_module),
                        kv_cache_gb=args.kv_cache_gb, device=args.device,
                        tensor_parallel_size=args.tensor_parallel_size, extra_args=args.extra,
                        startup_timeout=args.startup_timeout)

    def _terminate(signum: int, frame: Any) -> None:  # SIGTERM/SIGHUP: leave through the finally below
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, _terminate) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        server.start()
        print(f"vLLM is serving {server.model_name} at {server.base_url} (ready after {server.startup_seconds:.1f} s; "
              f"log: {server.log_path})")
        print("Use it from DSPy:\n    import dspy\n    lm = " + server.lm_snippet(temperature=0.0, max_tokens=512))
        if server.enable_lora:
            print(f"Load adapters at run time: POST {server.base_url}/load_lora_adapter "
                  '{"lora_name": NAME, "lora_path": FOLDER}, then use model NAME.')
        print("Press Ctrl-C to stop.", flush=True)
        while server.running:
            time.sleep(1.0)
        print(f"trprompt serve: the vLLM server exited on its own (code {server._group.returncode if server._group else '?'}); "
              f"see {server.log_path}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nStopping the vLLM server...", file=sys.stderr, flush=True)
        return 0
    finally:
        server.stop()
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)
