"""lowrank_apply: Triton kernels and torch reference against a float64 oracle; dispatch; AOT builds.

Without a GPU the kernels run under the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), which is slow: the kernel cases below use large hidden sizes with few tokens
and the interpreter's default grid of about four programs. On a CUDA machine the same cases run
the compiled kernels (plus bf16). Every block-size config the dispatcher can choose is compiled
ahead of time for sm_80 and sm_90 whether or not a GPU is present.
"""
from __future__ import annotations


import pytest
import torch

from edit_runtime import ops

triton = pytest.importorskip("triton")
from edit_runtime.kernels import lowrank_apply as K  # noqa: E402  (needs triton)

from aot import Build, compile_many, resource_usage  # noqa: E402  (tests/ is on sys.path)

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
KERNEL_DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if ON_CUDA else ())


# ------------------------------------------------------------------------------------------------
# Problems and the float64 oracle (written from the contract, independent of both implementations)
# ------------------------------------------------------------------------------------------------


def make_problem(side, n, d_in, d_out, m, r, *, mask, scale, dtype, device="cpu", seed=0):
    """Random inputs of one call; r = 0 makes a scale-only edit. Magnitudes are O(1)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(dtype=dtype, device=device)

    x = randn(n, d_in)
    y = randn(n, d_out)
    width = d_out if side == "out" else d_in
    neurons = torch.randperm(width, generator=g)[:m].sort().values.to(device)
    U = V = None
    if r:
        k = d_in if side == "out" else m
        U = randn(m if side == "out" else d_out, r, std=r**-0.5)
        V = randn(r, k, std=k**-0.5)
    row_mask = (torch.rand(n, generator=g) < 0.7).float().to(device) if mask else None
    if row_mask is not None and n > 1:
        row_mask[0], row_mask[-1] = 0.0, 1.0  # at least one masked and one live row
    scale_t = (torch.rand(m, generator=g) * 2.0).to(device) if scale else None
    weight_cols = randn(d_out, m, std=m**-0.5) if side == "in" and scale else None
    return dict(y=y, x=x, U=U, V=V, neurons=neurons, row_mask=row_mask, scale=scale_t,
                weight_cols=weight_cols)


def oracle(side, p):
    """The contract's Semantics in float64 with dense indexing; returns the new y."""
    f = {k: (v.double().cpu() if isinstance(v, torch.Tensor) and v.is_floating_point() else
             (v.cpu() if isinstance(v, torch.Tensor) else v)) for k, v in p.items()}
    y, x, S = f["y"].clone(), f["x"], f["neurons"]
    n, m = y.shape[0], S.numel()
    w = torch.ones(n, dtype=torch.float64) if f["row_mask"] is None else f["row_mask"]
    sc = torch.ones(m, dtype=torch.float64) if f["scale"] is None else f["scale"]
    if side == "out":
        low = 0 if f["U"] is None else (x @ f["V"].T) @ f["U"].T
        new_s = sc * (y[:, S] + low)
        y[:, S] = y[:, S] + w[:, None] * (new_s - y[:, S])
    else:
        xs = x[:, S]
        xs2 = sc * xs
        delta = 0 if f["U"] is None else (xs2 @ f["V"].T) @ f["U"].T
        if f["scale"] is not None:
            delta = delta + (xs2 - xs) @ f["weight_cols"].T
        y = y + w[:, None] * delta
    return y


def call(impl, side, p):
    """Runs ``impl`` ("triton", "reference", "op") on a copy of y and returns it."""
    y = p["y"].clone()
    args = (y, p["x"], p["U"], p["V"], p["neurons"], p["row_mask"], p["scale"])
    extra = (p["weight_cols"],) if side == "in" else ()
    fn = {
        ("triton", "out"): K.lowrank_apply_out_triton, ("triton", "in"): K.lowrank_apply_in_triton,
        ("reference", "out"): ops.lowrank_apply_out_reference,
        ("reference", "in"): ops.lowrank_apply_in_reference,
        ("op", "out"): ops.lowrank_apply_out, ("op", "in"): ops.lowrank_apply_in,
    }[(impl, side)]
    out = fn(*args, *extra)
    assert out is y
    return y


