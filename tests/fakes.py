"""Scripted LMs for unit tests: a real ``dspy.LM`` whose engine answers from a Python function.

``scripted_lm(fn)`` gives an LM whose replies are ``fn(system, user) -> str``. ``arithmetic_responder``
answers DSPy ChatAdapter prompts generically: it fills every output field listed in the system message,
computing ``answer`` from the "a + b" in the question, and answers TextGrad's prompts with well-formed
gradients and ``<IMPROVED_VARIABLE>`` updates.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable

import dspy
from dspy.lm15 import Message, Response, TextPart, Usage


class ScriptedEngine:
    """A DSPy 3.4 engine (``complete(request) -> Response``) backed by a function."""

    def __init__(self, fn: Callable[[str, str], str]) -> None:
        self.fn = fn
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def complete(self, request):  # noqa: ANN001
        system = request.system if isinstance(request.system, str) else "".join(
            getattr(p, "text", "") for p in (request.system or ()))
        user = "\n".join((m.text or "") for m in request.messages if m.role == "user")
        with self._lock:
            self.calls.append((system, user))
        text = self.fn(system, user)
        return Response(id=None, model=request.model, message=Message.assistant([TextPart(text)]),
                        finish_reason="stop", usage=Usage(input_tokens=len(user.split()), output_tokens=len(text.split())))

    def close(self) -> None:
        pass

    def __deepcopy__(self, memo):  # noqa: ANN001
        return self


def scripted_lm(fn: Callable[[str, str], str], name: str = "scripted") -> dspy.LM:
    return dspy.LM(f"local/{name}", engine=ScriptedEngine(fn), cache=False)


def output_fields(system: str) -> list[str]:
    m = re.search(r"Your output fields are:(.*?)(?:All interactions|\n\n)", system, re.S)
    return re.findall(r"`(\w+)`", m.group(1)) if m else []


def solve(text: str) -> str:
    m = re.search(r"(-?\d+)\s*\+\s*(-?\d+)", text)
    return str(int(m.group(1)) + int(m.group(2))) if m else "0"


def arithmetic_responder(system: str, user: str) -> str:
    """Answer ChatAdapter prompts (any signature) and TextGrad prompts deterministically."""
    if "<IMPROVED_VARIABLE>" in system or "<IMPROVED_VARIABLE>" in user:
        return "<IMPROVED_VARIABLE>The response adds the two numbers carefully and states the sum.</IMPROVED_VARIABLE>"
    fields = output_fields(system)
    if not fields:  # TextGrad loss / gradient calls: free text
        return "The instructions could stress checking the arithmetic before answering."
    question = user.split("[[ ## question ## ]]")[-1] if "[[ ## question ## ]]" in user else user
    parts = []
    for f in fields:
        if f == "answer":
            value = solve(question)
        elif f == "instruction":
            value = "Add the two numbers and give only the sum."
        elif f == "textual_reward":
            value = "The outcome was good: the arithmetic was handled step by step."
        else:
            value = f"{f} text"
        parts.append(f"[[ ## {f} ## ]]\n{value}")
    return "\n\n".join(parts) + "\n\n[[ ## completed ## ]]"
