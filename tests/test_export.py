"""export_peft / export_merged / ``edit-runtime export``.

The PEFT adapter is loaded with ``peft.PeftModel.from_pretrained`` on a fresh copy of the model
and must give ``patch_model``'s logits (fp32), on tiny random models of every architecture in
tests/tiny_models.py (Phi-3's fused gate_up_proj included) and on the real SmolLM2. The factors
are also checked in float64 against the dense weight change built by hand from U, V, S, and a
truncated export against the best low-rank approximation from a full SVD of that dense change.
The merged checkpoint reloads with ``AutoModelForCausalLM.from_pretrained`` to the patched
model's logits, under the unpatched model's state_dict keys, and leaves the model untouched.
Refusals (scale edits, another model's delta, bad shapes, a non-empty output) write nothing.
"""
from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch

from delta_helpers import assert_state_equal, random_delta, random_edit, state_snapshot
from edit_runtime.arch import find_decoder_layers, find_mlp
from edit_runtime.delta import DeltaError, FingerprintMismatchError, ModuleEdit, SparseDelta, compute_fingerprint
from edit_runtime.export import (
    ExportError,
    build_lora,
    export_merged,
    export_peft,
    peft_target_matches,
    suggest_vllm_max_lora_rank,
)
from edit_runtime.patch import patch_model, patched_modules
from tiny_models import ARCHS, make_tiny_model, tiny_input_ids

peft = pytest.importorskip("peft", reason="the PEFT round trip needs the optional 'peft' package")

TINY = dict(rtol=1e-5, atol=1e-5)  # fp32, logits O(1)
REAL = dict(rtol=1e-4, atol=1e-4)  # fp32, logits O(10)


# ----------------------------------------------------------------------------------- helpers
def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _patched_logits(model, deltas, ids):
    handles = [patch_model(model, d) for d in deltas]
    try:
        return _logits(model, ids)
    finally:
        for h in reversed(handles):
            h.remove()


def _peft_logits(model, adapter_dir, ids):
    """Logits of a deep copy of ``model`` with the adapter loaded by PEFT (model untouched)."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter_dir)).eval()
    return _logits(peft_model, ids), peft_model


def _dense_change(model, deltas) -> dict[str, torch.Tensor]:
    """Module path -> (out, in) float64 weight change, summed by hand from each edit's U, V, S."""
    out: dict[str, torch.Tensor] = {}
    for d in deltas:
        for e in d.edits:
            w = model.get_submodule(e.module).weight
            dw = out.setdefault(e.module, torch.zeros(w.shape, dtype=torch.float64))
            uv = e.U.double() @ e.V.double()
            if e.side == "out":
                dw[e.neurons] += uv
            else:
                dw[:, e.neurons] += uv
    return out


def _read_adapter(folder):
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    return config, tensors


def _no_leftovers(parent, name):
    """Nothing named like the output (nor a temporary folder for it) was left in ``parent``."""
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], list(parent.iterdir())


def _mid(model) -> int:
    return len(find_decoder_layers(model)[1]) // 2


# ------------------------------------------------------------------------ PEFT on tiny models
@pytest.mark.parametrize("arch", ARCHS)
def test_peft_adapter_matches_patch_model(arch, tmp_path):
    model = make_tiny_model(arch)
    delta = random_delta(model, r=3)  # up/gate_up rows (side out) + down columns (side in)
    ids = tiny_input_ids()
    ref = _patched_logits(model, [delta], ids)
    base = _logits(model, ids)
    assert (ref - base).abs().max() > 1e-2, "the random edit should move the logits"
    before = state_snapshot(model)

    out = export_peft(delta, model, tmp_path / "adapter")
    assert_state_equal(model, before)
    assert not patched_modules(model)
    got, peft_model = _peft_logits(model, out, ids)
    torch.testing.assert_close(got, ref, **TINY)

    config, tensors = _read_adapter(out)
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert isinstance(config["lora_alpha"], int) and config["lora_alpha"] == config["r"] == 3
    assert config["use_rslora"] is False and config["fan_in_fan_out"] is False and config["bias"] == "none"
    info = find_mlp(model, _mid(model))
    edited = {e.module for e in delta.edits}
    expected = set(edited)
    if not info.fused:  # the zero sibling SGLang needs next to an edited up_proj
        expected.add(info.gate)
    assert set(config["target_modules"]) == expected
    # PEFT's own matching rule selects exactly those modules, nothing in other layers.
    from peft.tuners.tuners_utils import check_target_module_exists

    cfg = peft.LoraConfig(target_modules=config["target_modules"])
    hits = {n for n, _ in model.named_modules() if n and check_target_module_exists(cfg, n)}
    assert hits == expected
    lora_layers = {n[len("base_model.model."):-len(".lora_A")] for n, _ in peft_model.named_modules()
                   if n.endswith(".lora_A")}
    assert lora_layers == expected
    for path in expected:
        lin = model.get_submodule(path)
        assert tensors[f"base_model.model.{path}.lora_A.weight"].shape == (3, lin.in_features)
        assert tensors[f"base_model.model.{path}.lora_B.weight"].shape == (lin.out_features, 3)


