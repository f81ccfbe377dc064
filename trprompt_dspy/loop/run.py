"""One TRPrompt compile, step by step, with a checkpoint after every step (see ``runtime/checkpoint.py``).

:class:`TRPromptRun` is created by :meth:`TRPromptOptimizer.compile` after all input checks; it owns the
run's state (t*, the best iteration, counters) and calls the step functions in ``rollouts.py``,
``textual_reward.py``, ``sft_data.py``, the prompt model's ``train`` and ``refine_reward.py``, then selects
what to return (the student is candidate 0). Each step first looks for its finished
output in ``log_dir`` and reuses it, so a killed compile resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dspy

from trprompt_dspy.backends.prompt_model.base import PromptModel, SFTExample
from trprompt_dspy.config import TEXTGRAD_ACCEPTANCE, TEXTUAL_REWARDS, Budget, LoraSettings, SFTSettings
from trprompt_dspy.results import STUDENT, IterationStats, TRPromptResult
from trprompt_dspy.runtime.checkpoint import RunDirectory
from trprompt_dspy.runtime.faults import CompileError, ErrorBudget, GuardedPromptModel, RetryPolicy
from trprompt_dspy.runtime.tracking import CompileTracker
from trprompt_dspy.runtime.usage import UsageMeter

logger = logging.getLogger(__name__)

__all__ = ["RunSettings", "TRPromptRun"]

#: Output cap of each TextGrad call (gradient, update) when ``textgrad_lm`` sets no ``max_tokens`` of its own;
#: t* itself is asked to stay under 120 words.
TEXTGRAD_MAX_TOKENS = 384


def textgrad_max_tokens(textgrad_lm: Any) -> int:
    """The output cap of TextGrad's calls: ``textgrad_lm``'s own ``max_tokens``, else :data:`TEXTGRAD_MAX_TOKENS`.

    A small model's TextGrad replies (feedback, then the update inside ``<IMPROVED_VARIABLE>`` tags) often run
    past 384 tokens; a cut update loses its closing tag and the step is abandoned. So the ``max_tokens`` you
    gave the LM wins, as for every other role.

    Example:
        >>> import dspy
        >>> textgrad_max_tokens(dspy.LM("openai/x", max_tokens=768)), textgrad_max_tokens(dspy.LM("openai/x"))
        (768, 384)
    """
    from trprompt_dspy.runtime.log_noise import lm_max_tokens

    return lm_max_tokens(textgrad_lm) or TEXTGRAD_MAX_TOKENS


#: TextGrad step failures that count against the error budget (rejections such as "leak" do not).
_TEXTGRAD_FAILURES = frozenset({"missing_tags", "engine", "empty_gradient", "evaluation"})
#: Failure kinds of a cached student rollout that are worth another try (a later iteration re-runs it).
_TRANSIENT = frozenset({"timeout", "server_error", "connection", "rate_limit"})


@dataclass(frozen=True)
class RunSettings:
    """Everything one compile's loop reads, frozen (``TRPromptOptimizer.compile`` builds it from its arguments).

    The fields mean what the :class:`~trprompt_dspy.optimizer.TRPromptOptimizer` arguments of the same name mean;
    the loop never sees the optimizer object itself.
    """

    metric: Callable[..., Any]
    budget: Budget
    lora: LoraSettings
    sft: SFTSettings
    initial_reward: str
    predictors: tuple[str, ...] | None
    sampling_temperature: float
    max_instruction_tokens: int
    num_threads: int
    failure_score: float
    max_retries: int
    retry_backoff: float
    max_error_rate: float
    max_errors: int | None
    seed: int
    seed_lm: dspy.BaseLM | None
    min_improvement: float | None
    reward_verdict: bool
    track_stats: bool
    display_progress: bool
    textgrad_acceptance: str = TEXTGRAD_ACCEPTANCE[0]
    significance_level: float | None = None
    rewards: str = TEXTUAL_REWARDS[0]
    abstain: bool = True


class TRPromptRun:
    """State and steps of one compile. Not part of the public API: use ``TRPromptOptimizer.compile``."""

    def __init__(self, *, settings: RunSettings, student: dspy.Module, trainset: list[dspy.Example],
                 valset: list[dspy.Example], prompt_model: PromptModel, reward_lm: dspy.BaseLM,
                 textgrad_lm: dspy.BaseLM, run_dir: RunDirectory, meter: UsageMeter,
                 tracker: CompileTracker | None = None) -> None:
        from trprompt_dspy.loop.metric_adapter import MetricAdapter

        self.settings, self.student, self.trainset, self.valset = settings, student, trainset, valset
        self.pm, self.reward_lm, self.textgrad_lm = prompt_model, reward_lm, textgrad_lm
        self.run_dir, self.meter = run_dir, meter
        self.compile_tracker = tracker or CompileTracker(None)  # MLflow autologging (runtime/tracking.py)
        self.budget = settings.budget
        self.metric = MetricAdapter(settings.metric, failure_score=settings.failure_score)
        self.metric_calls = 0
        self.t_star = settings.initial_reward
        self._val_abstention: float | None = None
        self._against_student: dict[str, int] = {}  # what this iteration's instructions did vs the student
        self._critiques: dict[str, int] = {}  # what happened to this iteration's reward-LM critiques
        self._resumed_rollouts = False  # this iteration's rollouts / adapter came from an earlier, killed run
        self._resumed_sft = False
        self._trained = False  # has the prompt model been fine-tuned in this run (see _conditioning)?
        self.t_history: list[str] = [self.t_star]
        self.stats: list[IterationStats] = []
        self.best: dict[str, Any] = {"iteration": None, "score": None, "adapter": None, "t_star": self.t_star}
        self.baseline_score: float | None = None
        self.selected: int | str = STUDENT
        self.selection_p: float | None = None  # sign-test p of the best iteration vs the student (loop/selection.py)
        self.started = time.perf_counter()
        self.retry = RetryPolicy(max_retries=settings.max_retries, base_delay=settings.retry_backoff,
                                 seed=settings.seed, on_retry=lambda kind, _a, _e: meter.fail(f"retried_{kind}"))
        self.errors = ErrorBudget(settings.max_error_rate, max_errors=settings.max_errors)
        from trprompt_dspy.compiled.program import MAX_INSTRUCTION_CHARS

        self.gpm = GuardedPromptModel(prompt_model, retry=self.retry, max_chars=MAX_INSTRUCTION_CHARS,
                                      count=meter.fail)
        from trprompt_dspy.backends.prompt_model.base import instruction_stats

        self._instructions_at_start = instruction_stats(prompt_model)

    # -- orchestration ---------------------------------------------------------------------------
    def execute(self) -> dspy.Module:
        from trprompt_dspy.compiled.program import install_query_aware

        resumed = self.run_dir.prepare()
        if resumed:
            self._restore_state()
        if not self.stats:  # a fresh run (or one killed in iteration 0) starts from the bare base model
            self.pm.load_adapter(None)
        self._log_projection()
        program = install_query_aware(
            self.student.deepcopy(), prompt_model=self.pm, optimal_reward=self.t_star,
            predictors=None if self.settings.predictors is None else list(self.settings.predictors),
            generation={"temperature": 0.0, "max_new_tokens": self.settings.max_instruction_tokens})
        # tokens per model name and per role (the meter); DSPy's truncation warnings: one line per role and phase
        with self.meter.tracking() as tracker, self._summarize_truncations() as truncations:
            try:
                self._smoke_test()
                if self.baseline_score is None:
                    self.baseline_score = self._baseline()
                truncations.flush("the smoke test and baseline")
                self.compile_tracker.progress(self.baseline_score, self.stats)
                for k in range(len(self.stats), self.budget.num_iterations):
                    if self._budget_exhausted():
                        logger.warning("max_metric_calls=%s reached after %d iteration(s); stopping early.",
                                       self.budget.max_metric_calls, k)
                        break
                    self._iteration(k, program)
                    truncations.flush(f"iteration {k}")
                    self._save_state()
                    self.compile_tracker.progress(self.baseline_score, self.stats)
            except CompileError as exc:
                self.run_dir.write_json(self.run_dir.root / "last_error.json", {
                    "error": f"{type(exc).__name__}: {exc}", "completed_iterations": len(self.stats),
                    "failures": self.meter.snapshot()["failures"]})
                raise
            (self.run_dir.root / "last_error.json").unlink(missing_ok=True)
            tokens = {m: {k: int(v) for k, v in u.items() if isinstance(v, (int, float))}
                      for m, u in tracker.get_total_tokens().items()}
        self.selected = self._select()
        if self.selected == STUDENT:
            program = self.student.deepcopy()
            program._compiled = True
            program.trprompt_selected = STUDENT  # save_compiled saves it as the student
        else:
            self._finalize(program)
        result = self._result(tokens)
        if self.settings.track_stats:
            program.detailed_results = result
        self.compile_tracker.finish(program, result)
        return program

    # -- selection: the student is candidate 0 (loop/selection.py) ------------------------------
    def _select(self) -> int | str:
        from trprompt_dspy.loop.selection import select_candidate, selection_p_value

        k = self.best["iteration"]
        base = self.run_dir.read_json(self.run_dir.root / "baseline.json") or {}
        val = (self.run_dir.read_json(self.run_dir.iter_dir(k) / "val.json") or {}) if k is not None else {}
        student_scores, iteration_scores = base.get("scores") or (), val.get("scores") or ()
        self.selection_p = selection_p_value(student_scores, iteration_scores)
        return select_candidate(best_iteration=k, best_score=self.best["score"], student_score=self.baseline_score,
                                min_improvement=self.settings.min_improvement, val_size=len(self.valset),
                                log_dir=self.run_dir.root, student_scores=student_scores,
                                iteration_scores=iteration_scores, significance_level=self.settings.significance_level)

    def _iteration(self, k: int, program: dspy.Module) -> None:
        from trprompt_dspy.compiled.program import query_aware_predictors

        d = self.run_dir.iter_dir(k)
        seconds: dict[str, float] = {}
        logger.info("==> TRPrompt iteration %d/%d", k + 1, self.budget.num_iterations)
        with _timed(seconds, "rollouts"):
            rollouts = self._rollouts(k, program, d)
        self._keep_rollout_stats(d, seconds)
        with _timed(seconds, "sft"):
            sft_examples, n_filtered = self._sft_data(k, rollouts, d)
            train = self._train(k, sft_examples, d)
        if self._resumed_sft:  # trained by an earlier, killed run: count its training time, not the reload
            seconds["sft"] = float(train.get("seconds") or 0.0) + seconds["sft"]
        previous = self.t_star
        with _timed(seconds, "textgrad"):
            accepted = self._refine(k, program, d)
        for _, p in query_aware_predictors(program):
            p.optimal_reward = self._conditioning(self.t_star)
        with _timed(seconds, "validation"):
            val_score = self._validate(k, program, d, previous=previous)
        if self.t_star != previous or accepted:
            accepted = self.t_star != previous  # False when validation took the candidate back
            for _, p in query_aware_predictors(program):
                p.optimal_reward = self._conditioning(self.t_star)
        # The "no instruction" candidates (sample_index == prompts_per_query) are the student's own runs.
        sampled = [r for r in rollouts if r.sample_index < self.budget.prompts_per_query]
        if self.best["score"] is None or val_score > self.best["score"]:
            self.best = {"iteration": k, "score": val_score, "adapter": train.get("adapter_path"),
                         "t_star": self.t_star}
        self.stats.append(IterationStats(
            iteration=k,
            rollout_score=sum(r.score for r in sampled) / max(1, len(sampled)),
            val_score=val_score,
            t_star=self.t_star,
            t_star_accepted=accepted,
            num_rollouts=len(sampled),
            num_sft_examples=len(sft_examples),
            sft_steps=int(train.get("steps", 0)),
            sft_loss=tuple(train.get("losses", ())),
            redacted_rewards=sum(1 for r in rollouts if r.reward_redactions),
            filtered_instructions=n_filtered,
            seconds=seconds,
            against_student=dict(self._against_student),
            abstention_rate=self._val_abstention,
            critiques=dict(self._critiques),
        ))
        logger.info("Iteration %d: rollout score %.3f, validation score %.3f (baseline %.3f), %s",
                    k, self.stats[-1].rollout_score, val_score, self.baseline_score or 0.0,
                    ", ".join(f"{p} {s:.0f}s" for p, s in seconds.items()))

    # -- step 1: rollouts + textual rewards ------------------------------------------------------
    def _rollouts(self, k: int, program: dspy.Module, d: Path) -> list[Any]:
        from trprompt_dspy.loop.rollouts import Rollout, run_rollouts
        from trprompt_dspy.loop.student_reference import OUTCOME_ERRORS, no_instruction_candidates
        from trprompt_dspy.loop.textual_reward import TextualRewardModel

        final = d / "rollouts.json"
        saved = self.run_dir.read_json(final)
        self._against_student, self._critiques = {}, {}  # this iteration's, never a previous one's
        self._resumed_rollouts = saved is not None
        if saved is not None:
            self.metric_calls += len(saved)
            return [Rollout.from_dict(r) for r in saved]
        rng = random.Random(self.settings.seed * 1000 + k)
        n_q = min(self.budget.queries_per_iteration, len(self.trainset))
        n_q = self._cap_by_budget(n_q, per_item=self.budget.prompts_per_query)
        picked = rng.sample(range(len(self.trainset)), n_q)  # the same queries as sampling the list itself
        queries = [self.trainset[i] for i in picked]
        partial = d / "rollouts.partial.jsonl"
        done = {(r["example_index"], r["sample_index"]): Rollout.from_dict(r)
                for r in self.run_dir.read_jsonl(partial) if not r.get("error")}  # failed ones are retried
        reward_text = self._conditioning(self.t_star)
        writer: Any = self.gpm
        if k == 0 and self.settings.seed_lm is not None:
            from trprompt_dspy.backends.prompt_model.lm_writer import LMInstructionWriter

            writer = GuardedPromptModel(LMInstructionWriter(self.settings.seed_lm), retry=self.retry,
                                        max_chars=self.gpm.max_chars, count=self.meter.fail)
        with self._role("target"):
            fresh = run_rollouts(
                program, queries, prompt_model=writer, reward_text=reward_text,
                samples_per_query=self.budget.prompts_per_query, temperature=self.settings.sampling_temperature,
                seed=self.settings.seed * 1000 + k, metric=self.metric, num_threads=self.settings.num_threads,
                failure_score=self.settings.failure_score, display_progress=self.settings.display_progress,
                on_result=lambda r: self.run_dir.append_jsonl(partial, r.to_dict()), skip=set(done),
                retry=self.retry, indices=picked,
            )
        self.metric_calls += len(fresh)
        if writer is self.gpm:  # a seed LM's calls are counted by the LM callback (role "seed_writer")
            self.meter.count("prompt_model", sum(len(r.instructions) for r in fresh))
        rollouts = sorted([*done.values(), *fresh], key=lambda r: (r.example_index, r.sample_index))
        self._record_failures("rollouts", fresh)
        live = [r for r in rollouts if not r.error]
        if not live:
            first = next((r.error for r in rollouts if r.error), "unknown error")
            raise CompileError(
                f"Every rollout of iteration {k} failed, e.g.: {first}. Check the target LM, the prompt model and "
                f"the metric; re-running compile with log_dir={str(self.run_dir.root)!r} retries the failed ones."
            )
        students = self._student_rollouts(picked)
        if self.settings.rewards != "critique":
            # An unparseable or truncated reply is the target's answer to that prompt, an outcome the trace-built
            # reward describes ("cut at its max_tokens"); only failures of the infrastructure stay out.
            live = [r for r in rollouts if not r.error or r.error_kind in OUTCOME_ERRORS]
        if self.settings.abstain:
            extra = no_instruction_candidates(live, students, slot=self.budget.prompts_per_query)
            live += extra
            rollouts = sorted([*rollouts, *extra], key=lambda r: r.key)
        self._log_against_student(k, live, students)
        if self.settings.rewards != "critique":
            self._trace_rewards(live, students)
            self.run_dir.write_json(final, [r.to_dict() for r in rollouts])
            return rollouts
        with self._role("reward"):
            TextualRewardModel(self.reward_lm).score_rollouts(live, num_threads=self.settings.num_threads,
                                                              retry=self.retry)
        failed_rewards = [r for r in live if not r.reward]
        kinds = [r.reward_error_kind or "other" for r in failed_rewards]
        for kind in kinds:
            self.meter.fail("reward_error")
            self.meter.fail(f"reward_{kind}")
        self.errors.record("textual rewards", total=len(live), failures=kinds, log_dir=self.run_dir.root)
        if len(failed_rewards) == len(live):
            raise CompileError(
                f"The reward LM failed on every rollout of iteration {k}, e.g.: {failed_rewards[0].reward_error}. "
                f"Check reward_lm; re-running compile with log_dir={str(self.run_dir.root)!r} resumes here."
            )
        self.run_dir.write_json(final, [r.to_dict() for r in rollouts])
        return rollouts

    def _student_rollouts(self, indices: list[int]) -> dict[int, Any]:
        """The uncompiled student's own answer on each training query, computed once per compile and kept.

        Greedy, like the compiled program at inference; cached in ``student_rollouts.jsonl`` (one line per
        trainset index, appended as each finishes), so later iterations, resumed runs and cells that share this
        ``log_dir`` never pay for a query twice. They are the "no instruction" candidates and the reference
        that a trace-built reward compares each instruction with.
        """
        from trprompt_dspy.loop.rollouts import Rollout, run_rollouts

        path = self.run_dir.root / "student_rollouts.jsonl"
        cache = {r["example_index"]: Rollout.from_dict(r) for r in self.run_dir.read_jsonl(path)
                 if not r.get("error") or r.get("error_kind") not in _TRANSIENT}
        todo = sorted(set(indices) - set(cache))
        if todo:
            with self._role("target"):
                fresh = run_rollouts(
                    self.student.deepcopy(), [self.trainset[i] for i in todo], indices=todo, prompt_model=None,
                    reward_text=None, temperature=0.0, seed=self.settings.seed, metric=self.metric,
                    num_threads=self.settings.num_threads, failure_score=self.settings.failure_score,
                    display_progress=self.settings.display_progress, retry=self.retry, desc="student rollouts",
                    on_result=lambda r: self.run_dir.append_jsonl(path, r.to_dict()))
            self.metric_calls += len(fresh)
            self._record_failures("student rollouts", fresh)
            cache.update({r.example_index: r for r in fresh})
        return {i: cache[i] for i in indices if i in cache}

    def _keep_rollout_stats(self, d: Path, seconds: dict[str, float]) -> None:
        """Keep this iteration's rollout counts and time across a kill (``rollout_stats.json``).

        Written once, right after ``rollouts.json``; a resumed run that reloads the rollouts reads the counts
        against the student, the critique tally and the rollouts' wall time back instead of reporting an
        iteration with empty counts and a rollout phase of 0 s. A run killed before the file was written
        (a few milliseconds after ``rollouts.json``) reports the counts as unknown (empty), as before.
        """
        path = d / "rollout_stats.json"
        if not self._resumed_rollouts:
            self.run_dir.write_json(path, {"against_student": self._against_student, "critiques": self._critiques,
                                           "seconds": seconds.get("rollouts", 0.0)})
            return
        saved = self.run_dir.read_json(path)
        if saved is not None:
            self._against_student = dict(saved.get("against_student") or {})
            self._critiques = dict(saved.get("critiques") or {})
            seconds["rollouts"] = float(saved.get("seconds") or 0.0) + seconds.get("rollouts", 0.0)

    def _log_against_student(self, k: int, live: list[Any], students: dict[int, Any]) -> dict[str, int]:
        """Count and log what this iteration's instructions did against the student's own answers."""
        from trprompt_dspy.loop.student_reference import count_against_student

        counts = count_against_student(live, students, prompts_per_query=self.budget.prompts_per_query)
        logger.info("Iteration %d, %d instructed rollouts against the student's own answers: %d fixed, %d broke, "
                    "%d kept correct, %d left wrong, %d abstained (no instruction).", k, sum(counts.values()),
                    counts["fixed"], counts["broke"], counts["kept"], counts["left_wrong"], counts["abstained"])
        self._against_student = counts
        return counts

    def _trace_rewards(self, live: list[Any], students: dict[int, Any]) -> None:
        """Trace-built rewards (the floor, no LM); with ``"trace+critique"`` the reward LM's critique is added
        where it agrees with the verdict and says something new (:mod:`trprompt_dspy.loop.trace_reward`)."""
        from trprompt_dspy.loop.student_reference import apply_trace_rewards, merge_critiques
        from trprompt_dspy.loop.textual_reward import TextualRewardModel

        apply_trace_rewards(live, students)
        if self.settings.rewards != "trace+critique":
            return
        asked = [dataclasses.replace(r) for r in live if r.sample_index < self.budget.prompts_per_query]
        with self._role("reward"):
            TextualRewardModel(self.reward_lm).score_rollouts(asked, num_threads=self.settings.num_threads,
                                                              retry=self.retry)
        why, failed = merge_critiques(live, asked)
        for kind in failed:
            self.meter.fail("reward_error")
            self.meter.fail(f"reward_{kind}")
        logger.info("Reward LM critiques: %s (a critique is added to the trace-built reward only when it agrees "
                    "with the metric's verdict and does not just restate the query, answer or gold solution).",
                    ", ".join(f"{n} {w}" for w, n in sorted(why.items())) or "none")
        self._critiques = why

    # -- step 2: fine-tune the prompt model ------------------------------------------------------
    def _sft_data(self, k: int, rollouts: list[Any], d: Path) -> tuple[list[SFTExample], int]:
        from trprompt_dspy.loop.rollouts import Rollout
        from trprompt_dspy.loop.sft_data import build_sft_examples

        pool = list(rollouts)
        if self.settings.sft.accumulate:
            for j in range(k):
                saved = self.run_dir.read_json(self.run_dir.iter_dir(j) / "rollouts.json") or []
                pool += [Rollout.from_dict(r) for r in saved]
        examples, n_filtered = build_sft_examples(pool, leak_filter=True, min_score=self.settings.sft.min_score,
                                                  verdict=self.settings.reward_verdict and self.settings.rewards == "critique",
                                                  abstain=self.settings.abstain)
        if self.settings.sft.balance:
            from trprompt_dspy.loop.sft_data import balance_outcomes

            examples = balance_outcomes(examples, random.Random(self.settings.seed * 1000 + 700 + k))
        self.run_dir.write_jsonl(d / "sft.jsonl", [e.to_dict() for e in examples])
        return examples, n_filtered

    def _train(self, k: int, examples: list[SFTExample], d: Path) -> dict[str, Any]:
        from trprompt_dspy.runtime.checkpoint import atomic_replace_dir

        saved = self.run_dir.read_json(d / "train.json")
        adapter = d / "adapter"
        self._resumed_sft = saved is not None and adapter.is_dir()
        if saved is not None and adapter.is_dir():
            self.pm.load_adapter(adapter)
            self._trained = True
            return saved
        if not examples:
            raise CompileError(
                f"Iteration {k} produced no usable SFT examples (every instruction was empty or stated the "
                "answer). Try seed_lm=<a stronger dspy.LM> for iteration 0, or more prompts_per_query."
            )
        for stale in d.glob(".adapter.*"):  # staging folders of a killed run
            shutil.rmtree(stale, ignore_errors=True)
        staging = self.run_dir.staging_dir(adapter)
        result = self.pm.train(examples, output_dir=staging, lora=self.settings.lora, sft=self.settings.sft,
                               seed=self.settings.seed + k)
        atomic_replace_dir(staging, adapter)
        self.pm.load_adapter(adapter)
        self._trained = True
        info = {**result.to_dict(), "adapter_path": str(adapter)}
        self.run_dir.write_json(d / "train.json", info)
        return info

    # -- step 3: refine the optimal textual reward ----------------------------------------------
    def _refine(self, k: int, program: dspy.Module, d: Path) -> bool:
        saved = self.run_dir.read_json(d / "refine.json")
        if saved is not None:
            if saved["value"] != self.t_star:
                self.t_history.append(saved["value"])
            self.t_star = saved["value"]
            return bool(saved["accepted"])
        if self.budget.textgrad_steps == 0:
            return False
        from trprompt_dspy.backends.textgrad_engine import DSPyTextGradEngine
        from trprompt_dspy.loop.refine_reward import refine_optimal_reward
        from trprompt_dspy.loop.rollouts import evaluate_program

        rng = random.Random(self.settings.seed * 1000 + 500 + k)
        batch = rng.sample(self.trainset, min(self.budget.textgrad_batch_size, len(self.trainset)))
        engine = DSPyTextGradEngine(self.textgrad_lm, max_tokens=textgrad_max_tokens(self.textgrad_lm),
                                    retry=self.retry)

        def evaluate(t: str) -> Any:
            self.metric_calls += len(batch)
            with self._role("target"):
                res = evaluate_program(program, batch, metric=self.metric, num_threads=self.settings.num_threads,
                                       reward_text=self._conditioning(t), prompt_model=self.gpm, retry=self.retry,
                                       desc="TextGrad minibatch")
            self.meter.count("prompt_model", sum(len(r.instructions) for r in res.rollouts))
            self._record_failures("TextGrad minibatch", res.rollouts)
            return res

        with self.meter.attribute("textgrad"):  # the engine's own calls; its minibatch runs are "target"
            result = refine_optimal_reward(self.t_star, evaluate=evaluate, engine=engine,
                                           steps=self.budget.textgrad_steps)
        self.meter.count("textgrad", getattr(engine, "calls", 0))
        step_failures = []
        for h in result.history:
            if h.get("error"):
                kind = str(h.get("cause") or h.get("error_kind") or "error")
                self.meter.fail("textgrad_" + kind)
                if h.get("error_kind") in _TEXTGRAD_FAILURES:
                    step_failures.append(kind)
        self.errors.record("TextGrad", total=len(result.history), failures=step_failures,
                           log_dir=self.run_dir.root, systemic=False)
        if result.value != self.t_star:
            self.t_history.append(result.value)
        self.t_star = result.value
        self.run_dir.write_json(d / "refine.json", {"value": result.value, "accepted": result.accepted,
                                                    "history": result.history})
        return bool(result.accepted)

    # -- step 4: validation and selection -------------------------------------------------------
    def _validate(self, k: int, program: dspy.Module, d: Path, *, previous: str | None = None) -> float:
        """Score iteration ``k`` on the valset; with ``textgrad_acceptance="validation"`` also decide t*.

        When this iteration's TextGrad step replaced ``previous`` (the t* the iteration started with), the
        valset is scored with both and the candidate is kept only if it scores strictly higher; otherwise t*
        goes back to ``previous`` (``val.json`` records both scores under ``"t_star_candidates"``).
        """
        saved = self.run_dir.read_json(d / "val.json")
        self._val_abstention = None
        if saved is not None:
            if saved.get("abstained") is not None and saved.get("scores"):
                self._val_abstention = round(saved["abstained"] / len(saved["scores"]), 4)
            self.metric_calls += sum(len(c.get("scores", [])) for c in saved.get("t_star_candidates", [saved]))
            if saved.get("t_star") and saved["t_star"] != self.t_star:
                self._take_back(saved["t_star"])
            return float(saved["score"])
        res = self._score_valset(program, self.t_star, "validation")
        record: dict[str, Any] = {"score": res.score, "scores": res.scores, "t_star": self.t_star,
                                  "abstained": _abstained(res.rollouts), "instructions": _instructions(res.rollouts)}
        if self.settings.textgrad_acceptance == "validation" and previous is not None and previous != self.t_star:
            old = self._score_valset(program, previous, "validation (t* before TextGrad)")
            keep = res.score > old.score
            logger.info("TextGrad acceptance on validation: the refined t* scores %.3f, the previous one %.3f; "
                        "keeping the %s.", res.score, old.score, "refined t*" if keep else "previous t*")
            candidates = [{"t_star": self.t_star, "score": res.score, "scores": res.scores},
                          {"t_star": previous, "score": old.score, "scores": old.scores}]
            if not keep:
                self._take_back(previous)
                res = old
            record = {"score": res.score, "scores": res.scores, "t_star": self.t_star,
                      "t_star_candidates": candidates, "abstained": _abstained(res.rollouts),
                      "instructions": _instructions(res.rollouts)}
        self.run_dir.write_json(d / "val.json", record)
        self._val_abstention = round(record["abstained"] / max(1, len(res.rollouts)), 4)
        if record["abstained"]:
            logger.info("Iteration %d wrote no instruction for %d of %d validation questions (abstention rate %.2f).",
                        k, record["abstained"], len(res.rollouts), self._val_abstention)
        return float(res.score)

    def _score_valset(self, program: dspy.Module, t_star: str, phase: str) -> Any:
        from trprompt_dspy.loop.rollouts import evaluate_program

        self.metric_calls += len(self.valset)
        with self._role("target"):
            res = evaluate_program(program, self.valset, metric=self.metric, num_threads=self.settings.num_threads,
                                   reward_text=self._conditioning(t_star), prompt_model=self.gpm, retry=self.retry,
                                   desc=phase, display_progress=self.settings.display_progress)
        self.meter.count("prompt_model", sum(len(r.instructions) for r in res.rollouts))
        self._record_failures(phase, res.rollouts)
        return res

    def _take_back(self, t_star: str) -> None:
        """Return t* to an earlier value (validation preferred it to the TextGrad candidate)."""
        if len(self.t_history) > 1 and self.t_history[-1] == self.t_star:
            self.t_history.pop()
        self.t_star = t_star

    def _baseline(self) -> float:
        saved = self.run_dir.read_json(self.run_dir.root / "baseline.json")
        if saved is not None:
            return float(saved["score"])
        from trprompt_dspy.loop.rollouts import evaluate_program

        self.metric_calls += len(self.valset)
        with self._role("target"):
            res = evaluate_program(self.student.deepcopy(), self.valset, metric=self.metric,
                                   num_threads=self.settings.num_threads, retry=self.retry,
                                   desc="baseline evaluation", display_progress=self.settings.display_progress)
        self._record_failures("baseline evaluation", res.rollouts)
        # "inputs": the valset's questions in order, so a report can show what each candidate did on them
        self.run_dir.write_json(self.run_dir.root / "baseline.json", {
            "score": res.score, "scores": res.scores, "inputs": [r.inputs for r in res.rollouts]})
        logger.info("Baseline (uncompiled student) validation score: %.3f on %d examples.",
                    res.score, len(self.valset))
        return float(res.score)

    def _smoke_test(self) -> None:
        """Student, metric and prompt model once each, so setup errors surface immediately (``preflight.py``)."""
        from trprompt_dspy.loop.preflight import smoke_test

        smoke_test(self.student, self.trainset, metric=self.metric, user_metric=self.settings.metric,
                   prompt_model=self.pm, reward_text=self.t_star, retry=self.retry, role=self._role)

    # -- bookkeeping ----------------------------------------------------------------------------
    def _conditioning(self, t: str) -> str:
        """What the prompt model is conditioned on for the optimal reward ``t``.

        ``t`` itself, except with ``reward_verdict`` once the prompt model has been trained on verdict-grounded
        rewards: then the verdict of a correct outcome comes first
        (:data:`~trprompt_dspy.loop.textual_reward.CORRECT_VERDICT`), the form its training rewards had. TextGrad
        refines ``t`` only, so it cannot drop the verdict. The untrained model (iteration 0) sees ``t`` alone.
        """
        if (self.settings.reward_verdict or self.settings.rewards != "critique") and self._trained:
            from trprompt_dspy.loop.textual_reward import CORRECT_VERDICT

            return f"{CORRECT_VERDICT} {t}"
        return t

    def _record_failures(self, phase: str, rollouts: list[Any]) -> None:
        """Count failed program runs by kind (overall and per phase) and charge them to the error budget."""
        from trprompt_dspy.loop.rollouts import failure_breakdown

        self.meter.add_phase(phase, failure_breakdown(rollouts))
        kinds = [r.error_kind or "other" for r in rollouts if r.error]
        for kind in kinds:
            self.meter.fail("program_error")
            self.meter.fail(f"program_{kind}")
        self.errors.record(phase, total=len(rollouts), failures=kinds, log_dir=self.run_dir.root)

    def _finalize(self, program: dspy.Module) -> None:
        from trprompt_dspy.backends.prompt_model.pinned import PinnedPromptModel
        from trprompt_dspy.compiled.program import attach_prompt_model, query_aware_predictors

        best_adapter = self.run_dir.iter_dir(self.best["iteration"]) / "adapter"
        chosen = best_adapter if best_adapter.is_dir() else None
        self.pm.load_adapter(chosen)
        # The compiled program owns its adapter: a later compile with the same prompt model object (which
        # starts from the bare base) must not change what this program writes.
        attach_prompt_model(program, PinnedPromptModel(self.pm, None if chosen is None else str(chosen)))
        program.trprompt_adapter = str(best_adapter)
        for _, p in query_aware_predictors(program):
            p.optimal_reward = self._conditioning(self.best.get("t_star") or self.t_star)
        program._compiled = True

    def _result(self, tokens: dict[str, dict[str, int]]) -> TRPromptResult:
        snap = self.meter.snapshot()
        return TRPromptResult(
            iterations=tuple(self.stats), best_iteration=self.best["iteration"],
            baseline_score=self.baseline_score, best_score=self.best["score"],
            selected=self.selected, val_size=len(self.valset), selection_p_value=self.selection_p,
            selected_score=self.baseline_score if self.selected == STUDENT else self.best["score"],
            t_star_history=tuple(self.t_history), lm_calls=snap["calls"], lm_tokens=tokens,
            lm_tokens_by_role=snap.get("tokens") or {}, errors_by_phase=snap.get("errors_by_phase") or {},
            failures=snap["failures"], seed=self.settings.seed, log_dir=str(self.run_dir.root),
            budget=dict(self.budget.__dict__), seconds=time.perf_counter() - self.started,
            instructions=self._instruction_counts(), prompt_model=self._describe_pm(),
        )

    def _instruction_counts(self) -> dict[str, Any]:
        from trprompt_dspy.backends.prompt_model.base import cap_report, instruction_stats

        return cap_report(self._instructions_at_start, instruction_stats(self.pm), self.settings.max_instruction_tokens)

    def _describe_pm(self) -> dict[str, Any]:
        from trprompt_dspy.runtime.records import json_safe

        try:
            return json_safe(self.pm.describe())
        except Exception:  # noqa: BLE001 - a description is informative only
            return {"repr": repr(self.pm)}

    def _save_state(self) -> None:
        self.run_dir.write_json(self.run_dir.root / "state.json", {
            "completed_iterations": len(self.stats), "t_star": self.t_star, "t_history": self.t_history,
            "best": self.best, "stats": [s.to_dict() for s in self.stats], "meter": self.meter.snapshot(),
            "metric_calls": self.metric_calls, "baseline_score": self.baseline_score,
        })

    def _restore_state(self) -> None:
        state = self.run_dir.read_json(self.run_dir.root / "state.json")
        if not state:
            return
        self.t_star, self.t_history = state["t_star"], list(state["t_history"])
        self.best, self.baseline_score = state["best"], state.get("baseline_score")
        self.stats = [IterationStats.from_dict(s) for s in state["stats"]]
        self.metric_calls = int(state.get("metric_calls", 0))
        self.meter.restore(state.get("meter"))
        last = self.run_dir.iter_dir(len(self.stats) - 1) / "adapter" if self.stats else None
        if last is not None and last.is_dir():
            self.pm.load_adapter(last)
            self._trained = True
        logger.info("Resumed after %d complete iteration(s); t* = %r", len(self.stats), self.t_star[:80])

    def _log_projection(self) -> None:
        p = self.budget.projected_calls(
            num_predictors=len(self.settings.predictors or list(self.student.named_predictors())),
            val_size=len(self.valset), sft_batch_size=self.settings.sft.per_device_train_batch_size,
            sft_epochs=self.settings.sft.num_train_epochs, accumulate=self.settings.sft.accumulate,
            student_runs=self.settings.abstain or self.settings.rewards != "critique", abstain=self.settings.abstain)
        logger.info(
            "TRPrompt plan: %d iterations x %d queries x %d instructions; up to %d program runs "
            "(%d target-LM calls, %d prompt-model calls), %d reward-LM calls, about %d TextGrad-LM calls "
            "and %d LoRA SFT steps in all; %d validation examples, %d training examples. log_dir=%s",
            self.budget.num_iterations, self.budget.queries_per_iteration, self.budget.prompts_per_query,
            p["program_runs"], p["target_lm_calls"], p["prompt_model_calls"], p["reward_lm_calls"],
            p["textgrad_lm_calls"], p["sft_steps"], len(self.valset), len(self.trainset), self.run_dir.root)

    def _budget_exhausted(self) -> bool:
        cap = self.budget.max_metric_calls
        return cap is not None and self.metric_calls >= cap

    def _cap_by_budget(self, n_queries: int, *, per_item: int) -> int:
        cap = self.budget.max_metric_calls
        if cap is None:
            return n_queries
        return max(1, min(n_queries, (cap - self.metric_calls) // max(1, per_item)))

    def _summarize_truncations(self) -> Any:
        """Count DSPy's "LM response was truncated" warnings per role; one line per phase (``runtime/log_noise.py``)."""
        from trprompt_dspy.runtime.log_noise import role_limits, summarize_truncations

        limits = role_limits(target_lms=[p.lm or dspy.settings.lm for _, p in self.student.named_predictors()],
                             reward_lm=self.reward_lm, textgrad_max_tokens=textgrad_max_tokens(self.textgrad_lm),
                             seed_lm=self.settings.seed_lm, instruction_tokens=self.settings.max_instruction_tokens)
        return summarize_truncations(limits, calls=lambda: self.meter.snapshot()["calls"])

    @contextmanager
    def _role(self, role: str) -> Iterator[None]:
        with dspy.context(callbacks=[*dspy.settings.callbacks, self.meter.callback(role)]):
            yield


def _instructions(rollouts: list[Any]) -> list[str]:
    """What the program wrote for each validation example, in valset order (``" | "`` joins several predictors;
    ``""``: no instruction), so a report can show what an iteration that was not selected would have written."""
    return [" | ".join(str(c.get("instruction") or "") for c in r.instructions) for r in rollouts]


def _abstained(rollouts: list[Any]) -> int:
    """Program runs in which every prompt-model call wrote no instruction (the student's prompt, unchanged)."""
    return sum(1 for r in rollouts if r.instructions and not any((c.get("instruction") or "").strip()
                                                                 for c in r.instructions))


@contextmanager
def _timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - t0
