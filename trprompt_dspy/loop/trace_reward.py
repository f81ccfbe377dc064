"""Textual rewards bootstrapped from the metric's trace: the verdict first, then what the instruction changed.

A small reward LM contradicts the metric (the 1.5B called 18 of 22 failed GSM-Hard rollouts "correct") or
restates the question, the answer or the gold solution instead of critiquing. The **trace-built reward** needs
no LM and cannot do either:

1. the metric's verdict (:func:`~trprompt_dspy.loop.textual_reward.verdict_sentence`), which nothing after it
   overrides;
2. what the candidate did against the **student's own answer on the same query** (the uncompiled program, run
   once per training query and kept): the instruction *fixed* it, *broke* it, *kept it correct* or *left it
   wrong*; for the "no instruction" candidate (the student itself) what the program does on its own;
3. how the run failed, when it did (the error kind: an unparseable answer, a truncated reply, a crash);
4. the metric's own feedback text (GEPA style), with the gold answer redacted.

A reward LM's critique is appended (:func:`merge_critique`) only where it agrees with the verdict
(:func:`contradicts`) and says something the trace does not (:func:`is_restatement`).

Example:
    >>> from trprompt_dspy.loop.rollouts import Rollout
    >>> student = Rollout(example_index=0, sample_index=0, inputs={"question": "6*7?"}, gold={"answer": "42"},
    ...                   outputs={"answer": "41"}, score=0.0)
    >>> r = Rollout(example_index=0, sample_index=0, inputs={"question": "6*7?"}, gold={"answer": "42"},
    ...             instructions=[{"predictor": "p", "instruction": "Multiply carefully."}],
    ...             outputs={"answer": "42"}, score=1.0, feedback="Correct: 42.")
    >>> trace_reward(r, student)
    "Verdict: the outcome was correct (metric score 1). The instruction fixed the program's own wrong answer to \
this query. Metric feedback: Correct: [redacted]."
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from trprompt_dspy.loop.answer_leaks import redact_answer_leaks
from trprompt_dspy.loop.textual_reward import outcome_word, verdict_sentence

if TYPE_CHECKING:
    from trprompt_dspy.loop.rollouts import Rollout

__all__ = ["CHANGES", "outcome_change", "change_against_student", "trace_reward", "contradicts", "is_restatement", "merge_critique"]

#: What a candidate did against the student's own answer, by (student correct, candidate correct).
CHANGES: Mapping[tuple[bool, bool], str] = {
    (False, True): "The instruction fixed the program's own wrong answer to this query.",
    (True, False): "The instruction broke the program's own correct answer to this query.",
    (True, True): "The instruction kept the program's own correct answer correct.",
    (False, False): "The instruction left the program's own wrong answer wrong.",
}
_NO_INSTRUCTION = {
    True: "No instruction was added: the program answers this query correctly on its own.",
    False: "No instruction was added: on its own the program answers this query wrongly.",
}
_ERRORS = {
    "parse_error": "The target's reply could not be parsed into the program's output fields.",
    "truncated": "The target's reply was cut at its max_tokens.",
    "timeout": "The call timed out.",
    "metric_error": "The metric could not score the output.",
}


def _correct(score: float, threshold: float) -> bool:
    return outcome_word(score, threshold) == "correct"


def _instructed(rollout: Rollout) -> bool:
    return any((c.get("instruction") or "").strip() for c in rollout.instructions)


def outcome_change(rollout: Rollout, student: Rollout, *, success_threshold: float = 1.0) -> str:
    """``"fixed"``, ``"broke"``, ``"kept"`` (correct before and after) or ``"left_wrong"`` against ``student``.

    Example:
        >>> from trprompt_dspy.loop.rollouts import Rollout
        >>> outcome_change(Rollout(0, 0, score=1.0), Rollout(0, 0, score=0.0))
        'fixed'
    """
    before, after = _correct(student.score, success_threshold), _correct(rollout.score, success_threshold)
    return {(False, True): "fixed", (True, False): "broke", (True, True): "kept", (False, False): "left_wrong"}[
        (before, after)]


def change_against_student(rollout: Rollout, student: Rollout | None, *, success_threshold: float = 1.0) -> str:
    """One of :data:`CHANGES` (or the "no instruction" sentence); ``""`` when the student's answer is unknown.

    Example:
        >>> from trprompt_dspy.loop.rollouts import Rollout
        >>> s = Rollout(example_index=0, sample_index=0, score=1.0)
        >>> change_against_student(Rollout(example_index=0, sample_index=0, score=1.0), s)
        'No instruction was added: the program answers this query correctly on its own.'
    """
    ok = _correct(rollout.score, success_threshold)
    if not _instructed(rollout):
        return _NO_INSTRUCTION[ok]
    if student is None:
        return ""
    return CHANGES[(_correct(student.score, success_threshold), ok)]


def trace_reward(rollout: Rollout, student: Rollout | None, *, success_threshold: float = 1.0) -> str:
    """The trace-built textual reward of ``rollout`` (verdict, change against ``student``, failure, feedback).

    Args:
        rollout: A scored rollout (instructed, or the student's own run for the "no instruction" candidate).
        student: The student's rollout on the same query (``None``: the change sentence is left out).
        success_threshold: The score at which an outcome counts as correct.

    Returns:
        Plain text with the gold answer redacted; it always starts with the verdict sentence.
    """
    parts = [verdict_sentence(rollout.score), change_against_student(rollout, student,
                                                                     success_threshold=success_threshold)]
    if rollout.error:
        parts.append(_ERRORS.get(rollout.error_kind or "", "The program failed on this query."))
    if rollout.feedback:
        feedback, _ = redact_answer_leaks(rollout.feedback.strip(), rollout.gold,
                                          context="\n".join(map(str, rollout.inputs.values())))
        parts.append(f"Metric feedback: {feedback}")
    return " ".join(p for p in parts if p)


_NEGATED = ("incorrect", "not correct", "wrong", "not accurate", "inaccurate", "does not match", "doesn't match",
            "fail", "error", "mistake")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def claims_correct(text: str) -> bool | None:
    """What the first sentence of ``text`` says of the outcome: ``True`` correct, ``False`` wrong, ``None`` neither.

    Example:
        >>> claims_correct("The output is correct."), claims_correct("The answer is wrong."), claims_correct("Hm.")
        (True, False, None)
    """
    first = _SENTENCE.split(text.strip(), maxsplit=1)[0].lower()
    if any(n in first for n in _NEGATED):
        return False
    return True if "correct" in first or "right" in first else None


def contradicts(critique: str, score: float, *, success_threshold: float = 1.0) -> bool:
    """Whether ``critique`` opens by calling the outcome the opposite of what the metric said.

    Example:
        >>> contradicts("The program's output is correct.", 0.0), contradicts("Wrong result.", 0.0)
        (True, False)
    """
    claim = claims_correct(critique)
    return claim is not None and claim != _correct(score, success_threshold)


_WORD = re.compile(r"[a-z]{3,}|\d+(?:\.\d+)?")
_STOP = frozenset(["the", "and", "for", "that", "with", "this", "was", "are", "but", "not", "you", "your", "its", "has", "have", "had", "from", "into", "than", "then", "they", "them", "their", "there", "which", "what", "when", "will", "would", "should", "could", "can", "also", "each", "per", "all", "any", "one", "two", "program", "output", "answer", "answers", "query", "question", "correct", "incorrect", "final", "result", "model", "response", "instruction", "instructions"])


def _content(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in _STOP]


def is_restatement(critique: str, rollout: Rollout, *, novel_words: int = 4) -> bool:
    """Whether ``critique`` only restates the query, the program's output or the gold solution.

    A critique *restates* when fewer than ``novel_words`` of its content words (three or more letters, or
    numbers; common words aside) appear in none of the query, the outputs, the trace and the gold fields, or
    when it copies a gold solution's calculator marks (``<<8*30=240>>``). What is left over is what the
    critique adds: a diagnosis ("units", "percentage", "misread").

    Example:
        >>> from trprompt_dspy.loop.rollouts import Rollout
        >>> r = Rollout(example_index=0, sample_index=0, inputs={"question": "Roselyn had 20 books before."},
        ...             gold={"answer": "20"}, outputs={"answer": "20"})
        >>> is_restatement("Roselyn had [redacted] books before.", r)
        True
        >>> is_restatement("It forgot to convert hours into minutes before multiplying by the weekly rate.", r)
        False
    """
    if "<<" in critique and ">>" in critique:
        return True
    seen_text = " ".join([*map(str, rollout.inputs.values()), *map(str, rollout.outputs.values()),
                          *map(str, rollout.gold.values()),
                          *(str(s.get("outputs", "")) for s in rollout.trace)])
    seen = set(_content(seen_text)) | {"redacted"}
    novel = {w for w in _content(critique) if w not in seen}
    return len(novel) < novel_words


def merge_critique(reward: str, critique: str | None, rollout: Rollout, *, success_threshold: float = 1.0) -> tuple[str, str]:
    """Append the reward LM's ``critique`` to a trace-built ``reward`` when it is consistent and informative.

    Returns:
        ``(reward, why)``: ``why`` is ``"added"``, ``"none"`` (no critique), ``"contradicts"`` or ``"restates"``.

    Example:
        >>> from trprompt_dspy.loop.rollouts import Rollout
        >>> r = Rollout(example_index=0, sample_index=0, inputs={"question": "2+2?"}, score=0.0)
        >>> merge_critique("Verdict: ...", "The output is correct.", r)
        ('Verdict: ...', 'contradicts')
    """
    if not critique or not critique.strip():
        return reward, "none"
    if contradicts(critique, rollout.score, success_threshold=success_threshold):
        return reward, "contradicts"
    if is_restatement(critique, rollout):
        return reward, "restates"
    return f"{reward} Critique: {critique.strip()}", "added"
