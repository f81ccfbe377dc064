"""One base class for every error this library raises on purpose: ``except TRPromptError`` catches them all.

Each public error also derives from the builtin it refines (``ValueError`` for bad input,
``RuntimeError`` for a failed run, ...), so existing ``except ValueError`` code keeps working:

* bad input — :class:`~trprompt_dspy.models.presets.UnknownModelError`,
  :class:`~trprompt_dspy.runtime.checkpoint.LogDirMismatchError`,
  :class:`~trprompt_dspy.loop.metric_adapter.MetricValueError`,
  :class:`~trprompt_dspy.models.provision.GGUFIntegrityError`,
  :class:`~trprompt_dspy.models.provision.ModelSourceMissingError`,
  :class:`~trprompt_dspy.runtime.validation.InputFieldMismatchError`;
* a compile that stopped — :class:`~trprompt_dspy.runtime.faults.CompileError` and its
  :class:`~trprompt_dspy.runtime.faults.ErrorBudgetExceededError`;
* a model or server that failed — :class:`~trprompt_dspy.runtime.faults.PromptModelError`,
  :class:`~trprompt_dspy.runtime.faults.EmptyCompletionError`,
  :class:`~trprompt_dspy.serving.http.ServerRequestError`, :class:`~trprompt_dspy.serving.http.ServerUnreachableError`,
  :class:`~trprompt_dspy.serving.server.ServerStartError`, :class:`~trprompt_dspy.serving.venv.VLLMInstallError`.

Example:
    >>> from trprompt_dspy.models.presets import UnknownModelError
    >>> issubclass(UnknownModelError, TRPromptError) and issubclass(UnknownModelError, ValueError)
    True
"""

from __future__ import annotations

__all__ = ["TRPromptError"]


class TRPromptError(Exception):
    """Base class of every error trprompt_dspy raises on purpose.

    Example:
        >>> from trprompt_dspy import TRPromptOptimizer
        >>> from trprompt_dspy.runtime.faults import CompileError
        >>> issubclass(CompileError, TRPromptError)
        True
    """
