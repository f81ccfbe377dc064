"""Input checks that run before any expensive work, with errors that say what to fix.

Example:
    >>> import dspy
    >>> validate_dataset([dspy.Example(question="1+1?", answer="2").with_inputs("question")], "trainset")
    >>> validate_dataset([], "trainset")
    Traceback (most recent call last):
    ...
    ValueError: trainset is empty. Pass a list of dspy.Example objects, e.g. [dspy.Example(question=..., answer=...).with_inputs('question')].
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import socket
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import dspy
from dspy.adapters.utils import annotation_allows_none

from trprompt_dspy.errors import TRPromptError
from trprompt_dspy.serving.http import ServerUnreachableError

logger = logging.getLogger(__name__)

__all__ = [
    "validate_dataset",
    "validate_program",
    "check_input_fields",
    "program_inputs",
    "ProgramInputs",
    "InputFieldMismatchError",
    "check_positive_int",
    "check_number",
    "check_writable_dir",
    "check_servers_reachable",
    "server_url_of",
    "ServerUnreachableError",
]


def validate_dataset(examples: Any, name: str) -> None:
    """Check that ``examples`` is a non-empty list of ``dspy.Example`` with inputs and labels set."""
    if examples is None or isinstance(examples, (str, bytes, dict)) or not isinstance(examples, Sequence):
        raise TypeError(f"{name} must be a list of dspy.Example objects; got {type(examples).__name__}.")
    if len(examples) == 0:
        raise ValueError(
            f"{name} is empty. Pass a list of dspy.Example objects, e.g. "
            "[dspy.Example(question=..., answer=...).with_inputs('question')]."
        )
    for i, ex in enumerate(examples):
        if not isinstance(ex, dspy.Example):
            raise TypeError(f"{name}[{i}] is a {type(ex).__name__}, not a dspy.Example.")
        if ex._input_keys is None:
            raise ValueError(
                f"{name}[{i}] has no input fields set. Call .with_inputs(...) on every example, e.g. "
                f"dspy.Example(question=..., answer=...).with_inputs('question'). Keys: {sorted(ex.keys())}."
            )
        if not ex.labels().keys():
            raise ValueError(
                f"{name}[{i}] has no gold label fields (every key is an input: {sorted(ex.inputs().keys())}). "
                "TRPrompt's textual rewards compare outputs with gold answers; add e.g. answer=... to each example."
            )


def validate_program(program: Any) -> list[str]:
    """Check that ``program`` is a ``dspy.Module`` with predictors; return their names."""
    if not isinstance(program, dspy.Module):
        raise TypeError(f"student must be a dspy.Module (e.g. dspy.ChainOfThought(...)); got {type(program).__name__}.")
    names = [n for n, _ in program.named_predictors()]
    if not names:
        raise ValueError(
            f"The student program {type(program).__name__} has no predictors to optimize "
            "(no dspy.Predict / ChainOfThought inside, or all of them are in sub-modules marked _compiled=True)."
        )
    return names


class InputFieldMismatchError(TRPromptError, ValueError):
    """The examples do not provide the inputs the program is called with (``program(**example.inputs())``).

    Left unchecked, DSPy only warns "Not all input fields were provided to module" on every call and the
    whole compile runs on empty queries, so :meth:`TRPromptOptimizer.compile` raises this before any model call.
    """


@dataclass(frozen=True)
class ProgramInputs:
    """The keyword arguments a program is called with, and how they were found.

    Attributes:
        required: Names every example must mark as inputs (``.with_inputs(...)``).
        accepted: Every input name the program takes, or ``None`` when it takes any (``**kwargs``).
        source: Where the names come from, for error messages, e.g. ``"MathCoT.forward(question)"``.
        certain: ``False`` when guessed from the predictors of a custom module whose ``forward`` takes only
            ``**kwargs`` (it may compute some predictor inputs itself, e.g. a retrieved ``context``).
    """

    required: tuple[str, ...]
    accepted: tuple[str, ...] | None
    source: str
    certain: bool = True


def program_inputs(program: dspy.Module) -> ProgramInputs | None:
    """Find the inputs ``program`` is called with; ``None`` when nothing can be said.

    The rules, first match wins:

    1. ``forward`` has named parameters (``def forward(self, question)``): those without a default are required;
       with no ``**kwargs`` nothing else is accepted (an extra input would make every call a ``TypeError``).
    2. The module carries its own ``signature`` (``dspy.Predict``, ``dspy.ReAct``): its input fields.
    3. Otherwise the predictors' input fields that no predictor produces. Certain for a built-in DSPy module
       with one predictor (``dspy.ChainOfThought``), a guess for anything else.

    Fields typed to allow ``None`` (``context: str | None``) are never required, as in DSPy itself.

    Example:
        >>> program_inputs(dspy.ChainOfThought("question, context -> answer")).required
        ('question', 'context')
        >>> class TwoStage(dspy.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.recall = dspy.Predict("question -> facts")
        ...         self.answer = dspy.ChainOfThought("facts, question -> answer")
        ...     def forward(self, question, hint=None):
        ...         return self.answer(facts=self.recall(question=question).facts, question=question)
        >>> spec = program_inputs(TwoStage())
        >>> spec.required, spec.accepted, spec.source
        (('question',), ('question', 'hint'), 'TwoStage.forward(question, hint=None)')
    """
    cls = type(program)
    from_forward = _forward_inputs(cls)
    if from_forward is not None:
        return from_forward
    own = getattr(program, "signature", None)
    if isinstance(own, type) and issubclass(own, dspy.Signature):
        return ProgramInputs(_required_fields(own), None, f"the signature of {cls.__name__} ({own.signature})")
    predictors = list(program.named_predictors())
    if not predictors:
        return None
    produced = {f for _, p in predictors for f in p.signature.output_fields}
    required = tuple(dict.fromkeys(f for _, p in predictors for f in _required_fields(p.signature)
                                   if f not in produced))
    if len(predictors) == 1:
        name, predictor = predictors[0]
        source = f"the signature of predictor {name!r} of {cls.__name__} ({predictor.signature.signature})"
    else:
        source = f"the predictors of {cls.__name__} (their inputs that no other predictor produces)"
    certain = len(predictors) == 1 and cls.__module__.split(".")[0] == "dspy"
    return ProgramInputs(required, None, source, certain)


def _forward_inputs(cls: type) -> ProgramInputs | None:
    """Rule 1 of :func:`program_inputs`: the named parameters of ``cls.forward`` (read from the class: reading
    ``forward`` off a DSPy module instance logs a warning)."""
    forward = getattr(cls, "forward", None)
    if not callable(forward):
        return None
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        return None
    if not isinstance(inspect.getattr_static(cls, "forward", None), staticmethod):
        params = params[1:]  # self
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not named:
        return None
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    shown = [p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in named]
    return ProgramInputs(
        required=tuple(p.name for p in named if p.default is p.empty),
        accepted=None if takes_any else tuple(p.name for p in named),
        source=f"{cls.__name__}.forward({', '.join(shown + (['**kwargs'] if takes_any else []))})",
    )


def _required_fields(signature: type[dspy.Signature]) -> tuple[str, ...]:
    return tuple(f for f, info in signature.input_fields.items() if not annotation_allows_none(info.annotation))


def check_input_fields(program: dspy.Module, examples: Sequence[dspy.Example], name: str) -> None:
    """Check that every example marks the program's inputs (see :func:`program_inputs`) as its inputs.

    Run it after :func:`validate_dataset`. Extra input keys are fine unless ``forward`` has no ``**kwargs``.
    When the inputs are only guessed (``ProgramInputs.certain`` is ``False``) an example must provide at least
    one of them to pass, and one missing some is logged as a warning instead of raising.

    Raises:
        InputFieldMismatchError: Naming the first bad example, its keys, what the program needs and the fix.

    Example:
        >>> program = dspy.ChainOfThought("question -> answer")
        >>> check_input_fields(program, [dspy.Example(question="1+1?", answer="2").with_inputs("question")], "trainset")
        >>> check_input_fields(program, [dspy.Example(q="1+1?", answer="2").with_inputs("q")], "trainset")
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        trprompt_dspy.runtime.validation.InputFieldMismatchError: trainset[0] lacks the input field(s) ['question'] ...
    """
    spec = program_inputs(program)
    if spec is None:
        return
    bad = []
    for i, ex in enumerate(examples):
        keys = set(ex.inputs().keys())
        missing = [f for f in spec.required if f not in keys]
        unexpected = [] if spec.accepted is None else sorted(keys - set(spec.accepted))
        if missing or unexpected:
            bad.append((i, missing, unexpected))
    if not bad:
        return
    if not spec.certain:
        hopeless = [b for b in bad if len(b[1]) == len(spec.required)]
        if not hopeless:
            i, missing, _ = bad[0]
            logger.warning("%d of %d %s examples lack the input field(s) %s that %s suggests (e.g. %s[%d], input "
                           "keys %s); fine if forward fills them in itself. Name forward's parameters "
                           "(def forward(self, ...)) to state the program's inputs exactly and silence this.",
                           len(bad), len(examples), name, missing, spec.source, name, i,
                           sorted(examples[i].inputs().keys()))
            return
        bad = hopeless
    i, missing, unexpected = bad[0]
    raise InputFieldMismatchError(field_mismatch_message(name, i, examples[i], spec, missing, unexpected,
                                                         n_bad=len(bad), n_total=len(examples)))


def field_mismatch_message(name: str, index: int, example: dspy.Example, spec: ProgramInputs, missing: Sequence[str],
                           unexpected: Sequence[str], *, n_bad: int, n_total: int) -> str:
    r"""The error text of :func:`check_input_fields`: what is wrong with ``name[index]`` and how to fix it.

    Example:
        >>> spec = ProgramInputs(("question",), None, "MathCoT.forward(question)")
        >>> ex = dspy.Example(q="1+1?", answer="2").with_inputs("q")
        >>> message = field_mismatch_message("trainset", 0, ex, spec, ["question"], [], n_bad=3, n_total=3)
        >>> print(message.replace("; ", ";\n").replace(". ", ".\n"))
        trainset[0] lacks the input field(s) ['question'] that the program is called with (from MathCoT.forward(question)): its input keys are ['q'] (all keys: ['answer', 'q']);
        3 of 3 trainset examples have this problem.
        Rename 'q' to 'question': build the examples as dspy.Example(question=..., answer=...).with_inputs('question').
    """
    inputs, labels = sorted(example.inputs().keys()), sorted(example.labels().keys())
    keys = sorted(example.keys())
    parts = []
    if missing:
        parts.append(f"{name}[{index}] lacks the input field(s) {list(missing)} that the program is called with "
                     f"(from {spec.source}): its input keys are {inputs} (all keys: {keys})")
    else:
        parts.append(f"{name}[{index}] marks {list(unexpected)} as inputs, but {spec.source} takes no such argument, "
                     f"so every program run would fail with a TypeError (all keys: {keys})")
    parts.append(f"; {n_bad} of {n_total} {name} examples have this problem. ")
    wanted = list(spec.required) or [k for k in inputs if k not in unexpected]
    build = "dspy.Example({}).with_inputs({})".format(
        ", ".join(f"{k}=..." for k in dict.fromkeys([*wanted, *([k for k in labels if k not in missing] or ["answer"])])),
        ", ".join(repr(k) for k in wanted))
    marked_later = [f for f in missing if f in labels]
    renamable = [k for k in inputs if k not in spec.required]
    if marked_later:
        parts.append(f"{marked_later} {'is' if len(marked_later) == 1 else 'are'} in the example but not marked as an "
                     f"input: call .with_inputs({', '.join(repr(k) for k in wanted)}) on every example, as in {build}.")
    elif len(missing) == 1 and len(renamable) == 1:
        parts.append(f"Rename {renamable[0]!r} to {missing[0]!r}: build the examples as {build}.")
    elif missing:
        parts.append(f"Build the examples with the program's input names, e.g. {build}.")
    else:
        parts.append(f"Mark only the program's inputs, e.g. {build} (the other fields stay on the example for the "
                     "metric), or give forward a **kwargs parameter.")
    if not spec.certain:
        parts.append(f" These names are a guess (forward takes only **kwargs); if the program fills some in itself, "
                     f"name the ones it is called with in forward's signature, e.g. def forward(self, {wanted[0]}).")
    return "".join(parts)


def check_positive_int(name: str, value: Any, *, minimum: int = 1, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {name}={value!r}.")


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        raise ValueError(f"{name} must be a number; got {name}={value!r}.")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{low}, {high}]; got {name}={value!r}.")


def check_writable_dir(path: str | os.PathLike[str], what: str = "log_dir") -> Path:
    """Create ``path`` if needed and check that files can be written in it; return it.

    Raises:
        ValueError: ``path`` exists and is not a folder.
        PermissionError: The folder cannot be created or written to.
    """
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what} {str(folder)!r} exists and is not a folder; pass a folder path, e.g. "
                         f"{what}='runs/trprompt'.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_probe.{uuid.uuid4().hex[:8]}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise PermissionError(
            f"{what} {str(folder)!r} is not writable ({exc.strerror or exc}). Pass a folder you can write to, "
            f"e.g. {what}='runs/trprompt', or fix its permissions."
        ) from exc
    return folder


def server_url_of(obj: Any) -> str | None:
    """The HTTP server an LM or prompt model talks to: ``api_base``/``base_url`` of a ``dspy.LM``, or a
    served prompt model's ``base_url``; ``None`` for in-process models."""
    if obj is None or isinstance(obj, (str, os.PathLike)):
        return None
    kwargs = getattr(obj, "kwargs", None)
    if isinstance(obj, dspy.BaseLM) and isinstance(kwargs, dict):
        url = kwargs.get("api_base") or kwargs.get("base_url")
    else:
        url = getattr(obj, "base_url", None)
    return url if isinstance(url, str) and url.strip() else None


def check_servers_reachable(roles: Iterable[tuple[str, Any]], *, timeout: float = 3.0) -> None:
    """Fail fast when an LM server does not accept TCP connections (nothing is sent).

    Args:
        roles: ``(role, lm_or_prompt_model)`` pairs; objects without a server URL are skipped.
        timeout: Seconds to wait for each connection.

    Raises:
        ServerUnreachableError: A server refused the connection, timed out or its host does not resolve.

    Example:
        >>> check_servers_reachable([("target LM", None)])  # nothing to probe
    """
    probed: set[tuple[str, int]] = set()
    for role, obj in roles:
        url = server_url_of(obj)
        if url is None:
            continue
        parsed = urlparse(url if "://" in url else f"http://{url}")
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"The {role}'s server URL {url!r} is not an http(s) URL; use e.g. "
                             "api_base='http://127.0.0.1:8000/v1'.")
        try:
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
        except ValueError as exc:
            raise ValueError(f"The {role}'s server URL {url!r} has an invalid port: {exc}.") from None
        if (parsed.hostname, port) in probed:
            continue
        probed.add((parsed.hostname, port))
        try:
            with socket.create_connection((parsed.hostname, port), timeout=timeout):
                pass
        except OSError as exc:
            why = ("the host name does not resolve" if isinstance(exc, socket.gaierror)
                   else f"nothing accepts connections on port {port} (connection refused)"
                   if isinstance(exc, ConnectionRefusedError)
                   else f"no answer within {timeout:g} s" if isinstance(exc, TimeoutError)
                   else f"{type(exc).__name__}: {exc}")
            model = getattr(obj, "model", None) or type(obj).__name__
            raise ServerUnreachableError(
                f"Cannot reach the {role} server at {url} (model {model!r}): {why}. Start the server first "
                "(e.g. `vllm serve <model> --port <port>` or `trprompt serve`) or fix api_base/base_url; pass "
                "preflight=False to skip this check."
            ) from exc
