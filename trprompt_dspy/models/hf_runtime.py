"""Shared Hugging Face helpers: load a causal LM and generate batched chat completions.

Used by :class:`trprompt_dspy.models.engine.TransformersEngine` (the in-process ``dspy.LM`` engine) and by
the trainable prompt model. Generation is batched and left-padded, uses the tokenizer's chat template,
is greedy when ``temperature == 0``, and stops per row on EOS, on that row's stop strings or on that
row's token budget.

Example:
    >>> from trprompt_dspy.models.hf_runtime import load_causal_lm, generate_chats
    >>> model, tok = load_causal_lm("smollm2-135m-instruct")                       # doctest: +SKIP
    >>> [r.text for r in generate_chats(model, tok, [[{"role": "user", "content": "Hi"}]],
    ...                                 max_new_tokens=16)]                          # doctest: +SKIP
    ['Hello! How can I assist you today?']
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from trprompt_dspy._lazy import require

__all__ = ["GenerationResult", "load_causal_lm", "generate_chats", "terminator_ids"]

logger = logging.getLogger(__name__)

# Seeded sampling sets torch's global RNG; the lock keeps seed + generate atomic across threads.
_RNG_LOCK = threading.Lock()
_EXTRA_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")
_DTYPES = ("bfloat16", "float16", "float32", "auto", "checkpoint")


@dataclass
class GenerationResult:
    """The completions of one chat.

    Attributes:
        texts: ``n`` completions (special tokens removed, cut at the first stop string).
        prompt_tokens: Tokens of the templated prompt (without padding).
        completion_tokens: Generated tokens per completion (up to and including EOS).
        finish_reasons: ``"stop"`` (EOS or a stop string) or ``"length"`` (token budget) per completion.
    """

    texts: list[str]
    prompt_tokens: int
    completion_tokens: list[int] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The first completion."""
        return self.texts[0]

    @property
    def total_completion_tokens(self) -> int:
        """Generated tokens over all ``n`` completions."""
        return sum(self.completion_tokens)


def _torch_dtype(torch: Any, dtype: Any, device: str) -> Any:
    if not isinstance(dtype, str):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES} or a torch.dtype, got {dtype!r}")
    if dtype == "checkpoint":
        return "auto"  # transformers' name for the checkpoint's own dtype
    from trprompt_dspy.models.dtype import resolve_dtype

    return getattr(torch, resolve_dtype(dtype, device=device))


