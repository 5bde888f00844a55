"""Each op's torch reference (the CPU path and the test oracle) and its device dispatch.

CUDA tensors go through the Triton kernels in ``edit_runtime.kernels``; anything else runs the
torch reference below. The dispatch looks only at the tensor's device, never at a flag.
"""
from __future__ import annotations

import torch

# ---- lowrank_apply ---------------------------------------------------------------------------
# A sparse low-rank edit applied to a Linear's output without forming the dense (out, in) delta
# (METHOD.md section 4, contract in .notes/OPS_API.md). Tokens are flattened: x (N, in_features),
# y (N, out_features) is the base Linear's output and is updated in place.
#
# Semantics (all arithmetic in fp32, or float64 for float64 inputs; y rounded once at the end):
#   side "out", W[S, :] += U @ V with U (m, r), V (r, in_features):
#       t        = x @ V.T
#       new_S    = scale * (y[:, S] + t @ U.T)
#       y[:, S] += row_mask[:, None] * (new_S - y[:, S])
#   side "in", W[:, S] += U @ V with U (out_features, r), V (r, m), W_S = weight[:, S]:
#       xs  = x[:, S];  xs2 = scale * xs
#       y  += row_mask[:, None] * ((xs2 - xs) @ W_S.T + (xs2 @ V.T) @ U.T)
# row_mask (N,) in {0, 1} and scale (m,) default to ones; U, V may both be None (a scale-only
# edit). neurons S (m,) int64 must be unique and in range (validated once, when the delta is
# loaded, not per call).

