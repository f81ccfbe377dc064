"""LM faults: classification, retries with backoff, the error budget, and compiles under injected faults.

The fault-injecting LMs are real ``dspy.LM`` objects whose engine raises (timeouts, HTTP 5xx, refused
connections) or answers badly (empty, garbage, unparseable, TextGrad replies without tags) at random; the
prompt model returns empty or over-long instructions or raises. ``num_retries=0`` on the LMs leaves every
retry to TRPrompt's own policy, and ``retry_backoff=0`` keeps the tests instant.
"""

from __future__ import annotations

import json
import random
import threading
from collections import Counter

import dspy
import httpx
import openai
import pytest
from dspy.utils.exceptions import (
    AdapterParseError,
    LMInvalidRequestError,
    LMRateLimitError,
    LMServerError,
    LMTimeoutError,
    LMTransportError,
    LMUnexpectedError,
)

from programs.math import MathCoT
from tests.fakes import ScriptedEngine, arithmetic_responder
from trprompt_dspy import TRPromptOptimizer
from trprompt_dspy.backends.prompt_model.fake import FakePromptModel
from trprompt_dspy.runtime.faults import (
    TRANSIENT_KINDS,
    ErrorBudget,
    ErrorBudgetExceededError,
    RetryPolicy,
    classify_error,
)
from trprompt_dspy.testing import addition_examples

SMALL = dict(num_iterations=2, queries_per_iteration=6, prompts_per_query=2, textgrad_steps=1,
             textgrad_batch_size=3, val_size=4)


def metric(example, pred, trace=None):
    return float(str(getattr(pred, "answer", "")).strip() == str(example.answer))




class HTTP5xx(Exception):
    """Shaped like openai/litellm status errors: a ``status_code`` attribute."""

    def __init__(self, status_code: int = 503) -> None:
        super().__init__(f"Error code: {status_code} - service unavailable")
        self.status_code = status_code


LM_FAULTS = ("timeout", "http_5xx", "connection_refused", "empty", "garbage", "unparseable")
TRANSIENT_FAULTS = {"timeout", "http_5xx", "connection_refused"}


class FaultInjector:
    """Seeded, thread-safe coin flips; counts what it injected."""

    def __init__(self, rate: float, seed: int, kinds: tuple[str, ...] = LM_FAULTS) -> None:
        self.rate, self.kinds = rate, kinds
        self.rng = random.Random(seed)
        self.injected: Counter[str] = Counter()
        self.enabled = True
        self._lock = threading.Lock()

    def draw(self, where: str) -> str | None:
        with self._lock:
            if not self.enabled or self.rng.random() >= self.rate:
                return None
            kind = self.rng.choice(self.kinds)
            self.injected[kind] += 1
            self.injected[f"{where}:{kind}"] += 1
            return kind


def apply_lm_fault(kind: str | None, system: str, user: str) -> str:
    if kind == "timeout":
        raise TimeoutError("The read operation timed out")
    if kind == "http_5xx":
        raise HTTP5xx(503)
    if kind == "connection_refused":
        raise ConnectionRefusedError(111, "Connection refused")
    if kind == "empty":
        return ""
    if kind == "garbage":
        return "%%%% lorem ipsum \x00 <<>>"
    if kind == "unparseable":
        if "<IMPROVED_VARIABLE>" in system or "<IMPROVED_VARIABLE>" in user:
            return "Here is a better text: the response adds carefully."  # TextGrad reply without the tags
        return '{"reasoning": "adding", "answer": '  # truncated structured output
    return arithmetic_responder(system, user)


def faulty_lm(faults: FaultInjector, where: str) -> dspy.LM:
    return dspy.LM(f"local/{where}", engine=ScriptedEngine(lambda s, u: apply_lm_fault(faults.draw(where), s, u)),
                   cache=False, num_retries=0)


