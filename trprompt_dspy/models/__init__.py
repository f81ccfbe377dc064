"""Offline model stack: presets shipped in pip wheels, GGUF -> HF conversion, and an in-process engine.

``import trprompt_dspy.models`` is light: torch and transformers load only when a model is converted,
loaded or run.

Example:
    >>> from trprompt_dspy.models import list_presets, resolve_model, local_lm
    >>> [p.name for p in list_presets()]
    ['smollm2-135m-instruct', 'qwen2.5-coder-0.5b-instruct', 'qwen2.5-coder-1.5b-instruct']
    >>> folder = resolve_model("smollm2-135m-instruct")     # doctest: +SKIP
    >>> lm = local_lm("smollm2-135m-instruct", max_tokens=32)  # a dspy.LM   # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from trprompt_dspy.models.engine import TransformersEngine, local_lm
from trprompt_dspy.models.hf_runtime import GenerationResult, generate_chats, load_causal_lm
from trprompt_dspy.models.presets import (
    DEFAULT_PROMPT_MODEL,
    DEFAULT_TARGET_MODEL,
    ModelPreset,
    UnknownModelError,
    WeightPart,
    get_preset,
    list_presets,
)
from trprompt_dspy.models.provision import (
    GGUFIntegrityError,
    ModelSourceMissingError,
    cache_dir,
    convert_gguf,
    ensure_gguf,
    fetch,
    fetch_and_convert,
    resolve_model,
)


def add_models_subcommand(subparsers: Any) -> Any:
    """Add ``trprompt models {list,fetch,path}``; see :func:`trprompt_dspy.models.cli.add_models_subcommand`."""
    from trprompt_dspy.models.cli import add_models_subcommand as _add

    return _add(subparsers)


__all__ = [
    "DEFAULT_PROMPT_MODEL",
    "DEFAULT_TARGET_MODEL",
    "GGUFIntegrityError",
    "GenerationResult",
    "ModelPreset",
    "ModelSourceMissingError",
    "TransformersEngine",
    "UnknownModelError",
    "WeightPart",
    "add_models_subcommand",
    "cache_dir",
    "convert_gguf",
    "ensure_gguf",
    "fetch",
    "fetch_and_convert",
    "generate_chats",
    "get_preset",
    "list_presets",
    "load_causal_lm",
    "local_lm",
    "resolve_model",
]
