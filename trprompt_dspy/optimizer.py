"""``TRPromptOptimizer``: query-aware prompt optimization from textual rewards, as a DSPy optimizer.

The whole algorithm, one iteration ``k`` at a time (each step is one module of ``trprompt_dspy/loop/``)::

    t* = initial_reward                                   # "the ideal outcome", no prompt dataset needed
    score_0 = evaluate_program(student, valset)           # the student as given is candidate 0
    for k in range(K):
        rollouts = run_rollouts(...)                      # loop/rollouts.py: Π samples M instructions/query,
                                                          #   the frozen target answers, the metric scores
        rewards  = TextualRewardModel.score(rollouts)     # loop/textual_reward.py: R critiques each rollout
                                                          #   (loop/answer_leaks.py keeps gold answers out)
        Π.train(build_sft_examples(rollouts))             # loop/sft_data.py + backends/prompt_model/lora_training.py
        t* = refine_optimal_reward(t*, ...)               # loop/refine_reward.py: TextGrad step on t*
        score_k = evaluate_program(candidate_k, valset)
    return best candidate_k if it beats score_0 else a copy of the student   # loop/run.py: selection
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import dspy
from dspy.teleprompt import Teleprompter

from trprompt_dspy.backends.prompt_model.base import DEFAULT_MAX_INSTRUCTION_TOKENS, PromptModel
from trprompt_dspy.config import (
    AUTO_BUDGETS,
    DEFAULT_AUTO,
    DEFAULT_SEED,
    DEFAULT_SIGNIFICANCE_LEVEL,
    TEXTGRAD_ACCEPTANCE,
    TEXTUAL_REWARDS,
    Budget,
    LoraSettings,
    SFTSettings,
)
from trprompt_dspy.runtime.checkpoint import RunDirectory
from trprompt_dspy.runtime.tracking import CompileTracker, apply_mlflow_autolog_patch
from trprompt_dspy.runtime.usage import UsageMeter
from trprompt_dspy.runtime.validation import (
    check_input_fields,
    check_number,
    check_positive_int,
    check_servers_reachable,
    check_writable_dir,
    validate_dataset,
    validate_program,
)

logger = logging.getLogger(__name__)

__all__ = ["TRPromptOptimizer", "DEFAULT_INITIAL_REWARD"]

#: t*_0: a short description of an ideal outcome (the paper starts from such a text, not from prompts).
DEFAULT_INITIAL_REWARD = (
    "The response reasons step by step, uses every quantity in the query correctly, checks each "
    "calculation, and ends with the correct final answer in the requested format."
)


class TRPromptOptimizer(Teleprompter):
    """Compile a DSPy program so a small trained prompt model writes a per-query instruction.

    TRPrompt (Nica et al., 2025, arXiv 2507.18618) learns a *prompt model* Π that maps a query and a
    *textual reward* to an instruction for the frozen *target* model. Training bootstraps its own data:
    Π proposes instructions, the target answers, a *reward model* writes a critique (the textual reward)
    of each outcome, and Π is fine-tuned (LoRA) to produce the instruction given the query and its
    critique. At inference Π is conditioned on an *optimal textual reward* t*, refined with TextGrad.

    Args:
        metric: ``metric(example, pred, trace=None) -> float | bool``, or a GEPA-style feedback metric
            returning ``dspy.Prediction(score=..., feedback=...)``; the feedback text is shown to the
            reward model.
        prompt_model: Who writes the instructions. ``"auto"`` (default) is **single-base mode** whenever the
            target LM runs on local weights built by this library (``ModelStack``, ``VLLMServer.dspy_lm()`` with
            LoRA enabled, ``models.local_lm``): Π is a LoRA adapter on the target's own weights, served by the
            same vLLM server (the paper runs one model in every role). For any other target it is
            ``"smollm2-135m-instruct"`` in-process. ``"same"`` asks for single-base mode (an error when the
            target has no local weights); a preset / HF id / folder picks a separate in-process model
            (``"vllm:<model>"``: on its own vLLM server); a
            :class:`~trprompt_dspy.backends.prompt_model.base.PromptModel` object is used as given. Each compile
            builds its own prompt model from a name; an object is shared, but each compiled program is
            pinned to its own adapter (:class:`~trprompt_dspy.backends.prompt_model.pinned.PinnedPromptModel`), so a
            later compile never changes an earlier compiled program.
        reward_lm: The textual reward model R. Default: the target LM (the student's LM or ``dspy.settings.lm``).
        textgrad_lm: The LM behind TextGrad's gradients and updates. Default: ``reward_lm``. Its own
            ``max_tokens`` caps each TextGrad reply; without one, ``loop.run.TEXTGRAD_MAX_TOKENS`` (384) does.
        seed_lm: If set, iteration 0's instructions come from this (stronger) ``dspy.LM`` instead of the
            untrained Π, which tends to solve the query instead of writing an instruction.
        auto: Budget preset, ``"light"``, ``"medium"`` or ``"heavy"``. Set this *or* explicit counts; with
            neither, ``"light"`` applies (:data:`~trprompt_dspy.config.DEFAULT_AUTO`, logged at compile).
        num_iterations: K, the outer iterations.
        queries_per_iteration: Training queries rolled out per iteration.
        prompts_per_query: M, instructions sampled per query.
        textgrad_steps: TextGrad updates of t* per iteration (0 disables refinement).
        textgrad_batch_size: Queries per TextGrad minibatch.
        val_size: Validation examples that score the student and each iteration (light 50, medium 100,
            heavy 200). With ``valset=None`` they are held out of the trainset, so they never serve as
            rollout or TextGrad queries.
        min_improvement: No-regression selection. The student as given is candidate 0, scored on the same
            valset as every iteration; ``compile`` returns the best iteration only if it beats the student by
            more than this (in metric units; ``0.0``: strictly better, a tie keeps the student), and a copy of
            the student otherwise (``detailed_results.selected == "student"``). ``None`` returns the best
            iteration whatever it scored (for studying the trained program).
        significance_level: Ask the valset for evidence, not just a lead (default ``0.05``; ``None``: any lead is
            enough). An iteration that beats the student by more than ``min_improvement`` is returned only if it
            also wins a one-sided exact sign test over the validation examples where the two differ, with p below
            this level (``detailed_results.selection_p_value`` records p either way). On 50 examples a lead of
            5 better / 3 worse (p = 0.36) keeps the student and 6 / 0 (p = 0.016) does not. Ignored when
            ``min_improvement=None`` (the guard is off).
            In the GSM-Hard study the four iterations that beat the student on validation by 1–2 examples of 50
            (p = 0.36–0.50) scored 0–9 points below the uncompiled program on 100 dev questions; ``0.05``
            refuses all four. With a valset of 4 even a 4 / 0 lead (p = 0.0625) is refused, so raise ``val_size``.
        max_metric_calls: Budget of metric calls (program runs), checked before each iteration; an
            iteration's rollouts are sized to fit what is left, but its TextGrad minibatches and validation
            may exceed the cap by up to ``2 * textgrad_steps * textgrad_batch_size + val_size``.
        lora: :class:`~trprompt_dspy.config.LoraSettings` or a dict of its fields.
        sft: :class:`~trprompt_dspy.config.SFTSettings` or a dict of its fields.
        initial_reward: t*_0, the description of an ideal outcome.
        reward_verdict: Verdict-grounded textual rewards: every SFT reward starts with the metric's verdict on its
            rollout ("Verdict: the outcome was incorrect (metric score 0).",
            :func:`~trprompt_dspy.loop.textual_reward.verdict_sentence`) before the reward LM's critique, and the
            trained prompt model is conditioned on the correct verdict followed by t*. Use it when the reward LM
            is small: it cannot then mislabel a failure as a success. Off by default (the paper's rewards are
            the critique alone).
        textual_rewards: Where the textual rewards come from. ``"trace+critique"`` (default): each reward is built
            from the metric's trace (:mod:`~trprompt_dspy.loop.trace_reward`): the metric's verdict first, which
            nothing after it can override, then what the instruction changed against the student's own answer
            to the same query (fixed it, broke it, kept it correct, left it wrong), the metric's feedback text
            with the gold answer redacted, and the reward LM's critique only where it agrees with the verdict and
            does not merely restate the query, answer or gold solution. ``"trace"``: no reward-LM calls at all.
            ``"critique"``: the reward LM's critique alone (the paper's recipe; the 1.5B reward LM called 18 of 22
            failed GSM-Hard rollouts correct). The student's own answer on each training query is computed
            once per compile and kept (``student_rollouts.jsonl`` in ``log_dir``).
        abstain: "No instruction" is a candidate for every training query (its rollout is the student's own
            answer, scored like the others), so the prompt model can learn to write
            :data:`~trprompt_dspy.backends.prompt_model.base.NO_INSTRUCTION`; a compiled predictor that receives it
            runs with its own instructions only, like the uncompiled program (no extra target tokens). Each
            iteration logs how many instructions fixed and broke the student's answers, and
            ``detailed_results.iterations[k].abstention_rate`` is the share of validation questions it left alone.
        textgrad_acceptance: How a TextGrad candidate t* is accepted. ``"minibatch"`` (default, the paper):
            it is kept if it scores higher on its TextGrad minibatch, or ties a non-zero score. ``"validation"``:
            a candidate that passed its minibatch is also scored on the valset against the t* it would replace,
            and kept only if strictly better there (one more valset evaluation per accepted step). A minibatch
            of 4 ties often; on a GSM-Hard study a tie-accepted t* scored 7/50 on validation against 10/50 for
            the t* it replaced.
        predictors: Names of the predictors to make query-aware (default: all).
        sampling_temperature: Π's temperature when sampling instructions for rollouts.
        max_instruction_tokens: Token budget of each generated instruction (default 48: one or two complete
            sentences; the share that hits it is ``detailed_results.instructions["hit_cap_rate"]``).
        num_threads: Parallel program runs (keeps batching backends busy).
        failure_score: Score given to a rollout whose program run raised.
        max_retries: Retries of a call that failed transiently (timeout, HTTP 5xx, dropped connection, rate
            limit), with exponential backoff and jitter; on top of the ``dspy.LM``'s own ``num_retries``.
        retry_backoff: Seconds before the first retry (doubling each retry, capped at 8 s).
        max_error_rate: Error budget: stop with :class:`~trprompt_dspy.runtime.faults.ErrorBudgetExceededError`
            (keeping a resumable checkpoint) once more than this fraction of the program runs, reward
            critiques and TextGrad steps failed after retries, or a whole phase failed. 1.0 disables the rate.
        max_errors: Optional absolute cap on failed operations (``None``: no cap).
        preflight: Before any work, check that every LM server (``api_base`` of the target, reward,
            TextGrad and seed LMs, and a served prompt model's ``base_url``) accepts connections.
        seed: Seeds every random choice (query sampling, Π sampling, fine-tuning).
        log_dir: Checkpoint folder; re-running compile with the same folder resumes. Default: a new
            temporary folder.
        track_stats: Attach a :class:`~trprompt_dspy.results.TRPromptResult` as ``compiled.detailed_results``.
        display_progress: Show tqdm progress bars per phase.

    Example:
        >>> import dspy
        >>> from trprompt_dspy import TRPromptOptimizer
        >>> from trprompt_dspy.tasks.metrics import gsm8k_metric
        >>> opt = TRPromptOptimizer(metric=gsm8k_metric, auto="light")
        >>> opt.budget.num_iterations
        2

        Then ``compiled = opt.compile(dspy.ChainOfThought("question -> answer"), trainset=train)``;
        ``compiled(question=...)`` shows the instruction it wrote as ``query_instruction``.
    """

    def __init__(
        self,
        metric: Callable[..., Any],
        *,
        # Models
        prompt_model: PromptModel | str | Path | None = "auto",
        reward_lm: dspy.BaseLM | None = None,
        textgrad_lm: dspy.BaseLM | None = None,
        seed_lm: dspy.BaseLM | None = None,
        # Budget: exactly one of `auto` or explicit counts
        auto: Literal["light", "medium", "heavy"] | None = None,
        num_iterations: int | None = None,
        queries_per_iteration: int | None = None,
        prompts_per_query: int | None = None,
        textgrad_steps: int | None = None,
        textgrad_batch_size: int | None = None,
        val_size: int | None = None,
        max_metric_calls: int | None = None,
        # Selection
        min_improvement: float | None = 0.0,
        significance_level: float | None = DEFAULT_SIGNIFICANCE_LEVEL,
        # Prompt-model training
        lora: LoraSettings | dict[str, Any] | None = None,
        sft: SFTSettings | dict[str, Any] | None = None,
        # Algorithm
        initial_reward: str = DEFAULT_INITIAL_REWARD,
        reward_verdict: bool = False,
        textual_rewards: Literal["trace+critique", "trace", "critique"] = TEXTUAL_REWARDS[0],
        abstain: bool = True,
        textgrad_acceptance: Literal["minibatch", "validation"] = TEXTGRAD_ACCEPTANCE[0],
        predictors: Sequence[str] | None = None,
        sampling_temperature: float = 0.9,
        max_instruction_tokens: int = DEFAULT_MAX_INSTRUCTION_TOKENS,
        # Execution
        num_threads: int = 1,
        failure_score: float = 0.0,
        max_retries: int = 2,
        retry_backoff: float = 0.5,
        max_error_rate: float = 0.5,
        max_errors: int | None = None,
        preflight: bool = True,
        seed: int = DEFAULT_SEED,
        # Logging
        log_dir: str | Path | None = None,
        track_stats: bool = True,
        display_progress: bool = True,
    ) -> None:
        super().__init__()
        from trprompt_dspy.loop.metric_adapter import check_metric_arity

        check_metric_arity(metric)
        self.metric = metric
        self.budget = Budget.resolve(
            auto,
            dict(num_iterations=num_iterations, queries_per_iteration=queries_per_iteration,
                 prompts_per_query=prompts_per_query, textgrad_steps=textgrad_steps,
                 textgrad_batch_size=textgrad_batch_size, val_size=val_size),
            max_metric_calls,
        )
        self.auto = auto
        if min_improvement is not None:
            check_number("min_improvement", min_improvement, low=0.0)
        self.min_improvement = None if min_improvement is None else float(min_improvement)
        if significance_level is not None:
            check_number("significance_level", significance_level, low=0.0, high=1.0)
            if significance_level == 0:
                raise ValueError(
                    "significance_level=0 would refuse every iteration: pass a level in (0, 1] (default 0.05), or "
                    "None to return an iteration on any lead over the student on the valset.")
        self.significance_level = None if significance_level is None else float(significance_level)
        from trprompt_dspy.backends.stack import check_prompt_model_spec

        check_prompt_model_spec(prompt_model)
        if isinstance(prompt_model, PromptModel) and not getattr(prompt_model, "trainable", True):
            raise TypeError(
                f"prompt_model {type(prompt_model).__name__} cannot be fine-tuned; pass a trainable prompt model "
                "(e.g. HFPromptModel) and give this one as seed_lm's writer instead (seed_lm=<dspy.LM>)."
            )
        self.prompt_model = prompt_model
        for name, lm in (("reward_lm", reward_lm), ("textgrad_lm", textgrad_lm), ("seed_lm", seed_lm)):
            if lm is not None and not isinstance(lm, dspy.BaseLM):
                raise TypeError(f"{name} must be a dspy.LM (or dspy.BaseLM); got {type(lm).__name__}.")
        self.reward_lm, self.textgrad_lm, self.seed_lm = reward_lm, textgrad_lm, seed_lm
        self.lora = LoraSettings.from_value(lora)
        self.sft = SFTSettings.from_value(sft)
        if not isinstance(initial_reward, str) or not initial_reward.strip():
            raise ValueError(f"initial_reward must be a non-empty string; got {initial_reward!r}.")
        self.initial_reward = initial_reward.strip()
        if not isinstance(reward_verdict, bool):
            raise TypeError(f"reward_verdict must be True or False; got {reward_verdict!r}.")
        self.reward_verdict = reward_verdict
        if textual_rewards not in TEXTUAL_REWARDS:
            raise ValueError(f"textual_rewards must be one of {list(TEXTUAL_REWARDS)}; got {textual_rewards!r}.")
        self.textual_rewards = textual_rewards
        if not isinstance(abstain, bool):
            raise TypeError(f"abstain must be True or False; got {abstain!r}.")
        self.abstain = abstain
        if textgrad_acceptance not in TEXTGRAD_ACCEPTANCE:
            raise ValueError(f"textgrad_acceptance must be one of {', '.join(map(repr, TEXTGRAD_ACCEPTANCE))}; "
                             f"got {textgrad_acceptance!r}.")
        self.textgrad_acceptance = textgrad_acceptance
        if predictors is not None and (isinstance(predictors, str) or not all(isinstance(p, str) for p in predictors)):
            raise TypeError(f"predictors must be a list of predictor names; got {predictors!r}.")
        if predictors is not None and len(predictors) == 0:
            raise ValueError("predictors=[] selects nothing; pass None for all predictors or a list of names.")
        self.predictors = list(predictors) if predictors is not None else None
        check_number("sampling_temperature", sampling_temperature, low=0.0, high=5.0)
        self.sampling_temperature = float(sampling_temperature)
        check_positive_int("max_instruction_tokens", max_instruction_tokens, minimum=8)
        self.max_instruction_tokens = max_instruction_tokens
        check_positive_int("num_threads", num_threads)
        self.num_threads = num_threads
        check_number("failure_score", failure_score)
        self.failure_score = float(failure_score)
        check_positive_int("max_retries", max_retries, minimum=0)
        self.max_retries = max_retries
        check_number("retry_backoff", retry_backoff, low=0.0, high=60.0)
        self.retry_backoff = float(retry_backoff)
        from trprompt_dspy.runtime.faults import ErrorBudget

        ErrorBudget(max_error_rate, max_errors=max_errors)  # validates both
        self.max_error_rate, self.max_errors = float(max_error_rate), max_errors
        self.preflight = bool(preflight)
        check_positive_int("seed", seed, minimum=0)
        self.seed = seed
        self.log_dir = None if log_dir is None else Path(log_dir).expanduser()
        if self.log_dir is not None and self.log_dir.exists() and not self.log_dir.is_dir():
            raise ValueError(f"log_dir {str(self.log_dir)!r} exists and is not a folder; pass a folder path "
                             "(it is created if missing), e.g. log_dir='runs/trprompt'.")
        self.track_stats = bool(track_stats)
        self.display_progress = bool(display_progress)

    # ------------------------------------------------------------------------------------------
    def compile(
        self,
        student: dspy.Module,
        *,
        trainset: list[dspy.Example],
        teacher: dspy.Module | None = None,
        valset: list[dspy.Example] | None = None,
    ) -> dspy.Module:
        """Optimize ``student`` and return a new, query-aware program (``student`` is not modified).

        Args:
            student: The DSPy program; its LM(s) (or ``dspy.settings.lm``) are the frozen target.
            trainset: Examples with inputs and gold labels; rollouts sample queries from it.
            teacher: Not used by TRPrompt; must be ``None``.
            valset: Examples that select the best iteration. Default: a held-out slice of ``trainset``.

        Returns:
            A deep copy of ``student`` whose predictors are :class:`~trprompt_dspy.compiled.program.QueryAwarePredict`.

        Raises:
            ~trprompt_dspy.runtime.validation.InputFieldMismatchError: Before any model call, when the examples'
                inputs (``.with_inputs(...)``) are not the names the program is called with, e.g. ``q`` for a
                ``"question -> answer"`` program.
        """
        from trprompt_dspy.loop.run import TRPromptRun

        if self.auto is None and self.budget == Budget.from_auto(DEFAULT_AUTO, max_metric_calls=self.budget.max_metric_calls):
            logger.info("No budget given: using auto=%r (%s).", DEFAULT_AUTO, AUTO_BUDGETS[DEFAULT_AUTO])
        if teacher is not None:
            raise ValueError("TRPromptOptimizer does not use a teacher program; call compile(..., teacher=None).")
        names = validate_program(student)
        validate_dataset(trainset, "trainset")
        check_input_fields(student, trainset, "trainset")  # else DSPy runs the whole compile on empty queries
        if valset is not None:
            validate_dataset(valset, "valset")
            check_input_fields(student, valset, "valset")
        if self.predictors is not None:
            unknown = sorted(set(self.predictors) - set(names))
            if unknown:
                raise ValueError(f"predictors {unknown} are not in the program; its predictors are {names}.")
        trainset, valset = self._split(list(trainset), None if valset is None else list(valset))
        target_lms = [p.lm or dspy.settings.lm for _, p in student.named_predictors()]
        if any(lm is None for lm in target_lms):
            raise ValueError(
                "The student has no LM: configure one with dspy.configure(lm=dspy.LM(...)) or student.set_lm(lm)."
            )
        reward_lm = self.reward_lm or target_lms[0]
        textgrad_lm = self.textgrad_lm or reward_lm
        log_dir = self.log_dir or Path(tempfile.mkdtemp(prefix="trprompt_"))
        check_writable_dir(log_dir, "log_dir")
        if self.preflight:
            check_servers_reachable([*(("target LM", lm) for lm in target_lms), ("reward_lm", reward_lm),
                                     ("textgrad_lm", textgrad_lm), ("seed_lm", self.seed_lm),
                                     ("prompt_model", self.prompt_model)])
        from trprompt_dspy.backends.stack import resolve_prompt_model

        prompt_model = resolve_prompt_model(self.prompt_model, target_lms[0],
                                            max_concurrency=max(16, self.num_threads))
        run_dir = RunDirectory(log_dir, fingerprint=self._fingerprint(student, trainset, valset, prompt_model))
        meter = UsageMeter()
        for lm in target_lms:
            meter.assign(lm, "target")
        meter.assign(reward_lm, "reward")
        meter.assign(textgrad_lm, "textgrad")
        meter.assign(self.seed_lm, "seed_writer")
        tracker = CompileTracker.start(self, {  # logs into MLflow only under mlflow.dspy.autolog(log_compiles=True)
            "target_lm": target_lms[0], "reward_lm": reward_lm, "textgrad_lm": textgrad_lm,
            "prompt_model": prompt_model, "log_dir": run_dir.root, "trainset_size": len(trainset),
            "valset_size": len(valset)})
        run = TRPromptRun(
            settings=self._run_settings(), student=student, trainset=trainset, valset=valset, prompt_model=prompt_model,
            reward_lm=reward_lm, textgrad_lm=textgrad_lm, run_dir=run_dir, meter=meter, tracker=tracker,
        )
        return run.execute()

    # ------------------------------------------------------------------------------------------
    def _run_settings(self) -> Any:
        from trprompt_dspy.loop.run import RunSettings

        return RunSettings(
            metric=self.metric, budget=self.budget, lora=self.lora, sft=self.sft, initial_reward=self.initial_reward,
            predictors=None if self.predictors is None else tuple(self.predictors),
            sampling_temperature=self.sampling_temperature, max_instruction_tokens=self.max_instruction_tokens,
            num_threads=self.num_threads, failure_score=self.failure_score, max_retries=self.max_retries,
            retry_backoff=self.retry_backoff, max_error_rate=self.max_error_rate, max_errors=self.max_errors,
            seed=self.seed, seed_lm=self.seed_lm, min_improvement=self.min_improvement,
            significance_level=self.significance_level,
            reward_verdict=self.reward_verdict, textgrad_acceptance=self.textgrad_acceptance,
            rewards=self.textual_rewards, abstain=self.abstain,
            track_stats=self.track_stats, display_progress=self.display_progress)

    def _split(self, trainset: list[dspy.Example], valset: list[dspy.Example] | None
               ) -> tuple[list[dspy.Example], list[dspy.Example]]:
        rng = random.Random(self.seed)
        if valset is None:
            if len(trainset) < 2:
                raise ValueError(
                    f"trainset has {len(trainset)} example(s); with no valset TRPrompt holds out part of the "
                    "trainset for selection, so pass at least 2 examples or an explicit valset."
                )
            order = list(range(len(trainset)))
            rng.shuffle(order)
            n_val = min(self.budget.val_size, max(1, len(trainset) // 4))
            valset = [trainset[i] for i in order[:n_val]]
            trainset = [trainset[i] for i in order[n_val:]]
            logger.info("No valset given: holding out %d of the trainset examples for selection (never used as "
                        "rollout or TextGrad queries).", n_val)
            if n_val < self.budget.val_size:
                logger.warning(
                    "Only %d validation examples (the budget asks for %d): one example moves a score by %.0f points, "
                    "so selection cannot tell small gains from noise. Pass a larger trainset (%d+ examples) or a "
                    "valset.", n_val, self.budget.val_size, 100 / n_val, 4 * self.budget.val_size)
        elif len(valset) > self.budget.val_size:
            valset = [valset[i] for i in sorted(rng.sample(range(len(valset)), self.budget.val_size))]
        return trainset, valset

    def _fingerprint(self, student: dspy.Module, trainset: list[dspy.Example], valset: list[dspy.Example],
                     prompt_model: PromptModel) -> dict[str, Any]:
        def digest(obj: Any) -> str:
            return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]

        from trprompt_dspy.loop.metric_adapter import metric_name

        structure = [(n, str(p.signature)) for n, p in student.named_predictors()]
        data = [[dict(ex.inputs()), dict(ex.labels())] for ex in trainset]
        lms = [getattr(p.lm or dspy.settings.lm, "model", None) for _, p in student.named_predictors()]
        per_iteration = {k: v for k, v in self.budget.__dict__.items()
                         if k not in ("num_iterations", "max_metric_calls")}  # these may grow on resume
        return {
            "program": digest(structure),
            "trainset": digest(data),
            "valset": digest([[dict(ex.inputs()), dict(ex.labels())] for ex in valset]),
            "budget": digest(per_iteration),
            "models": digest([lms, getattr(self.reward_lm, "model", None), getattr(self.textgrad_lm, "model", None),
                              getattr(self.seed_lm, "model", None)]),
            "metric": metric_name(self.metric),
            # Fields added later enter only when they change what the trainer did before them.
            "training": digest([{k: v for k, v in self.lora.to_dict().items() if k != "top_layers" or v is not None},
                                {k: v for k, v in self.sft.to_dict().items()
                                 if (k != "balance" or v) and (k != "group_by_length" or v)}]),
            # Options added later enter the digest only when set, so older run folders still resume.
            "algorithm": digest([self.initial_reward, self.predictors, self.sampling_temperature,
                                 self.max_instruction_tokens, self.failure_score, self.seed_lm is not None]
                                + ([{"reward_verdict": True}] if self.reward_verdict else [])
                                + ([{"textgrad_acceptance": self.textgrad_acceptance}]
                                   if self.textgrad_acceptance != "minibatch" else [])
                                # The recipe before 2026-12-07 was ("critique", no abstention).
                                + ([{"textual_rewards": self.textual_rewards, "abstain": self.abstain}]
                                   if (self.textual_rewards, self.abstain) != ("critique", False) else [])),
            "prompt_model": str(prompt_model.describe().get("base_model")),
            "seed": self.seed,
        }

    def get_params(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


# mlflow.dspy.autolog() patches only the Teleprompter subclasses that exist when it runs; this package imports
# lazily, so apply MLflow's compile patch here when autologging was turned on first (no-op without MLflow).
apply_mlflow_autolog_patch(TRPromptOptimizer)
