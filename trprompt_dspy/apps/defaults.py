"""Defaults of the demo, read by ``run_demo`` and by ``trprompt demo`` (defined once, here).

The library-wide defaults live with what they configure: ``config.DEFAULT_AUTO`` / ``DEFAULT_SEED``,
``models.presets.DEFAULT_TARGET_MODEL`` / ``DEFAULT_PROMPT_MODEL``, ``backends.stack.DEFAULT_TARGET_MAX_TOKENS``,
``apps.programs.DEFAULT_PROGRAM``.
"""

from __future__ import annotations

__all__ = ["DEMO_EVAL_SIZE", "DEMO_TRAIN_SIZE"]

#: Training examples (the bundled GSM8K train subset holds 200): 50 are held out for selection (``auto="light"``
#: scores every candidate on 50), the rest are rollout and TextGrad queries.
DEMO_TRAIN_SIZE = 200
#: Held-out GSM8K dev questions that both programs are evaluated on.
DEMO_EVAL_SIZE = 40
