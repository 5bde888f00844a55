"""edit_runtime._ext / edit_runtime._C: the C++ kernels against their torch implementations.

Agreement is checked to 1e-8 relative on basis-independent quantities (projectors, eigenvalues,
``left @ right``, singular values) on random matrices, on a synthetic hidden-state-like
covariance (one dominant mean direction, power-law spectrum, fewer samples than dimensions) and
on real statistics: MLP inputs of SmolLM2-135M-Instruct on built-in prompts (slow).
"""
from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from edit_runtime import _ext

F64 = torch.float64


def _have_c() -> bool:
    try:
        from edit_runtime import _C  # noqa: F401
    except ImportError:
        return False
    return True


needs_c = pytest.mark.skipif(not _have_c(), reason="edit_runtime._C is not built")


@pytest.fixture
def cpp(monkeypatch):
    """The C++ backend (the environment variable cleared)."""
    monkeypatch.delenv(_ext.FORCE_TORCH_ENV, raising=False)
    assert _ext.backend() == "cpp"


def amax(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64)
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


def hidden_like_cov(d: int, n: int, seed: int = 0) -> torch.Tensor:
    """XᵀX of n < d rows resembling residual-stream states: a large shared mean, a few massive
    dimensions and a power-law spectrum (condition number of the nonzero part ~1e7)."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    scales = torch.arange(1, d + 1, dtype=F64).pow(-1.2)
    x = (torch.randn(n, d, generator=g, dtype=F64) * scales) @ basis.T
    x += 3.0 * torch.randn(d, generator=g, dtype=F64) / d ** 0.5  # shared mean direction
    x[:, :3] *= 20.0  # massive activations
    return x.T @ x


def gap_threshold(w: torch.Tensor, lo: int, hi: int) -> float:
    """A threshold in the widest relative gap between the ascending eigenvalues w[lo:hi] that
    are clearly nonzero (rounding noise around 0 has no meaningful gaps)."""
    ww = w[lo:hi]
    ww = ww[ww > 1e-10 * float(w[-1])]
    assert ww.numel() >= 2, "no two clearly nonzero eigenvalues in the range"
    i = int(torch.argmax(ww[1:] / ww[:-1]))
    return float((ww[i] + ww[i + 1]) / 2)


def check_split_agrees(C, threshold, *, relative, side):
    a = _ext.eig_split(C, threshold, relative=relative, side=side)
    b = _ext.eig_split_torch(C, threshold, relative=relative, side=side)
    assert (a.backend, b.backend) == ("cpp", "torch")
    assert (a.below, a.null_dim) == (b.below, b.null_dim)
    assert a.lam_max == pytest.approx(b.lam_max, rel=1e-10)
    assert a.tau == pytest.approx(b.tau, rel=1e-10)
    scale = max(abs(b.lam_max), 1e-300)
    assert amax(a.eigvals - b.eigvals) <= 1e-10 * scale
    # ‖P0‖_F = sqrt(k): relative to that, absolute when the null space is empty
    assert float((a.projector() - b.projector()).norm()) < 1e-8 * max(1.0, b.null_dim ** 0.5)
    n = C.shape[0]
    v = a.vectors
    assert amax(v.T @ v - torch.eye(v.shape[1], dtype=F64)) < 1e-10
    # columns are eigenvectors: C v = v diag(w)
    assert float((C @ v - v * a.eigvals).norm()) <= 1e-9 * scale * max(1, v.shape[1]) ** 0.5
    assert a.vectors.shape[0] == n
    return a, b


def check_lowrank_agrees(Q, B, rank):
    la, ra, sa = _ext.whitened_lowrank(Q, B, rank)
    lb, rb, sb = _ext.whitened_lowrank_torch(Q, B, rank)
    assert la.shape == lb.shape and ra.shape == rb.shape
    assert rel(sa, sb) < 1e-8
    assert rel(la @ ra, lb @ rb) < 1e-8
    return la, ra, sa


# ---- the backend switch --------------------------------------------------------------------------

def test_extension_is_built_when_its_build_tools_are_present():
    """The README install builds _C whenever pybind11 and scipy-openblas32 are importable."""
    try:
        import pybind11  # noqa: F401
        import scipy_openblas32  # noqa: F401
    except ImportError:
        pytest.skip("pybind11 / scipy-openblas32 missing: the build skips _C by design")
    assert _have_c(), "run `pip install --no-build-isolation --no-deps -e .` to build _C"


@needs_c
def test_force_torch_env(monkeypatch, recwarn):
    monkeypatch.setenv(_ext.FORCE_TORCH_ENV, "1")
    assert _ext.backend() == "torch"
    C = hidden_like_cov(20, 8)
    assert _ext.eig_split(C, 1e-9, relative=True).backend == "torch"
    monkeypatch.setenv(_ext.FORCE_TORCH_ENV, "0")
    assert _ext.backend() == "cpp"
    assert not [w for w in recwarn if "edit_runtime._C" in str(w.message)]


def test_missing_extension_warns_once(monkeypatch):
    monkeypatch.delenv(_ext.FORCE_TORCH_ENV, raising=False)
    monkeypatch.setattr(_ext, "_loaded", True)
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_import_error", "ImportError: test")
    monkeypatch.setattr(_ext, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            left, right, s = _ext.whitened_lowrank(torch.eye(3, dtype=F64), torch.ones(3, 2), 1)
            _ext.eig_split(torch.eye(3, dtype=F64), 0.5)
    mine = [w for w in caught if "edit_runtime._C is not available" in str(w.message)]
    assert len(mine) == 1 and issubclass(mine[0].category, RuntimeWarning)
    assert "ImportError: test" in str(mine[0].message)
    assert _ext.FORCE_TORCH_ENV in str(mine[0].message)
    assert float((left @ right - 1.0).abs().max()) < 1e-12  # the torch path ran

    monkeypatch.setenv(_ext.FORCE_TORCH_ENV, "1")
    monkeypatch.setattr(_ext, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _ext.eig_split(torch.eye(3, dtype=F64), 0.5)
    assert not caught


def test_import_failure_in_a_fresh_process():
    """A real failing import of _C: one warning for many calls, and the solver still works."""
    code = r"""
