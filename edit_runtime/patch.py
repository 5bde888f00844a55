"""Apply a ``SparseDelta`` to a loaded model at inference time: ``patch_model`` -> ``PatchHandle``.

Each edited ``nn.Linear`` is replaced (``setattr`` on its parent) by an :class:`EditedLinear`
that keeps the original module as ``base_layer`` and adds the sparse low-rank term of every
active edit to the base output, through ``edit_runtime.ops.lowrank_apply_out/in`` (Triton on
CUDA); the dense ``(out, in)`` delta is never formed. On CPU, a module whose unmerged edits are
all additive side-``"out"`` edits (U, V, no scale) in fp32/fp64 takes a fast path instead: its
factors are stacked, transposed and switch-folded once (``_FastPlan``), so a call adds two or
three torch calls to the base matmul (see ``_fast_apply``). When the last edit of a module goes,
the original module object is put back, so ``remove()`` leaves bit-identical weights,
``state_dict`` and logits.

Per-handle switches are tensors, not Python flags: a scalar ``enabled`` (0/1) times an optional
per-sequence row mask ``(B,)``, expanded to tokens inside the forward. Toggling writes into the
same tensors, so a model patched before ``torch.compile`` keeps its graph; a mixed batch runs
edited and unedited sequences together. The batch dimension of ``generate()`` is fixed across
decode steps, so a mask set before ``generate`` holds for every step.

Semantics of one edit on a module with weight ``W``, bias ``b`` (``scale`` defaults to ones):

- side ``"out"``: ``W[S] <- scale[:, None] * (W[S] + U @ V)``, ``b[S] <- scale * b[S]``;
- side ``"in"``:  ``W[:, S] <- (W[:, S] + U @ V) * scale[None, :]``.

Several edits on one module (from one delta or stacked deltas) apply in patch order, each to the
output of the previous ones; any handle can be removed at any time. ``merge()`` writes the edit
into the weights (saving the rows/columns it overwrites) and ``unmerge()`` restores them bit for
bit. Exactness rules, checked before anything is touched (:class:`PatchError` otherwise):

- merging moves an edit ahead of the edits patched before it that are still unmerged, so it
  must commute with them (no scale on either, or same side with disjoint neurons);
- merges undo in LIFO order where they overlap: an edit cannot be unmerged (or removed) while a
  later merge wrote to the same rows/columns (same side and shared neurons, or different sides);
- a side-``"in"`` edit with a scale reads ``W[:, S]`` from the base weight, so it cannot stack
  on an unmerged edit of the same module that changes those columns (any side-``"out"`` edit,
  or a side-``"in"`` edit sharing neurons);
- a weight shared with another parameter (tied embeddings) is never merged.

Patch after moving/casting the model (``model.to``), not before: the factors are cast to each
module's dtype and device at patch time (the fast path's stacked copies too) and live outside
the ``state_dict``. The base weight itself is never copied: the fast path reads it from the
base layer on every call, so in-place writes, ``load_state_dict`` and merges are always seen.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_hooks

from edit_runtime import ops
from edit_runtime.delta import DeltaError, ModuleEdit, SparseDelta
from edit_runtime.delta import check_fingerprint as _check_fingerprint

log = logging.getLogger(__name__)

__all__ = ["EditedLinear", "PatchError", "PatchHandle", "patch_model", "patched_modules"]


class PatchError(RuntimeError):
    """A patch operation cannot be done exactly in the model's current patch state."""


# ---------------------------------------------------------------------------------------- state
@dataclass(eq=False)
class _Switch:
    """A handle's switches on one device (shared by all its edits there).

    ``enabled``: () float32, 0 or 1; ``row_mask``: (B,) float32 0/1 or None (all rows).
    """

    enabled: torch.Tensor
    row_mask: torch.Tensor | None = None


@dataclass(eq=False)
class _Edit:
    """One active ``ModuleEdit`` inside an ``EditedLinear``; tensors on the module's device/dtype."""

    handle: "PatchHandle"
    module: str                       # dotted path in the model
    side: str                         # "out" | "in"
    neurons: torch.Tensor             # (m,) int64, module device
    U: torch.Tensor | None            # out: (m, r); in: (out_features, r); module dtype
    V: torch.Tensor | None            # out: (r, in_features); in: (r, m); module dtype
    scale: torch.Tensor | None        # (m,) module dtype
    switch: _Switch
    neurons_cpu: torch.Tensor         # (m,) int64, for overlap checks without a device sync
    merged: bool = False
    saved: tuple[torch.Tensor, torch.Tensor | None] | None = None  # weight rows/cols, bias rows

    def describe(self) -> str:
        return f"{self.module}[{self.side}, |S|={self.neurons_cpu.numel()}] of {self.handle!r}"


def _shares_neurons(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.isin(a, b).any())


