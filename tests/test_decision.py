"""The decision summary at the end of the demo and the top of its report (apps/decision.py), from files alone."""

from __future__ import annotations

import json

import pytest

from trprompt_dspy.apps.decision import STRONGER_TARGET, Evidence, decision_summary, iteration_examples
from trprompt_dspy.apps.report import render_report
from trprompt_dspy.models.presets import is_preset_name
from trprompt_dspy.results import STUDENT, TRPromptResult


def _log_dir(tmp_path, student, iteration, *, k=1, instructions=None):
    """A run directory with what a compile writes for the decision: baseline.json and iter_XXX/val.json."""
    n = len(student)
    (tmp_path / "baseline.json").write_text(json.dumps({
        "score": sum(student) / n, "scores": student, "inputs": [{"question": f"What is {i} + {i}?"} for i in range(n)]}))
    d = tmp_path / f"iter_{k:03d}"
    d.mkdir()
    instructions = instructions or [f"Double {i} carefully." for i in range(n)]
    (d / "val.json").write_text(json.dumps({"score": sum(iteration) / n, "scores": iteration, "t_star": "t",
                                            "instructions": instructions}))
    return tmp_path


def _stats(log_dir, student, iteration, *, selected, k=1, **extra):
    return {"selected": selected, "best_iteration": k, "baseline_score": sum(student) / len(student),
            "best_score": sum(iteration) / len(iteration), "val_size": len(student), "log_dir": str(log_dir),
            "budget": {"val_size": 50, "max_metric_calls": None}, "selection_p_value": None,
            "iterations": [{"iteration": k, "abstention_rate": 0.2}], **extra}


# 50 questions: the student gets 12 right, iteration 1 gets 11 right; they differ on 9 (iteration won 4, lost 5)
STUDENT_SCORES = [1.0] * 12 + [0.0] * 38
ITER_SCORES = [1.0] * 7 + [0.0] * 5 + [1.0] * 4 + [0.0] * 34


def test_student_returned_when_the_iteration_scored_lower(tmp_path):
    log_dir = _log_dir(tmp_path, STUDENT_SCORES, ITER_SCORES)
    lines = decision_summary(_stats(log_dir, STUDENT_SCORES, ITER_SCORES, selected=STUDENT))
    text = "\n".join(lines)
    assert lines[0].startswith("Decision: compile returned your program unchanged (the student)")
    assert "did not score higher" in lines[0]
    assert ("Validation set, 50 questions: iteration 1 got 11/50 right, your program 12/50 right; iteration 1 won 4 "
            "questions and lost 5 (one-sided sign test p = 0.75; an iteration is returned only if it scores higher "
            "and p < 0.05).") in lines
    assert "Iteration 1 wrote no instruction for 20 % of the validation questions" in text
    # what the rejected iteration wrote: the questions it lost and won first, labelled as rejected
    assert "What iteration 1 would have written (rejected), on 3 validation questions:" in lines
    examples = [line for line in lines if line.startswith("  - ")]
    assert len(examples) == 3
    assert examples[0] == ("  - 'What is 7 + 7?' -> 'Double 7 carefully.' (your program: right, iteration 1: wrong)")
    assert "(your program: wrong, iteration 1: right)" in examples[1]
    # what to try next: a bigger budget and, with 12/50 on its own, a stronger target
    assert lines[-1].startswith("What to try next: a larger budget (auto='medium'")
    assert f"a stronger target that can act on the instructions (e.g. {STRONGER_TARGET}; yours got 12/50 right" in lines[-1]
    assert "a larger validation set" not in lines[-1]  # no lead to confirm
    assert is_preset_name(STRONGER_TARGET)


def test_student_returned_when_the_lead_is_not_significant(tmp_path):
    student, iteration = ITER_SCORES, STUDENT_SCORES  # now the iteration leads 12 to 11: won 5, lost 4
    log_dir = _log_dir(tmp_path, student, iteration)
    lines = decision_summary(_stats(log_dir, student, iteration, selected=STUDENT), target=STRONGER_TARGET)
    assert "too small to rule out chance" in lines[0]
    assert "won 5 questions and lost 4 (one-sided sign test p = 0.5; an iteration is returned only if" in lines[1]
    assert "a larger validation set, so that a real lead can pass the test (val_size=100)" in lines[-1]
    assert STRONGER_TARGET not in lines[-1]  # never suggest the model already in use


def test_iteration_returned(tmp_path):
    student = [0.0] * 40 + [1.0] * 10
    iteration = [1.0] * 10 + [0.0] * 30 + [1.0] * 10  # won 10, lost 0
    log_dir = _log_dir(tmp_path, student, iteration, k=0)
    result = TRPromptResult(iterations=(), best_iteration=0, baseline_score=0.2, best_score=0.4, t_star_history=("t",),
                            lm_calls={}, lm_tokens={}, failures={}, seed=0, log_dir=str(log_dir), budget={},
                            seconds=1.0, selected=0, val_size=50)
    lines = decision_summary(result)  # the result object itself, not only its dict
    assert lines[0].startswith("Decision: compile returned iteration 0: for each question its trained prompt model")
    assert "because it beat your program on the validation set" in lines[0]
    assert "iteration 0 won 10 questions and lost 0 (one-sided sign test p = 0.00098 < 0.05)." in lines[1]
    assert "What iteration 0 writes, on 3 validation questions:" in lines
    assert lines[-1].startswith("What to try next: check it on questions it has never seen")


