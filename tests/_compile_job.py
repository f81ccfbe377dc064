"""A small compile run in its own process, for kill-and-resume tests (see test_resume_kill.py).

Usage: python -m tests._compile_job LOG_DIR DELAY_S
Prints one JSON line at the end: the number of rollouts this process ran and the final stats.
"""

from __future__ import annotations

import json
import sys
import time

import dspy

from programs.math import MathCoT
from tests.fakes import arithmetic_responder, scripted_lm
from trprompt_dspy import TRPromptOptimizer
from trprompt_dspy.backends.prompt_model.fake import FakePromptModel


def main() -> None:
    log_dir, delay = sys.argv[1], float(sys.argv[2])

    def slow(system: str, user: str) -> str:
        time.sleep(delay)
        return arithmetic_responder(system, user)

    dspy.configure(lm=scripted_lm(slow))
    pm = FakePromptModel(template="Add the numbers carefully for {predictor}, then state the sum.")
    data = [dspy.Example(question=f"What is {i} + {i + 1}?", answer=str(2 * i + 1)).with_inputs("question")
            for i in range(12)]
    opt = TRPromptOptimizer(metric=lambda ex, pred, trace=None: float(pred.answer == ex.answer),
                            prompt_model=pm, log_dir=log_dir, display_progress=False, num_iterations=2,
                            queries_per_iteration=4, prompts_per_query=2, textgrad_steps=1,
                            textgrad_batch_size=2, val_size=3)
    compiled = opt.compile(MathCoT(), trainset=data[:9], valset=data[9:])
    rollouts = sum(1 for c in pm.calls if c.temperature > 0)
    print(json.dumps({"rollouts_run": rollouts, "iterations": len(compiled.detailed_results.iterations),
                      "best_score": compiled.detailed_results.best_score}))


if __name__ == "__main__":
    main()
