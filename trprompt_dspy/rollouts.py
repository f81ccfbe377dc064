"""Rollouts: run the program with prompt-model instructions, score them, and turn them into SFT data.

One TRPrompt iteration samples training queries and, for each, ``M`` instructions from the prompt model
(conditioned on the current textual reward). Each *rollout* is one program call with those instructions:

* :class:`Rollout` records everything about it (inputs, gold labels, the instructions with their
  requests, outputs, a JSON-safe trace, the metric score and feedback, and later the textual reward). It
  round-trips through JSON, so the optimizer can append it to a JSONL checkpoint as soon as it finishes.
* :func:`run_rollouts` runs ``(example, m)`` pairs in parallel. Each worker enters
  :func:`trprompt_dspy.program.instruction_context` (prompt model, reward, temperature, a seed derived
  from ``(example, m)``, a recorder) and a fresh ``dspy.context(trace=[])``. A program exception becomes a
  rollout with ``error`` set and the failure score; it never aborts the batch.
* :func:`evaluate_program` is the greedy (temperature 0) version used for validation and TextGrad
  minibatches; it returns an :class:`EvalResult`.
* :func:`build_sft_examples` turns rollouts with a textual reward into ``SFTExample`` s: one per recorded
  instruction, with the request's reward replaced by the rollout's textual reward, dropping
  instructions that leak the gold answer.

Example:
    >>> r = Rollout(example_index=3, sample_index=1, inputs={"question": "2+2?"}, gold={"answer": "4"})
    >>> Rollout.from_dict(r.to_dict()) == r
    True
    >>> derive_seed(0, 3, 1) == derive_seed(0, 3, 1) != derive_seed(0, 3, 2)
    True
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dspy

from trprompt_dspy.faults import RetryPolicy, classify_error
from trprompt_dspy.metric_adapter import MetricAdapter, MetricValueError
from trprompt_dspy.parallel import derive_seed, parallel_map
from trprompt_dspy.prompt_model.base import InstructionRequest, SFTExample
from trprompt_dspy.reward import instruction_leaks_answer, redact_answer_leaks

logger = logging.getLogger(__name__)

__all__ = [
    "Rollout",
    "EvalResult",
    "SFTBatch",
    "run_rollouts",
    "evaluate_program",
    "build_sft_examples",
    "json_safe",
]

#: Prediction keys that are bookkeeping, not program output.
_INTERNAL_OUTPUT_KEYS = frozenset({"query_instruction"})


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def json_safe(value: Any) -> Any:
    """Convert ``value`` into plain JSON types (dict/list/str/int/float/bool/None).

    ``dspy.Example``/``Prediction`` become dicts, pydantic models their ``model_dump()``, non-finite
    floats and unknown objects their ``str()``.

    Example:
        >>> json_safe({"a": (1, 2.0), "b": dspy.Prediction(x=1)})
        {'a': [1, 2.0], 'b': {'x': 1}}
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dspy.Example):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v) for v in value]
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        try:
            return json_safe(dump())
        except Exception:  # pragma: no cover - exotic pydantic objects
            pass
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_safe(dataclasses.asdict(value))
    return str(value)


def _to_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    safe = json_safe(value)
    return safe if isinstance(safe, str) else json.dumps(safe, ensure_ascii=False)