class FlakyPromptModel(FakePromptModel):
    """A prompt model that raises, returns empty or over-long instructions at random."""

    KINDS = ("timeout", "connection_refused", "empty", "overlong")

    def __init__(self, faults: FaultInjector) -> None:
        super().__init__(template="Add the numbers carefully for {predictor}, then state the sum.")
        self.faults = faults

    def generate(self, requests, **kwargs):  # noqa: ANN001, ANN003
        kind = self.faults.draw("prompt_model")
        if kind == "timeout":
            raise TimeoutError("prompt model server timed out")
        if kind == "connection_refused":
            raise ConnectionRefusedError(111, "Connection refused")
        out = super().generate(requests, **kwargs)
        if kind == "empty":
            return [["" for _ in row] for row in out]
        if kind == "overlong":
            return [["Think about it. " * 400 for _ in row] for row in out]
        return out


def make_optimizer(tmp_path, pm, reward_lm, textgrad_lm, **kw):
    return TRPromptOptimizer(metric=metric, prompt_model=pm, reward_lm=reward_lm, textgrad_lm=textgrad_lm,
                             log_dir=tmp_path / "log", display_progress=False, retry_backoff=0.0,
                             **{**SMALL, **kw})


# ---------------------------------------------------------------------------------------------- units


@pytest.mark.parametrize("exc,kind", [
    (TimeoutError("read timed out"), "timeout"),
    (LMTimeoutError("t"), "timeout"),
    (httpx.ReadTimeout("slow"), "timeout"),
    (openai.APITimeoutError(request=httpx.Request("POST", "http://x")), "timeout"),
    (HTTP5xx(502), "server_error"),
    (LMServerError("bad", status=503), "server_error"),
    (openai.InternalServerError("x", response=httpx.Response(500, request=httpx.Request("POST", "http://x")),
                                body=None), "server_error"),
    (ConnectionRefusedError(111, "refused"), "connection"),
    (httpx.ConnectError("refused"), "connection"),
    (openai.APIConnectionError(request=httpx.Request("POST", "http://x")), "connection"),
    (LMTransportError("reset"), "connection"),
    (LMRateLimitError("slow down"), "rate_limit"),
    (type("RateLimitError", (Exception,), {})("429"), "rate_limit"),
    (AdapterParseError("ChatAdapter", dspy.Signature("q -> a"), "", "The LM returned an empty or null response."),
     "empty_completion"),
    (AdapterParseError("JSONAdapter", dspy.Signature("q -> a"), "zzz"), "parse_error"),
    (LMInvalidRequestError("This model's maximum context length is 2048 tokens. However, your prompt contains at "
                           "least 2049 input tokens", status=400), "context_window"),  # vLLM's wording
    (LMInvalidRequestError("Unrecognized request argument: foo", status=400), "bad_request"),
    (ValueError("something else"), "other"),
])
def test_classify_error_names_the_kind_through_wrappers(exc, kind):
    assert classify_error(exc) == kind
    wrapped = LMUnexpectedError("engine failed")  # how DSPy wraps an engine's own exception
    wrapped.__cause__ = exc
    assert classify_error(wrapped) == kind
    assert (kind in TRANSIENT_KINDS) == (kind in {"timeout", "server_error", "connection", "rate_limit"})


