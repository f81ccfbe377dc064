"""Rollouts: run the program with prompt-model instructions and score them (step 1 of an iteration).

One TRPrompt iteration samples training queries and, for each, ``M`` instructions from the prompt model
(conditioned on the current textual reward). Each *rollout* is one program call with those instructions:

* :class:`Rollout` records everything about it (inputs, gold labels, the instructions with their
  requests, outputs, a JSON-safe trace, the metric score and feedback, and later the textual reward). It
  round-trips through JSON, so the optimizer can append it to a JSONL checkpoint as soon as it finishes.
* :func:`run_rollouts` runs ``(example, m)`` pairs in parallel. Each worker enters
  :func:`trprompt_dspy.compiled.program.instruction_context` (prompt model, reward, temperature, a seed derived
  from ``(example, m)``, a recorder) and a fresh ``dspy.context(trace=[])``. A program exception becomes a
  rollout with ``error`` set and the failure score; it never aborts the batch.
* :func:`evaluate_program` is the greedy (temperature 0) version used for validation and TextGrad
  minibatches; it returns an :class:`EvalResult`.
* Failed runs are counted by kind (:func:`failure_breakdown`) and logged in plain words, once per batch
  (:func:`describe_failures`): ``"validation: 10 of 50 program runs failed: 7 unparseable answers, 3 answers
  truncated at max_tokens; 6 of the 10 had a prompt-model instruction (40 of the 50 runs had one)."``

Step 2 turns the rollouts into training data: :mod:`trprompt_dspy.loop.sft_data`.

Example:
    >>> r = Rollout(example_index=3, sample_index=1, inputs={"question": "2+2?"}, gold={"answer": "4"})
    >>> Rollout.from_dict(r.to_dict()) == r
    True
    >>> derive_seed(0, 3, 1) == derive_seed(0, 3, 1) != derive_seed(0, 3, 2)
    True
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dspy

from trprompt_dspy.loop.metric_adapter import MetricAdapter, MetricValueError
from trprompt_dspy.runtime.faults import RetryPolicy, classify_error, describe_failure_kinds
from trprompt_dspy.runtime.parallel import derive_seed, parallel_map
from trprompt_dspy.runtime.records import json_safe
from trprompt_dspy.runtime.usage import UNATTRIBUTED, current_role

logger = logging.getLogger(__name__)

__all__ = ["Rollout", "EvalResult", "run_rollouts", "evaluate_program", "failure_breakdown", "describe_failures",
           "BREAKDOWN_TOTALS"]

#: Prediction keys that are bookkeeping, not program output.
_INTERNAL_OUTPUT_KEYS = frozenset({"query_instruction"})


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


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
        error_kind: :func:`trprompt_dspy.runtime.faults.classify_error` of that failure (``"timeout"``,
            ``"parse_error"``, ``"metric_error"``...), or ``"truncated"`` for an unparseable or empty answer
            whose LM reply DSPy reported as cut at ``max_tokens``; else ``None``.
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


# --------------------------------------------------------------------------------------------------
# Failures in plain words
# --------------------------------------------------------------------------------------------------

#: Keys of a :func:`failure_breakdown` that count program runs; every other key is a failure kind.
BREAKDOWN_TOTALS = ("runs", "failed", "instructed", "failed_instructed")


def _instructed(rollout: Rollout) -> bool:
    return any(str(c.get("instruction") or "").strip() for c in rollout.instructions)


def failure_breakdown(rollouts: Iterable[Rollout]) -> dict[str, int]:
    """Count a batch's program runs and its failures by kind (JSON-safe, summable across batches).

    Returns:
        ``runs`` (program runs), ``failed`` (runs with an error), ``instructed`` (runs in which the prompt
        model wrote a non-empty instruction), ``failed_instructed`` (failed runs that had one) and, per
        failure kind (:attr:`Rollout.error_kind`), its count.

    Example:
        >>> ok = Rollout(0, 0, instructions=[{"instruction": "Add."}])
        >>> bad = Rollout(1, 0, instructions=[{"instruction": ""}], error="x", error_kind="parse_error")
        >>> failure_breakdown([ok, bad])
        {'runs': 2, 'failed': 1, 'instructed': 1, 'failed_instructed': 0, 'parse_error': 1}
    """
    counts = dict.fromkeys(BREAKDOWN_TOTALS, 0)
    for r in rollouts:
        instructed = _instructed(r)
        counts["runs"] += 1
        counts["instructed"] += instructed
        if r.error:
            counts["failed"] += 1
            counts["failed_instructed"] += instructed
            kind = r.error_kind or "other"
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def describe_failures(phase: str, breakdown: Mapping[str, int]) -> str | None:
    """One sentence on a :func:`failure_breakdown`: how many runs failed, of which kinds, and with instructions.

    The instruction clause appears only when some runs had a prompt-model instruction; compare its two
    shares to judge whether the instructions cause failures (6 of 10 failures with one, while 40 of 50 runs
    had one, says they do not).

    Returns:
        The sentence, or ``None`` when no run failed.

    Example:
        >>> describe_failures("validation", {"runs": 50, "failed": 10, "instructed": 40, "failed_instructed": 6,
        ...                                  "parse_error": 7, "truncated": 3})
        'validation: 10 of 50 program runs failed: 7 unparseable answers, 3 answers truncated at max_tokens; 6 of the 10 had a prompt-model instruction (40 of the 50 runs had one).'
        >>> describe_failures("baseline evaluation", {"runs": 40, "failed": 1, "timeout": 1})
        'baseline evaluation: 1 of 40 program runs failed: 1 timed-out call.'
        >>> describe_failures("validation", {"runs": 50, "failed": 0}) is None
        True
    """
    failed, runs = int(breakdown.get("failed", 0)), int(breakdown.get("runs", 0))
    if failed <= 0:
        return None
    kinds = describe_failure_kinds({k: int(v) for k, v in breakdown.items() if k not in BREAKDOWN_TOTALS})
    text = f"{phase}: {failed} of {runs} program run{'' if runs == 1 else 's'} failed" + (f": {kinds}" if kinds else "")
    instructed = int(breakdown.get("instructed", 0))
    if instructed:
        text += (f"; {int(breakdown.get('failed_instructed', 0))} of the {failed} had a prompt-model instruction "
                 f"({instructed} of the {runs} runs had one)")
    return text + "."


# DSPy does not raise on a reply cut at max_tokens: it logs "LM response was truncated ..." on the
# "dspy.clients.lm" logger (dspy/clients/lm.py, dspy/clients/execution.py) and the cut reply then usually
# fails to parse. A filter on that logger counts those records per program call (through a context
# variable set around the call), so such a failure can be reported as truncated rather than unparseable.
# It is put first among the logger's filters because runtime/log_noise.py drops these records, and it
# lets every record through. It sees nothing when DSPy's logger is disabled or set above WARNING.
_CUT_REPLY_LOGGER = "dspy.clients.lm"
_CUT_REPLY_PREFIX = "LM response was truncated"
#: Roles whose cut replies are the program's own (not the reward model's or a seed writer's).
_PROGRAM_ROLES = frozenset({None, "target", UNATTRIBUTED})
_cut_replies: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("trprompt_cut_replies",
                                                                                default=None)
_spy_lock = threading.Lock()


class _CutReplyCounter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        box = _cut_replies.get()
        if box is not None and str(record.msg).startswith(_CUT_REPLY_PREFIX) and current_role() in _PROGRAM_ROLES:
            box[0] += 1
        return True


_CUT_REPLY_COUNTER = _CutReplyCounter()


def _watch_cut_replies() -> None:
    """Install :class:`_CutReplyCounter` as the first filter of DSPy's LM logger (once per process)."""
    dspy_logger = logging.getLogger(_CUT_REPLY_LOGGER)
    with _spy_lock:
        if _CUT_REPLY_COUNTER not in dspy_logger.filters:
            dspy_logger.filters.insert(0, _CUT_REPLY_COUNTER)


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
    desc: str = "rollouts",
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
        desc: What this batch is (``"rollouts"``, ``"validation"``, ``"baseline evaluation"``...): the
            progress bar's label and the start of the log line that breaks the failures down by kind
            (:func:`describe_failures`).

    Returns:
        The new rollouts, sorted by ``(example_index, sample_index)``.

    Raises:
        ValueError: Bad arguments, or the metric failed on *every* scored rollout (a systematic metric
            bug; the message quotes the first failure).
    """
    from trprompt_dspy.compiled.program import instruction_context

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
    _watch_cut_replies()

    def one(task: tuple[int, int, dspy.Example]) -> Rollout:
        ex_idx, m, example = task
        rollout_seed = derive_seed(seed, ex_idx, m)
        start = time.perf_counter()
        attempt = 0
        while True:
            recorder: list[Any] = []
            pred, error, error_kind, trace = None, None, None, []
            cut = [0]  # replies of this program call that DSPy reported as cut at max_tokens
            with instruction_context(prompt_model=prompt_model, reward=reward_text, temperature=temperature,
                                     seed=rollout_seed, recorder=recorder), dspy.context(trace=[]):
                token = _cut_replies.set(cut)
                try:
                    pred = program(**example.inputs())
                except Exception as exc:
                    attempt += 1
                    if retry is not None and retry.should_retry(exc, attempt):
                        continue
                    error = f"program raised {type(exc).__name__}: {exc}"
                    error_kind = classify_error(exc)
                    if cut[0] and error_kind in ("parse_error", "empty_completion"):
                        error_kind = "truncated"
                        error = f"{error} (DSPy reported the LM reply as cut at max_tokens)"
                    logger.debug("rollout (%d, %d) failed (%s): %s", ex_idx, m, error_kind, error)
                finally:
                    _cut_replies.reset(token)
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

        bar = tqdm(total=len(tasks), desc=desc, leave=False)

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
    line = describe_failures(desc, failure_breakdown(rollouts))
    if line:
        logger.info("%s", line)
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
    desc: str = "evaluation",
) -> EvalResult:
    """Greedy evaluation (temperature 0, one rollout per example).

    Used to score validation candidates and, with ``reward_text`` set to a candidate t*, each TextGrad
    minibatch. ``prompt_model=None`` / ``reward_text=None`` keep the program's own defaults. ``desc`` labels
    the progress bar and the failure line (``"validation"``, ``"baseline evaluation"``...; see :func:`run_rollouts`).

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
                            display_progress=display_progress, retry=retry, desc=desc)
    order = {ex_idx: pos for pos, (ex_idx, _) in enumerate(_checked_examples(examples, indices))}
    rollouts.sort(key=lambda r: order[r.example_index])
    scores = [r.score for r in rollouts]
    return EvalResult(score=sum(scores) / len(scores), scores=scores, rollouts=rollouts)