# Relative to the largest |value| of the expected output: fp32 ~ a few ulps of accumulated error
# (tf32x3 on GPU); fp16/bf16 ~ 2 ulps of the output, plus tf32 rounding of t on the GPU.
RTOL = {torch.float32: 3e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


def assert_matches(side, p, got):
    want = oracle(side, p)
    got64 = got.double().cpu()
    tol = RTOL[got.dtype] * float(want.abs().max())
    err = float((got64 - want).abs().max())
    assert err <= tol, f"max |error| {err:.3g} > {tol:.3g}"
    # Exactness where nothing may change: masked rows, and columns outside S for side "out".
    y0 = p["y"].cpu()
    if p["row_mask"] is not None:
        dead = p["row_mask"].cpu() == 0
        assert torch.equal(got.cpu()[dead], y0[dead]), "a masked row changed"
    if side == "out":
        keep = torch.ones(y0.shape[1], dtype=torch.bool)
        keep[p["neurons"].cpu()] = False
        assert torch.equal(got.cpu()[:, keep], y0[:, keep]), "a column outside S changed"


# ------------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU, compiled on CUDA)
# ------------------------------------------------------------------------------------------------

# (side, tokens, in_features, out_features, |S|, rank, mask, scale, dtype). Sizes cover real
# hidden sizes (576 SmolLM2-135M, 896 Qwen2.5-0.5B, 2048, 4096), |S| that is no multiple of any
# block, ranks on both sides of each rank class (16, 64), both token classes (<= 16, > 16), and
# loops over several S/output blocks per program. Side "in" with scale runs a real GEMM over |S|
# (slow under the interpreter), so its shapes are the smaller ones.
F32, F16 = torch.float32, torch.float16
KERNEL_CASES = [
    ("out", 1, 4096, 4096, 1000, 16, False, False, F32),
    ("out", 3, 4096, 14336, 2001, 64, True, True, F32),
    ("out", 1, 896, 4864, 300, 16, True, False, F16),
    ("out", 2, 2048, 8192, 1333, 33, False, True, F16),
    ("out", 17, 576, 1536, 77, 8, True, True, F32),
    ("out", 512, 64, 256, 45, 1, True, False, F16),
    ("out", 5, 896, 4864, 1, 64, True, True, F32),
    ("out", 40, 576, 1536, 200, 0, True, True, F16),  # scale-only
    ("out", 24, 896, 4864, 300, 64, True, True, F16),
    ("in", 1, 14336, 4096, 1024, 16, False, False, F32),
    ("in", 3, 4864, 896, 300, 64, True, False, F16),
    ("in", 2, 2048, 576, 999, 17, True, True, F32),
    ("in", 33, 896, 576, 37, 5, True, True, F16),
    ("in", 100, 1536, 576, 61, 16, False, True, F32),
    ("in", 512, 256, 64, 45, 1, True, False, F32),
    ("in", 7, 1536, 896, 150, 0, True, True, F16),  # scale-only
    ("in", 20, 4864, 896, 300, 40, True, False, F16),
]
if ON_CUDA:  # bf16 and larger token counts cost nothing on the GPU
    KERNEL_CASES += [(c[0], max(c[1], 128), *c[2:8], torch.bfloat16) for c in KERNEL_CASES]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "-".join(str(v).replace("torch.", "") for v in c))
def test_triton_matches_float64(case):
    side, n, d_in, d_out, m, r, mask, scale, dtype = case
    p = make_problem(side, n, d_in, d_out, m, r, mask=mask, scale=scale, dtype=dtype, device=DEVICE)
    assert_matches(side, p, call("triton", side, p))


def test_kernel_cases_cover_every_config():
    for side in ("out", "in"):
        for dtype in (torch.float32, torch.float16):
            hit = {K.pick_config(side, c[1], c[5], dtype) for c in KERNEL_CASES if c[0] == side and c[8] == dtype}
            assert hit == set(K.configs(side, dtype)), f"side {side} {dtype}: untested configs"


