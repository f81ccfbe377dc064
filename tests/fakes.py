"""Scripted LMs for unit tests: the public offline stand-ins of :mod:`trprompt_dspy.testing`.

``scripted_lm(fn)`` gives an LM whose replies are ``fn(system, user) -> str``. ``arithmetic_responder``
answers DSPy ChatAdapter prompts generically (every output field listed in the system message; ``answer``
is the sum of the "a + b" in the question) and TextGrad's prompts with well-formed gradients and
``<IMPROVED_VARIABLE>`` updates. The tests use the same code users get, so the two cannot drift apart.
"""

from __future__ import annotations

from trprompt_dspy.testing import (
           ScriptedEngine,
           arithmetic_responder,
           instruction_following_responder,
           output_fields,
           scripted_lm,
)
from trprompt_dspy.testing import first_sum as solve

__all__ = ["ScriptedEngine", "scripted_lm", "arithmetic_responder", "instruction_following_responder", "output_fields",
           "solve"]
