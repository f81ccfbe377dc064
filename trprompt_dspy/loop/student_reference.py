"""The uncompiled student as the reference every instruction is measured against.

TRPrompt's loop runs the student itself (no instruction, greedy) once on each training query it samples and
keeps that rollout (``TRPromptRun`` caches it in ``student_rollouts.jsonl``). The functions here turn those
reference runs into what the loop needs, without touching any LM:

* :func:`no_instruction_candidates` — one "no instruction" candidate per query (the student's own rollout), so
  the prompt model also learns *when to stay silent* (``abstain=True``);
* :func:`count_against_student` — what this iteration's instructions did against the student's answers
  (fixed, broke, kept correct, left wrong, abstained): the figure that says whether the prompt model helps;
* :func:`apply_trace_rewards` / :func:`merge_critiques` — the trace-built textual rewards
  (:mod:`trprompt_dspy.loop.trace_reward`), optionally with the reward LM's critique added where it agrees.

Example (the student answered 41 to "6*7?"; an instruction made it answer 42):
    >>> from trprompt_dspy.loop.rollouts import Rollout
    >>> student = Rollout(0, 0, {"question": "6*7?"}, {"answer": "42"}, outputs={"answer": "41"}, score=0.0)
    >>> r = dataclasses.replace(student, outputs={"answer": "42"}, score=1.0,
    ...                         instructions=[{"predictor": "p", "instruction": "Multiply carefully."}])
    >>> count_against_student([r], {0: student}, prompts_per_query=1)["fixed"]
    1
    >>> silent = no_instruction_candidates([r], {0: student}, slot=1)[0]
    >>> silent.sample_index, silent.score, silent.instructions[0].get("instruction")
    (1, 0.0, '')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trprompt_dspy.loop.rollouts import Rollout

__all__ = ["OUTCOME_ERRORS", "apply_trace_rewards", "count_against_student", "merge_critiques",
           "no_instruction_candidates"]

#: Failed program runs that are still outcomes of the prompt (the target's reply could not be parsed or was cut):
#: with trace-built rewards they are trained on like any other outcome.
OUTCOME_ERRORS = frozenset({"parse_error", "truncated"})

#: The keys of :func:`count_against_student`'s result, in the order a log line reads them.
CHANGES = ("fixed", "broke", "kept", "left_wrong", "abstained")


def _wrote_nothing(rollout: Rollout) -> bool:
    return not any((c.get("instruction") or "").strip() for c in rollout.instructions)


def no_instruction_candidates(live: Sequence[Rollout], students: Mapping[int, Rollout], *,
                              slot: int) -> list[Rollout]:
    """One "no instruction" candidate per query: the student's own rollout, scored like the others.

    It takes ``sample_index = slot`` (``prompts_per_query``: after the sampled instructions) and, for each
    prompt-model request of the query's first instructed rollout in ``live``, an empty instruction, so SFT
    turns it into (query, its reward) -> :data:`~trprompt_dspy.backends.prompt_model.base.NO_INSTRUCTION`. In a
    multi-predictor program the requests of later predictors are those of that instructed run. A query whose
    student run failed for a reason other than its answer (:data:`OUTCOME_ERRORS`) gets no candidate.
    """
    first: dict[int, Rollout] = {}
    for r in live:
        if r.instructions and r.example_index not in first:
            first[r.example_index] = r
    out = []
    for i, r in sorted(first.items()):
        s = students.get(i)
        if s is None or (s.error and s.error_kind not in OUTCOME_ERRORS):
            continue
        out.append(dataclasses.replace(s, sample_index=slot, conditioned_on=r.conditioned_on,
                                       instructions=[{**c, "instruction": ""} for c in r.instructions]))
    return out


def count_against_student(live: Sequence[Rollout], students: Mapping[int, Rollout], *,
                          prompts_per_query: int) -> dict[str, int]:
    """Count, over the instructed rollouts (``sample_index < prompts_per_query``), what the instructions did
    against the student's own answers: the keys of :data:`CHANGES`. Rollouts without a student reference are
    left out; one that wrote no instruction at all counts as ``"abstained"``."""
    from trprompt_dspy.loop.trace_reward import outcome_change

    counts = dict.fromkeys(CHANGES, 0)
    for r in live:
        if r.sample_index >= prompts_per_query or r.example_index not in students:
            continue
        if _wrote_nothing(r):
            counts["abstained"] += 1
            continue
        counts[outcome_change(r, students[r.example_index])] += 1
    return counts


def apply_trace_rewards(live: Sequence[Rollout], students: Mapping[int, Rollout]) -> None:
    """Set each rollout's reward to its trace-built one (:func:`~trprompt_dspy.loop.trace_reward.trace_reward`),
    in place, clearing any earlier reward error. No LM is called."""
    from trprompt_dspy.loop.trace_reward import trace_reward

    for r in live:
        r.reward, r.reward_error, r.reward_error_kind = trace_reward(r, students.get(r.example_index)), None, None


def merge_critiques(live: Sequence[Rollout], critiqued: Sequence[Rollout]) -> tuple[dict[str, int], list[str]]:
    """Add the reward LM's critiques (``critiqued``: copies of rollouts in ``live`` that the reward LM scored)
    to the trace-built rewards of ``live``, in place, where :func:`~trprompt_dspy.loop.trace_reward.merge_critique`
    keeps them.

    Returns ``(why, failed_kinds)``: how many critiques met each fate (``"failed"`` for a reward-LM error, else
    ``merge_critique``'s reason) and the error kind of each failed one, for the caller's failure counters.
    """
    from trprompt_dspy.loop.trace_reward import merge_critique

    by_key = {r.key: r for r in live}
    why: dict[str, int] = {}
    failed: list[str] = []
    for c in critiqued:
        target = by_key[c.key]
        if c.reward_error:
            failed.append(c.reward_error_kind or "other")
            why["failed"] = why.get("failed", 0) + 1
            continue
        target.reward, w = merge_critique(target.reward or "", c.reward, target)
        target.reward_redactions = c.reward_redactions
        why[w] = why.get(w, 0) + 1
    return why, failed
