"""edit_runtime.delta: ModuleEdit validation, SparseDelta safetensors round trip, bad files, and
the base-model fingerprint."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from edit_runtime.delta import (FORMAT_NAME, DeltaError, DeltaFormatError, FingerprintMismatchError,
                                ModuleEdit, SparseDelta, check_fingerprint, compute_fingerprint,
                                fingerprint_mismatches)
from tiny_models import make_tiny_model


def _edit(module="m.up", side="out", m=3, r=2, d_in=8, d_out=6, scale=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    neurons = torch.arange(m, dtype=torch.int64) * 2
    if side == "out":
        U, V = torch.randn(m, r, generator=g), torch.randn(r, d_in, generator=g)
    else:
        U, V = torch.randn(d_out, r, generator=g), torch.randn(r, m, generator=g)
    return ModuleEdit(module, side, neurons, U, V, torch.rand(m, generator=g) if scale else None)


def _delta(**kw):
    return SparseDelta([_edit(scale=True), _edit("m.down", "in", seed=1)],
                       metadata={"method": "test", "layer": 1, "langs": ["en", "bn"]}, **kw)


def _write_raw(path, tensors, header):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=header)
    return path


def _raw_header(listing, version="1", fmt=FORMAT_NAME):
    return {"format": fmt, "format_version": version, "edits": json.dumps(listing),
            "metadata": "{}", "fingerprint": "null"}


# -- ModuleEdit validation --------------------------------------------------------------------------
def test_edit_properties():
    e = _edit(m=4, r=3)
    assert (e.num_neurons, e.rank, e.has_lowrank) == (4, 3, True)
    assert e.dense_rows().shape == (4, 8) and e.dense_rows().dtype == torch.float64
    s = ModuleEdit("m", "in", torch.tensor([1]), scale=torch.tensor([0.0]))
    assert (s.rank, s.has_lowrank) == (0, False)
    with pytest.raises(DeltaError, match="scale-only"):
        s.dense_rows()


@pytest.mark.parametrize("neurons, match", [
    (torch.tensor([1, 1, 2]), "duplicated index 1"),
    (torch.tensor([2, 1, 3]), "sorted ascending"),
    (torch.tensor([-1, 1, 3]), "negative index"),
    (torch.tensor([1, 2, 3], dtype=torch.int32), "int64"),
    (torch.tensor([], dtype=torch.int64), "empty"),
    (torch.tensor([[1, 2, 3]]), "1 dimension"),
])
def test_bad_neurons(neurons, match):
    with pytest.raises(DeltaError, match=match):
        ModuleEdit("m", "in", neurons, scale=torch.ones(max(neurons.numel(), 1)))


def test_bad_factors():
    S = torch.tensor([0, 1, 2])
    with pytest.raises(DeltaError, match="side must be"):
        ModuleEdit("m", "up", S, scale=torch.ones(3))
    with pytest.raises(DeltaError, match="given together"):
        ModuleEdit("m", "out", S, U=torch.ones(3, 1))
    with pytest.raises(DeltaError, match="factors U, V or a scale"):
        ModuleEdit("m", "out", S)
    with pytest.raises(DeltaError, match="rank mismatch"):
        ModuleEdit("m", "out", S, torch.ones(3, 2), torch.ones(1, 8))
    with pytest.raises(DeltaError, match="side 'out' needs U of shape"):
        ModuleEdit("m", "out", S, torch.ones(4, 1), torch.ones(1, 8))
    with pytest.raises(DeltaError, match="side 'in' needs V of shape"):
        ModuleEdit("m", "in", S, torch.ones(6, 1), torch.ones(1, 4))
    with pytest.raises(DeltaError, match="dtypes differ"):
        ModuleEdit("m", "out", S, torch.ones(3, 1), torch.ones(1, 8, dtype=torch.float64))
    with pytest.raises(DeltaError, match="NaN or Inf"):
        ModuleEdit("m", "out", S, torch.full((3, 1), float("inf")), torch.ones(1, 8))
    with pytest.raises(DeltaError, match="scale must have shape"):
        ModuleEdit("m", "out", S, scale=torch.ones(2))
    with pytest.raises(DeltaError, match="scale contains NaN"):
        ModuleEdit("m", "out", S, scale=torch.tensor([1.0, float("nan"), 1.0]))
    with pytest.raises(DeltaError, match="non-empty dotted path"):
        ModuleEdit("", "out", S, scale=torch.ones(3))


def test_validate_for_linear():
    lin = nn.Linear(8, 6)
    _edit(d_in=8).validate_for(lin)
    _edit(side="in", d_out=8, m=2).validate_for(nn.Linear(4, 8))
    with pytest.raises(DeltaError, match="in_features=9"):
        _edit(d_in=8).validate_for(nn.Linear(9, 6))
    with pytest.raises(DeltaError, match="out of range for out_features=4"):
        _edit(m=3).validate_for(nn.Linear(8, 4))  # neurons 0, 2, 4
    with pytest.raises(DeltaError, match="not a torch.nn.Linear"):
        _edit().validate_for(nn.Embedding(6, 8))


def test_validate_catches_late_nan():
    e = _edit()
    e.U[0, 0] = float("nan")
    with pytest.raises(DeltaError, match="NaN"):
        e.validate()


def test_sparse_delta_rules():
    with pytest.raises(DeltaError, match="at least one"):
        SparseDelta([])
    with pytest.raises(DeltaError, match="two edits of 'm.up' on side 'out'"):
        SparseDelta([_edit(), _edit(seed=1)])
    with pytest.raises(DeltaError, match="ModuleEdit instances"):
        SparseDelta(["m.up"])
    with pytest.raises(DeltaError, match="JSON-serialisable"):
        SparseDelta([_edit()], metadata={"x": object()})
    d = SparseDelta([_edit(), _edit(side="in", m=2, d_out=6)])  # both sides of one module: fine
    assert d.modules == ["m.up", "m.up"]
    assert d.num_parameters == sum(t.numel() for e in d.edits for t in (e.neurons, e.U, e.V))
    assert "m.up[out, |S|=3, r=2]" in repr(d)


def test_to_casts_floats_only():
    d = _delta().to(torch.bfloat16)
    for e in d.edits:
        assert e.U.dtype == torch.bfloat16 and e.neurons.dtype == torch.int64
    assert d.edits[0].scale.dtype == torch.bfloat16


# -- I/O ------------------------------------------------------------------------------------------
def test_round_trip(tmp_path):
    d = _delta(fingerprint={"config_sha256": "x", "config": {}, "modules": {}})
    path = d.save(tmp_path / "sub" / "d.safetensors")
    back = SparseDelta.load(path)
    assert back.metadata == d.metadata and back.fingerprint == d.fingerprint
    assert [(e.module, e.side) for e in back.edits] == [(e.module, e.side) for e in d.edits]
    for a, b in zip(d.edits, back.edits):
        for name in ("neurons", "U", "V", "scale"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or torch.equal(x, y)


def test_round_trip_bf16_and_scale_only(tmp_path):
    d = SparseDelta([ModuleEdit("a", "in", torch.tensor([3, 9]), scale=torch.tensor([0.0, 2.0])),
                     _edit("b")]).to(torch.bfloat16)
    back = SparseDelta.load(d.save(tmp_path / "d.safetensors"))
    assert back.edits[0].U is None and torch.equal(back.edits[0].scale, d.edits[0].scale)
    assert back.edits[1].U.dtype == torch.bfloat16


def test_missing_file(tmp_path):
    with pytest.raises(DeltaFormatError, match="no such delta file"):
        SparseDelta.load(tmp_path / "nope.safetensors")


def test_truncated_file(tmp_path):
    path = _delta().save(tmp_path / "d.safetensors")
    data = path.read_bytes()
    for cut in (4, 20, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(DeltaFormatError, match="not a readable safetensors file"):
            SparseDelta.load(bad)


def test_not_safetensors(tmp_path):
    bad = tmp_path / "d.safetensors"
    bad.write_text("hello, this is not a delta\n" * 10)
    with pytest.raises(DeltaFormatError, match="not a readable safetensors file"):
        SparseDelta.load(bad)
    pt = tmp_path / "d.pt"
    torch.save({"edits": []}, pt)  # a pickle is never unpickled
    with pytest.raises(DeltaFormatError):
        SparseDelta.load(pt)


def test_other_safetensors_file(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    with pytest.raises(DeltaFormatError, match="not an edit_runtime delta"):
        SparseDelta.load(path)


@pytest.mark.parametrize("version", ["2", "0", "", "1.0", "x"])
def test_unknown_format_version(tmp_path, version):
    e = _edit()
    path = _write_raw(tmp_path / "d.safetensors", {"edits.0.neurons": e.neurons, "edits.0.U": e.U, "edits.0.V": e.V},
                      _raw_header([{"module": "m", "side": "out"}], version=version))
    with pytest.raises(DeltaFormatError, match="unknown delta format version"):
        SparseDelta.load(path)


@pytest.mark.parametrize("neurons, match", [
    ([4, 4, 6], "duplicated index 4"),
    ([6, 2, 4], "sorted ascending"),
])
def test_bad_indices_in_file(tmp_path, neurons, match):
    S = torch.tensor(neurons, dtype=torch.int64)
    path = _write_raw(tmp_path / "d.safetensors", {"edits.0.neurons": S, "edits.0.scale": torch.ones(3)},
                      _raw_header([{"module": "m", "side": "out"}]))
    with pytest.raises(DeltaFormatError, match=match):
        SparseDelta.load(path)


def test_corrupt_header_and_missing_tensor(tmp_path):
    S = torch.tensor([1, 2], dtype=torch.int64)
    header = _raw_header([{"module": "m", "side": "out"}])
    header["edits"] = "[{not json"
    with pytest.raises(DeltaFormatError, match="corrupt JSON header"):
        SparseDelta.load(_write_raw(tmp_path / "a.safetensors", {"edits.0.neurons": S}, header))
    header = _raw_header([{"module": "m", "side": "out"}, {"module": "n", "side": "in"}])
    with pytest.raises(DeltaFormatError, match="'edits.1.neurons' is missing"):
        SparseDelta.load(_write_raw(tmp_path / "b.safetensors",
                                    {"edits.0.neurons": S, "edits.0.scale": torch.ones(2)}, header))
    for listing in ("5", "null", "[]"):
        header = _raw_header([])
        header["edits"] = listing
        with pytest.raises(DeltaFormatError, match="must be a non-empty JSON list"):
            SparseDelta.load(_write_raw(tmp_path / "l.safetensors", {"edits.0.neurons": S}, header))
    header = _raw_header([{"side": "out"}])
    with pytest.raises(DeltaFormatError, match="corrupt edit entry 0"):
        SparseDelta.load(_write_raw(tmp_path / "c.safetensors",
                                    {"edits.0.neurons": S, "edits.0.scale": torch.ones(2)}, header))



@pytest.mark.parametrize("fingerprint", ['"abc"', '{"modules": [1, 2]}', '{"config_sha256": 5}',
                                         '{"config_sha256": "x", "modules": {"m": {"shape": [2]}}}'])
def test_malformed_fingerprint_in_header_is_a_format_error(tmp_path, fingerprint):
    """A hand-edited or corrupt fingerprint is refused at load (and at construction), not met as
    an AttributeError while a model is being patched."""
    e = _edit()
    header = _raw_header([{"module": "m", "side": "out"}])
    header["fingerprint"] = fingerprint
    path = _write_raw(tmp_path / "d.safetensors", {"edits.0.neurons": e.neurons, "edits.0.U": e.U,
                                                   "edits.0.V": e.V}, header)
    with pytest.raises(DeltaFormatError, match="fingerprint must be None or a base-model fingerprint"):
        SparseDelta.load(path)
    with pytest.raises(DeltaError, match="fingerprint must be"):
        SparseDelta([e], fingerprint=json.loads(fingerprint))


def test_a_folder_is_not_a_delta_file(tmp_path):
    with pytest.raises(DeltaFormatError, match="is a folder, not a delta file"):
        SparseDelta.load(tmp_path)

# -- fingerprint ------------------------------------------------------------------------------------
def test_fingerprint_matches_same_model_in_other_dtypes():
    model = make_tiny_model("llama")
    mods = ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    d = SparseDelta([_edit("model.layers.1.mlp.up_proj", d_in=64)], fingerprint=compute_fingerprint(model, mods))
    check_fingerprint(model, d)
    for dtype in (torch.bfloat16, torch.float16):
        check_fingerprint(make_tiny_model("llama", dtype=dtype), d)
    assert fingerprint_mismatches(model, d.fingerprint) == []


def test_fingerprint_rejects_other_model():
    model = make_tiny_model("llama")
    mods = ["model.layers.1.mlp.up_proj"]
    d = SparseDelta([_edit("model.layers.1.mlp.up_proj", d_in=64)], fingerprint=compute_fingerprint(model, mods))
    with pytest.raises(FingerprintMismatchError, match="weights differ"):
        check_fingerprint(make_tiny_model("llama", seed=7), d)
    with pytest.raises(FingerprintMismatchError, match="config shapes differ"):
        check_fingerprint(make_tiny_model("llama", num_layers=4), d)
    # A small edit of one weight is caught too.
    other = make_tiny_model("llama")
    with torch.no_grad():
        other.get_submodule(mods[0]).weight.mul_(1.05)
    with pytest.raises(FingerprintMismatchError):
        check_fingerprint(other, d)


def test_no_fingerprint_applies_anywhere():
    check_fingerprint(make_tiny_model("qwen2"), SparseDelta([_edit()]))


# -- strength (SparseDelta.scaled) ------------------------------------------------------------------
def test_scaled_factors_and_multipliers():
    d = _delta()
    half = d.scaled(0.5)
    for e0, e1 in zip(d.edits, half.edits):
        torch.testing.assert_close(e1.dense_rows(), 0.5 * e0.dense_rows(), rtol=1e-12, atol=1e-12)
        if e0.scale is not None:
            torch.testing.assert_close(e1.scale, 1 + 0.5 * (e0.scale - 1))
    # strength 0 is the unedited layer: no low-rank change, every multiplier 1
    zero = d.scaled(0.0)
    assert all(not e.dense_rows().any() for e in zero.edits)
    assert torch.equal(zero.edits[0].scale, torch.ones_like(d.edits[0].scale))
    # the original is untouched, metadata records the product, the fingerprint is kept
    assert torch.equal(d.edits[0].U, _delta().edits[0].U) and "strength" not in d.metadata
    assert half.scaled(0.5).metadata["strength"] == 0.25
    assert half.metadata["method"] == "test"
    fp = {"config_sha256": "x", "config": {}, "modules": {}}
    assert _delta(fingerprint=fp).scaled(2.0).fingerprint == fp


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf"), "strong", None])
def test_scaled_refuses_bad_strength(bad):
    with pytest.raises(DeltaError, match="strength"):
        _delta().scaled(bad)


def test_scaled_delta_patches_like_the_dense_interpolation():
    """At one edited down_proj (side in, low-rank only) the layer's weight is W + α·ΔW: the patched
    model at strength α equals a dense float64 edit of that weight on fresh random factors."""
    from delta_helpers import random_edit
    from edit_runtime.patch import patch_model

    model = make_tiny_model("llama")
    delta = SparseDelta([random_edit(model, 1, "down", seed=7, magnitude=0.8)])
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    lin = model.get_submodule(delta.edits[0].module)
    W = lin.weight.detach().clone()
    for alpha in (0.0, 0.3, 1.0, 1.7):
        e = delta.edits[0]
        dense = W.double()
        dense[:, e.neurons] += alpha * (e.U.double() @ e.V.double())
        with torch.no_grad():
            lin.weight.copy_(dense.float())
            want = model(ids, use_cache=False).logits
            lin.weight.copy_(W)
        with patch_model(model, delta.scaled(alpha)):
            with torch.no_grad():
                got = model(ids, use_cache=False).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(lin.weight, W)
