"""Budgets, LoRA/SFT settings, the checkpoint folder, usage counting and input validation."""

from __future__ import annotations

import json

import dspy
import pytest

from trprompt_dspy.config import AUTO_BUDGETS, Budget, LoraSettings, SFTSettings
from trprompt_dspy.runtime.checkpoint import LogDirMismatchError, RunDirectory, atomic_replace_dir
from trprompt_dspy.runtime.usage import UsageMeter
from trprompt_dspy.runtime.validation import validate_dataset, validate_program


def test_auto_budgets_grow_with_level():
    light, medium, heavy = (Budget.from_auto(a) for a in ("light", "medium", "heavy"))
    for f in ("num_iterations", "queries_per_iteration", "prompts_per_query", "val_size"):
        assert getattr(light, f) <= getattr(medium, f) <= getattr(heavy, f)
    assert set(AUTO_BUDGETS) == {"light", "medium", "heavy"}


@pytest.mark.parametrize("auto,counts,cap,match", [
    ("huge", {}, None, "auto must be one of"),
    ("light", {"num_iterations": 3}, None, "either auto"),
    (None, {"num_iterations": 0}, None, "num_iterations must be an integer >= 1"),
    (None, {"prompts_per_query": -2}, None, "prompts_per_query"),
    (None, {"queries_per_iteration": 2.5}, None, "queries_per_iteration"),
    (None, {"num_iterations": 1}, 0, "max_metric_calls"),
])
def test_budget_rejects_bad_knobs(auto, counts, cap, match):
    with pytest.raises(ValueError, match=match):
        Budget.resolve(auto, counts, cap)


def test_no_budget_argument_resolves_to_the_default_preset():
    from trprompt_dspy.config import DEFAULT_AUTO

    assert Budget.resolve(None, {}, None) == Budget.from_auto(DEFAULT_AUTO)
    assert Budget.resolve(None, {}, 40) == Budget.from_auto(DEFAULT_AUTO, max_metric_calls=40)


def test_explicit_counts_fill_the_rest_from_light():
    b = Budget.resolve(None, {"num_iterations": 5, "textgrad_steps": 0}, None)
    assert b.num_iterations == 5 and b.textgrad_steps == 0
    assert b.queries_per_iteration == AUTO_BUDGETS["light"]["queries_per_iteration"]


def test_projection_counts_scale_with_budget():
    b = Budget.resolve(None, {"num_iterations": 2, "queries_per_iteration": 4, "prompts_per_query": 3,
                              "textgrad_steps": 1, "textgrad_batch_size": 2, "val_size": 5}, None)
    p = b.projected_calls(num_predictors=2, val_size=5, sft_batch_size=4, sft_epochs=1, accumulate=False)
    assert p["reward_lm_calls"] == 2 * 4 * 3
    assert p["target_lm_calls"] == 2 * p["program_runs"]
    assert p["sft_steps"] == 2 * 4 * 3 * 2 // 4
    # the student's own answer per sampled query, and a "no instruction" example per query
    q = b.projected_calls(num_predictors=2, val_size=5, sft_batch_size=4, sft_epochs=1, accumulate=False,
                          student_runs=True, abstain=True)
    assert q["program_runs"] == p["program_runs"] + 2 * 4 and q["prompt_model_calls"] == p["prompt_model_calls"]
    assert q["sft_steps"] == 2 * 4 * (3 + 1) * 2 // 4


def test_lora_settings_map_onto_peft():
    cfg = LoraSettings.from_value({"r": 4, "lora_alpha": 8, "extra": {"use_rslora": True}}).to_peft()
    assert cfg.r == 4 and cfg.lora_alpha == 8 and cfg.use_rslora is True
    assert set(cfg.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    with pytest.raises(ValueError, match="Unknown LoRA settings"):
        LoraSettings.from_value({"rank": 4})
    with pytest.raises(ValueError, match="no field"):
        LoraSettings(extra={"not_a_lora_field": 1}).to_peft()
    with pytest.raises(ValueError, match="rank"):
        LoraSettings(r=0)


def test_sft_settings_build_sftconfig_from_its_own_fields(tmp_path):
    cfg = SFTSettings(max_length=256, num_train_epochs=1).to_trl(
        output_dir=str(tmp_path), seed=7, use_cpu=True, bf16_supported=False)
    assert cfg.max_length == 256 and cfg.seed == 7 and cfg.completion_only_loss is True and cfg.bf16 is False
    with pytest.raises(ValueError, match="max_length"):
        SFTSettings(extra={"max_seq_length": 128})
    with pytest.raises(ValueError, match="no field"):
        SFTSettings(extra={"definitely_not_a_field": 1}).to_trl(
            output_dir=str(tmp_path), seed=0, use_cpu=True, bf16_supported=False)
    with pytest.raises(TypeError, match="SFTSettings"):
        SFTSettings.from_value(["lr", 1])


def test_gradient_checkpointing_auto_follows_the_lora_placement(tmp_path):
    """'auto' checkpoints when every layer is trained (memory) and not for top layers only (it would only cost time)."""
    def ckpt(settings, **kw):
        cfg = settings.to_trl(output_dir=str(tmp_path), seed=0, use_cpu=True, bf16_supported=False, **kw)
        return getattr(cfg, "activation_checkpointing", None) or getattr(cfg, "gradient_checkpointing", False)

    assert SFTSettings().gradient_checkpointing == "auto"
    assert ckpt(SFTSettings()) is True and ckpt(SFTSettings(), every_layer=False) is False
    assert ckpt(SFTSettings(gradient_checkpointing=False)) is False
    assert ckpt(SFTSettings(gradient_checkpointing=True), every_layer=False) is True
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        SFTSettings(gradient_checkpointing="yes")


def test_run_directory_resume_and_mismatch(tmp_path):
    run = RunDirectory(tmp_path / "log", fingerprint={"program": "a", "seed": 0})
    assert run.prepare() is False
    assert RunDirectory(tmp_path / "log", fingerprint={"program": "a", "seed": 0}).prepare() is True
    with pytest.raises(LogDirMismatchError, match="different program"):
        RunDirectory(tmp_path / "log", fingerprint={"program": "b", "seed": 0}).prepare()


def test_run_directory_rejects_newer_format_and_corruption(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "run.json").write_text(json.dumps({"format_version": 99, "fingerprint": {}}))
    with pytest.raises(LogDirMismatchError, match="newer"):
        RunDirectory(tmp_path / "a", fingerprint={}).prepare()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "run.json").write_text("{not json")
    with pytest.raises(LogDirMismatchError, match="corrupted"):
        RunDirectory(tmp_path / "b", fingerprint={}).prepare()