def _commute(a: _Edit, b: _Edit) -> bool:
    """True when applying a then b equals b then a on any weight."""
    if a.scale is None and b.scale is None:
        return True  # both purely additive
    return a.side == b.side and not _shares_neurons(a.neurons_cpu, b.neurons_cpu)


def _regions_overlap(a: _Edit, b: _Edit) -> bool:
    """True when the weight entries a and b write intersect (rows x all, or all x columns)."""
    return a.side != b.side or _shares_neurons(a.neurons_cpu, b.neurons_cpu)


def _changes_columns(side: str, neurons: torch.Tensor, columns: torch.Tensor) -> bool:
    """True when an edit on ``side`` of ``neurons`` changes some entry of ``W[:, columns]``."""
    return side == "out" or _shares_neurons(neurons, columns)


# -------------------------------------------------------------------------------------- wrapper
def _token_mask(switch: _Switch, x: torch.Tensor) -> torch.Tensor:
    """(N,) float32 per-token factor ``enabled * row_mask[row]`` for x (..., in) flattened to N rows.

    x of shape (B, T, ..., in) has B sequences of T*... tokens; a 2-D x (N, in) has N rows; a
    1-D x is one row. Only shape checks branch here, never values.
    """
    rows = x.shape[0] if x.dim() >= 2 else 1
    per_row = 1
    for d in x.shape[1:-1]:
        per_row *= d
    mask = switch.row_mask
    if mask is None:
        return switch.enabled.expand(rows * per_row).contiguous()
    if mask.shape[0] != rows:
        raise PatchError(
            f"the row mask has {mask.shape[0]} rows but the input batch has {rows} "
            f"(input shape {tuple(x.shape)}); set a mask of length {rows} or clear it"
        )
    return (mask * switch.enabled)[:, None].expand(rows, per_row).reshape(rows * per_row)


def _row_factor(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N,) per-token row mask for x (..., in) flattened to N rows, from a (B,) mask (no enabled).

    Shape checks only, never values (see :func:`_token_mask`).
    """
    rows = x.shape[0] if x.dim() >= 2 else 1
    if mask.shape[0] != rows:
        raise PatchError(
            f"the row mask has {mask.shape[0]} rows but the input batch has {rows} "
            f"(input shape {tuple(x.shape)}); set a mask of length {rows} or clear it"
        )
    per_row = 1
    for d in x.shape[1:-1]:
        per_row *= d
    return mask if per_row == 1 else mask[:, None].expand(rows, per_row).reshape(rows * per_row)


def _apply_edit(edit: _Edit, y: torch.Tensor, x: torch.Tensor, mask: torch.Tensor,
                weight: torch.Tensor) -> torch.Tensor:
    """Adds one edit's term to y (N, out) for x (N, in); returns the updated y."""
    if edit.side == "out":
        return ops.lowrank_apply_out(y, x, edit.U, edit.V, edit.neurons, row_mask=mask, scale=edit.scale)
    # Side "in" with a scale needs the base columns W[:, S] (out, m), gathered per call so that
    # merged edits (already in the weight) are seen.
    cols = None if edit.scale is None else weight.index_select(1, edit.neurons)
    return ops.lowrank_apply_in(y, x, edit.U, edit.V, edit.neurons, row_mask=mask, scale=edit.scale,
                                weight_cols=cols)


# ------------------------------------------------------------------------------- CPU fast path
# On CPU every torch call right after the layer's big matmul costs 10-30 µs (the matmul has
# evicted the caches), as much as the edit's arithmetic at a few tokens, so the fast path below
# keeps the calls after the matmul to two or three and does no per-call checks or casts.
#
# Largest N * out_features * R (multiply-adds) for which the edits are added through a dense
# (R, out) factor, y += (x @ Vᵀ) @ B with B = Uᵀ scattered into the columns S, in one addmm.
# Above it the |S| columns alone are computed and scattered with index_add_ (one call more, but
# N*|S|*R instead of N*out*R multiply-adds). On a 2-core EPYC the dense form saves 20-60 µs at
# 1-4 tokens and ties at 8-16 tokens at 896 -> 4864 (r 16, |S| 300): 2**19 picks it up to 6
# tokens there and up to 2 tokens at 4096 -> 14336.
FAST_DENSE_MAX_MACS = 1 << 19
FAST_DTYPES = (torch.float32, torch.float64)
# torch's module-global hook dicts (filled in place by register_module_*_hook, never replaced).
_GLOBAL_HOOKS = (_module_hooks._global_backward_pre_hooks, _module_hooks._global_backward_hooks,
                 _module_hooks._global_forward_hooks, _module_hooks._global_forward_pre_hooks)


