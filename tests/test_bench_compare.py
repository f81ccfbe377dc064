"""The optimizer-comparison benchmark's logic: call counting, statistics, budget planning, resume, outputs.

Everything runs on scripted LMs (``tests/fakes.py``) and the GSM8K subset bundled with the package.
"""

from __future__ import annotations

import copy
import json
import re

import dspy
import pytest

from benchmarks._budget import CallMeter, counting_lm
from benchmarks._contenders import (
    CONTENDERS,
    CompileInput,
    PlanInput,
    compile_contender,
    copro_calls,
    plan_contender,
)
from benchmarks._report import summarize
from benchmarks.compare_optimizers import contender_cap, load_benchmark_data, main
from tests.fakes import arithmetic_responder, output_fields, scripted_lm
from trprompt_dspy.apps.stats import discordant_counts, mcnemar_exact, mean_std, paired_bootstrap

# ---------------------------------------------------------------------------------------------------
# Counting wrapper
# ---------------------------------------------------------------------------------------------------


def test_counting_lm_counts_every_completion_exactly():
    inner = scripted_lm(arithmetic_responder)
    meter = CallMeter()
    lm = counting_lm(inner, meter, role="target")
    with meter.phase("compile"), dspy.context(lm=lm):
        assert dspy.ChainOfThought("question -> answer")(question="2 + 3?").answer == "5"
        # n=3 is three completions; copies and deep copies of the LM / program keep counting.
        dspy.Predict("question -> answer", n=3, temperature=1.0)(question="4 + 4?")
        lm.copy(temperature=0.7, rollout_id=1)("1 + 1")
        copy.deepcopy(dspy.Predict("question -> answer"))(question="7 + 1")
    assert meter.calls("compile") == 1 + 3 + 1 + 1
    assert len(inner.engine.calls) == 6
    # Tokens are the engine's own usage numbers, summed.
    expected_in = sum(len(user.split()) for _, user in inner.engine.calls)
    assert meter.usage("compile", "target").input_tokens == expected_in
    assert meter.calls("eval") == 0 and meter.calls("compile", role="aux") == 0


def test_counting_lm_separates_phases_roles_threads_and_errors():
    inner = scripted_lm(arithmetic_responder)
    meter = CallMeter()
    target, aux = counting_lm(inner, meter, role="target"), counting_lm(inner, meter, role="aux")
    data = [dspy.Example(question=f"{i} + 1", answer=str(i + 1)).with_inputs("question") for i in range(20)]
    with meter.phase("eval"), dspy.context(lm=target):
        dspy.Evaluate(devset=data, metric=lambda g, p, t=None: g.answer == p.answer, num_threads=4)(
            dspy.Predict("question -> answer"))
    with meter.phase("compile"), dspy.context(lm=aux):
        dspy.Predict("question -> answer")(question="1 + 1")
    assert meter.calls("eval") == 20
    assert meter.calls("compile", role="aux") == 1 and meter.calls("compile") == 0
    assert meter.summary("compile")["total"]["calls"] == 1

    def broken(system, user):
        raise RuntimeError("server down")

    bad = counting_lm(scripted_lm(broken), meter, role="target")
    with meter.phase("compile"), pytest.raises(Exception, match="server down"):
        bad("hi")
    assert meter.usage("compile", "target").errors == 1


def test_counting_lm_rejects_bad_arguments():
    with pytest.raises(TypeError, match="dspy.LM"):
        counting_lm("not an lm", CallMeter())
    with pytest.raises(ValueError, match="role"):
        counting_lm(scripted_lm(arithmetic_responder), CallMeter(), role="")
    with pytest.raises(ValueError, match="phase name"), CallMeter().phase(""):
        pass


# ---------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------


def test_mcnemar_exact_on_known_tables():
    # b=10, c=2: p = 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 * 79 / 4096
    assert mcnemar_exact(10, 2)["p_value"] == pytest.approx(2 * 79 / 4096)
    assert mcnemar_exact(2, 10)["p_value"] == pytest.approx(2 * 79 / 4096)
    assert mcnemar_exact(0, 0)["p_value"] == 1.0
    assert mcnemar_exact(3, 3)["p_value"] == 1.0
    assert mcnemar_exact(6, 0)["p_value"] == pytest.approx(2 / 64)
    with pytest.raises(ValueError, match="non-negative"):
        mcnemar_exact(-1, 2)


