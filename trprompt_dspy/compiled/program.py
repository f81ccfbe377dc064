"""Query-aware predictors: the compiled form of a TRPrompt-optimized DSPy program.

A compiled program keeps its structure and predictor names; each selected ``dspy.Predict`` leaf is
replaced by a :class:`QueryAwarePredict`. On every call it

1. builds an :class:`~trprompt_dspy.backends.prompt_model.base.InstructionRequest` from its role (predictor
   name), :func:`describe_task` and :func:`render_query` of the inputs, and the optimal textual reward t*;
2. asks the prompt model Π for an instruction (greedy by default);
3. answers with the signature's **original instructions followed by the query-specific one**
   (:func:`compose_instructions`). Keeping the task instructions means a weak or empty instruction
   never loses the task's framing; an empty instruction falls back to the original instructions alone;
4. returns the prediction with the instruction under ``query_instruction``.

The prompt model is a runtime attribute (never saved). :func:`instruction_context` overrides it, the
reward and the sampling for one block (a rollout) and records every instruction; it lives in DSPy's
context overrides, so it also reaches workers of ``dspy.Evaluate`` / ``Module.batch`` started inside it.

Example:
    >>> import dspy
    >>> from trprompt_dspy.backends.prompt_model.fake import FakePromptModel
    >>> program = dspy.ChainOfThought("question -> answer")
    >>> program = install_query_aware(program, prompt_model=FakePromptModel(), optimal_reward="Correct.")
    >>> [name for name, _ in query_aware_predictors(program)]
    ['predict']

Saving (see :mod:`trprompt_dspy.compiled.artifact`): ``save_compiled`` writes ``program.json`` (DSPy JSON state), ``adapter/`` (the prompt model's
active adapter, safetensors + JSON only) and ``trprompt.json`` (sidecar). ``load_compiled`` loads it
into a fresh instance of the **same program class** (``load_compiled(MyProgram(), "out/", prompt_model=pm)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import dspy
from dspy.primitives.module import set_attribute_by_name

from trprompt_dspy.backends.prompt_model.base import (
    DEFAULT_MAX_INSTRUCTION_TOKENS,
    InstructionRequest,
    PromptModel,
    is_no_instruction,
)

__all__ = [
    "QueryAwarePredict", "InstructionCall", "instruction_context", "install_query_aware",
    "attach_prompt_model", "query_aware_predictors",
    "describe_task", "render_query", "clean_instruction", "compose_instructions",
]

logger = logging.getLogger(__name__)

DEFAULT_GENERATION: dict[str, Any] = {"temperature": 0.0, "max_new_tokens": DEFAULT_MAX_INSTRUCTION_TOKENS}
MAX_INSTRUCTION_CHARS = 1200
MAX_VALUE_CHARS = 2000
INSTRUCTION_KEY = "query_instruction"
_CTX_KEY = "trprompt_instruction_overrides"
_LABEL = re.compile(r"^\s*(?:\*\*)?(?:instruction|instructions|prompt)\s*:\s*(?:\*\*)?\s*", re.IGNORECASE)


# ---------------------------------------------------------------------------- pure helpers
def describe_task(signature: type[dspy.Signature]) -> str:
    """The task text of a request: field names plus the signature's base instructions.

    Example:
        >>> describe_task(dspy.Signature("question -> answer", "Answer briefly."))
        'question -> answer\\nInstructions: Answer briefly.'
    """
    sig = dspy.ensure_signature(signature)
    head = f"{', '.join(sig.input_fields)} -> {', '.join(sig.output_fields)}"
    base = (sig.instructions or "").strip()
    return f"{head}\nInstructions: {base}" if base else head


def _render_value(value: Any) -> str:
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
        except (TypeError, ValueError):
            text = str(value)
    if len(text) > MAX_VALUE_CHARS:
        text = f"{text[:MAX_VALUE_CHARS]} ... [{len(text) - MAX_VALUE_CHARS} more characters]"
    return text


def render_query(signature: type[dspy.Signature], inputs: Mapping[str, Any]) -> str:
    """Input fields as ``"name: value"`` lines in signature order; other keys are ignored.

    Non-string values are JSON-encoded; each value is cut at 2000 characters.

    Example:
        >>> render_query(dspy.Signature("question, context -> answer"), {"context": [1], "question": "Why?"})
        'question: Why?\\ncontext: [1]'
    """
    sig = dspy.ensure_signature(signature)
    return "\n".join(f"{name}: {_render_value(inputs[name])}" for name in sig.input_fields if name in inputs)


def clean_instruction(text: str | None, max_chars: int = MAX_INSTRUCTION_CHARS) -> str:
    """Strip whitespace, a leading ``Instruction:`` label, wrapping quotes; cap at ``max_chars``.

    The prompt model's abstention (:data:`~trprompt_dspy.backends.prompt_model.base.NO_INSTRUCTION`) becomes
    ``""``: the predictor then runs with its own instructions only, as the uncompiled program does.

    Example:
        >>> clean_instruction('Instruction: "Convert units first."'), clean_instruction("(no instruction)")
        ('Convert units first.', '')
    """
    text = _LABEL.sub("", (text or "").strip(), count=1).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    if is_no_instruction(text):
        return ""
    if len(text) > max_chars:
        cut = text[:max_chars]
        space = cut.rfind(" ")
        text = (cut[:space] if space > max_chars - 200 else cut).rstrip()
    return text


def compose_instructions(base: str, instruction: str) -> str:
    """The instructions the target LM sees: base task instructions, then the query-specific one."""
    base, instruction = (base or "").strip(), (instruction or "").strip()
    if not instruction:
        return base
    if not base:
        return instruction
    return f"{base}\n\nInstruction for this input:\n{instruction}"


# ---------------------------------------------------------------------------- context
@dataclass(frozen=True)
class InstructionCall:
    """One instruction written during a program run (appended to an :func:`instruction_context` recorder)."""

    request: InstructionRequest
    instruction: str
    predictor_name: str


@dataclass(frozen=True)
class _Overrides:
    prompt_model: Any = None
    reward: str | Mapping[str, str] | None = None
    temperature: float | None = None
    seed: int | None = None
    recorder: list[InstructionCall] | None = None


@contextlib.contextmanager
def instruction_context(
    *,
    prompt_model: PromptModel | None = None,
    reward: str | Mapping[str, str] | None = None,
    temperature: float | None = None,
    seed: int | None = None,
    recorder: list[InstructionCall] | None = None,
) -> Iterator[None]:
    """Override how query-aware predictors get their instruction inside this block.

    Enter it inside the thread (or ``ParallelExecutor`` worker) that runs the program; it is stored in
    DSPy's context overrides, so ``dspy.Evaluate``/``Module.batch`` workers started inside inherit it.
    ``None`` arguments keep the enclosing value (an outer context, else the predictor's own settings).

    Args:
        prompt_model: Prompt model to use instead of the predictors' attached one.
        reward: Textual reward to condition on instead of each predictor's ``optimal_reward``; a mapping
            gives one per predictor role (roles missing from it keep their own reward).
        temperature: Sampling temperature instead of the predictors' ``generation["temperature"]``.
        seed: Seed passed to ``generate`` (temperature > 0 + seed = reproducible samples).
        recorder: A list; every instruction written is appended as an :class:`InstructionCall`.

    Example:
        >>> calls = []
        >>> with instruction_context(reward="Concise and correct.", temperature=0.8, seed=1, recorder=calls):
        ...     pred = program(question="2+2?")                                     # doctest: +SKIP
        >>> calls[0].request.reward                                                  # doctest: +SKIP
        'Concise and correct.'
    """
    if prompt_model is not None and not isinstance(prompt_model, PromptModel):
        raise TypeError(f"prompt_model must implement the PromptModel protocol; got {type(prompt_model).__name__}.")
    if reward is not None and not isinstance(reward, (str, Mapping)):
        raise TypeError(f"reward must be a str or a mapping role -> str; got {type(reward).__name__}.")
    if temperature is not None and (isinstance(temperature, bool) or float(temperature) < 0):
        raise ValueError(f"temperature must be a number >= 0; got {temperature!r}.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None; got {seed!r}.")
    if recorder is not None and not isinstance(recorder, list):
        raise TypeError(f"recorder must be a list (InstructionCall records are appended); got {type(recorder).__name__}.")
    outer = _current_overrides()
    merged = _Overrides(
        prompt_model=prompt_model if prompt_model is not None else outer.prompt_model,
        reward=reward if reward is not None else outer.reward,
        temperature=float(temperature) if temperature is not None else outer.temperature,
        seed=seed if seed is not None else outer.seed,
        recorder=recorder if recorder is not None else outer.recorder,
    )
    with dspy.context(**{_CTX_KEY: merged}):
        yield


def _current_overrides() -> _Overrides:
    found = dspy.settings.get(_CTX_KEY)
    return found if isinstance(found, _Overrides) else _Overrides()


def _check_generation(generation: Mapping[str, Any] | None) -> dict[str, Any]:
    if generation is None:
        return dict(DEFAULT_GENERATION)
    if not isinstance(generation, Mapping):
        raise TypeError(f"generation must be a dict like {DEFAULT_GENERATION}; got {type(generation).__name__}.")
    unknown = sorted(set(generation) - set(DEFAULT_GENERATION))
    if unknown:
        raise ValueError(f"generation has unknown key(s) {unknown}; allowed: {sorted(DEFAULT_GENERATION)}.")
    out = {**DEFAULT_GENERATION, **generation}
    temp, tokens = out["temperature"], out["max_new_tokens"]
    if isinstance(temp, bool) or not isinstance(temp, (int, float)) or temp < 0:
        raise ValueError(f"generation['temperature'] must be a number >= 0; got {temp!r}.")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"generation['max_new_tokens'] must be a positive integer; got {tokens!r}.")
    return {"temperature": float(temp), "max_new_tokens": tokens}


# ---------------------------------------------------------------------------- the predictor
class QueryAwarePredict(dspy.Predict):
    """A ``dspy.Predict`` whose instructions are rewritten per query by a prompt model.

    Saved state (``dump_state``/``load_state``, JSON): everything ``Predict`` saves plus
    ``optimal_reward`` (t*), ``role`` (the predictor name the prompt model sees) and ``generation``
    (``{"temperature": 0.0, "max_new_tokens": 48}``, :data:`~trprompt_dspy.backends.prompt_model.base.DEFAULT_MAX_INSTRUCTION_TOKENS`). ``prompt_model`` is runtime-only; copies
    (``deepcopy``/``reset_copy``) share it rather than copying model weights.

    Build one with :meth:`from_predict` or :func:`install_query_aware`.

    Example:
        >>> from dspy.utils import DummyLM
        >>> from trprompt_dspy.backends.prompt_model.fake import FakePromptModel
        >>> qa = QueryAwarePredict("question -> answer", optimal_reward="The answer is correct.", role="qa")
        >>> qa.prompt_model = FakePromptModel(template="Answer with the city name only.")
        >>> with dspy.context(lm=DummyLM([{"answer": "Paris"}])):
        ...     pred = qa(question="What is the capital of France?")
        >>> pred.answer, pred.query_instruction
        ('Paris', 'Answer with the city name only.')
    """

    def __init__(self, signature: Any, callbacks: list | None = None, *, optimal_reward: str = "",
                 role: str = "", generation: Mapping[str, Any] | None = None, **config: Any) -> None:
        super().__init__(signature, callbacks=callbacks, **config)
        if not isinstance(optimal_reward, str):
            raise TypeError(f"optimal_reward must be a str; got {type(optimal_reward).__name__}.")
        self.optimal_reward = optimal_reward
        self.role = role
        self.generation = _check_generation(generation)
        self.prompt_model: PromptModel | None = None

    @classmethod
    def from_predict(cls, pred: dspy.Predict, *, name: str, optimal_reward: str,
                     generation: Mapping[str, Any] | None = None,
                     prompt_model: PromptModel | None = None) -> QueryAwarePredict:
        """Wrap an existing predictor, keeping its signature, demos, LM, config and fields.

        Args:
            pred: The ``dspy.Predict`` leaf to replace.
            name: Its name in the program (becomes ``role``).
            optimal_reward: The optimal textual reward t*.
            generation: Sampling settings for the prompt model (temperature, max_new_tokens).
            prompt_model: Optional prompt model to attach right away.
        """
        if not isinstance(pred, dspy.Predict):
            raise TypeError(f"from_predict needs a dspy.Predict; got {type(pred).__name__} for {name!r}.")
        if type(pred) not in (dspy.Predict, cls):
            logger.warning("Predictor %r is a %s; its query-aware replacement keeps its state but behaves as "
                           "a plain dspy.Predict.", name, type(pred).__name__)
        new = cls(pred.signature, callbacks=list(getattr(pred, "callbacks", []) or []), optimal_reward=optimal_reward,
                  role=name, generation=generation, **pred.config)
        new.demos = list(pred.demos)
        new.lm = pred.lm
        new.traces, new.train = list(pred.traces), list(pred.train)
        new.fields = copy.deepcopy(getattr(pred, "fields", {}))
        new.stage = pred.stage
        new.prompt_model = prompt_model if prompt_model is not None else getattr(pred, "prompt_model", None)
        return new

    # -- state -----------------------------------------------------------------------------------
    def dump_state(self, json_mode: bool = True) -> dict[str, Any]:
        state = super().dump_state(json_mode=json_mode)
        state.update(optimal_reward=self.optimal_reward, role=self.role, generation=dict(self.generation))
        return state

    def load_state(self, state: dict[str, Any], *, allow_unsafe_lm_state: bool = False) -> QueryAwarePredict:
        reward, role = state.get("optimal_reward", self.optimal_reward), state.get("role", self.role)
        if not isinstance(reward, str) or not isinstance(role, str):
            raise ValueError(f"Invalid QueryAwarePredict state: optimal_reward and role must be strings; got "
                             f"optimal_reward={reward!r}, role={role!r}.")
        generation = _check_generation(state.get("generation", self.generation))
        super().load_state(state, allow_unsafe_lm_state=allow_unsafe_lm_state)
        self.optimal_reward, self.role, self.generation = reward, role, generation
        return self

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("prompt_model", None)  # runtime-only: never pickled, never deep-copied
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("prompt_model", None)

    def __copy__(self) -> QueryAwarePredict:
        new = self.__class__.__new__(self.__class__)
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo: dict[int, Any]) -> QueryAwarePredict:
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))  # drops history/callbacks, as for Predict
        new.prompt_model = self.prompt_model  # shared: copies must not duplicate model weights
        return new

    # -- inference --------------------------------------------------------------------------------
    def build_request(self, signature: type[dspy.Signature], inputs: Mapping[str, Any]) -> InstructionRequest:
        """The request this predictor sends for ``inputs`` (honours an :func:`instruction_context` reward)."""
        reward = _current_overrides().reward
        if isinstance(reward, Mapping):
            reward = reward.get(self.role)
        return InstructionRequest(predictor=self.role, task=describe_task(signature),
                                  query=render_query(signature, inputs),
                                  reward=self.optimal_reward if reward is None else str(reward))

    def query_instruction(self, signature: type[dspy.Signature], inputs: Mapping[str, Any]) -> str:
        """Ask the prompt model for this query's instruction (cleaned; ``""`` when it wrote nothing)."""
        ctx = _current_overrides()
        pm = ctx.prompt_model if ctx.prompt_model is not None else self.prompt_model
        if pm is None:
            raise RuntimeError(
                f"QueryAwarePredict {self.role!r} has no prompt model. Attach one with "
                "trprompt_dspy.compiled.program.attach_prompt_model(program, prompt_model), load the compiled program "
                "with trprompt_dspy.load_compiled(program, path, prompt_model=...), or run it inside "
                "instruction_context(prompt_model=...)."
            )
        request = self.build_request(signature, inputs)
        temperature = self.generation["temperature"] if ctx.temperature is None else ctx.temperature
        # No lock here: concurrent program runs must reach the backend together so it can batch them.
        out = pm.generate([request], temperature=temperature, n=1,
                          max_new_tokens=self.generation["max_new_tokens"], seed=ctx.seed)
        if not isinstance(out, list) or len(out) != 1 or not isinstance(out[0], list) or len(out[0]) != 1:
            raise RuntimeError(f"{type(pm).__name__}.generate broke the PromptModel contract: for 1 request and "
                               f"n=1 it must return [[instruction]]; got {out!r:.200}.")
        instruction = clean_instruction(out[0][0])
        if not instruction:
            logger.debug("Prompt model wrote an empty instruction for %r; using the base instructions.", self.role)
        if ctx.recorder is not None:
            ctx.recorder.append(InstructionCall(request, instruction, self.role))
        return instruction

    def _finish(self, pred: dspy.Prediction, sig: type[dspy.Signature], instruction: str) -> dspy.Prediction:
        if INSTRUCTION_KEY in sig.output_fields:
            logger.warning("Signature of %r has an output field %r; the query instruction is not attached.",
                           self.role, INSTRUCTION_KEY)
        else:
            pred[INSTRUCTION_KEY] = instruction
        return pred

    def forward(self, **kwargs: Any) -> dspy.Prediction:
        sig = dspy.ensure_signature(kwargs.pop("signature", self.signature))
        instruction = self.query_instruction(sig, kwargs)
        pred = super().forward(signature=sig.with_instructions(compose_instructions(sig.instructions, instruction)),
                               **kwargs)
        return self._finish(pred, sig, instruction)

    async def aforward(self, **kwargs: Any) -> dspy.Prediction:
        sig = dspy.ensure_signature(kwargs.pop("signature", self.signature))
        # generate() is blocking; a worker thread (with this context copied) keeps the event loop free.
        instruction = await asyncio.to_thread(self.query_instruction, sig, dict(kwargs))
        pred = await super().aforward(
            signature=sig.with_instructions(compose_instructions(sig.instructions, instruction)), **kwargs)
        return self._finish(pred, sig, instruction)


# ---------------------------------------------------------------------------- install / attach
def query_aware_predictors(program: dspy.Module) -> list[tuple[str, QueryAwarePredict]]:
    """``(name, predictor)`` for every :class:`QueryAwarePredict` in ``program.named_predictors()``."""
    return [(n, p) for n, p in program.named_predictors() if isinstance(p, QueryAwarePredict)]


def install_query_aware(
    program: dspy.Module,
    *,
    prompt_model: PromptModel | None,
    optimal_reward: str | Mapping[str, str],
    predictors: list[str] | None = None,
    generation: Mapping[str, Any] | None = None,
) -> dspy.Module:
    """Replace predictors of ``program`` **in place** with :class:`QueryAwarePredict` (names unchanged).

    Args:
        program: The (already copied) program to modify.
        prompt_model: The prompt model to attach (``None``: attach later with :func:`attach_prompt_model`).
        optimal_reward: t* for every predictor, or a mapping name -> t* covering the selected predictors.
        predictors: Names (from ``program.named_predictors()``) to make query-aware; ``None`` = all.
        generation: Prompt-model sampling settings (``temperature``, ``max_new_tokens``).

    Returns:
        ``program`` itself; if ``program`` is a bare ``dspy.Predict`` a new ``QueryAwarePredict``
        (a leaf cannot replace itself), so always use the return value.

    Example:
        >>> prog = install_query_aware(MyProgram(), prompt_model=pm, optimal_reward="Correct.",  # doctest: +SKIP
        ...                            predictors=["qa"])
    """
    if not isinstance(program, dspy.Module):
        raise TypeError(f"program must be a dspy.Module; got {type(program).__name__}.")
    if prompt_model is not None and not isinstance(prompt_model, PromptModel):
        raise TypeError(f"prompt_model must implement the PromptModel protocol; got {type(prompt_model).__name__}.")
    named = program.named_predictors()
    valid = [n for n, _ in named]
    if not named:
        raise ValueError(f"{type(program).__name__} has no dspy.Predict predictors to make query-aware.")
    if predictors is not None:
        if isinstance(predictors, str) or not all(isinstance(p, str) for p in predictors):
            raise TypeError(f"predictors must be a list of predictor names; got {predictors!r}.")
        unknown = [p for p in predictors if p not in valid]
        if unknown:
            raise ValueError(f"Unknown predictor name(s) {unknown}; the program's predictors are {valid}.")
    selected = [(n, p) for n, p in named if predictors is None or n in predictors]
    if isinstance(optimal_reward, Mapping):
        missing = [n for n, _ in selected if not isinstance(optimal_reward.get(n), str)]
        if missing:
            raise ValueError(f"optimal_reward mapping lacks a string for predictor(s) {missing}.")
    elif not isinstance(optimal_reward, str):
        raise TypeError(f"optimal_reward must be a str or a mapping name -> str; got {type(optimal_reward).__name__}.")
    gen = _check_generation(generation)
    for name, pred in selected:
        reward = optimal_reward[name] if isinstance(optimal_reward, Mapping) else optimal_reward
        new = QueryAwarePredict.from_predict(pred, name=name, optimal_reward=reward, generation=gen,
                                             prompt_model=prompt_model)
        if name == "self":
            return new
        set_attribute_by_name(program, name, new)
    return program


def attach_prompt_model(program: dspy.Module, prompt_model: PromptModel) -> dspy.Module:
    """Give every query-aware predictor (also inside frozen compiled sub-programs) ``prompt_model``."""
    if not isinstance(prompt_model, PromptModel):
        raise TypeError(f"prompt_model must implement the PromptModel protocol; got {type(prompt_model).__name__}.")
    found = [m for _, m in program.named_sub_modules(type_=QueryAwarePredict)]
    if not found:
        raise ValueError(f"{type(program).__name__} has no QueryAwarePredict; compile it with TRPromptOptimizer, "
                         "call install_query_aware(...), or load it with load_compiled(...).")
    for pred in found:
        pred.prompt_model = prompt_model
    return program
