"""The model stack, the dtype choice and pinned prompt models (no model loads here)."""

from __future__ import annotations

import copy
import logging
import threading
import time

import dspy
import pytest

from tests.fakes import scripted_lm
from trprompt_dspy.backends.prompt_model.base import InstructionRequest, instruction_stats
from trprompt_dspy.backends.prompt_model.fake import FakePromptModel
from trprompt_dspy.backends.prompt_model.hf import HFPromptModel
from trprompt_dspy.backends.prompt_model.pinned import PinnedPromptModel
from trprompt_dspy.backends.prompt_model.vllm import VLLMPromptModel
from trprompt_dspy.backends.stack import (
    LocalBase,
    ModelStack,
    local_base_of,
    mark_local_base,
    resolve_prompt_model,
)
from trprompt_dspy.models.dtype import choose_dtype, cpu_info, native_bf16
from trprompt_dspy.models.presets import DEFAULT_PROMPT_MODEL, UnknownModelError

REQ = InstructionRequest("qa", "question -> answer", "question: 2 + 3?", "Correct.")


# --------------------------------------------------------------------------- dtype


@pytest.mark.parametrize(("device", "flags", "cap", "expected"), [
    ("cpu", {"avx2", "fma"}, None, "float32"),                       # AMD EPYC Zen 2/3: bf16 emulated
    ("cpu", {"avx2", "avx512f", "avx512bw"}, None, "float32"),       # AVX-512 without BF16
    ("cpu", {"avx2", "avx512f", "avx512_bf16"}, None, "bfloat16"),   # Zen 4 / Cooper Lake
    ("cpu", {"avx2", "amx_bf16", "amx_tile"}, None, "bfloat16"),     # Sapphire Rapids AMX
    ("cuda", set(), (9, 0), "bfloat16"),                             # H100/H200
    ("cuda:1", set(), (8, 0), "bfloat16"),                           # A100
    ("gpu", set(), (7, 5), "float16"),                               # T4: no bf16 units
])
def test_auto_dtype_follows_the_hardware(device, flags, cap, expected):
    assert choose_dtype("auto", device=device, cpu_flags=flags, cuda_capability=cap) == expected
    assert choose_dtype(None, device=device, cpu_flags=flags, cuda_capability=cap) == expected
    assert native_bf16(device, cpu_flags=flags, cuda_capability=cap) == (expected == "bfloat16")


def test_explicit_dtype_wins_and_bad_names_are_refused():
    assert choose_dtype("bfloat16", device="cpu", cpu_flags=set()) == "bfloat16"
    assert choose_dtype("float32", device="cpu", cpu_flags={"avx512_bf16"}) == "float32"
    with pytest.raises(ValueError, match="'auto'.*bfloat16"):
        choose_dtype("bf16", device="cpu", cpu_flags=set())


def test_cpu_info_reports_model_and_speed_flags():
    info = cpu_info()
    assert info["model"] and info["cores"] >= 1
    assert all(f.startswith(("avx2", "avx512", "amx")) for f in info["flags"])
    assert info["native_bf16"] == bool({"avx512_bf16", "amx_bf16"} & set(info["flags"]))


def test_servers_and_models_default_to_auto_dtype():
    from trprompt_dspy.serving import VLLMServer

    server = VLLMServer("smollm2-135m-instruct", device="cpu")
    assert server.dtype == "auto"
    assert server.resolved_dtype == ("bfloat16" if cpu_info()["native_bf16"] else "float32")
    assert "--dtype" in (cmd := server.build_command("/py", "/m")) and cmd[cmd.index("--dtype") + 1] == \
        server.resolved_dtype
    assert HFPromptModel("smollm2").dtype == "auto"
    with pytest.raises(ValueError, match="dtype"):
        VLLMServer("smollm2-135m-instruct", dtype="bf16")


def test_auto_dtype_is_logged_once(caplog):
    from trprompt_dspy.models import dtype as dtype_mod

    dtype_mod._log_choice.cache_clear()
    with caplog.at_level(logging.INFO, logger="trprompt_dspy.models.dtype"):
        dtype_mod.resolve_dtype("auto", device="cpu")
        dtype_mod.resolve_dtype("auto", device="cpu")
        dtype_mod.resolve_dtype("float32", device="cpu")
    lines = [r.getMessage() for r in caplog.records if "dtype=auto" in r.getMessage()]
    assert len(lines) == 1 and "Pass dtype=" in lines[0]


# --------------------------------------------------------------------------- stack: bad inputs


