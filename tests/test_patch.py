"""edit_runtime.patch on tiny random models of every architecture: the runtime path equals the
densely edited model, removal/toggling/unmerging are bit-exact, masks mix rows, stacking and
merging keep their rules, torch.compile keeps one graph, and a bad delta touches nothing."""
from __future__ import annotations

import copy

import pytest
import torch

from delta_helpers import (assert_state_equal, dense_edited, random_delta, random_edit,
                           state_snapshot)
from edit_runtime.arch import find_mlp, neuron_target
from edit_runtime.delta import (DeltaError, FingerprintMismatchError, ModuleEdit, SparseDelta,
                                compute_fingerprint)
from edit_runtime.patch import EditedLinear, PatchError, PatchHandle, patch_model, patched_modules
from tiny_models import ARCHS, D_FF, HIDDEN, make_tiny_model, tiny_input_ids

LAYER = 1  # middle of 3
FP32 = dict(rtol=1e-5, atol=1e-5)


def logits(model, ids=None, **kw):
    with torch.no_grad():
        return model(tiny_input_ids() if ids is None else ids, use_cache=False, **kw).logits


def greedy(model, ids, n=8):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids))


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def model(arch):
    return make_tiny_model(arch)


# -- the runtime path equals the dense edit ---------------------------------------------------------
@pytest.mark.parametrize("with_scale", [False, True])
def test_patched_equals_dense_edit(model, with_scale):
    delta = random_delta(model, LAYER, scale=with_scale)
    base, want = logits(model), logits(dense_edited(model, delta))
    handle = patch_model(model, delta)
    got = logits(model)
    torch.testing.assert_close(got, want, **FP32)
    assert not torch.allclose(got, base, atol=1e-3)  # the edit matters
    handle.remove()


def test_fused_up_uses_offset(arch):
    """On Phi-3 the up edit sits on gate_up_proj rows d_ff + j; elsewhere on up_proj rows j."""
    model = make_tiny_model(arch)
    edit = random_delta(model, LAYER).edits[0]
    info = find_mlp(model, LAYER)
    if info.fused:
        assert edit.module == info.gate_up and int(edit.neurons.min()) >= D_FF
    else:
        assert edit.module == info.up and int(edit.neurons.max()) < D_FF


def test_scale_only_equals_dense_edit(model):
    delta = SparseDelta([random_edit(model, LAYER, "up", lowrank=False, scale=True, seed=3),
                         random_edit(model, LAYER, "down", lowrank=False, scale=True, seed=4)])
    want = logits(dense_edited(model, delta))
    with patch_model(model, delta):
        torch.testing.assert_close(logits(model), want, **FP32)


def test_suppressing_neurons_equals_zeroed_weights(model):
    """scale 0 on up neurons S == zeroed rows; scale 0 on down inputs S == zeroed columns."""
    S = torch.tensor([3, 50, 99])
    up_path, _, off = neuron_target(model, LAYER, "up")
    down_path, _, _ = neuron_target(model, LAYER, "down")
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.get_submodule(up_path).weight[S + off] = 0
        ref.get_submodule(down_path).weight[:, S] = 0
    delta = SparseDelta([ModuleEdit(up_path, "out", S + off, scale=torch.zeros(3)),
                         ModuleEdit(down_path, "in", S, scale=torch.zeros(3))])
    with patch_model(model, delta):
        torch.testing.assert_close(logits(model), logits(ref), **FP32)


def test_linear_with_bias_side_out_scale():
    """Side out scales the bias of S too (Qwen2's q/k/v projections carry a bias)."""
    model = make_tiny_model("qwen2")
    path = f"model.layers.{LAYER}.self_attn.q_proj"
    lin = model.get_submodule(path)
    assert lin.bias is not None
    g = torch.Generator().manual_seed(0)
    S = torch.tensor([1, 7, 30])
    delta = SparseDelta([ModuleEdit(path, "out", S, torch.randn(3, 2, generator=g), torch.randn(2, HIDDEN, generator=g),
                                    torch.tensor([0.5, 2.0, 0.0]))])
    want = logits(dense_edited(model, delta))
    handle = patch_model(model, delta)
    torch.testing.assert_close(logits(model), want, **FP32)
    snap = state_snapshot(model)
    handle.merge()
    torch.testing.assert_close(logits(model), want, **FP32)
    handle.unmerge()
    assert_state_equal(model, snap)
    handle.remove()


# -- removal, toggling ------------------------------------------------------------------------------
def test_remove_is_bit_identical(model):
    delta = random_delta(model, LAYER, scale=True)
    base, snap = logits(model), state_snapshot(model)
    originals = {e.module: model.get_submodule(e.module) for e in delta.edits}
    handle = patch_model(model, delta)
    assert set(patched_modules(model)) == set(originals)
    assert list(model.state_dict()) == list(snap)  # keys unchanged while patched
    handle.remove()
    assert handle.removed and not patched_modules(model)
    for path, module in originals.items():
        assert model.get_submodule(path) is module
    assert torch.equal(logits(model), base)
    assert_state_equal(model, snap)
    with pytest.raises(PatchError, match="was removed"):
        handle.enable()


