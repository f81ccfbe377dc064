"""The mark an LM built by this library on local weights carries, so a prompt model can be a LoRA adapter on them.

``VLLMServer.dspy_lm()`` and ``models.local_lm()`` mark the ``dspy.LM`` they return;
:func:`~trprompt_dspy.backends.stack.resolve_prompt_model` reads the mark (single-base mode). It lives here,
below both ``serving`` and ``backends``, so that neither has to import the other to set or read it.

Example:
    >>> class LM: ...
    >>> lm = mark_local_base(LM(), LocalBase("smollm2-135m-instruct"))
    >>> local_base_of(lm).model, local_base_of(object())
    ('smollm2-135m-instruct', None)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["LocalBase", "local_base_of", "mark_local_base"]

_ATTR = "trprompt_local_base"


@dataclass(frozen=True)
class LocalBase:
    """Where a ``dspy.LM``'s weights live, so the prompt model can be an adapter on them.

    Attributes:
        model: Preset name or HF folder of the base weights (what LoRA training loads).
        base_url: The vLLM server serving them (``None``: in-process transformers).
        served_name: The base model's name on that server.
        lora: Whether that server loads LoRA adapters at run time.
        max_lora_rank: That server's ``--max-lora-rank`` (``None``: unknown).
    """

    model: str
    base_url: str | None = None
    served_name: str | None = None
    lora: bool = False
    max_lora_rank: int | None = None


def mark_local_base(lm: Any, base: LocalBase) -> Any:
    """Record on ``lm`` (a ``dspy.LM``) that it runs ``base``; returns ``lm``. Copies of the LM keep it."""
    setattr(lm, _ATTR, base)
    return lm


def local_base_of(lm: Any) -> LocalBase | None:
    """The :class:`LocalBase` of an LM built by this library on local weights, else ``None``."""
    base = getattr(lm, _ATTR, None)
    return base if isinstance(base, LocalBase) else None