def test_unwritable_log_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="not writable"):
        RunDirectory(blocker / "sub", fingerprint={}).prepare()


def test_jsonl_skips_torn_line_and_json_ignores_corruption(tmp_path):
    run = RunDirectory(tmp_path, fingerprint={})
    p = tmp_path / "x.jsonl"
    run.append_jsonl(p, {"i": 1})
    run.append_jsonl(p, {"i": 2})
    with open(p, "a") as f:
        f.write('{"i": 3, "trunc')  # a write killed half-way
    assert [r["i"] for r in run.read_jsonl(p)] == [1, 2]
    (tmp_path / "bad.json").write_text('{"a": ')
    assert run.read_json(tmp_path / "bad.json") is None
    assert run.read_json(tmp_path / "missing.json") is None


def test_atomic_replace_dir(tmp_path):
    dst = tmp_path / "adapter"
    for content in ("one", "two"):
        src = tmp_path / f"stage-{content}"
        src.mkdir()
        (src / "w.txt").write_text(content)
        atomic_replace_dir(src, dst)
    assert (dst / "w.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_usage_meter_counts_roles_through_dspy_callbacks():
    from tests.fakes import arithmetic_responder, scripted_lm

    target, reward = scripted_lm(arithmetic_responder, "t"), scripted_lm(arithmetic_responder, "r")
    meter = UsageMeter()
    meter.assign(reward, "reward")
    with dspy.context(lm=target, callbacks=[meter.callback("target")]):
        dspy.Predict("question -> answer")(question="1 + 1")
        with dspy.context(lm=reward):
            dspy.Predict("question -> answer")(question="1 + 2")
    assert meter.calls == {"target": 1, "reward": 1}


def test_usage_meter_files_tokens_under_the_role_of_each_call_and_survives_a_restore():
    from tests.fakes import arithmetic_responder, scripted_lm

    target, reward = scripted_lm(arithmetic_responder, "same"), scripted_lm(arithmetic_responder, "same")
    meter = UsageMeter()
    meter.assign(reward, "reward")
    with meter.tracking() as tracker, dspy.context(lm=target, callbacks=[meter.callback("target")]):
        dspy.Predict("question -> answer")(question="1 + 1")
        with dspy.context(lm=reward):
            dspy.Predict("question -> answer")(question="1 + 2 + 3 + 4")
    # one model name for both: DSPy's tracker has one total, the meter splits it by role
    (total,) = tracker.get_total_tokens().values()
    assert set(meter.tokens) == {"target", "reward"}
    assert meter.tokens["reward"]["prompt_tokens"] > meter.tokens["target"]["prompt_tokens"] > 0
    assert sum(t["prompt_tokens"] for t in meter.tokens.values()) == total["prompt_tokens"]
    with meter.tracking() as tracker:  # a call with no role named is kept, as "unattributed"
        tracker.add_usage("local/same", {"prompt_tokens": 5, "completion_tokens": 1, "is_byok": True})
    assert meter.tokens["unattributed"] == {"prompt_tokens": 5, "completion_tokens": 1}
    resumed = UsageMeter()
    resumed.restore(meter.snapshot())
    assert resumed.tokens == meter.tokens and resumed.calls == meter.calls


def test_validation_messages():
    with pytest.raises(ValueError, match="no input fields set"):
        validate_dataset([dspy.Example(question="q", answer="a")], "trainset")
    with pytest.raises(ValueError, match="no gold label"):
        validate_dataset([dspy.Example(question="q").with_inputs("question")], "trainset")
    with pytest.raises(TypeError, match="not a dspy.Example"):
        validate_dataset([{"question": "q"}], "valset")
    with pytest.raises(TypeError, match="list of dspy.Example"):
        validate_dataset("abc", "trainset")

    class Empty(dspy.Module):
        def forward(self, question):
            return question

    with pytest.raises(ValueError, match="no predictors"):
        validate_program(Empty())
    with pytest.raises(TypeError, match="dspy.Module"):
        validate_program(lambda q: q)
    assert validate_program(dspy.ChainOfThought("question -> answer")) == ["predict"]