def test_toggle_is_exact(model):
    delta = random_delta(model, LAYER, scale=True)
    base = logits(model)
    handle = patch_model(model, delta)
    on = logits(model)
    assert handle.enabled
    handle.disable()
    assert not handle.enabled and torch.equal(logits(model), base)
    handle.enable()
    assert torch.equal(logits(model), on)
    with handle.disabled():
        assert torch.equal(logits(model), base)
    assert handle.enabled
    handle.disable()
    with handle.enabled_ctx():
        assert torch.equal(logits(model), on)
    assert not handle.enabled
    handle.remove()


def test_patch_disabled_from_start(model):
    delta = random_delta(model, LAYER)
    base, want = logits(model), logits(dense_edited(model, delta))
    handle = patch_model(model, delta, enabled=False)
    assert torch.equal(logits(model), base)
    handle.enable()
    torch.testing.assert_close(logits(model), want, **FP32)
    handle.remove()


def test_context_manager_and_path(model, tmp_path):
    delta = random_delta(model, LAYER)
    path = delta.save(tmp_path / "d.safetensors")
    base = logits(model)
    with patch_model(model, path) as handle:
        assert isinstance(handle, PatchHandle) and handle.delta.modules == delta.modules
        assert not torch.equal(logits(model), base)
    assert handle.removed and torch.equal(logits(model), base)


def test_wrapper_exposes_base_linear(model):
    delta = random_delta(model, LAYER)
    lin = model.get_submodule(delta.edits[0].module)
    with patch_model(model, delta):
        w = model.get_submodule(delta.edits[0].module)
        assert isinstance(w, EditedLinear) and w.base_layer is lin
        assert w.weight is lin.weight and w.bias is lin.bias
        assert (w.in_features, w.out_features) == (lin.in_features, lin.out_features)
        assert "edits=1" in repr(w)


def test_load_state_dict_while_patched(model):
    """state_dict keys are the unpatched model's both ways: an original checkpoint loads."""
    delta = random_delta(model, LAYER)
    sd = state_snapshot(model)
    with patch_model(model, delta):
        with torch.no_grad():
            model.get_submodule(delta.edits[0].module).weight.add_(1.0)
        model.load_state_dict(sd, strict=True)
    assert_state_equal(model, sd)


# -- per-row mask ------------------------------------------------------------------------------------
def test_row_mask_mixes_a_batch(model):
    delta = random_delta(model, LAYER, scale=True)
    ids = tiny_input_ids(batch=3)
    base = logits(model, ids)
    handle = patch_model(model, delta)
    on = logits(model, ids)
    handle.set_row_mask(torch.tensor([True, False, True]))
    mixed = logits(model, ids)
    # Same batch: exactly the all-on rows and the all-off rows.
    assert torch.equal(mixed[0], on[0]) and torch.equal(mixed[2], on[2]) and torch.equal(mixed[1], base[1])
    # Separate runs of each row alone.
    handle.clear_row_mask()
    torch.testing.assert_close(mixed[0:1], logits(model, ids[0:1]), **FP32)
    with handle.disabled():
        torch.testing.assert_close(mixed[1:2], logits(model, ids[1:2]), **FP32)
    # The mask composes with enabled: disabled means no row is edited.
    handle.set_row_mask([1, 0, 1])
    assert torch.equal(handle.row_mask, torch.tensor([True, False, True]))
    handle.disable()
    assert torch.equal(logits(model, ids), base)
    handle.enable()
    with handle.row_mask_ctx([False, True, False]):
        m2 = logits(model, ids)
        assert torch.equal(m2[1], on[1]) and torch.equal(m2[0], base[0])
    assert torch.equal(handle.row_mask, torch.tensor([True, False, True]))
    handle.remove()


def test_row_mask_initial_and_mismatch(model):
    delta = random_delta(model, LAYER)
    ids = tiny_input_ids(batch=2)
    base = logits(model, ids)
    handle = patch_model(model, delta, row_mask=[False, False])
    assert torch.equal(logits(model, ids), base)
    with pytest.raises(PatchError, match="row mask has 2 rows but the input batch has 3"):
        logits(model, tiny_input_ids(batch=3))
    with pytest.raises(ValueError, match="1-D"):
        handle.set_row_mask(torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="0/1"):
        handle.set_row_mask(torch.tensor([0, 2]))
    handle.remove()


def test_row_mask_two_dim_input(model):
    """A wrapper called on 2-D (N, in) input takes a mask per row."""
    delta = random_delta(model, LAYER)
    path = delta.edits[0].module
    x = torch.randn(4, HIDDEN)
    with torch.no_grad():
        base = model.get_submodule(path)(x)
        handle = patch_model(model, delta, row_mask=[True, False, False, True])
        wrapper = model.get_submodule(path)
        y = wrapper(x)
        handle.clear_row_mask()
        on = wrapper(x)
        handle.remove()
    assert torch.equal(y[1:3], base[1:3]) and torch.equal(y[[0, 3]], on[[0, 3]])
    assert not torch.equal(on, base)