@dataclass(eq=False)
class _FastPlan:
    """A module's runtime edits, precomputed for the CPU fast path of :meth:`EditedLinear.forward`.

    Built (by :func:`_fast_plan`) only when every unmerged edit is side "out" with U, V and no
    scale and the weight is a CPU float32/float64 tensor, so that all edits are additive and
    commute. R is the sum of their ranks; the edits are stacked along R grouped by switch. The
    handles' ``enabled`` switches are folded into ``vt`` (0 or 1 times each edit's columns,
    rewritten by :meth:`refresh_live` whenever a switch toggles), so a call multiplies by nothing
    unless a row mask is set. In fp32/fp64 every product accumulates in y's dtype, as in
    ``ops.lowrank_apply_out``.
    """

    vt_src: torch.Tensor      # (in, R) Vᵀ of every edit, stacked
    vt: torch.Tensor          # (in, R) vt_src, each edit's columns times its switch's enabled
    bt: torch.Tensor | None   # (R, out) Uᵀ scattered into columns S, zeros elsewhere (dense regime)
    scatter: tuple[tuple[int, int, torch.Tensor, torch.Tensor], ...]  # (c0, r, S (m,), Uᵀ (r, m))
    groups: tuple[tuple[_Switch, int, int], ...]                      # (switch, c0, width)
    dense_max_tokens: int     # N at most this: dense regime
    single: bool              # one edit: t is used whole, no column views
    dtype: torch.dtype
    base: nn.Linear           # the wrapped layer, run as F.linear when it is a plain hook-free Linear
    params: dict              # base._parameters (read per call, so a replaced weight is seen)
    plain: bool               # type(base) is nn.Linear (its forward is F.linear)
    hooks: tuple[dict, ...]   # base's forward/backward hook dicts
    masked: bool = False      # some switch has a row mask (kept by refresh_live)

    @torch.no_grad()
    def refresh_live(self) -> None:
        """Rewrites ``vt`` from ``vt_src`` and the switches' ``enabled`` (in place), and ``masked``.

        Called on every change of a switch (enable/disable, row mask set/cleared)."""
        for switch, c0, width in self.groups:
            self.vt[:, c0:c0 + width].copy_(self.vt_src[:, c0:c0 + width] * switch.enabled)
        self.masked = any(switch.row_mask is not None for switch, _, _ in self.groups)

    def hook_free(self) -> bool:
        """True when calling ``base`` would run exactly ``F.linear`` (no hooks anywhere), so the
        fast path may call ``F.linear`` itself: the test ``nn.Module._call_impl`` makes, on the
        same hook dicts (modules and torch fill them in place, never replace them)."""
        return self.plain and not any(self.hooks) and not any(_GLOBAL_HOOKS)


@torch.inference_mode(False)  # normal tensors: refresh_live writes them in place in any mode
@torch.no_grad()
def _fast_plan(base: nn.Linear, runtime: tuple[_Edit, ...]) -> _FastPlan | None:
    """The fast-path plan of ``runtime`` on ``base``, or None where the general path must run."""
    weight = base.weight
    if not runtime or weight.device.type != "cpu" or weight.dtype not in FAST_DTYPES:
        return None
    if any(e.side != "out" or e.U is None or e.scale is not None or e.U.dtype != weight.dtype
           or e.V.dtype != weight.dtype or e.U.device != weight.device for e in runtime):
        return None
    switches: list[_Switch] = []
    for e in runtime:
        if not any(e.switch is s for s in switches):
            switches.append(e.switch)
    ordered = [e for s in switches for e in runtime if e.switch is s]
    out_features = weight.shape[0]
    rank = sum(e.U.shape[1] for e in ordered)
    vt_src = torch.cat([e.V for e in ordered], 0).t().contiguous()        # (in, R)
    dense_max = FAST_DENSE_MAX_MACS // (out_features * rank)
    bt = weight.new_zeros(rank, out_features) if dense_max > 0 else None
    scatter, groups, c0 = [], [], 0
    for s in switches:
        start = c0
        for e in ordered:
            if e.switch is not s:
                continue
            r = e.U.shape[1]
            ut = e.U.t().contiguous()                                     # (r, m)
            if bt is not None:
                bt[c0:c0 + r].index_copy_(1, e.neurons, ut)
            scatter.append((c0, r, e.neurons, ut))
            c0 += r
        groups.append((s, start, c0 - start))
    hooks = (base._backward_hooks, base._backward_pre_hooks, base._forward_hooks, base._forward_pre_hooks)
    plan = _FastPlan(vt_src, torch.empty_like(vt_src), bt, tuple(scatter), tuple(groups), dense_max,
                     len(scatter) == 1, weight.dtype, base, base._parameters, type(base) is nn.Linear,
                     hooks)
    plan.refresh_live()
    return plan


