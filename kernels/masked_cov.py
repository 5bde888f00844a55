"""Masked covariance: streaming ``XᵀX`` and ``Xᵀ Y[:, S]`` in fp32, on Triton.

Semantics (``masked_cov_launch(xtx, xty, X, Y, S, w)``; everything in place, nothing returned)::

    # xtx (d, d) fp32, xty (d, m) fp32: existing accumulators (streaming statistics)
    # X (N, d), Y (N, d_ff): same dtype, fp32 / fp16 / bf16; S (m,) int64 in [0, d_ff)
    # w (N,) float per-row weight, or None (= all ones); w = 0 marks padding
    Ys   = Y[:, S]                         # stage 1: one gather pass, (N, m)
    Xw   = w[:, None] * X                  # stage 1: in X's dtype (w and the product rounded
                                           # for 16-bit X; exact for 0/1 weights)
    xtx += Xwᵀ @ X                         # stage 2, the kernel: = Xᵀ diag(w) X, fp32 sums
    xty += Xwᵀ @ Ys

Tiling: the outputs are cut into BLOCK x BLOCK tiles; XᵀX is symmetric, so only its upper
triangle of tiles is computed and each off-diagonal tile is also added, transposed, below the
diagonal. Grid: (upper tiles of XᵀX + tiles of Xᵀ Ys, token splits). Each program adds its tile
to the accumulators with fp32 atomic adds: with one token split every element gets exactly one
add (deterministic); with several, the order of the splits' adds varies (rounding only).
fp32 inputs use bf16x6 on tensor cores (about fp32 accuracy); 16-bit inputs use the tensor
cores directly (exact products, fp32 sums).

The launcher picks one of ``CONFIGS`` (a finite set, so every kernel the dispatcher can launch
is enumerable: ``specializations()``, compiled ahead of time by the tests for sm_80 and sm_90).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl


@triton.jit
def _tile_dot(
    a_ptr, a_stride_n, a_off, a_ok,  # A (Xw): base, token stride, (BLOCK,) column offsets, mask
    b_ptr, b_stride_n, b_off, b_ok,  # B (X or Y[:, S]): the same
    k_lo, k_hi,                      # token range [k_lo, k_hi)
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """(BLOCK, BLOCK) fp32 tile: sum over tokens k in [k_lo, k_hi) of A[k, :]ᵀ B[k, :]."""
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    k_base = k_lo.to(tl.int64)                             # N * stride can pass 2**31
    a_ptrs = a_ptr + k_base * a_stride_n + (offs_k[:, None] * a_stride_n + a_off[None, :])
    b_ptrs = b_ptr + k_base * b_stride_n + (offs_k[:, None] * b_stride_n + b_off[None, :])
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_ok = (k0 + offs_k) < k_hi
        a = tl.load(a_ptrs, mask=k_ok[:, None] & a_ok[None, :], other=0.0)   # (BLOCK_K, BLOCK)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & b_ok[None, :], other=0.0)   # (BLOCK_K, BLOCK)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * a_stride_n
        b_ptrs += BLOCK_K * b_stride_n
    return acc


@triton.jit
def _masked_cov_kernel(
    xtx_ptr,                    # (d, d) fp32, updated in place
    xty_ptr,                    # (d, m) fp32, updated in place
    xw_ptr,                     # (N, d) w[:, None] * X (or X itself), unit column stride
    x_ptr,                      # (N, d) X: fp32 / fp16 / bf16, unit column stride
    ys_ptr,                     # (N, m) Y[:, S], X's dtype, unit column stride
    N, D, M,                    # tokens, d, m
    tokens_per_split,           # multiple of BLOCK_K; program_id(1) reads one such slice
    stride_xwn, stride_xn, stride_ysn,
    stride_xtx0, stride_xtx1, stride_xty0, stride_xty1,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    k_lo = tl.program_id(1) * tokens_per_split
    k_hi = tl.minimum(k_lo + tokens_per_split, N)
    n_tiles = tl.cdiv(D, BLOCK)
    n_upper = n_tiles * (n_tiles + 1) // 2
    offs = tl.arange(0, BLOCK)
    if pid < n_upper:
        # Upper-triangle tile (ti, tj), ti <= tj, numbered column by column: pid = tj(tj+1)/2 + ti.
        tj = ((tl.sqrt((8 * pid + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
        tj = tl.where((tj + 1) * (tj + 2) // 2 <= pid, tj + 1, tj)   # fix float rounding
        tj = tl.where(tj * (tj + 1) // 2 > pid, tj - 1, tj)
        ti = pid - tj * (tj + 1) // 2
        r = ti * BLOCK + offs
        c = tj * BLOCK + offs
        r_ok = r < D
        c_ok = c < D
        acc = _tile_dot(xw_ptr, stride_xwn, r, r_ok, x_ptr, stride_xn, c, c_ok,
                        k_lo, k_hi, BLOCK, BLOCK_K, PRECISION)
        tl.atomic_add(xtx_ptr + r[:, None] * stride_xtx0 + c[None, :] * stride_xtx1, acc,
                      mask=r_ok[:, None] & c_ok[None, :], sem="relaxed")
        if ti < tj:  # the mirror tile: xtx[c, r] += accᵀ (Xᵀ diag(w) X is symmetric)
            tl.atomic_add(xtx_ptr + c[:, None] * stride_xtx0 + r[None, :] * stride_xtx1,
                          tl.trans(acc), mask=c_ok[:, None] & r_ok[None, :], sem="relaxed")
    else:
        # Tile (ti, tj) of Xᵀ Y[:, S], numbered row-fastest so neighbours share Y's columns.
        t = pid - n_upper
        ti = t % n_tiles
        tj = t // n_tiles
        r = ti * BLOCK + offs
        c = tj * BLOCK + offs
        r_ok = r < D
        c_ok = c < M
        acc = _tile_dot(xw_ptr, stride_xwn, r, r_ok, ys_ptr, stride_ysn, c, c_ok,
                        k_lo, k_hi, BLOCK, BLOCK_K, PRECISION)
        tl.atomic_add(xty_ptr + r[:, None] * stride_xty0 + c[None, :] * stride_xty1, acc,
                      mask=r_ok[:, None] & c_ok[None, :], sem="relaxed")


class Config(NamedTuple):
    """One compiled shape of the kernel."""

    block: int          # output tile side (XᵀX tiles are square so they mirror)
    block_k: int        # tokens per step
    num_warps: int
    num_stages: int


# The finite set the dispatcher chooses from, by input element size: (small tiles, large tiles).
# Shared memory per stage is at most 2 * 128 * 64 * 2 B = 32 KiB (16-bit) or 2 * 128 * 32 * 4 B
# (fp32); three stages fit the 99 KiB of sm_86/89 as well as sm_80/90. Measured on H100 (bf16,
# N 4096, d 4096, m 1024): 4 warps 0.272 ms vs 8 warps 0.295; 4 stages 0.257 would not fit
# sm_86/89. fp32 (6 products per step) ran best with 8 warps at BLOCK 128.
CONFIGS: dict[int, tuple[Config, Config]] = {
    2: (Config(64, 64, 4, 3), Config(128, 64, 4, 3)),
    4: (Config(64, 32, 4, 3), Config(128, 32, 8, 3)),
}
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# fp32: "bf16x6" (three bf16 pieces per operand, six products) is about fp32-accurate and ran
# 2.12 ms where "tf32x3" ran 3.18 ms (H100, the shape above): neither operand is K-major here.
_PRECISION = {torch.float32: "bf16x6", torch.float16: "tf32", torch.bfloat16: "tf32"}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)   # triton.cdiv is a jit function: ~20 us per host call


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tiles(d: int, m: int, block: int) -> int:
    nt = _cdiv(d, block)
    return nt * (nt + 1) // 2 + nt * _cdiv(m, block)


def pick_config(n: int, d: int, m: int, dtype: torch.dtype, sm_count: int) -> tuple[Config, int]:
    """(config, token splits) for an (N, d) X and m gathered columns.

    Large tiles when they alone fill the GPU, else small ones; then token splits up to about
    four programs per SM, each split at least 4 steps long.
    """
    small, large = CONFIGS[dtype.itemsize]
    cfg = large if _tiles(d, m, large.block) >= sm_count else small
    split = min(_cdiv(4 * sm_count, _tiles(d, m, cfg.block)), _cdiv(n, cfg.block_k) // 4)
    return cfg, max(1, split)


def specializations():
    """Every (constexprs, num_warps, num_stages, input dtype) the launcher can compile."""
    for dtype in INPUT_DTYPES:
        for cfg in CONFIGS[dtype.itemsize]:
            constexprs = dict(BLOCK=cfg.block, BLOCK_K=cfg.block_k, PRECISION=_PRECISION[dtype])
            yield constexprs, cfg.num_warps, cfg.num_stages, dtype


def masked_cov_launch(
    xtx: torch.Tensor,          # (d, d) fp32
    xty: torch.Tensor,          # (d, m) fp32
    x: torch.Tensor,            # (N, d)
    y: torch.Tensor,            # (N, d_ff), x's dtype
    neurons: torch.Tensor,      # (m,) int64
    row_weight: torch.Tensor | None = None,  # (N,) float or None
    config: tuple[Config, int] | None = None,  # (config, splits); None = pick_config
) -> None:
    """Thin launcher: no validation (edit_runtime.ops.masked_cov_ validates)."""
    precision = _PRECISION[x.dtype]
    if os.environ.get("TRITON_INTERPRET") == "1":
        if x.dtype == torch.bfloat16:  # it would multiply bf16 blocks as raw 16-bit integers
            raise NotImplementedError("the Triton interpreter cannot run tl.dot on bfloat16")
        precision = "ieee"             # it knows no bf16x6; its dot is an fp32 matmul anyway
    n, d = x.shape
    m = neurons.shape[0]
    if n == 0 or d == 0:
        return
    if config is None:
        sm_count = _sm_count(x.device) if x.is_cuda else 1  # the interpreter: one "SM"
        config = pick_config(n, d, m, x.dtype, sm_count)
    cfg, split = config
    # Stage 1, one pass each: gather Y's S columns (the kernel reading them in place re-reads a
    # ~32 B sector per element for every row tile: 5x slower at d 4096) and fold w into X (a
    # register multiply on the tensor-core operand halves the kernel's speed).
    x = x if x.stride(1) == 1 else x.contiguous()
    ys = y.index_select(1, neurons)                                   # (N, m) contiguous
    xw = x if row_weight is None else x * row_weight.to(x.dtype)[:, None]     # (N, d)
    tokens_per_split = _cdiv(_cdiv(n, split), cfg.block_k) * cfg.block_k
    split = _cdiv(n, tokens_per_split)
    grid = (_tiles(d, m, cfg.block), split)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _masked_cov_kernel[grid](
            xtx, xty, xw, x, ys,
            n, d, m, tokens_per_split,
            xw.stride(0), x.stride(0), ys.stride(0),
            xtx.stride(0), xtx.stride(1), xty.stride(0), xty.stride(1),
            BLOCK=cfg.block, BLOCK_K=cfg.block_k, PRECISION=precision,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
