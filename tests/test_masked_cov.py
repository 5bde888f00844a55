"""masked_cov: the Triton kernel and the torch reference against float64, dispatch, validation,
torch.compile, and ahead-of-time compilation of every kernel the dispatcher can launch.

Without a GPU the kernel runs under the Triton interpreter (conftest sets TRITON_INTERPRET=1) on
CPU tensors; with one, the same tests run the compiled kernel on CUDA tensors.
"""
from __future__ import annotations

import pytest
import torch

from aot import Build, compile_many, resource_usage  # tests/ is on sys.path
from edit_runtime import ops
from edit_runtime.kernels import masked_cov as mc

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL, LARGE = 0, 1               # index into mc.CONFIGS[element size]


def make_inputs(n, d, d_ff, m, dtype, weights=None, device="cpu", seed=0):
    """Random X (N, d), Y (N, d_ff), S (m,), w (N,) or None, and non-zero accumulators."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g).to(dtype)
    Y = torch.randn(n, d_ff, generator=g).to(dtype)
    S = torch.randperm(d_ff, generator=g)[:m]
    if weights == "mask":        # padding: trailing rows and a random third are zero
        w = (torch.rand(n, generator=g) > 0.3).float()
        w[-(n // 4):] = 0.0
    elif weights == "real":
        w = torch.rand(n, generator=g) * 2.0
    else:
        w = None
    xtx = torch.randn(d, d, generator=g)
    xty = torch.randn(d, m, generator=g)
    to = lambda t: None if t is None else t.to(device)
    return to(xtx), to(xty), to(X), to(Y), to(S), to(w)


def expected(xtx, xty, X, Y, S, w):
    """float64 oracle: (xtx + Xᵀ diag(w) X, xty + Xᵀ diag(w) Y[:, S]) and the matching
    |Xw|ᵀ|X|, |Xw|ᵀ|Y_S| that scale the rounding error bound."""
    x = X.double().cpu()
    xw = x if w is None else x * w.double().cpu()[:, None]
    ys = Y.double().cpu()[:, S.cpu()]
    return (xtx.double().cpu() + xw.T @ x, xty.double().cpu() + xw.T @ ys,
            xw.abs().T @ x.abs(), xw.abs().T @ ys.abs())


def assert_close_to(out, want, scale, rel):
    """|out - want| <= rel * scale + 1e-5, elementwise (scale = sum of |terms|)."""
    err = (out.double().cpu() - want).abs()
    bound = rel * scale + 1e-5
    worst = (err / bound).max().item() if err.numel() else 0.0
    assert worst <= 1.0, f"error {worst:.3g}x the bound (rel {rel})"


# Relative error per product bound: fp32 sums (and 3xTF32) ~1e-6; 16-bit inputs with fractional
# weights round w * x to the input dtype.
REL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
REL_REAL_WEIGHTS = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# (N, d, d_ff, m, dtype, weights, config, token splits): odd sizes, N not a multiple of the
# block, m = 1, padding, several splits (atomics), off-diagonal tiles of XᵀX (mirroring).
KERNEL_CASES = [
    (37, 13, 29, 5, torch.float32, None, SMALL, 1),
    (37, 13, 29, 1, torch.float16, "mask", SMALL, 1),
    (100, 70, 51, 9, torch.float16, "mask", SMALL, 3),
    (130, 131, 140, 67, torch.float32, "real", SMALL, 2),
    (65, 150, 300, 1, torch.float16, None, SMALL, 1),
    (200, 97, 33, 33, torch.float16, "real", SMALL, 4),
    (300, 200, 500, 130, torch.float16, "mask", LARGE, 2),   # the larger case: 128 tiles
    (129, 129, 260, 200, torch.float32, None, LARGE, 1),
]


@pytest.mark.parametrize("n,d,d_ff,m,dtype,weights,cfg,split", KERNEL_CASES)
def test_kernel_matches_float64(n, d, d_ff, m, dtype, weights, cfg, split):
    xtx, xty, X, Y, S, w = make_inputs(n, d, d_ff, m, dtype, weights, KERNEL_DEVICE, seed=n + d)
    want_xx, want_xy, scale_xx, scale_xy = expected(xtx, xty, X, Y, S, w)
    config = (mc.CONFIGS[dtype.itemsize][cfg], split)
    mc.masked_cov_launch(xtx, xty, X, Y, S, w, config=config)
    rel = (REL_REAL_WEIGHTS if weights == "real" else REL)[dtype]
    assert_close_to(xtx, want_xx, scale_xx, rel)
    assert_close_to(xty, want_xy, scale_xy, rel)


def test_kernel_strided_views_and_default_config():
    """Non-contiguous X, Y and accumulators; the dispatcher's own choice of config."""
    xtx_big, _, X_big, Y_big, _, _ = make_inputs(90, 40, 60, 1, torch.float16, None,
                                                 KERNEL_DEVICE, seed=7)
    X = X_big[:, 3:27]                       # (90, 24), row stride 40
    Y = Y_big.T.contiguous().T[:, 5:]        # (90, 55), column-major
    S = torch.tensor([54, 0, 17, 17, 3], device=KERNEL_DEVICE)   # repeats allowed
    before = xtx_big.clone()
    xtx = xtx_big[:24, :24]                  # row stride 40
    xty = torch.zeros(5, 24, device=KERNEL_DEVICE).T   # (24, 5), column-major
    want_xx, want_xy, scale_xx, scale_xy = expected(xtx, xty, X, Y, S, None)
    mc.masked_cov_launch(xtx, xty, X, Y, S)
    assert_close_to(xtx, want_xx, scale_xx, REL[torch.float16])
    assert_close_to(xty, want_xy, scale_xy, REL[torch.float16])
    assert torch.equal(xtx_big[24:], before[24:]) and torch.equal(xtx_big[:, 24:], before[:, 24:])


