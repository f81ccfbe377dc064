"""TextGrad's engine on an explicit ``dspy.LM``: every TextGrad call goes through DSPy (callbacks, usage, retries).

TextGrad is given this engine at every call (``engine=``); its process-wide backward engine is never set,
so two compiles in one process never share one. textgrad is imported when the first engine is built.
"""

from __future__ import annotations

import threading
from typing import Any

import dspy

from trprompt_dspy._lazy import import_textgrad

__all__ = ["DSPyTextGradEngine"]

#: DSPyTextGradEngine -> its subclass that also derives from textgrad.EngineLM (built on first use).
_TG_ENGINE_CLASSES: dict[type, type] = {}


class DSPyTextGradEngine:
    """A TextGrad engine backed by any ``dspy.LM``, with call and token counters.

    Instances are real ``textgrad.EngineLM`` subclasses (the subclass is created on first instantiation,
    so importing this module does not import textgrad). Both ``generate`` and ``__call__`` are overridden
    (``EngineLM.__call__`` is a no-op).

    Args:
        lm: The ``dspy.LM`` (or any ``dspy.BaseLM``) to call.
        temperature: Sampling temperature passed with each request (``None``: the LM's default).
        max_tokens: Output cap per call (``None``: the LM's default).
        retry: Retry transient LM failures (timeouts, 5xx, dropped connections) with this
            :class:`~trprompt_dspy.runtime.faults.RetryPolicy` (``None``: no retries beyond the LM's own).

    Attributes:
        calls: Number of engine calls so far.
        input_tokens / output_tokens: Token usage reported by the LM (0 when it reports none).

    Example:
        >>> from dspy.utils import DummyLM
        >>> eng = DSPyTextGradEngine(DummyLM([{"x": "hi"}]))
        >>> "hi" in eng("Say hi", system_prompt="Be brief."), eng.calls
        (True, 1)
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> DSPyTextGradEngine:
        tg = import_textgrad()
        if issubclass(cls, tg.EngineLM):
            return object.__new__(cls)
        impl = _TG_ENGINE_CLASSES.get(cls)
        if impl is None:
            impl = type(cls.__name__, (cls, tg.EngineLM), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
            _TG_ENGINE_CLASSES[cls] = impl
        return object.__new__(impl)

    def __init__(self, lm: dspy.BaseLM, *, temperature: float | None = None, max_tokens: int | None = None,
                 retry: Any = None):
        if not isinstance(lm, dspy.BaseLM):
            raise TypeError(f"DSPyTextGradEngine needs a dspy.LM; got {type(lm).__name__}: {lm!r}.")
        self.lm = lm
        self.model_string = f"dspy:{lm.model}"
        self.system_prompt = "You are a helpful, creative, and smart assistant."
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.retry = retry
        self.calls = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"DSPyTextGradEngine(model={self.lm.model!r}, calls={self.calls})"

    def generate(self, content: Any, system_prompt: str | None = None, **kwargs: Any) -> str:
        """Send one prompt (and system prompt) to the LM and return its text."""
        from dspy.lm15 import Config, Message, Request

        if not isinstance(content, str):  # TextGrad's multimodal path passes a list of parts
            content = "\n".join(c for c in content if isinstance(c, str))
        system = system_prompt or self.system_prompt
        config = Config(temperature=self.temperature, max_tokens=self.max_tokens)
        request = Request(model=self.lm.model, system=system, messages=(Message.user(content),), config=config)
        response = self.retry.call(self.lm, request) if self.retry is not None else self.lm(request)
        text = response.text or ""
        usage = getattr(response, "usage", None)
        with self._lock:
            self.calls += 1
            self.input_tokens += int(getattr(usage, "input_tokens", 0) or 0)
            self.output_tokens += int(getattr(usage, "output_tokens", 0) or 0)
        return text

    def __call__(self, content: Any, **kwargs: Any) -> str:
        return self.generate(content, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> DSPyTextGradEngine:
        return self  # a client of a shared LM, like the LM itself

    def usage(self) -> dict[str, int]:
        return {"calls": self.calls, "input_tokens": self.input_tokens, "output_tokens": self.output_tokens}
