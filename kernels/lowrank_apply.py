"""Fused sparse low-rank apply: add an edit ``W[S] += U @ V`` to a Linear's output in one launch.

Triton only: the two kernels, the block-size dispatcher and their thin launchers. The torch
reference (CPU path and test oracle) and the device dispatch live in ``edit_runtime.ops``.

Semantics (tokens flattened; N tokens, ``row_mask`` (N,) in {0, 1}, ``scale`` (m,), both
optional; all arithmetic in fp32, y rewritten in its own dtype, in place)::

    side "out"   U (m, r), V (r, in_features), S = neurons (m,)       # W[S, :] += U @ V
        t        = x @ V.T                                            # (N, r)   "shrink"
        new_S    = scale * (y[:, S] + t @ U.T)                        # (N, m)   "expand"
        y[:, S] += row_mask[:, None] * (new_S - y[:, S])

    side "in"    U (out_features, r), V (r, m), W_S = weight[:, S] (out_features, m)
        xs       = x[:, S]                                            # (N, m)   gather
        xs2      = scale * xs
        y       += row_mask[:, None] * ((xs2 - xs) @ W_S.T + (xs2 @ V.T) @ U.T)

    Without U, V (a scale-only edit) the low-rank terms are zero.

Grid: side "out" runs over (token blocks, groups of S blocks); each program computes its
tokens' ``t`` (BLOCK_N, r) once over the whole of ``in_features`` and then loops over its S
blocks, so ``t`` never leaves registers. Side "in" runs over (token blocks, groups of output
blocks) the same way, with the shrink over |S| instead of ``in_features``. ``t`` is recomputed
by every program of a token block: it is r columns wide and cheap next to one more launch.

Precision: ``x`` and ``V`` enter the shrink's ``tl.dot`` in their own dtype (tensor cores for
fp16/bf16) with an fp32 accumulator; operands formed in fp32 (``t``, ``scale * xs``) enter as
fp32. fp32 dots run at ``DOT_PRECISION``: "tf32x3" for fp32 inputs (three tf32 products, within
a few fp32 ulps of full fp32 and, unlike "ieee", on tensor cores without spilling registers),
"tf32" for fp16/bf16 inputs (10 mantissa bits, as many as the inputs carry).

Preconditions not checked here (checking them would cost a device sync per call; the delta is
validated once when it is loaded): ``neurons`` are unique and within range.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = [
    "LowrankConfig",
    "MAX_RANK",
    "configs",
    "pick_config",
    "dot_precision",
    "lowrank_apply_out_triton",
    "lowrank_apply_in_triton",
]

# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _lowrank_out_kernel(
    y_ptr,  # (N, OUT) y's dtype; columns S updated in place
    x_ptr,  # (N, K) same dtype as y
    u_ptr,  # (M, R) same dtype as x (unused when not HAS_LOWRANK)
    v_ptr,  # (R, K) same dtype as x (unused when not HAS_LOWRANK)
    s_ptr,  # (M,) int64 neuron indices S into OUT
    mask_ptr,  # (N,) fp32 row mask (unused when not HAS_MASK)
    scale_ptr,  # (M,) fp32 per-neuron scale (unused when not HAS_SCALE)
    N,  # tokens
    K,  # in_features
    M,  # |S|
    R,  # rank r
    stride_yn, stride_yo,  # y strides (elements)
    stride_xn, stride_xk,  # x strides
    stride_um, stride_ur,  # U strides
    stride_vr, stride_vk,  # V strides
    s_blocks_per_prog,  # S blocks (of BLOCK_S) looped over by one program
    HAS_LOWRANK: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr,  # tokens per program
    BLOCK_K: tl.constexpr,  # in_features per shrink step
    BLOCK_S: tl.constexpr,  # S columns per expand step
    BLOCK_R: tl.constexpr,  # rank r padded to 16 or 64 (tl.dot needs >= 16)
    DOT_PRECISION: tl.constexpr,  # "tf32x3" (fp32 inputs) or "tf32" (fp16/bf16 inputs)
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)  # N * OUT may exceed 2**31
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R

    # Shrink: t = x[rows] @ V.T, fp32 accumulate, kept in registers for all S blocks below.
    t = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    if HAS_LOWRANK:
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < K
            xb = tl.load(  # (BLOCK_N, BLOCK_K)
                x_ptr + rows64[:, None] * stride_xn + kk[None, :] * stride_xk,
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            vb = tl.load(  # (BLOCK_K, BLOCK_R) = V[:, kk].T
                v_ptr + rr[None, :] * stride_vr + kk[:, None] * stride_vk,
                mask=r_ok[None, :] & k_ok[:, None],
                other=0.0,
            )
            t = tl.dot(xb, vb, t, input_precision=DOT_PRECISION)
    if HAS_MASK:
        row_w = tl.load(mask_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)  # (BLOCK_N,)

    # Expand: for each S block, new = scale * (y[:, S] + t @ U[S].T), blended by the row mask.
    for sb in range(0, s_blocks_per_prog):
        cols = (pid_s * s_blocks_per_prog + sb) * BLOCK_S + tl.arange(0, BLOCK_S)  # into 0..M
        c_ok = cols < M
        s_idx = tl.load(s_ptr + cols, mask=c_ok, other=0)  # (BLOCK_S,) int64 into 0..OUT
        y_ptrs = y_ptr + rows64[:, None] * stride_yn + s_idx[None, :] * stride_yo
        ok = row_ok[:, None] & c_ok[None, :]
        y_old = tl.load(y_ptrs, mask=ok, other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_S)
        new = y_old
        if HAS_LOWRANK:
            ub = tl.load(  # (BLOCK_R, BLOCK_S) = U[cols].T
                u_ptr + cols[None, :] * stride_um + rr[:, None] * stride_ur,
                mask=c_ok[None, :] & r_ok[:, None],
                other=0.0,
            ).to(tl.float32)
            new = tl.dot(t, ub, new, input_precision=DOT_PRECISION)
        if HAS_SCALE:
            sc = tl.load(scale_ptr + cols, mask=c_ok, other=1.0).to(tl.float32)
            new = new * sc[None, :]
        if HAS_MASK:
            new = y_old + row_w[:, None] * (new - y_old)
        tl.store(y_ptrs, new.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _lowrank_in_kernel(
    y_ptr,  # (N, OUT) y's dtype; updated in place
    x_ptr,  # (N, K) same dtype as y; only columns S are read
    u_ptr,  # (OUT, R) same dtype as x (unused when not HAS_LOWRANK)
    v_ptr,  # (R, M) same dtype as x (unused when not HAS_LOWRANK)
    s_ptr,  # (M,) int64 neuron indices S into K
    w_ptr,  # (OUT, M) weight columns W[:, S], same dtype as x (unused when not HAS_SCALE)
    mask_ptr,  # (N,) fp32 row mask (unused when not HAS_MASK)
    scale_ptr,  # (M,) fp32 per-neuron scale (unused when not HAS_SCALE)
    N,  # tokens
    OUT,  # out_features
    M,  # |S|
    R,  # rank r
    stride_yn, stride_yo,  # y strides (elements)
    stride_xn, stride_xk,  # x strides
    stride_uo, stride_ur,  # U strides
    stride_vr, stride_vm,  # V strides
    stride_wo, stride_wm,  # W_S strides
    o_blocks_per_prog,  # output blocks (of BLOCK_O) looped over by one program
    HAS_LOWRANK: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr,  # tokens per program
    BLOCK_K: tl.constexpr,  # |S| per shrink step
    BLOCK_O: tl.constexpr,  # output columns per expand step
    BLOCK_R: tl.constexpr,  # rank r padded to 16 or 64 (tl.dot needs >= 16)
    DOT_PRECISION: tl.constexpr,  # "tf32x3" (fp32 inputs) or "tf32" (fp16/bf16 inputs)
):
    pid_n = tl.program_id(0)
    pid_o = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R

    # Shrink: t = (scale * x[rows, S]) @ V.T over |S|, fp32 accumulate.
    t = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    if HAS_LOWRANK:
        for k0 in range(0, M, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < M
            s_idx = tl.load(s_ptr + kk, mask=k_ok, other=0)  # (BLOCK_K,) int64 into 0..K
            # The shrink runs over |S| only (hundreds), so it takes fp32 operands either way:
            # one code path with or without scale (fp16/bf16 values are exact in tf32).
            xs = tl.load(  # (BLOCK_N, BLOCK_K) gather x[rows, S[kk]]
                x_ptr + rows64[:, None] * stride_xn + s_idx[None, :] * stride_xk,
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            vb = tl.load(  # (BLOCK_K, BLOCK_R) = V[:, kk].T
                v_ptr + rr[None, :] * stride_vr + kk[:, None] * stride_vm,
                mask=r_ok[None, :] & k_ok[:, None],
                other=0.0,
            ).to(tl.float32)
            if HAS_SCALE:
                sc = tl.load(scale_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
                xs = xs * sc[None, :]
            t = tl.dot(xs, vb, t, input_precision=DOT_PRECISION)
    if HAS_MASK:
        row_w = tl.load(mask_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)  # (BLOCK_N,)

    # Expand: y[:, ob] += row_mask * (t @ U[ob].T + ((scale - 1) * xs) @ W_S[ob].T).
    for ob in range(0, o_blocks_per_prog):
        cols = (pid_o * o_blocks_per_prog + ob) * BLOCK_O + tl.arange(0, BLOCK_O)  # into 0..OUT
        c_ok = cols < OUT
        cols64 = cols.to(tl.int64)
        acc = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)
        if HAS_LOWRANK:
            ub = tl.load(  # (BLOCK_R, BLOCK_O) = U[cols].T
                u_ptr + cols64[None, :] * stride_uo + rr[:, None] * stride_ur,
                mask=c_ok[None, :] & r_ok[:, None],
                other=0.0,
            ).to(tl.float32)
            acc = tl.dot(t, ub, acc, input_precision=DOT_PRECISION)
        if HAS_SCALE:
            # The scale's own change, ((scale - 1) * xs) @ W_S.T: a small GEMM over |S|.
            for k0 in range(0, M, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                k_ok = kk < M
                s_idx = tl.load(s_ptr + kk, mask=k_ok, other=0)
                xs = tl.load(
                    x_ptr + rows64[:, None] * stride_xn + s_idx[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0,
                ).to(tl.float32)
                sc = tl.load(scale_ptr + kk, mask=k_ok, other=1.0).to(tl.float32)
                wb = tl.load(  # (BLOCK_K, BLOCK_O) = W_S[cols, kk].T
                    w_ptr + cols64[None, :] * stride_wo + kk[:, None] * stride_wm,
                    mask=c_ok[None, :] & k_ok[:, None],
                    other=0.0,
                ).to(tl.float32)
                acc = tl.dot(xs * (sc[None, :] - 1.0), wb, acc, input_precision=DOT_PRECISION)
        if HAS_MASK:
            acc = acc * row_w[:, None]
        y_ptrs = y_ptr + rows64[:, None] * stride_yn + cols64[None, :] * stride_yo
        ok = row_ok[:, None] & c_ok[None, :]
        y_old = tl.load(y_ptrs, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y_old + acc).to(y_ptr.dtype.element_ty), mask=ok)


# ------------------------------------------------------------------------------------------------
# Block sizes
# ------------------------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

MAX_RANK = 64  # the ranks the configs below are built for; edit_runtime.ops uses torch above it


@dataclass(frozen=True)
class LowrankConfig:
    """Block sizes and launch options of one compiled variant of a kernel.

    ``block_k`` is the shrink's reduction step (``in_features`` for side "out", |S| for side
    "in"); ``block_s`` is the expand step (S columns for side "out", output columns for side
    "in"); ``block_r`` is the rank padded to 16 or 64 (``tl.dot`` needs at least 16).
    """

    block_n: int
    block_k: int
    block_s: int
    block_r: int
    num_warps: int
    num_stages: int


def _table(entries: dict) -> dict[tuple[int, int], LowrankConfig]:
    return {
        (tokens, rank): LowrankConfig(block_n, block_k, block_s, rank, num_warps, num_stages)
        for (tokens, rank), (block_n, block_k, block_s, num_warps, num_stages) in entries.items()
    }


# The finite sets the dispatcher chooses from, by (token class, rank class): tokens N <= 16
# (decode) or more (prefill); rank r <= 16 or r <= 64. Each entry holds
# (block_n, block_k, block_s, num_warps, num_stages). tests/test_lowrank_apply.py compiles every
# entry ahead of time for sm_80 and sm_90; sizes were chosen there to stay below 255 registers
# without spills and well inside 99 KiB of shared memory (the sm_86/sm_89 limit).
# fp32 runs its dots as tf32x3 (hi/lo halves of each operand): more registers, so smaller K steps
# and, at rank 64, 16-token blocks.
_TABLES: dict[tuple[str, str], dict[tuple[int, int], LowrankConfig]] = {
    ("out", "half"): _table({
        (16, 16): (16, 256, 64, 4, 3),
        (16, 64): (16, 128, 64, 4, 3),
        (64, 16): (64, 128, 32, 4, 3),
        (64, 64): (64, 64, 32, 4, 3),
    }),
    ("out", "fp32"): _table({
        (16, 16): (16, 64, 64, 4, 3),
        (16, 64): (16, 32, 64, 4, 3),
        (64, 16): (64, 32, 32, 4, 3),
        (64, 64): (16, 32, 64, 4, 3),
    }),
    ("in", "half"): _table({
        (16, 16): (16, 64, 64, 4, 3),
        (16, 64): (16, 64, 64, 4, 3),
        (64, 16): (64, 32, 32, 4, 3),
        (64, 64): (64, 32, 32, 4, 3),
    }),
    ("in", "fp32"): _table({
        (16, 16): (16, 32, 64, 4, 3),
        (16, 64): (16, 32, 64, 4, 3),
        (64, 16): (64, 16, 32, 4, 3),
        (64, 64): (16, 32, 64, 4, 3),
    }),
}


def _dtype_class(dtype: torch.dtype) -> str:
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return "fp32" if dtype == torch.float32 else "half"


def configs(side: str, dtype: torch.dtype) -> tuple[LowrankConfig, ...]:
    """Every config ``pick_config(side, ., ., dtype)`` can return (distinct, in table order)."""
    if side not in ("out", "in"):
        raise ValueError(f"side must be 'out' or 'in', got {side!r}")
    return tuple(dict.fromkeys(_TABLES[(side, _dtype_class(dtype))].values()))


def pick_config(side: str, n_tokens: int, rank: int, dtype: torch.dtype) -> LowrankConfig:
    """The config a launch of ``side`` ("out" or "in") uses for N tokens, rank r, inputs of dtype.

    Always one of ``configs(side, dtype)``. A scale-only edit (rank 0) takes the small-rank
    class. ``in_features`` and |S| do not change the choice: they only set loop trip counts and
    the grid.
    """
    if side not in ("out", "in"):
        raise ValueError(f"side must be 'out' or 'in', got {side!r}")
    if not 0 <= rank <= MAX_RANK:
        raise ValueError(f"rank must be in [0, {MAX_RANK}] for the Triton kernels, got {rank}")
    token_class = 16 if n_tokens <= 16 else 64
    rank_class = 16 if rank <= 16 else 64
    return _TABLES[(side, _dtype_class(dtype))][(token_class, rank_class)]


def dot_precision(dtype: torch.dtype) -> str:
    """``DOT_PRECISION`` for inputs of ``dtype``: near-fp32 "tf32x3" for fp32, "tf32" for halves."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _shape_error(name: str, t: torch.Tensor, expected: str) -> ValueError:
    return ValueError(f"{name} must have shape {expected}, got {tuple(t.shape)}")