def test_retry_policy_backs_off_exponentially_with_seeded_jitter_and_stops_on_permanent_errors():
    slept: list[float] = []
    seen: list[tuple[str, int]] = []
    policy = RetryPolicy(max_retries=3, base_delay=1.0, max_delay=3.0, jitter=0.0, sleep=slept.append,
                         on_retry=lambda kind, attempt, exc: seen.append((kind, attempt)))
    errors = iter([TimeoutError(), HTTP5xx(), ConnectionRefusedError()])

    def flaky():
        e = next(errors, None)
        if e is not None:
            raise e
        return "ok"

    assert policy.call(flaky) == "ok"
    assert slept == [1.0, 2.0, 3.0]  # doubling, capped at max_delay
    assert seen == [("timeout", 1), ("server_error", 2), ("connection", 3)]

    calls = Counter()

    def permanent():
        calls["n"] += 1
        raise ValueError("bad request shape")

    with pytest.raises(ValueError):
        policy.call(permanent)
    assert calls["n"] == 1, "a permanent error must not be retried"

    def always_down():
        calls["down"] += 1
        raise ConnectionRefusedError()

    with pytest.raises(ConnectionRefusedError):
        policy.call(always_down)
    assert calls["down"] == 4  # 1 + max_retries

    a = [RetryPolicy(base_delay=1.0, jitter=0.5, seed=7).delay(i) for i in (1, 2, 3)]
    b = [RetryPolicy(base_delay=1.0, jitter=0.5, seed=7).delay(i) for i in (1, 2, 3)]
    assert a == b and a != [1.0, 2.0, 4.0] and all(0.5 * 2 ** i <= d <= 1.5 * 2 ** i for i, d in enumerate(a))
    hinted = LMRateLimitError("slow down")
    hinted.retry_after = 0.25
    assert RetryPolicy(base_delay=5.0).delay(1, hinted) == 0.25


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_retries=-1), "max_retries"), (dict(base_delay=-1), "base_delay"), (dict(jitter=2), "jitter"),
])
def test_retry_policy_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RetryPolicy(**kwargs)


def test_error_budget_rules():
    budget = ErrorBudget(0.25, min_operations=8)
    budget.record("rollouts", total=4, failures=["timeout", "timeout"])  # 50% but too few operations yet
    with pytest.raises(ErrorBudgetExceededError, match=r"3 of 8 operations failed .*max_error_rate=0.25") as info:
        budget.record("validation", total=4, failures={"parse_error": 1}, log_dir="runs/x")
    assert info.value.failures == {"timeout": 2, "parse_error": 1} and "log_dir='runs/x'" in str(info.value)
    with pytest.raises(ErrorBudgetExceededError, match="every one of the 3 operations of the rewards phase"):
        ErrorBudget(1.0).record("rewards", total=3, failures=["connection"] * 3)
    ErrorBudget(1.0).record("TextGrad", total=2, failures=["timeout"] * 2, systemic=False)  # optional step
    with pytest.raises(ErrorBudgetExceededError, match="max_errors=1"):
        ErrorBudget(1.0, max_errors=1).record("rollouts", total=10, failures=["timeout"] * 2)
    for bad in (1.5, -0.1, "half", True):
        with pytest.raises(ValueError, match="max_error_rate"):
            ErrorBudget(bad)


# ---------------------------------------------------------------------------------------------- compiles


def test_twenty_percent_random_faults_complete_and_are_counted_by_kind(tmp_path):
    faults = FaultInjector(0.2, seed=3)
    pm_faults = FaultInjector(0.2, seed=4, kinds=FlakyPromptModel.KINDS)
    target, reward, textgrad = (faulty_lm(faults, w) for w in ("target", "reward", "textgrad"))
    dspy.configure(lm=target)
    pm = FlakyPromptModel(pm_faults)
    opt = make_optimizer(tmp_path, pm, reward, textgrad, max_retries=3)
    compiled = opt.compile(MathCoT(), trainset=addition_examples(14), valset=addition_examples(4, start=50))
    faults.enabled = pm_faults.enabled = False

    res = compiled.detailed_results
    assert len(res.iterations) == 2 and res.best_score is not None
    assert compiled(question="What is 20 + 22?").answer == "42"  # a working program, not exceptions
    f = res.failures
    # every transient fault was retried (or, after max_retries, counted as a final failure of its kind)
    injected_transient = sum(faults.injected[k] for k in TRANSIENT_FAULTS)
    injected_transient += pm_faults.injected["timeout"] + pm_faults.injected["connection_refused"]
    retried = sum(v for k, v in f.items() if k.startswith("retried_"))
    final_transient = sum(v for k, v in f.items()
                          if k.startswith(("program_", "reward_", "textgrad_")) and k.split("_", 1)[1] in TRANSIENT_KINDS)
    assert injected_transient > 5 and retried == injected_transient and final_transient == 0, (f, faults.injected)
    assert {"retried_timeout", "retried_server_error", "retried_connection"} <= set(f), f
    # bad completions are counted by kind (the rollouts that got them failed; nothing crashed)
    assert f.get("program_parse_error", 0) + f.get("program_empty_completion", 0) > 0, f
    assert f["program_error"] == sum(v for k, v in f.items() if k.startswith("program_") and k != "program_error")
    assert f.get("prompt_model_empty_instruction", 0) > 0 and f.get("prompt_model_overlong_instruction", 0) > 0, f
    rollouts = json.loads((tmp_path / "log" / "iter_000" / "rollouts.json").read_text())
    assert all(len(c["instruction"]) <= 1200 for r in rollouts for c in r["instructions"])
    assert {r["error_kind"] for r in rollouts if r["error"]} <= {"parse_error", "empty_completion",
                                                                "prompt_model_error", *TRANSIENT_KINDS}


