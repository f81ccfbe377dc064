"""Math word-problem programs: zero-shot CoT and a two-stage plan → solve program.

Example:
    >>> import dspy
    >>> from dspy.utils import DummyLM
    >>> lm = DummyLM([{"reasoning": "2 + 3 = 5", "answer": "5"}])
    >>> with dspy.context(lm=lm):
    ...     MathCoT()(question="What is 2 + 3?").answer
    '5'
"""

from __future__ import annotations

import dspy


class SolveMath(dspy.Signature):
    """Solve the math problem."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField(desc="the final answer only (a number or expression), no units or words")


class WritePlan(dspy.Signature):
    """Write a short numbered plan of the calculations needed to solve the math problem. Do not compute."""

    question: str = dspy.InputField()
    plan: str = dspy.OutputField()


class FollowPlan(dspy.Signature):
    """Solve the math problem by following the plan."""

    question: str = dspy.InputField()
    plan: str = dspy.InputField()
    answer: str = dspy.OutputField(desc="the final answer only (a number or expression), no units or words")


class MathCoT(dspy.Module):
    """Zero-shot chain of thought: ``question -> reasoning, answer`` (predictor name ``cot.predict``)."""

    def __init__(self) -> None:
        super().__init__()
        self.cot = dspy.ChainOfThought(SolveMath)

    def forward(self, question: str) -> dspy.Prediction:
        return self.cot(question=question)


class PlanAndSolve(dspy.Module):
    """Two stages: ``plan`` (question -> plan) then ``solve`` (question, plan -> reasoning, answer)."""

    def __init__(self) -> None:
        super().__init__()
        self.plan = dspy.Predict(WritePlan)
        self.solve = dspy.ChainOfThought(FollowPlan)

    def forward(self, question: str) -> dspy.Prediction:
        plan = self.plan(question=question).plan
        pred = self.solve(question=question, plan=plan)
        return dspy.Prediction(plan=plan, **dict(pred.items()))