import sys, warnings
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "edit_runtime._C":
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
warnings.simplefilter("always")
import torch
from edit_runtime.solver import solve
A = torch.eye(4, dtype=torch.float64); B = torch.ones(4, 2, dtype=torch.float64)
C = torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64))
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    for _ in range(3):
        r = solve(A, C, B, gamma=1.0, rank=1, constraint="hard")
        r = solve(A, C, B, gamma=1.0, rank=1)
n = sum("edit_runtime._C is not available" in str(x.message) for x in w)
print(n, r.backend)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env={**_subprocess_env(), _ext.FORCE_TORCH_ENV: ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "torch"]


def _subprocess_env():
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1"}


@needs_c
def test_threads_follow_torch(cpp):
    from edit_runtime import _C

    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _ext.whitened_lowrank(torch.eye(2, dtype=F64), torch.ones(2, 1), 1)
        assert _C.get_num_threads() == 1
    finally:
        torch.set_num_threads(old)


# ---- eigen split: random and realistic -----------------------------------------------------------

@needs_c
@pytest.mark.parametrize("n,samples", [(1, 3), (7, 3), (50, 20), (120, 200), (200, 60)])
@pytest.mark.parametrize("side", ["auto", "below", "above"])
def test_eig_split_random(cpp, n, samples, side):
    g = torch.Generator().manual_seed(n * 1000 + samples)
    x = torch.randn(samples, n, generator=g, dtype=F64)
    C = x.T @ x
    check_split_agrees(C, 1e-9, relative=True, side=side)  # the exact null space (if any)
    w = torch.linalg.eigvalsh(C)
    if min(n, samples) > 2:
        tau = gap_threshold(w, 0, n)
        check_split_agrees(C, tau, relative=False, side=side)