def test_kernel_padding_rows_contribute_nothing():
    """Rows with w = 0 may hold anything finite: the result equals dropping them."""
    xtx, xty, X, Y, S, _ = make_inputs(70, 20, 30, 7, torch.float32, None, KERNEL_DEVICE)
    keep = torch.arange(70, device=KERNEL_DEVICE) < 45
    X[~keep] *= 1e3
    a, b = xtx.clone(), xty.clone()
    small = mc.CONFIGS[4][SMALL]
    mc.masked_cov_launch(xtx, xty, X, Y, S, keep.float(), config=(small, 2))
    mc.masked_cov_launch(a, b, X[keep], Y[keep], S, config=(small, 1))
    torch.testing.assert_close(xtx, a, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(xty, b, rtol=1e-5, atol=1e-4)


def test_kernel_empty_inputs_leave_accumulators():
    xtx, xty, X, Y, S, _ = make_inputs(10, 6, 8, 0, torch.float32, None, KERNEL_DEVICE)
    a, b = xtx.clone(), xty.clone()
    mc.masked_cov_launch(xtx, xty, X[:0], Y[:0], S)                   # N = 0
    assert torch.equal(xtx, a)
    mc.masked_cov_launch(xtx, xty, X, Y, S)                           # m = 0: only XᵀX
    want_xx, _, scale_xx, _ = expected(a, b, X, Y, S, None)
    assert_close_to(xtx, want_xx, scale_xx, REL[torch.float32])
    assert xty.shape == (6, 0)


def test_pick_config_is_from_the_finite_set():
    for n in (1, 64, 512, 4096, 100_000):
        for d, m in ((576, 1), (896, 300), (2048, 700), (4096, 1024)):
            for dtype in mc.INPUT_DTYPES:
                cfg, split = mc.pick_config(n, d, m, dtype, sm_count=132)
                assert cfg in mc.CONFIGS[dtype.itemsize] and split >= 1


# ---- the torch reference ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weights", [None, "mask", "real"])
def test_reference_matches_float64(dtype, weights):
    xtx, xty, X, Y, S, w = make_inputs(203, 37, 91, 11, dtype, weights, seed=3)
    want_xx, want_xy, scale_xx, scale_xy = expected(xtx, xty, X, Y, S, w)
    ops.masked_cov_reference_(xtx, xty, X, Y, S, w)
    assert_close_to(xtx, want_xx, scale_xx, 2e-5)   # the reference weights in fp32
    assert_close_to(xty, want_xy, scale_xy, 2e-5)


def test_reference_streams_like_one_batch():
    """Two batches accumulated one after the other equal the concatenated batch."""
    xtx, xty, X, Y, S, w = make_inputs(60, 9, 20, 4, torch.float32, "mask")
    a, b = xtx.clone(), xty.clone()
    ops.masked_cov_reference_(xtx, xty, X[:25], Y[:25], S, w[:25])
    ops.masked_cov_reference_(xtx, xty, X[25:], Y[25:], S, w[25:])
    ops.masked_cov_reference_(a, b, X, Y, S, w)
    torch.testing.assert_close(xtx, a)
    torch.testing.assert_close(xty, b)


def test_bool_row_weight_is_a_mask():
    xtx, xty, X, Y, S, w = make_inputs(30, 5, 9, 3, torch.float32, "mask")
    a, b = xtx.clone(), xty.clone()
    ops.masked_cov_(xtx, xty, X, Y, S, w > 0)
    ops.masked_cov_(a, b, X, Y, S, w)
    assert torch.equal(xtx, a) and torch.equal(xty, b)


def _bad(name):
    xtx, xty, X, Y, S, w = make_inputs(12, 4, 6, 2, torch.float32, "mask")
    args = dict(xtx=xtx, xty=xty, X=X, Y=Y, neurons=S, row_weight=w)
    args[name] = {
        "xtx": torch.zeros(4, 5), "xty": torch.zeros(4, 2, dtype=torch.float64),
        "X": X.double(), "Y": Y[:11], "neurons": S.int(), "row_weight": w[:5],
    }[name]
    return args


@pytest.mark.parametrize("name", ["xtx", "xty", "X", "Y", "neurons", "row_weight"])
def test_bad_argument_names_itself(name):
    args = _bad(name)
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        ops.masked_cov_(**args)


def test_out_of_range_neurons_raise_on_cpu():
    xtx, xty, X, Y, _, _ = make_inputs(12, 4, 6, 2, torch.float32)
    with pytest.raises(ValueError, match="neurons"):
        ops.masked_cov_(xtx, xty, X, Y, torch.tensor([0, 6]))


def test_torch_compile_fullgraph():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    xtx, xty, X, Y, S, w = make_inputs(64, 16, 40, 8, torch.float16, "mask", device)
    a, b = xtx.clone(), xty.clone()
    torch.compile(ops.masked_cov_, fullgraph=True)(xtx, xty, X, Y, S, w)
    ops.masked_cov_(a, b, X, Y, S, w)
    torch.testing.assert_close(xtx, a)
    torch.testing.assert_close(xty, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(512, 896, 4864, 300), (4096, 576, 1536, 1), (1000, 2048, 4096, 700)])
