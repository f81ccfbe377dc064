"""Frozen results of a compile: ``compiled.detailed_results`` when ``track_stats=True``.

Example:
    >>> r = TRPromptResult(iterations=(), best_iteration=None, baseline_score=0.5, best_score=0.5,
    ...                    t_star_history=("init",), lm_calls={}, lm_tokens={}, failures={}, seed=0,
    ...                    log_dir="runs/x", budget={}, seconds=1.0)
    >>> r.to_dict()["best_score"]
    0.5
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["STUDENT", "IterationStats", "TRPromptResult"]

#: ``TRPromptResult.selected`` (and ``trprompt.json["selected"]``) when ``compile`` returned the student.
STUDENT = "student"


@dataclass(frozen=True)
class IterationStats:
    """What one TRPrompt iteration did and measured.

    Attributes:
        iteration: Index k (0-based).
        rollout_score: Mean metric score of the iteration's rollouts (sampled instructions).
        val_score: Validation score of the iteration's candidate program (greedy instructions, t*).
        t_star: The optimal textual reward after this iteration's TextGrad refinement.
        t_star_accepted: Whether TextGrad's proposal was accepted.
        num_rollouts / num_sft_examples: Data sizes.
        sft_steps / sft_loss: Fine-tune steps and per-step losses.
        redacted_rewards: Textual rewards in which the gold answer was redacted.
        filtered_instructions: Instructions dropped because they stated the answer.
        seconds: Wall time per phase. A phase that a killed run finished and a resumed run reloaded counts the
            killed run's time where it was saved (rollouts, SFT); TextGrad and validation are redone or
            reloaded at the resumed run's cost.
        against_student: What the iteration's sampled instructions did against the student's own answers on the
            same training queries: ``fixed``, ``broke``, ``kept`` (correct before and after), ``left_wrong``, and
            ``abstained`` (the prompt model wrote no instruction).
        abstention_rate: Share of validation questions on which this iteration's program wrote no instruction
            (so the predictor ran exactly as the student's); ``None`` when not measured.
        critiques: What happened to the reward LM's critiques (``added``, ``contradicts``, ``restates``,
            ``failed``) with ``textual_rewards="trace+critique"``.

    Example:
        >>> s = IterationStats(iteration=0, rollout_score=0.25, val_score=0.5, t_star="Correct.",
        ...                    t_star_accepted=True, num_rollouts=24, num_sft_examples=22, sft_steps=12,
        ...                    sft_loss=(1.32, 1.25), seconds={"rollouts": 518.0, "sft": 102.0})
        >>> IterationStats.from_dict(s.to_dict()) == s
        True
    """

    iteration: int
    rollout_score: float
    val_score: float | None
    t_star: str
    t_star_accepted: bool
    num_rollouts: int
    num_sft_examples: int
    sft_steps: int
    sft_loss: tuple[float, ...]
    redacted_rewards: int = 0
    filtered_instructions: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    against_student: dict[str, int] = field(default_factory=dict)
    abstention_rate: float | None = None
    critiques: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sft_loss"] = list(self.sft_loss)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IterationStats:
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        d["sft_loss"] = tuple(d.get("sft_loss", ()))
        return cls(**d)


@dataclass(frozen=True)
class TRPromptResult:
    """The record of a whole compile.

    Attributes:
        iterations: One :class:`IterationStats` per completed iteration.
        best_iteration: The iteration with the highest validation score (``None``: none completed).
        baseline_score: Validation score of the student as given (candidate 0).
        best_score: Validation score of the best iteration.
        selected: What ``compile`` returned: ``"student"`` (a copy of the student, because no iteration beat it
            by more than ``min_improvement`` on the valset) or the index of the returned iteration.
        selected_score: Validation score of the returned program (never below ``baseline_score`` unless
            ``min_improvement=None``).
        val_size: Validation examples every candidate was scored on.
        selection_p_value: One-sided exact sign-test p-value that the best iteration beats the student, over the
            validation examples where the two differ (:func:`~trprompt_dspy.loop.selection.selection_p_value`;
            ``None`` when no iteration completed or the run directory has no per-example scores). Small means the lead is unlikely to be noise; it decides the
            selection only with ``significance_level``.
        t_star_history: Every accepted value of the optimal textual reward, oldest first.
        lm_calls: LM calls per role (``target``, ``reward``, ``textgrad``, ``prompt_model``).
        lm_tokens: Token usage per model name (input and output tokens).
        lm_tokens_by_role: Token usage per role (``target``, ``reward``, ``textgrad``, ``seed_writer``;
            ``prompt_tokens``, ``completion_tokens``, ``total_tokens``), which ``lm_tokens`` cannot give when
            one model serves several roles. Only LMs that report usage to DSPy are counted: a prompt model
            that is not a ``dspy.LM`` (in-process, or a vLLM adapter) appears in ``lm_calls`` only.
            A resumed compile adds the tokens of its earlier runs (from ``state.json``); ``lm_tokens`` covers
            this run only.
        failures: Counted failures by kind. ``program_<kind>`` / ``reward_<kind>`` / ``textgrad_<kind>``: operations
            that failed for good (after retries), with ``<kind>`` from :func:`trprompt_dspy.runtime.faults.classify_error`
            (``timeout``, ``server_error``, ``connection``, ``rate_limit``, ``parse_error``, ``empty_completion``,
            ``metric_error``, ``prompt_model_error``...; TextGrad adds ``missing_tags``, ``empty_gradient``,
            ``leak``...); ``program_error`` / ``reward_error`` are their totals. ``retried_<kind>``: transient
            failures that were retried. ``prompt_model_empty_instruction`` / ``prompt_model_overlong_instruction``:
            instructions replaced by the base instructions / cut. ``<role>_lm_error``: failed LM calls per role.
        errors_by_phase: Program runs and their failures per phase of the compile (``"baseline evaluation"``,
            ``"rollouts"``, ``"student rollouts"``, ``"TextGrad minibatch"``, ``"validation"``), summed over
            iterations: ``runs``, ``failed``, ``instructed`` (runs with a prompt-model instruction),
            ``failed_instructed`` and the count of each failure kind (``parse_error``, ``truncated`` (an answer
            cut at ``max_tokens``), ``timeout``...; see :func:`trprompt_dspy.loop.rollouts.failure_breakdown`).
            :func:`trprompt_dspy.loop.rollouts.describe_failures` puts one phase in words.
        seed, log_dir, budget: How to reproduce the run.
        seconds: Wall time of this ``compile`` call. A compile resumed from ``log_dir`` counts only its own
            time, not the killed run's; the phases of every iteration, restored ones included, are in
            ``iterations[k].seconds``.
        instructions: Instructions the prompt model wrote during the compile and how many hit the token cap
            (``{"instructions", "hit_cap", "hit_cap_rate", "max_instruction_tokens"}``; empty when the backend
            does not report why generation stopped). A capped instruction ends mid-sentence.
        prompt_model: The prompt model's description (backend, base weights, ``single_base``).

    Example:
        After a compile, ``compiled.detailed_results`` holds one of these:

        >>> r = TRPromptResult(iterations=(), best_iteration=None, baseline_score=0.5, best_score=0.5,
        ...                    t_star_history=("init",), lm_calls={"target": 3, "reward": 2}, lm_tokens={},
        ...                    failures={}, seed=0, log_dir="runs/x", budget={"num_iterations": 2}, seconds=1.0)
        >>> r.to_dict()["lm_calls"]
        {'target': 3, 'reward': 2}
    """

    iterations: tuple[IterationStats, ...]
    best_iteration: int | None
    baseline_score: float | None
    best_score: float | None
    t_star_history: tuple[str, ...]
    lm_calls: dict[str, int]
    lm_tokens: dict[str, dict[str, int]]
    failures: dict[str, int]
    seed: int
    log_dir: str
    budget: dict[str, Any]
    seconds: float
    instructions: dict[str, Any] = field(default_factory=dict)
    prompt_model: dict[str, Any] = field(default_factory=dict)
    selected: int | str = STUDENT
    selected_score: float | None = None
    val_size: int = 0
    selection_p_value: float | None = None
    lm_tokens_by_role: dict[str, dict[str, int]] = field(default_factory=dict)
    errors_by_phase: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["iterations"] = [it.to_dict() for it in self.iterations]
        d["t_star_history"] = list(self.t_star_history)
        return d