# --------------------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One program call with prompt-model instructions, its score and (later) its textual reward.

    Attributes:
        example_index: Index of the example in the dataset it came from.
        sample_index: Which of the ``M`` samples for that example (0-based).
        inputs: The example's input fields (JSON-safe).
        gold: The example's label fields (JSON-safe).
        instructions: One ``{"predictor", "request", "instruction"}`` dict per prompt-model call, in call
            order; ``request`` is :meth:`InstructionRequest.to_dict`.
        outputs: The final prediction's fields as strings (without ``query_instruction``).
        trace: ``{"predictor", "inputs", "outputs"}`` per DSPy trace step (JSON-safe).
        score: The metric score (the failure score on error).
        feedback: The metric's feedback text, if any.
        error: Why the program or the metric failed, else ``None``.
        error_kind: :func:`trprompt_dspy.faults.classify_error` of that failure (``"timeout"``,
            ``"parse_error"``, ``"metric_error"``...), else ``None``.
        reward: The textual reward written by the reward model (filled by ``score_rollouts``).
        reward_redactions: Gold-answer mentions removed from ``reward``.
        reward_error: Why writing the textual reward failed, else ``None``.
        reward_error_kind: The kind of that failure, else ``None``.
        seed: The sampling seed used for this rollout's instructions.
        conditioned_on: The textual reward the prompt model was conditioned on.
        seconds: Wall time of the program call and scoring.
    """

    example_index: int
    sample_index: int
    inputs: dict[str, Any] = field(default_factory=dict)
    gold: dict[str, Any] = field(default_factory=dict)
    instructions: list[dict[str, Any]] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    trace: list[dict[str, Any]] = field(default_factory=list)
    score: float = 0.0
    feedback: str | None = None
    error: str | None = None
    error_kind: str | None = None
    reward: str | None = None
    reward_redactions: int = 0
    reward_error: str | None = None
    reward_error_kind: str | None = None
    seed: int | None = None
    conditioned_on: str | None = None
    seconds: float = 0.0

    @property
    def key(self) -> tuple[int, int]:
        """``(example_index, sample_index)``, the identity used by ``skip`` on resume."""
        return (self.example_index, self.sample_index)

    def to_dict(self) -> dict[str, Any]:
        return json_safe(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rollout:
        """Rebuild a rollout from :meth:`to_dict` output (unknown keys are ignored).

        Raises:
            ValueError: ``example_index`` or ``sample_index`` is missing.
        """
        missing = [k for k in ("example_index", "sample_index") if k not in data]
        if missing:
            raise ValueError(f"Rollout.from_dict: missing required key(s) {missing}; got keys {sorted(data)}.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            logger.debug("Rollout.from_dict ignores unknown keys %s", sorted(unknown))
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class EvalResult:
    """A greedy evaluation of a program on a list of examples.

    Attributes:
        score: Mean score over the examples (failures count with the failure score).
        scores: Per-example scores, in example order.
        rollouts: The rollouts, in example order.
    """

    score: float
    scores: list[float]
    rollouts: list[Rollout]

    @property
    def num_errors(self) -> int:
        return sum(1 for r in self.rollouts if r.error)

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "scores": list(self.scores), "rollouts": [r.to_dict() for r in self.rollouts]}


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

    def stats(self) -> dict[str, int]:
        return {"num_examples": len(self), "num_leaky": self.num_leaky, "num_no_reward": self.num_no_reward,
                "num_low_score": self.num_low_score, "num_empty": self.num_empty,
                "num_duplicates": self.num_duplicates}


# --------------------------------------------------------------------------------------------------
# Running rollouts
# --------------------------------------------------------------------------------------------------


def _predictor_names(program: Any) -> dict[int, str]:
    try:
        return {id(p): name for name, p in program.named_predictors()}
    except Exception:  # not a dspy.Module: names fall back to the class name
        return {}


def _trace_summary(trace: Sequence[Any], names: Mapping[int, str]) -> list[dict[str, Any]]:
    steps = []
    for step in trace:
        try:
            predictor, inputs, outputs = step
        except (TypeError, ValueError):
            steps.append({"predictor": "?", "inputs": {}, "outputs": {"raw": _to_text(step)}})
            continue
        name = names.get(id(predictor), type(predictor).__name__)
        if isinstance(outputs, dspy.Example):
            out = {k: v for k, v in outputs.items() if k not in _INTERNAL_OUTPUT_KEYS}
        elif hasattr(outputs, "completion_text"):  # dspy's FailedPrediction
            out = {"completion_text": outputs.completion_text}
        else:
            out = {"output": outputs}
        steps.append({"predictor": name, "inputs": json_safe(dict(inputs or {})), "outputs": json_safe(out)})
    return steps


def _prediction_outputs(pred: Any) -> dict[str, str]:
    if pred is None:
        return {}
    if isinstance(pred, dspy.Example | Mapping):
        return {str(k): _to_text(v) for k, v in pred.items() if k not in _INTERNAL_OUTPUT_KEYS}
    return {"output": _to_text(pred)}


def _checked_examples(examples: Sequence[Any], indices: Sequence[int] | None) -> list[tuple[int, Any]]:
    examples = list(examples)
    if indices is None:
        indices = list(range(len(examples)))
    elif len(indices) != len(examples):
        raise ValueError(f"indices has {len(indices)} entries but there are {len(examples)} examples.")
    for pos, ex in enumerate(examples):
        if not isinstance(ex, dspy.Example):
            raise TypeError(f"examples[{pos}] must be a dspy.Example; got {type(ex).__name__}: {ex!r}.")
        try:
            ex.inputs()
        except ValueError:
            raise ValueError(
                f"examples[{pos}] has no input fields marked; call .with_inputs(...) on it "
                f"(e.g. dspy.Example(question=..., answer=...).with_inputs('question')). Got {ex!r}."
            ) from None
    return list(zip(indices, examples, strict=True))


def run_rollouts(
    program: dspy.Module,
    examples: Sequence[dspy.Example],
    *,
    prompt_model: Any,
    reward_text: str | None,
    samples_per_query: int = 1,
    temperature: float = 1.0,
    seed: int | None = 0,
    metric: MetricAdapter | Callable[..., Any],
    num_threads: int = 1,
    on_result: Callable[[Rollout], None] | None = None,
    skip: Iterable[tuple[int, int]] = (),
    indices: Sequence[int] | None = None,
    failure_score: float | None = None,
    display_progress: bool = False,
    retry: RetryPolicy | None = None,
) -> list[Rollout]:
    """Run ``samples_per_query`` rollouts per example, in parallel, and score them.

    Args:
        program: The student program (its predictors are ``QueryAwarePredict``).
        examples: The queries (``dspy.Example`` with inputs marked).
        prompt_model: The prompt model that writes the instructions (a ``PromptModel``); ``None`` keeps
            whatever the program's predictors use by default.
        reward_text: The textual reward the prompt model is conditioned on.
        samples_per_query: ``M``, the rollouts per example.
        temperature: Prompt-model sampling temperature.
        seed: Run seed; each rollout gets :func:`derive_seed` ``(seed, example_index, sample_index)``.
        metric: A :class:`MetricAdapter` or a raw metric (wrapped). It is called with ``trace=None``.
        num_threads: Parallel rollouts.
        on_result: Called (in the calling thread) with each rollout as soon as it is scored, e.g. to
            append it to a JSONL checkpoint.
        skip: ``(example_index, sample_index)`` pairs already done (resume); they are neither run nor returned.
        indices: The ``example_index`` of each example (default: its position in ``examples``).
        failure_score: Score of a rollout whose program or metric failed (default: the adapter's, 0.0).
        display_progress: Show a tqdm progress bar.
        retry: Re-run a rollout whose program call failed transiently (timeout, 5xx, dropped
            connection), with this policy's backoff; the rerun uses the same seed. ``None``: no retries.

    Returns:
        The new rollouts, sorted by ``(example_index, sample_index)``.

    Raises:
        ValueError: Bad arguments, or the metric failed on *every* scored rollout (a systematic metric
            bug; the message quotes the first failure).
    """
    from trprompt_dspy.program import instruction_context

    if not isinstance(samples_per_query, int) or isinstance(samples_per_query, bool) or samples_per_query < 1:
        raise ValueError(f"samples_per_query must be a positive integer; got {samples_per_query!r}.")
    if not isinstance(temperature, int | float) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0; got {temperature!r}.")
    if temperature == 0 and samples_per_query > 1:
        logger.warning("temperature=0 with samples_per_query=%d: the samples of a query will be identical.",
                       samples_per_query)
    adapter = metric if isinstance(metric, MetricAdapter) else MetricAdapter(metric)
    if failure_score is not None:
        if not isinstance(failure_score, int | float) or isinstance(failure_score, bool) \
                or not math.isfinite(failure_score):
            raise ValueError(f"failure_score must be a finite number; got {failure_score!r}.")
        adapter = MetricAdapter(adapter.metric, failure_score=failure_score, raise_errors=adapter.raise_errors)
    pairs = _checked_examples(examples, indices)
    skip_set = {(int(a), int(b)) for a, b in skip}
    names = _predictor_names(program)
    tasks = [(ex_idx, m, ex) for ex_idx, ex in pairs for m in range(samples_per_query) if (ex_idx, m) not in skip_set]
    metric_failures: list[str] = []

    def one(task: tuple[int, int, dspy.Example]) -> Rollout:
        ex_idx, m, example = task
        rollout_seed = derive_seed(seed, ex_idx, m)
        start = time.perf_counter()
        attempt = 0
        while True:
            recorder: list[Any] = []
            pred, error, error_kind, trace = None, None, None, []
            with instruction_context(prompt_model=prompt_model, reward=reward_text, temperature=temperature,
                                     seed=rollout_seed, recorder=recorder), dspy.context(trace=[]):
                try:
                    pred = program(**example.inputs())
                except Exception as exc:
                    attempt += 1
                    if retry is not None and retry.should_retry(exc, attempt):
                        continue
                    error = f"program raised {type(exc).__name__}: {exc}"
                    error_kind = classify_error(exc)
                    logger.debug("rollout (%d, %d) failed (%s): %s", ex_idx, m, error_kind, error)
                trace = list(dspy.settings.trace or [])
            break
        score, feedback = adapter.failure_score, None
        if error is None:
            try:
                res = adapter(example, pred)
            except MetricValueError as exc:
                error, error_kind = str(exc), "metric_error"
                metric_failures.append(error)
            else:
                score, feedback = res.score, res.feedback
                if res.error:
                    error, error_kind = res.error, "metric_error"
                    metric_failures.append(res.error)
        return Rollout(
            example_index=ex_idx,
            sample_index=m,
            inputs=json_safe(dict(example.inputs())),
            gold=json_safe(dict(example.labels())),
            instructions=[
                {"predictor": c.predictor_name, "request": c.request.to_dict(), "instruction": c.instruction}
                for c in recorder
            ],
            outputs=_prediction_outputs(pred),
            trace=_trace_summary(trace, names),
            score=score,
            feedback=feedback,
            error=error,
            error_kind=error_kind,
            seed=rollout_seed,
            conditioned_on=reward_text,
            seconds=round(time.perf_counter() - start, 4),
        )

    bar = None
    if display_progress and tasks:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks), desc="rollouts", leave=False)

    def done(_: int, rollout: Rollout) -> None:
        if bar is not None:
            bar.update(1)
        if on_result is not None:
            on_result(rollout)

    try:
        rollouts = parallel_map(one, tasks, num_threads=num_threads, on_done=done)
    finally:
        if bar is not None:
            bar.close()
    n_scored = sum(1 for r in rollouts if not (r.error or "").startswith("program raised"))
    if n_scored and len(metric_failures) == n_scored:
        raise ValueError(
            f"the metric failed on all {n_scored} scored rollouts, which points to a bug in the metric "
            f"(or a field-name mismatch with the program's outputs). First failure: {metric_failures[0]}"
        )
    n_err = sum(1 for r in rollouts if r.error)
    if n_err:
        logger.info("%d of %d rollouts had errors", n_err, len(rollouts))
    return sorted(rollouts, key=lambda r: r.key)


def evaluate_program(
    program: dspy.Module,
    examples: Sequence[dspy.Example],
    *,
    metric: MetricAdapter | Callable[..., Any],
    num_threads: int = 1,
    reward_text: str | None = None,
    prompt_model: Any = None,
    indices: Sequence[int] | None = None,
    failure_score: float | None = None,
    display_progress: bool = False,
    retry: RetryPolicy | None = None,
) -> EvalResult:
    """Greedy evaluation (temperature 0, one rollout per example).

    Used to score validation candidates and, with ``reward_text`` set to a candidate t*, each TextGrad
    minibatch. ``prompt_model=None`` / ``reward_text=None`` keep the program's own defaults.

    Returns:
        An :class:`EvalResult` with the mean score, per-example scores and the rollouts.

    Example:
        ``evaluate_program(prog, valset, metric=my_metric, reward_text=t_star, prompt_model=pm).score``
    """
    if len(examples) == 0:
        raise ValueError("evaluate_program needs at least one example; got an empty list.")
    rollouts = run_rollouts(program, examples, prompt_model=prompt_model, reward_text=reward_text,
                            samples_per_query=1, temperature=0.0, seed=0, metric=metric,
                            num_threads=num_threads, indices=indices, failure_score=failure_score,
                            display_progress=display_progress, retry=retry)
    order = {ex_idx: pos for pos, (ex_idx, _) in enumerate(_checked_examples(examples, indices))}
    rollouts.sort(key=lambda r: order[r.example_index])
    scores = [r.score for r in rollouts]
    return EvalResult(score=sum(scores) / len(scores), scores=scores, rollouts=rollouts)


# --------------------------------------------------------------------------------------------------
# SFT data
# --------------------------------------------------------------------------------------------------


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
    rollouts: Iterable[Rollout], *, leak_filter: bool = True, min_score: float | None = None
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
        for call in r.instructions:
            instruction = complete_sentences(str(call.get("instruction") or "").strip())
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