@needs_c
@pytest.mark.parametrize("d,n", [(96, 40), (256, 64), (300, 600)])
def test_eig_split_hidden_like(cpp, d, n):
    C = hidden_like_cov(d, n, seed=d)
    w = torch.linalg.eigvalsh(C)
    nonzero = min(d, n)  # a threshold in the lower half of the nonzero spectrum, too
    for threshold, relative in [(1e-10, True),
                                (gap_threshold(w, d - nonzero, d - nonzero // 2), False)]:
        for side in ("auto", "below", "above"):
            check_split_agrees(C, threshold, relative=relative, side=side)


@needs_c
def test_eig_split_edge_cases(cpp):
    z = torch.zeros(5, 5, dtype=F64)
    a = _ext.eig_split(z, 1e-3, relative=True)
    assert a.null_dim == 5 and rel(a.projector(), torch.eye(5, dtype=F64)) < 1e-12
    a = _ext.eig_split(z, 1e-3, relative=True, side="above")
    assert a.null_dim == 5 and a.vectors.shape == (5, 0)
    assert rel(a.projector(), torch.eye(5, dtype=F64)) < 1e-12
    assert _ext.eig_split(torch.eye(4, dtype=F64), 0.5, relative=True).null_dim == 0
    e = _ext.eig_split(torch.zeros(0, 0, dtype=F64), 0.1)
    assert e.null_dim == 0 and e.vectors.shape == (0, 0)
    diag = torch.diag(torch.tensor([3.0, -1.0, 0.0, 2.0], dtype=F64))
    s = _ext.eig_split(diag, 0.0)  # absolute threshold, eigenvalues <= 0
    assert s.null_dim == 2 and sorted(s.eigvals.tolist()) == [-1.0, 0.0]
    # basis() from the complement side spans the same space
    C = hidden_like_cov(30, 10)
    above = _ext.eig_split(C, 1e-10, relative=True, side="above")
    assert not above.below
    u0 = above.basis()
    assert u0.shape == (30, above.null_dim)
    assert rel(u0 @ u0.T, above.projector()) < 1e-10


@needs_c
def test_nullspace_basis_and_evr(cpp):
    from edit_runtime import _C

    C = hidden_like_cov(80, 30)
    w, u0 = _ext.nullspace_basis(C, 1e-10, relative=True)
    assert u0.shape == (80, 50) and w.shape == (50,)
    x_scale = float(torch.linalg.eigvalsh(C)[-1])
    assert float((u0.T @ C @ u0).abs().max()) < 1e-12 * x_scale
    tau = 1e-10 * x_scale
    we, ue, lam = _C.nullspace_basis(C.numpy(), tau, False, "evr")  # LAPACK dsyevr by value
    assert np.isnan(lam) and ue.shape == (80, 50)
    assert rel(torch.from_numpy(ue @ ue.T), u0 @ u0.T) < 1e-8
    with pytest.raises(ValueError, match="absolute threshold"):
        _C.nullspace_basis(C.numpy(), 1e-10, True, "evr")


@needs_c
def test_errors_match(cpp):
    for fn in (_ext.eig_split, _ext.eig_split_torch):
        with pytest.raises(ValueError, match="square"):
            fn(torch.ones(3, 2, dtype=F64), 0.1)
        with pytest.raises(ValueError, match="side must be"):
            fn(torch.eye(3, dtype=F64), 0.1, side="left")
    for fn in (_ext.whitened_lowrank, _ext.whitened_lowrank_torch):
        with pytest.raises(ValueError, match="not positive definite"):
            fn(-torch.eye(3, dtype=F64), torch.ones(3, 2, dtype=F64), 1)
        with pytest.raises(ValueError, match="B must be 2-D with 3 rows"):
            fn(torch.eye(3, dtype=F64), torch.ones(4, 2, dtype=F64), 1)
        with pytest.raises(ValueError, match="rank must be"):
            fn(torch.eye(3, dtype=F64), torch.ones(3, 2, dtype=F64), -1)
    with pytest.raises(ValueError, match="non-finite"):
        _ext.eig_split(torch.full((3, 3), float("nan"), dtype=F64), 0.1)


# ---- whitened low-rank solve ---------------------------------------------------------------------

@needs_c
@pytest.mark.parametrize("n,m", [(1, 1), (10, 3), (40, 70), (150, 20)])
@pytest.mark.parametrize("rank", [1, 2, 5, 200])
def test_whitened_lowrank_random(cpp, n, m, rank):
    g = torch.Generator().manual_seed(n + 7 * m + rank)
    x = torch.randn(n + 5, n, generator=g, dtype=F64)
    Q = x.T @ x + 0.1 * torch.eye(n, dtype=F64)
    B = torch.randn(n, m, generator=g, dtype=F64)
    left, right, s = check_lowrank_agrees(Q, B, rank)
    r = min(rank, n, m)
    assert left.shape == (n, r) and right.shape == (r, m) and s.shape == (min(n, m),)
    # the minimum value is -Σ σ²
    X = left @ right
    val = float(torch.trace(X.T @ Q @ X) - 2 * torch.trace(X.T @ B))
    assert val == pytest.approx(-float(s[:r].square().sum()), rel=1e-9)


@needs_c
def test_whitened_lowrank_ill_conditioned(cpp):
    C = hidden_like_cov(200, 120, seed=3)
    Q = C + 1e-6 * float(torch.trace(C)) / 200 * torch.eye(200, dtype=F64)
    B = C[:, :30] @ torch.randn(30, 25, dtype=F64, generator=torch.Generator().manual_seed(0))
    left, right, s = check_lowrank_agrees(Q, B, 25)
    ref = torch.linalg.solve(Q, B)  # full rank = the ridge solution M = Q⁻¹B
    assert rel(left @ right, ref) < 1e-6


@needs_c
def test_whitened_lowrank_empty(cpp):
    left, right, s = _ext.whitened_lowrank(torch.eye(3, dtype=F64), torch.zeros(3, 2), 0)
    assert left.shape == (3, 0) and right.shape == (0, 2) and s.shape == (2,)


# ---- real statistics (SmolLM2) -------------------------------------------------------------------

def real_layer_stats(model, tok, layer: int = 15) -> dict:
    """Statistics of one SmolLM2 layer from a few built-in prompts, float64:
    A = X_lowᵀX_low and B = X_lowᵀD from the last prompt token of 6 harmful prompts in bn / sw /
    th (targets: the same prompts in English at 48 up_proj neurons), C = X_safeᵀX_safe from
    every token of 3 harmless prompts in en and bn (fewer rows than d = 576: rank deficient;
    the chat template's shared system prompt makes many rows nearly equal)."""
    from edit_runtime.arch import find_mlp
    from edit_runtime.data import load_prompts

    info = find_mlp(model, layer)
    mlp = model.get_submodule(info.path)
    up = model.get_submodule(info.up).weight.detach().to(F64)
    ids = [f"h{i:03d}" for i in range(1, 7)]
    harmful = {(p.id, p.lang): p.text
               for p in load_prompts("builtin:harmful", langs=["en", "bn", "sw", "th"])
               if p.id in ids}
    harmless = [p.text for p in load_prompts("builtin:harmless", langs=["en", "bn"])
                if p.id in {f"b{i:03d}" for i in range(1, 4)}]

    def mlp_inputs(text):
        seen = []
        h = mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0][0].detach().to(F64)))
        try:
            ids_ = tok.apply_chat_template([{"role": "user", "content": text}],
                                           add_generation_prompt=True, return_tensors="pt")
            if not torch.is_tensor(ids_):
                ids_ = ids_["input_ids"]
            with torch.no_grad():
                model(input_ids=ids_)
        finally:
            h.remove()
        return seen[0]  # (tokens, d_model)

    S = torch.randperm(up.shape[0], generator=torch.Generator().manual_seed(0))[:48]
    w_s = up[S].T  # (d, m) paper layout
    x_low = torch.stack([mlp_inputs(harmful[(i, lang)])[-1]
                         for i in ids for lang in ("bn", "sw", "th")])
    y_en = torch.stack([mlp_inputs(harmful[(i, "en")])[-1] @ w_s for i in ids for _ in range(3)])
    x_safe = torch.cat([mlp_inputs(t) for t in harmless])
    D = y_en - x_low @ w_s
    return dict(A=x_low.T @ x_low, C=x_safe.T @ x_safe, B=x_low.T @ D, dtd=float((D * D).sum()),
                x_safe=x_safe)