def test_no_iteration_completed():
    stats = {"selected": STUDENT, "best_iteration": None, "baseline_score": 0.3, "best_score": None, "val_size": 50,
             "log_dir": "runs/x", "budget": {"max_metric_calls": 60}}
    lines = decision_summary(stats)
    assert lines[0] == ("Decision: compile returned your program unchanged (the student), because no TRPrompt "
                        "iteration finished, so there was nothing to compare it with.")
    assert lines[1] == ("What to try next: a larger max_metric_calls (it was 60) or none at all, so that at least one "
                        "iteration completes; compiling again with log_dir='runs/x' resumes the run.")


def test_without_per_question_files_the_summary_uses_the_mean_scores(tmp_path):
    stats = _stats(tmp_path / "gone", [0.0] * 50, [0.0] * 50, selected=STUDENT) | {
        "baseline_score": 0.9, "best_score": 0.92, "selection_p_value": 0.4}
    lines = decision_summary(stats, significance_level=0.05)
    assert "too small to rule out chance" in lines[0]
    assert lines[1] == ("Validation set, 50 questions: iteration 1 scored 0.920, your program 0.900 (mean metric score; "
                        "one-sided sign test p = 0.4, needs p < 0.05).")
    assert not any(line.startswith("  - ") for line in lines)  # no instructions on disk, none shown
    assert "a harder task: your program already got a score of 0.90" in lines[-1]


def test_iteration_examples_order_and_limits():
    ev = Evidence(0, [1, 1, 0, 0, 0], [0, 1, 1, 0, 1], ["a", "b", "c", "", "e"], ["q0", "q1", "q2", "q3", "q4"])
    assert [(e["index"], e["change"]) for e in iteration_examples(ev, 5)] == [
        (0, "lost"), (2, "won"), (4, "won"), (1, "same"), (3, "same")]
    assert iteration_examples(ev, 0) == []
    assert iteration_examples(Evidence(0, [1.0], [1.0], []), 3) == []  # no instructions recorded (older run)
    scored = iteration_examples(Evidence(0, [0.5], [0.25], ["x"]), 1)[0]
    assert (scored["student"], scored["iteration"], scored["question"]) == ("0.50", "0.25", "validation question 0")


def test_report_leads_with_the_decision_and_shows_the_rejected_instructions(tmp_path):
    log_dir = _log_dir(tmp_path, STUDENT_SCORES, ITER_SCORES)
    stats = _stats(log_dir, STUDENT_SCORES, ITER_SCORES, selected=STUDENT,
                   t_star_history=["t"], lm_calls={}, failures={}, iterations=[],
                   errors_by_phase={"validation": {"runs": 50, "failed": 10, "instructed": 40, "failed_instructed": 6,
                                                   "parse_error": 7, "truncated": 3},
                                    "baseline evaluation": {"runs": 50, "failed": 0}})
    rows = [{"question": f"q{i}", "gold": "1", "answer": "2", "instruction": None, "correct": False} for i in range(4)]
    results = {"program": "p:M", "target": "t", "eval_size": 4, "baseline_accuracy": 0.0, "compiled_accuracy": 0.0,
               "baseline_rows": rows, "compiled_rows": rows, "compile_stats": stats,
               "errors_by_phase": {"held-out evaluation (baseline)": {"runs": 4, "failed": 1, "timeout": 1}}}
    text = render_report(results)
    assert text.startswith("# TRPrompt run report\n\n**Decision:** compile returned your program unchanged (the student)")
    assert "| TRPrompt-compiled (compile returned your program unchanged) | 0.0% | 0/4 |" in text
    assert "- held-out evaluation (baseline): 1 of 4 program runs failed: 1 timed-out call." in text
    assert ("- validation: 10 of 50 program runs failed: 7 unparseable answers, 3 answers truncated at max_tokens; 6 of "
            "the 10 had a prompt-model instruction (40 of the 50 runs had one).") in text
    assert "baseline evaluation:" not in text  # phases without failures are not listed
    assert "instruction: None" not in text and "Example per-query instructions" not in text
    assert "## Instructions of the rejected iteration 1 (validation questions)" in text
    assert "  - instruction (rejected): 'Double 7 carefully.'" in text
    # a decision given by the caller (the demo keeps it in results) is used as is
    assert render_report(results | {"decision": ["Decision: custom."]}).startswith(
        "# TRPrompt run report\n\n**Decision:** custom.")


@pytest.mark.parametrize("selected", [STUDENT, 1])
def test_report_of_a_run_without_iterations_on_disk_has_no_instruction_none_rows(tmp_path, selected):
    rows = [{"question": "q", "gold": "1", "answer": "1", "instruction": None, "correct": True}]
    stats = {"selected": selected, "best_iteration": 1, "baseline_score": 0.5, "best_score": 0.6, "val_size": 2,
             "log_dir": str(tmp_path), "t_star_history": ["t"], "iterations": []}
    text = render_report({"eval_size": 1, "baseline_rows": rows, "compiled_rows": rows, "compiled_accuracy": 100.0,
                          "compile_stats": stats})
    assert "instruction: None" not in text
    if selected == STUDENT:
        assert "Example per-query instructions" not in text
    else:
        assert "  - instruction: none (the program's own prompt)" in text
