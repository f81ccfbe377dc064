"""Budgets and training settings for :class:`~trprompt_dspy.TRPromptOptimizer`.

* :data:`AUTO_BUDGETS` — the ``auto="light" | "medium" | "heavy"`` presets.
* :class:`Budget` — the resolved loop sizes, with the projected number of LM calls and SFT steps.
* :class:`LoraSettings` / :class:`SFTSettings` — plain dataclasses that map onto PEFT's ``LoraConfig``
  and TRL's ``SFTConfig``. ``SFTConfig`` is built from its own field list, so a TRL rename (such as
  ``max_seq_length`` → ``max_length``) gives a clear error instead of a silent no-op.

Example:
    >>> b = Budget.from_auto("light")
    >>> b.num_iterations, b.queries_per_iteration, b.prompts_per_query
    (2, 12, 2)
    >>> LoraSettings.from_value({"r": 16}).r
    16
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["AUTO_BUDGETS", "DEFAULT_AUTO", "DEFAULT_SEED", "TEXTGRAD_ACCEPTANCE", "TEXTUAL_REWARDS", "AutoLevel",
           "Budget", "LoraSettings", "SFTSettings"]

AutoLevel = Literal["light", "medium", "heavy"]

#: The budget when no budget argument is given (``TRPromptOptimizer(metric=...)``).
DEFAULT_AUTO: AutoLevel = "light"
#: The seed of every random choice unless one is given (optimizer, CLI, demo, benchmarks).
DEFAULT_SEED = 0
#: How a TextGrad candidate t* is accepted (``TRPromptOptimizer(textgrad_acceptance=...)``); the first is the default.
TEXTGRAD_ACCEPTANCE = ("minibatch", "validation")
#: Where textual rewards come from (the first is the default). ``"trace+critique"``: the trace-built reward (the
#: metric's verdict, what the instruction changed against the student's own answer, the metric's feedback; no LM)
#: plus the reward LM's critique where it agrees with the verdict and adds something; ``"trace"``: the trace-built
#: reward alone (no reward-LM calls); ``"critique"``: the reward LM's critique alone (the paper's, and this
#: library's before 2026-12-07). See :mod:`trprompt_dspy.loop.trace_reward`.
TEXTUAL_REWARDS: tuple[str, ...] = ("trace+critique", "trace", "critique")
#: Level of the sign test an iteration must pass against the student on the valset before ``compile`` returns it
#: (``TRPromptOptimizer(significance_level=...)``). In the GSM-Hard study all four iterations that led the student
#: on validation by 1-2 of 50 examples (p = 0.36-0.50) were 0-9 points worse on dev; at 0.05 none is returned.
DEFAULT_SIGNIFICANCE_LEVEL = 0.05

#: Loop sizes per ``auto`` level. ``val_size`` caps how many validation examples score each candidate
#: (the student included). Selection needs enough of them to tell candidates apart: with 24 examples one
#: example is 4 points, and the 2026-11 demo's selection was noise; 50 resolves 2 points per example.
#: No preset trains on hundreds of queries, because the learning curve gave no reason to: with the 1.5B on
#: GSM-Hard, prompt models trained on 128, 256 and 512 queries scored 25-30 % on dev against 25 % for zero-shot,
#: and the one ahead lost on test (19.5 % vs 27.0 %, p = 0.02); a 512-query compile costs about 55 min of
#: rollouts and SFT on 2 cores (benchmarks/results/scale-gsmhard-qwen1.5b-2026-12-07.md).
AUTO_BUDGETS: dict[str, dict[str, int]] = {
    "light": dict(num_iterations=2, queries_per_iteration=12, prompts_per_query=2,
                  textgrad_steps=1, textgrad_batch_size=4, val_size=50),
    "medium": dict(num_iterations=3, queries_per_iteration=32, prompts_per_query=3,
                   textgrad_steps=2, textgrad_batch_size=6, val_size=100),
    "heavy": dict(num_iterations=5, queries_per_iteration=64, prompts_per_query=4,
                  textgrad_steps=3, textgrad_batch_size=8, val_size=200),
}

_COUNT_FIELDS = ("num_iterations", "queries_per_iteration", "prompts_per_query",
                 "textgrad_steps", "textgrad_batch_size", "val_size")


@dataclass(frozen=True)
class Budget:
    """Resolved loop sizes of one compile.

    Attributes:
        num_iterations: Outer TRPrompt iterations K.
        queries_per_iteration: Training queries sampled per iteration.
        prompts_per_query: Instructions sampled (and rolled out) per query, M.
        textgrad_steps: TextGrad updates of the optimal textual reward per iteration.
        textgrad_batch_size: Queries per TextGrad minibatch.
        val_size: Validation examples used to score each iteration's candidate.
        max_metric_calls: Optional budget of metric calls, checked before each iteration (a soft cap).

    Example:
        >>> b = Budget.resolve(None, {"num_iterations": 3}, max_metric_calls=500)  # unset counts: "light"
        >>> b.num_iterations, b.queries_per_iteration, b.prompts_per_query, b.max_metric_calls
        (3, 12, 2, 500)
        >>> Budget.from_auto("medium").val_size
        100
        >>> Budget.resolve(None, {}, None).val_size  # no budget argument: auto="light"
        50
    """

    num_iterations: int
    queries_per_iteration: int
    prompts_per_query: int
    textgrad_steps: int
    textgrad_batch_size: int
    val_size: int
    max_metric_calls: int | None = None

    def __post_init__(self) -> None:
        for name in _COUNT_FIELDS:
            value = getattr(self, name)
            minimum = 0 if name == "textgrad_steps" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")
        if self.max_metric_calls is not None and (
            not isinstance(self.max_metric_calls, int) or self.max_metric_calls < 1
        ):
            raise ValueError(f"max_metric_calls must be a positive integer or None; got {self.max_metric_calls!r}.")

    @classmethod
    def from_auto(cls, auto: str, *, max_metric_calls: int | None = None) -> Budget:
        if auto not in AUTO_BUDGETS:
            raise ValueError(f"auto must be one of {sorted(AUTO_BUDGETS)}; got auto={auto!r}.")
        return cls(**AUTO_BUDGETS[auto], max_metric_calls=max_metric_calls)

    @classmethod
    def resolve(cls, auto: str | None, counts: dict[str, int | None], max_metric_calls: int | None) -> Budget:
        """Build a budget from ``auto`` *or* explicit counts (unset counts default to ``"light"``).

        With neither, the budget is :data:`DEFAULT_AUTO` (``max_metric_calls`` still caps it).
        """
        given = {k: v for k, v in counts.items() if v is not None}
        unknown = set(given) - set(_COUNT_FIELDS)
        if unknown:
            raise ValueError(f"Unknown budget knobs {sorted(unknown)}; valid: {list(_COUNT_FIELDS)}.")
        if auto is not None and given:
            raise ValueError(
                "Set either auto=... or explicit counts, not both. "
                f"You set auto={auto!r} and {', '.join(f'{k}={v!r}' for k, v in given.items())}."
            )
        if auto is None and not given:
            auto = DEFAULT_AUTO  # like MIPROv2: no budget argument means the light preset
        if auto is not None:
            return cls.from_auto(auto, max_metric_calls=max_metric_calls)
        return cls(**{**AUTO_BUDGETS["light"], **given}, max_metric_calls=max_metric_calls)

    def projected_calls(self, *, num_predictors: int, val_size: int, sft_batch_size: int,
                        sft_epochs: float, accumulate: bool, student_runs: bool = False,
                        abstain: bool = False) -> dict[str, int]:
        """Projected work of the whole compile (an upper bound; early stops make it smaller).

        ``student_runs``: the student's own answer on every sampled training query is computed (once per query;
        counted as if no query repeated). ``abstain``: each query adds a "no instruction" SFT example.
        """
        k, q, m = self.num_iterations, self.queries_per_iteration, self.prompts_per_query
        rollouts = k * q * m
        students = k * q if student_runs else 0
        # TextGrad per step: candidate evaluation on a minibatch + loss, gradient and update calls.
        tg_rollouts = k * self.textgrad_steps * self.textgrad_batch_size * 2
        validation = (k + 1) * min(val_size, self.val_size)
        program_runs = rollouts + tg_rollouts + validation
        per_query = m + (1 if abstain else 0)
        if accumulate:
            sft_examples = sum(q * per_query * num_predictors * (i + 1) for i in range(k))
        else:
            sft_examples = k * q * per_query * num_predictors
        return {
            "program_runs": program_runs + students,
            "target_lm_calls": (program_runs + students) * num_predictors,
            "prompt_model_calls": program_runs * num_predictors,
            "reward_lm_calls": rollouts,
            "textgrad_lm_calls": k * self.textgrad_steps * 3,
            "metric_calls": program_runs,
            "sft_steps": math.ceil(sft_examples * sft_epochs / max(1, sft_batch_size)),
        }


def _from_value(cls: type, value: Any, what: str) -> Any:
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(value) - names
        if unknown:
            raise ValueError(
                f"Unknown {what} settings {sorted(unknown)}. Valid keys: {sorted(names)}. "
                f"Put other {what} options in the 'extra' dict."
            )
        return cls(**value)
    raise TypeError(f"{what} must be a {cls.__name__}, a dict or None; got {type(value).__name__}.")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter settings; fields map one-to-one onto ``peft.LoraConfig``.

    ``extra`` passes further ``LoraConfig`` fields through (checked against ``LoraConfig``'s own fields).

    Example:
        Pass one (or a dict of its fields) as ``TRPromptOptimizer(..., lora=...)``:

        >>> lora = LoraSettings(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
        >>> lora.to_dict()["target_modules"], lora.r
        (['q_proj', 'v_proj'], 16)
    """

    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    bias: Literal["none", "all", "lora_only"] = "none"
    #: Train the adapter of the top ``top_layers`` transformer layers only (``None``: every layer). The other
    #: layers' LoRA weights stay at their zero initialization (no effect; the adapter loads anywhere, vLLM
    #: included), and since nothing below the lowest trainable layer needs a gradient the backward pass stops
    #: there: on the 1.5B with 28 layers, ``top_layers=4`` runs a step in a fraction of the time (measured in
    #: ``benchmarks/scale_study.py sft-bench``). Not a ``LoraConfig`` field.
    top_layers: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA rank r must be a positive integer; got r={self.r!r}.")
        if self.top_layers is not None and (not isinstance(self.top_layers, int) or isinstance(self.top_layers, bool)
                                            or self.top_layers < 1):
            raise ValueError(f"top_layers must be a positive integer or None (every layer); got {self.top_layers!r}.")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1); got {self.lora_dropout!r}.")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @classmethod
    def from_value(cls, value: LoraSettings | dict[str, Any] | None) -> LoraSettings:
        return _from_value(cls, value, "LoRA")

    def to_peft(self) -> Any:
        """Build ``peft.LoraConfig`` (imports peft lazily)."""
        from trprompt_dspy._lazy import require

        peft = require("peft", extra="train")
        kwargs = dict(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                      target_modules=list(self.target_modules), bias=self.bias, task_type="CAUSAL_LM")
        kwargs.update(_checked_extra(peft.LoraConfig, self.extra, "LoraConfig"))
        return peft.LoraConfig(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "target_modules": list(self.target_modules)}


