"""Old import paths of modules that moved in the 0.2 layout: they keep working for one release, with a warning.

``import trprompt_dspy.metrics`` (old) gives the very module ``trprompt_dspy.tasks.metrics`` (new): the same
object, so ``isinstance`` checks and monkeypatches agree whichever path was used. A
:class:`DeprecationWarning` names the new path. Nothing is written to disk; the alias is a
``sys.meta_path`` finder installed when ``trprompt_dspy`` is imported.

Example:
    >>> import importlib, warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     old = importlib.import_module("trprompt_dspy.math_equivalence")
    >>> old is importlib.import_module("trprompt_dspy.tasks.math_equivalence"), caught[0].category.__name__
    (True, 'DeprecationWarning')
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

__all__ = ["MOVED", "install"]

#: Old module path -> new module path (removed in 0.3). ``trprompt_dspy.loop`` (the run, never public) is
#: now the package of the loop's steps, so it has no alias: its ``TRPromptRun`` is in ``loop.run``.
MOVED: dict[str, str] = {f"trprompt_dspy.{old}": f"trprompt_dspy.{new}" for old, new in {
    "rollouts": "loop.rollouts",
    "reward": "loop.textual_reward",
    "refine": "loop.refine_reward",
    "metric_adapter": "loop.metric_adapter",
    "program": "compiled.program",
    "artifact": "compiled.artifact",
    "prompt_model": "backends.prompt_model",
    "prompt_model.base": "backends.prompt_model.base",
    "prompt_model.fake": "backends.prompt_model.fake",
    "prompt_model.hf": "backends.prompt_model.hf",
    "prompt_model.lm_writer": "backends.prompt_model.lm_writer",
    "prompt_model.pinned": "backends.prompt_model.pinned",
    "prompt_model.vllm": "backends.prompt_model.vllm",
    "finetune": "backends.prompt_model.lora_training",
    "stack": "backends.stack",
    "datasets": "tasks.datasets",
    "metrics": "tasks.metrics",
    "math_equivalence": "tasks.math_equivalence",
    "checkpoint": "runtime.checkpoint",
    "atomic": "runtime.atomic",
    "faults": "runtime.faults",
    "usage": "runtime.usage",
    "parallel": "runtime.parallel",
    "validation": "runtime.validation",
    "cli": "apps.cli",
    "demo": "apps.demo",
    "report": "apps.report",
}.items()}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(f"{spec.name} moved to {self.new}; the old path stops working in trprompt_dspy 0.3.",
                      DeprecationWarning, stacklevel=4)
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:  # the new module is already executed
        return None


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None, target: object = None
                  ) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new))


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (idempotent)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
