"""Minimal JSON-over-HTTP helpers for talking to an OpenAI-compatible server (stdlib only, thread-safe).

Example:
    >>> ServerRequestError("POST", "http://127.0.0.1:1/v1/x", 400, "bad").status
    400
    >>> get_json("http://127.0.0.1:9/v1/models", timeout=0.5)   # nothing listens there  # doctest: +SKIP
    Traceback (most recent call last):
    ServerUnreachableError: ...
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from trprompt_dspy.errors import TRPromptError

__all__ = ["ServerRequestError", "ServerUnreachableError", "get_json", "post_json", "request_json"]


class ServerRequestError(TRPromptError, RuntimeError):
    """The server answered with an HTTP error status; ``status`` and ``body`` hold its answer."""

    def __init__(self, method: str, url: str, status: int, body: str) -> None:
        self.method, self.url, self.status, self.body = method, url, status, body
        super().__init__(f"{method} {url} returned HTTP {status}: {body[:1000]}")


class ServerUnreachableError(TRPromptError, ConnectionError):
    """No HTTP answer at all (connection refused, timeout, reset)."""


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never send loopback traffic to a proxy
_DEFAULT = urllib.request.build_opener()


def _is_loopback(url: str) -> bool:
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    return host == "localhost" or host == "::1" or host.startswith("127.")


def request_json(method: str, url: str, payload: Any = None, *, timeout: float = 60.0,
                 api_key: str | None = None) -> Any:
    """Send one request and decode the JSON answer (or return the text when it is not JSON).

    Raises:
        ServerRequestError: HTTP status >= 400.
        ServerUnreachableError: No answer (refused, timed out...).
    """
    data = None if payload is None else json.dumps(payload).encode("utf-8")
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    opener = _DIRECT if _is_loopback(url) else _DEFAULT
    try:
        with opener.open(req, timeout=timeout) as resp:
            text = resp.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as exc:
        body = exc.read().decode("utf-8", errors="replace") if exc.fp is not None else ""
        raise ServerRequestError(method, url, exc.code, body) from None
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServerUnreachableError(f"{method} {url} got no answer: {reason}") from exc
    try:
        return json.loads(text) if text else None
    except ValueError:
        return text


def get_json(url: str, *, timeout: float = 60.0, api_key: str | None = None) -> Any:
    """``GET`` ``url`` and decode the JSON answer; see :func:`request_json`."""
    return request_json("GET", url, timeout=timeout, api_key=api_key)


def post_json(url: str, payload: Any, *, timeout: float = 60.0, api_key: str | None = None) -> Any:
    """``POST`` ``payload`` as JSON to ``url`` and decode the answer; see :func:`request_json`."""
    return request_json("POST", url, payload, timeout=timeout, api_key=api_key)
