"""The checks a compile runs before it spends anything: the student, the metric and the prompt model, once each.

A setup error (a program whose LM is unreachable, a metric that raises on a missing field, a prompt model that
cannot generate) surfaces here in seconds with a message that says what to fix, instead of as failed
rollouts an hour into the loop. One bad reply must not stop the compile, so the student is tried on up to
:data:`SMOKE_TRIES` training examples before its failure is reported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import dspy

from trprompt_dspy.runtime.faults import CompileError, RetryPolicy, classify_error

__all__ = ["SMOKE_TRIES", "smoke_test"]

#: Training examples tried before a setup error of the student is reported.
SMOKE_TRIES = 3


def smoke_test(student: dspy.Module, trainset: Sequence[dspy.Example], *, metric: Callable[..., Any],
               user_metric: Callable[..., Any], prompt_model: Any, reward_text: str, retry: RetryPolicy,
               role: Callable[[str], AbstractContextManager[Any]]) -> None:
    """Run a copy of ``student`` on the first training example that works, score it with ``metric`` (the
    :class:`~trprompt_dspy.loop.metric_adapter.MetricAdapter`, strict), then ask ``prompt_model`` for one
    4-token instruction.

    Raises:
        ValueError: the metric raised on a real prediction (``user_metric`` names it in the message).
        MetricValueError: the metric returned something that is not a score.
        CompileError: the student failed on each of the first :data:`SMOKE_TRIES` examples, or the prompt
            model failed.
    """
    from trprompt_dspy.backends.prompt_model.base import InstructionRequest
    from trprompt_dspy.loop.metric_adapter import MetricValueError, metric_name

    errors: list[tuple[int, BaseException]] = []
    for i, ex in enumerate(trainset[:SMOKE_TRIES]):
        try:
            with role("target"):
                pred = retry.call(student.deepcopy(), **ex.inputs())
        except Exception as exc:
            errors.append((i, exc))
            continue
        try:
            metric(ex, pred, None, strict=True)
        except MetricValueError:
            raise
        except Exception as exc:
            raise ValueError(
                f"The metric {metric_name(user_metric)!r} raised {type(exc).__name__}: {exc} on trainset[{i}] "
                f"and the program's prediction {dict(pred) if hasattr(pred, 'keys') else pred!r:.300}. A metric "
                "must return a score for every prediction: fix it, e.g. return 0.0 when a field is missing."
            ) from exc
        break
    else:
        i, exc = errors[0]
        raise CompileError(
            f"The student program failed on the first {len(errors)} trainset example(s) before optimization "
            f"started ({classify_error(exc)}): {type(exc).__name__}: {exc}. Fix the program or its LM first."
        ) from exc
    probe = InstructionRequest(predictor="probe", task="question -> answer", query="question: 1 + 1?",
                               reward=reward_text)
    try:
        retry.call(prompt_model.generate, [probe], temperature=0.0, n=1, max_new_tokens=4)
    except Exception as exc:
        raise CompileError(
            f"The prompt model {prompt_model!r} failed before optimization started ({classify_error(exc)}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