@pytest.mark.parametrize("target_programs", [1, 3, 1000])
@pytest.mark.parametrize("side", ["out", "in"])
def test_triton_any_grid_split(side, target_programs):
    # One program looping over every block, a ragged split, and one block per program.
    p = make_problem(side, 20, 576, 640, 150, 16, mask=True, scale=True, dtype=torch.float32,
                     device=DEVICE)
    y = p["y"].clone()
    launch = K.lowrank_apply_out_triton if side == "out" else K.lowrank_apply_in_triton
    extra = (p["weight_cols"],) if side == "in" else ()
    launch(y, p["x"], p["U"], p["V"], p["neurons"], p["row_mask"], p["scale"], *extra,
           target_programs=target_programs)
    assert_matches(side, p, y)


@pytest.mark.parametrize("side", ["out", "in"])
def test_triton_strided_inputs(side):
    # Row strides that are not the row width (views into wider buffers), transposed factors,
    # a mask expanded from a scalar (stride 0) and neurons / scale taken with a step.
    p = make_problem(side, 6, 576, 640, 100, 16, mask=True, scale=True, dtype=torch.float32,
                     device=DEVICE)
    wide_x = torch.zeros(6, 700, device=DEVICE)
    wide_x[:, :576] = p["x"]
    p["x"] = wide_x[:, :576]
    p["U"] = p["U"].T.contiguous().T
    p["V"] = p["V"].T.contiguous().T
    p["row_mask"] = torch.ones((), device=DEVICE).expand(6)
    p["neurons"] = torch.stack([p["neurons"], p["neurons"]], 1).reshape(-1)[::2]
    p["scale"] = torch.stack([p["scale"], p["scale"]], 1).reshape(-1)[::2]
    if side == "in":
        p["weight_cols"] = p["weight_cols"].T.contiguous().T
    assert_matches(side, p, call("triton", side, p))


# ------------------------------------------------------------------------------------------------
# Torch reference (the CPU runtime path)
# ------------------------------------------------------------------------------------------------

