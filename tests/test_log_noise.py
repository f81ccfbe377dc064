"""Dependencies' log noise: textgrad's logger is quietened on import, DSPy's truncation warnings become one line.

See ``trprompt_dspy/runtime/log_noise.py``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import dspy
import pytest

from programs.math import MathCoT
from trprompt_dspy import TRPromptOptimizer
from trprompt_dspy.runtime import log_noise
from trprompt_dspy.runtime.log_noise import RoleLimit, role_limits, summarize_truncations
from trprompt_dspy.runtime.usage import UsageMeter
from trprompt_dspy.testing import (
    FakePromptModel,
    ScriptedEngine,
    addition_examples,
    arithmetic_responder,
    scripted_lm,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DSPY_MESSAGE = "LM response was truncated; increase max_tokens or inspect history."
SUMMARY_LOGGER = "trprompt_dspy.runtime.log_noise"


class TruncatingEngine(ScriptedEngine):
    """A scripted engine whose every reply is marked as cut at max_tokens (``finish_reason="length"``)."""

    def complete(self, request):
        from dspy.lm15 import Response

        r = super().complete(request)
        return Response(id=None, model=r.model, message=r.message, finish_reason="length", usage=r.usage)


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def dspy_records():
    """Records that reach the handlers of DSPy's ``dspy.clients.lm`` logger (what DSPy would print)."""
    handler = Capture()
    lm_logger = logging.getLogger(log_noise.TRUNCATION_LOGGER)
    lm_logger.addHandler(handler)
    yield handler.records
    lm_logger.removeHandler(handler)


def summaries(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == SUMMARY_LOGGER and r.levelno == logging.WARNING]


def truncations(records) -> list[logging.LogRecord]:
    return [r for r in records if str(r.msg).startswith("LM response was truncated")]


def filter_installed() -> bool:
    return log_noise._DISPATCH in logging.getLogger(log_noise.TRUNCATION_LOGGER).filters


# -- the filter and its summary -------------------------------------------------------------------------------
def test_truncation_records_are_dropped_counted_per_role_and_summarized_once(caplog, dspy_records):
    caplog.set_level(logging.WARNING, logger=SUMMARY_LOGGER)
    meter = UsageMeter()
    dspy_lm = logging.getLogger(log_noise.TRUNCATION_LOGGER)
    calls = {"reward": 0, "target": 0}
    limits = {"reward": RoleLimit(256, "pass reward_lm=dspy.LM(..., max_tokens=N)", "Rewards are still used.")}
    with summarize_truncations(limits, calls=lambda: dict(calls)) as summary:
        assert filter_installed()
        calls.update(reward=10, target=4)
        with meter.attribute("reward"):
            for _ in range(3):
                dspy_lm.warning(DSPY_MESSAGE)
        with meter.attribute("target"):
            dspy_lm.warning("LM response was truncated due to exceeding max_tokens=64. ...")  # the LiteLLM wording
        dspy_lm.warning("some other DSPy warning")
        assert summary.counts == {"reward": 3, "target": 1}
        lines = summary.flush("iteration 0")
        assert summary.counts == {}
    assert not filter_installed()
    assert [r.getMessage() for r in dspy_records] == ["some other DSPy warning"]  # only truncations are dropped
    assert summaries(caplog) == lines and len(lines) == 2  # one line per role, none at the exit (nothing left)
    reward = next(line for line in lines if line.startswith("reward LM:"))
    assert "3 of 10 replies cut off at max_tokens=256 during iteration 0" in reward
    assert "Rewards are still used." in reward and "reward_lm=dspy.LM(..., max_tokens=N)" in reward
    target = next(line for line in lines if line.startswith("target LM:"))
    assert "1 of 4 replies" in target and "its max_tokens" in target and "raise max_tokens" in target


def test_the_filter_is_removed_on_an_exception_and_the_rest_is_reported(caplog, dspy_records):
    caplog.set_level(logging.WARNING, logger=SUMMARY_LOGGER)
    with pytest.raises(RuntimeError, match="boom"), summarize_truncations({}):
        logging.getLogger(log_noise.TRUNCATION_LOGGER).warning(DSPY_MESSAGE)  # no role: "unattributed"
        raise RuntimeError("boom")
    assert not filter_installed()
    assert not truncations(dspy_records)
    (line,) = summaries(caplog)
    assert line.startswith("LM (no role): 1 reply cut off") and "during the compile" in line
    logging.getLogger(log_noise.TRUNCATION_LOGGER).warning(DSPY_MESSAGE)  # outside a compile: DSPy's own line
    assert len(truncations(dspy_records)) == 1


def test_nested_summaries_each_count_their_own_calls():
    dspy_lm = logging.getLogger(log_noise.TRUNCATION_LOGGER)
    with summarize_truncations() as outer:
        with summarize_truncations() as inner:
            dspy_lm.warning(DSPY_MESSAGE)
            assert inner.counts == {"unattributed": 1} and outer.counts == {}
        assert filter_installed()  # the outer block still runs
        dspy_lm.warning(DSPY_MESSAGE)
        dspy_lm.warning(DSPY_MESSAGE)
        assert outer.counts == {"unattributed": 2}
    assert not filter_installed()