LOWRANK_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Largest rank the Triton configs cover (kernels.lowrank_apply.MAX_RANK, mirrored here so this
# module imports without Triton); CUDA calls above it run the torch reference.
LOWRANK_TRITON_MAX_RANK = 64


def _check_lowrank(side, y, x, U, V, neurons, row_mask, scale, weight_cols) -> None:
    """Shape, dtype and device checks; static only, so they trace under torch.compile."""
    if not isinstance(y, torch.Tensor) or y.dim() != 2 or not y.is_floating_point():
        raise ValueError(f"y must be a 2-D (N, out_features) float tensor, got "
                         f"{_describe(y)}")
    n, out_features = y.shape
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[0] != n or x.dtype != y.dtype:
        raise ValueError(f"x must be a ({n}, in_features) tensor of y's dtype {y.dtype}, got "
                         f"{_describe(x)}")
    in_features = x.shape[1]
    if not isinstance(neurons, torch.Tensor) or neurons.dim() != 1 or neurons.dtype != torch.int64 \
            or neurons.shape[0] == 0:
        raise ValueError(f"neurons must be a non-empty 1-D int64 tensor (m,), got {_describe(neurons)}")
    m = neurons.shape[0]
    if (U is None) != (V is None):
        raise ValueError("U and V must be given together (got only one)")
    if U is None and scale is None:
        raise ValueError("need U and V, or scale (got neither)")
    if U is not None:
        u_rows = m if side == "out" else out_features
        if U.dim() != 2 or U.shape[0] != u_rows or U.shape[1] == 0 or not U.is_floating_point():
            raise ValueError(f"U must be a float ({u_rows}, r) tensor, got {_describe(U)}")
        r = U.shape[1]
        v_cols = in_features if side == "out" else m
        if V.dim() != 2 or V.shape[0] != r or V.shape[1] != v_cols or not V.is_floating_point():
            raise ValueError(f"V must be a float ({r}, {v_cols}) tensor, got {_describe(V)}")
    if row_mask is not None and (row_mask.dim() != 1 or row_mask.shape[0] != n
                                 or not row_mask.is_floating_point()):
        raise ValueError(f"row_mask must be a float ({n},) tensor, got {_describe(row_mask)}")
    if scale is not None and (scale.dim() != 1 or scale.shape[0] != m or not scale.is_floating_point()):
        raise ValueError(f"scale must be a float ({m},) tensor, got {_describe(scale)}")
    if side == "in" and scale is not None:
        if weight_cols is None:
            raise ValueError(f"weight_cols (W[:, S], shape ({out_features}, {m})) is required with scale")
        if weight_cols.dim() != 2 or weight_cols.shape != (out_features, m) \
                or not weight_cols.is_floating_point():
            raise ValueError(f"weight_cols must be a float ({out_features}, {m}) tensor, got "
                             f"{_describe(weight_cols)}")
    named = {"x": x, "U": U, "V": V, "neurons": neurons, "row_mask": row_mask, "scale": scale,
             "weight_cols": weight_cols if side == "in" else None}
    for name, t in named.items():
        if t is not None and t.device != y.device:
            raise ValueError(f"{name} is on {t.device}, expected y's device {y.device}")


def _describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"shape {tuple(t.shape)} dtype {t.dtype}"


def lowrank_apply_out_reference(
    y: torch.Tensor,                          # (N, out_features), updated in place
    x: torch.Tensor,                          # (N, in_features), y's dtype
    U: torch.Tensor | None,                   # (m, r) or None (scale-only)
    V: torch.Tensor | None,                   # (r, in_features) or None
    neurons: torch.Tensor,                    # (m,) int64, unique, in [0, out_features)
    row_mask: torch.Tensor | None = None,     # (N,) float in {0, 1}; None = ones
    scale: torch.Tensor | None = None,        # (m,) float; None = ones
) -> torch.Tensor:
    """Torch reference (CPU path, test oracle) of ``lowrank_apply_out``; returns y.

    Works on the |S| columns only (mm, index_select, index_add_): a few small ops next to the
    base Linear, and the dense delta is never formed.
    """
    _check_lowrank("out", y, x, U, V, neurons, row_mask, scale, None)
    return _lowrank_out_torch(y, x, U, V, neurons, row_mask, scale)


def _lowrank_out_torch(y, x, U, V, neurons, row_mask, scale) -> torch.Tensor:
    # The CPU runtime path: few ops, no copies where dtypes already match (N = 1 decode steps
    # cost about a millisecond, so each avoided dispatch counts).
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    if U is not None:
        t = torch.mm(_in(x, acc), _in(V, acc).t())                      # (N, r)
    cols = None
    if scale is None:
        # y[:, S] += w * (t @ U.T); the mask goes on the narrow t and y[:, S] is never read.
        if row_mask is not None:
            t.mul_(_in(row_mask, acc).unsqueeze(1))
        change = torch.mm(t, _in(U, acc).t())                           # (N, m)
    else:
        cols = _in(y.index_select(1, neurons), acc)                     # (N, m) = y[:, S]
        new = cols if U is None else torch.addmm(cols, t, _in(U, acc).t())
        change = new * _in(scale, acc) - cols
        if row_mask is not None:
            change.mul_(_in(row_mask, acc).unsqueeze(1))
    if y.dtype == acc:
        return y.index_add_(1, neurons, change)
    # fp16/bf16: round y[:, S] + change once (index_add_ would round the change first).
    if cols is None:
        cols = _in(y.index_select(1, neurons), acc)
    return y.index_copy_(1, neurons, (cols + change).to(y.dtype))


def _in(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, without a dispatch when it already is."""
    return t if t.dtype == dtype else t.to(dtype)


def lowrank_apply_in_reference(
    y: torch.Tensor,                          # (N, out_features), updated in place
    x: torch.Tensor,                          # (N, in_features), y's dtype
    U: torch.Tensor | None,                   # (out_features, r) or None (scale-only)
    V: torch.Tensor | None,                   # (r, m) or None
    neurons: torch.Tensor,                    # (m,) int64, unique, in [0, in_features)
    row_mask: torch.Tensor | None = None,     # (N,) float in {0, 1}; None = ones
    scale: torch.Tensor | None = None,        # (m,) float; None = ones
    weight_cols: torch.Tensor | None = None,  # (out_features, m) = W[:, S]; needed with scale
) -> torch.Tensor:
    """Torch reference (CPU path, test oracle) of ``lowrank_apply_in``; returns y.

    index_select of x's |S| columns, then addmm straight into y (fp32 y) or into one fp32 delta
    that is added to y once (fp16/bf16 y, so y is rounded once).
    """
    _check_lowrank("in", y, x, U, V, neurons, row_mask, scale, weight_cols)
    return _lowrank_in_torch(y, x, U, V, neurons, row_mask, scale, weight_cols)


def _lowrank_in_torch(y, x, U, V, neurons, row_mask, scale, weight_cols) -> torch.Tensor:
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    xs = _in(x.index_select(1, neurons), acc)                           # (N, m) = x[:, S]
    xs2 = xs if scale is None else xs * _in(scale, acc)
    w = None if row_mask is None else _in(row_mask, acc).unsqueeze(1)   # (N, 1)
    terms = []                                                          # (a, b): y += a @ b.T
    if U is not None:
        terms.append((torch.mm(xs2, _in(V, acc).t()), U))               # (N, r), (out, r)
    if scale is not None:
        terms.append((xs2 - xs, weight_cols))                           # (N, m), (out, m)
    delta = None
    for a, b in terms:
        if w is not None:
            a = a.mul_(w)                                               # mask the narrow factor
        if y.dtype == acc:
            y.addmm_(a, _in(b, acc).t())
        else:
            delta = torch.mm(a, _in(b, acc).t()) if delta is None else delta.addmm_(a, _in(b, acc).t())
    if delta is not None:
        y.add_(delta)                                                   # y rounded once
    return y


def _lowrank_rank(U: torch.Tensor | None) -> int:
    return 0 if U is None else U.shape[1]


def _lowrank_on_triton(x: torch.Tensor, U: torch.Tensor | None) -> bool:
    # Static facts only (device, dtype, rank): the dispatch never looks at tensor values.
    return x.is_cuda and x.dtype in LOWRANK_TRITON_DTYPES and _lowrank_rank(U) <= LOWRANK_TRITON_MAX_RANK


def _as_dtype(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _lowrank_apply_out_triton(y: torch.Tensor, x: torch.Tensor, U: torch.Tensor | None,
                              V: torch.Tensor | None, neurons: torch.Tensor,
                              row_mask: torch.Tensor | None, scale: torch.Tensor | None) -> None:
    from edit_runtime.kernels.lowrank_apply import lowrank_apply_out_triton

    lowrank_apply_out_triton(y, x, U, V, neurons, row_mask, scale)


def _lowrank_apply_in_triton(y: torch.Tensor, x: torch.Tensor, U: torch.Tensor | None,
                             V: torch.Tensor | None, neurons: torch.Tensor,
                             row_mask: torch.Tensor | None, scale: torch.Tensor | None,
                             weight_cols: torch.Tensor | None) -> None:
    from edit_runtime.kernels.lowrank_apply import lowrank_apply_in_triton

    lowrank_apply_in_triton(y, x, U, V, neurons, row_mask, scale, weight_cols)


# The launches as opaque custom ops (mutating y) for graphs that torch.compile captures. No
# device restriction: under TRITON_INTERPRET=1 they also run on CPU tensors (tests use that).
_lowrank_apply_out_op = torch.library.custom_op(
    "edit_runtime::lowrank_apply_out", _lowrank_apply_out_triton, mutates_args=("y",))
_lowrank_apply_in_op = torch.library.custom_op(
    "edit_runtime::lowrank_apply_in", _lowrank_apply_in_triton, mutates_args=("y",))


@_lowrank_apply_out_op.register_fake
def _(y, x, U, V, neurons, row_mask, scale) -> None:
    _check_lowrank("out", y, x, U, V, neurons, row_mask, scale, None)


@_lowrank_apply_in_op.register_fake
def _(y, x, U, V, neurons, row_mask, scale, weight_cols) -> None:
    _check_lowrank("in", y, x, U, V, neurons, row_mask, scale, weight_cols)


def lowrank_apply_out(
    y: torch.Tensor,                          # (N, out_features), updated in place
    x: torch.Tensor,                          # (N, in_features), y's dtype
    U: torch.Tensor | None,                   # (m, r) or None (scale-only)
    V: torch.Tensor | None,                   # (r, in_features) or None
    neurons: torch.Tensor,                    # (m,) int64, unique, in [0, out_features)
    row_mask: torch.Tensor | None = None,     # (N,) float in {0, 1}; None = ones
    scale: torch.Tensor | None = None,        # (m,) float; None = ones
) -> torch.Tensor:
    """Side "out": ``y[:, S]`` of an edit ``W[S, :] += U @ V`` (Semantics above); returns y.

    CUDA fp32/fp16/bf16 tensors with rank <= 64 run the fused Triton kernel (one launch; a torch
    custom op while torch.compile traces); anything else runs ``lowrank_apply_out_reference``.
    For the kernel U, V are cast to x's dtype and row_mask, scale to float32 (no-ops when stored
    so). Raises ValueError naming a bad argument.
    """
    _check_lowrank("out", y, x, U, V, neurons, row_mask, scale, None)
    if not _lowrank_on_triton(x, U):
        return _lowrank_out_torch(y, x, U, V, neurons, row_mask, scale)
    args = (y, x, _as_dtype(U, x.dtype), _as_dtype(V, x.dtype), neurons,
            _as_dtype(row_mask, torch.float32), _as_dtype(scale, torch.float32))
    if torch.compiler.is_compiling():
        _lowrank_apply_out_op(*args)
    else:  # eager: the same launch without the custom-op dispatch's Python overhead
        _lowrank_apply_out_triton(*args)
    return y


def lowrank_apply_in(
    y: torch.Tensor,                          # (N, out_features), updated in place
    x: torch.Tensor,                          # (N, in_features), y's dtype
    U: torch.Tensor | None,                   # (out_features, r) or None (scale-only)
    V: torch.Tensor | None,                   # (r, m) or None
    neurons: torch.Tensor,                    # (m,) int64, unique, in [0, in_features)
    row_mask: torch.Tensor | None = None,     # (N,) float in {0, 1}; None = ones
    scale: torch.Tensor | None = None,        # (m,) float; None = ones
    weight_cols: torch.Tensor | None = None,  # (out_features, m) = W[:, S]; needed with scale
) -> torch.Tensor:
    """Side "in": ``y`` of an edit ``W[:, S] += U @ V`` (Semantics above); returns y.

    Dispatch as ``lowrank_apply_out``; weight_cols is cast to x's dtype for the kernel.
    """
    _check_lowrank("in", y, x, U, V, neurons, row_mask, scale, weight_cols)
    if not _lowrank_on_triton(x, U):
        return _lowrank_in_torch(y, x, U, V, neurons, row_mask, scale, weight_cols)
    args = (y, x, _as_dtype(U, x.dtype), _as_dtype(V, x.dtype), neurons,
            _as_dtype(row_mask, torch.float32), _as_dtype(scale, torch.float32),
            _as_dtype(weight_cols, x.dtype) if scale is not None else None)
    if torch.compiler.is_compiling():
        _lowrank_apply_in_op(*args)
    else:
        _lowrank_apply_in_triton(*args)
    return y


# ---- masked_cov ------------------------------------------------------------------------------
# Streaming sufficient statistics of the solve (METHOD.md section 2): xtx += Xᵀ diag(w) X and
# xty += Xᵀ diag(w) Y[:, S], summed in fp32 accumulators that the caller owns and merges.

COV_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_masked_cov(xtx, xty, X, Y, neurons, row_weight) -> None:
    """Shape, dtype and device checks; static only, so they trace under torch.compile."""
    if X.dim() != 2 or X.dtype not in COV_INPUT_DTYPES:
        raise ValueError(f"X must be a 2-D (N, d) float32/float16/bfloat16 tensor, got "
                         f"shape {tuple(X.shape)} dtype {X.dtype}")
    n, d = X.shape
    if Y.dim() != 2 or Y.shape[0] != n or Y.dtype != X.dtype:
        raise ValueError(f"Y must be (N={n}, d_ff) with X's dtype {X.dtype}, got "
                         f"shape {tuple(Y.shape)} dtype {Y.dtype}")
    if neurons.dim() != 1 or neurons.dtype != torch.int64:
        raise ValueError(f"neurons must be a 1-D int64 tensor of Y's column indices, got "
                         f"shape {tuple(neurons.shape)} dtype {neurons.dtype}")
    m = neurons.shape[0]
    if xtx.shape != (d, d) or xtx.dtype != torch.float32:
        raise ValueError(f"xtx must be a ({d}, {d}) float32 accumulator, got "
                         f"shape {tuple(xtx.shape)} dtype {xtx.dtype}")
    if xty.shape != (d, m) or xty.dtype != torch.float32:
        raise ValueError(f"xty must be a ({d}, {m}) float32 accumulator, got "
                         f"shape {tuple(xty.shape)} dtype {xty.dtype}")
    if row_weight is not None and (row_weight.shape != (n,) or not (
            row_weight.is_floating_point() or row_weight.dtype == torch.bool)):
        raise ValueError(f"row_weight must be a float or bool ({n},) tensor, got "
                         f"shape {tuple(row_weight.shape)} dtype {row_weight.dtype}")
    named = {"xtx": xtx, "xty": xty, "Y": Y, "neurons": neurons, "row_weight": row_weight}
    for name, t in named.items():
        if t is not None and t.device != X.device:
            raise ValueError(f"{name} is on {t.device}, expected X's device {X.device}")


def masked_cov_reference_(
    xtx: torch.Tensor,                        # (d, d) fp32, updated in place
    xty: torch.Tensor,                        # (d, m) fp32, updated in place
    X: torch.Tensor,                          # (N, d) fp32/fp16/bf16
    Y: torch.Tensor,                          # (N, d_ff), X's dtype
    neurons: torch.Tensor,                    # (m,) int64 in [0, d_ff)
    row_weight: torch.Tensor | None = None,   # (N,) float or bool; None = ones, 0 = padding
) -> None:
    """Torch reference (CPU path, test oracle) of ``masked_cov_``: index_select + addmm in fp32."""
    _check_masked_cov(xtx, xty, X, Y, neurons, row_weight)
    if not torch.compiler.is_compiling() and neurons.numel() and not neurons.is_cuda:
        lo, hi = torch.aminmax(neurons)
        if lo < 0 or hi >= Y.shape[1]:
            raise ValueError(f"neurons must lie in [0, d_ff={Y.shape[1]}), got [{lo}, {hi}]")
    x = X.to(torch.float32)
    xw = x if row_weight is None else x * row_weight.to(torch.float32)[:, None]
    xtx.addmm_(xw.T, x)
    xty.addmm_(xw.T, Y.index_select(1, neurons).to(torch.float32))


def _masked_cov_triton_(xtx: torch.Tensor, xty: torch.Tensor, X: torch.Tensor, Y: torch.Tensor,
                        neurons: torch.Tensor, row_weight: torch.Tensor | None) -> None:
    # Out-of-range neurons trip index_select's device-side assert inside the launcher.
    from edit_runtime.kernels.masked_cov import masked_cov_launch

    masked_cov_launch(xtx, xty, X, Y, neurons, row_weight)


# The same launch as an opaque custom op, for graphs that torch.compile captures.
_masked_cov_op = torch.library.custom_op("edit_runtime::masked_cov", _masked_cov_triton_,
                                         mutates_args=("xtx", "xty"), device_types="cuda")


@_masked_cov_op.register_fake
def _(xtx, xty, X, Y, neurons, row_weight) -> None:
    return None


def masked_cov_(
    xtx: torch.Tensor,                        # (d, d) fp32, updated in place
    xty: torch.Tensor,                        # (d, m) fp32, updated in place
    X: torch.Tensor,                          # (N, d) fp32/fp16/bf16
    Y: torch.Tensor,                          # (N, d_ff), X's dtype
    neurons: torch.Tensor,                    # (m,) int64 in [0, d_ff)
    row_weight: torch.Tensor | None = None,   # (N,) float or bool; None = ones, 0 = padding
) -> None:
    """Accumulate ``xtx += Xᵀ diag(w) X`` and ``xty += Xᵀ diag(w) Y[:, neurons]`` in place.

    Semantics:
        w    = ones(N) if row_weight is None else row_weight
        xtx += (w[:, None] * X)ᵀ @ X               # fp32 accumulation
        xty += (w[:, None] * X)ᵀ @ Y[:, neurons]
    CUDA tensors run the Triton kernel (a torch custom op under torch.compile; for 16-bit X it
    rounds w and w * X to X's dtype, exact for 0/1 weights; fp32 X multiplies as bf16x6, about
    fp32-accurate); anything else runs ``masked_cov_reference_``. Raises ValueError naming a bad
    argument; out-of-range neurons raise ValueError on CPU and trip a device assert on CUDA.
    """
    if not X.is_cuda:
        masked_cov_reference_(xtx, xty, X, Y, neurons, row_weight)
        return
    _check_masked_cov(xtx, xty, X, Y, neurons, row_weight)
    if torch.compiler.is_compiling():
        _masked_cov_op(xtx, xty, X, Y, neurons, row_weight)
    else:  # eager: the same launch without the custom-op dispatch's Python overhead
        _masked_cov_triton_(xtx, xty, X, Y, neurons, row_weight)
