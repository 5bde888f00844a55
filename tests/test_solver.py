"""edit_runtime.solver: the closed form against independent oracles (float64).

Oracles: ``torch.linalg.lstsq`` on the stacked system (full rank), the symmetric-square-root
whitening ``Q^{-1/2} [Q^{-1/2} B]_r`` (a different factorisation than the Cholesky of the
solver), and a brute-force search (many random rank-r starts refined by L-BFGS on the factors).
Both backends of edit_runtime._ext run every test that goes through the solver.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

from edit_runtime import _ext
from edit_runtime.solver import (
    DEFAULT_LAM_REL,
    DEFAULT_NULL_REL,
    ObjectiveTerms,
    SolveResult,
    default_lam,
    objective,
    objective_terms,
    solve,
    solve_lowrank,
)

F64 = torch.float64


@pytest.fixture(params=["cpp", "torch"])
def backend(request, monkeypatch):
    """Run the test with the C++ extension and with the torch fallback."""
    if request.param == "torch":
        monkeypatch.setenv(_ext.FORCE_TORCH_ENV, "1")
    else:
        monkeypatch.delenv(_ext.FORCE_TORCH_ENV, raising=False)
        if _ext.extension() is None:
            pytest.skip("edit_runtime._C is not built")
    return request.param


def problem(d=24, m=10, n_low=40, n_safe=30, seed=0, safe_rank=None):
    """Random data matrices and their statistics. ``safe_rank`` < d makes X_safe rank deficient."""
    g = torch.Generator().manual_seed(seed)
    x_low = torch.randn(n_low, d, generator=g, dtype=F64)
    dd = torch.randn(n_low, m, generator=g, dtype=F64)
    if safe_rank is None:
        x_safe = torch.randn(n_safe, d, generator=g, dtype=F64)
    else:
        x_safe = torch.randn(n_safe, safe_rank, generator=g, dtype=F64) @ torch.randn(
            safe_rank, d, generator=g, dtype=F64)
    return dict(x_low=x_low, d=dd, x_safe=x_safe, A=x_low.T @ x_low, C=x_safe.T @ x_safe,
                B=x_low.T @ dd, dtd=float((dd * dd).sum()))


def stacked_lstsq(x_low, d, x_safe, gamma, lam, basis=None):
    """argmin ‖X_low W - D‖² + γ‖X_safe W‖² + λ‖W‖² by lstsq on [X_low; √γ X_safe; √λ I],
    optionally over W = basis @ Y."""
    dim = x_low.shape[1] if basis is None else basis.shape[1]
    xl, xs = (x_low, x_safe) if basis is None else (x_low @ basis, x_safe @ basis)
    lhs = torch.cat([xl, math.sqrt(gamma) * xs, math.sqrt(lam) * torch.eye(dim, dtype=F64)])
    rhs = torch.cat([d, torch.zeros(lhs.shape[0] - d.shape[0], d.shape[1], dtype=F64)])
    y = torch.linalg.lstsq(lhs, rhs, driver="gelsd").solution
    return y if basis is None else basis @ y


def sqrt_whitened_optimum(Q, B, r):
    """Rank-r optimum of tr(XᵀQX) - 2tr(XᵀB) via the symmetric square root of Q."""
    w, v = torch.linalg.eigh(Q)
    q_half_inv = v @ torch.diag(w.rsqrt()) @ v.T
    u, s, vh = torch.linalg.svd(q_half_inv @ B, full_matrices=False)
    return q_half_inv @ (u[:, :r] * s[:r]) @ vh[:r]


def quad_loss(delta, Q, B):
    return float(torch.trace(delta.T @ Q @ delta) - 2 * torch.trace(delta.T @ B))


def rel(a, b):
    return float((a - b).norm() / max(float(b.norm()), 1e-300))


# ---- soft constraint -----------------------------------------------------------------------------

@pytest.mark.parametrize("d,m,n_low", [(24, 10, 40), (12, 30, 8), (40, 5, 20)])
@pytest.mark.parametrize("gamma,lam", [(0.0, 0.3), (3.0, 0.5), (50.0, 1e-3)])
def test_full_rank_equals_stacked_lstsq(backend, d, m, n_low, gamma, lam):
    p = problem(d=d, m=m, n_low=n_low)
    res = solve(p["A"], p["C"], p["B"], gamma=gamma, lam=lam, rank=min(d, m))
    ref = stacked_lstsq(p["x_low"], p["d"], p["x_safe"], gamma, lam)
    assert res.backend == backend
    assert rel(res.delta, ref) < 1e-9
    assert res.rank_energy == pytest.approx(1.0)


@pytest.mark.parametrize("r", [1, 3, 6])
def test_rank_r_equals_symmetric_sqrt_oracle(backend, r):
    p = problem(d=30, m=12, seed=1)
    gamma, lam = 5.0, 0.2
    res = solve(p["A"], p["C"], p["B"], gamma=gamma, lam=lam, rank=r)
    Q = p["A"] + gamma * p["C"] + lam * torch.eye(30, dtype=F64)
    ref = sqrt_whitened_optimum(Q, p["B"], r)
    assert res.left.shape == (30, r) and res.right.shape == (r, 12)
    assert torch.linalg.matrix_rank(res.delta) == r
    assert rel(res.delta, ref) < 1e-9
    # loss(ΔW*) = ‖D‖² - Σ_{i<=r} σ_i²
    assert quad_loss(res.delta, Q, p["B"]) == pytest.approx(-res.loss_decrease, rel=1e-10)
    assert res.loss_decrease == pytest.approx(float(res.singular_values[:r].square().sum()))


def test_rank_r_beats_random_perturbations(backend):
    p = problem(d=20, m=9, seed=2)
    gamma, lam, r = 2.0, 0.1, 3
    left, right = solve_lowrank(p["A"], p["C"], p["B"], gamma=gamma, lam=lam, rank=r)
    best = objective((left, right), p["A"], p["C"], p["B"], gamma=gamma, lam=lam)
    g = torch.Generator().manual_seed(0)
    for scale in (1e-4, 1e-2, 1.0):
        for _ in range(50):
            dl = scale * torch.randn(left.shape, generator=g, dtype=F64) * left.norm() / 8
            dr = scale * torch.randn(right.shape, generator=g, dtype=F64)
            worse = objective((left + dl, right + dr), p["A"], p["C"], p["B"], gamma=gamma, lam=lam)
            assert worse >= best - 1e-12 * abs(best)


def brute_force_rank_r(Q, B, r, starts=12, seed=0):
    """min over X = P Vᵀ of tr(XᵀQX) - 2tr(XᵀB): random starts + L-BFGS on (P, V)."""
    g = torch.Generator().manual_seed(seed)
    d, m = B.shape
    best = math.inf
    for _ in range(starts):
        P = torch.randn(d, r, generator=g, dtype=F64).requires_grad_()
        V = torch.randn(m, r, generator=g, dtype=F64).requires_grad_()
        opt = torch.optim.LBFGS([P, V], lr=1, max_iter=200, tolerance_grad=1e-13,
                                tolerance_change=1e-15, history_size=50,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            X = P @ V.T
            loss = torch.trace(X.T @ Q @ X) - 2 * torch.trace(X.T @ B)
            loss.backward()
            return loss

        for _ in range(3):
            opt.step(closure)
        with torch.no_grad():
            X = P @ V.T
            best = min(best, float(torch.trace(X.T @ Q @ X) - 2 * torch.trace(X.T @ B)))
    return best


TINY = dict(d=6, m=5, n_low=9, n_safe=3, seed=3)


@functools.lru_cache(maxsize=None)
def tiny_brute_force(constraint: str) -> float:
    """The brute-force optimum of the tiny problem (independent of the backend: computed once)."""
    p = problem(**TINY, safe_rank=3 if constraint == "hard" else None)
    Q = p["A"] + 1.5 * p["C"] + 0.05 * torch.eye(TINY["d"], dtype=F64)
    if constraint == "soft":
        return brute_force_rank_r(Q, p["B"], 2)
    w, v = torch.linalg.eigh(p["C"])  # search over X = U0 Y, U0 from an independent eigh
    u0 = v[:, w <= DEFAULT_NULL_REL * w[-1]]
    assert u0.shape[1] == 3
    return brute_force_rank_r(u0.T @ Q @ u0, u0.T @ p["B"], 2)


@pytest.mark.parametrize("constraint", ["soft", "hard"])
def test_rank_r_equals_brute_force_on_tiny_problem(backend, constraint):
    p = problem(**TINY, safe_rank=3 if constraint == "hard" else None)
    gamma, lam, r = 1.5, 0.05, 2
    res = solve(p["A"], p["C"], p["B"], gamma=gamma, lam=lam, rank=r, constraint=constraint)
    Q = p["A"] + gamma * p["C"] + lam * torch.eye(TINY["d"], dtype=F64)
    assert res.null_dim == (3 if constraint == "hard" else None)
    assert quad_loss(res.delta, Q, p["B"]) == pytest.approx(tiny_brute_force(constraint),
                                                            rel=1e-8, abs=1e-10)


def test_rank_bounds_and_clamping(backend):
    p = problem(d=10, m=4)
    res = solve(p["A"], p["C"], p["B"], gamma=1.0, rank=9)
    assert res.rank == 4 and res.rank_requested == 9
    assert res.left.shape == (10, 4) and res.right.shape == (4, 4)
    res = solve(p["A"], p["C"], p["B"], gamma=1.0, rank=2)
    assert torch.linalg.matrix_rank(res.delta) <= 2


def test_objective_below_zero_edit(backend):
    p = problem(seed=4)
    for r in (1, 4):
        res = solve(p["A"], p["C"], p["B"], gamma=10.0, rank=r, dtd=p["dtd"])
        zero = torch.zeros_like(res.delta)
        at_zero = objective(zero, p["A"], p["C"], p["B"], gamma=10.0, lam=res.lam, dtd=p["dtd"])
        at_opt = objective(res.delta, p["A"], p["C"], p["B"], gamma=10.0, lam=res.lam,
                           dtd=p["dtd"])
        assert at_zero == pytest.approx(p["dtd"])
        assert at_opt < at_zero
        assert at_zero - at_opt == pytest.approx(res.loss_decrease, rel=1e-9)


def test_terms_match_the_data(backend):
    p = problem(seed=5)
    gamma = 4.0
    res = solve(p["A"], p["C"], p["B"], gamma=gamma, rank=3, dtd=p["dtd"])
    dw = res.delta
    fit = float((p["x_low"] @ dw - p["d"]).square().sum())
    safe = float((p["x_safe"] @ dw).square().sum())
    assert res.terms.fit == pytest.approx(fit, rel=1e-9)
    assert res.terms.safe == pytest.approx(safe, rel=1e-9)
    assert res.terms.ridge == pytest.approx(float(dw.square().sum()), rel=1e-9)
    assert res.gap_closed == pytest.approx(1 - fit / p["dtd"], rel=1e-9)
    assert 0 < res.gap_closed < 1
    dense = objective_terms(dw, p["A"], p["C"], p["B"], gamma=gamma, lam=res.lam, dtd=p["dtd"])
    assert isinstance(dense, ObjectiveTerms)
    assert dense.total == pytest.approx(res.terms.total, rel=1e-9)
    summary = res.summary()
    assert summary["gap_closed"] == pytest.approx(res.gap_closed)
    assert summary["backend"] == backend


def test_default_lam_is_scale_aware(backend):
    p = problem(seed=6)
    gamma = 3.0
    lam = default_lam(p["A"], p["C"], gamma)
    d = p["A"].shape[0]
    assert lam == pytest.approx(DEFAULT_LAM_REL * float(torch.trace(p["A"] + gamma * p["C"])) / d)
    res = solve(p["A"], p["C"], p["B"], gamma=gamma, rank=3)
    assert res.lam == pytest.approx(lam) and res.lam_rel == DEFAULT_LAM_REL
    # X -> s X (D fixed): A -> s²A, B -> sB, default lam -> s² lam, hence ΔW -> ΔW / s.
    s = 37.0
    scaled = solve(s * s * p["A"], s * s * p["C"], s * p["B"], gamma=gamma, rank=3)
    assert scaled.lam == pytest.approx(s * s * lam)
    assert rel(scaled.delta, res.delta / s) < 1e-9
    other = solve(p["A"], p["C"], p["B"], gamma=gamma, rank=3, lam_rel=0.5)
    assert other.lam == pytest.approx(0.5 / DEFAULT_LAM_REL * lam)


def test_fp32_inputs_are_upcast(backend):
    p = problem(seed=7)
    a32, c32, b32 = p["A"].float(), p["C"].float(), p["B"].float()
    left, right = solve_lowrank(a32, c32, b32, gamma=2.0, lam=0.3, rank=4)
    assert left.dtype == right.dtype == F64
    ref = solve(a32.double(), c32.double(), b32.double(), gamma=2.0, lam=0.3, rank=4)
    assert rel(left @ right, ref.delta) < 1e-12
    res = solve(a32, c32, b32, gamma=2.0, lam=0.3, rank=4)
    l16, r16 = res.factors(torch.float16)
    assert l16.dtype == r16.dtype == torch.float16


def test_asymmetric_statistics_are_symmetrised(backend):
    p = problem(seed=8)
    noise = 1e-6 * torch.randn(p["A"].shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    a = solve(p["A"] + noise, p["C"], p["B"], gamma=1.0, lam=0.5, rank=3)
    b = solve(p["A"] + noise.T, p["C"], p["B"], gamma=1.0, lam=0.5, rank=3)
    assert rel(a.delta, b.delta) < 1e-12


def test_no_safe_statistics(backend):
    p = problem(seed=9)
    res = solve(p["A"], None, p["B"], gamma=0.0, lam=0.5, rank=10)
    ref = stacked_lstsq(p["x_low"], p["d"], torch.zeros(1, 24, dtype=F64), 0.0, 0.5)
    assert rel(res.delta, ref) < 1e-9


# ---- hard constraint -----------------------------------------------------------------------------

@pytest.mark.parametrize("safe_rank", [20, 8, 4])
@pytest.mark.parametrize("gamma", [0.0, 7.0])
def test_hard_full_rank_equals_restricted_lstsq(backend, safe_rank, gamma):
    """Both forms (null-space basis U0 when k <= d/2, complement U1 otherwise) against lstsq
    over ΔW = U0 Y. d = 24: safe rank 20 -> k = 4 (basis), 8 -> k = 16 (complement), 4 -> 20."""
    d, m = 24, 10
    p = problem(d=d, m=m, n_safe=30, seed=10, safe_rank=safe_rank)
    res = solve(p["A"], p["C"], p["B"], gamma=gamma, lam=0.4, rank=m, constraint="hard",
                dtd=p["dtd"])
    w, v = torch.linalg.eigh(p["C"])
    u0 = v[:, w <= DEFAULT_NULL_REL * w[-1]]
    assert res.null_dim == u0.shape[1] == d - safe_rank
    assert _ext.eig_split(p["C"], DEFAULT_NULL_REL, relative=True).below == (safe_rank == 20)
    ref = stacked_lstsq(p["x_low"], p["d"], p["x_safe"], gamma, 0.4, basis=u0)
    assert rel(res.delta, ref) < 1e-8
    # in the null space: X_safe ΔW ≈ 0 (relative to the size of X_safe and ΔW)
    scale = float(p["x_safe"].norm() * res.delta.norm())
    assert float((p["x_safe"] @ res.delta).norm()) < 1e-10 * scale
    assert res.terms.safe < 1e-12 * res.safe_lam_max * res.terms.ridge  # rounding of tr(ΔWᵀCΔW)
    assert res.null_threshold == pytest.approx(DEFAULT_NULL_REL * float(w[-1]), rel=1e-10)
    assert res.safe_lam_max == pytest.approx(float(w[-1]), rel=1e-10)


@pytest.mark.parametrize("safe_rank", [8, 20])  # complement form / basis form
def test_hard_rank_r_optimum_in_subspace(backend, safe_rank):
    d, m, r = 24, 10, 3
    p = problem(d=d, m=m, seed=11, safe_rank=safe_rank)
    gamma, lam = 2.0, 0.3
    res = solve(p["A"], p["C"], p["B"], gamma=gamma, lam=lam, rank=r, constraint="hard")
    w, v = torch.linalg.eigh(p["C"])
    u0 = v[:, w <= DEFAULT_NULL_REL * w[-1]]
    Q = p["A"] + gamma * p["C"] + lam * torch.eye(d, dtype=F64)
    ref = u0 @ sqrt_whitened_optimum(u0.T @ Q @ u0, u0.T @ p["B"], r)
    assert torch.linalg.matrix_rank(res.delta) == r
    assert rel(res.delta, ref) < 1e-8
    assert quad_loss(res.delta, Q, p["B"]) == pytest.approx(-res.loss_decrease, rel=1e-9)
    assert len(res.singular_values) == min(d - safe_rank, m)
    # Better than projecting the soft solution onto the null space (Q couples the two).
    soft = solve(p["A"], p["C"], p["B"], gamma=gamma, lam=lam, rank=r).delta
    assert quad_loss(res.delta, Q, p["B"]) < quad_loss(u0 @ (u0.T @ soft), Q, p["B"])


def test_hard_threshold_is_relative(backend):
    p = problem(d=16, m=4, seed=12)  # X_safe full rank: no exact null space
    w = torch.linalg.eigvalsh(p["C"])
    null_rel = float((w[2] + w[3]) / 2 / w[-1])  # 3 eigenvalues below
    res = solve(p["A"], p["C"], p["B"], gamma=1.0, rank=2, constraint="hard", null_rel=null_rel)
    assert res.null_dim == 3 and res.null_rel == null_rel
    scaled = solve(p["A"], 1e4 * p["C"], p["B"], gamma=1e-4, rank=2, constraint="hard",
                   null_rel=null_rel)
    assert scaled.null_dim == 3
    with pytest.raises(ValueError, match="no eigenvalue of xtx_safe"):
        solve(p["A"], p["C"], p["B"], gamma=1.0, rank=2, constraint="hard")


def test_hard_without_safe_data_is_unconstrained(backend):
    p = problem(d=12, m=5, seed=13)
    hard = solve(p["A"], torch.zeros(12, 12, dtype=F64), p["B"], gamma=1.0, lam=0.2, rank=5,
                 constraint="hard")
    soft = solve(p["A"], None, p["B"], gamma=1.0, lam=0.2, rank=5)
    assert hard.null_dim == 12
    assert rel(hard.delta, soft.delta) < 1e-9


# ---- backends and validation ---------------------------------------------------------------------

@pytest.mark.parametrize("constraint,safe_rank", [("soft", None), ("hard", 6), ("hard", 30)])
def test_backends_agree(monkeypatch, constraint, safe_rank):
    monkeypatch.delenv(_ext.FORCE_TORCH_ENV, raising=False)
    if _ext.extension() is None:
        pytest.skip("edit_runtime._C is not built")
    p = problem(d=40, m=16, seed=14, safe_rank=safe_rank)
    kw = dict(gamma=3.0, rank=5, constraint=constraint)
    cpp = solve(p["A"], p["C"], p["B"], **kw)
    monkeypatch.setenv(_ext.FORCE_TORCH_ENV, "1")
    ref = solve(p["A"], p["C"], p["B"], **kw)
    assert (cpp.backend, ref.backend) == ("cpp", "torch")
    assert rel(cpp.delta, ref.delta) < 1e-8
    assert rel(cpp.singular_values, ref.singular_values) < 1e-8
    assert cpp.null_dim == ref.null_dim


@pytest.mark.parametrize("kwargs,match", [
    (dict(constraint="medium"), "constraint must be one of"),
    (dict(rank=0), "rank must be an integer >= 1"),
    (dict(rank=2.5), "rank must be an integer >= 1"),
    (dict(gamma=-1.0), "gamma must be >= 0"),
    (dict(lam=0.1, lam_rel=0.1), "give lam or lam_rel, not both"),
    (dict(null_rel=1e-3), "null_rel applies to constraint='hard' only"),
    (dict(constraint="hard", null_rel=2.0), "null_rel must be < 1"),
    (dict(lam=float("nan")), "lam must be >= 0 and finite"),
])
def test_bad_arguments(kwargs, match):
    p = problem(d=8, m=3)
    kw = dict(gamma=1.0, rank=2)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        solve(p["A"], p["C"], p["B"], **kw)


def test_bad_shapes_and_values():
    p = problem(d=8, m=3)
    with pytest.raises(ValueError, match=r"xtx_low must be a square \(8, 8\)"):
        solve(p["A"][:7], p["C"], p["B"], gamma=1.0, rank=1)
    with pytest.raises(ValueError, match=r"xtx_safe must be a square \(8, 8\)"):
        solve(p["A"], p["C"][:, :7], p["B"], gamma=1.0, rank=1)
    with pytest.raises(ValueError, match=r"xtd must be \(d_in, m\)"):
        solve(p["A"], p["C"], p["B"][:, 0], gamma=1.0, rank=1)
    bad = p["A"].clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="xtx_low has non-finite entries"):
        solve(bad, p["C"], p["B"], gamma=1.0, rank=1)


def test_not_positive_definite(backend):
    p = problem(d=12, m=3, n_low=4, safe_rank=2)
    with pytest.raises(ValueError, match="not positive definite"):
        solve(p["A"], p["C"], p["B"], gamma=1.0, lam=0.0, rank=1)
    with pytest.raises(ValueError, match="pass lam > 0 explicitly"):
        solve(torch.zeros(4, 4), None, torch.zeros(4, 2), gamma=1.0, rank=1)


def test_result_fields():
    p = problem(d=8, m=3)
    res = solve(p["A"], p["C"], p["B"], gamma=1.0, rank=2)
    assert isinstance(res, SolveResult)
    assert res.constraint == "soft" and res.null_dim is None and res.seconds >= 0
    assert res.left.is_contiguous() and res.right.is_contiguous()
    assert "left" not in repr(res)
