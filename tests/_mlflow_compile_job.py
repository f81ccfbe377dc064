"""A small compile under ``mlflow.dspy.autolog(log_compiles=True)``, in its own process (see test_mlflow_tracking.py).

Usage: python -m tests._mlflow_compile_job TRACKING_URI ARTIFACT_DIR LOG_DIR ORDER

ORDER is ``autolog-first`` (``autolog()`` runs before ``trprompt_dspy`` is imported: the natural order, since
the package imports lazily) or ``import-first``. Import order matters only in a fresh interpreter, hence the
subprocess. After the compile, autologging is turned off and a second (one-iteration) compile runs, which must
log no run. Prints one JSON line: what the compile returned and what the MLflow store holds.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path


def main() -> None:
    uri, artifacts, log_dir, order = sys.argv[1:5]
    if order not in ("autolog-first", "import-first"):
        raise SystemExit(f"ORDER must be autolog-first or import-first; got {order!r}")
    import dspy
    import mlflow

    mlflow.set_tracking_uri(uri)
    # the experiment's artifacts go to ARTIFACT_DIR (with a sqlite store they would default to ./mlruns)
    experiment_id = mlflow.create_experiment("trprompt-test", Path(artifacts).as_uri())
    mlflow.set_experiment(experiment_id=experiment_id)
    if order == "import-first":
        importlib.import_module("trprompt_dspy.optimizer")
    assert ("trprompt_dspy.optimizer" in sys.modules) == (order == "import-first")
    mlflow.dspy.autolog(log_compiles=True, log_evals=True)

    from programs.math import MathCoT
    from trprompt_dspy import TRPromptOptimizer
    from trprompt_dspy.testing import (
        FakePromptModel,
        addition_examples,
        instruction_following_responder,
        scripted_lm,
    )

    dspy.configure(lm=scripted_lm(instruction_following_responder("state the sum"), "target"))

    def compile_once(folder: str, **budget: int) -> dspy.Module:
        pm = FakePromptModel(template="Add the numbers carefully for {predictor}, then state the sum.")
        opt = TRPromptOptimizer(metric=lambda ex, pred, trace=None: float(pred.answer == ex.answer),
                                prompt_model=pm, log_dir=folder, display_progress=False, queries_per_iteration=3,
                                prompts_per_query=2, textgrad_batch_size=2, val_size=3, significance_level=None,
                                **budget)
        return opt.compile(MathCoT(), trainset=addition_examples(8), valset=addition_examples(3, start=50))

    compiled = compile_once(log_dir, num_iterations=2, textgrad_steps=1)
    run = mlflow.last_active_run()
    mlflow.dspy.autolog(disable=True)  # MLflow's own switch must remove the patch, whichever order applied it
    compile_once(log_dir + "-untracked", num_iterations=1, textgrad_steps=0)

    client = mlflow.MlflowClient()
    runs = client.search_runs([experiment_id])
    report: dict = {"result": compiled.detailed_results.to_dict(), "runs": len(runs),
                    "run_id": None if run is None else run.info.run_id}
    if run is not None:
        data = client.get_run(run.info.run_id).data
        artifacts_listed: list[str] = []

        def walk(path: str | None = None) -> None:
            for a in client.list_artifacts(run.info.run_id, path):
                if a.is_dir:
                    walk(a.path)
                else:
                    artifacts_listed.append(a.path)

        walk()
        result_json = json.loads(Path(mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="trprompt/result.json")).read_text())
        report.update(
            status=client.get_run(run.info.run_id).info.status, params=data.params, metrics=data.metrics,
            tags={k: v for k, v in data.tags.items() if not k.startswith("mlflow.")}, artifacts=sorted(artifacts_listed),
            history={name: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]
                     for name in ("val_score", "rollout_score", "baseline_val_score")},
            result_json_selected=result_json["selected"])
    print(json.dumps(report))


if __name__ == "__main__":
    main()