@pytest.mark.parametrize("side", ["out", "in"])
def test_single_side_exact_factors(side, tmp_path):
    """B @ A equals the hand-built dense change in float64; rows/columns outside S are zero."""
    model = make_tiny_model("llama")
    proj = "up" if side == "out" else "down"
    delta = SparseDelta([random_edit(model, 1, proj, m=7, r=4, seed=3)])
    adapter = build_lora(delta, model, pair_gate_up=False)
    (module,) = adapter.modules
    e = delta.edits[0]
    want = _dense_change(model, [delta])[e.module]
    torch.testing.assert_close(module.B @ module.A, want, rtol=0, atol=1e-12)
    outside = torch.ones(want.shape[0 if side == "out" else 1], dtype=torch.bool)
    outside[e.neurons] = False
    if side == "out":
        assert torch.equal(module.B[outside], torch.zeros_like(module.B[outside]))
    else:
        assert torch.equal(module.A[:, outside], torch.zeros_like(module.A[:, outside]))

    ids = tiny_input_ids()
    out = export_peft(delta, model, tmp_path / side, pair_gate_up=False)
    got, _ = _peft_logits(model, out, ids)
    torch.testing.assert_close(got, _patched_logits(model, [delta], ids), **TINY)


@pytest.mark.parametrize("layout", ["pad", "pattern"])
def test_stacked_edits_and_mixed_ranks(layout, tmp_path):
    """Two deltas (ranks 2 and 5) on the same modules, plus a side-"in" edit of up_proj next to
    its side-"out" edit: factors concatenate along the rank; modules of different ranks are
    padded with zeros or described by rank_pattern/alpha_pattern, scale 1 either way."""
    model = make_tiny_model("qwen2")
    layer = 1
    info = find_mlp(model, layer)
    d1 = random_delta(model, layer, r=2, seed=10)
    g = torch.Generator().manual_seed(5)
    cols = torch.tensor([3, 17, 40])
    up_in = ModuleEdit(info.up, "in", cols, torch.randn(info.d_ff, 1, generator=g) * 0.3,
                       torch.randn(1, 3, generator=g) * 0.3)
    d2 = SparseDelta([random_edit(model, layer, "up", r=5, seed=11), up_in])
    d3 = SparseDelta([random_edit(model, 0, "down", r=1, seed=12)])
    deltas = [d1, d2, d3]
    ids = tiny_input_ids()
    ref = _patched_logits(model, deltas, ids)

    out = export_peft(deltas, model, tmp_path / layout, rank_layout=layout)
    got, _ = _peft_logits(model, out, ids)
    torch.testing.assert_close(got, ref, **TINY)

    config, tensors = _read_adapter(out)
    ranks = {info.up: 2 + 5 + 1, info.down: 2, find_mlp(model, 0).down: 1, info.gate: 8}
    assert config["r"] == config["lora_alpha"] == 8
    for path, r in ranks.items():
        got_r = tensors[f"base_model.model.{path}.lora_A.weight"].shape[0]
        assert got_r == (8 if layout == "pad" else r), path
    if layout == "pattern":
        assert config["rank_pattern"] == config["alpha_pattern"]
        assert sorted(config["rank_pattern"].values()) == [1, 2]
    else:
        assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    adapter = build_lora(deltas, model, rank_layout=layout)
    dense = _dense_change(model, deltas)
    for m in adapter.modules:
        want = dense.get(m.path, torch.zeros(m.B.shape[0], m.A.shape[1], dtype=torch.float64))
        torch.testing.assert_close(m.B @ m.A, want, rtol=0, atol=1e-12)