# -- generate ------------------------------------------------------------------------------------------
def test_generate_with_kv_cache(model):
    ids = tiny_input_ids(batch=2, length=6)
    delta = random_delta(model, LAYER, m=48, r=4, magnitude=3.0)
    base, dense = greedy(model, ids), greedy(dense_edited(model, delta), ids)
    handle = patch_model(model, delta)
    on = greedy(model, ids)
    assert not torch.equal(on, base)
    assert torch.equal(on, dense)  # the KV-cache path equals the densely edited model's
    handle.set_row_mask([True, False])
    mixed = greedy(model, ids)
    assert torch.equal(mixed[0], on[0]) and torch.equal(mixed[1], base[1])
    handle.clear_row_mask()
    handle.disable()
    assert torch.equal(greedy(model, ids), base)
    handle.enable()
    handle.remove()
    assert torch.equal(greedy(model, ids), base)


# -- stacking ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("first_removed", ["A", "B"])
def test_stacking_and_removal_order(model, first_removed):
    A = random_delta(model, LAYER, seed=10)
    B = random_delta(model, LAYER, seed=20, m=20)  # same modules, overlapping neurons likely
    base, snap = logits(model), state_snapshot(model)
    only = {}
    for name, d in (("A", A), ("B", B)):
        with patch_model(model, d):
            only[name] = logits(model)
    want = logits(dense_edited(model, A, B))
    ha, hb = patch_model(model, A), patch_model(model, B)
    torch.testing.assert_close(logits(model), want, **FP32)
    handles = {"A": ha, "B": hb}
    kept = "B" if first_removed == "A" else "A"
    handles[first_removed].remove()
    assert torch.equal(logits(model), only[kept])
    handles[kept].remove()
    assert not patched_modules(model)
    assert torch.equal(logits(model), base)
    assert_state_equal(model, snap)


def test_stacking_with_scales_on_disjoint_neurons(model):
    S1, S2 = torch.arange(0, 10), torch.arange(10, 20)
    A = SparseDelta([random_edit(model, LAYER, "up", scale=True, neurons=S1, seed=1),
                     random_edit(model, LAYER, "down", scale=True, neurons=S1, seed=2)])
    B = SparseDelta([random_edit(model, LAYER, "up", scale=True, neurons=S1, seed=3),   # overlaps A (side out: fine)
                     random_edit(model, LAYER, "down", scale=True, neurons=S2, seed=4)])
    want = logits(dense_edited(model, A, B))
    ha, hb = patch_model(model, A), patch_model(model, B)
    torch.testing.assert_close(logits(model), want, **FP32)
    hb.remove()
    ha.remove()


def test_scaled_in_edit_cannot_stack_on_column_changes(model):
    """A side-in edit with a scale reads W[:, S]; an earlier unmerged edit changing those columns
    would make it inexact, so it is refused before anything is touched."""
    S = torch.arange(5)
    A = SparseDelta([random_edit(model, LAYER, "down", neurons=S, seed=1)])
    clean = dense_edited(model)
    ha = patch_model(model, A)
    snap, tree = state_snapshot(model), [type(m) for m in model.modules()]
    bad = SparseDelta([random_edit(model, LAYER, "down", scale=True, neurons=S[2:], seed=2)])
    with pytest.raises(PatchError, match="cannot stack"):
        patch_model(model, bad)
    assert_state_equal(model, snap)
    assert [type(m) for m in model.modules()] == tree
    ok = SparseDelta([random_edit(model, LAYER, "down", scale=True, neurons=S + 5, seed=2)])
    patch_model(model, ok).remove()
    # Within one delta: an out edit of down_proj before a scaled in edit of the same module.
    down = find_mlp(model, LAYER).down
    g = torch.Generator().manual_seed(0)
    mixed = SparseDelta([
        ModuleEdit(down, "out", torch.tensor([1, 2]), torch.randn(2, 1, generator=g), torch.randn(1, D_FF, generator=g)),
        ModuleEdit(down, "in", torch.tensor([50]), scale=torch.tensor([2.0])),
    ])
    with pytest.raises(PatchError, match="before it in this delta"):
        patch_model(model, mixed)
    reordered = SparseDelta(list(reversed(mixed.edits)))
    with patch_model(model, reordered):
        torch.testing.assert_close(logits(model), logits(dense_edited(clean, A, reordered)), **FP32)
    ha.remove()


# -- merge ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_scale", [False, True])
def test_merge_and_unmerge(model, with_scale):
    delta = random_delta(model, LAYER, scale=with_scale)
    base, snap = logits(model), state_snapshot(model)
    handle = patch_model(model, delta)
    runtime = logits(model)
    patched_snap = state_snapshot(model)
    assert_state_equal(model, snap)  # patching alone changes no weight
    handle.merge()
    assert handle.merged and handle.enabled
    torch.testing.assert_close(logits(model), runtime, **FP32)
    merged_sd = state_snapshot(model)
    assert list(merged_sd) == list(snap)
    assert any(not torch.equal(merged_sd[k], snap[k]) for k in snap)
    with pytest.raises(PatchError, match="merged"):
        handle.disable()
    with pytest.raises(PatchError, match="merged"):
        handle.set_row_mask([True, False])
    handle.unmerge()
    assert not handle.merged
    assert_state_equal(model, patched_snap)
    assert torch.equal(logits(model), runtime)
    handle.merge()
    handle.remove()  # unmerges first
    assert torch.equal(logits(model), base)
    assert_state_equal(model, snap)


