"""The TRPrompt loop, one module per step (``run.py`` calls them in order and checkpoints after each).

* ``run`` — :class:`~trprompt_dspy.loop.run.TRPromptRun`: iteration order, resume, selection (the student is
  candidate 0), bookkeeping. Receives its settings as a frozen :class:`~trprompt_dspy.loop.run.RunSettings`.
* ``rollouts`` — step 1: the prompt model writes instructions, the frozen target answers, the metric scores
  (also ``evaluate_program`` for validation and TextGrad minibatches).
* ``textual_reward`` — step 1b: the reward LM critiques each outcome without revealing the gold answer.
* ``answer_leaks`` — the guard that keeps gold answers out of rewards, instructions and t*.
* ``sft_data`` — step 2's data: (query, textual reward) -> instruction examples.
* ``refine_reward`` — step 3: TextGrad refines the optimal textual reward t*.
* ``metric_adapter`` — one calling convention for plain and feedback metrics.
"""
