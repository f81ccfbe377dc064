"""Prompt-model backends behind one Protocol (:class:`~trprompt_dspy.backends.prompt_model.base.PromptModel`).

* ``hf.HFPromptModel`` — transformers + PEFT LoRA, trained with TRL (the default; CPU or GPU).
* ``lm_writer.LMInstructionWriter`` — any ``dspy.LM`` writes instructions (seeding iteration 0).
* ``fake.FakePromptModel`` — deterministic, for unit tests.
"""

from trprompt_dspy.backends.prompt_model.base import (
    InstructionRequest,
    PromptModel,
    SFTExample,
    TrainResult,
    build_messages,
)

__all__ = ["InstructionRequest", "PromptModel", "SFTExample", "TrainResult", "build_messages"]