def test_merged_state_dict_loads_into_unpatched_model(arch):
    model, other = make_tiny_model(arch), make_tiny_model(arch, seed=1)
    delta = random_delta(model, LAYER, scale=True)
    handle = patch_model(model, delta)
    handle.merge()
    other.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(logits(other), logits(model), rtol=0, atol=0)
    torch.testing.assert_close(logits(other), logits(dense_edited(make_tiny_model(arch), delta)), **FP32)
    handle.remove()


def test_merge_refused_while_disabled_or_masked(model):
    handle = patch_model(model, random_delta(model, LAYER), enabled=False)
    with pytest.raises(PatchError, match="disabled"):
        handle.merge()
    handle.enable()
    handle.set_row_mask([True, False])
    with pytest.raises(PatchError, match="row mask"):
        handle.merge()
    handle.clear_row_mask()
    handle.merge()
    handle.remove()


def test_unmerge_overlapping_is_lifo(model):
    S = torch.arange(8)
    A = SparseDelta([random_edit(model, LAYER, "up", neurons=S, seed=1)])
    B = SparseDelta([random_edit(model, LAYER, "up", neurons=S[4:] + 2, seed=2)])  # shares rows 6, 7
    C = SparseDelta([random_edit(model, LAYER, "up", neurons=S + 100, seed=3)])    # disjoint
    snap = state_snapshot(model)
    ha, hb, hc = (patch_model(model, d) for d in (A, B, C))
    runtime = logits(model)
    ha.merge(), hb.merge(), hc.merge()
    torch.testing.assert_close(logits(model), runtime, **FP32)
    merged_snap = state_snapshot(model)
    with pytest.raises(PatchError, match="LIFO"):
        ha.unmerge()
    with pytest.raises(PatchError, match="LIFO"):
        ha.remove()
    assert_state_equal(model, merged_snap)  # refusals touch nothing
    assert ha.merged and not ha.removed
    hc.unmerge()  # disjoint from B: any order
    hb.unmerge()
    ha.unmerge()
    assert_state_equal(model, snap)
    assert torch.equal(logits(model), runtime)
    for h in (hc, ha, hb):
        h.remove()
    assert_state_equal(model, snap) and not patched_modules(model)


def test_merge_refused_when_it_would_reorder(model):
    S = torch.arange(6)
    A = SparseDelta([random_edit(model, LAYER, "up", neurons=S, scale=True, seed=1)])
    B = SparseDelta([random_edit(model, LAYER, "up", neurons=S[3:], scale=True, seed=2)])
    ha, hb = patch_model(model, A), patch_model(model, B)
    runtime, snap = logits(model), state_snapshot(model)
    with pytest.raises(PatchError, match="does not commute"):
        hb.merge()
    assert_state_equal(model, snap) and not hb.merged
    ha.merge()
    hb.merge()  # now in patch order
    torch.testing.assert_close(logits(model), runtime, **FP32)
    hb.remove()
    ha.remove()


def test_unmerge_refused_under_a_later_scaled_in_edit(model):
    S = torch.arange(4)
    A = SparseDelta([random_edit(model, LAYER, "down", neurons=S, seed=1)])
    ha = patch_model(model, A)
    ha.merge()
    hb = patch_model(model, SparseDelta([random_edit(model, LAYER, "down", neurons=S, scale=True, seed=2)]))
    with pytest.raises(PatchError, match="reads them from the weight"):
        ha.unmerge()
    hb.remove()
    ha.unmerge()
    ha.remove()


def test_tied_weight_is_not_merged():
    model = make_tiny_model("gemma")  # lm_head is tied to embed_tokens
    assert model.lm_head.weight is model.model.embed_tokens.weight
    g = torch.Generator().manual_seed(0)
    delta = SparseDelta([ModuleEdit("lm_head", "out", torch.tensor([5, 9]), torch.randn(2, 1, generator=g),
                                    torch.randn(1, HIDDEN, generator=g))])
    base = logits(model)
    handle = patch_model(model, delta)
    seen = {}
    hook = model.lm_head.register_forward_pre_hook(lambda m, a: seen.setdefault("h", a[0]))
    got = logits(model)
    hook.remove()
    e = delta.edits[0]
    want = base.clone()
    want[..., e.neurons] += (seen["h"] @ e.V.T) @ e.U.T
    torch.testing.assert_close(got, want, **FP32)
    snap = state_snapshot(model)
    with pytest.raises(PatchError, match="tied"):
        handle.merge()
    assert_state_equal(model, snap)
    handle.remove()