def test_textgrad_replies_without_tags_are_counted_and_t_star_is_kept(tmp_path):
    def no_tags(system, user):
        if "<IMPROVED_VARIABLE>" in system or "<IMPROVED_VARIABLE>" in user:
            return "A better variable would stress checking the sum."
        return arithmetic_responder(system, user)

    target = faulty_lm(FaultInjector(0.0, 0), "target")
    dspy.configure(lm=target)
    tg = dspy.LM("local/tg", engine=ScriptedEngine(no_tags), cache=False, num_retries=0)
    pm = FakePromptModel(template="Add the numbers carefully for {predictor}, then state the sum.")
    opt = make_optimizer(tmp_path, pm, None, tg)
    res = opt.compile(MathCoT(), trainset=addition_examples(10), valset=addition_examples(4, 50)).detailed_results
    assert res.failures["textgrad_missing_tags"] == 2 and res.t_star_history == (opt.initial_reward,)


def _garbage_reward_lm() -> tuple[dspy.LM, FakePromptModel]:
    """A healthy target, a reward LM whose every reply has no fields, and a fake prompt model."""
    dspy.configure(lm=faulty_lm(FaultInjector(0.0, 0), "target"))
    garbage = dspy.LM("local/reward", engine=ScriptedEngine(lambda s, u: "no fields here"), cache=False,
                      num_retries=0)
    return garbage, FakePromptModel(template="Add the numbers carefully for {predictor}, then state the sum.")


def test_reward_model_garbage_everywhere_stops_with_a_clear_resumable_error(tmp_path):
    garbage, pm = _garbage_reward_lm()
    with pytest.raises(ErrorBudgetExceededError, match=r"textual rewards.*parse_error.*same log_dir to resume"):
        # With the critique alone as the reward (the paper's recipe) there is nothing to train on without R.
        make_optimizer(tmp_path, pm, garbage, None, textual_rewards="critique", abstain=False).compile(
            MathCoT(), trainset=addition_examples(10), valset=addition_examples(4, 50))
    last = json.loads((tmp_path / "log" / "last_error.json").read_text())
    assert last["failures"]["reward_parse_error"] == 12 and "ErrorBudgetExceededError" in last["error"]


def test_reward_model_garbage_everywhere_leaves_the_trace_built_rewards(tmp_path):
    garbage, pm = _garbage_reward_lm()
    compiled = make_optimizer(tmp_path, pm, garbage, None, num_iterations=1).compile(
        MathCoT(), trainset=addition_examples(10), valset=addition_examples(4, 50))
    res = compiled.detailed_results
    assert res.failures["reward_parse_error"] == 12  # every critique failed, counted ...
    assert res.iterations[0].critiques == {"failed": 12}
    examples = pm.train_calls[0][0]  # ... and the prompt model still trained, on the trace-built rewards
    assert examples and all(e.request.reward.startswith("Verdict: the outcome was") for e in examples)


