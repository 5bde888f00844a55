"""edit_runtime.arch: decoder layers and MLP projections found by structure, on tiny random models
of every supported architecture and on hand-made modules that no model-type string describes."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from edit_runtime.arch import ArchError, MLPInfo, find_decoder_layers, find_mlp, find_mlps, neuron_target
from tiny_models import ARCHS, D_FF, FUSED_ARCHS, HIDDEN, make_tiny_model, tiny_input_ids


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request):
    return request.param, make_tiny_model(request.param, num_layers=3)


def test_decoder_layers_and_mlps(tiny):
    arch, model = tiny
    path, layers = find_decoder_layers(model)
    assert path == "model.layers" and layers is model.model.layers and len(layers) == 3
    infos = find_mlps(model)
    assert [i.layer for i in infos] == [0, 1, 2]
    info = find_mlp(model, 1)
    assert info.path == "model.layers.1.mlp"
    assert (info.d_model, info.d_ff) == (HIDDEN, D_FF)
    assert info.down == "model.layers.1.mlp.down_proj"
    if arch in FUSED_ARCHS:
        assert info.fused and info.gate is None and info.up is None
        assert info.gate_up == "model.layers.1.mlp.gate_up_proj"
    else:
        assert not info.fused and info.gate_up is None
        assert (info.gate, info.up) == ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj")
    for p in (info.down, info.gate, info.up, info.gate_up):
        if p is not None:
            assert isinstance(model.get_submodule(p), nn.Linear)
    assert find_mlp(model, -1) == find_mlp(model, 2)


def test_neuron_target_offsets(tiny):
    arch, model = tiny
    fused = arch in FUSED_ARCHS
    prefix = "model.layers.0.mlp."
    assert neuron_target(model, 0, "up") == ((prefix + "gate_up_proj", "out", D_FF) if fused
                                             else (prefix + "up_proj", "out", 0))
    assert neuron_target(model, 0, "gate") == ((prefix + "gate_up_proj", "out", 0) if fused
                                               else (prefix + "gate_proj", "out", 0))
    assert neuron_target(model, 0, "down") == (prefix + "down_proj", "in", 0)
    with pytest.raises(ValueError, match="proj must be"):
        neuron_target(model, 0, "o_proj")


@pytest.mark.parametrize("proj", ["up", "gate"])
def test_neuron_target_names_the_right_neuron(tiny, proj):
    """Zeroing the row that neuron_target names for neuron j zeroes h[..., j], the down_proj input
    (h = act(gate) * up, and act(0) = 0 for SiLU and GELU), and nothing else."""
    arch, model = tiny
    layer, j = 1, 37
    edited = copy.deepcopy(model)
    path, side, offset = neuron_target(edited, layer, proj)
    assert side == "out"
    with torch.no_grad():
        edited.get_submodule(path).weight[offset + j] = 0.0
    down = find_mlp(model, layer).down

    def down_input(m):
        seen = {}
        hook = m.get_submodule(down).register_forward_pre_hook(lambda mod, a: seen.setdefault("h", a[0]))
        with torch.no_grad():
            m(tiny_input_ids())
        hook.remove()
        return seen["h"]

    h0, h1 = down_input(model), down_input(edited)
    assert h0[..., j].abs().max() > 0
    assert torch.equal(h1[..., j], torch.zeros_like(h1[..., j]))
    others = torch.arange(D_FF) != j
    torch.testing.assert_close(h1[..., others], h0[..., others], rtol=0, atol=0)


def test_down_target_is_input_column(tiny):
    _, model = tiny
    path, side, offset = neuron_target(model, 2, "down")
    lin = model.get_submodule(path)
    assert side == "in" and offset == 0 and lin.in_features == D_FF and lin.out_features == HIDDEN


def test_layer_out_of_range(tiny):
    _, model = tiny
    with pytest.raises(ArchError, match="out of range"):
        find_mlp(model, 3)
    with pytest.raises(ArchError, match="out of range"):
        find_mlp(model, -4)


def test_works_on_a_patched_model():
    from edit_runtime.delta import ModuleEdit, SparseDelta
    from edit_runtime.patch import patch_model

    model = make_tiny_model("phi3")
    before = find_mlp(model, 1)
    path, side, off = neuron_target(model, 1, "up")
    edit = ModuleEdit(path, side, torch.tensor([off + 3]), scale=torch.tensor([0.0]))
    handle = patch_model(model, SparseDelta([edit]))
    try:
        assert type(model.get_submodule(path)).__name__ == "EditedLinear"
        assert find_mlp(model, 1) == before
    finally:
        handle.remove()


# -- structure only: hand-made modules with no transformers class or model-type name ---------------
class _Gated(nn.Module):
    def __init__(self, d=8, f=16, fused=False):
        super().__init__()
        if fused:
            self.gate_up_proj = nn.Linear(d, 2 * f, bias=False)
        else:
            self.gate_proj, self.up_proj = nn.Linear(d, f), nn.Linear(d, f)
        self.down_proj = nn.Linear(f, d)


class _Block(nn.Module):
    def __init__(self, fused=False):
        super().__init__()
        self.attn = nn.Linear(8, 8)
        self.ffn = nn.Sequential(_Gated(fused=fused))


class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)


class _Toy(nn.Module):
    def __init__(self, n_text=4, n_vision=4, fused=False):
        super().__init__()
        self.vision = nn.ModuleDict({"blocks": nn.ModuleList(_Plain() for _ in range(n_vision))})
        self.heads = nn.ModuleList([nn.Linear(8, 8), nn.Embedding(3, 8)] * 3)  # mixed types: not layers
        self.text = nn.ModuleDict({"stack": nn.ModuleList(_Block(fused) for _ in range(n_text))})


@pytest.mark.parametrize("fused", [False, True])
def test_structure_only_toy(fused):
    toy = _Toy(fused=fused)
    path, layers = find_decoder_layers(toy)
    assert path == "text.stack" and len(layers) == 4  # ties broken by "has a gated MLP"
    info = find_mlp(toy, 2)
    assert info == MLPInfo(
        layer=2, path="text.stack.2.ffn.0", down="text.stack.2.ffn.0.down_proj",
        gate=None if fused else "text.stack.2.ffn.0.gate_proj",
        up=None if fused else "text.stack.2.ffn.0.up_proj",
        gate_up="text.stack.2.ffn.0.gate_up_proj" if fused else None, d_model=8, d_ff=16,
    )
    assert neuron_target(toy, 2, "up")[2] == (16 if fused else 0)


def test_longest_list_wins():
    path, layers = find_decoder_layers(_Toy(n_text=3, n_vision=5))
    assert path == "vision.blocks" and len(layers) == 5
    with pytest.raises(ArchError, match="no module with down_proj"):
        find_mlp(_Toy(n_text=3, n_vision=5), 0)


def test_no_layers():
    with pytest.raises(ArchError, match="no nn.ModuleList"):
        find_decoder_layers(nn.Sequential(nn.Linear(2, 2)))


def test_shape_mismatch_is_reported():
    toy = _Toy(fused=True)
    toy.text.stack[1].ffn[0].gate_up_proj = nn.Linear(8, 30, bias=False)
    with pytest.raises(ArchError, match="gate_up_proj has weight shape"):
        find_mlp(toy, 1)


def test_ambiguous_mlps():
    toy = _Toy()
    toy.text.stack[0].ffn.append(_Gated())
    with pytest.raises(ArchError, match="several gated MLPs"):
        find_mlp(toy, 0)