def test_bad_stack_inputs_fail_before_any_model_loads():
    with pytest.raises(UnknownModelError, match="Known presets"):
        ModelStack("qwen-7b-typo")
    with pytest.raises(UnknownModelError, match="Known presets"):
        ModelStack("qwen2.5-coder-0.5b-instruct", prompt_model="smolm2")
    with pytest.raises(ValueError, match="prompt_model='same'.*no local weights"):
        ModelStack("gpt-x", backend="api", api_base="http://127.0.0.1:9/v1", prompt_model="same")
    with pytest.raises(ValueError, match="needs api_base"):
        ModelStack("gpt-x", backend="api")
    with pytest.raises(ValueError, match="only used with backend='api'"):
        ModelStack("qwen2.5-coder-0.5b-instruct", api_base="http://127.0.0.1:9/v1")
    with pytest.raises(ValueError, match="backend must be one of"):
        ModelStack("qwen2.5-coder-0.5b-instruct", backend="ollama")
    with pytest.raises(ValueError, match="dtype"):
        ModelStack("qwen2.5-coder-0.5b-instruct", dtype="fp8")
    with pytest.raises(ValueError, match="max_lora_rank must be a positive integer"):
        ModelStack("qwen2.5-coder-0.5b-instruct", max_lora_rank=0)
    with pytest.raises(ValueError, match="must not set 'enable_lora'"):
        ModelStack("qwen2.5-coder-0.5b-instruct", server_options={"enable_lora": False})
    with pytest.raises(FileNotFoundError, match="prompt_model path './no/such/folder' does not exist"):
        ModelStack("qwen2.5-coder-0.5b-instruct", prompt_model="./no/such/folder")
    with pytest.raises(FileNotFoundError, match="target path './no/such/target' does not exist"):
        ModelStack("./no/such/target")


def test_stack_modes_are_decided_from_names():
    local = ModelStack("qwen-0.5b")
    assert local.single_base and local.prompt_model_base == "qwen2.5-coder-0.5b-instruct"
    assert local.num_threads == 32 and local.target_lm is None  # nothing started yet
    api = ModelStack("gpt-x", backend="api", api_base="http://127.0.0.1:9/v1")
    assert not api.single_base and api.prompt_model_base == DEFAULT_PROMPT_MODEL and api.num_threads == 16
    separate = ModelStack("qwen2.5-coder-0.5b-instruct", prompt_model="smollm2", backend="hf")
    assert not separate.single_base and separate.prompt_model_base == "smollm2-135m-instruct"


def test_artifact_with_another_base_is_refused():
    stack = ModelStack("gpt-x", backend="api", api_base="http://127.0.0.1:9/v1", need_prompt_model=False)
    with pytest.raises(ValueError, match="trained on 'qwen2.5-coder-0.5b-instruct'.*runs 'smollm2-135m-instruct'"):
        stack.prompt_model_for({"base_model": "qwen2.5-coder-0.5b-instruct"}, None)
    pinned = stack.prompt_model_for({"base_model": "smollm2-135m-instruct"}, None)
    assert isinstance(pinned, PinnedPromptModel) and isinstance(pinned.model, HFPromptModel)


# --------------------------------------------------------------------------- resolve_prompt_model


def test_auto_is_single_base_for_local_targets_and_smollm2_otherwise():
    api_lm = dspy.LM("openai/gpt-x", api_base="http://127.0.0.1:9/v1", api_key="x")
    pm = resolve_prompt_model("auto", api_lm)
    assert isinstance(pm, HFPromptModel) and pm.model_id == DEFAULT_PROMPT_MODEL
    with pytest.raises(ValueError, match="prompt_model='same'.*not built on local weights"):
        resolve_prompt_model("same", api_lm)

    served = mark_local_base(dspy.LM("openai/qwen", api_base="http://127.0.0.1:9/v1", api_key="x"),
                             LocalBase("qwen2.5-coder-0.5b-instruct", "http://127.0.0.1:9/v1", "qwen", lora=True))
    assert local_base_of(copy.deepcopy(served)) == local_base_of(served)  # DSPy copies keep the mark
    pm = resolve_prompt_model("auto", served, max_concurrency=7)
    assert isinstance(pm, VLLMPromptModel) and pm.model_id == "qwen2.5-coder-0.5b-instruct"
    assert pm.base_url == "http://127.0.0.1:9/v1" and pm.max_concurrency == 7
    served_rank8 = mark_local_base(dspy.LM("openai/qwen", api_base="http://127.0.0.1:9/v1", api_key="x"),
                                   LocalBase("qwen2.5-coder-0.5b-instruct", "http://127.0.0.1:9/v1", "qwen", lora=True,
                                             max_lora_rank=8))
    from trprompt_dspy.backends.prompt_model.base import SFTExample
    from trprompt_dspy.config import LoraSettings, SFTSettings

    with pytest.raises(ValueError, match="exceeds the server's --max-lora-rank 8"):  # before any model loads
        resolve_prompt_model("same", served_rank8).train([SFTExample(REQ, "Add.")], output_dir="unused",
                                                         lora=LoraSettings(r=16), sft=SFTSettings())
    assert resolve_prompt_model("auto", served) is not pm  # a fresh prompt model per call (per compile)

    no_lora = mark_local_base(dspy.LM("openai/qwen", api_base="http://127.0.0.1:9/v1", api_key="x"),
                              LocalBase("qwen2.5-coder-0.5b-instruct", "http://127.0.0.1:9/v1", "qwen", lora=False))
    assert isinstance(resolve_prompt_model("auto", no_lora), HFPromptModel)  # falls back, says why in the log
    with pytest.raises(ValueError, match="enable_lora=True"):
        resolve_prompt_model("same", no_lora)

    in_process = mark_local_base(dspy.LM("local/smollm2", api_key="x"), LocalBase("smollm2-135m-instruct"))
    pm = resolve_prompt_model(None, in_process)
    assert isinstance(pm, HFPromptModel) and pm.model_id == "smollm2-135m-instruct"


