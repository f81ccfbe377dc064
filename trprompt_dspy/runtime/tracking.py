"""MLflow tracking of a compile, through MLflow's own DSPy autologging (``mlflow.dspy.autolog``).

With ``mlflow.dspy.autolog(log_compiles=True)`` MLflow wraps ``Teleprompter.compile`` so each compile runs
inside an MLflow run, and logs what it can see from outside: the LM settings (``lm_params``), the trainset
and valset as tables, and the returned program's state as ``best_model.json``. Two gaps made a TRPrompt
compile nearly invisible, and this module closes both:

* **Import order.** ``autolog()`` patches the classes in ``Teleprompter.__subclasses__()`` *at the time it
  is called*. ``trprompt_dspy`` imports lazily, so ``TRPromptOptimizer`` usually does not exist yet when
  ``autolog()`` runs and its ``compile`` was never wrapped: no run at all.
  :func:`apply_mlflow_autolog_patch` runs when ``trprompt_dspy/optimizer.py`` is imported and, if DSPy
  autologging is already on, applies MLflow's own compile patch to the class (MLflow's ``safe_patch`` with
  ``mlflow.dspy.autolog``'s patch function, registered under the ``"dspy"`` integration, so a later
  ``autolog(disable=True)`` removes it like the others). Imported before ``autolog()``, the class is a
  ``Teleprompter`` subclass MLflow patches itself.
* **What the run holds.** MLflow logs scalar ``compile()`` arguments only (TRPrompt has none) and listens
  for ``dspy.Evaluate`` calls, which TRPrompt does not make. :class:`CompileTracker` logs, into the run
  MLflow opened, the optimizer's settings (params), the baseline and per-iteration validation and rollout
  scores (metrics with ``step`` = iteration, as each iteration finishes), the selection decision and its
  sign-test p, LM calls and tokens per role, the full :class:`~trprompt_dspy.results.TRPromptResult`
  (``trprompt/result.json``) and the compiled program as :func:`~trprompt_dspy.compiled.artifact.save_compiled`
  writes it (``trprompt/program/``: ``program.json``, ``trprompt.json`` and the LoRA ``adapter/``).

Nothing here imports MLflow on its own: it acts only when the user's process imported it and turned DSPy
autologging on with ``log_compiles=True``, and a failure to log is a warning, never a failed compile.

Example:
    Without MLflow autologging the tracker is inert:

    >>> tracker = CompileTracker(None)
    >>> tracker.active
    False
    >>> tracker.progress(0.5, [])          # no-op
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trprompt_dspy.results import STUDENT, IterationStats, TRPromptResult

logger = logging.getLogger(__name__)

__all__ = ["CompileTracker", "apply_mlflow_autolog_patch", "autolog_compiles_enabled"]

#: MLflow's autologging integration name for DSPy (``mlflow.dspy.autolog``).
FLAVOR = "dspy"
#: MLflow rejects longer parameter values (``mlflow.utils.validation.MAX_PARAM_VAL_LENGTH``).
_MAX_PARAM_CHARS = 6000


def _autologging_utils() -> Any | None:
    """``mlflow.utils.autologging_utils`` if the process has imported it already, else ``None`` (never imports)."""
    if "mlflow" not in sys.modules:
        return None
    return sys.modules.get("mlflow.utils.autologging_utils")


def autolog_compiles_enabled() -> bool:
    """Whether ``mlflow.dspy.autolog(log_compiles=True)`` is in effect in this process (never imports MLflow).

    Example:
        >>> autolog_compiles_enabled() in (True, False)
        True
    """
    utils = _autologging_utils()
    if utils is None:
        return False
    try:
        return (not utils.autologging_is_disabled(FLAVOR)
                and bool(utils.get_autologging_config(FLAVOR, "log_compiles", False)))
    except Exception:  # noqa: BLE001 - an MLflow internals change must not break imports or compiles
        return False


def apply_mlflow_autolog_patch(cls: type) -> None:
    """Wrap ``cls.compile`` with MLflow's DSPy compile patch if DSPy autologging was turned on before ``cls`` existed.

    ``mlflow.dspy.autolog()`` patches only the ``Teleprompter`` subclasses that exist when it is called;
    ``trprompt_dspy/optimizer.py`` calls this right after defining ``TRPromptOptimizer`` so that the order of
    ``autolog()`` and the (lazy) import does not matter. The patch is MLflow's own (``safe_patch`` with
    ``mlflow.dspy.autolog``'s compile patch, ``manage_run`` from ``log_compiles``), exactly what ``autolog()``
    applies to the subclasses it finds. Does nothing when MLflow is not imported or DSPy autologging is off.
    """
    utils = _autologging_utils()
    if utils is None:
        return
    try:
        if utils.autologging_is_disabled(FLAVOR):
            return
        module = importlib.import_module("mlflow.dspy.autolog")  # loaded already: autolog() lives there
        patch = getattr(module, "_patched_compile", None)
        if patch is None:
            logger.warning("This MLflow version has no DSPy compile patch to apply to %s; call "
                           "mlflow.dspy.autolog() after importing trprompt_dspy to track its compiles.", cls.__name__)
            return
        utils.safe_patch(FLAVOR, cls, "compile", patch,
                         manage_run=bool(utils.get_autologging_config(FLAVOR, "log_compiles", False)))
        logger.debug("Applied MLflow's DSPy autologging patch to %s.compile.", cls.__name__)
    except Exception as exc:  # noqa: BLE001 - tracking must never stop the library from importing
        logger.warning("Could not apply MLflow's DSPy autologging to %s.compile (%s: %s); its compiles will not be "
                       "tracked unless mlflow.dspy.autolog() is called again.", cls.__name__, type(exc).__name__, exc)


class CompileTracker:
    """Logs one compile into the MLflow run that DSPy autologging opened for it (inert without one).

    Create it with :meth:`start` at the beginning of ``compile``; the loop calls :meth:`progress` after the
    baseline and after every iteration, and :meth:`finish` with the result. Every method swallows (and warns
    about) its own errors.

    Args:
        run_id: The MLflow run to log into; ``None`` makes every method a no-op.
    """

    def __init__(self, run_id: str | None) -> None:
        self.run_id = run_id
        self._baseline_logged = False
        self._iterations_logged = 0

    @property
    def active(self) -> bool:
        """Whether this tracker logs anything."""
        return self.run_id is not None

    @classmethod
    def start(cls, optimizer: Any, resolved: Mapping[str, Any] | None = None) -> CompileTracker:
        """A tracker for the active MLflow run, with the optimizer's settings logged as params.

        Args:
            optimizer: The ``TRPromptOptimizer``; its ``get_params()`` (the constructor settings) become params.
            resolved: What the compile resolved from those settings (the target, reward and TextGrad LMs, the
                prompt model, ``log_dir``, dataset sizes); logged too, overriding a setting of the same name.

        Returns:
            An active tracker when ``mlflow.dspy.autolog(log_compiles=True)`` is on and an MLflow run is active,
            an inert one otherwise.
        """
        if not autolog_compiles_enabled():
            return cls(None)
        mlflow = sys.modules["mlflow"]
        try:
            run = mlflow.active_run()
        except Exception as exc:  # noqa: BLE001
            _warn("anything (no active run)", exc)
            return cls(None)
        if run is None:
            return cls(None)
        tracker = cls(run.info.run_id)
        try:  # a run that already holds other values for these params (a user's run reused) refuses them
            params: dict[str, str] = {}
            for name, value in optimizer.get_params().items():
                _flatten_param(name, value, params)
            for name, value in (resolved or {}).items():
                _flatten_param(name, value, params)
            mlflow.log_params(params, run_id=tracker.run_id)
        except Exception as exc:  # noqa: BLE001
            _warn("the optimizer settings", exc)
        return tracker

    def progress(self, baseline_score: float | None, iterations: Sequence[IterationStats]) -> None:
        """Log the baseline score once and each iteration not logged yet (``step`` = the iteration index)."""
        if not self.active:
            return
        try:
            mlflow = sys.modules["mlflow"]
            if baseline_score is not None and not self._baseline_logged:
                mlflow.log_metrics({"baseline_val_score": float(baseline_score)}, step=0, run_id=self.run_id)
                self._baseline_logged = True
            for stats in iterations[self._iterations_logged:]:
                metrics = {"val_score": stats.val_score, "rollout_score": stats.rollout_score,
                           "num_rollouts": stats.num_rollouts, "num_sft_examples": stats.num_sft_examples,
                           "t_star_accepted": stats.t_star_accepted,
                           "sft_loss": stats.sft_loss[-1] if stats.sft_loss else None}
                mlflow.log_metrics(_numbers(metrics), step=stats.iteration, run_id=self.run_id)
                self._iterations_logged += 1
        except Exception as exc:  # noqa: BLE001
            _warn("the iteration scores", exc)

    def finish(self, program: Any, result: TRPromptResult) -> None:
        """Log the selection, the LM usage per role, the result and the compiled program (as artifacts)."""
        if not self.active:
            return
        self.progress(result.baseline_score, result.iterations)
        try:
            mlflow = sys.modules["mlflow"]
            metrics: dict[str, Any] = {
                "selected_iteration": -1 if result.selected == STUDENT else result.selected,  # -1: the student
                "best_iteration": result.best_iteration, "best_val_score": result.best_score, "selected_val_score": result.selected_score,
                "selection_p_value": result.selection_p_value, "compile_seconds": result.seconds,
                "instructions_hit_cap_rate": result.instructions.get("hit_cap_rate")}
            metrics.update({f"lm_calls/{role}": n for role, n in result.lm_calls.items()})
            metrics.update({f"lm_tokens/{role}/{field}": n for role, usage in result.lm_tokens_by_role.items()
                            for field, n in usage.items()})
            metrics.update({f"failures/{kind}": n for kind, n in result.failures.items()})
            mlflow.log_metrics(_numbers(metrics), run_id=self.run_id)
            mlflow.MlflowClient().set_tag(self.run_id, "trprompt.selected",
                                          STUDENT if result.selected == STUDENT else f"iteration {result.selected}")
            mlflow.log_dict(_json_ready(result.to_dict()), "trprompt/result.json", run_id=self.run_id)
        except Exception as exc:  # noqa: BLE001
            _warn("the compile summary", exc)
        self._log_program(program)

    def _log_program(self, program: Any) -> None:
        mlflow = sys.modules["mlflow"]
        try:
            from trprompt_dspy.compiled.artifact import save_compiled

            with tempfile.TemporaryDirectory(prefix="trprompt_mlflow_") as tmp:
                folder = save_compiled(program, Path(tmp) / "program")
                mlflow.log_artifacts(str(folder), "trprompt/program", run_id=self.run_id)
        except Exception as exc:  # noqa: BLE001 - e.g. a prompt model with no adapter folder: log the state alone
            try:
                mlflow.log_dict(_json_ready(program.dump_state(json_mode=True)), "trprompt/program/program.json",
                                run_id=self.run_id)
                logger.warning("MLflow: logged the compiled program's state without its adapter (%s: %s).",
                               type(exc).__name__, exc)
            except Exception as exc2:  # noqa: BLE001
                _warn("the compiled program", exc2)


def _warn(what: str, exc: BaseException) -> None:
    logger.warning("MLflow tracking could not log %s (%s: %s); the compile goes on.", what, type(exc).__name__, exc)


def _numbers(values: Mapping[str, Any]) -> dict[str, float]:
    """The entries that are numbers, as floats (``None`` and text are left out: MLflow metrics are numbers).

    Example:
        >>> _numbers({"a": 1, "b": None, "c": True, "d": "x"})
        {'a': 1.0, 'c': 1.0}
    """
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float)}


def _json_ready(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _flatten_param(name: str, value: Any, out: dict[str, str]) -> None:
    """Turn one setting into MLflow params: settings objects by field, LMs by model name, callables by name.

    Example:
        >>> out = {}
        >>> _flatten_param("lora", {"r": 16, "alpha": 32}, out); _flatten_param("seed", 0, out)
        >>> out
        {'lora.r': '16', 'lora.alpha': '32', 'seed': '0'}
    """
    import dataclasses

    if hasattr(value, "describe") and callable(value.describe) and hasattr(value, "generate"):  # a PromptModel
        out[name] = type(value).__name__
        try:
            for k, v in dict(value.describe()).items():
                if k != "adapter_path":
                    _flatten_param(f"{name}.{k}", v, out)
        except Exception:  # noqa: BLE001 - a description is informative only
            pass
        return
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value)
        if name == "budget":  # its fields are the constructor's own arguments (num_iterations, val_size, ...)
            for k, v in value.items():
                _flatten_param(k, v, out)
            return
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten_param(f"{name}.{k}", v, out)
        return
    if hasattr(value, "model") and hasattr(value, "kwargs"):  # a dspy.LM: its model name, never its api_key
        text = str(value.model)
    elif value is None or isinstance(value, bool | int | float | str | Path):
        text = str(value)
    elif isinstance(value, list | tuple):
        text = json.dumps(list(value), default=str)
    elif callable(value):
        text = str(getattr(value, "__qualname__", None) or getattr(value, "__name__", None) or type(value).__name__)
    else:
        text = type(value).__name__
    out[name] = text if len(text) <= _MAX_PARAM_CHARS else text[: _MAX_PARAM_CHARS - 1] + "…"

