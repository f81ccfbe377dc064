"""The demo pipeline and its report, with a scripted target and the fake prompt model (no real models)."""

from __future__ import annotations

import json

import pytest

from tests.fakes import arithmetic_responder, scripted_lm
from trprompt_dspy.apps import demo as demo_mod
from trprompt_dspy.apps.report import mcnemar_p, paired_outcomes, render_report, write_plots
from trprompt_dspy.backends.prompt_model.fake import FakePromptModel

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _gold_with_instruction(system: str, user: str) -> str:
    """A scripted target that gives the gold answer only when the prompt model's instruction is in its prompt,
    so the compiled program beats the student and no-regression selection returns the trained iteration."""
    from trprompt_dspy.tasks.datasets import load_dataset, load_fixed_split

    reply = arithmetic_responder(system, user)
    if "[[ ## answer ## ]]" not in reply or "give the number" not in system:
        return reply
    examples = [*load_dataset("gsm8k", "train", source="bundled", limit=8),
                *load_fixed_split("gsm8k", "dev", source="bundled", limit=4)]
    answer = next((ex.answer for ex in examples if ex.question.strip() in user), None)
    if answer is None:
        return reply
    head, _, _ = reply.partition("[[ ## answer ## ]]")
    return f"{head}[[ ## answer ## ]]\n{answer}\n\n[[ ## completed ## ]]"


@pytest.fixture
def fake_stack(monkeypatch):
    """ModelStack with a scripted target and the fake prompt model instead of servers (its checks stay real)."""
    from trprompt_dspy.backends.stack import ModelStack

    events: list[str] = []

    def start(self):
        if self.target_lm is None:
            events.append(f"start backend={self.backend} pm={self.need_prompt_model}")
            self.target_lm = scripted_lm(_gold_with_instruction)
            self.prompt_model = (FakePromptModel(template="Work through {predictor} step by step and give the number.")
                                 if self.need_prompt_model else None)
            self.servers = {"target": {"model": "scripted", "base_url": "http://x", "startup_seconds": 0}}
        return self

    def close(self):
        if self.target_lm is not None:
            events.append("stop")
            self.target_lm = None

    monkeypatch.setattr(ModelStack, "start", start)
    monkeypatch.setattr(ModelStack, "close", close)
    return events


def test_demo_runs_the_whole_pipeline_and_writes_a_report(tmp_path, fake_stack):
    # significance_level=None: the 2 held-out validation examples of 8 can pass no sign test, and this test
    # is about the pipeline and its report on a trained program
    res = demo_mod.run_demo(backend="vllm", train_size=8, eval_size=4, runs_dir=tmp_path, auto="light",
                            significance_level=None)
    assert fake_stack == ["start backend=vllm pm=True", "stop"]  # servers stopped after the run
    out = tmp_path / next(p.name for p in tmp_path.iterdir())
    report = (out / "report.md").read_text()
    # the report leads with the decision: the trained iteration was returned, and why
    assert report.startswith("# TRPrompt run report\n\n**Decision:** compile returned iteration ")
    assert res["decision"][0].startswith("Decision: compile returned iteration ")
    assert any(line.startswith("Validation set, 2 questions:") for line in res["decision"])
    assert "| zero-shot CoT (baseline) |" in report and "| TRPrompt-compiled |" in report
    assert "Paired:" in report and "McNemar" in report
    for png in ("validation.png", "scores.png", "instruction_length.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
        assert f"]({png})" in report
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["baseline_rows"]) == 4 and len(saved["compiled_rows"]) == 4
    assert {"start_models", "baseline_eval", "compile", "compiled_eval", "stop_models", "total"} <= set(res["timings_s"])
    assert any(k.startswith("compile.iter0.") for k in res["timings_s"])
    # the compiled program wrote per-query instructions, and the report shows them
    assert all(r["instruction"] for r in saved["compiled_rows"])
    assert "instruction: 'Work through" in report
    assert (out / "compiled" / "trprompt.json").exists()
    # program runs and their failures, per phase: held-out evaluations in results, the compile's in its stats
    assert set(saved["errors_by_phase"]) == {"held-out evaluation (baseline)", "held-out evaluation (compiled)"}
    assert saved["errors_by_phase"]["held-out evaluation (baseline)"]["runs"] == 4
    assert {"baseline evaluation", "rollouts", "validation"} <= set(saved["compile_stats"]["errors_by_phase"])
    assert "## Failed program runs" in report


