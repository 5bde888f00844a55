"""Test helpers: random deltas on an MLP (by structure, via edit_runtime.arch) and the dense
hand-edited reference model they must match."""
from __future__ import annotations

import contextlib
import copy

import torch

from edit_runtime.arch import find_decoder_layers, find_mlp, neuron_target
from edit_runtime.delta import ModuleEdit, SparseDelta


def random_edit(model, layer: int, proj: str, *, m: int = 5, r: int = 2, magnitude: float = 0.5,
                scale: bool = False, lowrank: bool = True, seed: int = 0, neurons=None) -> ModuleEdit:
    """A random ``ModuleEdit`` on ``m`` neurons of ``proj`` ("up"/"gate"/"down") of ``layer``.

    Side out (up/gate) or in (down) follows from the projection; fused gate_up_proj gets the
    offset. ``magnitude`` is the std of U @ V entries (roughly); ``scale`` adds a random scale.
    """
    g = torch.Generator().manual_seed(seed)
    info = find_mlp(model, layer)
    path, side, offset = neuron_target(model, layer, proj)
    if neurons is None:
        neurons = torch.randperm(info.d_ff, generator=g)[:m].sort().values
    neurons = torch.as_tensor(neurons, dtype=torch.int64) + offset
    m = neurons.numel()
    U = V = sc = None
    if lowrank:
        rows, cols = (m, info.d_model) if side == "out" else (info.d_model, m)
        U = torch.randn(rows, r, generator=g) * (magnitude / r**0.25)
        V = torch.randn(r, cols, generator=g) * (magnitude / r**0.25)
    if scale:
        sc = torch.rand(m, generator=g) * 2.0  # in [0, 2): suppress .. amplify
    return ModuleEdit(path, side, neurons, U, V, sc)


def random_delta(model, layer: int | None = None, *, seed: int = 0, **kw) -> SparseDelta:
    """up (side out, gate_up_proj rows d_ff + j when fused) and down (side in) of a middle layer."""
    n_layers = len(find_decoder_layers(model)[1])
    layer = n_layers // 2 if layer is None else layer
    return SparseDelta([random_edit(model, layer, "up", seed=seed, **kw),
                        random_edit(model, layer, "down", seed=seed + 1, **kw)],
                       metadata={"test": "random", "layer": layer})


@torch.no_grad()
def dense_apply_(model, delta: SparseDelta) -> None:
    """Edits ``model``'s weights in place by hand, densely, in float64 (edit order)."""
    for e in delta.edits:
        lin = model.get_submodule(e.module)
        W = lin.weight
        Wd = W.double()
        S = e.neurons
        if e.side == "out":
            rows = Wd[S]
            if e.U is not None:
                rows = rows + e.U.double() @ e.V.double()
            if e.scale is not None:
                rows = e.scale.double()[:, None] * rows
                if lin.bias is not None:
                    lin.bias[S] = (e.scale.double() * lin.bias.double()[S]).to(lin.bias.dtype)
            W[S] = rows.to(W.dtype)
        else:
            cols = Wd[:, S]
            if e.U is not None:
                cols = cols + e.U.double() @ e.V.double()
            if e.scale is not None:
                cols = cols * e.scale.double()[None, :]
            W[:, S] = cols.to(W.dtype)


def dense_edited(model, *deltas: SparseDelta):
    """A deep copy of ``model`` with each delta applied densely, in order (model must be unpatched)."""
    from edit_runtime.patch import patched_modules

    assert not patched_modules(model), "dense_edited() needs the unpatched model"
    edited = copy.deepcopy(model)
    for d in deltas:
        dense_apply_(edited, d)
    return edited


def state_snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model, snapshot: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert list(now) == list(snapshot), "state_dict keys changed"
    for k, v in snapshot.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), f"{k} changed"


@contextlib.contextmanager
def dense_edited_inplace(model, *deltas: SparseDelta):
    """Edits ``model`` densely in place (for models too big to deep-copy) and restores the saved
    rows/columns bit for bit on exit. The model must be unpatched."""
    from edit_runtime.patch import patched_modules

    assert not patched_modules(model), "dense_edited_inplace() needs the unpatched model"
    saved = {}
    for d in deltas:
        for e in d.edits:
            lin = model.get_submodule(e.module)
            if e.module not in saved:
                saved[e.module] = (lin.weight.detach().clone(),
                                   None if lin.bias is None else lin.bias.detach().clone())
    try:
        for d in deltas:
            dense_apply_(model, d)
        yield model
    finally:
        with torch.no_grad():
            for path, (w, b) in saved.items():
                lin = model.get_submodule(path)
                lin.weight.copy_(w)
                if b is not None:
                    lin.bias.copy_(b)
