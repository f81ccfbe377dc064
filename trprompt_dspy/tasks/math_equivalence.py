r"""MATH final-answer equivalence: ``\boxed{}`` extraction, normalisation, and a sympy check.

:func:`math_answers_equal` is what :func:`trprompt_dspy.tasks.metrics.math_metric` uses. It works in three
steps: string equality after :func:`normalize_math_answer`; elementwise comparison of tuples, intervals,
sets, matrices and ``\pm`` lists; and for single expressions, symbolic equality with sympy. The LaTeX is
read by a small recursive-descent parser in this module (sympy's ``parse_latex`` needs antlr4, which is
not a dependency). The parser never calls ``eval``, and it refuses numeric exponents above 1000, so
input such as ``2^{2^{2^{2^2}}}`` cannot start a huge integer computation. The sympy step runs in a
daemon thread with a timeout, so it is safe to call from ``dspy.Evaluate`` worker threads.

Example:
    >>> math_answers_equal(r"The answer is $\boxed{\dfrac{1}{2}}$.", "0.5")
    True
    >>> normalize_math_answer(r"\left[ -1, 3 \right)")
    '[-1,3)'
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "MATH_EQUIV_TIMEOUT_S",
    "extract_boxed",
    "normalize_math_answer",
    "math_answers_equal",
    "math_answer_of",
]

MATH_EQUIV_TIMEOUT_S = 5.0
"""Seconds the sympy step of :func:`math_answers_equal` may take before the pair counts as unequal."""


def extract_boxed(text: str | None) -> str | None:
    r"""Return the content of the last well-formed ``\boxed{...}`` (or ``\fbox{...}``) in ``text``.

    Braces are matched, so nested groups survive: ``\boxed{\frac{1}{2}}`` gives ``\frac{1}{2}``. The
    brace-less form ``\boxed 5`` is accepted too.

    Args:
        text: Model output or a MATH solution.

    Returns:
        The boxed content, stripped, or ``None`` when there is no well-formed box.

    Example:
        >>> extract_boxed(r"so \boxed{1} or rather \boxed{\frac{3}{4}}.")
        '\\frac{3}{4}'
    """
    if not text:
        return None
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)(?![a-zA-Z])", text)]
    for start in reversed(starts):
        i = start
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{" and text[j - 1] != "\\":
                    depth += 1
                elif text[j] == "}" and text[j - 1] != "\\":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j].strip()
        elif i > start:  # "\boxed 5"
            m = re.match(r"[^\s$]+", text[i:])
            if m:
                return m.group(0).strip()
    return None


# ---------------------------------------------------------------------------------------------------
# MATH: normalisation
# ---------------------------------------------------------------------------------------------------

_TEXT_CMDS = r"\\(?:text|textbf|textit|textrm|mbox|mathrm|mathbf|operatorname)"
_SIZE_CMDS_RE = re.compile(r"\\(?:displaystyle|left|right|bigl|bigr|Bigl|Bigr|big|Big)(?![a-zA-Z])")
_NUMERIC_PREFIX_RE = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+|\\frac\{\d+\}\{\d+\})")


def normalize_math_answer(text: str) -> str:
    r"""Canonicalise a MATH final answer for string comparison.

    Drops math delimiters, ``\left``/``\right``, spacing commands (``\!``, ``\,``), degrees, ``\%``,
    dollars, unit words (``\text{ cm}``, "5 inches"), a trailing period and an ``x =`` prefix; rewrites
    ``\dfrac``/``\tfrac`` to ``\frac``, ``\frac12`` to ``\frac{1}{2}``, ``\sqrt3`` to ``\sqrt{3}``,
    ``a/b`` to ``\frac{a}{b}``, ``.5`` to ``0.5``, mixed numbers ``1\frac{4}{5}`` to ``\frac{9}{5}``;
    removes all whitespace.

    Example:
        >>> normalize_math_answer(r"$x = \dfrac12$.")
        '\\frac{1}{2}'
        >>> normalize_math_answer(r"30^\circ")
        '30'
    """
    s = str(text).replace("\n", " ").strip()
    for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            s = s[len(left) : len(s) - len(right)].strip()
    s = _SIZE_CMDS_RE.sub("", s)
    s = re.sub(r"(?<!\\)\\!", "", s)
    s = re.sub(r"(?<!\\)\\(?:[,;: ]|q?quad(?![a-zA-Z]))|~", " ", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\u00b0", "", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    # Units: "\text{ cm}^2" (leading space) anywhere, or a trailing \text{word} after a number.
    s = re.sub(_TEXT_CMDS + r"\s*\{\s+[^{}]*\}(?:\^\{?\d\}?)?", "", s).strip() or s
    m = re.fullmatch(r"(.*?\d)\s*" + _TEXT_CMDS + r"\s*\{[a-zA-Z\s.]*\}(?:\^\{?\d\}?)?", s)
    if m and _NUMERIC_PREFIX_RE.fullmatch(m.group(1).strip()):
        s = m.group(1)
    s = re.sub(_TEXT_CMDS + r"\s*\{([^{}]*)\}", r"\1", s)
    m = re.fullmatch(r"(.*?)\s+(?:[a-zA-Z]{2,}\.?\s*)+(?:\^\d)?", s.strip())  # "5 cm", "12 square units"
    if m and _NUMERIC_PREFIX_RE.fullmatch(m.group(1).strip()):
        s = m.group(1)
    s = s.replace("{,}", "").strip()
    s = re.sub(r"(\\\.|\.)+$", "", s).strip()
    m = re.fullmatch(r"\s*(?:[a-zA-Z]|\\[a-zA-Z]+|[a-zA-Z]\([a-zA-Z]\))\s*=\s*([^=]+)", s)
    if m:
        s = m.group(1)
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\w)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"(?<!\d)\.(\d)", r"0.\1", s)
    s = re.sub(r"([\^_])\{(\w)\}", r"\1\2", s)
    if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    m = re.fullmatch(r"(-?)(\d+)/(\d+)", s)
    if m:
        s = f"{m.group(1)}\\frac{{{m.group(2)}}}{{{m.group(3)}}}"
    m = re.fullmatch(r"(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}", s)  # mixed number 1\frac{4}{5}
    if m and int(m.group(4)) > 0:
        num = int(m.group(2)) * int(m.group(4)) + int(m.group(3))
        s = f"{m.group(1)}\\frac{{{num}}}{{{m.group(4)}}}"
    m = re.fullmatch(r"\(?([A-Ea-e])\)?", s)  # multiple-choice letter "(B)"
    if m:
        s = m.group(1).upper()
    return s


# ---------------------------------------------------------------------------------------------------
# MATH: a small LaTeX -> sympy parser (no eval, no antlr)
# ---------------------------------------------------------------------------------------------------


class _Deadline(BaseException):
    """Raised inside the sympy worker thread when its time budget is spent."""


class _Unsupported(ValueError):
    """The LaTeX uses something the light parser does not handle; fall back to string comparison."""


_TOKEN_RE = re.compile(r"\d+(?:\.\d+)?|\.\d+|\\[a-zA-Z]+|\\[{}]|[a-zA-Z]|.")
_FUNCS = ("sin", "cos", "tan", "sec", "csc", "cot", "arcsin", "arccos", "arctan", "ln", "log", "exp")
_MAX_EXPONENT = 1000  # bigger numeric exponents could stall sympy inside a single C call (holding the GIL)
_MAX_DIGITS = 300


class _LatexParser:
    """Recursive-descent parser for the LaTeX found in final answers (numbers, \\frac, \\sqrt, ^, \\pi...)."""

    def __init__(self, text: str, sp: Any) -> None:
        self.toks = _TOKEN_RE.findall(text)
        self.i = 0
        self.sp = sp

    def parse(self) -> Any:
        if not self.toks:
            raise _Unsupported("empty expression")
        expr = self.expr()
        if self.i != len(self.toks):
            raise _Unsupported(f"unexpected token {self.toks[self.i]!r}")
        return expr

    def peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            raise _Unsupported(f"expected {expected!r}, got {tok!r}")
        self.i += 1
        return tok

    def expr(self) -> Any:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        return value

    def term(self) -> Any:
        value = self.unary()
        while True:
            tok = self.peek()
            if tok in ("*", "\\cdot", "\\times"):
                self.take()
                value = value * self.unary()
            elif tok in ("/", "\\div"):
                self.take()
                value = value / self.unary()
            elif tok is not None and self._starts_atom(tok):
                value = value * self.power()
            else:
                return value

    def unary(self) -> Any:
        if self.peek() == "-":
            self.take()
            return -self.unary()
        if self.peek() == "+":
            self.take()
            return self.unary()
        return self.power()

    def power(self) -> Any:
        base = self.atom()
        while self.peek() == "^":
            self.take()
            exponent = self.exponent()
            if exponent.is_number:
                try:
                    too_big = abs(complex(exponent)) > _MAX_EXPONENT
                except (TypeError, ValueError) as exc:
                    raise _Unsupported("non-numeric exponent") from exc
                if too_big:
                    raise _Unsupported("exponent too large")
            base = base**exponent
        return base

    def exponent(self) -> Any:
        tok = self.peek()
        if tok == "-":
            self.take()
            return -self.exponent()
        if tok is not None and tok[0].isdigit() and len(tok) > 1:  # "x^23" means x^2 * 3 in LaTeX
            self.toks[self.i] = tok[1:]
            return self.sp.Integer(int(tok[0]))
        return self.atom()

    def group(self, open_: str = "{", close: str = "}") -> Any:
        self.take(open_)
        value = self.expr()
        self.take(close)
        return value

    def _starts_atom(self, tok: str) -> bool:
        return (
            tok[0].isdigit()
            or tok[0] == "."
            or tok.isalpha()
            or tok in ("(", "{", "\\frac", "\\sqrt", "\\pi", "\\infty")
            or tok[1:] in _FUNCS
        )

    def atom(self) -> Any:
        sp, tok = self.sp, self.peek()
        if tok is None:
            raise _Unsupported("unexpected end")
        if tok[0].isdigit() or tok[0] == ".":
            self.take()
            if len(tok) > _MAX_DIGITS:
                raise _Unsupported("number too long")
            return sp.Rational(tok)
        if tok.isalpha():
            self.take()
            return sp.Symbol(tok)
        if tok == "(":
            return self.group("(", ")")
        if tok == "{":
            return self.group()
        if tok == "\\frac":
            self.take()
            return self.group() / self.group()
        if tok == "\\sqrt":
            self.take()
            if self.peek() == "[":
                index = self.group("[", "]")
                return sp.root(self.group() if self.peek() == "{" else self.atom(), index)
            return sp.sqrt(self.group() if self.peek() == "{" else self.atom())
        if tok == "\\pi":
            self.take()
            return sp.pi
        if tok == "\\infty":
            self.take()
            return sp.oo
        if tok[1:] in _FUNCS:
            self.take()
            base = None
            if tok == "\\log" and self.peek() == "_":
                self.take()
                base = self.exponent()  # "\\log_28" is log base 2 of 8
            arg = self.power()
            if tok == "\\log":
                return sp.log(arg, base) if base is not None else sp.log(arg)
            name = {"ln": "log", "arcsin": "asin", "arccos": "acos", "arctan": "atan"}.get(tok[1:], tok[1:])
            return getattr(sp, name)(arg)
        raise _Unsupported(f"token {tok!r}")


def _sympy_equal(a_text: str, b_text: str, timeout: float) -> bool:
    """Symbolic/numeric equality of two normalised answers, bounded by ``timeout`` seconds."""
    if max(len(a_text), len(b_text)) > 500:
        return False
    sp = __import__("sympy")  # imported here (outside the timed thread) so the import does not eat the budget

    def check() -> bool:
        a = _LatexParser(a_text, sp).parse()
        b = _LatexParser(b_text, sp).parse()
        if a == b:
            return True
        if a.has(sp.oo, -sp.oo, sp.zoo, sp.nan) or b.has(sp.oo, -sp.oo, sp.zoo, sp.nan):
            return False
        diff = a - b
        if not diff.free_symbols:
            scale = max(1.0, abs(complex(sp.N(b, 30))))
            return abs(complex(sp.N(diff, 30))) <= 1e-9 * scale
        return sp.simplify(diff) == 0

    outcome: dict[str, Any] = {}
    deadline = time.monotonic() + timeout

    def stop_at_deadline(frame: Any, event: str, arg: Any) -> Any:
        # Trace hook of the worker thread, run on every call and line of Python code (about 2.5x slower
        # sympy, fine for ms-scale checks). Past the deadline it raises, which unwinds sympy; _Deadline is
        # a BaseException so sympy's `except Exception` blocks cannot swallow it.
        if time.monotonic() > deadline:
            raise _Deadline
        return stop_at_deadline

    def target() -> None:
        sys.settrace(stop_at_deadline)
        try:
            outcome["value"] = check()
        except _Deadline:
            outcome["error"] = "timed out"
        except Exception as exc:  # sympy raises many types on odd input; any failure means "not shown equal"
            outcome["error"] = exc
        finally:
            sys.settrace(None)

    # Two layers bound the work. The trace hook above stops the computation itself, so a timed-out check
    # does not keep burning CPU (and the GIL). The join timeout bounds the caller even if the hook cannot
    # fire (a single long C call). A daemon thread, not a ThreadPoolExecutor: executor workers are joined at
    # interpreter exit, so a stuck one would block shutdown.
    worker = threading.Thread(target=target, name="trprompt-math-equiv", daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    if worker.is_alive() or outcome.get("error") == "timed out":
        logger.warning("sympy equivalence check timed out after %.1fs: %r vs %r", timeout, a_text, b_text)
        return False
    if "error" in outcome:
        logger.debug("sympy could not compare %r and %r: %s", a_text, b_text, outcome["error"])
        return False
    return bool(outcome["value"])


def _split_top(s: str, sep: str) -> list[str]:
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        ch = s[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            i += len(sep)
            start = i
            continue
        i += 1
    parts.append(s[start:])
    return parts


def _encloses(s: str) -> bool:
    """True when the first bracket of ``s`` closes at its last character."""
    depth = 0
    for i, ch in enumerate(s):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth == 0 and i < len(s) - 1:
            return False
    return depth == 0


def _structure(s: str) -> tuple[str, str, list[str]] | None:
    """Split a normalised answer into (kind, brackets, elements) for tuples, intervals, sets, lists."""
    m = re.fullmatch(r"\\begin\{[pbv]?matrix\}(.*)\\end\{[pbv]?matrix\}", s)
    if m:
        return "matrix", "", [cell for row in m.group(1).split("\\\\") for cell in row.split("&")]
    if len(_split_top(s, "\\cup")) > 1:
        return "union", "", _split_top(s, "\\cup")
    if s.startswith("\\{") and s.endswith("\\}") and _encloses(s[1:]):
        return "set", "", _split_top(s[2:-2], ",")
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _encloses(s):
        parts = _split_top(s[1:-1], ",")
        if len(parts) > 1:
            return "tuple", s[0] + s[-1], parts
    pm = _split_top(s, "\\pm")
    if len(pm) == 2 and pm[1]:
        return "list", "", [f"{pm[0]}+{pm[1]}", f"{pm[0]}-{pm[1]}"]
    parts = _split_top(s, ",")
    if len(parts) > 1:
        return "list", "", parts
    return None


def _normalised_equal(p: str, g: str, timeout: float) -> bool:
    if p == g:
        return True
    ps, gs = _structure(p), _structure(g)
    if ps is not None or gs is not None:
        if ps is None or gs is None or ps[0] != gs[0] or ps[1] != gs[1] or len(ps[2]) != len(gs[2]):
            return False
        if ps[0] in ("set", "list"):  # unordered: match each gold element once
            remaining = list(gs[2])
            for elem in ps[2]:
                hit = next(
                    (k for k, other in enumerate(remaining) if _normalised_equal(elem, other, timeout)), None
                )
                if hit is None:
                    return False
                remaining.pop(hit)
            return True
        return all(_normalised_equal(a, b, timeout) for a, b in zip(ps[2], gs[2], strict=True))
    if "=" in p or "=" in g:
        p_parts, g_parts = p.split("="), g.split("=")
        if len(p_parts) == len(g_parts) == 2 and p_parts[0] == g_parts[0]:
            return _normalised_equal(p_parts[1], g_parts[1], timeout)
        return False
    return _sympy_equal(p, g, timeout)


def math_answer_of(text: str) -> str:
    r"""The final-answer part of a MATH output: the last ``\boxed{}``, else the text after "final answer is".

    Example:
        >>> math_answer_of(r"so \boxed{2} and finally \boxed{\frac{1}{3}}")
        '\\frac{1}{3}'
    """
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    markers = list(re.finditer(r"\bfinal answer\b\s*(?:is\b|:)\s*:?", text, re.IGNORECASE))
    return text[markers[-1].end() :] if markers else text


def math_answers_equal(pred: str, gold: str, *, timeout: float = MATH_EQUIV_TIMEOUT_S) -> bool:
    r"""Decide whether two MATH answers are equivalent.

    Takes the last ``\boxed{}`` of each side when present, normalises both
    (:func:`normalize_math_answer`), compares strings, then compares tuples/intervals/matrices
    elementwise (brackets must match, so ``(1,2]`` differs from ``(1,2)``), sets and comma lists
    order-free, ``a \pm b`` as the list ``a+b, a-b``, and single expressions with sympy via a small
    built-in LaTeX parser. The sympy step runs in a daemon thread and counts as "not equal" after
    ``timeout`` seconds, so a pathological answer cannot hang the caller.

    Args:
        pred: The predicted answer (may contain a full solution with ``\boxed``).
        gold: The reference answer.
        timeout: Seconds allowed for each sympy comparison.

    Returns:
        ``True`` when the answers are shown equivalent.

    Example:
        >>> math_answers_equal(r"\dfrac{1}{2}", "0.5")
        True
        >>> math_answers_equal("[-1,3)", "(-1, 3)")
        False
    """
    p = normalize_math_answer(math_answer_of(str(pred)))
    g = normalize_math_answer(math_answer_of(str(gold)))
    if not p:
        return False
    return _normalised_equal(p, g, timeout)
