"""The textual reward model R: a critique of each rollout that never states the gold answer.

TRPrompt trains the prompt model on *(query, textual reward) -> instruction*. The textual reward of a
rollout is a short critique written by an LM that sees the query, the instruction(s) used, the
program's outputs (with reasoning), the gold answer and the metric's score and feedback. It says how good
the outcome was, why, and what the instruction should have emphasised -- but it must **never state the
gold answer**; :mod:`trprompt_dspy.loop.answer_leaks` redacts any that slips through.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import dspy

from trprompt_dspy.loop.answer_leaks import redact_answer_leaks

if TYPE_CHECKING:
    from trprompt_dspy.loop.rollouts import Rollout
    from trprompt_dspy.runtime.faults import RetryPolicy

logger = logging.getLogger(__name__)

__all__ = ["CORRECT_VERDICT", "WriteTextualReward", "TextualRewardModel", "outcome_word", "strip_field_markers",
           "verdict_sentence", "with_verdict"]


def outcome_word(score: float, success_threshold: float = 1.0) -> str:
    """``"correct"`` (``score >= success_threshold``), ``"partly correct"`` (above 0) or ``"incorrect"``.

    The one wording of a metric score, shared by the verdict of a reward and TextGrad's outcome report.

    Example:
        >>> outcome_word(1.0), outcome_word(0.5), outcome_word(0.0), outcome_word(0.5, success_threshold=0.5)
        ('correct', 'partly correct', 'incorrect', 'correct')
    """
    score = float(score)
    return "correct" if score >= success_threshold else "partly correct" if score > 0 else "incorrect"


def verdict_sentence(score: float) -> str:
    """The metric's verdict on one outcome, as the sentence a verdict-grounded textual reward starts with.

    A small reward LM often contradicts the metric (the 1.5B study model called 10 of 17 wrong rollouts
    "correct"). With ``TRPromptOptimizer(reward_verdict=True)`` every textual reward starts with this sentence,
    written from the score itself, so what the prompt model is trained on never disagrees with the metric
    about *whether* the outcome was good; the critique after it says why.

    Example:
        >>> verdict_sentence(1.0)
        'Verdict: the outcome was correct (metric score 1).'
        >>> verdict_sentence(0.0)
        'Verdict: the outcome was incorrect (metric score 0).'
        >>> verdict_sentence(0.25)
        'Verdict: the outcome was partly correct (metric score 0.25).'
    """
    return f"Verdict: the outcome was {outcome_word(score)} (metric score {float(score):g})."


#: What a prompt model trained on verdict-grounded rewards is conditioned on before t*: a correct outcome.
CORRECT_VERDICT = verdict_sentence(1.0)


def with_verdict(reward: str, score: float) -> str:
    """``reward`` after the metric's verdict on its outcome (:func:`verdict_sentence`).

    Example:
        >>> with_verdict("The plan skipped a quantity.", 0.0)
        'Verdict: the outcome was incorrect (metric score 0). The plan skipped a quantity.'
    """
    return f"{verdict_sentence(score)} {reward.strip()}"


# --------------------------------------------------------------------------------------------------
# Textual reward model
# --------------------------------------------------------------------------------------------------


class WriteTextualReward(dspy.Signature):
    """Grade one run of a language-model program and write its textual reward.

    The textual reward is a short critique (2-4 sentences) of the outcome: whether the output was
    correct or good and why, what went right or wrong in the reasoning, and what the instruction given
    to the model should have emphasised for this kind of query. It is used to train a model that writes
    instructions, so give transferable guidance. NEVER state, quote or hint at the gold answer or the
    final result (no numbers or names from it); refer to it only as "the correct answer".
    """

    task: str = dspy.InputField(desc="What the program does.")
    query: str = dspy.InputField(desc="The program's input.")
    instructions_used: str = dspy.InputField(desc="The query-specific instruction(s) the program was given.")
    program_output: str = dspy.InputField(desc="The program's outputs, including its reasoning.")
    gold_answer: str = dspy.InputField(desc="The reference answer. For your judgement only: never repeat it.")
    metric_score: str = dspy.InputField(desc="The metric's score for this output (higher is better).")
    metric_feedback: str = dspy.InputField(desc="The metric's own feedback, if any.")
    textual_reward: str = dspy.OutputField(
        desc="2-4 sentences: how good the outcome was, why, and what the instruction should have emphasised. "
        "Never state the gold answer."
    )


_FIELD_MARKER = re.compile(r"\[\[\s*##\s*\w+\s*##\s*\]\]")


def strip_field_markers(text: str) -> str:
    """``text`` without DSPy ChatAdapter field markers (``[[ ## completed ## ]]``) that a small LM copied in.

    Seen in 4 of 24 critiques written by the 1.5B study model; left in, the prompt model would be trained
    (and, through TextGrad, conditioned) on adapter syntax.

    Example:
        >>> strip_field_markers("Correct, clear reasoning. [[ ## completed ## ]]")
        'Correct, clear reasoning.'
    """
    return re.sub(r"\s{2,}", " ", _FIELD_MARKER.sub(" ", text)).strip()


def _clip(text: str, limit: int) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 15].rstrip() + " ...[truncated]"


def _lines(data: Mapping[str, Any]) -> str:
    return "\n".join(f"{k}: {v}" for k, v in data.items())


class TextualRewardModel:
    """The textual reward model R: writes a leak-free critique for each rollout.

    Args:
        lm: The ``dspy.LM`` that writes the critiques; ``None`` uses ``dspy.settings.lm`` at call time.
        max_field_chars: Longer inputs (reasoning, outputs) are truncated to this many characters.
        signature: The DSPy signature to use; override to change the grading prompt (it must keep the
            input fields of :class:`WriteTextualReward` and the ``textual_reward`` output).

    Example:
        >>> from dspy.utils import DummyLM
        >>> from trprompt_dspy.loop.rollouts import Rollout
        >>> r = Rollout(example_index=0, sample_index=0, inputs={"question": "6*7?"}, gold={"answer": "42"},
        ...             outputs={"answer": "42"}, score=1.0)
        >>> model = TextualRewardModel(DummyLM({"## query ##": {"textual_reward": "Correct: 42."}}))
        >>> model.score_rollouts([r])[0].reward, r.reward_redactions
        ('Correct: [redacted].', 1)
    """

    def __init__(
        self,
        lm: dspy.BaseLM | None = None,
        *,
        max_field_chars: int = 1500,
        signature: type[dspy.Signature] = WriteTextualReward,
    ):
        if lm is not None and not isinstance(lm, dspy.BaseLM):
            raise TypeError(f"lm must be a dspy.LM (or None for dspy.settings.lm); got {type(lm).__name__}: {lm!r}.")
        if not isinstance(max_field_chars, int) or max_field_chars < 50:
            raise ValueError(f"max_field_chars must be an integer >= 50; got {max_field_chars!r}.")
        self.lm = lm
        self.max_field_chars = max_field_chars
        self.predict = dspy.Predict(signature)

    def _resolve_lm(self) -> dspy.BaseLM:
        lm = self.lm or dspy.settings.lm
        if lm is None:
            raise RuntimeError(
                "TextualRewardModel has no LM: pass lm=dspy.LM(...) or call dspy.configure(lm=...) first."
            )
        return lm

    def reward_inputs(self, rollout: Rollout) -> dict[str, str]:
        """The signature inputs for one rollout (useful for inspection and tests)."""
        limit = self.max_field_chars
        tasks = list(dict.fromkeys(c["request"].get("task", "") for c in rollout.instructions if c.get("request")))
        instructions = "\n".join(
            f"[{c.get('predictor', '?')}] {c.get('instruction', '')}" for c in rollout.instructions
        ) or "(none recorded)"
        if len(rollout.trace) > 1:
            output = "\n".join(f"[{s.get('predictor', '?')}] {_lines(s.get('outputs', {}))}" for s in rollout.trace)
        else:
            output = _lines(rollout.outputs)
        if rollout.error:
            output = (output + "\n" if output else "") + f"(the program failed: {rollout.error})"
        return {
            "task": _clip("\n".join(t for t in tasks if t) or "(not recorded)", limit),
            "query": _clip(_lines(rollout.inputs), limit),
            "instructions_used": _clip(instructions, limit),
            "program_output": _clip(output or "(no output)", limit),
            "gold_answer": _clip(_lines(rollout.gold) or "(none)", limit),
            "metric_score": f"{rollout.score:g}",
            "metric_feedback": _clip(rollout.feedback or "(none)", limit),
        }

    def write(self, rollout: Rollout) -> tuple[str, int]:
        """Write the textual reward for one rollout.

        Returns:
            ``(reward, n_redacted)``: the leak-free critique and how many gold mentions were removed.

        Raises:
            Exception: Whatever the LM or the adapter raised (``score_rollouts`` records it instead).
        """
        lm = self._resolve_lm()
        with dspy.context(lm=lm):
            out = self.predict(**self.reward_inputs(rollout))
        text = strip_field_markers(str(getattr(out, "textual_reward", "") or ""))
        if not text:
            from trprompt_dspy.runtime.faults import EmptyCompletionError

            raise EmptyCompletionError("the reward model returned an empty textual_reward")
        return redact_answer_leaks(text, rollout.gold, context=_lines(rollout.inputs))

    def score_rollouts(self, rollouts: Sequence[Rollout], num_threads: int = 1, *,
                       retry: RetryPolicy | None = None) -> list[Rollout]:
        """Fill ``reward``, ``reward_redactions`` and ``reward_error`` of each rollout, in place.

        A failure on one rollout (LM error, parse failure, empty critique) is recorded in its
        ``reward_error`` (and its kind in ``reward_error_kind``) and leaves ``reward`` as ``None``; it
        never aborts the batch.

        Args:
            rollouts: The rollouts to score.
            num_threads: Parallel LM calls.
            retry: Retry transient LM failures (timeouts, 5xx, dropped connections) with this policy.

        Returns:
            The same rollout objects, in the same order.
        """
        from trprompt_dspy.runtime.faults import classify_error
        from trprompt_dspy.runtime.parallel import parallel_map

        self._resolve_lm()  # fail early and clearly when no LM is configured

        def one(r: Rollout) -> Rollout:
            try:
                r.reward, r.reward_redactions = retry.call(self.write, r) if retry else self.write(r)
                r.reward_error = r.reward_error_kind = None
            except Exception as exc:
                r.reward, r.reward_redactions = None, 0
                r.reward_error = f"{type(exc).__name__}: {exc}"
                r.reward_error_kind = classify_error(exc)
                logger.warning("textual reward failed for example %s sample %s: %s",
                               r.example_index, r.sample_index, r.reward_error)
            return r

        parallel_map(one, list(rollouts), num_threads=num_threads)
        n_red = sum(r.reward_redactions for r in rollouts)
        if n_red:
            logger.info("redacted %d gold-answer mention(s) from %d textual rewards", n_red, len(rollouts))
        return list(rollouts)