def test_role_limits_name_the_setting_of_each_role():
    target = dspy.LM("openai/t", max_tokens=512)
    reward = dspy.LM("openai/r", max_tokens=128)
    limits = role_limits(target_lms=[target], reward_lm=target, textgrad_max_tokens=384)
    assert limits["target"].max_tokens == 512 and "your program's dspy.LM" in limits["target"].knob
    assert limits["reward"].max_tokens == 512 and "pass reward_lm=" in limits["reward"].knob  # the target doubles
    assert limits["textgrad"].max_tokens == 384 and "textgrad_lm=dspy.LM(..., max_tokens=N)" in limits["textgrad"].knob
    assert "seed_writer" not in limits
    limits = role_limits(target_lms=[target, dspy.LM("openai/t2")], reward_lm=reward, textgrad_max_tokens=384,
                         seed_lm=reward, instruction_tokens=48)
    assert limits["target"].max_tokens == (512, None)
    assert limits["reward"].max_tokens == 128 and "raise max_tokens of reward_lm" in limits["reward"].knob
    assert limits["seed_writer"] == RoleLimit(48, limits["seed_writer"].knob, limits["seed_writer"].effect)
    assert "max_instruction_tokens" in limits["seed_writer"].knob


# -- wired into compile -----------------------------------------------------------------------------------------
def _compile(tmp_path, reward_lm, textgrad_lm=None, **kw):
    dspy.configure(lm=scripted_lm(arithmetic_responder, "target"))
    opt = TRPromptOptimizer(
        metric=lambda ex, p, trace=None: float(str(p.answer).strip() == ex.answer),
        prompt_model=FakePromptModel(template="Add the numbers carefully for {predictor}, then state the sum."),
        reward_lm=reward_lm, textgrad_lm=textgrad_lm, log_dir=tmp_path / "log", display_progress=False,
        num_iterations=2, queries_per_iteration=3, prompts_per_query=1, textgrad_steps=1, textgrad_batch_size=2,
        val_size=2, significance_level=None, **kw)
    return opt.compile(MathCoT(), trainset=addition_examples(6), valset=addition_examples(2, start=40))


def test_compile_reports_truncated_replies_once_per_role_and_iteration(tmp_path, caplog, dspy_records):
    caplog.set_level(logging.WARNING, logger=SUMMARY_LOGGER)
    reward = dspy.LM("local/reward", engine=TruncatingEngine(arithmetic_responder), cache=False, max_tokens=256)
    tg = dspy.LM("local/tg", engine=TruncatingEngine(arithmetic_responder), cache=False)
    compiled = _compile(tmp_path, reward, tg)
    assert not truncations(dspy_records)  # DSPy printed none of its per-reply warnings
    assert not filter_installed()
    lines = summaries(caplog)
    reward_lines = [line for line in lines if line.startswith("reward LM:")]
    assert [line.split(" during ")[1].split(".")[0] for line in reward_lines] == ["iteration 0", "iteration 1"]
    calls = compiled.detailed_results.lm_calls["reward"]
    assert sum(int(line.split()[2]) for line in reward_lines) == calls  # every reward reply was cut, each counted
    assert all(" of 3 replies cut off at max_tokens=256" in line for line in reward_lines)
    assert all("raise max_tokens of reward_lm" in line and "still used" in line for line in reward_lines)
    tg_lines = [line for line in lines if line.startswith("TextGrad LM:")]
    assert len(tg_lines) == 2 and all("max_tokens=384" in line and "TEXTGRAD_MAX_TOKENS" in line for line in tg_lines)
    assert not [line for line in lines if line.startswith(("target LM:", "LM (no role)"))]  # target replies were whole


def test_textgrad_calls_take_the_cap_of_the_textgrad_lm(tmp_path, caplog, dspy_records):
    """A textgrad_lm built with max_tokens=N is asked for N tokens per TextGrad call (not the 384 default)."""
    caplog.set_level(logging.WARNING, logger=SUMMARY_LOGGER)
    asked = []

    class Recording(TruncatingEngine):
        def complete(self, request):
            asked.append(request.config.max_tokens if request.config else None)
            return super().complete(request)

    tg = dspy.LM("local/tg", engine=Recording(arithmetic_responder), cache=False, max_tokens=900)
    _compile(tmp_path, scripted_lm(arithmetic_responder, "reward"), tg)
    assert asked and set(asked) == {900}
    tg_lines = [line for line in summaries(caplog) if line.startswith("TextGrad LM:")]
    assert tg_lines and all("max_tokens=900" in line for line in tg_lines)