@pytest.fixture(scope="module")
def real_stats(smollm2):
    return real_layer_stats(*smollm2)


@pytest.mark.slow
@needs_c
def test_real_statistics_eig_split(cpp, real_stats):
    C = real_stats["C"]
    d = C.shape[0]
    # The chat template's shared prefix gives rows that are equal up to fp32 rounding, and that
    # rounding depends on the thread count (2 threads: about 1e-8 of σ_max; 1 thread: bit-equal).
    # The split's relative threshold 1e-9 on eigenvalues of C = XᵀX is sqrt(1e-9) on singular
    # values of X, inside the real spectrum's gap (smallest genuine σ about 8e-4 of σ_max), so the
    # rank is counted with that tolerance and the gap is checked, not torch's machine-eps default.
    sv = torch.linalg.svdvals(real_stats["x_safe"])
    rtol = 1e-9 ** 0.5
    assert not bool(((sv > 0.1 * rtol * sv[0]) & (sv < 10 * rtol * sv[0])).any()), "no clear spectral gap"
    rank = int(torch.linalg.matrix_rank(real_stats["x_safe"], rtol=rtol))
    assert rank < d  # a real, rank-deficient covariance
    for side in ("auto", "below", "above"):
        a, _ = check_split_agrees(C, 1e-9, relative=True, side=side)
        assert a.null_dim == d - rank
    w = torch.linalg.eigvalsh(C)
    tau = gap_threshold(w, d - rank, d - rank // 2)  # inside the nonzero spectrum
    check_split_agrees(C, tau, relative=False, side="auto")


@pytest.mark.slow
@needs_c
@pytest.mark.parametrize("gamma", [1.0, 30.0])
def test_real_statistics_solves(cpp, real_stats, monkeypatch, gamma):
    from edit_runtime.solver import solve

    A, C, B = real_stats["A"], real_stats["C"], real_stats["B"]
    lam = 1e-2 * float(torch.trace(A + gamma * C)) / A.shape[0]
    Q = A + gamma * C + lam * torch.eye(A.shape[0], dtype=F64)
    s = torch.linalg.svdvals(torch.linalg.solve_triangular(
        torch.linalg.cholesky(Q, upper=True).T, B, upper=False))
    r = int(torch.argmax(s[:16] / s[1:17])) + 1  # a rank with a clear singular-value gap
    check_lowrank_agrees(Q, B, r)
    check_lowrank_agrees(Q, B, B.shape[1])
    results = {}
    for be in ("cpp", "torch"):
        if be == "torch":
            monkeypatch.setenv(_ext.FORCE_TORCH_ENV, "1")
        results[be] = [solve(A, C, B, gamma=gamma, rank=r, constraint=c, dtd=real_stats["dtd"])
                       for c in ("soft", "hard")]
    for cpp_res, torch_res in zip(results["cpp"], results["torch"]):
        assert cpp_res.backend == "cpp" and torch_res.backend == "torch"
        assert rel(cpp_res.delta, torch_res.delta) < 1e-8
        assert cpp_res.gap_closed == pytest.approx(torch_res.gap_closed, rel=1e-8)
        assert 0 < cpp_res.gap_closed < 1
