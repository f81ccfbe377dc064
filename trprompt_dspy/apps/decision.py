"""What a compile decided and why, in a few lines a newcomer can read (the end of ``trprompt demo``, the top of its report).

``compile`` returns either your program unchanged (the *student*) or one trained iteration: the program
plus a prompt model that writes an instruction for each question. It decides on the validation set,
question by question (:mod:`trprompt_dspy.loop.selection`): an iteration is returned only if it scores
higher than the student and, with ``significance_level``, if the questions it won against the ones it lost
pass a one-sided sign test. :func:`decision_summary` puts that in words:

1. the decision and its reason;
2. the validation counts behind it: right answers of each candidate, questions won and lost, the
   sign-test p-value and the level it had to pass;
3. what the best iteration writes (or, when it was rejected, would have written) for a few of those
   questions, the ones where the two candidates differ first, so you can judge the instructions yourself;
4. what to try next.

It reads ``compiled.detailed_results`` (or its ``to_dict()``) and two files of the run's ``log_dir``:
``baseline.json`` (the student's per-question ``scores`` and the questions, ``inputs``) and
``iter_XXX/val.json`` (the iteration's ``scores`` and ``instructions``, in valset order). Without them
(an older or a moved run) it falls back to the mean scores in the result and shows no instructions.

Example:
    >>> stats = {"selected": "student", "best_iteration": None, "baseline_score": 0.2, "best_score": None,
    ...          "val_size": 50, "log_dir": None, "budget": {"val_size": 50}}
    >>> print(decision_summary(stats)[0])
    Decision: compile returned your program unchanged (the student), because no TRPrompt iteration finished, so there was nothing to compare it with.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trprompt_dspy.config import AUTO_BUDGETS, DEFAULT_SIGNIFICANCE_LEVEL
from trprompt_dspy.results import STUDENT
from trprompt_dspy.runtime.paired import paired_counts, sign_test_greater

logger = logging.getLogger(__name__)

__all__ = ["Evidence", "load_evidence", "iteration_examples", "decision_summary", "STRONGER_TARGET"]

#: The target suggested when yours answers too few validation questions on its own to build on (a preset).
STRONGER_TARGET = "qwen2.5-coder-1.5b-instruct"
#: Baseline shares below / above which the target itself is the likely limit (too weak / nothing left to gain).
_WEAK, _SATURATED = 0.3, 0.85


@dataclass
class Evidence:
    """The validation set, question by question, for the student and the best iteration.

    Attributes:
        iteration: The best iteration (``None``: none finished).
        student_scores / iteration_scores: Per-question scores in valset order (empty when not on disk).
        instructions: What the iteration wrote per question (``""``: no instruction), or empty.
        questions: The questions' input text, or empty.
    """

    iteration: int | None
    student_scores: list[float] = field(default_factory=list)
    iteration_scores: list[float] = field(default_factory=list)
    instructions: list[str] = field(default_factory=list)
    questions: list[str] = field(default_factory=list)

    @property
    def paired(self) -> bool:
        """Whether both candidates have a score for every question (so won / lost can be counted)."""
        return bool(self.student_scores) and len(self.student_scores) == len(self.iteration_scores)

    def won_lost(self) -> tuple[int, int]:
        """Questions the iteration scored above / below the student on."""
        return paired_counts(self.student_scores, self.iteration_scores)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _question_text(inputs: Any) -> str:
    if isinstance(inputs, Mapping):
        if len(inputs) == 1:
            return str(next(iter(inputs.values())))
        return "; ".join(f"{k}: {v}" for k, v in inputs.items())
    return str(inputs)


def load_evidence(stats: Mapping[str, Any]) -> Evidence:
    """Read the best iteration's and the student's per-question validation results from ``stats["log_dir"]``.

    Missing or unreadable files leave the matching fields empty; nothing raises.
    """
    k = stats.get("best_iteration")
    log_dir = stats.get("log_dir")
    ev = Evidence(iteration=k)
    if k is None or not log_dir:
        return ev
    base = _read_json(Path(log_dir) / "baseline.json") or {}
    val = _read_json(Path(log_dir) / f"iter_{int(k):03d}" / "val.json") or {}
    ev.student_scores = [float(s) for s in base.get("scores") or []]
    ev.iteration_scores = [float(s) for s in val.get("scores") or []]
    ev.instructions = [str(i or "") for i in val.get("instructions") or []]
    ev.questions = [_question_text(q) for q in base.get("inputs") or []]
    return ev


def _binary(scores: Sequence[float]) -> bool:
    return all(s in (0.0, 1.0) for s in scores)


def _outcome(score: float, binary: bool) -> str:
    return ("right" if score == 1.0 else "wrong") if binary else f"{score:.2f}"


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3].rstrip() + "..."


def iteration_examples(ev: Evidence, max_examples: int = 3) -> list[dict[str, Any]]:
    """Validation questions with what the iteration wrote, the ones that decided the comparison first.

    Order: questions the iteration lost, then won (alternating, so both kinds show), then the others
    with an instruction, then the rest.

    Returns:
        Up to ``max_examples`` dicts ``{"index", "question", "instruction", "student", "iteration", "change"}``;
        ``student`` / ``iteration`` are ``"right"`` / ``"wrong"`` (or the score), ``change`` is ``"won"``,
        ``"lost"`` or ``"same"``. Empty when the iteration's instructions are not on disk.

    Example:
        >>> ev = Evidence(0, [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], ["Check units.", "Add first.", ""], ["q0", "q1", "q2"])
        >>> [(e["index"], e["change"], e["instruction"]) for e in iteration_examples(ev, 2)]
        [(1, 'won', 'Add first.'), (0, 'same', 'Check units.')]
    """
    if not ev.instructions or not ev.paired or len(ev.instructions) != len(ev.student_scores):
        return []
    binary = _binary(ev.student_scores + ev.iteration_scores)
    won, lost, same, bare = [], [], [], []
    for i, (s, c) in enumerate(zip(ev.student_scores, ev.iteration_scores, strict=True)):
        (won if c > s else lost if c < s else same if ev.instructions[i].strip() else bare).append(i)
    decisive = [i for pair in zip(lost, won, strict=False) for i in pair]
    decisive += lost[len(decisive) // 2:] if len(lost) > len(won) else won[len(decisive) // 2:]
    picked = (decisive + same + bare)[: max(0, max_examples)]
    return [{"index": i,
             "question": ev.questions[i] if i < len(ev.questions) else f"validation question {i}",
             "instruction": ev.instructions[i],
             "student": _outcome(ev.student_scores[i], binary),
             "iteration": _outcome(ev.iteration_scores[i], binary),
             "change": "won" if i in won else "lost" if i in lost else "same"} for i in picked]


def _tally(scores: Sequence[float]) -> str:
    if _binary(scores):
        return f"{int(sum(scores))}/{len(scores)} right"
    return f"a mean score of {sum(scores) / len(scores):.3f}"


def _p_text(p: float | None, level: float | None) -> str:
    if p is None:
        return ""
    verdict = "" if level is None else (f" < {level:g}" if p < level else f", needs p < {level:g}")
    return f"one-sided sign test p = {p:.2g}{verdict}"


def _next_budget(budget: Mapping[str, Any]) -> tuple[str, int] | None:
    """The smallest ``auto`` level that scores on more validation questions than ``budget``."""
    current = int(budget.get("val_size") or 0)
    bigger = sorted((b["val_size"], name) for name, b in AUTO_BUDGETS.items() if b["val_size"] > current)
    return (bigger[0][1], bigger[0][0]) if bigger else None


def _or_list(items: Sequence[str]) -> str:
    """``"a; b; or c"`` (semicolons, since the items have commas of their own)."""
    return items[0] if len(items) == 1 else "; ".join(items[:-1]) + f"; or {items[-1]}"


def _hints(stats: Mapping[str, Any], ev: Evidence, *, lead: bool, target: str | None) -> list[str]:
    hints = []
    nxt = _next_budget(stats.get("budget") or {})
    n = len(ev.student_scores) or int(stats.get("val_size") or 0)
    if lead:
        size = f"val_size={nxt[1]}" if nxt else f"val_size={2 * n}" if n else "a larger val_size"
        hints.append(f"a larger validation set, so that a real lead can pass the test ({size})")
    if nxt:
        hints.append(f"a larger budget (auto={nxt[0]!r}: more iterations and training questions"
                     f"{'' if lead else f', and {nxt[1]} validation questions'})")
    base = stats.get("baseline_score")
    shown = _tally(ev.student_scores) if ev.student_scores else f"a score of {base:.2f}" if base is not None else ""
    if base is not None and base < _WEAK and target != STRONGER_TARGET:
        hints.append(f"a stronger target that can act on the instructions (e.g. {STRONGER_TARGET}; "
                     f"yours got {shown} on its own)")
    elif base is not None and base > _SATURATED:
        hints.append(f"a harder task: your program already got {shown}, which leaves little to gain")
    return hints


def decision_summary(result: Any, *, significance_level: float | None = DEFAULT_SIGNIFICANCE_LEVEL,
                     target: str | None = None, max_examples: int = 3) -> list[str]:
    """The decision of a compile, the validation counts behind it, what the iteration writes, and what to try next.

    Args:
        result: ``compiled.detailed_results`` (a :class:`~trprompt_dspy.results.TRPromptResult`) or its
            ``to_dict()``.
        significance_level: The ``TRPromptOptimizer(significance_level=)`` the compile ran with (it is not
            stored in the result); ``None``: any lead was enough.
        target: The target model's name, so a suggestion never names the model you already use.
        max_examples: Validation questions to show with their instructions.

    Returns:
        Lines of plain text: one paragraph each, except the examples, which start with ``"  - "``.

    Example:
        >>> stats = {"selected": "student", "best_iteration": 1, "baseline_score": 0.24, "best_score": 0.22,
        ...          "val_size": 50, "log_dir": None, "budget": {"val_size": 50}}
        >>> for line in decision_summary(stats):
        ...     print(line)
        Decision: compile returned your program unchanged (the student), because its best trained iteration (1) did not score higher on the validation set.
        Validation set, 50 questions: iteration 1 scored 0.220, your program 0.240 (mean metric score).
        What to try next: a larger budget (auto='medium': more iterations and training questions, and 100 validation questions); or a stronger target that can act on the instructions (e.g. qwen2.5-coder-1.5b-instruct; yours got a score of 0.24 on its own).
    """
    stats: Mapping[str, Any] = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    selected = stats.get("selected", STUDENT)
    ev = load_evidence(stats)
    k = ev.iteration
    if k is None:
        budget = stats.get("budget") or {}
        cap = budget.get("max_metric_calls")
        return ["Decision: compile returned your program unchanged (the student), because no TRPrompt iteration "
                "finished, so there was nothing to compare it with.",
                "What to try next: " + (f"a larger max_metric_calls (it was {cap}) or none at all" if cap else
                                        "a larger budget") + ", so that at least one iteration completes; "
                f"compiling again with log_dir={stats.get('log_dir')!r} resumes the run."]
    returned = selected != STUDENT
    base, best = stats.get("baseline_score"), stats.get("best_score")
    if ev.paired:
        won, lost = ev.won_lost()
        p: float | None = sign_test_greater(won, lost)
        higher = sum(ev.iteration_scores) > sum(ev.student_scores)
    else:
        won = lost = 0
        p = stats.get("selection_p_value")
        higher = base is not None and best is not None and best > base

    if returned:
        why = ("because it beat your program on the validation set" if higher else
               "although it did not beat your program on the validation set (min_improvement=None returns the "
               "best iteration whatever it scored)")
        lines = [f"Decision: compile returned iteration {k}: for each question its trained prompt model writes an "
                 f"instruction that is added to your program's prompt, {why}."]
    elif higher:
        lines = [f"Decision: compile returned your program unchanged (the student), because the lead of its best "
                 f"trained iteration ({k}) on the validation set is too small to rule out chance."]
    else:
        lines = [f"Decision: compile returned your program unchanged (the student), because its best trained "
                 f"iteration ({k}) did not score higher on the validation set."]

    if ev.paired:
        rule = ("an iteration is returned only if it scores higher"
                + ("" if significance_level is None else f" and p < {significance_level:g}"))
        test = _p_text(p, None if not returned else significance_level)
        lines.append(f"Validation set, {len(ev.student_scores)} questions: iteration {k} got "
                     f"{_tally(ev.iteration_scores)}, your program {_tally(ev.student_scores)}; iteration {k} won "
                     f"{won} question{'' if won == 1 else 's'} and lost {lost} ({test}"
                     + ("" if returned else f"; {rule}") + ").")
    elif base is not None and best is not None:
        p_part = "" if p is None else f"; {_p_text(p, significance_level)}"
        lines.append(f"Validation set, {stats.get('val_size')} questions: iteration {k} scored {best:.3f}, "
                     f"your program {base:.3f} (mean metric score{p_part}).")
    iterations = stats.get("iterations") or []
    rate = next((it.get("abstention_rate") for it in iterations if it.get("iteration") == k), None)
    if rate:
        lines.append(f"Iteration {k} wrote no instruction for {100 * rate:.0f} % of the validation questions "
                     "(there it ran your program's own prompt).")

    examples = iteration_examples(ev, max_examples)
    if examples:
        lines.append(f"What iteration {k} writes, on {len(examples)} validation questions:" if returned else
                     f"What iteration {k} would have written (rejected), on {len(examples)} validation questions:")
        for e in examples:
            said = repr(_clip(e["instruction"], 160)) if e["instruction"].strip() else "no instruction"
            lines.append(f"  - {_clip(e['question'], 90)!r} -> {said} (your program: {e['student']}, "
                         f"iteration {k}: {e['iteration']})")

    if returned:
        lines.append("What to try next: check it on questions it has never seen (the held-out comparison) before "
                     "relying on it; save_compiled(...) keeps the program with its adapter.")
    else:
        hints = _hints(stats, ev, lead=higher, target=target)
        if hints:
            lines.append(f"What to try next: {_or_list(hints)}.")
    return lines
