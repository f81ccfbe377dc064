"""MLflow's DSPy autologging tracks a TRPrompt compile, whatever the import order (runtime/tracking.py).

Each order runs in a fresh interpreter (``tests/_mlflow_compile_job.py``) against a real MLflow sqlite store in
``tmp_path``; the two run side by side. MLflow (``mlflow-skinny`` + sqlalchemy) is in the ``dev`` extra, so
the suite runs this; without it the subprocesses fail on ``import mlflow``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
ORDERS = ("autolog-first", "import-first")


def _env() -> dict[str, str]:
    return {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true", "PYTHONPATH": str(REPO_ROOT)}


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, dict]:
    procs = {}
    for order in ORDERS:
        d = tmp_path_factory.mktemp(order)
        procs[order] = subprocess.Popen(
            [sys.executable, "-m", "tests._mlflow_compile_job", f"sqlite:///{d / 'mlflow.db'}", str(d / "artifacts"),
             str(d / "log"), order], cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
    out = {}
    for order, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{order}: exit {proc.returncode}\n{stderr[-4000:]}"
        out[order] = json.loads(stdout.strip().splitlines()[-1])
        out[order]["stderr"] = stderr
    return out


@pytest.mark.parametrize("order", ORDERS)
def test_a_compile_is_one_mlflow_run_with_settings_scores_selection_usage_and_program(reports, order):
    r = reports[order]
    result = r["result"]
    assert r["run_id"] is not None, f"{order}: MLflow logged no run for the compile"
    assert r["status"] == "FINISHED"
    # one run: the compile after mlflow.dspy.autolog(disable=True) logged nothing (the patch was removed)
    assert r["runs"] == 1
    params, metrics = r["params"], r["metrics"]
    # the optimizer's settings (constructor arguments, flattened) and what the compile resolved
    for name, value in {"num_iterations": "2", "queries_per_iteration": "3", "prompts_per_query": "2",
                        "textgrad_steps": "1", "val_size": "3", "significance_level": "None", "seed": "0",
                        "min_improvement": "0.0", "prompt_model": "FakePromptModel", "prompt_model.backend": "fake",
                        "reward_lm": "local/target", "target_lm": "local/target", "trainset_size": "8",
                        "valset_size": "3"}.items():
        assert params.get(name) == value, (name, params.get(name))
    assert "lora.r" in params and "sft.learning_rate" in params and "initial_reward" in params
    assert "lm_params" in params  # MLflow's own DSPy autologging still logs what it logs
    # per-iteration validation scores: one value per iteration, step = the iteration index
    assert r["history"]["val_score"] == [[s["iteration"], s["val_score"]] for s in result["iterations"]]
    assert [step for step, _ in r["history"]["rollout_score"]] == [0, 1]
    assert r["history"]["baseline_val_score"] == [[0, result["baseline_score"]]]
    # the selection decision and its p
    assert result["selected"] == 0 and r["tags"]["trprompt.selected"] == "iteration 0"
    assert metrics["selected_iteration"] == 0 and metrics["selected_val_score"] == result["selected_score"]
    assert result["selection_p_value"] is not None
    assert metrics["selection_p_value"] == pytest.approx(result["selection_p_value"])
    assert metrics["best_val_score"] == result["best_score"]
    # LM calls and tokens per role
    assert result["lm_tokens_by_role"]["target"]["total_tokens"] > 0
    for role, usage in result["lm_tokens_by_role"].items():
        for field, n in usage.items():
            assert metrics[f"lm_tokens/{role}/{field}"] == n
    for role, n in result["lm_calls"].items():
        assert metrics[f"lm_calls/{role}"] == n
    # the compiled program (save_compiled's folder, adapter included) and the full result
    assert {"trprompt/program/program.json", "trprompt/program/trprompt.json",
            "trprompt/result.json"} <= set(r["artifacts"])
    assert any(a.startswith("trprompt/program/adapter/") for a in r["artifacts"])
    assert "best_model.json" in r["artifacts"]  # MLflow's own
    assert r["result_json_selected"] == 0
    assert "MLflow tracking could not log" not in r["stderr"]


def test_importing_the_optimizer_does_not_import_mlflow():
    code = "import sys, trprompt_dspy.optimizer; print('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=_env(), capture_output=True, text=True,
                         timeout=300, check=True)
    assert out.stdout.strip() == "False"


def test_without_autologging_the_tracker_is_inert():
    from trprompt_dspy.runtime.tracking import CompileTracker

    class Optimizer:  # get_params is all start() reads
        def get_params(self):
            raise AssertionError("read without MLflow autologging")

    # whether or not this process imported MLflow, autolog() was never called here
    assert not CompileTracker.start(Optimizer()).active