# -- dtypes ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 6e-2), (torch.float16, 8e-3)])
def test_half_precision(arch, dtype, atol):
    model = make_tiny_model(arch, dtype=dtype)
    ids = tiny_input_ids()
    delta = random_delta(model, LAYER, scale=True)
    base, snap = logits(model, ids), state_snapshot(model)
    want = logits(dense_edited(model, delta), ids)
    handle = patch_model(model, delta)
    got = logits(model, ids)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=atol)
    assert (got.float() - base.float()).abs().max() > 10 * atol
    handle.disable()
    assert torch.equal(logits(model, ids), base)
    handle.enable()
    handle.merge()
    torch.testing.assert_close(logits(model, ids).float(), got.float(), rtol=0, atol=atol)
    handle.unmerge()
    assert_state_equal(model, snap)
    out = greedy(model, ids, n=4)
    assert out.shape == (2, ids.shape[1] + 4)
    handle.remove()
    assert torch.equal(logits(model, ids), base)
    assert_state_equal(model, snap)


def test_fp16_overflow_is_refused_before_patching():
    model = make_tiny_model("llama", dtype=torch.float16)
    edit = random_edit(model, LAYER, "up")
    edit.U[0, 0] = 1e6  # finite in fp32, inf in fp16
    snap = state_snapshot(model)
    with pytest.raises(DeltaError, match="overflows"):
        patch_model(model, SparseDelta([random_edit(model, LAYER, "down"), edit]))
    assert_state_equal(model, snap) and not patched_modules(model)



@pytest.mark.parametrize("side", ["up", "down"])
def test_a_product_out_of_range_is_refused_though_each_factor_is_finite(side):
    """U and V at 1e30 are finite in fp32, their product is not: refused before anything is
    patched. Large but representable factors pass (the bound is only a shortcut)."""
    from edit_runtime.patch import check_patch

    model = make_tiny_model("llama")
    edit = random_edit(model, LAYER, side)
    huge = ModuleEdit(edit.module, edit.side, edit.neurons, U=torch.full_like(edit.U, 1e30),
                      V=torch.full_like(edit.V, 1e30))
    snap = state_snapshot(model)
    with pytest.raises(DeltaError, match="U @ V overflows the module's torch.float32"):
        patch_model(model, SparseDelta([huge]))
    assert_state_equal(model, snap) and not patched_modules(model)
    # the bound (row norm x column norm, 4.5e38) is past fp32's range, every entry of U @ V (0) is not
    U = torch.zeros_like(edit.U)
    V = torch.zeros_like(edit.V)
    U[0, 0], U[0, 1], V[0, 0], V[1, 0] = 1.5e19, 1.5e19, 1.5e19, -1.5e19
    check_patch(model, SparseDelta([ModuleEdit(edit.module, edit.side, edit.neurons, U=U, V=V)]))


# -- CPU fast path (EditedLinear.forward for additive side-out edits on CPU fp32/fp64) -------------------
def _lin_holder(d_in=24, d_out=40, *, bias=True, dtype=torch.float32, seed=0):
    """A module whose child ``lin`` is a random nn.Linear (a one-layer "model" to patch)."""
    g = torch.Generator().manual_seed(seed)
    holder = torch.nn.Module()
    holder.lin = torch.nn.Linear(d_in, d_out, bias=bias, dtype=dtype)
    with torch.no_grad():
        holder.lin.weight.copy_(torch.randn(d_out, d_in, generator=g))
        if bias:
            holder.lin.bias.copy_(torch.randn(d_out, generator=g))
    return holder


def _out_edit(lin, m, r, *, seed, scale=False, neurons=None):
    g = torch.Generator().manual_seed(seed)
    S = torch.randperm(lin.out_features, generator=g)[:m].sort().values if neurons is None else neurons
    U = torch.randn(len(S), r, generator=g).to(lin.weight.dtype)
    V = torch.randn(r, lin.in_features, generator=g).to(lin.weight.dtype)
    sc = torch.rand(len(S), generator=g).to(lin.weight.dtype) * 2 if scale else None
    return ModuleEdit("lin", "out", S, U, V, sc)


def _reference(lin, x, *edits, rows=None):
    """float64 output of ``lin`` with the additive side-out edits written densely into its weight;
    ``rows`` (bool per flattened token) keeps the unedited output where False."""
    W = lin.weight.detach().double().clone()
    for e in edits:
        W[e.neurons] += e.U.double() @ e.V.double()
    b = None if lin.bias is None else lin.bias.detach().double()
    x64 = x.detach().double()
    out = torch.nn.functional.linear(x64, W, b)
    if rows is not None:
        base = torch.nn.functional.linear(x64, lin.weight.detach().double(), b)
        flat = out.reshape(-1, out.shape[-1])
        keep = ~torch.as_tensor(rows)
        flat[keep] = base.reshape(-1, out.shape[-1])[keep]
    return out


def _force_regimes(monkeypatch, dense_max_tokens, out_features, rank):
    """Sets FAST_DENSE_MAX_MACS so that plans built next use the dense form up to that many tokens."""
    import edit_runtime.patch as P
    monkeypatch.setattr(P, "FAST_DENSE_MAX_MACS", dense_max_tokens * out_features * rank)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, dict(rtol=2e-5, atol=2e-4)),
                                        (torch.float64, dict(rtol=1e-12, atol=1e-10))])