def test_library_built_lms_carry_their_base():
    from trprompt_dspy.models import local_lm
    from trprompt_dspy.serving import VLLMServer

    assert local_base_of(local_lm("smollm2")) == LocalBase("smollm2-135m-instruct")  # engine loads lazily
    server = VLLMServer("smollm2-135m-instruct", port=8999, enable_lora=True, served_model_name="s")
    base = local_base_of(server.dspy_lm(max_tokens=8))
    assert base == LocalBase("smollm2-135m-instruct", "http://127.0.0.1:8999/v1", "s", lora=True, max_lora_rank=16)
    assert local_base_of(server.dspy_lm(model="an-adapter")) is None  # an adapter is not a base


def test_optimizer_resolves_per_compile_and_never_replaces_its_argument():
    from trprompt_dspy import TRPromptOptimizer

    opt = TRPromptOptimizer(metric=lambda ex, p, trace=None: 1.0, auto="light")
    assert opt.prompt_model == "auto"
    with pytest.raises(UnknownModelError):
        TRPromptOptimizer(metric=lambda ex, p, trace=None: 1.0, auto="light", prompt_model="smolm2")
    with pytest.raises(TypeError, match="PromptModel"):
        TRPromptOptimizer(metric=lambda ex, p, trace=None: 1.0, auto="light", prompt_model=42)


# --------------------------------------------------------------------------- pinned prompt models


def test_each_compiled_program_keeps_its_own_adapter(tmp_path):
    """A second compile with the same prompt-model object must not change the first compiled program."""
    from programs.math import MathCoT
    from tests.fakes import arithmetic_responder
    from trprompt_dspy import TRPromptOptimizer

    tiny = dict(num_iterations=1, queries_per_iteration=2, prompts_per_query=1, textgrad_steps=0,
                textgrad_batch_size=2, val_size=2)
    data = [dspy.Example(question=f"What is {i} + 1?", answer=str(i + 1)).with_inputs("question") for i in range(8)]
    pm = FakePromptModel(instruction_fn=lambda req: f"Use {pm.adapter_path}.")
    dspy.configure(lm=scripted_lm(arithmetic_responder))
    tiny["min_improvement"] = None  # every candidate ties at 1.0; this test is about pinning, not selection
    first = TRPromptOptimizer(metric=lambda ex, p, trace=None: 1.0, prompt_model=pm, log_dir=tmp_path / "a",
                              display_progress=False, **tiny).compile(MathCoT(), trainset=data[:6], valset=data[6:])
    said = first(question="What is 3 + 1?").query_instruction
    second = TRPromptOptimizer(metric=lambda ex, p, trace=None: 1.0, prompt_model=pm, log_dir=tmp_path / "b",
                               display_progress=False, seed=1, **tiny).compile(MathCoT(), trainset=data[:6],
                                                                               valset=data[6:])
    assert str(tmp_path / "a") in said
    assert first(question="What is 3 + 1?").query_instruction == said
    assert second(question="What is 3 + 1?").query_instruction != said
    assert first(question="What is 3 + 1?").query_instruction == said  # and back again
    info = first.detailed_results.instructions
    assert info["instructions"] > 0 and info["hit_cap"] == 0 and info["max_instruction_tokens"] == 48


def test_pinned_views_switch_only_when_idle():
    shared = FakePromptModel(template="{adapter}", delay=0.05)
    a, b = PinnedPromptModel(shared, None), PinnedPromptModel(shared, None)
    results: list[str] = []

    def run(view: PinnedPromptModel) -> None:
        results.append(view.generate([REQ])[0][0])

    threads = [threading.Thread(target=run, args=(v,)) for v in (a, b, a, b)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["base"] * 4
    assert shared.max_concurrency >= 2 and time.perf_counter() - t0 < 0.15  # same adapter: ran together
    copy_a = copy.deepcopy(a)
    assert copy_a.model is shared and copy_a.adapter_path is None
    with pytest.raises(TypeError, match="cannot be trained"):
        a.train([], output_dir="x", lora=None, sft=None)
    with pytest.raises(TypeError, match="PromptModel"):
        PinnedPromptModel(object(), None)
    assert instruction_stats(a) == instruction_stats(shared)
    assert instruction_stats(a)["instructions"] == 4 and instruction_stats(a)["hit_cap"] == 0


def test_instruction_stats_count_capped_instructions():
    pm = FakePromptModel(template="one two three four five six")
    pm.generate([REQ, REQ], max_new_tokens=3)
    pm.generate([REQ], max_new_tokens=10)
    counts = instruction_stats(pm)
    assert counts["instructions"] == 3 and counts["hit_cap"] == 2
    assert instruction_stats(object()) is None
