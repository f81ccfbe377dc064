"""`trprompt evaluate --compiled`: the prompt model runs on the backend the flags name."""

from __future__ import annotations

import pytest

from trprompt_dspy.apps.cli import build_parser, prompt_model_factory_for


def _args(*extra: str):
    return build_parser().parse_args(["evaluate", "--compiled", "some/folder", *extra])


def test_evaluate_compiled_defaults_to_the_in_process_hf_prompt_model():
    from trprompt_dspy.backends.prompt_model.hf import HFPromptModel

    pm = prompt_model_factory_for(_args())({"base_model": "smollm2-135m-instruct"}, None)
    assert isinstance(pm, HFPromptModel) and pm.model_id == "smollm2-135m-instruct"


def test_evaluate_compiled_on_a_running_vllm_server():
    from trprompt_dspy.backends.prompt_model.vllm import VLLMPromptModel

    args = _args("--prompt-backend", "vllm", "--prompt-api-base", "http://127.0.0.1:9/v1", "--num-threads", "6")
    pm = prompt_model_factory_for(args)({}, None)  # no base_model recorded: the default prompt model
    assert isinstance(pm, VLLMPromptModel)
    assert pm.base_url == "http://127.0.0.1:9/v1" and pm.max_concurrency == 6
    assert pm.model_id == "smollm2-135m-instruct"


def test_prompt_api_base_without_the_vllm_backend_is_refused():
    with pytest.raises(SystemExit, match="--prompt-backend vllm"):
        prompt_model_factory_for(_args("--prompt-api-base", "http://127.0.0.1:9/v1"))
    with pytest.raises(SystemExit):  # argparse: unknown backend
        _args("--prompt-backend", "llamacpp")