def test_server_down_mid_run_stops_with_resumable_checkpoint_then_resume_finishes(tmp_path):
    state = {"calls": 0, "down": False}
    lock = threading.Lock()

    def server(system, user):
        with lock:
            state["calls"] += 1
            if state["calls"] > 12 and not state["back"]:
                state["down"] = True
        if state["down"]:
            raise ConnectionRefusedError(111, "Connection refused")
        return arithmetic_responder(system, user)

    state["back"] = False
    target = dspy.LM("local/target", engine=ScriptedEngine(server), cache=False, num_retries=0)
    dspy.configure(lm=target)
    pm = FakePromptModel(template="Add the numbers carefully for {predictor}, then state the sum.")
    opt = make_optimizer(tmp_path, pm, None, None, max_retries=1)
    with pytest.raises(ErrorBudgetExceededError, match=r"connection.*log_dir=.*resume") as info:
        opt.compile(MathCoT(), trainset=addition_examples(14), valset=addition_examples(4, 50))
    assert info.value.failures.get("connection", 0) > 0 and info.value.log_dir == str(tmp_path / "log")
    partial = tmp_path / "log" / "iter_000" / "rollouts.partial.jsonl"
    done = [r for r in map(json.loads, partial.read_text().splitlines()) if not r["error"]]
    assert done, "rollouts finished before the outage are checkpointed"

    state.update(down=False, back=True)  # the server is back: re-running compile resumes
    pm2 = FakePromptModel(template="Add the numbers carefully for {predictor}, then state the sum.")
    opt2 = make_optimizer(tmp_path, pm2, None, None, max_retries=1)
    compiled = opt2.compile(MathCoT(), trainset=addition_examples(14), valset=addition_examples(4, 50))
    assert len(compiled.detailed_results.iterations) == 2
    sampled = sum(1 for c in pm2.calls if c.temperature > 0)
    assert sampled == 2 * 6 * 2 - len(done), "completed rollouts must not be redone"


def test_above_the_error_rate_budget_the_compile_stops(tmp_path):
    faults = FaultInjector(0.6, seed=1, kinds=("garbage",))
    dspy.configure(lm=faulty_lm(faults, "target"))
    pm = FakePromptModel(template="Add the numbers carefully for {predictor}, then state the sum.")
    opt = make_optimizer(tmp_path, pm, faulty_lm(FaultInjector(0.0, 0), "reward"), None, max_error_rate=0.3)
    with pytest.raises(ErrorBudgetExceededError, match=r"max_error_rate=0.3|every one of"):
        opt.compile(MathCoT(), trainset=addition_examples(14), valset=addition_examples(4, 50))


def test_textgrad_engine_and_reward_model_retry_transient_failures():
    from trprompt_dspy.backends.textgrad_engine import DSPyTextGradEngine
    from trprompt_dspy.loop.rollouts import Rollout
    from trprompt_dspy.loop.textual_reward import TextualRewardModel

    errors = [ConnectionRefusedError(111, "refused"), HTTP5xx(502)]

    def flaky(system, user):
        if errors:
            raise errors.pop(0)
        return arithmetic_responder(system, user)

    lm = dspy.LM("local/flaky", engine=ScriptedEngine(flaky), cache=False, num_retries=0)
    seen: list[str] = []
    retry = RetryPolicy(max_retries=2, base_delay=0.0, on_retry=lambda kind, a, e: seen.append(kind))
    assert "checking the arithmetic" in DSPyTextGradEngine(lm, retry=retry)("critique this", system_prompt="s")
    assert seen == ["connection", "server_error"]

    errors[:] = [TimeoutError("slow")]
    r = Rollout(0, 0, inputs={"question": "1 + 2?"}, gold={"answer": "3"}, outputs={"answer": "3"}, score=1.0)
    TextualRewardModel(lm).score_rollouts([r], retry=retry)
    assert r.reward and r.reward_error is None and seen[-1] == "timeout"
    errors[:] = [TimeoutError("slow")] * 3
    TextualRewardModel(lm).score_rollouts([r], retry=retry)
    assert r.reward is None and r.reward_error_kind == "timeout"