@pytest.mark.parametrize("shape", [(5,), (1, 5), (4, 5), (2, 3, 5), (13, 5)])  # last dim: placeholder
def test_fast_path_matches_float64(monkeypatch, dtype, tol, shape):
    """Dense regime (N <= 4 here) and scatter regime (N > 4), 1-D/2-D/3-D inputs, two stacked handles."""
    _force_regimes(monkeypatch, 4, 40, 3 + 2)
    holder = _lin_holder(dtype=dtype)
    lin = holder.lin
    a, b = _out_edit(lin, 7, 3, seed=1), _out_edit(lin, 9, 2, seed=2)
    ha = patch_model(holder, SparseDelta([a]))
    hb = patch_model(holder, SparseDelta([b]))
    wrapper = holder.lin
    assert wrapper._fast is not None and wrapper._fast.dense_max_tokens == 4
    x = torch.randn(*shape[:-1], lin.in_features, dtype=dtype, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = wrapper(x)
    assert got.shape == (*shape[:-1], lin.out_features) and got.dtype == dtype
    torch.testing.assert_close(got.double(), _reference(lin, x, a, b), **tol)
    hb.remove()
    with torch.no_grad():
        torch.testing.assert_close(wrapper(x).double(), _reference(lin, x, a), **tol)
    ha.remove()


def test_fast_path_used_only_where_it_applies():
    holder = _lin_holder()
    lin = holder.lin
    h = patch_model(holder, SparseDelta([_out_edit(lin, 5, 2, seed=1)]))
    assert holder.lin._fast is not None
    h.merge()
    assert holder.lin._fast is None  # nothing left at runtime
    h.unmerge()
    assert holder.lin._fast is not None
    scaled = patch_model(holder, SparseDelta([_out_edit(lin, 5, 2, seed=2, scale=True)]))
    assert holder.lin._fast is None  # a scale: the general path (ops.lowrank_apply_out)
    scaled.remove()
    assert holder.lin._fast is not None
    h.remove()
    side_in = SparseDelta([ModuleEdit("lin", "in", torch.tensor([1, 4]), torch.randn(40, 2),
                                      torch.randn(2, 2))])
    with patch_model(holder, side_in):
        assert holder.lin._fast is None
    half = _lin_holder(dtype=torch.bfloat16)
    with patch_model(half, SparseDelta([_out_edit(half.lin, 5, 2, seed=1)])):
        assert half.lin._fast is None  # 16-bit: y rounded once, through the general path


def test_fast_path_toggles_and_masks_exactly():
    """enabled is folded into the fast path's factors: toggling rewrites them in place."""
    holder = _lin_holder()
    lin = holder.lin
    a, b = _out_edit(lin, 6, 3, seed=1), _out_edit(lin, 6, 2, seed=2)
    x = torch.randn(3, 4, lin.in_features, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        base = lin(x)
        ha = patch_model(holder, SparseDelta([a]), enabled=False)
        hb = patch_model(holder, SparseDelta([b]))
        run = lambda: holder.lin(x)  # noqa: E731
        torch.testing.assert_close(run().double(), _reference(lin, x, b), **FP32)
        hb.disable()
        assert torch.equal(run(), base)  # everything off: the base output bit for bit
        ha.enable()
        torch.testing.assert_close(run().double(), _reference(lin, x, a), **FP32)
        hb.enable()
        both = run()
        torch.testing.assert_close(both.double(), _reference(lin, x, a, b), **FP32)
        with ha.disabled():
            torch.testing.assert_close(run().double(), _reference(lin, x, b), **FP32)
        assert torch.equal(run(), both)
        # Row masks per handle: sequences 0 and 2 get a, every sequence gets b.
        ha.set_row_mask([True, False, True])
        mixed = run()
        rows = torch.tensor([True, False, True]).repeat_interleave(4)
        want_a_rows = _reference(lin, x, a, b).reshape(12, -1)
        want_b_only = _reference(lin, x, b).reshape(12, -1)
        torch.testing.assert_close(mixed.reshape(12, -1)[rows].double(), want_a_rows[rows], **FP32)
        torch.testing.assert_close(mixed.reshape(12, -1)[~rows].double(), want_b_only[~rows], **FP32)
        hb.set_row_mask([False, False, False])
        hb_off = run().reshape(12, -1)
        assert torch.equal(hb_off[~rows], base.reshape(12, -1)[~rows])
        with pytest.raises(PatchError, match="row mask has 3 rows but the input batch has 2"):
            run_x = holder.lin(x[:2])  # noqa: F841
        ha.clear_row_mask()
        hb.clear_row_mask()
        assert torch.equal(run(), both)
        hb.remove()
        ha.remove()
        assert holder.lin is lin and torch.equal(lin(x), base)


def test_fast_path_sees_weight_changes():
    """The fast path holds no copy of the base weight: in-place writes, load_state_dict and a
    replaced Parameter are all seen by the next call (nothing to go stale)."""
    holder = _lin_holder()
    lin = holder.lin
    e = _out_edit(lin, 5, 2, seed=1)
    x = torch.randn(6, lin.in_features)
    handle = patch_model(holder, SparseDelta([e]))
    wrapper = holder.lin
    with torch.no_grad():
        lin.weight.mul_(0.5)
        torch.testing.assert_close(wrapper(x).double(), _reference(lin, x, e), **FP32)
        sd = {k: v * 2 for k, v in holder.state_dict().items()}
        holder.load_state_dict(sd)
        torch.testing.assert_close(wrapper(x).double(), _reference(lin, x, e), **FP32)
        lin.weight = torch.nn.Parameter(torch.randn_like(lin.weight))
        torch.testing.assert_close(wrapper(x).double(), _reference(lin, x, e), **FP32)
    handle.remove()


@pytest.mark.parametrize("dense_max_tokens", [0, 64])  # scatter regime, dense regime
def test_fast_path_backpropagates(monkeypatch, dense_max_tokens):
    _force_regimes(monkeypatch, dense_max_tokens, 40, 2)
    holder = _lin_holder()
    lin = holder.lin
    e = _out_edit(lin, 5, 2, seed=1)
    dense = copy.deepcopy(lin)
    with torch.no_grad():
        dense.weight[e.neurons] += e.U @ e.V
    handle = patch_model(holder, SparseDelta([e]))
    assert holder.lin._fast.dense_max_tokens == dense_max_tokens
    x = torch.randn(2, 7, lin.in_features, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    holder.lin(x).square().sum().backward()
    dense(x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **FP32)
    torch.testing.assert_close(lin.weight.grad, dense.weight.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lin.bias.grad, dense.bias.grad, rtol=1e-5, atol=1e-4)
    handle.remove()


def test_fast_path_adds_no_state():
    holder = _lin_holder()
    keys, snap = list(holder.state_dict()), state_snapshot(holder)
    handle = patch_model(holder, SparseDelta([_out_edit(holder.lin, 5, 2, seed=1)]))
    assert holder.lin._fast is not None
    assert list(holder.state_dict()) == keys == ["lin.weight", "lin.bias"]
    assert_state_equal(holder, snap)
    assert not list(holder.lin.buffers())
    assert [n for n, _ in holder.named_parameters()] == ["lin.base_layer.weight", "lin.base_layer.bias"]
    handle.merge()
    handle.unmerge()
    assert_state_equal(holder, snap)
    handle.remove()
    assert_state_equal(holder, snap)


@pytest.mark.parametrize("where", ["forward", "forward_pre", "global"])
def test_fast_path_runs_base_layer_hooks(where):
    """Hooks on the wrapped Linear (e.g. registered before patching) still run: then the
    wrapper calls the Linear as a module instead of F.linear."""
    holder = _lin_holder()
    lin = holder.lin
    e = _out_edit(lin, 5, 2, seed=1)
    x = torch.randn(3, lin.in_features)
    calls = []
    if where == "forward":
        hook = lin.register_forward_hook(lambda m, a, out: calls.append(1) or out * 2)
    elif where == "forward_pre":
        hook = lin.register_forward_pre_hook(lambda m, a: calls.append(1) or (a[0] * 2,))
    else:
        hook = torch.nn.modules.module.register_module_forward_hook(lambda m, a, out: calls.append(m))
    try:
        with torch.no_grad():
            want = lin(x)
            calls.clear()
            with patch_model(holder, SparseDelta([e]), enabled=False):
                got = holder.lin(x)
    finally:
        hook.remove()
    assert torch.equal(got, want)
    assert any(c is lin for c in calls) if where == "global" else calls


def test_patched_under_inference_mode_toggles_outside():
    """Switches and fast-path factors made inside torch.inference_mode() are normal tensors, so
    toggling and masking later (outside it) writes them in place without an error."""
    holder = _lin_holder()
    lin = holder.lin
    e = _out_edit(lin, 5, 2, seed=1)
    x = torch.randn(2, lin.in_features)
    with torch.inference_mode():
        base = lin(x)
        handle = patch_model(holder, SparseDelta([e]), row_mask=[True, True])
        on = holder.lin(x)
    handle.disable()
    handle.set_row_mask([True, False])
    handle.enable()
    with torch.no_grad():
        got = holder.lin(x)
    assert torch.equal(got[1], base[1]) and torch.equal(got[0], on[0])
    with torch.inference_mode():
        handle.set_row_mask([False, True])
    handle.set_row_mask([True, True])
    handle.remove()


# -- torch.compile ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fast", [False, True], ids=["scale-edit", "fast-path"])
def test_torch_compile_toggle_without_recompiling(fast):
    """Toggling and same-length row masks do not recompile, on the general path (an edit with a
    neuron scale) and on the CPU fast path (additive side-out edits only)."""
    torch._dynamo.reset()
    model = make_tiny_model("llama")
    ids = tiny_input_ids()
    delta = (SparseDelta([random_edit(model, LAYER, "up", m=20, r=3, seed=7)]) if fast
             else random_delta(model, LAYER, scale=True))
    base = logits(model, ids)
    handle = patch_model(model, delta)
    if fast:
        assert model.get_submodule(delta.edits[0].module)._fast is not None
    eager_on = logits(model, ids)
    compiled = torch.compile(model)
    with torch.no_grad():
        run = lambda: compiled(ids, use_cache=False).logits  # noqa: E731
        torch.testing.assert_close(run(), eager_on, **FP32)
        with torch._dynamo.config.patch(error_on_recompile=True):
            handle.disable()
            torch.testing.assert_close(run(), base, **FP32)
            handle.enable()
            torch.testing.assert_close(run(), eager_on, **FP32)
        handle.set_row_mask([True, False])  # None -> a mask: one recompile is allowed
        mixed = run()
        torch.testing.assert_close(mixed[0], eager_on[0], **FP32)
        torch.testing.assert_close(mixed[1], base[1], **FP32)
        with torch._dynamo.config.patch(error_on_recompile=True):
            handle.set_row_mask([False, True])  # same length: written in place
            mixed = run()
            torch.testing.assert_close(mixed[1], eager_on[1], **FP32)
            torch.testing.assert_close(mixed[0], base[0], **FP32)
    handle.remove()
    torch._dynamo.reset()


# -- atomicity ----------------------------------------------------------------------------------------
def _bad_second_edit(model, kind: str):
    good = random_edit(model, LAYER, "up", seed=1)
    down = find_mlp(model, LAYER).down
    g = torch.Generator().manual_seed(2)
    if kind == "bad_path":
        bad = ModuleEdit(down.replace("down_proj", "nope_proj"), "in", torch.tensor([1]),
                         torch.randn(HIDDEN, 1, generator=g), torch.randn(1, 1, generator=g))
    elif kind == "not_linear":
        bad = ModuleEdit(f"model.layers.{LAYER}.mlp", "in", torch.tensor([1]), scale=torch.tensor([0.0]))
    elif kind == "wrong_shape":
        bad = ModuleEdit(down, "in", torch.tensor([1, 2]), torch.randn(HIDDEN + 1, 1, generator=g),
                         torch.randn(1, 2, generator=g))
    elif kind == "out_of_range":
        bad = ModuleEdit(down, "in", torch.tensor([1, D_FF]), scale=torch.ones(2))
    elif kind == "nan_after_construction":
        bad = random_edit(model, LAYER, "down", seed=2)
        delta = SparseDelta([good, bad])
        bad.V[0, 0] = float("nan")  # valid when built, poisoned afterwards
        return delta
    else:
        raise AssertionError(kind)
    return SparseDelta([good, bad])


@pytest.mark.parametrize("kind, match", [
    ("bad_path", "no such module"),
    ("not_linear", "not a torch.nn.Linear"),
    ("wrong_shape", r"U must be \(out_features=64, r\)"),
    ("out_of_range", "index 128 out of range for in_features=128"),
    ("nan_after_construction", "V contains NaN"),
    ("fingerprint", "fitted on another base model"),
])
def test_atomic_on_bad_delta(arch, model, kind, match):
    prior = patch_model(model, random_delta(model, 0, seed=5))  # an existing patch must survive intact
    prior_edits = {p: list(m._edits) for p, m in patched_modules(model).items()}
    snap = state_snapshot(model)
    tree = [(n, type(m), id(m)) for n, m in model.named_modules()]
    if kind == "fingerprint":
        other = make_tiny_model(arch, seed=123)
        delta = random_delta(model, LAYER)
        delta = SparseDelta(delta.edits, fingerprint=compute_fingerprint(other, delta.modules))
        err = FingerprintMismatchError
    else:
        delta = _bad_second_edit(model, kind)
        err = DeltaError
    with pytest.raises(err, match=match):
        patch_model(model, delta)
    assert_state_equal(model, snap)
    assert [(n, type(m), id(m)) for n, m in model.named_modules()] == tree
    assert {p: list(m._edits) for p, m in patched_modules(model).items()} == prior_edits
    prior.remove()
    assert not patched_modules(model)


def test_fingerprint_matches_and_can_be_skipped(arch, model):
    delta = random_delta(model, LAYER)
    signed = SparseDelta(delta.edits, fingerprint=compute_fingerprint(model, delta.modules))
    patch_model(model, signed).remove()
    other = make_tiny_model(arch, seed=9)
    with pytest.raises(FingerprintMismatchError, match="check_fingerprint=False"):
        patch_model(other, signed)
    patch_model(other, signed, check_fingerprint=False).remove()


def test_delta_for_a_model_of_another_size_names_the_model_not_a_shape():
    """A signed delta applied to a model of another size fails on the fingerprint (the config
    shapes that differ), before any module's shape check; check_patch raises the same and leaves
    the model untouched."""
    from edit_runtime.patch import check_patch

    small = make_tiny_model("llama")
    delta = random_delta(small, LAYER)
    signed = SparseDelta(delta.edits, fingerprint=compute_fingerprint(small, delta.modules))
    wide = make_tiny_model("llama", hidden_size=2 * small.config.hidden_size)
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    for call in (patch_model, check_patch):
        with pytest.raises(FingerprintMismatchError, match="config shapes differ.*hidden_size"):
            call(wide, signed)
    with pytest.raises(DeltaError, match="V must be"):  # without the fingerprint check: the shape
        check_patch(wide, signed, check_fingerprint=False)
    assert not patched_modules(wide)
    assert all(torch.equal(v, wide.state_dict()[k]) for k, v in before.items())


def test_not_a_delta(model):
    with pytest.raises(DeltaError, match="SparseDelta"):
        patch_model(model, {"edits": []})