def test_a_failing_compile_removes_the_filter_and_reports_its_truncations(tmp_path, caplog, dspy_records):
    from trprompt_dspy.runtime.faults import CompileError

    caplog.set_level(logging.WARNING, logger=SUMMARY_LOGGER)
    dspy.configure(lm=dspy.LM("local/target", engine=TruncatingEngine(lambda system, user: "cut mid-sen"),
                              cache=False, max_tokens=8))
    opt = TRPromptOptimizer(metric=lambda ex, p, trace=None: 1.0, prompt_model=FakePromptModel(),
                            log_dir=tmp_path / "log", display_progress=False, num_iterations=1, max_retries=0)
    with pytest.raises(CompileError, match="student program failed"):  # the smoke test: no reply parses
        opt.compile(MathCoT(), trainset=addition_examples(6), valset=addition_examples(2, start=40))
    assert not filter_installed()
    assert not truncations(dspy_records)
    (line,) = summaries(caplog)
    assert line.startswith("target LM:") and "cut off at max_tokens=8 during the compile" in line
    assert "dspy.LM(..., max_tokens=N)" in line


# -- textgrad's logger ----------------------------------------------------------------------------------------
@pytest.fixture
def textgrad_logger(monkeypatch):
    """The ``textgrad`` logger, as if the library had not quietened it yet; its level is restored afterwards."""
    tg_logger = logging.getLogger(log_noise.TEXTGRAD_LOGGER)
    monkeypatch.setattr(log_noise, "_textgrad_quieted", False)
    level = tg_logger.level
    yield tg_logger
    tg_logger.setLevel(level)


def test_textgrads_own_info_level_is_lowered_to_warning(textgrad_logger):
    textgrad_logger.setLevel(logging.INFO)  # what `import textgrad` does
    log_noise.quiet_textgrad(logging.NOTSET)  # the user had set no level before the import
    assert textgrad_logger.level == logging.WARNING
    textgrad_logger.setLevel(logging.INFO)  # the user asks for the records again later: never undone
    log_noise.quiet_textgrad(logging.NOTSET)
    assert textgrad_logger.level == logging.INFO


def test_textgrads_handled_index_error_is_dropped_unless_debugging(textgrad_logger, caplog):
    textgrad_logger.setLevel(logging.INFO)
    log_noise.quiet_textgrad(logging.NOTSET)
    with caplog.at_level(logging.WARNING, logger=log_noise.TEXTGRAD_LOGGER):
        textgrad_logger.error("TextualGradientDescent optimizer response could not be indexed")
        textgrad_logger.error("some other textgrad error")
    def textgrad_records():
        return [r.getMessage() for r in caplog.records if r.name == log_noise.TEXTGRAD_LOGGER]

    assert textgrad_records() == ["some other textgrad error"]
    caplog.clear()
    textgrad_logger.setLevel(logging.DEBUG)
    textgrad_logger.error("TextualGradientDescent optimizer response could not be indexed")
    assert len(textgrad_records()) == 1
    for f in list(textgrad_logger.filters):
        textgrad_logger.removeFilter(f)


def test_a_level_the_user_chose_is_kept(textgrad_logger):
    textgrad_logger.setLevel(logging.INFO)  # textgrad's import overwrote the user's DEBUG
    log_noise.quiet_textgrad(logging.DEBUG)
    assert textgrad_logger.level == logging.DEBUG


def test_textgrad_imported_elsewhere_first(textgrad_logger):
    textgrad_logger.setLevel(logging.ERROR)  # the user imported textgrad and chose ERROR
    log_noise.quiet_textgrad(None)
    assert textgrad_logger.level == logging.ERROR


def test_import_textgrad_quietens_an_already_imported_textgrad(textgrad_logger):
    from trprompt_dspy._lazy import import_textgrad

    textgrad_logger.setLevel(logging.INFO)
    import_textgrad()
    assert textgrad_logger.level == logging.WARNING


_FRESH_IMPORT = """
import logging, os, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(name)s: %(message)s")
if len(sys.argv) > 1:
    logging.getLogger("textgrad").setLevel(int(sys.argv[1]))
from trprompt_dspy._lazy import import_textgrad
tg = import_textgrad()
logging.getLogger("textgrad").info("an op's prompt")
print("LEVEL", logging.getLogger("textgrad").level)
"""


@pytest.mark.parametrize("user_level", [None, logging.DEBUG])
def test_a_fresh_import_of_textgrad_by_the_library(tmp_path, user_level):
    env = {k: v for k, v in os.environ.items() if k != "TEXTGRAD_LOG_DIR"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    args = [] if user_level is None else [str(user_level)]
    out = subprocess.run([sys.executable, "-c", _FRESH_IMPORT, *args], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300, check=True).stdout
    expected = logging.WARNING if user_level is None else user_level
    assert f"LEVEL {expected}" in out
    assert ("INFO textgrad: an op's prompt" in out) == (user_level is not None)  # the console sees INFO only on request
    assert not (tmp_path / "logs").exists()  # textgrad's log file went to a temporary folder, not ./logs
