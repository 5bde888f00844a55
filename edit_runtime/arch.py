"""Find decoder layers and MLP projections by structure, never by model-type strings.

Two structural rules cover the Llama family (Llama, Qwen2, Mistral, Gemma, Gemma2, SmolLM2, ...)
and Phi-3:

- the **decoder layers** are the longest ``nn.ModuleList`` whose items are all of one class
  (ties: the list whose blocks hold a gated MLP wins, then the first in ``named_modules`` order);
- an **MLP** is a module with a ``down_proj`` plus either ``gate_proj`` and ``up_proj`` or one
  fused ``gate_up_proj`` whose output is ``[gate; up]`` (each ``d_ff`` wide, Phi-3).

:func:`neuron_target` turns "neuron j of the up/gate/down projection of layer L" into the
``(module path, side, index offset)`` that a :class:`~edit_runtime.delta.ModuleEdit` needs, so
callers never special-case the fused layout: up neuron j of a fused ``gate_up_proj`` is row
``d_ff + j``, gate neuron j is row ``j``.

All paths are dotted paths from the model root (``model.get_submodule(path)`` resolves them).
A module wrapped by :mod:`edit_runtime.patch` (it keeps the original as ``base_layer``) counts
as the Linear it wraps, so the functions work on patched models too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

__all__ = [
    "ArchError",
    "MLPInfo",
    "Projection",
    "find_decoder_layers",
    "find_mlp",
    "find_mlps",
    "neuron_target",
]

Projection = Literal["up", "gate", "down"]


class ArchError(ValueError):
    """The model's structure has no decoder-layer list or no gated MLP where one was expected."""


def _linear_shape(module: nn.Module | None) -> tuple[int, int] | None:
    """``(out_features, in_features)`` of a Linear or of a wrapper around one, else None."""
    if module is None:
        return None
    base = getattr(module, "base_layer", module)
    if isinstance(base, nn.Linear):
        return int(base.out_features), int(base.in_features)
    return None