@dataclass(frozen=True)
class SFTSettings:
    """Supervised fine-tuning settings; fields map onto ``trl.SFTConfig``.

    Attributes:
        accumulate: Train each iteration on the data of all iterations so far (``True``) or only on the
            newest iteration's data (``False``). Not an ``SFTConfig`` field.
        min_score: Keep only rollouts whose metric score is at least this (``None`` keeps all: TRPrompt
            learns from bad outcomes too, because the textual reward describes them).
        balance: Train on as many examples from good outcomes (metric score >= 1) as from the others, by
            sampling the more frequent kind down (seeded). The paper traces small gains to training data
            dominated by one kind of feedback; at 25 % rollout accuracy three in four examples are failures.
            Not an ``SFTConfig`` field.
        bf16: ``"auto"`` uses bf16 autocast when the hardware supports it (CPU with AVX512-BF16, CUDA).
        max_length: Tokens per example (prompt and instruction); 1024 since 2026-12-07 (at 512, 5 of 32 GSM-Hard
            examples with their critiques were cut).
        gradient_checkpointing: Recompute activations in the backward pass instead of keeping them.
            ``"auto"`` (since 2026-12-07) turns it on when LoRA trains every layer (``LoraSettings.top_layers``
            is ``None``, the default) and off when it trains only the top layers. In single-base mode the
            training copy shares the machine with the vLLM server: every-layer LoRA on the 1.5B with batches of
            long examples (190-word queries) peaked at 18.7 GB without it (the comparison's TRPrompt compile died at its
            second SFT on a 24 GB machine) and at 0.54x that with it, in 0.93x the time on CPU. With
            ``top_layers=4`` it saved nothing (0.47x vs 0.46x) and cost time (0.59x vs 0.96x); figures from
            ``benchmarks/results/sft-memory-qwen1.5b-2026-12-07.json``. ``True`` / ``False`` force it.
        group_by_length: Batch examples of similar length together (``SFTConfig.train_sampling_strategy=
            "group_by_length"``), so little of each batch is padding; ``False``: random order.
        extra: Further ``SFTConfig`` fields, checked against ``SFTConfig``'s own field list.

    Example:
        Pass one (or a dict of its fields) as ``TRPromptOptimizer(..., sft=...)``:

        >>> sft = SFTSettings.from_value({"num_train_epochs": 3.0, "accumulate": False})
        >>> sft.num_train_epochs, sft.accumulate, sft.learning_rate
        (3.0, False, 0.0005)
    """

    learning_rate: float = 5e-4
    num_train_epochs: float = 2.0
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_length: int = 1024
    lr_scheduler_type: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    logging_steps: int = 1
    bf16: bool | Literal["auto"] = "auto"
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    accumulate: bool = True
    group_by_length: bool = True
    min_score: float | None = None
    balance: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0; got {self.learning_rate!r}.")
        if self.num_train_epochs <= 0:
            raise ValueError(f"num_train_epochs must be > 0; got {self.num_train_epochs!r}.")
        if not isinstance(self.per_device_train_batch_size, int) or self.per_device_train_batch_size < 1:
            raise ValueError(f"per_device_train_batch_size must be a positive integer; got "
                             f"{self.per_device_train_batch_size!r}.")
        if self.gradient_checkpointing != "auto" and not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"gradient_checkpointing must be True, False or 'auto'; got {self.gradient_checkpointing!r}.")
        if "max_seq_length" in self.extra:
            raise ValueError("TRL renamed SFTConfig.max_seq_length to max_length; set SFTSettings(max_length=...).")

    @classmethod
    def from_value(cls, value: SFTSettings | dict[str, Any] | None) -> SFTSettings:
        return _from_value(cls, value, "SFT")

    def to_trl(self, *, output_dir: str, seed: int, use_cpu: bool, bf16_supported: bool,
               every_layer: bool = True) -> Any:
        """Build ``trl.SFTConfig`` from its own fields (imports trl lazily).

        ``every_layer``: whether the LoRA adapter covers every layer (it decides ``gradient_checkpointing="auto"``).
        """
        from trprompt_dspy._lazy import require

        trl = require("trl", extra="train")
        bf16 = bf16_supported if self.bf16 == "auto" else bool(self.bf16)
        kwargs: dict[str, Any] = dict(
            output_dir=output_dir, seed=seed, data_seed=seed, use_cpu=use_cpu, bf16=bf16,
            learning_rate=self.learning_rate, num_train_epochs=self.num_train_epochs,
            per_device_train_batch_size=self.per_device_train_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps, max_length=self.max_length,
            lr_scheduler_type=self.lr_scheduler_type, warmup_steps=self.warmup_steps,
            weight_decay=self.weight_decay, logging_steps=self.logging_steps,
            completion_only_loss=True,
            save_strategy="no", report_to="none", disable_tqdm=True,
        )
        # transformers 5 renamed gradient_checkpointing -> activation_checkpointing (old name deprecated).
        fields = {f.name for f in dataclasses.fields(trl.SFTConfig)}
        ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
        kwargs[ckpt] = every_layer if self.gradient_checkpointing == "auto" else self.gradient_checkpointing
        if "train_sampling_strategy" in fields:  # transformers >= 5; older: group_by_length=True
            kwargs["train_sampling_strategy"] = "group_by_length" if self.group_by_length else "random"
        elif "group_by_length" in fields:  # pragma: no cover - transformers 4.x
            kwargs["group_by_length"] = self.group_by_length
        kwargs.update(self.extra)
        return trl.SFTConfig(**_checked_extra(trl.SFTConfig, kwargs, "SFTConfig"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _checked_extra(cls: type, kwargs: dict[str, Any], what: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else None
    if names is not None:
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"{what} has no field(s) {unknown} in the installed version; check the spelling "
                             f"or the installed peft/trl version.")
    return kwargs
