"""The solver's dense float64 linear algebra: the C++ extension ``edit_runtime._C`` or torch.

Two operations, each with a torch implementation (the fallback and the test oracle) and a LAPACK
one in ``csrc/ext.cpp`` (built by ``pip install --no-build-isolation --no-deps -e .``):

- :func:`eig_split` ``(C (n, n), threshold)`` -> :class:`EigSplit`: the spectrum of the symmetric
  ``C`` split at ``tau`` (``threshold``, or ``threshold * lambda_max(C)`` with ``relative=True``);
  only ONE side's eigenvectors are formed, by default the smaller side (``side="auto"``): the
  null-space basis ``U0`` (eigenvalues ``<= tau``) or its complement ``U1`` (``> tau``, then
  ``P0 = I - U1 U1ᵀ``). :func:`nullspace_basis` always returns ``U0``.
  C++: ``dsytrd`` + ``dstebz`` (lambda_max) + ``dstemr`` by value + ``dormtr`` on the chosen
  vectors only. torch: ``torch.linalg.eigh`` (all eigenpairs), then the same selection.
- :func:`whitened_lowrank` ``(Q (n, n) SPD, B (n, m), rank)`` -> ``(left (n, r), right (r, m),
  s)``: ``argmin_{rank X <= r} tr(XᵀQX) - 2 tr(XᵀB)``, ``X = left @ right``, by Cholesky
  ``Q = RᵀR``, ``G = R⁻ᵀB = U S Vᵀ``, ``left = R⁻¹U_r S_r``, ``right = V_rᵀ``; ``s`` all singular
  values of ``G`` (descending). C++: ``dpotrf``, ``dtrtrs``, ``dgesdd``. torch: the same steps.

Backend choice, per call: ``EDIT_RUNTIME_FORCE_TORCH=1`` selects torch (no warning); otherwise
``_C`` when it imports, else torch with ONE ``RuntimeWarning`` per process saying why. The
eigenvector basis inside a degenerate eigenvalue cluster and the signs of the factors differ
between backends; projectors, ``left @ right`` and singular values agree (tests: 1e-8 relative).

Inputs may be torch tensors (any float dtype, any device) or numpy arrays; everything is computed
in float64 on the CPU and returned as float64 CPU tensors. The extension's OpenBLAS pool is set
to ``torch.get_num_threads()`` before each call, so ``torch.set_num_threads`` governs both.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "FORCE_TORCH_ENV",
    "EigSplit",
    "backend",
    "eig_split",
    "eig_split_torch",
    "extension",
    "nullspace_basis",
    "whitened_lowrank",
    "whitened_lowrank_torch",
]

FORCE_TORCH_ENV = "EDIT_RUNTIME_FORCE_TORCH"
SIDES = ("auto", "below", "above")

_loaded = False
_module: Any = None
_import_error: str | None = None
_warned = False
_threads: int | None = None


def _force_torch() -> bool:
    return os.environ.get(FORCE_TORCH_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _load() -> Any:
    """Import ``edit_runtime._C`` once; remember the failure reason."""
    global _loaded, _module, _import_error
    if not _loaded:
        _loaded = True
        try:
            # Puts libscipy_openblas.so in the process namespace (RTLD_GLOBAL), so _C resolves it
            # even when its rpath is stale (a moved environment).
            import scipy_openblas32  # noqa: F401
        except ImportError:
            pass
        try:
            from edit_runtime import _C
        except ImportError as exc:
            _import_error = f"{type(exc).__name__}: {exc}"
        else:
            _module = _C
    return _module


def extension() -> Any:
    """The ``_C`` module to use for this call, or None for torch (warns once if it is missing)."""
    global _warned, _threads
    if _force_torch():
        return None
    mod = _load()
    if mod is None:
        if not _warned:
            _warned = True
            warnings.warn(
                f"edit_runtime._C is not available ({_import_error}); the solver uses the slower "
                f"torch.linalg fallback. Build it with `pip install --no-build-isolation --no-deps "
                f"-e .` (needs pybind11 and scipy-openblas32), or set {FORCE_TORCH_ENV}=1 to "
                f"choose torch silently.",
                RuntimeWarning,
                stacklevel=3,
            )
        return None
    threads = torch.get_num_threads()
    if threads != _threads:
        mod.set_num_threads(threads)
        _threads = threads
    return mod


def backend() -> str:
    """``"cpp"`` or ``"torch"``: what the next call would use."""
    return "cpp" if extension() is not None else "torch"


# ---- conversions ---------------------------------------------------------------------------------

def _as_numpy(a: Any, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(a, dtype=np.float64)
    if arr.dtype != np.float64:
        raise ValueError(f"{name} must be a real float array, got dtype {arr.dtype}")
    return arr


def _as_tensor(a: Any) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach().to("cpu", torch.float64)
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


def _check_square(a, name: str) -> None:
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"{name} must be a square 2-D matrix, got shape {tuple(a.shape)}")


# ---- eigen split ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class EigSplit:
    """One side of the spectrum of a symmetric ``C`` (n, n) split at ``tau``.

    ``below=True``: ``vectors`` (n, k) is the null-space basis ``U0`` (eigenvalues ``<= tau``).
    ``below=False``: ``vectors`` (n, n - k) spans the complement (eigenvalues ``> tau``) and the
    null space is its orthogonal complement. ``null_dim`` = k in both cases.
    """

    eigvals: torch.Tensor  # (p,) ascending, the eigenvalues of `vectors`
    vectors: torch.Tensor  # (n, p) orthonormal columns
    below: bool
    null_dim: int  # number of eigenvalues <= tau
    tau: float  # absolute threshold
    lam_max: float  # largest eigenvalue of C
    backend: str

    @property
    def n(self) -> int:
        return int(self.vectors.shape[0])

    def project(self, m: torch.Tensor) -> torch.Tensor:
        """``P0 @ m`` for ``m`` (n, ...) without forming ``P0`` (float64)."""
        v = self.vectors
        m = m.to(torch.float64)
        return v @ (v.T @ m) if self.below else m - v @ (v.T @ m)

    def projector(self) -> torch.Tensor:
        """``P0`` (n, n), the orthogonal projector onto the null space."""
        return self.project(torch.eye(self.n, dtype=torch.float64))

    def basis(self) -> torch.Tensor:
        """An orthonormal basis ``U0`` (n, null_dim) of the null space. From the complement side
        it is the trailing columns of a complete QR of ``U1`` (any basis of the null space; not
        eigenvectors of ``C``)."""
        if self.below:
            return self.vectors
        q, _ = torch.linalg.qr(self.vectors, mode="complete")
        return q[:, self.n - self.null_dim:]


def eig_split_torch(C: Any, threshold: float, *, relative: bool = False,
                    side: str = "auto") -> EigSplit:
    """Reference for :func:`eig_split`: ``torch.linalg.eigh`` (all eigenpairs), then select."""
    c = _as_tensor(C)
    _check_square(c, "C")
    _check_side(side)
    n = c.shape[0]
    if n == 0:
        return EigSplit(c.new_zeros(0), c.new_zeros((0, 0)), side != "above", 0, float(threshold),
                        float("nan"), "torch")
    w, v = torch.linalg.eigh(c)
    lam_max = float(w[-1])
    tau = float(threshold) * lam_max if relative else float(threshold)
    count_below = int((w <= tau).sum())
    below = side == "below" or (side == "auto" and 2 * count_below <= n)
    sel = slice(0, count_below) if below else slice(count_below, n)
    return EigSplit(w[sel].clone(), v[:, sel].clone(), below, count_below, tau, lam_max, "torch")


def eig_split(C: Any, threshold: float, *, relative: bool = False, side: str = "auto") -> EigSplit:
    """Split the spectrum of symmetric ``C`` (n, n) at ``tau`` and form one side's eigenvectors.

    ``tau = threshold`` (absolute) or ``threshold * lambda_max(C)`` (``relative=True``).
    ``side``: ``"below"`` (eigenvalues ``<= tau``), ``"above"`` (``> tau``) or ``"auto"`` (the
    side with fewer eigenpairs; ties go below). Only the lower triangle of ``C`` is read by the
    C++ path; pass a symmetric matrix.
    """
    _check_side(side)
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    mod = extension()
    if mod is None:
        return eig_split_torch(C, threshold, relative=relative, side=side)
    c = _as_numpy(C, "C")
    _check_square(c, "C")
    w, v, lam_max, below, tau, null_dim = mod.sym_eig_split(c, float(threshold), bool(relative),
                                                            side)
    return EigSplit(torch.from_numpy(w), torch.from_numpy(v), bool(below), int(null_dim),
                    float(tau), float(lam_max), "cpp")


def nullspace_basis(C: Any, threshold: float, *, relative: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w (k,), U0 (n, k))``: the eigenpairs of symmetric ``C`` with eigenvalue ``<= tau``."""
    split = eig_split(C, threshold, relative=relative, side="below")
    return split.eigvals, split.vectors