def _fast_apply(fast: _FastPlan, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The CPU fast path: ``y += (x @ Vᵀ) @ Uᵀ`` on the columns S of every edit of ``fast``.

    x (..., in) and y = base(x) (..., out), contiguous, in ``fast.dtype``; y is updated in place
    and returned. Two torch calls after the base matmul (dense regime, N <= dense_max_tokens) or
    one more per edit (scatter regime), plus one multiply per masked switch; no checks or casts.
    """
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # (N, in)
    y2 = y if y.dim() == 2 else y.view(-1, y.shape[-1])     # (N, out), a view of y
    t = torch.mm(x2, fast.vt)                               # (N, R), enabled folded in
    if fast.masked:  # whether some mask is set, never its values
        for switch, c0, width in fast.groups:
            if switch.row_mask is not None:
                rows = _row_factor(switch.row_mask, x).unsqueeze(1)
                (t if fast.single else t.narrow(1, c0, width)).mul_(rows)
    if x2.shape[0] <= fast.dense_max_tokens:
        y2.addmm_(t, fast.bt)                               # one addmm for all edits
    else:
        for c0, r, neurons, ut in fast.scatter:
            y2.index_add_(1, neurons, torch.mm(t if fast.single else t.narrow(1, c0, r), ut))
    return y


def _hide_base_layer_keys(module, state_dict, prefix, local_metadata) -> None:
    # state_dict keys stay those of the unpatched model ("...up_proj.weight", not
    # "...up_proj.base_layer.weight"), so a merged model saves as a plain checkpoint.
    inner = prefix + "base_layer."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _route_keys_to_base_layer(module, state_dict, prefix, *args) -> None:
    for name in list(module.base_layer.state_dict(keep_vars=True)):
        key = prefix + name
        if key in state_dict and prefix + "base_layer." + name not in state_dict:
            state_dict[prefix + "base_layer." + name] = state_dict.pop(key)


class EditedLinear(nn.Module):
    """A Linear plus a stack of sparse low-rank edits; the original module is ``base_layer``.

    ``weight``, ``bias``, ``in_features`` and ``out_features`` are those of the base layer, and
    ``state_dict`` keys are the unpatched model's, so code that reads them keeps working.
    Built and torn down by :func:`patch_model` / :meth:`PatchHandle.remove` only.
    """

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        self.base_layer = base_layer
        self._edits: list[_Edit] = []          # patch order
        self._merge_order: list[_Edit] = []    # merged edits, oldest merge first
        self._runtime: tuple[_Edit, ...] = ()  # unmerged edits, patch order (what forward runs)
        self._fast: _FastPlan | None = None    # CPU fast path of _runtime, when it applies
        self.register_state_dict_post_hook(_hide_base_layer_keys)
        self.register_load_state_dict_pre_hook(_route_keys_to_base_layer)

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def _refresh(self) -> None:
        """Recomputes what forward runs after the edit list or a merge state changed."""
        self._runtime = tuple(e for e in self._edits if not e.merged)
        self._fast = _fast_plan(self.base_layer, self._runtime)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self._fast
        if fast is None or not fast.hook_free():  # structural: which edits, device, dtype, hooks
            return self._forward_general(x)
        params = fast.params  # the base layer as F.linear: what calling it would run
        y = F.linear(x, params["weight"], params["bias"])
        if y.dtype is not fast.dtype:  # e.g. under autocast
            return self._apply_general(x, y)
        return _fast_apply(fast, x, y)

    def _forward_general(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self._runtime:  # structural (all merged), not data-dependent
            return y
        return self._apply_general(x, y)

    def _apply_general(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Every runtime edit through ``ops.lowrank_apply_out/in`` (Triton on CUDA), in patch order."""
        x2 = x.reshape(-1, x.shape[-1])   # (N, in)
        y2 = y.reshape(-1, y.shape[-1])   # (N, out)
        for edit in self._runtime:
            y2 = _apply_edit(edit, y2, x2, _token_mask(edit.switch, x), self.base_layer.weight)
        return y2.reshape(y.shape)

    def extra_repr(self) -> str:
        merged = sum(e.merged for e in self._edits)
        return f"edits={len(self._edits)}, merged={merged}"


def patched_modules(model: nn.Module) -> dict[str, EditedLinear]:
    """The ``EditedLinear`` wrappers currently installed in ``model``, by dotted path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, EditedLinear)}


# --------------------------------------------------------------------------------------- handle
def _bool_mask(mask) -> torch.Tensor:
    mask = torch.as_tensor(mask)
    if mask.dim() != 1:
        raise ValueError(f"row mask must be 1-D (batch,), got shape {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("row mask values must be 0/1 (or bool)")
        mask = mask != 0
    return mask


class PatchHandle:
    """Controls one applied delta: toggle, per-row mask, merge/unmerge, remove.

    Made by :func:`patch_model` (a handle built directly is attached to nothing). Also a context
    manager: ``with patch_model(m, d): ...`` removes the patch on exit.

    Attributes:
        model: the patched model.
        delta: the :class:`~edit_runtime.delta.SparseDelta` this handle applied.
        row_mask_owner: the :class:`edit_runtime.gate.GateHandle` that decides the row mask in
            every forward while a gate is attached, else ``None``.
    """

    def __init__(self, model: nn.Module, delta: SparseDelta):
        self.model = model
        self.delta = delta
        self._edits: list[_Edit] = []                 # delta order
        self._switches: dict[torch.device, _Switch] = {}
        self._removed = False
        self._merged = False
        # who re-decides the row mask in every forward (a gate.GateHandle), or None; set by
        # gate.attach_gate, so that a mask a user left behind can be told from a gate's
        self.row_mask_owner: Any = None

    def __repr__(self) -> str:
        state = "removed" if self._removed else ("merged" if self._merged else "active")
        return f"PatchHandle(0x{id(self):x}, {len(self.delta.edits)} edits, {state})"

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        if not self._removed:
            self.remove()

    # -- state -----------------------------------------------------------------------------
    @property
    def modules(self) -> list[str]:
        """Dotted paths of the edited modules, in delta order (a module may repeat, one per side)."""
        return [e.module for e in self._edits]

    @property
    def removed(self) -> bool:
        """Whether :meth:`remove` ran: the original modules are back and the handle is spent."""
        return self._removed

    @property
    def merged(self) -> bool:
        """Whether the edit is folded into the weights (:meth:`merge`); :meth:`unmerge` undoes it."""
        return self._merged

    @property
    def enabled(self) -> bool:
        """Whether the edit is on (merged counts as on). Reads the tensor: a host sync."""
        self._check_alive()
        return self._merged or bool(next(iter(self._switches.values())).enabled.item())

    @property
    def row_mask(self) -> torch.Tensor | None:
        """The current per-sequence mask as a (B,) bool CPU tensor, or None (all rows)."""
        self._check_alive()
        mask = next(iter(self._switches.values())).row_mask
        return None if mask is None else mask.detach().cpu() != 0

    def _check_alive(self) -> None:
        if self._removed:
            raise PatchError(f"{self!r} was removed; patch the model again")

    def _check_not_merged(self, what: str) -> None:
        if self._merged:
            raise PatchError(f"cannot {what} {self!r}: it is merged into the weights; unmerge() first")

    # -- toggling ----------------------------------------------------------------------------
    def set_enabled(self, flag: bool) -> None:
        """Turns the edit on or off by writing the ``enabled`` tensors in place (no recompile)."""
        self._check_alive()
        if not flag:
            self._check_not_merged("disable")
        for switch in self._switches.values():
            switch.enabled.fill_(1.0 if flag else 0.0)
        self._refresh_fast()

    def _refresh_fast(self) -> None:
        # The CPU fast path folds enabled into its factors and caches whether a mask is set.
        for wrapper in {id(w): w for w in map(self._wrapper, self._edits)}.values():
            if wrapper._fast is not None:
                wrapper._fast.refresh_live()

    def enable(self) -> None:
        """Turns the edit on (``set_enabled(True)``)."""
        self.set_enabled(True)

    def disable(self) -> None:
        """Turns the edit off: the base model runs, same graph (``set_enabled(False)``; refused
        while merged)."""
        self.set_enabled(False)

    @contextlib.contextmanager
    def disabled(self) -> Iterator["PatchHandle"]:
        """``with handle.disabled():`` runs the base model; the previous state comes back on exit."""
        before = self.enabled
        self.disable()
        try:
            yield self
        finally:
            if not self._removed:
                self.set_enabled(before)

    @contextlib.contextmanager
    def enabled_ctx(self) -> Iterator["PatchHandle"]:
        """``with handle.enabled_ctx():`` runs with the edit on; the previous state comes back on exit."""
        before = self.enabled
        self.enable()
        try:
            yield self
        finally:
            if not self._removed:
                self.set_enabled(before)

    # -- row mask ----------------------------------------------------------------------------
    def _check_mask_owner(self, owner: Any, what: str) -> None:
        # a gate re-decides the mask in every forward: a mask written by anyone else would be
        # silently overwritten, so it is refused instead
        if self.row_mask_owner is not None and owner is not self.row_mask_owner:
            raise PatchError(f"cannot {what} the row mask of {self!r}: the attached gate "
                             f"({self.row_mask_owner!r}) decides it in every forward; remove the gate first")

    def set_row_mask(self, mask, *, owner: Any = None) -> None:
        """Applies the edit only to the sequences (rows of the batch dimension) where mask is True.

        ``mask``: (B,) bool or 0/1. Inputs (B, T, in) expand it over T; 2-D inputs (N, in) need
        N == B. A forward whose batch is not B raises ``PatchError``. A mask of the same length
        as the current one is written in place (no recompile under ``torch.compile``).
        ``owner``: while a gate is attached (:attr:`row_mask_owner`), only it (and code acting for
        it, passing it as ``owner``) may write the mask; anyone else gets ``PatchError``.
        """
        self._check_alive()
        self._check_not_merged("set a row mask on")
        self._check_mask_owner(owner, "set")
        mask = _bool_mask(mask)
        for device, switch in self._switches.items():
            with torch.inference_mode(False):  # a normal tensor: later copy_ into it in any mode
                values = mask.to(device=device, dtype=torch.float32)
            if switch.row_mask is not None and switch.row_mask.shape == values.shape:
                switch.row_mask.copy_(values)
            else:
                switch.row_mask = values
        self._refresh_fast()

    def clear_row_mask(self, *, owner: Any = None) -> None:
        """All rows edited again (subject to ``enabled``); ``owner`` as in :meth:`set_row_mask`."""
        self._check_alive()
        self._check_mask_owner(owner, "clear")
        for switch in self._switches.values():
            switch.row_mask = None
        self._refresh_fast()

    @contextlib.contextmanager
    def row_mask_ctx(self, mask) -> Iterator["PatchHandle"]:
        """``with handle.row_mask_ctx(mask):`` sets the mask; the previous one comes back on exit."""
        before = self.row_mask
        self.set_row_mask(mask)
        try:
            yield self
        finally:
            if not self._removed:
                if before is None:
                    self.clear_row_mask()
                else:
                    self.set_row_mask(before)

    # -- merge -------------------------------------------------------------------------------
    def _wrapper(self, edit: _Edit) -> EditedLinear:
        return self.model.get_submodule(edit.module)

    def _check_can_merge(self) -> None:
        if any(float(s.enabled) == 0.0 for s in self._switches.values()):
            raise PatchError(f"cannot merge {self!r} while it is disabled: enable() it first")
        if any(s.row_mask is not None for s in self._switches.values()):
            raise PatchError(f"cannot merge {self!r} while a row mask is set: merging edits every row")
        for edit in self._edits:
            wrapper = self._wrapper(edit)
            for other in wrapper._edits[: wrapper._edits.index(edit)]:
                if other.handle is not self and not other.merged and not _commute(other, edit):
                    raise PatchError(
                        f"cannot merge {edit.describe()}: it does not commute with the earlier "
                        f"unmerged {other.describe()}; merge or remove that one first"
                    )
            _check_not_tied(self.model, edit.module, wrapper)

    def merge(self) -> None:
        """Writes the edit into the weights (zero runtime overhead); ``unmerge()`` undoes it exactly.

        The overwritten rows (side out, with their bias) or columns (side in) are saved first.
        Computed in fp32 and rounded once to the weight's dtype; all-or-nothing.
        """
        self._check_alive()
        if self._merged:
            return
        self._check_can_merge()
        done: list[_Edit] = []
        try:
            for edit in self._edits:
                _merge_edit(self._wrapper(edit), edit)
                done.append(edit)
        except BaseException:
            for edit in reversed(done):
                _unmerge_edit(self._wrapper(edit), edit)
            raise
        self._merged = True

    def _check_can_unmerge(self) -> None:
        for edit in self._edits:
            wrapper = self._wrapper(edit)
            later = wrapper._merge_order[wrapper._merge_order.index(edit) + 1:]
            for other in later:
                if other.handle is not self and _regions_overlap(other, edit):
                    raise PatchError(
                        f"cannot unmerge {edit.describe()}: {other.describe()} was merged later into "
                        "the same weights; merges undo in LIFO order there, unmerge that one first"
                    )
            for other in wrapper._edits[wrapper._edits.index(edit) + 1:]:
                if (other.handle is not self and not other.merged and other.side == "in"
                        and other.scale is not None
                        and _changes_columns(edit.side, edit.neurons_cpu, other.neurons_cpu)):
                    raise PatchError(
                        f"cannot unmerge {edit.describe()}: the later {other.describe()} scales "
                        "columns that it changes and reads them from the weight; remove that one first"
                    )

    def unmerge(self) -> None:
        """Restores the saved rows/columns bit for bit and turns the runtime term back on."""
        self._check_alive()
        if not self._merged:
            return
        self._check_can_unmerge()
        for edit in reversed(self._edits):
            _unmerge_edit(self._wrapper(edit), edit)
        self._merged = False

    # -- removal -----------------------------------------------------------------------------
    def remove(self) -> None:
        """Takes the edit out (unmerging first if merged); a module left with no edits gets its
        original object back, so weights, ``state_dict`` and logits are bit-identical."""
        self._check_alive()
        if self._merged:
            self.unmerge()
        wrappers: dict[str, EditedLinear] = {}
        for edit in self._edits:
            wrapper = self._wrapper(edit)
            wrapper._edits.remove(edit)
            wrapper._refresh()
            wrappers[edit.module] = wrapper
        for path, wrapper in wrappers.items():
            if not wrapper._edits:
                _set_submodule(self.model, path, wrapper.base_layer)
        self._removed = True
        self._switches.clear()


def _check_not_tied(model: nn.Module, path: str, wrapper: EditedLinear) -> None:
    weight = wrapper.base_layer.weight
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is weight]
    if len(names) > 1:
        raise PatchError(
            f"cannot merge into {path}: its weight is shared with {', '.join(n for n in names if not n.startswith(path + '.'))} "
            "(tied weights); keep this edit on the runtime path"
        )


@torch.no_grad()
def _merge_edit(wrapper: EditedLinear, edit: _Edit) -> None:
    W, b, S = wrapper.base_layer.weight, wrapper.base_layer.bias, edit.neurons
    delta = None if edit.U is None else edit.U.float() @ edit.V.float()
    new_bias = None
    if edit.side == "out":
        saved_w = W.index_select(0, S).clone()
        new_w = saved_w.float() if delta is None else saved_w.float() + delta
        if edit.scale is not None:
            new_w = edit.scale.float()[:, None] * new_w
        saved_b = None
        if b is not None and edit.scale is not None:
            saved_b = b.index_select(0, S).clone()
            new_bias = (edit.scale.float() * saved_b.float()).to(b.dtype)
        new_w = new_w.to(W.dtype)
    else:
        saved_w, saved_b = W.index_select(1, S).clone(), None
        new_w = saved_w.float() if delta is None else saved_w.float() + delta
        if edit.scale is not None:
            new_w = new_w * edit.scale.float()[None, :]
        new_w = new_w.to(W.dtype)
    for name, t in (("weight", new_w), ("bias", new_bias)):
        if t is not None and not bool(torch.isfinite(t).all()):
            raise PatchError(f"merging {edit.describe()} gives non-finite {name} values in {W.dtype}")
    W.index_copy_(0 if edit.side == "out" else 1, S, new_w)
    if new_bias is not None:
        b.index_copy_(0, S, new_bias)
    edit.saved = (saved_w, saved_b)
    edit.merged = True
    wrapper._merge_order.append(edit)
    wrapper._refresh()


@torch.no_grad()
def _unmerge_edit(wrapper: EditedLinear, edit: _Edit) -> None:
    W, b = wrapper.base_layer.weight, wrapper.base_layer.bias
    saved_w, saved_b = edit.saved
    W.index_copy_(0 if edit.side == "out" else 1, edit.neurons, saved_w)
    if saved_b is not None:
        b.index_copy_(0, edit.neurons, saved_b)
    edit.saved = None
    edit.merged = False
    wrapper._merge_order.remove(edit)
    wrapper._refresh()


# ---------------------------------------------------------------------------------------- patch
def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


@dataclass
class _Plan:
    edit: ModuleEdit           # cast to the module's dtype/device
    target: nn.Module          # the Linear or the existing EditedLinear
    base: nn.Linear


def _resolve(model: nn.Module, edit: ModuleEdit) -> tuple[nn.Module, nn.Linear]:
    try:
        target = model.get_submodule(edit.module)
    except AttributeError:
        raise DeltaError(f"edit of {edit.module!r}: no such module in {type(model).__name__}") from None
    base = target.base_layer if isinstance(target, EditedLinear) else target
    if not isinstance(base, nn.Linear):
        raise DeltaError(f"edit of {edit.module!r}: module is a {type(target).__name__}, not a torch.nn.Linear")
    weight = base.weight
    if not weight.is_floating_point() or weight.is_meta:
        raise DeltaError(
            f"edit of {edit.module!r}: weight is {weight.dtype} on {weight.device}; a floating-point, "
            "materialised weight is needed (quantized/offloaded modules are not supported)"
        )
    return target, base


def _product_overflows(U: torch.Tensor, V: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether some entry of ``U @ V`` ((a, r) @ (r, b)) exceeds ``dtype``'s range. Cauchy-Schwarz
    bounds every entry by (largest row norm of U) x (largest column norm of V); only when that
    bound is out of range is the product formed, in float64 and a block of rows at a time."""
    limit = torch.finfo(dtype).max
    u, v = U.double(), V.double()
    if float(u.norm(dim=1).max()) * float(v.norm(dim=0).max()) <= limit:
        return False
    return any(bool((u[i:i + 256] @ v).abs().max() > limit) for i in range(0, u.shape[0], 256))


def _plan(model: nn.Module, delta: SparseDelta, check_fingerprint: bool) -> list[_Plan]:
    """Validates everything a patch needs without touching the model; returns the cast edits."""
    if check_fingerprint:
        # first: a delta for another model then fails naming the model, not a module's shape
        _check_fingerprint(model, delta)
    plans = []
    for edit in delta.edits:
        edit.validate()  # catches tensors changed (e.g. NaN written) after construction
        target, base = _resolve(model, edit)
        edit.validate_for(base)
        dtype = base.weight.dtype
        for name in ("U", "V", "scale"):
            t = getattr(edit, name)
            if t is not None and not bool(torch.isfinite(t.to(dtype)).all()):
                raise DeltaError(f"edit of {edit.module!r}: {name} overflows when cast to the module's {dtype}")
        if edit.U is not None and _product_overflows(edit.U, edit.V, dtype):
            raise DeltaError(f"edit of {edit.module!r}: U @ V overflows the module's {dtype} (each factor is "
                             "finite, their product is not)")
        cast = edit.to(dtype=dtype, device=base.weight.device)
        plans.append(_Plan(cast, target, base))
    # Stacking rule for side-"in" edits with a scale (they read W[:, S] from the base weight).
    for i, plan in enumerate(plans):
        e = plan.edit
        if e.side != "in" or e.scale is None:
            continue
        columns = e.neurons.cpu()
        existing = plan.target._edits if isinstance(plan.target, EditedLinear) else []
        earlier = [(x.describe(), x.side, x.neurons_cpu) for x in existing if not x.merged]
        earlier += [(f"the side-{p.edit.side!r} edit before it in this delta", p.edit.side, p.edit.neurons.cpu())
                    for p in plans[:i] if p.edit.module == e.module]
        for where, side, neurons in earlier:
            if _changes_columns(side, neurons, columns):
                raise PatchError(
                    f"edit of {e.module!r} (side 'in' with a scale) cannot stack on {where}: that edit "
                    "changes the columns this one scales; remove or merge it first, or list the 'in' edit first"
                )
    return plans


def check_patch(model: nn.Module, delta: SparseDelta | str | Path, *, check_fingerprint: bool = True) -> None:
    """Runs every check :func:`patch_model` runs (fingerprint, module paths, shapes and index
    ranges, finite values in the module dtype, stacking rules) and leaves the model untouched, so a
    long job can refuse a bad delta before its first forward. Raises what ``patch_model`` raises."""
    _plan(model, _as_delta(delta), check_fingerprint)


def _as_delta(delta: SparseDelta | str | Path) -> SparseDelta:
    """``delta`` itself, or the delta file it names."""
    if isinstance(delta, (str, Path)):
        delta = SparseDelta.load(delta)
    if not isinstance(delta, SparseDelta):
        raise DeltaError(f"delta must be a SparseDelta or a path, got {type(delta).__name__}")
    return delta


def patch_model(
    model: nn.Module,
    delta: SparseDelta | str | Path,
    *,
    check_fingerprint: bool = True,
    enabled: bool = True,
    row_mask: Sequence[bool] | torch.Tensor | None = None,
) -> PatchHandle:
    """Applies ``delta`` to ``model`` at runtime, without forming the dense delta.

    Args:
        model: a loaded model (e.g. a transformers ``*ForCausalLM``) on its final device/dtype.
        delta: a ``SparseDelta`` or the path of a delta file.
        check_fingerprint: refuse (``FingerprintMismatchError``) a delta fitted on another model.
        enabled: initial state of the edit.
        row_mask: optional initial (B,) per-sequence mask, bool or 0/1 (see
            ``PatchHandle.set_row_mask``); anything else raises ``ValueError``.

    Returns:
        a ``PatchHandle`` (remove / enable / disable / set_row_mask / merge / unmerge).

    Atomic: every check (fingerprint first, then paths exist and are Linear, shapes and index
    ranges, finite values and products in the module dtype, stacking rules) runs before the first
    module is touched; on error the model is unchanged.

    Raises:
        FingerprintMismatchError: the delta was fitted on another model (``check_fingerprint``).
        DeltaError: the delta does not fit the model (paths, shapes, ranges, values); its
            subclass ``DeltaFormatError`` for a file that cannot be read as a delta.
        PatchError: the edit cannot stack on the patches already applied.
        ValueError: ``row_mask`` is not a 1-D bool or 0/1 mask.
    """
    delta = _as_delta(delta)
    plans = _plan(model, delta, check_fingerprint)
    mask = None if row_mask is None else _bool_mask(row_mask)

    handle = PatchHandle(model, delta)
    with torch.inference_mode(False):  # switches are written in place later, in any mode
        for plan in plans:
            device = plan.base.weight.device
            if device not in handle._switches:
                handle._switches[device] = _Switch(torch.tensor(1.0 if enabled else 0.0, device=device))
        if mask is not None:
            for device, switch in handle._switches.items():
                switch.row_mask = mask.to(device=device, dtype=torch.float32)

    installed: list[tuple[EditedLinear, _Edit, bool]] = []
    try:
        for plan in plans:
            e = plan.edit
            current = model.get_submodule(e.module)
            fresh = not isinstance(current, EditedLinear)
            wrapper = EditedLinear(current) if fresh else current
            record = _Edit(handle, e.module, e.side, e.neurons, e.U, e.V, e.scale,
                           handle._switches[plan.base.weight.device], e.neurons.cpu())
            wrapper._edits.append(record)
            wrapper._refresh()
            if fresh:
                _set_submodule(model, e.module, wrapper)
            installed.append((wrapper, record, fresh))
            handle._edits.append(record)
    except BaseException:
        for wrapper, record, fresh in reversed(installed):
            wrapper._edits.remove(record)
            wrapper._refresh()
            if fresh:
                _set_submodule(model, record.module, wrapper.base_layer)
        raise
    log.debug("patched %d module edit(s): %s", len(plans), delta)
    return handle
