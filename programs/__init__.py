"""Example DSPy programs used by the demo, the benchmarks and the tests.

* :class:`programs.math.MathCoT` — zero-shot chain of thought, one predictor (``cot.predict``).
* :class:`programs.math.PlanAndSolve` — two predictors: ``plan`` writes a plan, ``solve`` follows it.

Both take ``question`` and return ``answer``. Load one by dotted path, e.g. ``programs.math:MathCoT``
(see :func:`trprompt_dspy.apps.programs.load_program`).
"""

from programs.math import MathCoT, PlanAndSolve

__all__ = ["MathCoT", "PlanAndSolve"]
