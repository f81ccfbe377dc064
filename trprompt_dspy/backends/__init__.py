"""Every role behind one factory.

* ``stack`` — :class:`~trprompt_dspy.backends.stack.ModelStack` builds target, reward and TextGrad LMs and the
  prompt model from names (single-base mode: one vLLM server, the prompt model a LoRA adapter on the target);
  :func:`~trprompt_dspy.backends.stack.resolve_prompt_model` turns ``TRPromptOptimizer(prompt_model=...)`` into
  a prompt model.
* ``prompt_model/`` — the :class:`~trprompt_dspy.backends.prompt_model.base.PromptModel` protocol and its
  backends (transformers + PEFT, vLLM, any ``dspy.LM``, a fake), and LoRA training with TRL.
* ``textgrad_engine`` — TextGrad's engine on an explicit ``dspy.LM`` (never TextGrad's global one).
"""