def test_demo_that_returns_the_student_says_why_and_shows_what_was_rejected(tmp_path, fake_stack, capsys):
    # the default significance_level: 2 validation examples can pass no sign test, so the student is returned
    from trprompt_dspy.apps import cli

    args = cli.build_parser().parse_args(["demo", "--backend", "vllm", "--train-size", "8", "--eval-size", "4",
                                          "--runs-dir", str(tmp_path), "--auto", "light"])
    assert cli._cmd_demo(args) == 0
    out = tmp_path / next(p.name for p in tmp_path.iterdir())
    report = (out / "report.md").read_text()
    saved = json.loads((out / "results.json").read_text())
    assert saved["compile_stats"]["selected"] == "student"
    decision = saved["decision"]
    assert decision[0].startswith("Decision: compile returned your program unchanged (the student), because the "
                                  "lead of its best trained iteration")
    assert "won 2 questions and lost 0 (one-sided sign test p = 0.25; an iteration is returned only if it scores " \
           "higher and p < 0.05)" in decision[1]
    assert any("would have written (rejected)" in line for line in decision)
    assert decision[-1].startswith("What to try next: a larger validation set")
    assert report.startswith("# TRPrompt run report\n\n**Decision:** compile returned your program unchanged")
    assert "| TRPrompt-compiled (compile returned your program unchanged) |" in report
    # no "instruction: None" rows: the rejected iteration's own instructions, labelled as rejected
    assert "instruction: None" not in report and "Example per-query instructions" not in report
    assert "instruction (rejected): 'Work through" in report
    # the console ends with the decision, after the report and its path
    printed = capsys.readouterr().out.rstrip().splitlines()
    assert printed[-len(decision):] == decision


def test_demo_baseline_only_skips_the_prompt_model(tmp_path, fake_stack):
    res = demo_mod.run_demo(backend="hf", baseline_only=True, eval_size=3, runs_dir=tmp_path)
    assert fake_stack == ["start backend=hf pm=False", "stop"]
    assert "compiled_accuracy" not in res and len(res["baseline_rows"]) == 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(backend="tgi"), "backend must be one of"),
    (dict(backend="vllm", api_base="http://127.0.0.1:9/v1"), "only used with backend='api'"),
])
def test_demo_rejects_bad_options_before_starting_anything(tmp_path, fake_stack, kwargs, match):
    with pytest.raises(ValueError, match=match):
        demo_mod.run_demo(runs_dir=tmp_path, **kwargs)
    assert fake_stack == []


def test_api_backend_needs_a_url(tmp_path, fake_stack):
    with pytest.raises(ValueError, match="needs api_base"):
        demo_mod.run_demo(backend="api", runs_dir=tmp_path)
    assert fake_stack == []


def test_paired_outcomes_and_mcnemar():
    before = [{"correct": c} for c in (True, True, False, False, False)]
    after = [{"correct": c} for c in (True, False, True, True, False)]
    assert paired_outcomes(before, after) == {"both_right": 1, "fixed": 2, "broken": 1, "both_wrong": 1}
    with pytest.raises(ValueError, match="same examples"):
        paired_outcomes(before, after[:2])
    assert mcnemar_p(2, 1) == 1.0
    assert mcnemar_p(10, 0) == pytest.approx(2 / 1024)


def test_report_without_compile_or_matplotlib(tmp_path, monkeypatch):
    res = {"program": "p:M", "target": "t", "eval_size": 2, "baseline_accuracy": 50.0,
           "baseline_rows": [{"question": "q", "gold": "1", "answer": "1", "correct": True},
                             {"question": "q2", "gold": "2", "answer": None, "correct": False}]}
    text = render_report(res)
    assert "| zero-shot CoT (baseline) | 50.0% | 1/2 |" in text and "TRPrompt-compiled" not in text
    assert [p.name for p in write_plots(res, tmp_path)] == ["scores.png"]
    import builtins

    real_import = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    assert write_plots(res, tmp_path / "none") == []