def load_causal_lm(path: str | os.PathLike[str], *, dtype: Any = "auto", device: str | None = None,
                   adapter_path: str | os.PathLike[str] | None = None) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, ready for batched chat generation.

    Args:
        path: A model folder, a preset name, a ``.gguf`` file or a hub id (see
            :func:`trprompt_dspy.models.provision.resolve_model`).
        dtype: ``"auto"`` (default: bfloat16 where the hardware computes it natively, else float32; see
            :mod:`trprompt_dspy.models.dtype`), ``"bfloat16"``, ``"float32"``, ``"float16"``,
            ``"checkpoint"`` (the checkpoint's own dtype) or a ``torch.dtype``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA when available, else CPU.
        adapter_path: A PEFT (LoRA) adapter folder to apply on top of the base model.

    Returns:
        ``(model, tokenizer)``: the model in eval mode; the tokenizer pads on the left and has a pad token.

    Raises:
        FileNotFoundError: ``adapter_path`` does not exist.
    """
    torch = require("torch", extra="train")
    transformers = require("transformers", extra="train")
    from trprompt_dspy.models.provision import resolve_model

    if adapter_path is not None and not os.path.isfile(os.path.join(os.fspath(adapter_path), "adapter_config.json")):
        raise FileNotFoundError(f"adapter_path {os.fspath(adapter_path)!r} is not a PEFT adapter folder (no "
                                "adapter_config.json in it)")
    if isinstance(dtype, str) and dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES} or a torch.dtype, got {dtype!r}")
    folder = resolve_model(path)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = _torch_dtype(torch, dtype, device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype)
    model.to(device)
    if adapter_path is not None:
        peft = require("peft", extra="train")
        model = peft.PeftModel.from_pretrained(model, os.fspath(adapter_path))
    model.eval()
    gen_cfg = model.generation_config
    if gen_cfg.pad_token_id is None:
        gen_cfg.pad_token_id = tokenizer.pad_token_id
    logger.info("Loaded %s (%s, %s%s)", folder, getattr(model, "dtype", torch_dtype), device,
                f", adapter {adapter_path}" if adapter_path else "")
    return model, tokenizer


def terminator_ids(model: Any, tokenizer: Any) -> set[int]:
    """Token ids that end a completion: the configured EOS ids plus common chat end-of-turn tokens."""
    ids: set[int] = set()
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for tok in _EXTRA_END_TOKENS:
        if tok in vocab and tok in (tokenizer.all_special_tokens or []) + list(tokenizer.added_tokens_encoder):
            ids.add(int(vocab[tok]))
    return {int(i) for i in ids}


def _per_chat(value: Any, count: int, name: str, kind: type) -> list[Any]:
    if isinstance(value, kind) or value is None:
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries but there are {count} chats")
    return values


def _normalize_stops(stop: Any, count: int) -> list[tuple[str, ...]]:
    if stop is None or isinstance(stop, str):
        return [((stop,) if stop else ())] * count
    items = list(stop)
    if all(isinstance(s, str) for s in items):
        return [tuple(s for s in items if s)] * count
    if len(items) != count:
        raise ValueError(f"per-chat stop has {len(items)} entries but there are {count} chats")
    return [tuple(s for s in ((row,) if isinstance(row, str) else (row or ())) if s) for row in items]


def _make_stopper(transformers: Any, torch: Any, tokenizer: Any, prompt_len: int, stops: list[tuple[str, ...]],
                  budgets: list[int]) -> Any:
    """A StoppingCriteria that ends each row on its own stop strings or its own token budget."""
    tail = max((len(s) for row in stops for s in row), default=0) + 8

    class _RowStopper(transformers.StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            generated = input_ids.shape[1] - prompt_len
            for row in range(input_ids.shape[0]):
                if generated >= budgets[row]:
                    done[row] = True
                elif stops[row]:
                    text = tokenizer.decode(input_ids[row, max(prompt_len, input_ids.shape[1] - tail):],
                                            skip_special_tokens=True)
                    done[row] = any(s in text for s in stops[row])
            return done

    return _RowStopper()


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def generate_chats(model: Any, tokenizer: Any, chats: Sequence[Sequence[dict[str, str]]], *,
                   max_new_tokens: int | Sequence[int], temperature: float | None = 0.0, top_p: float | None = 1.0,
                   top_k: int | None = None, n: int = 1, seed: int | None = None,
                   stop: str | Sequence[str] | Sequence[Sequence[str]] | None = None) -> list[GenerationResult]:
    """Generate completions for several chats in one left-padded batch.

    Args:
        model: A causal LM (from :func:`load_causal_lm`).
        tokenizer: Its tokenizer (left padding, with a chat template).
        chats: One list of ``{"role", "content"}`` messages per prompt.
        max_new_tokens: Token budget, shared or one per chat.
        temperature: 0 or None means greedy decoding; > 0 samples.
        top_p: Nucleus sampling threshold (sampling only).
        top_k: Top-k sampling cut-off (sampling only; None or 0 means no cut-off).
        n: Completions per chat (``num_return_sequences``).
        seed: Seed for sampling; seeded calls are serialized with a process-wide lock so that they
            are reproducible.
        stop: Stop strings, shared (``["\\n\\n"]``) or one list per chat. Completions are cut before the
            first stop string, and each row stops generating once its stop string appears.

    Returns:
        One :class:`GenerationResult` per chat, in order.

    Raises:
        ValueError: Bad arguments (empty chats, n < 1, negative temperature, no chat template...).
    """
    torch = require("torch", extra="train")
    transformers = require("transformers", extra="train")
    if not chats:
        return []
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if temperature is not None and temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    for i, chat in enumerate(chats):
        if not chat or not all(isinstance(m, dict) and "role" in m and "content" in m for m in chat):
            raise ValueError(f"chat {i} must be a non-empty list of {{'role', 'content'}} dicts, got {chat!r:.200}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer of {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; "
                         "use an instruction-tuned model")
    budgets = [int(b) for b in _per_chat(max_new_tokens, len(chats), "max_new_tokens", int)]
    if any(b < 1 for b in budgets):
        raise ValueError(f"max_new_tokens must be >= 1, got {budgets}")
    stops = _normalize_stops(stop, len(chats))
    if tokenizer.padding_side != "left":
        tokenizer.padding_side = "left"
    enc = tokenizer.apply_chat_template([list(c) for c in chats], add_generation_prompt=True, return_dict=True,
                                        return_tensors="pt", padding=True)
    enc = {k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    prompt_len = enc["input_ids"].shape[1]
    prompt_tokens = enc["attention_mask"].sum(dim=1).tolist()
    row_stops = [s for s in stops for _ in range(n)]
    row_budgets = [b for b in budgets for _ in range(n)]
    do_sample = bool(temperature) and temperature > 0
    gen_kwargs: dict[str, Any] = {"max_new_tokens": max(budgets), "num_return_sequences": n, "do_sample": do_sample,
                                  "pad_token_id": model.generation_config.pad_token_id or tokenizer.pad_token_id,
                                  "eos_token_id": sorted(terminator_ids(model, tokenizer))}
    if do_sample:
        gen_kwargs.update(temperature=float(temperature), top_p=1.0 if top_p is None else float(top_p),
                          top_k=int(top_k) if top_k else 0)
    else:
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    stopper = _make_stopper(transformers, torch, tokenizer, prompt_len, row_stops, row_budgets)
    gen_kwargs["stopping_criteria"] = transformers.StoppingCriteriaList([stopper])
    lock = _RNG_LOCK if (do_sample and seed is not None) else _NullLock()
    with lock, torch.inference_mode():
        if do_sample and seed is not None:
            torch.manual_seed(int(seed))
        output = model.generate(**enc, **gen_kwargs)
    ends = terminator_ids(model, tokenizer) | {int(gen_kwargs["pad_token_id"])}
    results = [GenerationResult(texts=[], prompt_tokens=int(p)) for p in prompt_tokens]
    for row, seq in enumerate(output[:, prompt_len:].tolist()):
        chat = row // n
        seq = seq[: row_budgets[row]]
        end = next((i for i, t in enumerate(seq) if t in ends), None)
        count = len(seq) if end is None else end + 1
        text, stopped = _cut_at_stop(tokenizer.decode(seq[:count], skip_special_tokens=True), row_stops[row])
        reason = "stop" if (stopped or end is not None) else "length"
        results[chat].texts.append(text)
        results[chat].completion_tokens.append(count)
        results[chat].finish_reasons.append(reason)
    return results


class _NullLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