def test_truncation_is_the_best_low_rank_approximation(tmp_path):
    model = make_tiny_model("llama")
    delta = SparseDelta([random_edit(model, 1, "up", m=12, r=6, seed=4),
                         random_edit(model, 1, "down", m=9, r=2, seed=5)])
    dense = _dense_change(model, [delta])
    up, down = delta.edits[0].module, delta.edits[1].module

    adapter = build_lora(delta, model, max_rank=3, pair_gate_up=False)
    mods = {m.path: m for m in adapter.modules}
    assert mods[up].source_rank == 6 and mods[up].rank == 3
    U, s, Vh = torch.linalg.svd(dense[up], full_matrices=False)
    best = (U[:, :3] * s[:3]) @ Vh[:3]
    torch.testing.assert_close(mods[up].B @ mods[up].A, best, rtol=0, atol=1e-10)
    assert math.isclose(mods[up].rel_error, float(s[3:].norm() / s.norm()), rel_tol=1e-9)
    assert mods[up].rel_error > 0.05
    rows_out = torch.ones(dense[up].shape[0], dtype=torch.bool)
    rows_out[delta.edits[0].neurons] = False
    assert torch.equal(mods[up].B[rows_out], torch.zeros_like(mods[up].B[rows_out]))
    # down_proj had rank 2 <= 3: exact, padded with a zero rank-1 term.
    assert mods[down].source_rank == 2 and mods[down].rel_error == 0.0 and mods[down].rank == 3
    torch.testing.assert_close(mods[down].B @ mods[down].A, dense[down], rtol=0, atol=1e-12)

    with pytest.raises(ExportError, match="relative Frobenius error"):
        export_peft(delta, model, tmp_path / "tight", max_rank=3, max_rel_error=0.01)
    _no_leftovers(tmp_path, "tight")

    out = export_peft(delta, model, tmp_path / "trunc", max_rank=3)
    info = json.loads((out / "edit_runtime_export.json").read_text())
    assert info["modules"][up]["source_rank"] == 6
    assert math.isclose(info["modules"][up]["rel_error"], mods[up].rel_error)
    assert info["vllm_max_lora_rank"] == 8
    # max_rank above the rank changes nothing.
    exact = build_lora(delta, model, max_rank=64, pair_gate_up=False)
    for m in exact.modules:
        torch.testing.assert_close(m.B @ m.A, dense[m.path], rtol=0, atol=1e-12)


def test_suggested_vllm_rank():
    assert [suggest_vllm_max_lora_rank(r) for r in (1, 2, 8, 9, 300, 512)] == [1, 8, 8, 16, 320, 512]
    with pytest.raises(ExportError, match="max_rank"):
        suggest_vllm_max_lora_rank(513)


def test_peft_target_rule():
    names = ["model.layers.1.mlp.up_proj"]
    assert peft_target_matches(names, "model.layers.1.mlp.up_proj")
    assert not peft_target_matches(names, "model.layers.11.mlp.up_proj")
    assert peft_target_matches(["up_proj"], "model.layers.11.mlp.up_proj")  # why full names are written


# -------------------------------------------------------------------------------- refusals
def test_scale_edit_is_refused_and_nothing_written(tmp_path):
    model = make_tiny_model("llama")
    delta = SparseDelta([random_edit(model, 1, "up", seed=1),
                         random_edit(model, 1, "down", seed=2, scale=True)])
    with pytest.raises(ExportError, match=r"down_proj.*scale.*export merged"):
        export_peft(delta, model, tmp_path / "adapter")
    _no_leftovers(tmp_path, "adapter")


