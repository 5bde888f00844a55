r"""The closed-form low-rank edit of SWE (algorithm 1, theorem 4.1), from sufficient statistics.

Paper layout throughout: ``ΔW`` is ``(d_in, m)``, ``y = x W``. For one layer and neuron set S
(``m = |S|``), with ``X_low`` ``(N_h, d_in)``, ``D = Y_target - X_low W_S`` ``(N_h, m)`` and
``X_safe`` ``(N_s, d_in)`` (docs/METHOD.md section 2), the loss is

    L(ΔW) = ‖X_low ΔW - D‖² + γ ‖X_safe ΔW‖² + λ ‖ΔW‖²
          = tr(ΔWᵀ Q ΔW) - 2 tr(ΔWᵀ B) + ‖D‖²,
    Q = X_lowᵀX_low + γ X_safeᵀX_safe + λ I   (d_in, d_in),   B = X_lowᵀ D   (d_in, m),

so only ``xtx_low = X_lowᵀX_low``, ``xtx_safe = X_safeᵀX_safe``, ``xtd = X_lowᵀD`` (and
``dtd = ‖D‖²`` for absolute loss values) are needed: sums over prompts, streamed and merged by
:mod:`edit_runtime.capture`.

Soft constraint (``constraint="soft"``, SWE): minimise L subject to ``rank(ΔW) <= r``.
With ``Q = RᵀR`` (Cholesky) and ``Z = R ΔW``, ``L = ‖Z - G‖² - ‖G‖² + ‖D‖²`` where
``G = R⁻ᵀB = R M`` (``M = Q⁻¹B`` is the ridge solution). By Eckart–Young the rank-r optimum is
``Z* = U_r Σ_r V_rᵀ`` (truncated SVD of ``G``), so ``ΔW* = R⁻¹U_rΣ_r · V_rᵀ``, returned as
``left = R⁻¹U_rΣ_r`` ``(d_in, r)`` and ``right = V_rᵀ`` ``(r, m)``;
``L(ΔW*) = ‖D‖² - Σ_{i<=r} σ_i²``.
(``G`` is formed by one triangular solve; ``M`` itself is never needed.)

Hard constraint (``constraint="hard"``, AlphaEdit-style): eigendecompose
``C = X_safeᵀX_safe``; ``U0`` ``(d_in, k)`` are the eigenvectors with eigenvalue
``<= τ = null_rel · λ_max(C)``, ``P0 = U0U0ᵀ``; require ``ΔW = P0 ΔW`` (every column of ΔW in
the (near) null space of the safe inputs, so ``X_safe ΔW ≈ 0``). Derivation of the optimum:
write ``ΔW = U0 Y`` with ``Y`` ``(k, m)``. Since ``U0ᵀU0 = I``, this is a bijection between
``Y`` and the feasible ``ΔW``, ``‖ΔW‖ = ‖Y‖`` and ``rank ΔW = rank Y``; and

    L(U0 Y) = tr(Yᵀ Q0 Y) - 2 tr(Yᵀ B0) + ‖D‖²,
    Q0 = U0ᵀ Q U0 = U0ᵀX_lowᵀX_low U0 + γ Λ0 + λ I_k,   B0 = U0ᵀ B,

(``Λ0`` = the kept eigenvalues, as ``U0ᵀ C U0 = Λ0``). This is the soft problem in k
dimensions, so its rank-r optimum is algorithm 1 on ``(Q0, B0)``: ``Y* = R0⁻¹U_rΣ_r V_rᵀ``
with ``Q0 = R0ᵀR0``, ``R0⁻ᵀB0 = UΣVᵀ``, and ``ΔW* = U0 Y* = P0 ΔW*``. It is generally NOT
``P0`` times the soft solution (``Q`` couples the subspace to its complement), nor the soft
solution of a problem with ``P0`` applied to the statistics.
When the null space is the larger side (``k > d_in/2``, e.g. few safe prompts in a wide model),
only the complement ``U1`` (``d_in - k`` eigenvectors, ``P1 = U1U1ᵀ = I - P0``) is computed and
the same optimum is found in full coordinates: for any ``μ > 0`` minimise
``tr(ΔWᵀQ'ΔW) - 2 tr(ΔWᵀ P0 B)`` with ``Q' = P0 Q P0 + μ P1``. This splits into
``L(P0ΔW) - ‖D‖² + μ‖P1ΔW‖²``; ``rank(P0ΔW) <= rank(ΔW)``, so its rank-r minimiser has
``P1ΔW = 0`` and minimises L over the feasible set: the same ``ΔW*``. ``μ = tr(Q)/d_in`` keeps
``Q'`` conditioned like ``Q``. Both forms are tested against ``lstsq`` restricted to the subspace.

Scale-aware defaults (the papers leave them open, docs/METHOD.md):

- ``lam = lam_rel · tr(X_lowᵀX_low + γ X_safeᵀX_safe) / d_in`` (``lam_rel`` times the mean
  eigenvalue of the data term), :data:`DEFAULT_LAM_REL` = 1e-2. Why: on SmolLM2-135M-Instruct,
  layer 15, the built-in prompts (30 ids for training, 10 held out; 7 non-English languages
  -> English targets, |S| = 64, r = 16, γ = 1), the share of the held-out gap closed was
  -0.17 / 0.30 / 0.42 / 0.44 for lam_rel = 1e-4 / 1e-3 / 1e-2 / 1e-1 (training: 0.90 / 0.83 /
  0.73 / 0.60): a weak ridge overfits the few prompts. Sweep it with γ.
- ``τ = null_rel · λ_max(X_safeᵀX_safe)``, :data:`DEFAULT_NULL_REL` = 1e-6: the (numerically)
  exact null space of the safe prompts plus the eigenvalues below 1e-6 of the largest.
  On the 320 built-in harmless prompts at that layer (d_in = 576) it keeps 293 directions (256
  exactly null) that carry 2e-5 of the safe energy. Note that a null space estimated from few
  prompts protects held-out safe prompts poorly (their inputs have components there): in that
  test, soft γ = 10 beat hard (lam_rel = 1e-2 for both) on held-out gap closed (0.19 vs 0.13)
  and on held-out safe drift ‖X_safe ΔW‖²/‖X_safe W_S‖² (0.020 vs 0.066).

Everything runs in float64 on the CPU (inputs of any float dtype / device are upcast); the dense
linear algebra goes through :mod:`edit_runtime._ext` (the C++ extension, or torch). Cast the
factors to the model's dtype at the end (:meth:`SolveResult.factors`).

Public API: :func:`solve_lowrank` (plain ``(left, right)``), :func:`solve` (a
:class:`SolveResult` with diagnostics), :func:`default_lam`, :func:`objective`,
:func:`objective_terms`, :class:`ObjectiveTerms`.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from edit_runtime import _ext

__all__ = [
    "CONSTRAINTS",
    "DEFAULT_LAM_REL",
    "DEFAULT_NULL_REL",
    "ObjectiveTerms",
    "SolveResult",
    "default_lam",
    "objective",
    "objective_terms",
    "solve",
    "solve_lowrank",
]

log = logging.getLogger(__name__)

CONSTRAINTS = ("soft", "hard")
DEFAULT_LAM_REL = 1e-2
DEFAULT_NULL_REL = 1e-6

F64 = torch.float64


# ---- inputs --------------------------------------------------------------------------------------

def _f64(t: Any, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"{name} must be a real float tensor, got dtype {t.dtype}")
    t = t.detach().to("cpu", F64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} has non-finite entries")
    return t


def _sym(t: torch.Tensor, name: str, d: int | None = None) -> torch.Tensor:
    if t.dim() != 2 or t.shape[0] != t.shape[1] or (d is not None and t.shape[0] != d):
        want = f"({d}, {d})" if d is not None else "(d_in, d_in)"
        raise ValueError(f"{name} must be a square {want} matrix, got shape {tuple(t.shape)}")
    return (t + t.T) * 0.5  # float32 accumulation leaves it slightly asymmetric


def _stats(xtx_low, xtx_safe, xtd) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 CPU copies: A (d, d), C (d, d), B (d, m), with shape checks."""
    b = _f64(xtd, "xtd")
    if b.dim() != 2:
        raise ValueError(f"xtd must be (d_in, m) = X_lowᵀD, got shape {tuple(b.shape)}")
    d = b.shape[0]
    a = _sym(_f64(xtx_low, "xtx_low"), "xtx_low", d)
    c = torch.zeros_like(a) if xtx_safe is None else _sym(_f64(xtx_safe, "xtx_safe"), "xtx_safe", d)
    return a, c, b


