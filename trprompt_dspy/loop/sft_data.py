"""Step 2's data: rollouts with textual rewards become prompt-model SFT examples.

One example per recorded instruction: the request (predictor, task, query) with its reward replaced by
the rollout's textual reward ``t``, and the instruction as the completion -- *given this query and this
described outcome, this is the instruction that produced it*. Instructions that state the gold answer are
dropped (:mod:`trprompt_dspy.loop.answer_leaks`), and an instruction cut at the token cap is trimmed to its
last complete sentence, so the prompt model never learns to stop mid-sentence.

Example:
    >>> complete_sentences("Read the question. Then add the two")
    'Read the question.'
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
from collections.abc import Iterable

from trprompt_dspy.backends.prompt_model.base import NO_INSTRUCTION, InstructionRequest, SFTExample
from trprompt_dspy.loop.answer_leaks import instruction_leaks_answer, redact_answer_leaks
from trprompt_dspy.loop.rollouts import Rollout
from trprompt_dspy.loop.textual_reward import with_verdict

logger = logging.getLogger(__name__)

__all__ = ["SFTBatch", "balance_outcomes", "build_sft_examples", "complete_sentences"]


class SFTBatch(list):
    """A ``list[SFTExample]`` that also says what :func:`build_sft_examples` skipped and why.

    Attributes:
        num_leaky: Instructions dropped because they contain the gold answer.
        num_no_reward: Instructions skipped because their rollout has no textual reward.
        num_low_score: Instructions skipped by ``min_score``.
        num_empty: Empty instructions skipped.
        num_duplicates: Exact duplicates skipped.
    """

    def __init__(self, items: Iterable[SFTExample] = ()):
        super().__init__(items)
        self.num_leaky = 0
        self.num_no_reward = 0
        self.num_low_score = 0
        self.num_empty = 0
        self.num_duplicates = 0
        self.num_balanced_out = 0

    def stats(self) -> dict[str, int]:
        return {"num_examples": len(self), "num_leaky": self.num_leaky, "num_no_reward": self.num_no_reward,
                "num_low_score": self.num_low_score, "num_empty": self.num_empty,
                "num_duplicates": self.num_duplicates, "num_balanced_out": self.num_balanced_out}


_SENTENCE_END = re.compile(r"[.!?:;)\]\"'`*]$")
_LAST_BOUNDARY = re.compile(r"[.!?](?=[\s\"')\]]|$)")


def complete_sentences(instruction: str) -> str:
    """``instruction`` without a trailing unfinished sentence (one cut at the token cap).

    The prompt model learns to end where its training instructions end (the completion ends with EOS), so an
    instruction cut mid-sentence at ``max_instruction_tokens`` is trimmed to its last complete sentence
    before it becomes an SFT completion. One with no complete sentence is kept as it is.

    Example:
        >>> complete_sentences("List the quantities. Then compute the total of")
        'List the quantities.'
        >>> complete_sentences("Add the two numbers.")
        'Add the two numbers.'
        >>> complete_sentences("Compute 2.5 times the")
        'Compute 2.5 times the'
    """
    text = instruction.rstrip()
    if not text or _SENTENCE_END.search(text):
        return text
    ends = [m.end() for m in _LAST_BOUNDARY.finditer(text)]
    return text[: ends[-1]].rstrip() if ends else text


def build_sft_examples(
    rollouts: Iterable[Rollout], *, leak_filter: bool = True, min_score: float | None = None,
    verdict: bool = False, abstain: bool = False,
) -> tuple[SFTBatch, int]:
    """Turn scored, rewarded rollouts into prompt-model SFT examples.

    One example per recorded instruction: the request (predictor, task, query) with its reward replaced
    by the rollout's textual reward ``t``, and the instruction as the completion. This is TRPrompt's
    supervised signal: *given this query and this described outcome, this is the instruction that
    produced it*.

    Args:
        rollouts: Rollouts whose ``reward`` was filled by ``TextualRewardModel.score_rollouts``.
        leak_filter: Drop instructions that state the gold answer (:func:`instruction_leaks_answer`)
            and redact any gold mention left in the reward.
        min_score: Keep only rollouts with ``score >= min_score`` (``None`` keeps all: the reward already
            says how good the outcome was).
        verdict: Start each reward with the metric's verdict on its rollout
            (:func:`~trprompt_dspy.loop.textual_reward.with_verdict`), so the training data never contradicts
            the metric about whether the outcome was good.
        abstain: An empty instruction (the prompt model abstained, or the "no instruction" candidate, whose
            rollout is the student's own answer) becomes an example whose completion is
            :data:`~trprompt_dspy.backends.prompt_model.base.NO_INSTRUCTION`, so the prompt model learns
            when adding nothing is best; without it empty instructions are skipped.

    Returns:
        ``(examples, num_leaky)``: an :class:`SFTBatch` (a list of ``SFTExample`` whose counters say what
        was skipped and why) and the number of instructions dropped for stating the answer.

    Example:
        ``examples, n_leaky = build_sft_examples(rollouts)``
    """
    batch = SFTBatch()
    seen: set[tuple[str, str, str, str, str]] = set()
    for r in rollouts:
        if not r.instructions:
            continue
        if not r.reward or not r.reward.strip():
            batch.num_no_reward += len(r.instructions)
            continue
        if min_score is not None and r.score < min_score:
            batch.num_low_score += len(r.instructions)
            continue
        reward = r.reward.strip()
        if leak_filter:
            reward, _ = redact_answer_leaks(reward, r.gold, context="\n".join(f"{k}: {v}" for k, v in r.inputs.items()))
        if verdict:
            reward = with_verdict(reward, r.score)
        for call in r.instructions:
            instruction = complete_sentences(str(call.get("instruction") or "").strip())
            if not instruction and abstain:
                instruction = NO_INSTRUCTION
            if not instruction:
                batch.num_empty += 1
                continue
            request = dataclasses.replace(InstructionRequest.from_dict(call["request"]), reward=reward)
            if leak_filter and instruction_leaks_answer(instruction, r.gold, query=request.query):
                batch.num_leaky += 1
                continue
            key = (request.predictor, request.task, request.query, request.reward, instruction)
            if key in seen:
                batch.num_duplicates += 1
                continue
            seen.add(key)
            batch.append(SFTExample(request=request, instruction=instruction, score=r.score))
    if batch.num_leaky:
        logger.info("dropped %d instruction(s) that state the gold answer", batch.num_leaky)
    return batch, batch.num_leaky


def balance_outcomes(batch: SFTBatch, rng: random.Random) -> SFTBatch:
    """``batch`` with as many examples from good outcomes (score >= 1) as from the others.

    The more frequent kind is sampled down to the size of the rarer one with ``rng``; order is kept. A batch
    with only one kind is returned unchanged (there is nothing to balance against), and
    ``num_balanced_out`` counts what was dropped.

    Example:
        >>> from trprompt_dspy.backends.prompt_model.base import InstructionRequest
        >>> req = InstructionRequest(predictor="p", task="t", query="q", reward="r")
        >>> batch = SFTBatch(SFTExample(request=req, instruction=f"i{k}", score=float(k == 0)) for k in range(4))
        >>> out = balance_outcomes(batch, random.Random(0))
        >>> sorted(e.score for e in out), out.num_balanced_out
        ([0.0, 1.0], 2)
    """
    good = [i for i, e in enumerate(batch) if e.score >= 1.0]
    other = [i for i, e in enumerate(batch) if e.score < 1.0]
    out = SFTBatch()
    out.__dict__.update(vars(batch))  # the skip counters
    if not good or not other:
        out.extend(batch)
        return out
    n = min(len(good), len(other))
    keep = set(good if len(good) == n else rng.sample(good, n)) | set(other if len(other) == n else rng.sample(other, n))
    out.extend(e for i, e in enumerate(batch) if i in keep)
    out.num_balanced_out += len(batch) - len(out)
    logger.info("balanced the SFT data: %d good and %d other outcomes, %d dropped", n, n, len(batch) - len(out))
    return out