def _check_side(side: str) -> None:
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")


# ---- whitened low-rank solve ---------------------------------------------------------------------

def _check_lowrank_args(q, b, rank: int) -> None:
    _check_square(q, "Q")
    if b.ndim != 2 or b.shape[0] != q.shape[0]:
        raise ValueError(f"B must be 2-D with {q.shape[0]} rows (Q is {tuple(q.shape)}), got "
                         f"shape {tuple(b.shape)}")
    if int(rank) != rank or rank < 0:
        raise ValueError(f"rank must be a non-negative integer, got {rank!r}")


def whitened_lowrank_torch(Q: Any, B: Any, rank: int
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference for :func:`whitened_lowrank` in torch.linalg (float64)."""
    q, b = _as_tensor(Q), _as_tensor(B)
    _check_lowrank_args(q, b, rank)
    n, m = b.shape
    k = min(int(rank), n, m)
    if n == 0 or m == 0:
        return q.new_zeros((n, 0)), q.new_zeros((0, m)), q.new_zeros(0)
    r, info = torch.linalg.cholesky_ex(q, upper=True)
    if int(info) > 0:
        raise ValueError(f"Q is not positive definite (the leading minor of order {int(info)} is "
                         f"not); use a larger lam")
    g = torch.linalg.solve_triangular(r.T, b, upper=False)
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    left = torch.linalg.solve_triangular(r, u[:, :k] * s[:k], upper=True)
    return left, vh[:k].clone(), s


def whitened_lowrank(Q: Any, B: Any, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(left (n, r), right (r, m), s (min(n, m),))`` minimising ``tr(XᵀQX) - 2 tr(XᵀB)`` over
    ``rank(X) <= r`` with ``X = left @ right``; ``r = min(rank, n, m)``.

    ``Q`` (n, n) symmetric positive definite (upper triangle read), ``B`` (n, m). ``s``: the
    singular values of ``R⁻ᵀB`` (``Q = RᵀR``), descending; the minimum is ``-sum(s[:r]**2)``.
    Raises ``ValueError`` when ``Q`` is not positive definite.
    """
    mod = extension()
    if mod is None:
        return whitened_lowrank_torch(Q, B, rank)
    q, b = _as_numpy(Q, "Q"), _as_numpy(B, "B")
    _check_lowrank_args(q, b, rank)
    left, right, s = mod.whitened_lowrank(q, b, int(rank))
    return torch.from_numpy(left), torch.from_numpy(right), torch.from_numpy(s)
