"""Refine the optimal textual reward t* with TextGrad.

At inference time the prompt model is conditioned on one fixed textual reward t*, a description of an
ideal outcome. Each TRPrompt iteration improves t* with textual gradient descent:

1. evaluate the program with the current t* on a minibatch (greedy);
2. build a TextGrad graph ``t* -> outcome report -> loss``: the outcome report is a
   ``StringBasedFunction`` of t* (what the program produced when the prompt model was conditioned on
   t*: per example the query, the instruction, the answer, whether it was correct and the metric's
   feedback), and the loss is a ``TextLoss`` LLM critique of that report;
3. ``loss.backward(engine=...)``: the engine writes feedback on the report, then, through the string
   function's backward pass, a gradient on t* itself;
4. ``TGD.step()`` rewrites t* (a missing ``<IMPROVED_VARIABLE>`` tag is retried once, then the step is
   abandoned);
5. the candidate is rejected if it states a minibatch gold answer or restates a query (a run of its words,
   or two of its numbers that t* did not have), otherwise evaluated,
   and accepted if the minibatch score improves, or ties a non-zero score. A tie at zero is rejected: the
   minibatch then says nothing about the candidate (a 0.5B engine's "Minimum Pair Output" replaced a
   sensible t* that way in a CPU demo run).

TextGrad's process-wide backward engine is never set: every call passes ``engine=`` explicitly. Any
``dspy.LM`` can serve as the engine through :class:`DSPyTextGradEngine`.

Example:
    ``result = refine_optimal_reward(t_star, evaluate=lambda t: evaluate_program(prog, batch, metric=m,
    reward_text=t, prompt_model=pm), engine=DSPyTextGradEngine(dspy.LM("openai/gpt-4o-mini")), steps=2)``
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from trprompt_dspy._lazy import import_textgrad
from trprompt_dspy.loop.answer_leaks import leaks_answer
from trprompt_dspy.loop.rollouts import EvalResult, Rollout
from trprompt_dspy.loop.textual_reward import outcome_word
from trprompt_dspy.runtime.faults import CompileError, classify_error

logger = logging.getLogger(__name__)

__all__ = [
    "OPTIMAL_REWARD_ROLE",
    "DEFAULT_CONSTRAINTS",
    "LOSS_SYSTEM_PROMPT",
    "RefineResult",
    "render_outcome_report",
    "refine_optimal_reward",
]

OPTIMAL_REWARD_ROLE = (
    "optimal textual reward: the description of an ideal outcome that the prompt model is conditioned on"
)
DEFAULT_CONSTRAINTS = ("Do not state any specific answer to any query.", "Keep it under 120 words.")
REPORT_FUNCTION_PURPOSE = (
    "Runs the program on a minibatch of queries: a prompt model conditioned on the optimal textual reward "
    "writes a query-specific instruction, the target model answers with it, and the metric scores the answer. "
    "Returns a report of the outcomes."
)
REPORT_ROLE = (
    "outcomes of the program on a minibatch when its prompt model is conditioned on the optimal textual reward "
    "(they change only through the optimal textual reward)"
)
LOSS_SYSTEM_PROMPT = (
    "You evaluate a prompt-optimisation system. A prompt model writes a per-query instruction for a target "
    "model, conditioned on a general description of the ideal outcome. Below is a report of what happened "
    "on a minibatch. Identify the failure patterns of the incorrect outcomes, what the successful ones had "
    "in common, and what the instructions should have emphasised. Be concise and concrete. Do not state any "
    "specific answer to any query."
)

class _EmptyGradient(RuntimeError):
    pass
_GLOBAL_ENGINE_LOCK = threading.Lock()


# --------------------------------------------------------------------------------------------------
# Engine bridge
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _no_global_backward_engine(tg: Any) -> Iterator[None]:
    """Hide a user-set global TextGrad engine while we pass ``engine=`` explicitly.

    ``Variable.backward(engine=X)`` refuses to run when a global engine is also set. We never set it
    ourselves; if the user did, it is restored right after our backward pass.
    """
    singleton = tg.config.SingletonBackwardEngine()
    with _GLOBAL_ENGINE_LOCK:
        saved = singleton.get_engine()
        if saved is not None:
            logger.debug("temporarily hiding the global TextGrad backward engine %r", saved)
            singleton.engine = None
        try:
            yield
        finally:
            if saved is not None:
                singleton.engine = saved


# --------------------------------------------------------------------------------------------------
# Refinement
# --------------------------------------------------------------------------------------------------


@dataclass
class RefineResult:
    """The outcome of :func:`refine_optimal_reward`.

    Attributes:
        value: The refined t* (the input t* if no step was accepted).
        accepted: Whether any step was accepted.
        history: One dict per step: ``step, candidate, score_before, score_after, accepted, error,
            error_kind, gradient``. ``error_kind`` is one of ``missing_tags, engine, empty_gradient,
            empty_candidate, unchanged, leak, copies_query, evaluation`` (``None`` when the step ran; a
            rejected step with a lower score has ``accepted=False`` and no error). Engine failures also
            carry ``cause``, their :func:`~trprompt_dspy.runtime.faults.classify_error` kind (``timeout``...).
        initial_score / final_score: Minibatch scores of the input t* and of ``value``.
    """

    value: str
    accepted: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    initial_score: float | None = None
    final_score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "accepted": self.accepted, "history": list(self.history),
                "initial_score": self.initial_score, "final_score": self.final_score}


#: The shortest a report field is clipped to when a report must fit ``max_chars``.
_MIN_FIELD_CHARS = 80
#: How many times a TextGrad step is retried with a report half as long after the engine reports that a
#: prompt does not fit its context.
_CONTEXT_RETRIES = 3
#: A report shorter than this is not cut further: the context is too small for any TextGrad prompt.
_MIN_REPORT_CHARS = 400


def _clip(text: Any, limit: int) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 5].rstrip() + " ..."


def render_outcome_report(
    rollouts: Sequence[Rollout],
    *,
    success_threshold: float = 1.0,
    include_gold: bool = False,
    max_examples: int = 8,
    max_field_chars: int = 400,
    max_chars: int | None = None,
) -> str:
    """Render a minibatch evaluation as the text the TextGrad loss critiques.

    Per example: the query, the instruction(s) used, the program's answer, correct / partly correct /
    incorrect (``score >= success_threshold`` is correct), and the metric's feedback. Gold answers are
    left out unless ``include_gold`` (the metric feedback usually says enough).

    ``max_chars`` bounds the whole report: each field is clipped shorter (down to 80 characters), then the
    last examples (the correct ones come last) are left out, until it fits. TextGrad puts the report into
    three of its four prompts, so its length decides whether a step fits the engine's context (8 examples of
    a 1.5B target's reasoning did not fit a 2048-token vLLM server).

    Example:
        >>> r = Rollout(0, 0, inputs={"q": "1+1?"}, outputs={"a": "3"}, score=0.0, feedback="Wrong sum.")
        >>> print(render_outcome_report([r]).splitlines()[0])
        Minibatch: 0 of 1 correct (mean score 0).
        >>> long = [Rollout(i, 0, inputs={"q": "x " * 300}, outputs={"a": "y " * 300}, score=0.0) for i in range(8)]
        >>> len(render_outcome_report(long)) > 4000, len(render_outcome_report(long, max_chars=2000)) <= 2000
        (True, True)
    """
    if max_chars is not None:
        if not isinstance(max_chars, int) or isinstance(max_chars, bool) or max_chars < 1:
            raise ValueError(f"max_chars must be a positive integer or None; got {max_chars!r}.")
        field_chars, examples = max_field_chars, max_examples
        while True:
            report = render_outcome_report(rollouts, success_threshold=success_threshold, include_gold=include_gold,
                                           max_examples=examples, max_field_chars=field_chars)
            if len(report) <= max_chars or (examples <= 1 and field_chars <= _MIN_FIELD_CHARS):
                return report
            if field_chars > _MIN_FIELD_CHARS:
                field_chars = max(_MIN_FIELD_CHARS, int(field_chars * 0.75))
            else:
                examples -= 1
    n_ok = sum(1 for r in rollouts if r.score >= success_threshold)
    mean = sum(r.score for r in rollouts) / len(rollouts) if rollouts else 0.0
    lines = [f"Minibatch: {n_ok} of {len(rollouts)} correct (mean score {mean:g})."]
    # Failures first: they carry most of the signal.
    ordered = sorted(rollouts, key=lambda r: (r.score >= success_threshold, r.example_index))[:max_examples]
    for i, r in enumerate(ordered, 1):
        verdict = outcome_word(r.score, success_threshold)
        query = "; ".join(f"{k}: {v}" for k, v in r.inputs.items())
        instr = " | ".join(str(c.get("instruction", "")) for c in r.instructions) or "(none)"
        answer = "; ".join(f"{k}: {v}" for k, v in r.outputs.items()) or f"(no output: {r.error})"
        lines += [f"\nExample {i} ({verdict}, score {r.score:g})",
                  f"Query: {_clip(query, max_field_chars)}",
                  f"Instruction: {_clip(instr, max_field_chars)}",
                  f"Answer: {_clip(answer, max_field_chars)}"]
        if include_gold:
            lines.append(f"Gold: {_clip('; '.join(f'{k}: {v}' for k, v in r.gold.items()), max_field_chars)}")
        if r.feedback:
            lines.append(f"Metric feedback: {_clip(r.feedback, max_field_chars)}")
        if r.error and r.outputs:
            lines.append(f"Error: {_clip(r.error, max_field_chars)}")
    return "\n".join(lines)


def _gold_values(result: EvalResult) -> list[Any]:
    return [r.gold for r in result.rollouts]


def _query_text(rollout: Any) -> str:
    return " ".join(str(v) for v in (rollout.inputs or {}).values())


_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def copies_a_query(candidate: str, queries: Sequence[str], *, ngram: int = 8, min_numbers: int = 2,
                   allowed: str = "") -> str | None:
    """Return what ``candidate`` copies from one of ``queries``, else ``None``.

    t* is shared by every query at inference, so a candidate that restates one query (small TextGrad
    engines do this) is query-specific noise, whatever its minibatch score. Two kinds of copy count: a run
    of ``ngram`` words shared with a query, and ``min_numbers`` or more distinct numbers of one query that
    are not already in ``allowed`` (the current t*). The second catches a query pasted in another notation:
    a 1.5B engine accepted on a minibatch tie wrote "uses every quantity in \\(1.5 \\text{ quarts and } 16
    \\text{ students ...}\\)" into t* (GSM-Hard study, 2026-12-01).

    Example:
        >>> copies_a_query("Find how many apples Tom has left after he gives away 3 of his 10 apples.",
        ...                ["Tom has 10 apples. How many apples Tom has left after he gives away 3 of his 10 apples?"])
        'how many apples tom has left after he'
        >>> copies_a_query("The response checks each step and ends with the correct number.", ["Tom has 10 apples."])
        >>> copies_a_query("Use every quantity (\\(1.5\\) quarts, \\(16\\) students).",
        ...                ["A pot holds 1.5 quarts; 16 students drink 2 quarts each."])
        'numbers 1.5, 16'
        >>> copies_a_query("Round to 2 decimal places; show 3 steps.", ["Buy 2 pens and 3 books."], allowed="2 and 3")
    """
    def words(text: str) -> list[str]:
        return re.findall(r"[a-z0-9$%.]+", text.lower())

    cand = words(candidate)
    grams = {" ".join(cand[i:i + ngram]) for i in range(len(cand) - ngram + 1)}
    for q in queries:
        qw = words(q)
        for i in range(len(qw) - ngram + 1):
            g = " ".join(qw[i:i + ngram])
            if g in grams:
                return g
    numbers = set(_NUMBER.findall(candidate)) - set(_NUMBER.findall(allowed))
    for q in queries:
        shared = sorted(numbers & set(_NUMBER.findall(q)), key=float)
        if len(shared) >= min_numbers:
            return "numbers " + ", ".join(shared)
    return None


def _textgrad_update(tg: Any, string_function: Any, variable: Any, report: str, *, engine: Any,
                     constraints: Sequence[str], loss_system_prompt: str, step: int) -> None:
    """One TextGrad step on ``variable`` (t*): loss on ``report``, backward pass, TGD update in place."""
    outcome_fn = string_function(fn=lambda optimal_reward, _r=report: _r, function_purpose=REPORT_FUNCTION_PURPOSE)
    outcomes = outcome_fn(inputs={"optimal_reward": variable}, response_role_description=REPORT_ROLE)
    loss = tg.TextLoss(loss_system_prompt, engine=engine)(outcomes)
    with _no_global_backward_engine(tg):
        loss.backward(engine=engine)
    if not variable.get_gradient_text().strip():
        raise _EmptyGradient("the backward pass produced an empty gradient for t*")
    optimizer = tg.TGD(parameters=[variable], engine=engine, constraints=list(constraints))
    try:
        optimizer.step()
    except IndexError:
        logger.info("TextGrad step %d: no <IMPROVED_VARIABLE> tags in the reply; retrying once", step)
        optimizer.step()


def refine_optimal_reward(
    t_star: str,
    *,
    evaluate: Callable[[str], EvalResult],
    engine: Any,
    steps: int,
    constraints: Sequence[str] = DEFAULT_CONSTRAINTS,
    initial: EvalResult | None = None,
    success_threshold: float = 1.0,
    include_gold: bool = False,
    max_report_examples: int = 8,
    max_report_chars: int | None = None,
    loss_system_prompt: str = LOSS_SYSTEM_PROMPT,
) -> RefineResult:
    """Improve t* with ``steps`` TextGrad updates, keeping only updates that do not lower the score.

    Args:
        t_star: The current optimal textual reward.
        evaluate: ``evaluate(t) -> EvalResult``: greedy evaluation of the program on the minibatch with the
            prompt model conditioned on ``t`` (e.g. a closure over :func:`evaluate_program`).
        engine: A TextGrad engine (``DSPyTextGradEngine`` or any ``textgrad.EngineLM``), used for the
            loss, the backward pass and the update.
        steps: Number of update attempts (0 returns ``t_star`` unevaluated unless ``initial`` is given).
        constraints: Natural-language constraints for TGD.
        initial: The evaluation of ``t_star`` if the caller already has it (saves one evaluation).
        success_threshold: Scores at or above this count as "correct" in the report.
        include_gold: Show gold answers in the loss report (leaks are still rejected).
        max_report_examples: Examples shown in the report.
        max_report_chars: Bound on the report's length (see :func:`render_outcome_report`); ``None``: no
            bound. Whatever the bound, a step whose prompt the engine rejects as longer than its context
            (``classify_error`` kind ``context_window``) is retried up to 3 times with the report cut to
            half its length; ``history[i]["report_chars"]`` records the length that was used.
        loss_system_prompt: The loss's instructions.

    Returns:
        A :class:`RefineResult`. Engine failures are recorded in ``history[i]["error"]``; they never raise.

    Raises:
        ValueError: ``t_star`` is empty or ``steps`` is negative.
    """
    if not isinstance(t_star, str) or not t_star.strip():
        raise ValueError(f"t_star must be a non-empty string; got {t_star!r}.")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0; got {steps!r}.")
    if engine is None or not callable(engine):
        raise TypeError(f"engine must be a TextGrad engine (e.g. DSPyTextGradEngine(lm)); got {engine!r}.")
    tg = import_textgrad()
    from textgrad.autograd import StringBasedFunction

    current = t_star
    before = initial
    if steps == 0:
        s = before.score if before is not None else None
        return RefineResult(current, False, [], s, s)
    if before is None:
        before = evaluate(current)
    initial_score = before.score
    history: list[dict[str, Any]] = []
    any_accepted = False

    for step in range(1, steps + 1):
        entry: dict[str, Any] = {"step": step, "candidate": None, "score_before": before.score,
                                 "score_after": None, "accepted": False, "error": None, "error_kind": None,
                                 "gradient": None}
        history.append(entry)
        budget = max_report_chars
        try:
            for attempt in range(_CONTEXT_RETRIES + 1):
                report = render_outcome_report(before.rollouts, success_threshold=success_threshold,
                                               include_gold=include_gold, max_examples=max_report_examples,
                                               max_chars=budget)
                entry["report_chars"] = len(report)
                variable = tg.Variable(current, requires_grad=True, role_description=OPTIMAL_REWARD_ROLE)
                try:
                    _textgrad_update(tg, StringBasedFunction, variable, report, engine=engine,
                                     constraints=constraints, loss_system_prompt=loss_system_prompt, step=step)
                    break
                except Exception as exc:
                    if classify_error(exc) != "context_window" or attempt == _CONTEXT_RETRIES or len(report) < _MIN_REPORT_CHARS:
                        raise
                    budget = len(report) // 2
                    logger.warning("TextGrad step %d: a prompt did not fit the engine's context (%s); retrying with "
                                   "the outcome report cut to %d characters", step, str(exc)[:160], budget)
            gradient = variable.get_gradient_text().strip()
            entry["gradient"] = gradient
        except IndexError as exc:
            entry["error_kind"] = "missing_tags"
            entry["error"] = f"no <IMPROVED_VARIABLE> tags after a retry: {str(exc)[:300]}"
            logger.warning("TextGrad step %d abandoned: %s", step, entry["error"])
            continue
        except _EmptyGradient as exc:
            entry["error_kind"], entry["error"] = "empty_gradient", str(exc)
            logger.warning("TextGrad step %d failed: %s", step, entry["error"])
            continue
        except Exception as exc:
            entry["error_kind"], entry["error"] = "engine", f"{type(exc).__name__}: {exc}"
            entry["cause"] = classify_error(exc)
            logger.warning("TextGrad step %d failed (%s): %s", step, entry["cause"], entry["error"])
            continue
        candidate = variable.value.strip()
        entry["candidate"] = candidate
        if not candidate:
            entry["error_kind"], entry["error"] = "empty_candidate", "the update produced an empty t*"
            continue
        if candidate == current:
            entry["error_kind"], entry["error"] = "unchanged", "the update did not change t*"
            continue
        if leaks_answer(candidate, _gold_values(before), context=current + "\n" + "\n".join(constraints)):
            entry["error_kind"] = "leak"
            entry["error"] = "rejected: the candidate states a gold answer of the minibatch"
            logger.info("TextGrad step %d: candidate leaks a gold answer; rejected", step)
            continue
        copied = copies_a_query(candidate, [_query_text(r) for r in before.rollouts],
                                allowed=current + "\n" + "\n".join(constraints))
        if copied:
            entry["error_kind"] = "copies_query"
            entry["error"] = f"rejected: the candidate copies query text ({copied!r}); t* must describe any outcome"
            logger.info("TextGrad step %d: candidate copies a query; rejected", step)
            continue
        try:
            after = evaluate(candidate)
        except CompileError:  # e.g. the error budget is exhausted: stop the compile, not just this step
            raise
        except Exception as exc:
            entry["error_kind"] = "evaluation"
            entry["error"] = f"evaluating the candidate failed: {type(exc).__name__}: {exc}"
            logger.warning("TextGrad step %d: %s", step, entry["error"])
            continue
        entry["score_after"] = after.score
        if after.score > before.score or (after.score == before.score and before.score > 0):
            entry["accepted"] = True
            any_accepted = True
            current, before = candidate, after
            logger.info("TextGrad step %d accepted: score %.4f -> %.4f", step, entry["score_before"], after.score)
        else:
            if after.score == before.score:
                entry["error_kind"] = "zero_tie"
            logger.info("TextGrad step %d rejected: score %.4f -> %.4f", step, entry["score_before"], after.score)
    return RefineResult(current, any_accepted, history, initial_score, before.score)