def test_discordant_counts_pool_seeds_and_check_shapes():
    a = [[1, 1, 0, 0], [1, 0, 1, 0]]
    b = [[0, 1, 1, 0], [0, 0, 0, 0]]
    assert discordant_counts(a, b) == (3, 1)
    with pytest.raises(ValueError, match="same"):
        discordant_counts(a, b[:1])
    with pytest.raises(ValueError, match="same"):
        discordant_counts([[1, 0]], [[1]])


def test_paired_bootstrap_is_deterministic_and_sensible():
    a = [[1] * 30 + [0] * 10, [1] * 28 + [0] * 12]
    b = [[1] * 10 + [0] * 30, [1] * 12 + [0] * 28]
    r1 = paired_bootstrap(a, b, iterations=3000, seed=7)
    assert r1 == paired_bootstrap(a, b, iterations=3000, seed=7)
    assert r1["diff"] == pytest.approx((20 / 40 + 16 / 40) / 2)
    assert r1["ci95"][0] > 0 and r1["p_value"] < 0.01
    same = paired_bootstrap(a, a, iterations=500, seed=0)
    assert same["diff"] == 0 and same["p_value"] == 1.0
    assert mean_std([0.2, 0.4, 0.6]) == (0.4, 0.2)


# ---------------------------------------------------------------------------------------------------
# Budget planning
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [60, 150, 600, 3000])
@pytest.mark.parametrize("p", [1, 2])
def test_budget_plans_stay_within_budget(budget, p):
    ctx = PlanInput(num_predictors=p, train_size=120, dev_size=60, budget=budget)
    for name in CONTENDERS:
        plan = plan_contender(name, ctx)
        if "over budget" not in plan.note:
            assert plan.predicted_calls <= budget, (name, plan)
    # Optimizers that can spend the budget get close to it.
    for name in ("copro", "gepa", "trprompt"):
        plan = plan_contender(name, ctx)
        if budget >= 600:
            assert plan.predicted_calls >= 0.8 * budget, (name, plan)


def test_plan_rejects_unknown_optimizer_and_bad_budget():
    with pytest.raises(ValueError, match="Unknown optimizer 'miprov3'"):
        plan_contender("miprov3", PlanInput(1, 10, 10, 100))
    with pytest.raises(ValueError, match="positive"):
        plan_contender("gepa", PlanInput(1, 10, 10, 0))


def test_copro_measured_calls_match_the_plan():
    """The planner's COPRO formula is exact: the wrapper counts what it predicts."""
    meter = CallMeter()
    inner = scripted_lm(arithmetic_responder)
    target, aux = counting_lm(inner, meter, role="target"), counting_lm(inner, meter, role="aux")
    train = [dspy.Example(question=f"{i} + 2", answer=str(i + 2)).with_inputs("question") for i in range(30)]
    plan = plan_contender("copro", PlanInput(num_predictors=1, train_size=len(train), dev_size=5, budget=40))
    assert plan.settings == {"breadth": 2, "depth": 2, "train_size": 9}  # breadth 3 would leave n < 8
    ci = CompileInput(target=target, aux=aux, metric=lambda g, p, t=None: g.answer == p.answer,
                      feedback_metric=None, trainset=train, devset=train[:5], seed=0, num_threads=1,
                      work_dir=None)
    with meter.phase("compile"):
        compile_contender("copro", plan, dspy.Predict("question -> answer"), ci)
    assert meter.calls("compile", role=None) == plan.predicted_calls == copro_calls(1, 9, 2, 2) == 39
    assert meter.calls("compile", role="aux") == 1 + 2  # (breadth - 1) + (depth - 1) * breadth proposals


def test_copro_scores_broken_outputs_as_failures_instead_of_aborting():
    """A target that breaks the output format on most examples (like the 0.5B model) does not abort COPRO."""

    def mostly_broken(system: str, user: str) -> str:
        q = re.findall(r"\[\[ ## question ## \]\]\n(\d+)", user)
        return arithmetic_responder(system, user) if q and int(q[-1]) % 5 == 0 else "I cannot format this."

    train = [dspy.Example(question=f"{i} + 2", answer=str(i + 2)).with_inputs("question") for i in range(30)]
    plan = plan_contender("copro", PlanInput(num_predictors=1, train_size=len(train), dev_size=5, budget=400))
    assert plan.settings["train_size"] > 10  # more broken examples than dspy's default max_errors (10)
    ci = CompileInput(target=scripted_lm(mostly_broken), aux=scripted_lm(arithmetic_responder),
                      metric=lambda g, p, t=None: g.answer == p.answer, feedback_metric=None, trainset=train,
                      devset=train[:5], seed=0, num_threads=1, work_dir=None)
    compiled = compile_contender("copro", plan, dspy.Predict("question -> answer"), ci)
    assert compiled is not None and compiled.predictors()