REF_SHAPES = [  # (tokens, in_features, out_features, |S|, rank)
    (1, 896, 4864, 300, 16),
    (7, 4864, 896, 300, 16),
    (64, 576, 1536, 1, 1),
    (33, 2048, 4096, 1000, 64),
    (3, 4096, 4096, 2001, 100),
    (128, 64, 64, 64, 8),
    (5, 576, 1536, 100, 0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", REF_SHAPES, ids=str)
@pytest.mark.parametrize("side", ["out", "in"])
def test_reference_matches_float64(side, shape, dtype):
    n, d_in, d_out, m, r = shape
    for seed, (mask, scale) in enumerate([(False, False), (True, False), (False, True), (True, True)]):
        if r == 0 and not scale:
            continue
        p = make_problem(side, n, d_in, d_out, m, r, mask=mask, scale=scale, dtype=dtype, seed=seed)
        assert_matches(side, p, call("reference", side, p))


def test_reference_float64_is_exact_to_oracle():
    p = make_problem("out", 9, 64, 80, 20, 4, mask=True, scale=True, dtype=torch.float64)
    torch.testing.assert_close(call("reference", "out", p), oracle("out", p), rtol=1e-12, atol=1e-12)
    p = make_problem("in", 9, 64, 80, 20, 4, mask=True, scale=True, dtype=torch.float64)
    torch.testing.assert_close(call("reference", "in", p), oracle("in", p), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Dispatch, configs, errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["out", "in"])
def test_op_dispatch_matches(side):
    # CPU tensors take the reference; on a GPU the same call runs the kernel.
    p = make_problem(side, 4, 576, 640, 50, 8, mask=True, scale=True, dtype=torch.float32,
                     device=DEVICE)
    assert_matches(side, p, call("op", side, p))


def test_max_rank_mirrors_kernel():
    assert ops.LOWRANK_TRITON_MAX_RANK == K.MAX_RANK


@pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA device")
def test_op_falls_back_above_max_rank():
    p = make_problem("out", 4, 256, 512, 50, K.MAX_RANK + 1, mask=True, scale=False,
                     dtype=torch.float16, device="cuda")
    assert_matches("out", p, call("op", "out", p))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("side", ["out", "in"])
def test_pick_config_is_finite_and_listed(side, dtype):
    listed = set(K.configs(side, dtype))
    picked = {K.pick_config(side, n, r, dtype) for n in (1, 2, 15, 16, 17, 64, 100, 4096)
              for r in range(0, K.MAX_RANK + 1)}
    assert picked == listed
    for cfg in listed:
        assert cfg.block_r >= 16 and cfg.block_n >= 16 and cfg.block_s >= 16 and cfg.block_k >= 16
    with pytest.raises(ValueError, match="rank"):
        K.pick_config(side, 1, K.MAX_RANK + 1, dtype)


def _bad_calls(device):
    p = make_problem("out", 4, 32, 48, 8, 2, mask=True, scale=True, dtype=torch.float32, device=device)
    q = make_problem("in", 4, 32, 48, 8, 2, mask=True, scale=True, dtype=torch.float32, device=device)

    def out(**kw):
        return ("out", {**p, **kw})

    def inn(**kw):
        return ("in", {**q, **kw})

    return [
        (out(x=p["x"][:, :31]), "V"),
        (out(x=p["x"][:3]), "x"),
        (out(x=p["x"].half()), "x"),
        (out(y=p["y"][0]), "y"),
        (out(U=p["U"][:7]), "U"),
        (out(V=p["V"][:1]), "V"),
        (out(U=None), "U and V"),
        (out(U=None, V=None, scale=None), "scale"),
        (out(neurons=p["neurons"].int()), "neurons"),
        (out(neurons=p["neurons"][:0]), "neurons"),
        (out(row_mask=p["row_mask"][:3]), "row_mask"),
        (out(scale=p["scale"][:3]), "scale"),
        (inn(V=q["V"][:, :7]), "V"),
        (inn(U=q["U"][:40]), "U"),
        (inn(weight_cols=None), "weight_cols"),
        (inn(weight_cols=q["weight_cols"][:, :7]), "weight_cols"),
    ]


@pytest.mark.parametrize("impl", ["op", "reference", "triton"])
def test_errors_name_the_argument(impl):
    for (side, p), name in _bad_calls("cpu" if impl == "reference" else DEVICE):
        with pytest.raises(ValueError, match=name):
            call(impl, side, p)


def test_triton_launcher_rejects_cpu_tensors_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    p = make_problem("out", 2, 32, 48, 8, 2, mask=False, scale=False, dtype=torch.float32)
    with pytest.raises(ValueError, match="CUDA"):
        call("triton", "out", p)


# ------------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------------


def test_torch_compile_cpu_reference():
    p = make_problem("out", 6, 64, 96, 20, 4, mask=True, scale=True, dtype=torch.float32)

    def patched_linear(x, weight, U, V, neurons, row_mask, scale):
        y = x @ weight.T
        return ops.lowrank_apply_out(y, x, U, V, neurons, row_mask, scale)

    weight = torch.randn(96, 64)
    args = (p["x"], weight, p["U"], p["V"], p["neurons"], p["row_mask"], p["scale"])
    torch._dynamo.reset()
    compiled = torch.compile(patched_linear, fullgraph=True)
    torch.testing.assert_close(compiled(*args), patched_linear(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(ON_CUDA, reason="the CUDA path is covered by test_torch_compile_custom_op_cuda")
def test_custom_op_opcheck_and_compile_interpreted():
    # The registered custom ops (fake impl, in-place mutation of y) checked by torch's opcheck and
    # compiled into a graph, running the kernels under the interpreter on CPU tensors.
    for side in ("out", "in"):
        p = make_problem(side, 5, 64, 80, 20, 4, mask=True, scale=True, dtype=torch.float32)
        op = torch.ops.edit_runtime.lowrank_apply_out if side == "out" else torch.ops.edit_runtime.lowrank_apply_in
        extra = (p["weight_cols"],) if side == "in" else ()
        args = (p["y"].clone(), p["x"], p["U"], p["V"], p["neurons"], p["row_mask"], p["scale"], *extra)
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))

        def f(y, *rest):
            y = y * 1.0
            op(y, *rest)
            return y

        torch._dynamo.reset()
        got = torch.compile(f, backend="aot_eager", fullgraph=True)(*args)
        assert_matches(side, p, got)


@pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA device")
def test_torch_compile_custom_op_cuda():
    p = make_problem("out", 8, 256, 512, 50, 8, mask=True, scale=True, dtype=torch.bfloat16,
                     device="cuda")

    def f(y, x, U, V, neurons, row_mask, scale):
        y = y * 1.0
        return ops.lowrank_apply_out(y, x, U, V, neurons, row_mask, scale)

    args = (p["y"], p["x"], p["U"], p["V"], p["neurons"], p["row_mask"], p["scale"])
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(*args)
    assert_matches("out", p, got)


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compilation of every config the dispatcher can choose
# ------------------------------------------------------------------------------------------------

_TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# Integer arguments a typical launch passes as 1 (unit column strides), which Triton specialises
# into constants, and those it marks divisible by 16 (aligned pointers; row strides of hidden
# sizes that are multiples of 16). The AOT builds mirror that launch.
_UNIT_STRIDES = {"stride_yo", "stride_xk", "stride_ur", "stride_vk", "stride_vm", "stride_wm"}
_ALIGNED_INTS = {"stride_yn", "stride_xn"}
_SMEM_LIMIT = 99 * 1024  # sm_86/sm_89 opt-in maximum; sm_80 (163 KiB) and sm_90 (227 KiB) exceed it


def _aot_build(side: str, dtype: torch.dtype, cfg: K.LowrankConfig, cap: int) -> Build:
    kernel = K._lowrank_out_kernel if side == "out" else K._lowrank_in_kernel
    ty = _TRITON_TYPE[dtype]
    # Every constexpr flag on: each flag only adds code (the superset of every variant's code).
    constexprs = {"HAS_LOWRANK": True, "HAS_MASK": True, "HAS_SCALE": True,
                  "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "BLOCK_R": cfg.block_r,
                  "BLOCK_S" if side == "out" else "BLOCK_O": cfg.block_s,
                  "DOT_PRECISION": K.dot_precision(dtype)}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs or name in _UNIT_STRIDES:
            signature[name] = "constexpr"
            constexprs.setdefault(name, 1)
        elif name == "s_ptr":
            signature[name] = "*i64"
        elif name in ("mask_ptr", "scale_ptr"):
            signature[name] = "*fp32"
        elif name.endswith("_ptr"):
            signature[name] = f"*{ty}"
        else:
            signature[name] = "i32"
    aligned = tuple(a for a in kernel.arg_names if a.endswith("_ptr") or a in _ALIGNED_INTS)
    return Build(f"{kernel.fn.__module__}:{kernel.fn.__name__}", signature, constexprs, cap,
                 cfg.num_warps, cfg.num_stages, aligned)


def test_aot_compiles_every_config():
    jobs = [(side, dtype, cfg, cap)
            for side in ("out", "in")
            for dtype in (torch.float32, torch.float16, torch.bfloat16)
            for cfg in K.configs(side, dtype)
            for cap in (80, 90)]
    results = compile_many([_aot_build(*job) for job in jobs])
    failures = []
    for (side, dtype, cfg, cap), res in zip(jobs, results):
        what = f"side={side} {dtype} sm_{cap} {cfg}"
        if "error" in res:
            failures.append(f"{what}: {res['error'][:500]}")
            continue
        if not res.get("cubin"):
            failures.append(f"{what}: no cubin")
            continue
        shared = res["metadata"]["shared"]
        if shared > _SMEM_LIMIT:
            failures.append(f"{what}: {shared} bytes of shared memory > {_SMEM_LIMIT}")
        usage = resource_usage(res["cubin"])
        if usage.get("STACK", 0) or usage.get("LOCAL", 0):
            failures.append(f"{what}: spills registers ({usage})")
    assert not failures, "\n".join(failures)
