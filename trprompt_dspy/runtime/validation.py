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

import math
import os
import socket
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import dspy

from trprompt_dspy.serving.http import ServerUnreachableError

__all__ = [
    "validate_dataset",
    "validate_program",
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