# ---------------------------------------------------------------------------------------------------
# End to end on a scripted LM
# ---------------------------------------------------------------------------------------------------


def _gold_by_question() -> dict[str, str]:
    data = load_benchmark_data("gsm8k", train_size=8, dev_size=4, test_size=6, source="bundled")
    return {ex.question.strip(): ex.answer for split in data.values() for ex in split}


def _responder(gold: dict[str, str]):
    """Answers a test question correctly when demos are in the prompt, otherwise only for even idx positions."""
    order = list(gold)

    def respond(system: str, user: str) -> str:
        fields = output_fields(system)
        if "answer" not in fields:
            return arithmetic_responder(system, user)
        questions = re.findall(r"\[\[ ## question ## \]\]\n(.*?)(?=\n\n|\n\[\[|\Z)", user, re.S)
        q = questions[-1].strip() if questions else ""
        with_demos = len(questions) > 1
        right = gold.get(q, "0")
        answer = right if (with_demos or order.index(q) % 2 == 0 if q in gold else False) else "-1"
        return "\n\n".join(f"[[ ## {f} ## ]]\n{answer if f == 'answer' else 'step by step'}" for f in fields) + (
            "\n\n[[ ## completed ## ]]")

    return respond


def _argv(tmp_path, *extra):
    return ["--dataset", "gsm8k", "--source", "bundled", "--train-size", "8", "--dev-size", "4", "--test-size", "6",
            "--seeds", "0", "1", "--optimizers", "zeroshot", "labeled", "--budget-calls", "native",
            "--num-threads", "2", "--bootstrap-iterations", "200", "--out", "tiny",
            "--results-dir", str(tmp_path / "results"), "--work-dir", str(tmp_path / "work"), *extra]


