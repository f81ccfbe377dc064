"""trprompt_dspy: TRPrompt (query-aware prompt optimization from textual rewards) as a DSPy optimizer.

Quick start::

    import dspy
    from trprompt_dspy import TRPromptOptimizer
    from trprompt_dspy.tasks.metrics import gsm8k_feedback_metric

    dspy.configure(lm=dspy.LM("openai/my-model", api_base="http://127.0.0.1:8000/v1", api_key="EMPTY"))
    program = dspy.ChainOfThought("question -> answer")
    compiled = TRPromptOptimizer(metric=gsm8k_feedback_metric, auto="light").compile(program, trainset=train)
    compiled(question="...").query_instruction   # the instruction the prompt model wrote for this query

Importing this package is light: torch, transformers, peft, trl and textgrad load only when used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from trprompt_dspy import _moved

__version__ = "0.1.0"

# Public name -> module that defines it (imported on first access; PEP 562).
_EXPORTS = {
    "TRPromptOptimizer": "trprompt_dspy.optimizer",
    "DEFAULT_INITIAL_REWARD": "trprompt_dspy.optimizer",
    "TRPromptResult": "trprompt_dspy.results",
    "IterationStats": "trprompt_dspy.results",
    "LoraSettings": "trprompt_dspy.config",
    "SFTSettings": "trprompt_dspy.config",
    "Budget": "trprompt_dspy.config",
    "QueryAwarePredict": "trprompt_dspy.compiled.program",
    "save_compiled": "trprompt_dspy.compiled.artifact",
    "load_compiled": "trprompt_dspy.compiled.artifact",
    "PromptModel": "trprompt_dspy.backends.prompt_model.base",
    "InstructionRequest": "trprompt_dspy.backends.prompt_model.base",
    "HFPromptModel": "trprompt_dspy.backends.prompt_model.hf",
    "LMInstructionWriter": "trprompt_dspy.backends.prompt_model.lm_writer",
    "FakePromptModel": "trprompt_dspy.backends.prompt_model.fake",
    "VLLMPromptModel": "trprompt_dspy.backends.prompt_model.vllm",
    "VLLMServer": "trprompt_dspy.serving.server",
    "ModelStack": "trprompt_dspy.backends.stack",
    "PinnedPromptModel": "trprompt_dspy.backends.prompt_model.pinned",
    "TRPromptError": "trprompt_dspy.errors",
    "CompileError": "trprompt_dspy.runtime.faults",
    "ErrorBudgetExceededError": "trprompt_dspy.runtime.faults",
    "resolve_model": "trprompt_dspy.models",
    "local_lm": "trprompt_dspy.models",
    "list_presets": "trprompt_dspy.models",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # pragma: no cover
    from trprompt_dspy.backends.prompt_model.base import InstructionRequest, PromptModel
    from trprompt_dspy.backends.prompt_model.fake import FakePromptModel
    from trprompt_dspy.backends.prompt_model.hf import HFPromptModel
    from trprompt_dspy.backends.prompt_model.lm_writer import LMInstructionWriter
    from trprompt_dspy.backends.prompt_model.pinned import PinnedPromptModel
    from trprompt_dspy.backends.prompt_model.vllm import VLLMPromptModel
    from trprompt_dspy.backends.stack import ModelStack
    from trprompt_dspy.compiled.artifact import load_compiled, save_compiled
    from trprompt_dspy.compiled.program import QueryAwarePredict
    from trprompt_dspy.config import Budget, LoraSettings, SFTSettings
    from trprompt_dspy.errors import TRPromptError
    from trprompt_dspy.models import list_presets, local_lm, resolve_model
    from trprompt_dspy.optimizer import DEFAULT_INITIAL_REWARD, TRPromptOptimizer
    from trprompt_dspy.results import IterationStats, TRPromptResult
    from trprompt_dspy.runtime.faults import CompileError, ErrorBudgetExceededError
    from trprompt_dspy.serving.server import VLLMServer


_moved.install()  # pre-0.2 import paths (trprompt_dspy.metrics, .program, ...) keep working, with a warning


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'trprompt_dspy' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
