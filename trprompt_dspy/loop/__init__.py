"""The TRPrompt loop, one module per step (``run.py`` calls them in order and checkpoints after each).

* ``run`` — :class:`~trprompt_dspy.loop.run.TRPromptRun`: iteration order, resume, selection (the student is
  candidate 0), bookkeeping. Receives its settings as a frozen :class:`~trprompt_dspy.loop.run.RunSettings`.
* ``rollouts`` — step 1: the prompt model writes instructions, the frozen target answers, the metric scores
  (also ``evaluate_program`` for validation and TextGrad minibatches).
* ``student_reference`` — the uncompiled student's own answers as the reference: "no instruction"
  candidates, what each instruction fixed or broke.
* ``trace_reward`` — step 1b: textual rewards built from the metric's trace, no LM needed (``rewards="trace"``,
  and the floor of the default ``"trace+critique"``).
* ``textual_reward`` — step 1b: the reward LM critiques each outcome without revealing the gold answer
  (``rewards="critique"``, or added to the trace-built reward where it agrees with the metric).
* ``answer_leaks`` — the guard that keeps gold answers out of rewards, instructions and t*.
* ``sft_data`` — step 2's data: (query, textual reward) -> instruction examples.
* ``refine_reward`` — step 3: TextGrad refines the optimal textual reward t*.
* ``metric_adapter`` — one calling convention for plain and feedback metrics.
* ``preflight`` — the smoke test before anything is spent: student, metric and prompt model once each.
* ``selection`` — the student is candidate 0; a sign test guards an iteration's lead.
"""
