"""The contenders of the optimizer comparison and how each one is sized to a target-LM call budget.

A *budget* is the number of completions sent to the target model during ``compile``: the student
program's own calls (role ``"target"``) plus the optimizer's proposer / reflection / reward / TextGrad
calls when they use the target model (role ``"aux"``). ``P`` is the number of predictors in the program
(1 for ``MathCoT``, 2 for ``PlanAndSolve``), so one program run costs ``P`` calls.

With a budget ``N`` each planner picks its optimizer's knobs so its *predicted* calls land at or just
under ``N``; the comparison then reports the *measured* calls next to the prediction. With
``budget=None`` ("native") every optimizer runs its own light preset or DSPy's defaults.

=============  ==========================================================================================
contender      budget -> settings (predicted calls, ``R = N // P`` program runs)
=============  ==========================================================================================
zeroshot       nothing to tune: 0 calls.
labeled        ``LabeledFewShot(k)``: 0 calls (labels only).
bootstrap      ``BootstrapFewShot(4 bootstrapped, k labeled, 1 round)`` on the first ``min(T, R)`` shuffled
               training examples: at most ``P * min(T, R)`` calls; it stops after 4 successful traces, so it
               usually spends far less and cannot be made to spend more.
copro          ``COPRO(breadth b, depth D)`` evaluated on ``n`` training examples:
               ``P=1: n*b*D`` runs, ``P>1: P*n*b*D(D+1)/2`` runs, plus ``P*(b-1) + (D-1)*P*b`` proposals;
               D=2, the largest b in 6..2 that leaves ``n >= 8``; n is capped at T, and then D grows (<= 5).
mipro          ``MIPROv2(auto=None, num_candidates c)``, ``t`` trials on ``v`` dev examples (full evals
               when ``v <= 50``, minibatches of 35 otherwise): ``(c-2)*min(T, 16)`` bootstrap runs (16 ~
               4 demos at 25 % accuracy) + ``(t+1)*v`` (or ``35t + v(t//5+2)``) trial runs, plus
               ``ceil(T/10) + 2 + P(c+2)`` proposer calls; c=6 and t from DSPy's light formula, then v
               solved from the budget (shrinking t and c when v would drop below 5); once v reaches the
               dev size, t grows (<= 60).
simba          ``SIMBA(bsize b, num_candidates 6, max_steps s)`` on ``min(T, 2b)`` training examples:
               ``s*b*13`` runs + ``7*min(T, 2b)`` final runs + ``~3s`` rule proposals; the largest b in
               32/16/8/4 with ``s >= 2`` (s <= 20).
gepa           ``GEPA(max_metric_calls=m)`` with ``m = N / (P + 1/6)`` (one reflection call per ~6 runs) on
               ``v = min(V, max(5, m // 4))`` dev examples; GEPA stops at m metric calls itself.
trprompt       ``TRPromptOptimizer(num_iterations 2, prompts_per_query 2, textgrad_steps 1,
               textgrad_batch_size 4, val_size v, queries_per_iteration q)`` with ``v = min(24, V)``; q solved
               from ``P*(4q + 16 + 3v) + 4q (rewards) + 6 (TextGrad) + 2qP (seed writer)``. Without a
               number, TRPrompt runs ``auto="light"`` (and in ``--budget-calls trprompt`` mode its measured
               calls set N for the others). Once q reaches T, the iterations grow (<= 5).
trprompt_      TRPrompt sized as ``trprompt``, compiled on the program another contender produced (its demos
stacked        and instructions kept) instead of the plain student: the *stacked* contender. Which program
               is the comparison's choice (``compare_optimizers``: the best other contender on the dev set).
=============  ==========================================================================================

Example:
    >>> ctx = PlanInput(num_predictors=1, train_size=200, dev_size=50, budget=600)
    >>> plan_contender("copro", ctx).settings
    {'breadth': 6, 'depth': 2, 'train_size': 49}
    >>> plan_contender("gepa", ctx).settings["max_metric_calls"]
    514
    >>> plan_contender("zeroshot", ctx).predicted_calls
    0
    >>> native = PlanInput(num_predictors=1, train_size=200, dev_size=50, budget=None, cap=700)
    >>> plan_contender("mipro", native).settings["auto"], plan_contender("simba", native).settings["max_steps"]
    ('light', 2)
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import dspy

logger = logging.getLogger(__name__)

__all__ = ["CONTENDERS", "TRPROMPT_CONTENDERS", "CompileInput", "Plan", "PlanInput", "compile_contender", "plan_contender"]

#: Contenders in report order.
CONTENDERS: tuple[str, ...] = ("zeroshot", "labeled", "bootstrap", "copro", "mipro", "simba", "gepa", "trprompt",
                                "trprompt_stacked")
#: Contenders that compile TRPrompt (the rest are the "other" optimizers a stacked TRPrompt can build on).
TRPROMPT_CONTENDERS = frozenset({"trprompt", "trprompt_stacked"})
#: Contenders whose result cannot depend on the seed (greedy decoding, no training): run once, reused.
DETERMINISTIC = frozenset({"zeroshot"})
LABELS = {"zeroshot": "zero-shot CoT", "labeled": "LabeledFewShot", "bootstrap": "BootstrapFewShot",
          "copro": "COPRO", "mipro": "MIPROv2", "simba": "SIMBA", "gepa": "GEPA", "trprompt": "TRPrompt",
          "trprompt_stacked": "TRPrompt stacked"}

_MIPRO_BOOTSTRAP_RUNS_PER_SET = 16


@dataclass(frozen=True)
class PlanInput:
    """What a planner needs: program size, data sizes and the call budget (``None``: native presets)."""

    num_predictors: int
    train_size: int
    dev_size: int
    budget: int | None
    demos: int = 4
    #: Native mode only (``budget=None``): a contender whose own preset is predicted to cost more target-LM
    #: calls than this is sized to it instead, like a numeric budget (SIMBA's defaults on 2 CPU cores).
    cap: int | None = None


@dataclass(frozen=True)
class Plan:
    """Settings chosen for one contender, with the calls they are predicted to cost (``None``: unknown)."""

    settings: dict[str, Any]
    predicted_calls: int | None
    note: str = ""


def _runs(ctx: PlanInput) -> int:
    return max(0, (ctx.budget or 0) // ctx.num_predictors)


def _plan_zeroshot(ctx: PlanInput) -> Plan:
    return Plan({}, 0, "no optimization")


def _plan_labeled(ctx: PlanInput) -> Plan:
    return Plan({"k": ctx.demos}, 0, "labels only, no LM calls")


def _plan_bootstrap(ctx: PlanInput) -> Plan:
    n = ctx.train_size if ctx.budget is None else max(1, min(ctx.train_size, _runs(ctx)))
    return Plan({"max_bootstrapped_demos": 4, "max_labeled_demos": ctx.demos, "train_size": n},
                ctx.num_predictors * n, "upper bound; stops after 4 successful traces")


def copro_calls(p: int, n: int, breadth: int, depth: int) -> int:
    """Predicted target-model calls of COPRO (program runs times ``p`` plus proposals)."""
    evals = breadth * depth if p == 1 else p * breadth * depth * (depth + 1) // 2
    return p * n * evals + p * (breadth - 1) + (depth - 1) * p * breadth


def _plan_copro(ctx: PlanInput) -> Plan:
    if ctx.budget is None:
        n = ctx.train_size
        return Plan({"breadth": 10, "depth": 3, "train_size": n}, copro_calls(ctx.num_predictors, n, 10, 3),
                    "DSPy defaults")
    p, depth = ctx.num_predictors, 2
    for breadth in (6, 5, 4, 3, 2):
        per_example = copro_calls(p, 1, breadth, depth) - copro_calls(p, 0, breadth, depth)
        n = min(ctx.train_size, (ctx.budget - copro_calls(p, 0, breadth, depth)) // per_example)
        if n >= 8 or breadth == 2:
            n = max(1, n)
            while n == ctx.train_size and depth < 5 and copro_calls(p, n, breadth, depth + 1) <= ctx.budget:
                depth += 1  # the trainset caps n: spend the rest on deeper search
            return Plan({"breadth": breadth, "depth": depth, "train_size": n}, copro_calls(p, n, breadth, depth))
    raise AssertionError("unreachable")


def mipro_calls(p: int, train: int, c: int, t: int, v: int) -> int:
    """Predicted target-model calls of MIPROv2 (bootstrap + trials, plus proposer calls)."""
    bootstrap = (c - 2) * min(train, _MIPRO_BOOTSTRAP_RUNS_PER_SET)
    trials = (t + 1) * v if v <= 50 else 35 * t + v * (t // 5 + 2)
    proposer = math.ceil(train / 10) + 2 + p * (c + 2)
    return p * (bootstrap + trials) + proposer


def _mipro_light_trials(p: int, c: int) -> int:
    return int(max(2 * (2 * p) * math.log2(c), 1.5 * c))  # MIPROv2._set_num_trials_from_num_candidates


def _plan_mipro(ctx: PlanInput) -> Plan:
    p = ctx.num_predictors
    if ctx.budget is None:
        v = min(100, ctx.dev_size)
        return Plan({"auto": "light", "val_size": v}, mipro_calls(p, ctx.train_size, 6, _mipro_light_trials(p, 6), v),
                    "auto='light'")
    for c in (6, 5, 4, 3):
        for t in range(_mipro_light_trials(p, c), 2, -1):
            fixed = mipro_calls(p, ctx.train_size, c, t, 0)
            v = min(ctx.dev_size, 50, (ctx.budget - fixed) // (p * (t + 1)))
            if v < 5:
                continue
            if v == 50 and ctx.dev_size > 50:  # budget left: minibatch mode on the largest valset that fits
                bigger = [w for w in range(51, ctx.dev_size + 1)
                          if mipro_calls(p, ctx.train_size, c, t, w) <= ctx.budget]
                v = bigger[-1] if bigger else 50
            while (v == ctx.dev_size or v > 50) and t < 60 and mipro_calls(p, ctx.train_size, c, t + 1, v) <= ctx.budget:
                t += 1  # the valset cannot grow: spend the rest on more trials
            settings = {"auto": None, "num_candidates": c, "num_trials": t, "val_size": v,
                        "minibatch": v > 50, "minibatch_size": min(35, v)}
            return Plan(settings, mipro_calls(p, ctx.train_size, c, t, v))
    settings = {"auto": None, "num_candidates": 3, "num_trials": 3, "val_size": min(5, ctx.dev_size),
                "minibatch": False, "minibatch_size": min(35, ctx.dev_size)}
    return Plan(settings, mipro_calls(p, ctx.train_size, 3, 3, settings["val_size"]), "smallest MIPROv2 run; over budget")


def simba_calls(p: int, n: int, bsize: int, steps: int, candidates: int = 6) -> int:
    """Predicted target-model calls of SIMBA (sampling + candidate evaluation + final evaluation)."""
    return p * (steps * bsize * (2 * candidates + 1) + (candidates + 1) * n) + steps * candidates // 2


def _plan_simba(ctx: PlanInput) -> Plan:
    p = ctx.num_predictors
    if ctx.budget is None:
        b = min(32, ctx.train_size)
        return Plan({"bsize": b, "num_candidates": 6, "max_steps": 8, "train_size": ctx.train_size},
                    simba_calls(p, ctx.train_size, b, 8), "DSPy defaults (bsize capped at the trainset)")
    for b in (32, 16, 8, 4):
        if b > ctx.train_size:
            continue
        n = min(ctx.train_size, 2 * b)
        per_step = simba_calls(p, n, b, 1) - simba_calls(p, n, b, 0)
        steps = min(20, (ctx.budget - simba_calls(p, n, b, 0)) // per_step)
        if steps >= 2:
            return Plan({"bsize": b, "num_candidates": 6, "max_steps": steps, "train_size": n},
                        simba_calls(p, n, b, steps))
    b = min(4, ctx.train_size)
    return Plan({"bsize": b, "num_candidates": 6, "max_steps": 1, "train_size": b},
                simba_calls(p, b, b, 1), "smallest SIMBA run; over budget")


def gepa_light_metric_calls(p: int, v: int, n: int = 6) -> int:
    """GEPA's own ``auto`` sizing (``GEPA.auto_budget``): metric calls for ``p`` predictors and ``v`` val examples."""
    trials = int(max(2 * (p * 2) * math.log2(n), 1.5 * n))
    return v + n * 5 + trials * 35 + ((trials + 1) // 5 + 1 + (1 if trials < 5 else 0)) * v


def _plan_gepa(ctx: PlanInput) -> Plan:
    if ctx.budget is None:
        m = gepa_light_metric_calls(ctx.num_predictors, ctx.dev_size)
        return Plan({"auto": "light", "val_size": ctx.dev_size}, ctx.num_predictors * m + m // 6, "auto='light'")
    m = max(1, int(ctx.budget / (ctx.num_predictors + 1 / 6)))
    v = min(ctx.dev_size, max(5, m // 4))
    return Plan({"max_metric_calls": m, "val_size": v}, ctx.num_predictors * m + m // 6)


def trprompt_calls(p: int, q: int, v: int, *, k: int = 2, m: int = 2, tg_steps: int = 1, tg_batch: int = 4,
                   seed_writer: bool = True) -> int:
    """Predicted target-model calls of TRPrompt (program runs, rewards, TextGrad, seed instructions)."""
    runs = k * q * m + k * tg_steps * tg_batch * 2 + (k + 1) * v
    return p * runs + k * q * m + 3 * k * tg_steps + (q * m * p if seed_writer else 0)


def _plan_trprompt(ctx: PlanInput) -> Plan:
    from trprompt_dspy.config import AUTO_BUDGETS

    light = AUTO_BUDGETS["light"]
    p = ctx.num_predictors
    if ctx.budget is None:
        v = min(light["val_size"], ctx.dev_size)
        return Plan({"auto": "light"}, trprompt_calls(p, light["queries_per_iteration"], v), "auto='light'")
    v = min(light["val_size"], ctx.dev_size)
    while True:
        per_q = trprompt_calls(p, 1, v) - trprompt_calls(p, 0, v)
        q = (ctx.budget - trprompt_calls(p, 0, v)) // per_q
        if q >= 2 or v <= 4:
            break
        v = max(4, v // 2)
    q, k = max(1, min(q, ctx.train_size)), 2
    while q == ctx.train_size and k < 5 and trprompt_calls(p, q, v, k=k + 1) <= ctx.budget:
        k += 1  # every training query is used: spend the rest on more iterations
    if q == ctx.train_size and k < 5:  # one more iteration on fewer queries each, if that keeps most of them
        fit = max((q2 for q2 in range(1, q + 1) if trprompt_calls(p, q2, v, k=k + 1) <= ctx.budget), default=0)
        if fit >= 0.75 * q:
            q, k = fit, k + 1
    settings = {"num_iterations": k, "queries_per_iteration": q, "prompts_per_query": 2, "textgrad_steps": 1,
                "textgrad_batch_size": 4, "val_size": v}
    return Plan(settings, trprompt_calls(p, q, v, k=k))


_PLANNERS: dict[str, Callable[[PlanInput], Plan]] = {
    "zeroshot": _plan_zeroshot, "labeled": _plan_labeled, "bootstrap": _plan_bootstrap, "copro": _plan_copro,
    "mipro": _plan_mipro, "simba": _plan_simba, "gepa": _plan_gepa, "trprompt": _plan_trprompt,
    "trprompt_stacked": _plan_trprompt,
}


def plan_contender(name: str, ctx: PlanInput) -> Plan:
    """Choose ``name``'s settings for ``ctx`` (see the module table).

    Raises:
        ValueError: Unknown contender, or a non-positive budget / program size.
    """
    if name not in _PLANNERS:
        raise ValueError(f"Unknown optimizer {name!r}; choose from: {', '.join(CONTENDERS)}.")
    if ctx.num_predictors < 1:
        raise ValueError(f"The program has no predictors (num_predictors={ctx.num_predictors}).")
    if ctx.budget is not None and ctx.budget < 1:
        raise ValueError(f"budget must be a positive number of target-LM calls; got {ctx.budget!r}.")
    if ctx.cap is not None and ctx.cap < 1:
        raise ValueError(f"cap must be a positive number of target-LM calls; got {ctx.cap!r}.")
    plan = _PLANNERS[name](ctx)
    if ctx.budget is None and ctx.cap is not None and (plan.predicted_calls or 0) > ctx.cap:
        native = plan.predicted_calls
        capped = _PLANNERS[name](replace(ctx, budget=ctx.cap))
        return Plan(capped.settings, capped.predicted_calls,
                    f"native preset predicts {native} calls, over the cap of {ctx.cap}: sized to the cap")
    if ctx.budget is not None and (plan.predicted_calls or 0) > ctx.budget and "over budget" not in plan.note:
        plan = Plan(plan.settings, plan.predicted_calls, f"smallest {name} run; over budget")
    return plan


# ---------------------------------------------------------------------------------------------------
# Compiling
# ---------------------------------------------------------------------------------------------------


@dataclass
class CompileInput:
    """Everything one compile needs. ``target``/``aux`` are counting wrappers around the target model."""

    target: dspy.BaseLM
    aux: dspy.BaseLM
    metric: Callable[..., Any]
    feedback_metric: Callable[..., Any]
    trainset: list[dspy.Example]
    devset: list[dspy.Example]
    seed: int
    num_threads: int
    work_dir: Path
    prompt_model: Any = "smollm2-135m-instruct"  # preset name or a PromptModel instance
    seed_with_target: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    #: ``trprompt_stacked`` only: the other contender's compiled program TRPrompt starts from.
    base_program: dspy.Module | None = None


def _shuffled(items: list[Any], seed: int) -> list[Any]:
    out = list(items)
    random.Random(seed).shuffle(out)
    return out


def _dev(ci: CompileInput, size: int) -> list[dspy.Example]:
    return ci.devset[: max(1, min(size, len(ci.devset)))]


def compile_contender(name: str, plan: Plan, student: dspy.Module, ci: CompileInput) -> dspy.Module:
    """Compile ``student`` with contender ``name`` and ``plan``'s settings; the student's LM is ``ci.target``.

    The trainset order is shuffled with ``ci.seed`` for every contender, so contenders without a seed
    argument (LabeledFewShot, BootstrapFewShot, COPRO) still vary with the seed.
    """
    s = plan.settings
    train = _shuffled(ci.trainset, ci.seed)
    with dspy.context(lm=ci.target):
        if name == "zeroshot":
            return student
        if name == "labeled":
            return dspy.LabeledFewShot(k=s["k"]).compile(student, trainset=train)
        if name == "bootstrap":
            opt = dspy.BootstrapFewShot(metric=ci.metric, max_bootstrapped_demos=s["max_bootstrapped_demos"],
                                        max_labeled_demos=s["max_labeled_demos"], max_rounds=1)
            return opt.compile(student, trainset=train[: s["train_size"]])
        if name == "copro":
            opt = dspy.COPRO(prompt_model=ci.aux, metric=ci.metric, breadth=s["breadth"], depth=s["depth"],
                             init_temperature=float(ci.extra.get("copro_temperature", 1.4)))
            # A failed program call scores 0 (as in every other contender) instead of aborting COPRO's whole
            # evaluation after dspy's default 10 errors (a 0.5B target breaks the output format that often).
            with dspy.context(max_errors=s["train_size"] + 1):  # COPRO's Evaluate inherits it
                return opt.compile(student, trainset=train[: s["train_size"]],
                                   eval_kwargs={"num_threads": ci.num_threads, "display_progress": False})
        if name == "mipro":
            opt = dspy.MIPROv2(metric=ci.metric, prompt_model=ci.aux, task_model=ci.target, auto=s["auto"],
                               num_candidates=s.get("num_candidates"), max_bootstrapped_demos=4, max_labeled_demos=4,
                               num_threads=ci.num_threads, seed=ci.seed, verbose=False, track_stats=False)
            kwargs: dict[str, Any] = {}
            if s["auto"] is None:
                kwargs = {"num_trials": s["num_trials"], "minibatch": s["minibatch"],
                          "minibatch_size": s["minibatch_size"]}
            return opt.compile(student, trainset=train, valset=_dev(ci, s["val_size"]), **kwargs)
        if name == "simba":
            opt = dspy.SIMBA(metric=ci.metric, bsize=s["bsize"], num_candidates=s["num_candidates"],
                             max_steps=s["max_steps"], prompt_model=ci.aux, num_threads=ci.num_threads)
            return opt.compile(student, trainset=train[: s["train_size"]], seed=ci.seed)
        if name == "gepa":
            budget = {"auto": "light"} if "auto" in s else {"max_metric_calls": s["max_metric_calls"]}
            opt = dspy.GEPA(metric=ci.feedback_metric, reflection_lm=ci.aux, num_threads=ci.num_threads,
                            seed=ci.seed, track_stats=False, log_dir=str(ci.work_dir / "gepa"), **budget)
            return opt.compile(student, trainset=train, valset=_dev(ci, s["val_size"]))
        if name in TRPROMPT_CONTENDERS:
            if name == "trprompt_stacked":
                if ci.base_program is None:
                    raise ValueError("trprompt_stacked compiles TRPrompt on another contender's program: pass it "
                                     "as CompileInput(base_program=...).")
                student = ci.base_program
            from trprompt_dspy.optimizer import TRPromptOptimizer

            counts = {k: v for k, v in s.items() if k != "auto"}
            opt = TRPromptOptimizer(metric=ci.feedback_metric, prompt_model=ci.prompt_model, reward_lm=ci.aux,
                                    textgrad_lm=ci.aux, seed_lm=ci.aux if ci.seed_with_target else None,
                                    auto=s.get("auto"), num_threads=ci.num_threads, seed=ci.seed,
                                    log_dir=ci.work_dir / "trprompt", display_progress=False, **counts)
            return opt.compile(student, trainset=train, valset=ci.devset)
    raise ValueError(f"Unknown optimizer {name!r}; choose from: {', '.join(CONTENDERS)}.")