def test_cuda_dispatch_matches_float64(dtype, shape):
    n, d, d_ff, m = shape
    xtx, xty, X, Y, S, w = make_inputs(n, d, d_ff, m, dtype, "mask", "cuda", seed=d)
    want_xx, want_xy, scale_xx, scale_xy = expected(xtx, xty, X, Y, S, w)
    ops.masked_cov_(xtx, xty, X, Y, S, w)
    assert_close_to(xtx, want_xx, scale_xx, REL[dtype])
    assert_close_to(xty, want_xy, scale_xy, REL[dtype])


# ---- ahead-of-time compilation of every kernel the dispatcher can launch ----------------------

_TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_SMEM_LIMIT = 99 * 1024  # sm_86/89 opt-in maximum; sm_80 (163 KiB) and sm_90 (227 KiB) exceed it


def _aot_build(constexprs, num_warps, num_stages, dtype, cap) -> Build:
    kernel = mc._masked_cov_kernel
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("xtx_ptr", "xty_ptr"):
            signature[name] = "*fp32"
        elif name.endswith("_ptr"):
            signature[name] = "*" + _TRITON_TYPE[dtype]
        else:
            signature[name] = "i32"
    # As a launch on contiguous tensors with d a multiple of 16 specialises (the vector path).
    aligned = tuple(a for a in kernel.arg_names
                    if a.endswith("_ptr") or a in ("stride_xwn", "stride_xn"))
    return Build(f"{kernel.fn.__module__}:{kernel.fn.__name__}", signature, dict(constexprs),
                 cap, num_warps, num_stages, aligned)


def test_aot_compiles_every_specialization_for_sm80_and_sm90():
    """Every (config, input dtype) the dispatcher can launch compiles to a cubin for sm_80 and
    sm_90 without a GPU, in the shared memory of sm_86/89 and without register spills."""
    jobs = [(*spec, cap) for spec in mc.specializations() for cap in (80, 90)]
    failures = []
    for job, res in zip(jobs, compile_many([_aot_build(*job) for job in jobs])):
        constexprs, num_warps, num_stages, dtype, cap = job
        what = f"{dtype} sm_{cap} {constexprs} warps {num_warps} stages {num_stages}"
        if "error" in res:
            failures.append(f"{what}: {res['error'][:500]}")
        elif not res.get("cubin"):
            failures.append(f"{what}: no cubin")
        elif res["metadata"]["shared"] > _SMEM_LIMIT:
            failures.append(f"{what}: {res['metadata']['shared']} B of shared memory")
        elif (usage := resource_usage(res["cubin"])).get("LOCAL", 0):
            failures.append(f"{what}: spills registers ({usage})")
    assert not failures, "\n".join(failures)
