"""Masked covariance (XᵀX + Xᵀ Y[:, S]) against the full d_ff covariance (XᵀX + Xᵀ Y) sliced.

    python bench/bench_masked_cov.py            # table; CUDA via triton.testing.do_bench
    python bench/bench_masked_cov.py --configs  # also every (config, splits) of the dispatcher
    pytest bench/bench_masked_cov.py            # pytest-benchmark (CPU or CUDA)

Columns: ``masked`` = edit_runtime.ops.masked_cov_ (Triton on CUDA, the torch reference on CPU);
``ref`` = masked_cov_reference_ (index_select + fp32 addmm); ``full`` = torch's GEMMs over all
d_ff columns with fp32 output, then ``[:, S]``. Ratios come from the same run. On CUDA the
``graph:`` columns time one CUDA-graph replay (GPU work alone); the eager columns include host
overhead, which dominates below ~0.15 ms (the Qwen-0.5B shapes).
"""
from __future__ import annotations

import argparse
import time

import torch

from edit_runtime import ops

# (name, d_model, d_ff, |S|)
SHAPES = [("qwen2-0.5b", 896, 4864, 300), ("llama-8b", 4096, 14336, 1024)]
TOKENS = (512, 4096)


def make(n, d, d_ff, m, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g).to(device=device, dtype=dtype)
    Y = torch.randn(n, d_ff, generator=g).to(device=device, dtype=dtype)
    S = torch.randperm(d_ff, generator=g)[:m].sort().values.to(device)
    w = (torch.rand(n, generator=g) > 0.1).float().to(device)     # ~10% padding rows
    xtx = torch.zeros(d, d, device=device)
    xty = torch.zeros(d, m, device=device)
    return xtx, xty, X, Y, S, w


def _mm_fp32(a, b):
    """a @ b with fp32 output; 16-bit inputs stay on the 16-bit tensor-core path where torch can."""
    if a.dtype == torch.float32:
        return a @ b
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        return (a @ b).float()


def full_then_slice_(xtx, xty, X, Y, S, w):
    """Baseline: the whole (d, d_ff) Xᵀ diag(w) Y, then its S columns."""
    xw = X * w[:, None].to(X.dtype)
    xtx += _mm_fp32(xw.T, X)
    xty += _mm_fp32(xw.T, Y)[:, S]


def time_ms(fn, device, graph=False) -> float:
    """Milliseconds per call; on CUDA, do_bench (eager: host overhead included when it exceeds
    the GPU work) or do_bench_cudagraph (one CUDA graph replay: the GPU work alone)."""
    if device == "cuda":
        import triton.testing

        if graph:
            return triton.testing.do_bench_cudagraph(fn, rep=100)
        return triton.testing.do_bench(fn, warmup=25, rep=100)
    fn()
    reps, t0 = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - t0 < 0.5:
        fn()
        reps += 1
    return (time.perf_counter() - t0) / reps * 1e3


def table(device, dtypes, shapes, tokens, configs=False):
    rows = []
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; "
          f"torch {torch.__version__}")
    head = (f"{'shape':<11} {'N':>5} {'dtype':<8} {'masked ms':>9} {'ref ms':>8} {'full ms':>8} "
            f"{'full/masked':>11} {'ref/masked':>10} {'masked TFLOP/s':>14}")
    if device == "cuda":
        head += f" {'graph: masked ms':>16} {'full ms':>8} {'full/masked':>11}"
    print(head)
    for name, d, d_ff, m in shapes:
        for n in tokens:
            for dtype in dtypes:
                args = make(n, d, d_ff, m, dtype, device)
                t_mask = time_ms(lambda: ops.masked_cov_(*args), device)
                t_ref = time_ms(lambda: ops.masked_cov_reference_(*args), device)
                t_full = time_ms(lambda: full_then_slice_(*args), device)
                # useful work: the XᵀX upper half counted once, plus Xᵀ Y[:, S]
                flop = 2.0 * n * d * ((d + 1) / 2 + m)
                row = (name, n, str(dtype).replace("torch.", ""), t_mask, t_ref, t_full)
                rows.append(row)
                line = (f"{name:<11} {n:>5} {row[2]:<8} {t_mask:>9.3f} {t_ref:>8.3f} "
                        f"{t_full:>8.3f} {t_full / t_mask:>11.2f} {t_ref / t_mask:>10.2f} "
                        f"{flop / t_mask / 1e9:>14.1f}")
                if device == "cuda":
                    g_mask = time_ms(lambda: ops.masked_cov_(*args), device, graph=True)
                    g_full = time_ms(lambda: full_then_slice_(*args), device, graph=True)
                    line += f" {g_mask:>16.3f} {g_full:>8.3f} {g_full / g_mask:>11.2f}"
                print(line)
                if configs and device == "cuda":
                    _sweep(args)
    return rows


def _sweep(args):
    """Each (config, splits) the kernel can run, on these inputs (to tune pick_config)."""
    from edit_runtime.kernels import masked_cov as mc

    xtx, xty, X, Y, S, w = args
    picked = mc.pick_config(X.shape[0], X.shape[1], S.shape[0], X.dtype,
                            mc._sm_count(X.device))
    for cfg in mc.CONFIGS[X.dtype.itemsize]:
        for split in (1, 2, 4, 8):
            t = time_ms(lambda: mc.masked_cov_launch(xtx, xty, X, Y, S, w, (cfg, split)), "cuda")
            mark = " <- picked" if (cfg, split) == picked else ""
            print(f"    block {cfg.block:>3} splits {split}: {t:8.3f} ms{mark}")


# ---- pytest-benchmark --------------------------------------------------------------------------
try:
    import pytest
except ImportError:  # the script needs no pytest
    pytest = None

if pytest is not None:
    _DEV = "cuda" if torch.cuda.is_available() else "cpu"
    # CPU: the small shape only (the 8B full covariance is ~0.5 TFLOP per call).
    _CASES = [(s, n) for s in SHAPES for n in TOKENS if _DEV == "cuda" or s[1] < 2048]

    def _sync():
        if _DEV == "cuda":
            torch.cuda.synchronize()

    @pytest.mark.parametrize("shape,n", _CASES, ids=[f"{s[0]}-N{n}" for s, n in _CASES])
    @pytest.mark.parametrize("how", ["masked", "full"])
    def test_bench_masked_cov(benchmark, shape, n, how):
        _, d, d_ff, m = shape
        args = make(n, d, d_ff, m, torch.bfloat16, _DEV)
        fn = ops.masked_cov_ if how == "masked" else full_then_slice_
        benchmark(lambda: (fn(*args), _sync()))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--configs", action="store_true", help="also time every (config, splits)")
    a = p.parse_args()
    dtypes = [getattr(torch, s) for s in a.dtypes.split(",")]
    shapes = SHAPES if a.device == "cuda" else SHAPES[:1]
    table(a.device, dtypes, shapes, TOKENS, a.configs)


if __name__ == "__main__":
    main()
