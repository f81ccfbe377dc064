"""Offline stand-ins for a dry run: compile a program in seconds with no model and no network.

A real TRPrompt compile needs three models (the prompt model, the target LM and the reward LM). To check
your program, metric and data wiring before paying for that, swap them for the stand-ins here:

* :class:`FakePromptModel` -- a prompt model that writes instructions from a template and "trains" by
  writing a small JSON folder (re-exported from :mod:`trprompt_dspy.backends.prompt_model.fake`);
* :func:`scripted_lm` -- a real ``dspy.LM`` whose replies come from a Python function
  ``fn(system, user) -> str`` (the LM call goes through DSPy's normal machinery: adapters, callbacks,
  usage tracking);
* :func:`arithmetic_responder` -- such a function: it answers any DSPy ``ChatAdapter`` prompt by filling
  every output field (``answer`` gets the sum of the first ``a + b`` in the question) and answers
  TextGrad's prompts with well-formed gradients and updates;
* :func:`addition_examples` -- a toy dataset of ``"What is a + b?"`` questions that fits the responder.

None of this learns anything: it exercises the whole loop (rollouts, textual rewards, fine-tuning calls,
TextGrad, validation, checkpoints, saving) so that errors in *your* code surface in seconds.

Example:
    >>> import dspy
    >>> from trprompt_dspy import TRPromptOptimizer
    >>> lm = scripted_lm(arithmetic_responder)
    >>> with dspy.context(lm=lm):
    ...     dspy.Predict("question -> answer")(question="What is 2 + 3?").answer
    '5'
    >>> opt = TRPromptOptimizer(
    ...     metric=lambda gold, pred, trace=None: gold.answer == pred.answer,
    ...     prompt_model=FakePromptModel(template="Add the two numbers, then state the sum."),
    ...     num_iterations=1, queries_per_iteration=2, prompts_per_query=2, textgrad_steps=0, val_size=2,
    ...     display_progress=False)
    >>> with dspy.context(lm=lm):
    ...     compiled = opt.compile(dspy.Predict("question -> answer"), trainset=addition_examples(6))
    ...     compiled(question="What is 20 + 22?").answer
    '42'
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any

import dspy

from trprompt_dspy.backends.prompt_model.fake import FakePromptModel

__all__ = ["FakePromptModel", "ScriptedEngine", "scripted_lm", "arithmetic_responder",
           "instruction_following_responder", "addition_examples", "output_fields", "first_sum"]


class ScriptedEngine:
    """A DSPy 3.4 engine (``complete(request) -> Response``) backed by ``fn(system, user) -> str``.

    Args:
        fn: Called once per LM call with the system prompt and the user turns joined by newlines.

    Attributes:
        calls: ``(system, user)`` of every call, in call order (thread-safe).

    Example:
        >>> engine = ScriptedEngine(lambda system, user: "hello")
        >>> lm = dspy.LM("local/scripted", engine=engine, cache=False)
        >>> lm("Say hello.")
        ['hello']
        >>> len(engine.calls)
        1
    """

    def __init__(self, fn: Callable[[str, str], str]) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable(system: str, user: str) -> str; got {fn!r}.")
        self.fn = fn
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def complete(self, request: Any) -> Any:
        """Answer one ``dspy.lm15.Request`` with ``fn(system, user)``."""
        from dspy.lm15 import Message, Response, TextPart, Usage

        system = request.system if isinstance(request.system, str) else "".join(
            getattr(p, "text", "") for p in (request.system or ()))
        user = "\n".join((m.text or "") for m in request.messages if m.role == "user")
        with self._lock:
            self.calls.append((system, user))
        text = self.fn(system, user)
        if not isinstance(text, str):
            raise TypeError(f"The scripted function must return a str; got {type(text).__name__}: {text!r:.200}.")
        return Response(id=None, model=request.model, message=Message.assistant([TextPart(text)]),
                        finish_reason="stop",
                        usage=Usage(input_tokens=len(user.split()), output_tokens=len(text.split())))

    def close(self) -> None:
        """Nothing to release."""

    def __deepcopy__(self, memo: dict[int, Any]) -> ScriptedEngine:
        return self  # program copies share one engine (and one call log)


def scripted_lm(fn: Callable[[str, str], str], name: str = "scripted") -> dspy.LM:
    """A ``dspy.LM`` (no network, no cache) whose replies are ``fn(system, user)``.

    Args:
        fn: ``fn(system_prompt, user_text) -> reply``; see :func:`arithmetic_responder`.
        name: Model name shown in DSPy's history and usage (``"local/<name>"``).

    Returns:
        The LM; its engine (with the call log) is ``lm.engine``.

    Example:
        >>> lm = scripted_lm(lambda system, user: "[[ ## answer ## ]]\\n4\\n\\n[[ ## completed ## ]]")
        >>> with dspy.context(lm=lm):
        ...     dspy.Predict("question -> answer")(question="2 + 2?").answer
        '4'
    """
    return dspy.LM(f"local/{name}", engine=ScriptedEngine(fn), cache=False)


def output_fields(system: str) -> list[str]:
    """The output field names a DSPy ChatAdapter system prompt asks for (``[]`` for other prompts).

    Example:
        >>> output_fields("Your output fields are:" + chr(10) + "1. `reasoning` (str)" + chr(10) + "2. `answer` (str)" + chr(10) * 2)
        ['reasoning', 'answer']
    """
    m = re.search(r"Your output fields are:(.*?)(?:All interactions|\n\n)", system, re.S)
    return re.findall(r"`(\w+)`", m.group(1)) if m else []


def first_sum(text: str) -> str:
    """The sum of the first ``a + b`` in ``text`` as a string (``"0"`` when there is none).

    Example:
        >>> first_sum("What is 20 + 22?"), first_sum("no sum")
        ('42', '0')
    """
    m = re.search(r"(-?\d+)\s*\+\s*(-?\d+)", text)
    return str(int(m.group(1)) + int(m.group(2))) if m else "0"


def arithmetic_responder(system: str, user: str) -> str:
    """Deterministic replies for ChatAdapter prompts (any signature) and for TextGrad's prompts.

    * A DSPy prompt gets every output field named in its system message: ``answer`` holds the sum of the
      first ``a + b`` in the question, ``instruction`` and ``textual_reward`` get fixed sentences, any
      other field gets ``"<field> text"``.
    * A TextGrad update prompt gets ``<IMPROVED_VARIABLE>...</IMPROVED_VARIABLE>``; other TextGrad
      prompts (loss, gradient) get one sentence of feedback.

    Example:
        >>> print(arithmetic_responder("Your output fields are:\\n1. `answer` (str)\\n\\n", "What is 2 + 5?"))
        [[ ## answer ## ]]
        7
        <BLANKLINE>
        [[ ## completed ## ]]
    """
    if "<IMPROVED_VARIABLE>" in system or "<IMPROVED_VARIABLE>" in user:
        return "<IMPROVED_VARIABLE>The response adds the two numbers carefully and states the sum.</IMPROVED_VARIABLE>"
    fields = output_fields(system)
    if not fields:  # TextGrad loss / gradient calls: free text
        return "The instructions could stress checking the arithmetic before answering."
    question = user.split("[[ ## question ## ]]")[-1] if "[[ ## question ## ]]" in user else user
    parts = []
    for f in fields:
        if f == "answer":
            value = first_sum(question)
        elif f == "instruction":
            value = "Add the two numbers and give only the sum."
        elif f == "textual_reward":
            value = "The outcome was good: the arithmetic was handled step by step."
        else:
            value = f"{f} text"
        parts.append(f"[[ ## {f} ## ]]\n{value}")
    return "\n\n".join(parts) + "\n\n[[ ## completed ## ]]"


def instruction_following_responder(marker: str, *, helps: bool = True) -> Callable[[str, str], str]:
    """An :func:`arithmetic_responder` whose answers depend on the instruction in the system prompt.

    With ``helps=True`` the sum is right only when ``marker`` appears in the system prompt (so a program
    whose prompt model writes an instruction holding ``marker`` beats the plain student); with
    ``helps=False`` it is right only when ``marker`` is absent (the instruction hurts). Wrong answers are
    the sum plus one. Use it to exercise no-regression selection offline.

    Example:
        >>> fn = instruction_following_responder("state the sum")
        >>> plain = "Your output fields are:" + chr(10) + "1. `answer` (str)" + chr(10) * 2
        >>> fn(plain, "What is 2 + 5?").split()[5], fn(plain + "Please state the sum.", "What is 2 + 5?").split()[5]
        ('8', '7')
    """
    def respond(system: str, user: str) -> str:
        reply = arithmetic_responder(system, user)
        if (marker in system) == helps or "[[ ## answer ## ]]" not in reply:
            return reply
        question = user.split("[[ ## question ## ]]")[-1] if "[[ ## question ## ]]" in user else user
        right = first_sum(question)
        return reply.replace(f"[[ ## answer ## ]]\n{right}\n", f"[[ ## answer ## ]]\n{int(right) + 1}\n", 1)

    return respond


def addition_examples(n: int, start: int = 0) -> list[dspy.Example]:
    """``n`` examples ``"What is i + (i+1)?" -> str(2i + 1)`` for ``i`` from ``start``, inputs set.

    Example:
        >>> ex = addition_examples(2, start=10)[1]
        >>> ex.question, ex.answer, list(ex.inputs().keys())
        ('What is 11 + 12?', '23', ['question'])
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer; got n={n!r}.")
    return [dspy.Example(question=f"What is {i} + {i + 1}?", answer=str(2 * i + 1)).with_inputs("question")
            for i in range(start, start + n)]