def _check_2d(name: str, t: torch.Tensor, rows: int | None, cols: int | None, expected: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor of shape {expected}, got {type(t).__name__}")
    if t.ndim != 2 or (rows is not None and t.shape[0] != rows) or (cols is not None and t.shape[1] != cols):
        raise _shape_error(name, t, expected)


def _check_vec(name: str, t: torch.Tensor, n: int, expected: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor of shape {expected}, got {type(t).__name__}")
    if t.ndim != 1 or t.shape[0] != n:
        raise _shape_error(name, t, expected)


def _check_common(y, x, U, V, neurons, row_mask, scale):
    """Checks shared by both sides; returns (N, m, r)."""
    _check_2d("y", y, None, None, "(N, out_features)")
    n_tokens = y.shape[0]
    _check_2d("x", x, n_tokens, None, f"({n_tokens}, in_features)")
    if y.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"y must be float32, float16 or bfloat16, got {y.dtype}")
    if x.dtype != y.dtype:
        raise ValueError(f"x must have y's dtype {y.dtype}, got {x.dtype}")
    if not isinstance(neurons, torch.Tensor) or neurons.ndim != 1 or neurons.numel() == 0:
        got = tuple(neurons.shape) if isinstance(neurons, torch.Tensor) else type(neurons).__name__
        raise ValueError(f"neurons must have shape (m,) with m >= 1, got {got}")
    if neurons.dtype != torch.int64:
        raise ValueError(f"neurons must be int64, got {neurons.dtype}")
    m = neurons.shape[0]
    if (U is None) != (V is None):
        raise ValueError("U and V must be given together (got only one)")
    if U is None and scale is None:
        raise ValueError("need U and V, or scale (got neither)")
    r = 0 if U is None else U.shape[-1]
    for name, t in (("U", U), ("V", V)):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    if row_mask is not None:
        _check_vec("row_mask", row_mask, n_tokens, f"({n_tokens},)")
        if row_mask.dtype != torch.float32:
            raise ValueError(f"row_mask must be float32, got {row_mask.dtype}")
    if scale is not None:
        _check_vec("scale", scale, m, f"({m},)")
        if scale.dtype != torch.float32:
            raise ValueError(f"scale must be float32, got {scale.dtype}")
    tensors = [t for t in (y, x, U, V, neurons, row_mask, scale) if t is not None]
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if not (y.is_cuda or _interpreting()):
        raise ValueError(f"y must be a CUDA tensor (or set TRITON_INTERPRET=1), got device {y.device}")
    return n_tokens, m, r


def _unit_stride(*vectors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """The kernels index 1-D arguments without a stride: make them contiguous (usually a no-op;
    e.g. a mask expanded from a scalar has stride 0)."""
    return tuple(None if v is None else v.contiguous() for v in vectors)


def _on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it y's for the launch."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _split_grid(n_row_blocks: int, n_col_blocks: int, target_programs: int | None, device) -> tuple[int, int]:
    """(programs along columns, column blocks per program) for about ``target_programs`` in all."""
    if target_programs is None:
        # Two waves' worth of programs fill the GPU; under the interpreter fewer is faster.
        if device.type == "cuda":
            target_programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
        else:
            target_programs = 4
    grid_c = max(1, min(n_col_blocks, -(-target_programs // n_row_blocks)))
    per_prog = -(-n_col_blocks // grid_c)
    return -(-n_col_blocks // per_prog), per_prog


def lowrank_apply_out_triton(
    y: torch.Tensor,  # (N, out_features), updated in place
    x: torch.Tensor,  # (N, in_features), y's dtype
    U: torch.Tensor | None,  # (m, r), x's dtype, or None (scale-only)
    V: torch.Tensor | None,  # (r, in_features), x's dtype, or None (scale-only)
    neurons: torch.Tensor,  # (m,) int64, unique, < out_features
    row_mask: torch.Tensor | None = None,  # (N,) float32 in {0, 1}
    scale: torch.Tensor | None = None,  # (m,) float32
    *,
    config: LowrankConfig | None = None,  # None: pick_config("out", N, r, x.dtype)
    target_programs: int | None = None,  # None: 2 x SM count (4 under the interpreter)
) -> torch.Tensor:
    """Side "out" (see the module's Semantics): one launch of ``_lowrank_out_kernel``; returns y."""
    n_tokens, m, r = _check_common(y, x, U, V, neurons, row_mask, scale)
    in_features = x.shape[1]
    if U is not None:
        _check_2d("U", U, m, None, f"({m}, r)")
        _check_2d("V", V, r, in_features, f"({r}, {in_features})")
    if r > MAX_RANK:
        raise ValueError(f"U must have rank r <= {MAX_RANK} for the Triton kernel, got U {tuple(U.shape)}")
    if n_tokens == 0:
        return y
    neurons, row_mask, scale = _unit_stride(neurons, row_mask, scale)
    cfg = config or pick_config("out", n_tokens, r, x.dtype)
    grid_n = triton.cdiv(n_tokens, cfg.block_n)
    grid_s, per_prog = _split_grid(grid_n, triton.cdiv(m, cfg.block_s), target_programs, y.device)
    lowrank = U is not None
    with _on_device(y.device):
        _lowrank_out_kernel[(grid_n, grid_s)](
            y, x, U if lowrank else x, V if lowrank else x, neurons,
            row_mask if row_mask is not None else y, scale if scale is not None else y,
            n_tokens, in_features, m, max(r, 1),
            y.stride(0), y.stride(1), x.stride(0), x.stride(1),
            U.stride(0) if lowrank else 0, U.stride(1) if lowrank else 0,
            V.stride(0) if lowrank else 0, V.stride(1) if lowrank else 0,
            per_prog,
            HAS_LOWRANK=lowrank, HAS_MASK=row_mask is not None, HAS_SCALE=scale is not None,
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_S=cfg.block_s, BLOCK_R=cfg.block_r,
            DOT_PRECISION=dot_precision(x.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return y


def lowrank_apply_in_triton(
    y: torch.Tensor,  # (N, out_features), updated in place
    x: torch.Tensor,  # (N, in_features), y's dtype
    U: torch.Tensor | None,  # (out_features, r), x's dtype, or None (scale-only)
    V: torch.Tensor | None,  # (r, m), x's dtype, or None (scale-only)
    neurons: torch.Tensor,  # (m,) int64, unique, < in_features
    row_mask: torch.Tensor | None = None,  # (N,) float32 in {0, 1}
    scale: torch.Tensor | None = None,  # (m,) float32
    weight_cols: torch.Tensor | None = None,  # (out_features, m) = W[:, S], x's dtype; with scale
    *,
    config: LowrankConfig | None = None,  # None: pick_config("in", N, r, x.dtype)
    target_programs: int | None = None,  # None: 2 x SM count (4 under the interpreter)
) -> torch.Tensor:
    """Side "in" (see the module's Semantics): one launch of ``_lowrank_in_kernel``; returns y."""
    n_tokens, m, r = _check_common(y, x, U, V, neurons, row_mask, scale)
    out_features = y.shape[1]
    if U is not None:
        _check_2d("U", U, out_features, None, f"({out_features}, r)")
        _check_2d("V", V, r, m, f"({r}, {m})")
    if r > MAX_RANK:
        raise ValueError(f"U must have rank r <= {MAX_RANK} for the Triton kernel, got U {tuple(U.shape)}")
    if scale is not None:
        if weight_cols is None:
            raise ValueError(f"weight_cols (W[:, S], shape ({out_features}, {m})) is required with scale")
        _check_2d("weight_cols", weight_cols, out_features, m, f"({out_features}, {m})")
        if weight_cols.dtype != x.dtype:
            raise ValueError(f"weight_cols must have x's dtype {x.dtype}, got {weight_cols.dtype}")
        if weight_cols.device != y.device:
            raise ValueError(f"weight_cols must be on {y.device}, got {weight_cols.device}")
    if n_tokens == 0:
        return y
    neurons, row_mask, scale = _unit_stride(neurons, row_mask, scale)
    cfg = config or pick_config("in", n_tokens, r, x.dtype)
    grid_n = triton.cdiv(n_tokens, cfg.block_n)
    grid_o, per_prog = _split_grid(grid_n, triton.cdiv(out_features, cfg.block_s), target_programs, y.device)
    lowrank, has_scale = U is not None, scale is not None
    w = weight_cols if has_scale else x
    with _on_device(y.device):
        _lowrank_in_kernel[(grid_n, grid_o)](
            y, x, U if lowrank else x, V if lowrank else x, neurons, w,
            row_mask if row_mask is not None else y, scale if has_scale else y,
            n_tokens, out_features, m, max(r, 1),
            y.stride(0), y.stride(1), x.stride(0), x.stride(1),
            U.stride(0) if lowrank else 0, U.stride(1) if lowrank else 0,
            V.stride(0) if lowrank else 0, V.stride(1) if lowrank else 0,
            w.stride(0) if has_scale else 0, w.stride(1) if has_scale else 0,
            per_prog,
            HAS_LOWRANK=lowrank, HAS_MASK=row_mask is not None, HAS_SCALE=has_scale,
            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_O=cfg.block_s, BLOCK_R=cfg.block_r,
            DOT_PRECISION=dot_precision(x.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return y
