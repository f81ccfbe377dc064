"""A deterministic, dependency-free prompt model for unit tests.

:class:`FakePromptModel` implements the :class:`~trprompt_dspy.backends.prompt_model.base.PromptModel` protocol
without any model: instructions come from a template (or a user function), ``train`` writes a tiny JSON
"adapter" folder, and every call is recorded so tests can check what the optimizer and the compiled
program asked for, how requests were batched and how many threads called at once.

Use it only in tests and examples; it does not learn anything, except that with ``memorize=True`` a
trained adapter answers a request it was trained on with the trained instruction.

Example:
    >>> from trprompt_dspy.backends.prompt_model.base import InstructionRequest
    >>> pm = FakePromptModel()
    >>> req = InstructionRequest("qa", "question -> answer", "question: 2+3?", "Correct.")
    >>> [out] = pm.generate([req])
    >>> out[0].startswith("Solve step by step. [qa|")
    True
    >>> pm.generate_calls, len(pm.requests)
    (1, 1)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trprompt_dspy.backends.prompt_model.base import (
    DEFAULT_MAX_INSTRUCTION_TOKENS,
    InstructionRequest,
    InstructionStats,
    SFTExample,
    TrainResult,
    check_generate_args,
)

__all__ = ["FakePromptModel", "FakeGenerateCall", "DEFAULT_TEMPLATE"]

logger = logging.getLogger(__name__)

#: Default instruction template. Fields: predictor, task, query, reward, digest (8 hex chars of
#: sha256(query + reward)), adapter (the active adapter folder's name or "base").
DEFAULT_TEMPLATE = "Solve step by step. [{predictor}|{digest}]"

_ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_DATA = "fake_adapter.json"


@dataclass(frozen=True)
class FakeGenerateCall:
    """One recorded ``generate`` call (one batch)."""

    requests: tuple[InstructionRequest, ...]
    temperature: float
    n: int
    max_new_tokens: int
    seed: int | None
    thread_id: int
    adapter_path: str | None


def request_digest(request: InstructionRequest) -> str:
    """8 hex characters identifying ``(query, reward)``; stable across processes."""
    return hashlib.sha256(f"{request.query}\x1f{request.reward}".encode()).hexdigest()[:8]


class FakePromptModel:
    """Template-driven prompt model that records its calls.

    Args:
        instruction_fn: Optional ``fn(request) -> str`` used instead of ``template``.
        template: ``str.format`` template; see :data:`DEFAULT_TEMPLATE` for the fields.
        base_model: The id reported by :meth:`describe` (as a real backend reports its base weights).
        delay: Seconds each ``generate`` call sleeps (lets tests observe concurrency).
        empty_if: Optional predicate; requests it accepts get ``""`` (the contract's "bad request").
        memorize: After :meth:`train` / :meth:`load_adapter`, answer a request seen in training with
            the highest-scored trained instruction for it.

    Attributes:
        calls: Every :class:`FakeGenerateCall`, in call order.
        train_calls: ``(examples, output_dir, seed)`` per :meth:`train` call.
        max_concurrency: Most ``generate`` calls that were running at the same time.

    Sampling: ``temperature == 0`` returns ``n`` identical greedy strings. ``temperature > 0`` appends a
    variant tag ``" (variant NNNNNN)"`` drawn from an RNG seeded by ``(seed, request, sample index)``
    when ``seed`` is given (reproducible), or from fresh entropy otherwise. ``max_new_tokens`` caps the
    number of whitespace-separated words.

    Example:
        >>> pm = FakePromptModel(template="Think about {predictor} first.")
        >>> req = InstructionRequest("qa", "question -> answer", "question: 2 + 3?", "Correct.")
        >>> pm.generate([req])
        [['Think about qa first.']]
        >>> pm.generate([req], temperature=0.8, n=2, seed=0)[0][0].startswith("Think about qa first. (variant ")
        True
        >>> pm.generate_calls
        2
    """

    trainable = True

    def __init__(
        self,
        instruction_fn: Callable[[InstructionRequest], str] | None = None,
        *,
        template: str = DEFAULT_TEMPLATE,
        base_model: str = "fake/prompt-model",
        delay: float = 0.0,
        empty_if: Callable[[InstructionRequest], bool] | None = None,
        memorize: bool = False,
    ) -> None:
        if instruction_fn is not None and not callable(instruction_fn):
            raise TypeError(f"instruction_fn must be callable(request) -> str; got {instruction_fn!r}.")
        if not isinstance(template, str):
            raise TypeError(f"template must be a str; got {type(template).__name__}.")
        if delay < 0:
            raise ValueError(f"delay must be >= 0 seconds; got {delay!r}.")
        self.instruction_fn = instruction_fn
        self.template = template
        self.base_model = base_model
        self.delay = float(delay)
        self.empty_if = empty_if
        self.memorize = memorize
        self.calls: list[FakeGenerateCall] = []
        self.train_calls: list[tuple[list[SFTExample], str, int]] = []
        self.max_concurrency = 0
        self._active = 0
        self._lock = threading.Lock()
        self._adapter_path: str | None = None
        self._memory: dict[InstructionRequest, str] = {}
        #: Instructions written and how many were cut at ``max_new_tokens`` words.
        self.instruction_stats = InstructionStats()

    # ------------------------------------------------------------------ protocol
    @property
    def adapter_path(self) -> str | None:
        return self._adapter_path

    def generate(
        self,
        requests: Sequence[InstructionRequest],
        *,
        temperature: float = 0.0,
        n: int = 1,
        max_new_tokens: int = DEFAULT_MAX_INSTRUCTION_TOKENS,
        seed: int | None = None,
    ) -> list[list[str]]:
        """Return ``n`` instructions per request (see the class docstring for sampling)."""
        requests = tuple(check_generate_args(requests, n=n, temperature=temperature, max_new_tokens=max_new_tokens))
        with self._lock:
            self.calls.append(FakeGenerateCall(requests, float(temperature), n, max_new_tokens, seed,
                                               threading.get_ident(), self._adapter_path))
            self._active += 1
            self.max_concurrency = max(self.max_concurrency, self._active)
            memory = dict(self._memory) if self.memorize else {}
        try:
            if self.delay:
                time.sleep(self.delay)  # outside the lock: concurrent callers overlap here
            return [self._samples(req, temperature, n, max_new_tokens, seed, memory) for req in requests]
        finally:
            with self._lock:
                self._active -= 1

    def train(
        self,
        examples: Sequence[SFTExample],
        *,
        output_dir: str | Path,
        lora: Any = None,
        sft: Any = None,
        seed: int = 0,
    ) -> TrainResult:
        """Write a JSON "adapter" folder holding the examples and make it active."""
        examples = list(examples)
        if not examples:
            raise ValueError("train() needs at least one SFTExample; got an empty sequence.")
        for i, ex in enumerate(examples):
            if not isinstance(ex, SFTExample):
                raise TypeError(f"examples[{i}] must be an SFTExample; got {type(ex).__name__}.")
        start = time.perf_counter()
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        config = {
            "fake_prompt_model": True,
            "base_model_name_or_path": self.base_model,
            "num_examples": len(examples),
            "seed": seed,
            "lora": lora.to_dict() if hasattr(lora, "to_dict") else lora,
            "sft": sft.to_dict() if hasattr(sft, "to_dict") else sft,
        }
        _write_json(out / _ADAPTER_CONFIG, config)
        _write_json(out / _ADAPTER_DATA, {"examples": [ex.to_dict() for ex in examples]})
        with self._lock:
            self.train_calls.append((examples, str(out), seed))
        self.load_adapter(out)
        steps = len(examples)
        losses = [round(1.0 / (1 + i), 6) for i in range(steps)]
        return TrainResult(adapter_path=str(out), num_examples=len(examples), steps=steps, losses=losses,
                           seconds=time.perf_counter() - start)

    def load_adapter(self, path: str | Path | None) -> None:
        """Activate a folder written by :meth:`train`, or go back to the base (``None``)."""
        if path is None:
            with self._lock:
                self._adapter_path, self._memory = None, {}
            return
        folder = Path(path)
        config_file = folder / _ADAPTER_CONFIG
        if not config_file.is_file():
            raise FileNotFoundError(f"No fake adapter at {str(folder)!r}: {_ADAPTER_CONFIG} is missing. "
                                    "Pass a folder written by FakePromptModel.train(), or None for the base.")
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if not config.get("fake_prompt_model"):
            raise ValueError(f"{str(config_file)!r} is not a FakePromptModel adapter (no 'fake_prompt_model' key).")
        memory: dict[InstructionRequest, tuple[float, str]] = {}
        data_file = folder / _ADAPTER_DATA
        if data_file.is_file():
            for raw in json.loads(data_file.read_text(encoding="utf-8")).get("examples", []):
                ex = SFTExample.from_dict(raw)
                score = float("-inf") if ex.score is None else float(ex.score)
                if ex.request not in memory or score > memory[ex.request][0]:
                    memory[ex.request] = (score, ex.instruction)
        with self._lock:
            self._adapter_path = str(folder)
            self._memory = {req: instr for req, (_, instr) in memory.items()}

    def describe(self) -> dict[str, Any]:
        return {"backend": "fake", "base_model": self.base_model, "adapter_path": self._adapter_path,
                "template": self.template if self.instruction_fn is None else None}

    # ------------------------------------------------------------------ helpers for tests
    @property
    def generate_calls(self) -> int:
        """How many ``generate`` batches were requested."""
        return len(self.calls)

    @property
    def requests(self) -> list[InstructionRequest]:
        """All requests, flattened over calls."""
        with self._lock:
            return [req for call in self.calls for req in call.requests]

    @property
    def thread_ids(self) -> set[int]:
        with self._lock:
            return {call.thread_id for call in self.calls}

    def reset_records(self) -> None:
        with self._lock:
            self.calls.clear()
            self.train_calls.clear()
            self.max_concurrency = 0

    def __deepcopy__(self, memo: dict[int, Any]) -> FakePromptModel:
        return self  # a prompt model is a shared resource, like the weights of a real one

    def _samples(self, req: InstructionRequest, temperature: float, n: int, max_new_tokens: int,
                 seed: int | None, memory: dict[InstructionRequest, str]) -> list[str]:
        if self.empty_if is not None and self.empty_if(req):
            return [""] * n
        if req in memory:
            base = memory[req]
        elif self.instruction_fn is not None:
            base = str(self.instruction_fn(req))
        else:
            adapter = Path(self._adapter_path).name if self._adapter_path else "base"
            base = self.template.format(predictor=req.predictor, task=req.task, query=req.query,
                                        reward=req.reward, digest=request_digest(req), adapter=adapter)
        out = []
        for i in range(n):
            text = base
            if temperature > 0:
                if seed is None:
                    rng = random.Random()
                else:
                    key = f"{seed}\x1f{i}\x1f{request_digest(req)}\x1f{req.predictor}".encode()
                    rng = random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))
                text = f"{base} (variant {rng.randrange(10**6):06d})"
            words = text.split(" ")
            self.instruction_stats.record(hit_cap=len(words) > max_new_tokens)
            out.append(" ".join(words[:max_new_tokens]) if len(words) > max_new_tokens else text)
        return out


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)
