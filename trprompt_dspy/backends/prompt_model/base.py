"""The prompt-model contract: who writes the query-specific instruction.

TRPrompt's prompt model Π maps *(predictor role, query, textual reward)* to an instruction for the
target model. Everything the optimizer and the compiled program need from Π is the small
:class:`PromptModel` protocol below; backends (HF transformers + PEFT, vLLM, a stronger ``dspy.LM``
used to seed iteration 0, and a fake for unit tests) implement it.

All backends render a request into chat messages with :func:`build_messages`, so an adapter trained
through one backend is prompted identically by another.

Example:
    >>> req = InstructionRequest(predictor="qa", task="question -> answer",
    ...                          query="question: What is 2 + 3?", reward="The answer is correct.")
    >>> [m["role"] for m in build_messages(req)]
    ['system', 'user']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from trprompt_dspy.config import LoraSettings, SFTSettings

__all__ = [
    "InstructionRequest",
    "SFTExample",
    "TrainResult",
    "PromptModel",
    "SYSTEM_PROMPT",
    "NO_INSTRUCTION",
    "is_no_instruction",
    "DEFAULT_MAX_INSTRUCTION_TOKENS",
    "INSTRUCTION_STOP",
    "build_messages",
    "check_generate_args",
    "InstructionStats",
    "instruction_stats",
    "cap_report",
]

#: Token budget of one instruction (the optimizer's ``max_instruction_tokens`` and the compiled program's
#: ``generation["max_new_tokens"]``). Short enough that the target's prompt grows by little, long enough for
#: one or two complete sentences (the system prompt asks for under 40 words). The 135M prompt model at a
#: 128-token cap ended 36 of 40 demo instructions mid-sentence.
DEFAULT_MAX_INSTRUCTION_TOKENS = 48

#: An instruction is one paragraph: the local backends stop generating at the first blank line. Without it
#: the single-base Qwen2.5-Coder-0.5B prompt model went on into numbered step-by-step plans and 16 of 40
#: held-out instructions hit the 48-token cap mid-sentence (demo, 2026-12-01).
INSTRUCTION_STOP: tuple[str, ...] = ("\n\n",)

#: What the prompt model writes to add nothing: the predictor then runs with its own instructions only, exactly
#: as the uncompiled program does (no extra target tokens). "No instruction" is a candidate for every training
#: query (the student's own answer is its rollout), so the prompt model can learn when to abstain.
NO_INSTRUCTION = "(no instruction)"

SYSTEM_PROMPT = (
    "You write instructions for another language model. Given a task, one query and a description of "
    "the ideal outcome, write one or two short sentences (under 40 words) telling the model how to handle "
    "this specific query. Do not solve the query, do no arithmetic and never state its final answer. "
    f"If the model does best on this query without extra guidance, write exactly {NO_INSTRUCTION}"
)


def is_no_instruction(text: str | None) -> bool:
    """Whether ``text`` is the prompt model's abstention (:data:`NO_INSTRUCTION`, case and punctuation aside).

    Example:
        >>> is_no_instruction("(No instruction)."), is_no_instruction("no instruction"), is_no_instruction("Add.")
        (True, True, False)
    """
    core = "".join(ch for ch in (text or "").lower() if ch.isalnum() or ch == " ").strip()
    return core == "no instruction"


@dataclass(frozen=True)
class InstructionRequest:
    """One request to the prompt model.

    Attributes:
        predictor: The predictor's name in the program (``"qa"``, ``"cot.predict"``); one prompt model
            serves every predictor, so the name is part of its input.
        task: The predictor's signature and base instructions, as text.
        query: The predictor's input fields rendered as ``"name: value"`` lines.
        reward: The textual reward to condition on: a rollout's critique during training, the optimal
            textual reward t* at inference.

    Example:
        >>> req = InstructionRequest(predictor="qa", task="question -> answer", query="question: 2 + 3?",
        ...                          reward="The answer is correct.")
        >>> InstructionRequest.from_dict(req.to_dict()) == req
        True
    """

    predictor: str
    task: str
    query: str
    reward: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InstructionRequest:
        return cls(**{k: str(data[k]) for k in ("predictor", "task", "query", "reward")})


@dataclass(frozen=True)
class SFTExample:
    """A supervised example for the prompt model: ``request`` → ``instruction`` (the completion)."""

    request: InstructionRequest
    instruction: str
    score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"request": self.request.to_dict(), "instruction": self.instruction, "score": self.score}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SFTExample:
        return cls(InstructionRequest.from_dict(data["request"]), str(data["instruction"]), data.get("score"))


@dataclass(frozen=True)
class TrainResult:
    """What one fine-tuning run produced.

    ``losses`` holds one loss per logging step (one batch each by default), so ``losses[0]`` and
    ``final_loss`` compare different batches and on a small dataset are mostly noise; ``epoch_losses``
    (mean loss per epoch, ``[]`` when the backend does not report epochs) is the number to compare.
    """

    adapter_path: str
    num_examples: int
    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    epoch_losses: list[float] = field(default_factory=list)

    @property
    def final_loss(self) -> float | None:
        """The last logged (single-batch) loss; kept for older readers of ``train.json``."""
        return self.losses[-1] if self.losses else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "final_loss": self.final_loss}


@runtime_checkable
class PromptModel(Protocol):
    """What TRPrompt needs from a prompt model.

    Contract:
        * ``generate`` returns one list per request, each with ``n`` strings, in request order. It never
          raises for one bad request (return ``""`` for it); it may raise for systemic failures.
        * ``generate`` is thread-safe; backends batch concurrent calls where they can.
        * ``temperature == 0`` is greedy and deterministic.
        * ``train`` fine-tunes a fresh adapter on top of the base weights (the base is never changed),
          writes it under ``output_dir`` (safetensors) and makes it the active adapter.
        * ``load_adapter(None)`` switches back to the bare base model.

    Example:
        Any object with these members is a prompt model; the fake one is the smallest real example:

        >>> from trprompt_dspy.backends.prompt_model.fake import FakePromptModel
        >>> pm = FakePromptModel(template="Add the numbers.")
        >>> isinstance(pm, PromptModel)
        True
        >>> req = InstructionRequest("qa", "question -> answer", "question: 2 + 3?", "Correct.")
        >>> pm.generate([req], n=2)
        [['Add the numbers.', 'Add the numbers.']]
    """

    @property
    def adapter_path(self) -> str | None: ...

    def generate(
        self,
        requests: Sequence[InstructionRequest],
        *,
        temperature: float = 0.0,
        n: int = 1,
        max_new_tokens: int = DEFAULT_MAX_INSTRUCTION_TOKENS,
        seed: int | None = None,
    ) -> list[list[str]]: ...

    def train(
        self,
        examples: Sequence[SFTExample],
        *,
        output_dir: str | Path,
        lora: LoraSettings,
        sft: SFTSettings,
        seed: int = 0,
    ) -> TrainResult: ...

    def load_adapter(self, path: str | Path | None) -> None: ...

    def describe(self) -> dict[str, Any]:
        """JSON-able description (backend, base model id, adapter) for artifacts and logs."""
        ...


def build_messages(request: InstructionRequest) -> list[dict[str, str]]:
    """Render a request as chat messages; the same rendering is used for training and generation.

    The query comes last: at inference every request of a predictor shares the system prompt, the
    predictor, the task and t*, so a server with prefix caching (vLLM) computes that prefix once and
    prefills only the query of each call.
    """
    user = (
        f"Predictor: {request.predictor}\n"
        f"Task: {request.task}\n\n"
        f"Ideal outcome (textual reward):\n{request.reward}\n\n"
        f"Query:\n{request.query}\n\n"
        "Write the instruction."
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def check_generate_args(requests: Sequence[InstructionRequest], *, n: int, temperature: float | None,
                        max_new_tokens: int) -> list[InstructionRequest]:
    """Validate :meth:`PromptModel.generate`'s arguments (shared by every backend); return the requests.

    Raises:
        TypeError: ``requests`` is not a sequence of :class:`InstructionRequest`.
        ValueError: ``n < 1``, ``temperature < 0`` or ``max_new_tokens < 1``.
    """
    if isinstance(requests, (InstructionRequest, str)) or not isinstance(requests, Sequence):
        raise TypeError(f"requests must be a sequence of InstructionRequest; got {type(requests).__name__} "
                        "(wrap a single request in a list).")
    for i, r in enumerate(requests):
        if not isinstance(r, InstructionRequest):
            raise TypeError(f"requests[{i}] must be an InstructionRequest; got {type(r).__name__}: {r!r:.200}.")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer; got n={n!r}.")
    if temperature is None or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy); got {temperature!r}.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer; got {max_new_tokens!r}.")
    return list(requests)


class InstructionStats:
    """Thread-safe counts of the instructions a backend wrote and of those cut at the token cap.

    An instruction that hits ``max_new_tokens`` ends mid-sentence; the target then reads half a plan.
    Backends that know why generation stopped (vLLM's ``finish_reason``, transformers' EOS) record it
    here, and the optimizer and the demo report the rate (the goal is under 5 %).

    Example:
        >>> stats = InstructionStats()
        >>> stats.record(hit_cap=False, prompt_tokens=180, completion_tokens=30)
        >>> stats.record(hit_cap=True, completion_tokens=48)
        >>> stats.snapshot()
        {'instructions': 2, 'hit_cap': 1, 'prompt_tokens': 180, 'completion_tokens': 78}
    """

    def __init__(self) -> None:
        import threading

        self._lock = threading.Lock()
        self._counts = {"instructions": 0, "hit_cap": 0, "prompt_tokens": 0, "completion_tokens": 0}

    def record(self, *, hit_cap: bool, count: int = 1, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """Count ``count`` instructions (``hit_cap``: they ended at the token cap) and the tokens they cost."""
        with self._lock:
            self._counts["instructions"] += count
            self._counts["hit_cap"] += count if hit_cap else 0
            self._counts["prompt_tokens"] += int(prompt_tokens)
            self._counts["completion_tokens"] += int(completion_tokens)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def instruction_stats(prompt_model: Any) -> dict[str, int] | None:
    """``{"instructions", "hit_cap", "prompt_tokens", "completion_tokens"}`` so far, for backends that count
    them (``None`` for those that do not)."""
    stats = getattr(prompt_model, "instruction_stats", None)
    return stats.snapshot() if isinstance(stats, InstructionStats) else None


def cap_report(before: dict[str, int] | None, after: dict[str, int] | None, max_tokens: int) -> dict[str, Any]:
    """Instructions written between two :func:`instruction_stats` snapshots and how many hit the cap.

    Returns ``{}`` when either snapshot is ``None`` (a backend that does not count).

    Example:
        >>> cap_report({"instructions": 2, "hit_cap": 1}, {"instructions": 6, "hit_cap": 2}, 48)
        {'instructions': 4, 'hit_cap': 1, 'hit_cap_rate': 0.25, 'max_instruction_tokens': 48}
    """
    if before is None or after is None:
        return {}
    made, capped = after["instructions"] - before["instructions"], after["hit_cap"] - before["hit_cap"]
    return {"instructions": made, "hit_cap": capped, "hit_cap_rate": round(capped / made, 4) if made else 0.0,
            "max_instruction_tokens": max_tokens}