def _check_scalar(v: Any, name: str, *, positive: bool = False) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {v!r}") from None
    if not math.isfinite(f) or f < 0 or (positive and f == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'} and finite, got {v!r}")
    return f


def default_lam(xtx_low: Any, xtx_safe: Any | None, gamma: float, *,
                lam_rel: float = DEFAULT_LAM_REL) -> float:
    """The scale-aware ridge ``lam_rel · tr(xtx_low + gamma · xtx_safe) / d_in``.

    ``tr(·)/d_in`` is the mean eigenvalue of the data term, so ``lam`` is invariant to the units
    of the activations (scaling X by s scales lam by s², like the data term) and to d_in.
    """
    gamma = _check_scalar(gamma, "gamma")
    lam_rel = _check_scalar(lam_rel, "lam_rel", positive=True)
    a = _f64(xtx_low, "xtx_low")
    tr = float(torch.diagonal(a).sum())
    if xtx_safe is not None:
        tr += gamma * float(torch.diagonal(_f64(xtx_safe, "xtx_safe")).sum())
    d = a.shape[0]
    lam = lam_rel * tr / max(d, 1)
    if lam <= 0:
        raise ValueError(f"the default lam is {lam} (trace of the statistics is {tr}); the "
                         f"statistics are empty: pass lam > 0 explicitly")
    return lam


# ---- objective -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ObjectiveTerms:
    """The loss of one ``ΔW`` from statistics (floats).

    ``fit = ‖X_low ΔW - D‖²`` (absolute only when ``dtd = ‖D‖²`` was given; otherwise it is
    ``‖X_low ΔW - D‖² - ‖D‖²``), ``safe = ‖X_safe ΔW‖²`` (unweighted), ``ridge = ‖ΔW‖²_F``.
    """

    fit: float
    safe: float
    ridge: float
    gamma: float
    lam: float
    dtd: float | None

    @property
    def total(self) -> float:
        """``fit + gamma · safe + lam · ridge``: the minimised loss."""
        return self.fit + self.gamma * self.safe + self.lam * self.ridge

    @property
    def gap_closed(self) -> float | None:
        """``1 - ‖X_lowΔW - D‖² / ‖D‖²``: the share of the safety gap closed (None without dtd)."""
        if self.dtd is None or self.dtd <= 0:
            return None
        return 1.0 - self.fit / self.dtd


def _as_factors(delta: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(left (d, r), right (r, m))`` from a dense ``(d, m)`` delta or a factor pair."""
    if isinstance(delta, (tuple, list)):
        if len(delta) != 2:
            raise ValueError(f"delta must be a (d_in, m) tensor or a (left, right) pair, got a "
                             f"sequence of {len(delta)}")
        left, right = _f64(delta[0], "left"), _f64(delta[1], "right")
        if left.dim() != 2 or right.dim() != 2 or left.shape[1] != right.shape[0]:
            raise ValueError(f"left (d_in, r) and right (r, m) do not chain: "
                             f"{tuple(left.shape)} @ {tuple(right.shape)}")
        return left, right
    dense = _f64(delta, "delta")
    if dense.dim() != 2:
        raise ValueError(f"delta must be (d_in, m), got shape {tuple(dense.shape)}")
    return dense, torch.eye(dense.shape[1], dtype=F64)


def objective_terms(delta: Any, xtx_low: Any, xtx_safe: Any | None, xtd: Any, *, gamma: float,
                    lam: float, dtd: float | None = None) -> ObjectiveTerms:
    """:class:`ObjectiveTerms` of ``delta`` (a ``(d_in, m)`` tensor or ``(left, right)``).

    Costs O(d_in² r) with factors: ``tr(ΔWᵀAΔW) = ⟨leftᵀ A left, right rightᵀ⟩``.
    """
    a, c, b = _stats(xtx_low, xtx_safe, xtd)
    left, right = _as_factors(delta)
    if left.shape[0] != a.shape[0] or right.shape[1] != b.shape[1]:
        raise ValueError(f"delta is ({left.shape[0]}, {right.shape[1]}), the statistics need "
                         f"({a.shape[0]}, {b.shape[1]})")
    rrt = right @ right.T
    quad = lambda s: float(((left.T @ s @ left) * rrt).sum())  # noqa: E731
    cross = float(((left.T @ b) * right).sum())
    fit = quad(a) - 2.0 * cross + (0.0 if dtd is None else float(dtd))
    return ObjectiveTerms(fit=fit, safe=quad(c), ridge=float(((left.T @ left) * rrt).sum()),
                          gamma=_check_scalar(gamma, "gamma"), lam=_check_scalar(lam, "lam"),
                          dtd=None if dtd is None else float(dtd))


def objective(delta: Any, xtx_low: Any, xtx_safe: Any | None, xtd: Any, *, gamma: float,
              lam: float, dtd: float = 0.0) -> float:
    """``L(ΔW) = tr(ΔWᵀQΔW) - 2 tr(ΔWᵀ xtd) + dtd`` with ``Q = xtx_low + γ xtx_safe + λ I``.

    ``delta``: ``(d_in, m)`` or ``(left, right)``. With the default ``dtd = 0`` this is the loss
    minus the constant ``‖D‖²`` (so ``objective(0) = 0`` and a good edit is negative).
    """
    return objective_terms(delta, xtx_low, xtx_safe, xtd, gamma=gamma, lam=lam, dtd=dtd).total


# ---- solve ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SolveResult:
    """The factored edit and what the solve saw. Tensors are float64 on the CPU.

    ``left @ right`` is ``ΔW_S`` in paper layout ``(d_in, m)``; in PyTorch layout
    ``weight[S] += right.T @ left.T`` (``U = right.T`` (m, r), ``V = left.T`` (r, d_in)).
    """

    left: torch.Tensor = field(repr=False)  # (d_in, r)
    right: torch.Tensor = field(repr=False)  # (r, m)
    constraint: str
    rank: int  # columns of left: min(rank requested, d_eff, m)
    rank_requested: int
    gamma: float
    lam: float
    lam_rel: float | None  # None when lam was given explicitly
    singular_values: torch.Tensor = field(repr=False)  # of the whitened target G, descending
    loss_decrease: float  # L(0) - L(ΔW*) = Σ_{i<=r} σ_i² (>= 0)
    rank_energy: float  # Σ_{i<=r} σ_i² / Σ σ_i²: share of the full-rank decrease kept at rank r
    terms: ObjectiveTerms  # fit / safe / ridge of ΔW*
    null_rel: float | None = None  # hard only
    null_dim: int | None = None  # hard only: dimension k of the subspace
    null_threshold: float | None = None  # hard only: absolute eigenvalue threshold τ
    safe_lam_max: float | None = None  # hard only: λ_max(X_safeᵀX_safe)
    backend: str = "torch"  # "cpp" (edit_runtime._C) or "torch"
    seconds: float = 0.0

    @property
    def delta(self) -> torch.Tensor:
        """The dense ``ΔW_S`` ``(d_in, m)`` (small problems and tests only)."""
        return self.left @ self.right

    @property
    def gap_closed(self) -> float | None:
        """``1 - ‖X_lowΔW - D‖²/‖D‖²`` on the training statistics (None without ``dtd``)."""
        return self.terms.gap_closed

    def factors(self, dtype: torch.dtype = F64, device: Any = "cpu"
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(left, right)`` cast (at the very end, after the float64 solve)."""
        return self.left.to(device, dtype), self.right.to(device, dtype)

    def summary(self) -> dict[str, Any]:
        """The scalar diagnostics as a JSON-friendly dict."""
        out = {k: getattr(self, k) for k in (
            "constraint", "rank", "rank_requested", "gamma", "lam", "lam_rel", "loss_decrease",
            "rank_energy", "null_rel", "null_dim", "null_threshold", "safe_lam_max", "backend",
            "seconds")}
        out.update(fit=self.terms.fit, safe=self.terms.safe, ridge=self.terms.ridge,
                   gap_closed=self.gap_closed,
                   top_singular_values=[float(s) for s in self.singular_values[:16]])
        return out


def solve(xtx_low: Any, xtx_safe: Any | None, xtd: Any, *, gamma: float, rank: int,
          lam: float | None = None, lam_rel: float | None = None, constraint: str = "soft",
          null_rel: float | None = None, dtd: float | None = None) -> SolveResult:
    """The rank-r minimiser of ``‖X_lowΔW - D‖² + γ‖X_safeΔW‖² + λ‖ΔW‖²`` (see the module doc).

    Args:
        xtx_low: ``X_lowᵀX_low`` ``(d_in, d_in)``.
        xtx_safe: ``X_safeᵀX_safe`` ``(d_in, d_in)``, or None (no safe data: zeros).
        xtd: ``X_lowᵀD`` ``(d_in, m)``, ``D = Y_target - X_low W_S``.
        gamma: weight ``γ >= 0`` of the safe term (SWE: 1–100). Also used by ``"hard"``.
        rank: ``r >= 1``; clamped to ``min(d_eff, m)`` (``d_eff = k`` for ``"hard"``).
        lam: ridge ``λ >= 0``; None = :func:`default_lam` with ``lam_rel``.
        lam_rel: default :data:`DEFAULT_LAM_REL`; give ``lam`` or ``lam_rel``, not both.
        constraint: ``"soft"`` (SWE) or ``"hard"`` (restrict ΔW to the null space of
            ``xtx_safe``: eigenvalues ``<= null_rel · λ_max``).
        null_rel: ``"hard"`` only; default :data:`DEFAULT_NULL_REL`.
        dtd: ``‖D‖²`` (trace of ``DᵀD``), optional: absolute fit and ``gap_closed``.

    Raises ``ValueError`` for bad shapes or values, a ``Q`` that is not positive definite
    (``lam = 0`` with rank-deficient data) or an empty null space.
    """
    t0 = time.perf_counter()
    if constraint not in CONSTRAINTS:
        raise ValueError(f"constraint must be one of {CONSTRAINTS}, got {constraint!r}")
    if isinstance(rank, bool) or int(rank) != rank or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    rank = int(rank)
    gamma = _check_scalar(gamma, "gamma")
    if lam is not None and lam_rel is not None:
        raise ValueError(f"give lam or lam_rel, not both (lam={lam!r}, lam_rel={lam_rel!r})")
    if null_rel is not None and constraint != "hard":
        raise ValueError(f"null_rel applies to constraint='hard' only, got "
                         f"constraint={constraint!r}")
    a, c, b = _stats(xtx_low, xtx_safe, xtd)
    d, m = b.shape
    if lam is None:
        lam_rel = DEFAULT_LAM_REL if lam_rel is None else lam_rel
        lam = default_lam(a, c, gamma, lam_rel=lam_rel)
    else:
        lam = _check_scalar(lam, "lam")
    q = a + gamma * c
    q.diagonal().add_(lam)

    backend = _ext.backend()
    extra: dict[str, Any] = {}
    if constraint == "soft":
        left, right, s = _ext.whitened_lowrank(q, b, rank)
    else:
        null_rel = DEFAULT_NULL_REL if null_rel is None else _check_scalar(null_rel, "null_rel")
        if null_rel >= 1:
            raise ValueError(f"null_rel must be < 1 (a fraction of λ_max), got {null_rel}")
        split = _ext.eig_split(c, null_rel, relative=True, side="auto")
        k = split.null_dim
        extra = dict(null_rel=null_rel, null_dim=k, null_threshold=split.tau,
                     safe_lam_max=split.lam_max)
        if k == 0:
            raise ValueError(
                f"constraint='hard': no eigenvalue of xtx_safe is <= null_rel * λ_max = "
                f"{null_rel:g} * {split.lam_max:.6g} (the safe data spans all {d} dimensions); "
                f"raise null_rel or use constraint='soft'")
        if split.below:  # reduced coordinates: ΔW = U0 Y
            u0 = split.vectors
            q0 = u0.T @ (a @ u0)
            q0 = (q0 + q0.T) * 0.5
            q0.diagonal().add_(gamma * split.eigvals.clamp(min=0) + lam)
            left0, right, s = _ext.whitened_lowrank(q0, u0.T @ b, rank)
            left = u0 @ left0
        else:  # complement form: Q' = P0 Q P0 + μ P1, target P0 B
            u1 = split.vectors
            mu = float(torch.diagonal(q).sum()) / d
            w = q @ u1
            inner = u1.T @ w
            inner.diagonal().add_(mu)
            qp = q - u1 @ w.T - w @ u1.T + u1 @ (((inner + inner.T) * 0.5) @ u1.T)
            qp = (qp + qp.T) * 0.5
            left, right, s = _ext.whitened_lowrank(qp, split.project(b), min(rank, k))
            left = split.project(left)  # exact: the minimiser has P1 ΔW = 0
            s = s[: min(k, m)]  # the rest are zeros of the complement directions
    energy = s.square()
    kept = float(energy[: left.shape[1]].sum())
    total = float(energy.sum())
    terms = objective_terms((left, right), a, c, b, gamma=gamma, lam=lam, dtd=dtd)
    result = SolveResult(
        left=left.contiguous(), right=right.contiguous(), constraint=constraint,
        rank=int(left.shape[1]), rank_requested=rank, gamma=gamma, lam=float(lam),
        lam_rel=lam_rel, singular_values=s, loss_decrease=kept,
        rank_energy=kept / total if total > 0 else 1.0, terms=terms, backend=backend,
        seconds=time.perf_counter() - t0, **extra)
    if result.rank < rank:
        log.info("rank %d clamped to %d (d_eff=%s, m=%d)", rank, result.rank,
                 extra.get("null_dim", d), m)
    return result


def solve_lowrank(xtx_low: Any, xtx_safe: Any | None, xtd: Any, *, gamma: float,
                  lam: float | None = None, rank: int, constraint: str = "soft",
                  lam_rel: float | None = None, null_rel: float | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(left (d_in, r), right (r, m))`` float64 with ``left @ right = ΔW_S`` (paper layout).

    The plain form of :func:`solve` (same arguments; ``lam=None`` = the scale-aware default).
    """
    res = solve(xtx_low, xtx_safe, xtd, gamma=gamma, lam=lam, rank=rank, constraint=constraint,
                lam_rel=lam_rel, null_rel=null_rel)
    return res.left, res.right