def test_other_models_delta_is_refused(tmp_path):
    model = make_tiny_model("llama", seed=0)
    other = make_tiny_model("llama", seed=1)
    delta = random_delta(model)
    delta.fingerprint = compute_fingerprint(model, delta.modules)
    with pytest.raises(FingerprintMismatchError):
        export_peft(delta, other, tmp_path / "adapter")
    _no_leftovers(tmp_path, "adapter")
    with pytest.raises(FingerprintMismatchError):
        export_merged(delta, other, tmp_path / "merged")
    _no_leftovers(tmp_path, "merged")
    assert not patched_modules(other)
    # check_fingerprint=False exports it anyway (shapes fit).
    export_peft(delta, other, tmp_path / "forced", check_fingerprint=False)

    narrow = make_tiny_model("llama", intermediate_size=96)
    wide_delta = SparseDelta([random_edit(model, 1, "down", neurons=[5, 120])])
    with pytest.raises(DeltaError, match="out of range"):
        export_peft(wide_delta, narrow, tmp_path / "shape")
    _no_leftovers(tmp_path, "shape")
    missing = SparseDelta([ModuleEdit("model.layers.9.mlp.up_proj", "out", torch.tensor([1]),
                                      torch.ones(1, 1), torch.ones(1, 64))])
    with pytest.raises(DeltaError, match="no such module"):
        export_peft(missing, model, tmp_path / "missing")
    _no_leftovers(tmp_path, "missing")


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    model = make_tiny_model("llama")
    delta = random_delta(model)
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_peft(delta, model, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    export_peft(delta, model, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "edit_runtime_export.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    # Published with the umask's permissions (mkdtemp's 0700 would hide it from a server user).
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask
    for p in out.iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p.name


# --------------------------------------------------------------------------------- merged
@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma2"])
def test_merged_checkpoint_round_trip(arch, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model = make_tiny_model(arch)
    delta = SparseDelta([random_edit(model, 1, "up", seed=1, scale=True),  # scale edits are fine here
                         random_edit(model, 1, "down", seed=2)])
    ids = tiny_input_ids()
    ref = _patched_logits(model, [delta], ids)
    keys = list(model.state_dict())
    before = state_snapshot(model)

    out = export_merged(delta, model, tmp_path / "merged")
    assert_state_equal(model, before)
    assert not patched_modules(model)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        saved = set(f.keys())
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    assert saved == set(keys) - tied
    assert not any("base_layer" in k for k in saved)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(reloaded, ids), ref, **TINY)

    # A patched model is refused (the checkpoint must start from the base weights).
    with patch_model(model, delta):
        with pytest.raises(ExportError, match="patched modules"):
            export_merged(delta, model, tmp_path / "again")
    _no_leftovers(tmp_path, "again")


# ------------------------------------------------------------------------------- SmolLM2
@pytest.mark.slow
@pytest.mark.parametrize("proj", ["up", "down"])
def test_peft_adapter_on_smollm2(smollm2, proj, tmp_path):
    model, tok = smollm2
    assert not patched_modules(model)
    layer = _mid(model)
    delta = SparseDelta([random_edit(model, layer, proj, m=16, r=4, magnitude=0.5, seed=7)])
    delta.fingerprint = compute_fingerprint(model, delta.modules)
    ids = torch.tensor([tok("The capital of France is", add_special_tokens=False)["input_ids"]])
    ref = _patched_logits(model, [delta], ids)
    assert (ref - _logits(model, ids)).abs().max() > 1e-2

    out = export_peft(delta, model, tmp_path / "adapter", dtype="float32")
    assert not patched_modules(model)
    config, _ = _read_adapter(out)
    assert config["base_model_name_or_path"]  # the model's own folder
    got, _ = _peft_logits(model, out, ids)
    torch.testing.assert_close(got, ref, **REAL)


# ------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_cli_export_peft_and_merged(smollm2, tmp_path, capsys):
    from edit_runtime.cli import main

    model, tok = smollm2
    delta = random_delta(model, r=3)
    delta.fingerprint = compute_fingerprint(model, delta.modules)
    path = delta.save(tmp_path / "delta.safetensors")

    assert main(["export", "peft", str(path), "--model", "smollm2-135m-instruct", "-o", str(tmp_path / "ad")]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "--max-lora-rank 8" in printed and "--enable-lora" in printed
    assert printed.count("wrote PEFT LoRA adapter") == 1 and "wrote PEFT LoRA adapter" not in captured.err
    config, _ = _read_adapter(tmp_path / "ad")
    assert config["r"] == 3 and config["lora_alpha"] == 3

    scaled = SparseDelta([random_edit(model, 3, "up", scale=True)])
    bad = scaled.save(tmp_path / "scaled.safetensors")
    assert main(["export", "peft", str(bad), "--model", "smollm2-135m-instruct", "-o", str(tmp_path / "no")]) == 2
    assert "export merged" in capsys.readouterr().err
    _no_leftovers(tmp_path, "no")

    # `export merged` on a small local folder (a tiny model + SmolLM2's tokenizer) keeps it fast.
    tiny = make_tiny_model("llama")
    folder = tmp_path / "tiny"
    tiny.save_pretrained(folder)
    tok.save_pretrained(folder)
    tiny_delta = random_delta(tiny).save(tmp_path / "tiny_delta.safetensors")
    assert main(["export", "merged", str(tiny_delta), "--model", str(folder), "-o", str(tmp_path / "m")]) == 0
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "edit_runtime_export.json"} <= names
