"""A prompt model backed by any ``dspy.LM``: a stronger model writes the instructions.

TRPrompt can seed iteration 0 from a stronger LM (for example the reward LM) instead of the untrained
small prompt model. :class:`LMInstructionWriter` renders each request with
:func:`~trprompt_dspy.backends.prompt_model.base.build_messages` (the exact text the trained prompt model sees)
and sends it through DSPy 3.4's non-deprecated ``lm(dspy.lm15.Request(...))`` API, so caching,
retries, history, callbacks and usage tracking all behave as for any other DSPy call.

It cannot be fine-tuned: :meth:`LMInstructionWriter.train` raises ``TypeError``.

Example:
    >>> import dspy
    >>> writer = LMInstructionWriter(dspy.LM("openai/gpt-4o-mini"))  # doctest: +SKIP
    >>> writer.generate([request], temperature=0.8, n=3, seed=0)       # doctest: +SKIP
    [['Compute the sum ...', 'Add the numbers ...', '...']]
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextvars import copy_context
from pathlib import Path
from typing import Any

from trprompt_dspy.backends.prompt_model.base import (
    DEFAULT_MAX_INSTRUCTION_TOKENS,
    InstructionRequest,
    SFTExample,
    TrainResult,
    build_messages,
    check_generate_args,
)

__all__ = ["LMInstructionWriter"]

logger = logging.getLogger(__name__)

_SEED_STRIDE = 100_003  # rollout ids of seed s are s * stride + sample index


class LMInstructionWriter:
    """Prompt model that asks a ``dspy.LM`` to write each instruction.

    Args:
        lm: Any ``dspy.LM`` (or ``DummyLM``) built on DSPy's managed engines; API models, local
            OpenAI-compatible servers and custom ``engine=`` LMs all work.
        num_threads: How many LM calls one ``generate`` batch runs at once.
        max_tokens: Overrides ``max_new_tokens`` for every call (useful for reasoning models that
            need room to think). ``None`` uses the caller's ``max_new_tokens``.

    Sampling: at ``temperature == 0`` each request is sent once and the answer repeated ``n`` times.
    At ``temperature > 0`` sample ``i`` is a separate call; with a ``seed`` it carries
    ``rollout_id = seed * 100003 + i`` and ``Request.config.seed = seed + i`` (reproducible through
    DSPy's cache), without a seed it bypasses the cache (``cache=False``).

    A request whose call fails yields ``""`` (logged); if every call of a batch fails, the first error
    is raised, because that is a systemic failure (no credentials, server down).

    Example:
        >>> from trprompt_dspy.testing import scripted_lm
        >>> writer = LMInstructionWriter(scripted_lm(lambda system, user: "Add the two numbers."))
        >>> req = InstructionRequest("qa", "question -> answer", "question: 2 + 3?", "Correct.")
        >>> writer.generate([req], n=2)
        [['Add the two numbers.', 'Add the two numbers.']]
    """

    trainable = False

    def __init__(self, lm: Any, *, num_threads: int = 8, max_tokens: int | None = None) -> None:
        import dspy

        if not isinstance(lm, dspy.BaseLM):
            raise TypeError(f"LMInstructionWriter needs a dspy.LM (a dspy.BaseLM); got {type(lm).__name__}. "
                            "Build one with dspy.LM('provider/model', ...).")
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads must be a positive integer; got {num_threads!r}.")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive integer or None; got {max_tokens!r}.")
        self.lm = lm
        self.num_threads = num_threads
        self.max_tokens = max_tokens

    @property
    def adapter_path(self) -> str | None:
        return None

    def generate(
        self,
        requests: Sequence[InstructionRequest],
        *,
        temperature: float = 0.0,
        n: int = 1,
        max_new_tokens: int = DEFAULT_MAX_INSTRUCTION_TOKENS,
        seed: int | None = None,
    ) -> list[list[str]]:
        """Return ``n`` LM-written instructions per request, in request order."""
        requests = check_generate_args(requests, n=n, temperature=temperature, max_new_tokens=max_new_tokens)
        if not requests:
            return []
        samples = 1 if temperature == 0 else n
        jobs = [(r, s) for r in range(len(requests)) for s in range(samples)]
        max_tokens = self.max_tokens or max_new_tokens

        def one(job: tuple[int, int]) -> str | BaseException:
            r, s = job
            try:
                return self._call(requests[r], temperature, max_tokens, seed, s)
            except Exception as exc:  # one bad request must not sink the batch (contract)
                return exc

        if len(jobs) == 1 or self.num_threads == 1:
            results = [one(job) for job in jobs]
        else:
            # Each job runs in a copy of the caller's context so dspy.context(...) overrides apply.
            with ThreadPoolExecutor(max_workers=min(self.num_threads, len(jobs))) as pool:
                futures = [pool.submit(copy_context().run, one, job) for job in jobs]
                results = [f.result() for f in futures]
        errors = [res for res in results if isinstance(res, BaseException)]
        if errors and len(errors) == len(results):
            raise RuntimeError(f"LMInstructionWriter: all {len(results)} calls to {self.lm.model!r} failed; "
                               f"first error: {errors[0]!r}") from errors[0]
        for err in errors[:3]:
            logger.warning("LMInstructionWriter: one instruction call to %r failed (using ''): %r",
                           self.lm.model, err)
        texts = ["" if isinstance(res, BaseException) else res for res in results]
        out = []
        for r in range(len(requests)):
            got = texts[r * samples:(r + 1) * samples]
            out.append(got * n if samples == 1 else got)
        return out

    def train(self, examples: Sequence[SFTExample], *, output_dir: str | Path, lora: Any = None,
              sft: Any = None, seed: int = 0) -> TrainResult:
        raise TypeError(
            f"LMInstructionWriter ({self.lm.model!r}) wraps a dspy.LM and cannot be fine-tuned. It is meant "
            "to write the instructions of iteration 0; train a local prompt model (e.g. the transformers/PEFT "
            "backend) on its outputs instead."
        )

    def load_adapter(self, path: str | Path | None) -> None:
        if path is not None:
            raise ValueError(f"LMInstructionWriter has no adapters; got path={str(path)!r}. "
                             "Use load_adapter(None), or a trainable prompt model for adapters.")

    def describe(self) -> dict[str, Any]:
        return {"backend": "dspy_lm", "base_model": self.lm.model, "adapter_path": None,
                "max_tokens": self.max_tokens}

    def __deepcopy__(self, memo: dict[int, Any]) -> LMInstructionWriter:
        return self

    def _call(self, request: InstructionRequest, temperature: float, max_tokens: int, seed: int | None,
              sample: int) -> str:
        from dspy.lm15 import Config, Message, Request

        messages = build_messages(request)
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or None
        turns = tuple(Message.assistant(m["content"]) if m["role"] == "assistant" else Message.user(m["content"])
                      for m in messages if m["role"] != "system")
        config = Config(max_tokens=max_tokens, temperature=float(temperature),
                        seed=None if seed is None else seed + sample)
        lm_request = Request(model=self.lm.model, messages=turns, system=system, config=config)
        kwargs: dict[str, Any] = {}
        if temperature > 0:
            if seed is None:
                kwargs["cache"] = False
            else:
                kwargs["rollout_id"] = seed * _SEED_STRIDE + sample
        response = self.lm(lm_request, **kwargs)
        return (response.text or "").strip()
