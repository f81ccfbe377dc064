"""A prompt model pinned to one adapter: what each compiled program holds.

One loaded prompt model (a transformers model in memory, or a vLLM server connection) can serve many
compiled programs, but each compiled program must keep *its own* adapter: compiling a second program
with the same prompt model object must not change what the first one writes. :class:`PinnedPromptModel`
is a cheap view that remembers one adapter folder (or ``None`` for the bare base) and makes sure the
shared model has that adapter active for every ``generate`` it forwards.

Switching is coordinated per shared model: any number of ``generate`` calls for the *same* adapter run
concurrently (the backends batch them), and a call for a *different* adapter waits until those have
finished, switches, and runs. One compiled program therefore never switches; two programs used in
alternation switch each time (cheap on vLLM, where an adapter is loaded under a new name; a PEFT swap
in-process).

Example:
    >>> from trprompt_dspy.backends.prompt_model.fake import FakePromptModel
    >>> from trprompt_dspy.backends.prompt_model.base import InstructionRequest
    >>> shared = FakePromptModel(template="Base.")
    >>> a = PinnedPromptModel(shared, None)
    >>> shared.load_adapter(None)            # someone else changes the shared model ...
    >>> a.generate([InstructionRequest("qa", "q -> a", "q: 1?", "Correct.")])
    [['Base.']]
    >>> a.adapter_path is None               # ... the view keeps its own adapter
    True
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trprompt_dspy.backends.prompt_model.base import (
    DEFAULT_MAX_INSTRUCTION_TOKENS,
    InstructionRequest,
    PromptModel,
    SFTExample,
    TrainResult,
)

__all__ = ["PinnedPromptModel", "pin"]


class _Switch:
    """Readers share the active adapter; a writer (a switch) waits until no reader uses it."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.active: object = _UNSET
        self.readers = 0


_UNSET = object()
_SWITCHES: weakref.WeakKeyDictionary[Any, _Switch] = weakref.WeakKeyDictionary()
_SWITCHES_LOCK = threading.Lock()


def _switch_for(model: Any) -> _Switch:
    with _SWITCHES_LOCK:
        try:
            return _SWITCHES.setdefault(model, _Switch())
        except TypeError:  # not weak-referenceable: keep the switch on the object itself
            sw = getattr(model, "_trprompt_switch", None)
            if sw is None:
                sw = _Switch()
                model._trprompt_switch = sw
            return sw


class PinnedPromptModel:
    """A :class:`~trprompt_dspy.backends.prompt_model.base.PromptModel` view of ``model`` with ``adapter`` always active.

    Args:
        model: The shared prompt model (any backend).
        adapter: Adapter folder this view generates with; ``None`` for the bare base weights.

    ``train`` is not offered (a pinned view is for inference); ``load_adapter`` re-pins the view only.
    Copies (DSPy deep-copies programs) share the model and keep the pin.

    Example:
        >>> from trprompt_dspy.backends.prompt_model.fake import FakePromptModel
        >>> shared = FakePromptModel(template="Using {adapter}.")
        >>> view = PinnedPromptModel(shared, None)
        >>> req = InstructionRequest("qa", "q -> a", "q: 1?", "Correct.")
        >>> view.generate([req]), view.adapter_path, view.trainable
        ([['Using base.']], None, False)
    """

    trainable = False

    def __init__(self, model: PromptModel, adapter: str | os.PathLike[str] | None) -> None:
        if isinstance(model, PinnedPromptModel):
            model = model.model
        if not isinstance(model, PromptModel):
            raise TypeError(f"model must implement the PromptModel protocol; got {type(model).__name__}.")
        self.model = model
        self._adapter = None if adapter is None else str(adapter)

    @property
    def adapter_path(self) -> str | None:
        """The adapter this view generates with (``None``: the base model)."""
        return self._adapter

    @property
    def instruction_stats(self) -> Any:
        return getattr(self.model, "instruction_stats", None)

    def generate(self, requests: Sequence[InstructionRequest], *, temperature: float = 0.0, n: int = 1,
                 max_new_tokens: int = DEFAULT_MAX_INSTRUCTION_TOKENS, seed: int | None = None) -> list[list[str]]:
        """Forward to the shared model with this view's adapter active (see the module docstring)."""
        sw = _switch_for(self.model)
        with sw.cond:
            while sw.active != self._adapter and sw.readers > 0:
                sw.cond.wait()
            if _norm(self.model.adapter_path) != _norm(self._adapter):
                self.model.load_adapter(self._adapter)
            sw.active = self._adapter
            sw.readers += 1
        try:
            return self.model.generate(requests, temperature=temperature, n=n, max_new_tokens=max_new_tokens,
                                       seed=seed)
        finally:
            with sw.cond:
                sw.readers -= 1
                sw.cond.notify_all()

    def train(self, examples: Sequence[SFTExample], *, output_dir: str | Path, lora: Any, sft: Any,
              seed: int = 0) -> TrainResult:
        raise TypeError("A compiled program's prompt model is pinned to its adapter and cannot be trained; "
                        "train the shared model (PinnedPromptModel.model) or compile again.")

    def load_adapter(self, path: str | os.PathLike[str] | None) -> None:
        """Re-pin this view (the shared model switches on the next ``generate``)."""
        if path is not None:
            from trprompt_dspy.backends.prompt_model.lora_training import check_adapter_dir

            path = str(check_adapter_dir(path))
        self._adapter = path

    def describe(self) -> dict[str, Any]:
        return {**self.model.describe(), "adapter_path": self._adapter}

    def __deepcopy__(self, memo: dict) -> PinnedPromptModel:
        return PinnedPromptModel(self.model, self._adapter)

    def __copy__(self) -> PinnedPromptModel:
        return PinnedPromptModel(self.model, self._adapter)

    def __getattr__(self, name: str) -> Any:  # backend extras (dspy_lm, server, close...) pass through
        if name.startswith("_") or name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def __repr__(self) -> str:
        return f"PinnedPromptModel({self.model!r}, adapter={self._adapter!r})"


def _norm(path: str | None) -> str | None:
    return None if path is None else os.path.realpath(path)


def pin(model: PromptModel, adapter: str | os.PathLike[str] | None) -> PinnedPromptModel:
    """``PinnedPromptModel(model, adapter)``; unwraps a view given as ``model``."""
    return PinnedPromptModel(model, adapter)