@dataclass(frozen=True)
class MLPInfo:
    """Where the projections of one decoder layer's gated MLP live.

    Attributes:
        layer: index of the decoder layer.
        path: dotted path of the MLP module, e.g. ``model.layers.3.mlp``.
        down: dotted path of ``down_proj`` (``(d_model, d_ff)`` weight; its neurons are inputs).
        gate: dotted path of ``gate_proj``, or None when fused.
        up: dotted path of ``up_proj``, or None when fused.
        gate_up: dotted path of the fused ``gate_up_proj`` (``(2 d_ff, d_model)`` weight, rows
            ``[0, d_ff)`` are the gate, rows ``[d_ff, 2 d_ff)`` the up projection), or None.
        d_model: hidden size (``down_proj.out_features``).
        d_ff: intermediate size (``down_proj.in_features``).
    """

    layer: int
    path: str
    down: str
    gate: str | None
    up: str | None
    gate_up: str | None
    d_model: int
    d_ff: int

    @property
    def fused(self) -> bool:
        return self.gate_up is not None

    def target(self, proj: Projection) -> tuple[str, str, int]:
        """``(module path, side, index offset)`` of neuron index 0 of ``proj``; see :func:`neuron_target`."""
        if proj == "down":
            return self.down, "in", 0
        if proj == "up":
            return (self.gate_up, "out", self.d_ff) if self.fused else (self.up, "out", 0)
        if proj == "gate":
            return (self.gate_up, "out", 0) if self.fused else (self.gate, "out", 0)
        raise ValueError(f"proj must be 'up', 'gate' or 'down', got {proj!r}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_repeated(modules: nn.ModuleList) -> bool:
    return len(modules) > 0 and len({type(m) for m in modules}) == 1


def _mlp_candidates(block: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """Modules under ``block`` (itself included) that have the gated-MLP projections."""
    found = []
    for name, module in block.named_modules(prefix=prefix):
        if _linear_shape(getattr(module, "down_proj", None)) is None:
            continue
        split = all(_linear_shape(getattr(module, n, None)) for n in ("gate_proj", "up_proj"))
        fused = _linear_shape(getattr(module, "gate_up_proj", None)) is not None
        if split or fused:
            found.append((name, module))
    return found


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-layer list: ``(dotted path, ModuleList)``.

    The longest ``nn.ModuleList`` whose items all share one class; among equally long lists the
    one whose blocks hold a gated MLP wins (so a vision tower of the same depth is skipped), then
    the first in ``named_modules`` order. Raises ``ArchError`` if the model has no such list.
    """
    best: tuple[tuple[int, int, int], str, nn.ModuleList] | None = None
    for order, (name, module) in enumerate(model.named_modules()):
        if not isinstance(module, nn.ModuleList) or not _is_repeated(module):
            continue
        has_mlp = int(bool(_mlp_candidates(module[0], "")))
        key = (len(module), has_mlp, -order)
        if best is None or key > best[0]:
            best = (key, name, module)
    if best is None:
        raise ArchError(
            f"{type(model).__name__} has no nn.ModuleList of repeated blocks: cannot find its decoder layers"
        )
    return best[1], best[2]


def find_mlp(model: nn.Module, layer: int) -> MLPInfo:
    """The gated MLP of decoder layer ``layer`` (negative indices count from the end).

    Raises ``ArchError`` when the layer holds no module with ``down_proj`` and
    ``gate_proj``/``up_proj`` or ``gate_up_proj``, when it holds several at the shallowest depth
    (ambiguous, e.g. a mixture of experts without a shared expert), or when the shapes disagree.
    """
    layers_path, layers = find_decoder_layers(model)
    n = len(layers)
    if not -n <= layer < n:
        raise ArchError(f"layer {layer} out of range: the model has {n} decoder layers at {layers_path!r}")
    index = layer % n
    block_path = _join(layers_path, str(index))
    candidates = _mlp_candidates(layers[index], block_path)
    if not candidates:
        raise ArchError(
            f"decoder layer {block_path!r} ({type(layers[index]).__name__}) has no module with down_proj "
            "and gate_proj/up_proj or a fused gate_up_proj"
        )
    depth = min(p.count(".") for p, _ in candidates)
    shallowest = [(p, m) for p, m in candidates if p.count(".") == depth]
    if len(shallowest) > 1:
        raise ArchError(f"decoder layer {block_path!r} has several gated MLPs: {[p for p, _ in shallowest]}")
    path, mlp = shallowest[0]
    d_model, d_ff = _linear_shape(mlp.down_proj)
    if _linear_shape(getattr(mlp, "gate_proj", None)) and _linear_shape(getattr(mlp, "up_proj", None)):
        for proj in ("gate_proj", "up_proj"):
            shape = _linear_shape(getattr(mlp, proj))
            if shape != (d_ff, d_model):
                raise ArchError(
                    f"{path}.{proj} has weight shape {shape}, expected (d_ff={d_ff}, d_model={d_model}) "
                    "from down_proj"
                )
        return MLPInfo(index, path, f"{path}.down_proj", f"{path}.gate_proj", f"{path}.up_proj", None, d_model, d_ff)
    shape = _linear_shape(mlp.gate_up_proj)
    if shape != (2 * d_ff, d_model):
        raise ArchError(
            f"{path}.gate_up_proj has weight shape {shape}, expected (2*d_ff={2 * d_ff}, d_model={d_model}) "
            "from down_proj"
        )
    return MLPInfo(index, path, f"{path}.down_proj", None, None, f"{path}.gate_up_proj", d_model, d_ff)


def find_mlps(model: nn.Module) -> list[MLPInfo]:
    """:func:`find_mlp` for every decoder layer, in order."""
    _, layers = find_decoder_layers(model)
    return [find_mlp(model, i) for i in range(len(layers))]


def neuron_target(model: nn.Module, layer: int, proj: Projection) -> tuple[str, str, int]:
    """Where neuron j of ``proj`` in decoder layer ``layer`` lives: ``(module path, side, offset)``.

    Neuron j is index ``offset + j`` on ``side`` of the module at ``module path``:

    - ``"up"``: the row of ``up_proj`` (offset 0), or of a fused ``gate_up_proj`` (offset d_ff);
    - ``"gate"``: the row of ``gate_proj`` or of a fused ``gate_up_proj`` (offset 0);
    - ``"down"``: the column (input) of ``down_proj``, side ``"in"`` (offset 0).

    E.g. ``path, side, off = neuron_target(model, 12, "up")`` then
    ``ModuleEdit(path, side, neurons=S + off, U=U, V=V)``.
    """
    return find_mlp(model, layer).target(proj)