def test_end_to_end_writes_json_markdown_and_png_then_resumes(tmp_path):
    lm = scripted_lm(_responder(_gold_by_question()))
    report = main(_argv(tmp_path), target_inner=lm)
    out = tmp_path / "results"
    data = json.loads((out / "tiny.json").read_text())
    assert (out / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "tiny.md").read_text()
    assert "| zero-shot CoT |" in md and "| LabeledFewShot |" in md
    assert {"machine", "seeds", "command"} <= set(data["meta"]) and data["meta"]["machine"]["versions"]["dspy"]
    cells = {(c["optimizer"], c["seed"]): c for c in data["cells"]}
    assert set(cells) == {("zeroshot", 0), ("zeroshot", 1), ("labeled", 0), ("labeled", 1)}
    zs, lab = cells[("zeroshot", 0)], cells[("labeled", 0)]
    assert [e["correct"] for e in zs["per_example"]] == [1, 0, 1, 0, 1, 0]
    assert zs["accuracy"] == pytest.approx(0.5) and lab["accuracy"] == 1.0
    assert cells[("zeroshot", 1)]["reused_from_seed"] == 0  # greedy zero-shot is run once
    assert lab["budget_calls"] == 0 and lab["eval"]["calls"]["target"]["calls"] == 6
    assert [e["idx"] for e in lab["per_example"]] == [e["idx"] for e in zs["per_example"]]
    assert report["summary"][0]["optimizer"] == "zeroshot" and report["summary"][1]["accuracy_mean"] == 1.0
    calls_after_first_run = len(lm.engine.calls)
    assert calls_after_first_run == 6 * 3  # zero-shot once, LabeledFewShot for two seeds

    # Without --resume an existing run is protected.
    with pytest.raises(SystemExit, match="--resume"):
        main(_argv(tmp_path), target_inner=lm)
    # --resume with every cell finished makes no LM call.
    main(_argv(tmp_path, "--resume"), target_inner=lm)
    assert len(lm.engine.calls) == calls_after_first_run
    # Drop the last finished cell (an interrupted run): --resume runs only that one.
    lines = (out / "tiny.cells.jsonl").read_text().splitlines()
    (out / "tiny.cells.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    report = main(_argv(tmp_path, "--resume"), target_inner=lm)
    assert len(lm.engine.calls) == calls_after_first_run + 6
    assert len(report["cells"]) == 4


def test_merge_folds_parallel_runs_into_one_report(tmp_path):
    """Two processes (one seed each, own --out) merged into one report with both seeds; merging twice adds nothing."""
    lm = scripted_lm(_responder(_gold_by_question()))
    for seed in ("0", "1"):
        argv = _argv(tmp_path)
        argv[argv.index("--seeds") + 1: argv.index("--seeds") + 3] = [seed]
        argv[argv.index("tiny")] = f"part{seed}"
        main(argv, target_inner=lm)
    out = tmp_path / "results"
    merge = ["--report-only", "--merge", str(out / "part0.cells.jsonl"), str(out / "part1.cells.jsonl")]
    report = main(_argv(tmp_path, *merge))
    assert {(c["optimizer"], c["seed"]) for c in report["cells"]} == {
        ("zeroshot", 0), ("zeroshot", 1), ("labeled", 0), ("labeled", 1)}
    lines = (out / "tiny.cells.jsonl").read_text().splitlines()
    main(_argv(tmp_path, *merge))
    assert (out / "tiny.cells.jsonl").read_text().splitlines() == lines
    with pytest.raises(SystemExit, match="not a file"):
        main(_argv(tmp_path, "--report-only", "--merge", str(out / "missing.cells.jsonl")))


def test_serve_flag_runs_against_a_server_it_starts_and_stops(tmp_path, monkeypatch):
    import trprompt_dspy.serving as serving

    events = []

    class FakeServer:
        def __init__(self, model):
            self.model_name, self.base_url, self.startup_seconds = model, "http://127.0.0.1:9/v1", 0.0

        def __enter__(self):
            events.append("start")
            return self

        def __exit__(self, *exc):
            events.append("stop")

    monkeypatch.setattr(serving, "VLLMServer", FakeServer)
    report = main(_argv(tmp_path, "--serve", "qwen2.5-coder-0.5b-instruct"),
                  target_inner=scripted_lm(_responder(_gold_by_question())))
    assert events == ["start", "stop"]
    assert report["meta"]["api_base"] == "http://127.0.0.1:9/v1"
    served = {(c["optimizer"], c["seed"]) for c in report["cells"]}
    assert served
    # --report-only with --serve starts nothing and reports exactly the cells the served run made ...
    again = main(_argv(tmp_path, "--serve", "qwen2.5-coder-0.5b-instruct", "--report-only"))
    assert events == ["start", "stop"]
    assert {(c["optimizer"], c["seed"]) for c in again["cells"]} == served
    assert again["meta"]["target"] == "qwen2.5-coder-0.5b-instruct"
    # ... as does the same server named through --api-base/--model; another model's report has none of them.
    same = main(_argv(tmp_path, "--api-base", "http://127.0.0.1:8100/v1", "--model", "qwen2.5-coder-0.5b-instruct",
                      "--report-only"))
    assert {(c["optimizer"], c["seed"]) for c in same["cells"]} == served
    assert main(_argv(tmp_path, "--serve", "other-model", "--report-only"))["cells"] == []
    with pytest.raises(SystemExit):
        main(_argv(tmp_path, "--serve", "x", "--api-base", "http://127.0.0.1:1/v1", "--model", "m"))


def test_end_to_end_budget_mode_and_significance(tmp_path):
    """A numeric budget reaches the planner; BootstrapFewShot's counted calls stay within it."""
    lm = scripted_lm(_responder(_gold_by_question()))
    argv = _argv(tmp_path, "--budget-calls", "5")
    argv[argv.index("labeled")] = "bootstrap"
    report = main(argv, target_inner=lm)
    boot = [c for c in report["cells"] if c["optimizer"] == "bootstrap"]
    assert all(c["status"] == "ok" and 0 < c["budget_calls"] <= 5 for c in boot)
    assert boot[0]["plan"]["settings"]["train_size"] == 5
    assert report["significance"] == {}  # no TRPrompt cell: nothing to test


def test_cli_rejects_bad_flags(tmp_path):
    with pytest.raises(SystemExit):
        main(_argv(tmp_path, "--budget-calls", "lots"))
    with pytest.raises(SystemExit):
        main(_argv(tmp_path, "--test-size", "0"))
    with pytest.raises(SystemExit, match="include trprompt"):
        main(_argv(tmp_path, "--budget-calls", "trprompt"), target_inner=scripted_lm(arithmetic_responder))


def test_benchmark_data_uses_fixed_test_indices_and_clean_gold_reasoning(shared_data_dir):
    import json as _json

    data = load_benchmark_data("gsm8k", train_size=5, dev_size=3, test_size=4, data_dir=str(shared_data_dir),
                               source="local")
    splits = _json.loads((shared_data_dir / "splits.json").read_text())
    assert [ex.idx for ex in data["test"]] == splits["gsm8k"]["test"]["indices"][:4]
    assert [ex.idx for ex in data["dev"]] == splits["gsm8k"]["dev"]["indices"][:3]
    assert len(data["train"]) == 5 and not {ex.idx for ex in data["train"]} & set(splits["gsm8k"]["dev"]["indices"])
    assert all(ex.reasoning and "<<" not in ex.reasoning for ex in data["train"])
    assert list(data["train"][0].inputs().keys()) == ["question"]
    again = load_benchmark_data("gsm8k", train_size=5, dev_size=3, test_size=4, data_dir=str(shared_data_dir),
                                source="local")
    assert [ex.idx for ex in again["train"]] == [ex.idx for ex in data["train"]]  # Random(0): same draw
    with pytest.raises(ValueError, match="Unknown dataset 'math'"):
        load_benchmark_data("math", train_size=1, dev_size=1, test_size=1)


def test_markdown_table_rows_stay_on_one_line_for_multiline_errors():
    from benchmarks._report import markdown_report, summarize

    cells = [{"dataset": "gsm8k", "optimizer": "copro", "seed": 0, "status": "failed",
              "error": "AdapterParseError: failed to parse.\n\nLM Response: a | b\n"}]
    md = markdown_report({"name": "t"}, summarize(cells), {})
    row = next(line for line in md.splitlines() if line.startswith("| COPRO"))
    assert "AdapterParseError: failed to parse. LM Response: a \\| b" in row and row.endswith("|")


def test_pending_rows_are_listed_with_their_reason_and_bad_ones_rejected(tmp_path):
    """--pending 'LABEL=WHY' puts a not-run contender in the table and the json meta, never in the summary rows."""
    from benchmarks._report import markdown_report, summarize

    cells = [{"dataset": "gsm8k", "optimizer": "zeroshot", "seed": 0, "status": "ok", "accuracy": 0.5,
              "budget_calls": 0, "eval": {"wall_s": 1.0},
              "compile": {"wall_s": 0.0, "calls": {"total": {"input_tokens": 0, "output_tokens": 0}}},
              "per_example": [{"idx": 0, "correct": 1}, {"idx": 1, "correct": 0}]}]
    meta = {"name": "t", "pending": [{"label": "TRPrompt | best", "reason": "none found:\nlost on test"}]}
    md = markdown_report(meta, summarize(cells), {})
    row = next(line for line in md.splitlines() if line.startswith("| TRPrompt"))
    assert row.startswith("| TRPrompt \\| best | pending: none found: lost on test |")
    assert [r["optimizer"] for r in summarize(cells)] == ["zeroshot"]

    lm = scripted_lm(_responder(_gold_by_question()))
    report = main(_argv(tmp_path, "--seeds", "0", "--optimizers", "zeroshot", "--pending", "Best config = not found"),
                  target_inner=lm)
    assert report["meta"]["pending"] == [{"label": "Best config", "reason": "not found"}]
    assert "| Best config | pending: not found |" in (tmp_path / "results" / "tiny.md").read_text()
    for bad in ("no-reason", "=why", "label="):
        with pytest.raises(SystemExit):
            main(_argv(tmp_path, "--pending", bad))


def test_report_shows_the_planner_estimate_as_a_range_when_seeds_differ():
    from benchmarks._report import _predicted

    assert (_predicted(214), _predicted([231, 229]), _predicted(None)) == ("214", "229–231", "—")


# ---------------------------------------------------------------------------------------------------
# Stacked TRPrompt, dev scores, the native-mode cap and the pairwise tests
# ---------------------------------------------------------------------------------------------------


def test_stacked_trprompt_builds_on_the_best_other_program_on_dev(tmp_path):
    """zero-shot and LabeledFewShot run with --dev-eval; the stacked TRPrompt starts from LabeledFewShot's saved
    program (it answers every question right on dev, zero-shot half), keeps its demos, and is reported with the
    pairwise tests and the per-question costs."""
    from trprompt_dspy.backends.prompt_model.fake import FakePromptModel

    lm = scripted_lm(_responder(_gold_by_question()))
    argv = _argv(tmp_path, "--dev-eval")
    argv[argv.index("--seeds") + 1: argv.index("--seeds") + 3] = ["0"]
    argv[argv.index("labeled") + 1: argv.index("labeled") + 1] = ["trprompt_stacked"]
    pm = FakePromptModel(template="Check the sum twice.")
    report = main(argv, target_inner=lm, prompt_model=pm)
    cells = {c["optimizer"]: c for c in report["cells"]}
    assert cells["zeroshot"]["dev"]["accuracy"] < cells["labeled"]["dev"]["accuracy"] == 1.0
    stacked = cells["trprompt_stacked"]
    assert stacked["status"] == "ok", stacked.get("error")
    assert stacked["stacked_on"]["optimizer"] == "labeled"
    assert set(stacked["stacked_on"]["candidates"]) == {"zeroshot", "labeled"}
    programs = tmp_path / "results" / "tiny.programs"
    assert sorted(p.name for p in programs.iterdir()) == ["gsm8k-labeled-s0.json", "gsm8k-zeroshot-s0.json"]
    saved = json.loads((programs / "gsm8k-labeled-s0.json").read_text())  # DSPy state with the demos
    assert saved["metadata"]["cpu"]["model"] and "native_bf16" in saved["metadata"]["cpu"]
    assert stacked["accuracy"] == 1.0  # the demos were kept: the responder answers right only with demos
    assert pm.train_calls  # TRPrompt really trained its prompt model on the stacked program's rollouts
    rows = {r["optimizer"]: r for r in report["summary"]}
    assert rows["trprompt_stacked"]["label"] == "TRPrompt on LabeledFewShot"
    assert rows["labeled"]["eval_calls_per_question"] == 1.0 and rows["labeled"]["accuracy_ci95"][1] == 1.0
    assert "prompt_model_tokens_per_question" in rows["trprompt_stacked"]
    pw = report["pairwise"]["gsm8k"]
    assert pw["labeled"]["vs_zeroshot"]["b"] == 3 and pw["labeled"]["vs_zeroshot"]["c"] == 0
    assert pw["zeroshot"]["vs_zeroshot"] is None and pw["zeroshot"]["vs_best_other"]["other"] == "labeled"
    md = (tmp_path / "results" / "tiny.md").read_text()
    assert "| TRPrompt on LabeledFewShot |" in md and "McNemar p vs zero-shot" in md
    # what TRPrompt's compile returned, and the valset scores behind it, are in the cell, the row and the table
    st = stacked["optimizer_stats"]
    assert st["val_size"] == 4 and [it["iteration"] for it in st["iterations"]] == list(range(len(st["iterations"])))
    it0 = st["iterations"][0]  # what the instructions did against the student's answers, per iteration
    assert sum(it0["against_student"].values()) == it0["num_rollouts"] and isinstance(it0["t_star_accepted"], bool)
    assert st["selected"] == "student" or isinstance(st["selected"], int)
    assert rows["trprompt_stacked"]["selection"][0]["selected"] == st["selected"]
    assert f"TRPrompt on LabeledFewShot: compile returned {'the student' if st['selected'] == 'student' else 'iteration'}" in md


def test_stacked_trprompt_without_a_dev_score_is_skipped_with_the_reason(tmp_path):
    from trprompt_dspy.backends.prompt_model.fake import FakePromptModel

    argv = _argv(tmp_path)
    argv[argv.index("--seeds") + 1: argv.index("--seeds") + 3] = ["0"]
    argv[argv.index("labeled")] = "trprompt_stacked"
    report = main(argv, target_inner=scripted_lm(_responder(_gold_by_question())), prompt_model=FakePromptModel())
    [stacked] = [c for c in report["cells"] if c["optimizer"] == "trprompt_stacked"]
    assert stacked["status"] == "skipped" and "--dev-eval" in stacked["error"]


def test_choose_stack_base_rules():
    from benchmarks.compare_optimizers import choose_stack_base

    done = {("d", "zeroshot", 0): {"status": "ok", "dev": {"accuracy": 0.4}, "program_file": "z.json"},
            ("d", "gepa", 0): {"status": "ok", "dev": {"accuracy": 0.5}, "program_file": "g.json"},
            ("d", "mipro", 0): {"status": "ok", "program_file": "m.json"},  # no dev score: not a candidate
            ("d", "trprompt", 0): {"status": "ok", "dev": {"accuracy": 0.9}}}
    name, rec = choose_stack_base(done, "d", 0)
    assert name == "gepa" and rec["candidates"] == {"zeroshot": 0.4, "gepa": 0.5}
    assert choose_stack_base(done, "d", 0, forced="mipro")[0] == "mipro"
    with pytest.raises(LookupError, match="no finished simba"):
        choose_stack_base(done, "d", 0, forced="simba")
    with pytest.raises(LookupError, match="--dev-eval"):
        choose_stack_base(done, "d", 1)


def test_native_cap_sizes_only_the_presets_over_it():
    native = PlanInput(num_predictors=1, train_size=200, dev_size=50, budget=None, cap=700)
    simba = plan_contender("simba", native)
    assert "over the cap of 700" in simba.note and simba.predicted_calls <= 700
    mipro = plan_contender("mipro", native)  # the light preset fits under the cap: untouched
    assert mipro.settings["auto"] == "light" and mipro.note == "auto='light'"
    with pytest.raises(ValueError, match="cap"):
        plan_contender("simba", PlanInput(num_predictors=1, train_size=20, dev_size=5, budget=None, cap=0))


def test_cap_calls_for_caps_one_contender_and_a_changed_cap_reruns_only_its_cell(tmp_path):
    """--cap-calls-for NAME=N overrides --cap-calls for one contender, is recorded in its cell, and shows in labels."""
    import argparse

    args = argparse.Namespace(cap_calls=700, cap_calls_for={"mipro": 400})
    assert contender_cap(args, "mipro") == 400 and contender_cap(args, "simba") == 700
    mipro = plan_contender("mipro", PlanInput(num_predictors=1, train_size=200, dev_size=50, budget=None, cap=400))
    assert "over the cap of 400" in mipro.note and mipro.predicted_calls <= 400 and mipro.settings["val_size"] < 50

    lm = scripted_lm(_responder(_gold_by_question()))
    report = main(_argv(tmp_path, "--cap-calls-for", "labeled=5"), target_inner=lm)
    by = {(c["optimizer"], c["seed"]): c for c in report["cells"]}
    assert by[("labeled", 0)]["cap_calls_for"] == 5 and "cap_calls_for" not in by[("zeroshot", 0)]
    assert report["meta"]["cap_calls_for"] == {"labeled": 5}
    calls = len(lm.engine.calls)
    main(_argv(tmp_path, "--resume", "--cap-calls-for", "labeled=5"), target_inner=lm)
    assert len(lm.engine.calls) == calls  # same cap: nothing reruns
    report = main(_argv(tmp_path, "--resume", "--cap-calls-for", "labeled=6"), target_inner=lm)
    assert len(lm.engine.calls) == calls + 2 * 6  # only LabeledFewShot's two seeds rerun, zero-shot is kept
    assert {c["cap_calls_for"] for c in report["cells"] if c["optimizer"] == "labeled"} == {6}
    assert len(report["cells"]) == 4

    capped = copy.deepcopy(by[("labeled", 0)])
    capped["plan"]["note"] = "native preset predicts 644 calls, over the cap of 400: sized to the cap"
    assert summarize([capped])[0]["label"] == "LabeledFewShot (capped at 400 calls)"
    assert summarize([by[("labeled", 0)]])[0]["label"] == "LabeledFewShot"
    for bad in ("mipro", "nobody=3", "mipro=0", "mipro=x"):
        with pytest.raises(SystemExit):
            main(_argv(tmp_path, "--cap-calls-for", bad))
    with pytest.raises(SystemExit):
        main(_argv(tmp_path, "--cap-calls-for", "mipro=3", "--cap-calls-for", "mipro=4"))
    with pytest.raises(SystemExit):
        main(_argv(tmp_path, "--cap-calls-for", "mipro=300", "--budget-calls", "50"))


def test_cli_rejects_bad_stacking_and_cap_flags(tmp_path):
    with pytest.raises(SystemExit):
        main(_argv(tmp_path, "--stack-on", "trprompt"))
    with pytest.raises(SystemExit):
        main(_argv(tmp_path, "--cap-calls", "100", "--budget-calls", "50"))
    with pytest.raises(SystemExit):
        main(_argv(tmp_path, "--prompt-model", "same"))


def test_single_base_serve_wires_one_stack_into_every_role(tmp_path, monkeypatch):
    """--serve X --prompt-model same: one ModelStack (LoRA on); its target LM answers, its prompt model is TRPrompt's."""
    import trprompt_dspy.backends.stack as stack_mod
    from trprompt_dspy.backends.prompt_model.fake import FakePromptModel

    made = []

    class FakeStack:
        def __init__(self, target, *, prompt_model, max_tokens, num_threads, log_dir, server_options):
            assert prompt_model == "same" and server_options == {"max_model_len": 4096}
            self.target_lm = scripted_lm(_responder(_gold_by_question()))
            self.prompt_model = FakePromptModel()
            self.servers = {"target": {"model": target, "base_url": "http://127.0.0.1:9/v1", "startup_seconds": 1.0,
                                       "lora": True}}
            made.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            made.append("closed")

    monkeypatch.setattr(stack_mod, "ModelStack", FakeStack)
    argv = _argv(tmp_path, "--serve", "qwen2.5-coder-1.5b-instruct", "--prompt-model", "same", "--max-model-len",
                 "4096")
    report = main(argv)
    assert made[-1] == "closed" and len(made) == 2
    assert len(made[0].target_lm.engine.calls) == 6 * 3  # the stack's target answered every test question
    assert report["meta"]["servers"]["target"]["lora"] is True and report["meta"]["prompt_model"] == "same"
    with pytest.raises(SystemExit):  # the context must leave room for the completion
        main(_argv(tmp_path, "--serve", "x", "--max-model-len", "256", "--max-tokens", "512"))


def test_a_killed_trprompt_compile_continues_under_resume_and_counts_every_attempt(tmp_path):
    """The first attempt dies at its second fine-tune (like the 1.5B's out-of-memory kill); --resume continues from
    TRPrompt's checkpoints instead of starting afresh, and the cell reports the calls and wall time of both."""
    from trprompt_dspy.backends.prompt_model.fake import FakePromptModel

    class DiesAtSecondTrain(FakePromptModel):
        armed = True

        def train(self, examples, **kw):
            if self.armed and self.train_calls:
                raise MemoryError("killed at the second SFT")
            return super().train(examples, **kw)

    lm = scripted_lm(_responder(_gold_by_question()))
    argv = _argv(tmp_path)
    argv[argv.index("--seeds") + 1: argv.index("--seeds") + 3] = ["0"]
    argv[argv.index("zeroshot"): argv.index("labeled") + 1] = ["trprompt"]
    pm = DiesAtSecondTrain(template="Check the sum twice.")
    first = main(argv, target_inner=lm, prompt_model=pm)
    [cell] = first["cells"]
    assert cell["status"] == "failed" and "second SFT" in cell["error"]
    work = tmp_path / "work" / "tiny" / "gsm8k-trprompt-s0"
    attempts = json.loads((work / "attempts.json").read_text())["attempts"]
    assert len(attempts) == 1 and attempts[0]["finished"] is False
    first_calls = len(lm.engine.calls)
    # every completion of the first attempt is counted (the program's as "target", reward / TextGrad as "aux")
    assert attempts[0]["calls"]["total"]["calls"] == cell["compile"]["calls"]["total"]["calls"] == first_calls
    assert (work / "trprompt" / "iter_000" / "adapter").is_dir()  # iteration 0's checkpoint survived the failure

    pm.armed = False
    second = main([*argv, "--resume"], target_inner=lm, prompt_model=pm)
    [cell] = [c for c in second["cells"] if c["optimizer"] == "trprompt"]
    assert cell["status"] == "ok", cell.get("error")
    assert len(pm.train_calls) == 2  # iteration 0's adapter was reused, not trained again
    compile_calls = cell["compile"]["calls"]["total"]["calls"]
    second_attempt = compile_calls - first_calls
    assert 0 < second_attempt < first_calls  # it did not redo iteration 0's rollouts, baseline and validation
    assert len(lm.engine.calls) == first_calls + second_attempt + cell["eval"]["calls"]["total"]["calls"]
    rows = cell["compile"]["attempts"]
    assert [r["finished"] for r in rows] == [False, True] and rows[0]["calls"] == first_calls and rows[1]["cpu"]
    assert cell["compile"]["wall_s"] >= rows[0]["wall_s"] + rows[1]["wall_s"] - 0.01
    assert "last attempt" in cell["compile"]["prompt_model_scope"]
    # Iteration 1's rollouts ran in the first attempt: their counts and time come back from rollout_stats.json.
    it1 = cell["optimizer_stats"]["iterations"][1]
    kept = json.loads((work / "trprompt" / "iter_001" / "rollout_stats.json").read_text())
    assert it1["against_student"] == kept["against_student"] and sum(it1["against_student"].values()) > 0
    assert it1["seconds"]["rollouts"] >= kept["seconds"] > 0
    md = (tmp_path / "results" / "tiny.md").read_text()
    assert f"{rows[0]['wall_s']:.0f} s / {first_calls} calls on {rows[0]['cpu']}" in md and "--resume" in md
