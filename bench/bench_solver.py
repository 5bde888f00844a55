"""The solver's float64 linear algebra: edit_runtime._C against torch.linalg (and scipy).

    python bench/bench_solver.py                          # d = 896, 2048, 4096, 2 threads
    python bench/bench_solver.py --sizes 896 2048 --threads 1 --repeats 5 --csv out.csv
    pytest bench/bench_solver.py                          # pytest-benchmark, d = 896

Projector: the null-space split of ``C = X_safeᵀX_safe`` that ``constraint="hard"`` needs.
  torch  ``edit_runtime._ext.eig_split_torch``: ``torch.linalg.eigh`` (all d eigenpairs), then
         select (the tests' oracle).
  auto   ``_C.sym_eig_split(side="auto")``: dsytrd, dstebz (λ_max), dstemr by value, dormtr,
         eigenvectors of the smaller side only (what the solver calls).
  below  the same, always the null-space side ``U0`` (eigenvalues <= τ).
  evr    ``_C.nullspace_basis(method="evr")``: one LAPACK ``dsyevr`` call, range='V'.
  scipy  ``scipy.linalg.eigh(driver="evr", subset_by_value=(-inf, τ])``, when scipy is installed.
Cases (τ = 1e-6 λ_max unless stated):
  safe   ``C`` from N = 640 hidden-state-like rows (80 safe prompts x 8 languages): a null
         space of a bit more than d - 640 directions (266 at d = 896). The realistic case.
  few    full-rank ``C`` (safe statistics over many tokens), τ leaving 32 eigenpairs below.
Whitened solve: ``Q`` (d, d) SPD, ``B`` (d, 256), rank 16: Cholesky, triangular solve, SVD,
triangular solve; C++ (dpotrf, dtrtrs, dgesdd) against torch (``whitened_lowrank_torch``).

Times are the minimum over ``--repeats`` runs; the two sides alternate within each repeat, so
background load hits both alike. ``torch.set_num_threads(--threads)`` sets the thread count of
both sides (the extension follows torch). Ratios > 1: C++ faster.
"""
from __future__ import annotations

import argparse
import csv
import math
import time

import torch

from edit_runtime import _ext

N_SAFE = 640  # 80 harmless prompts x 8 languages, one row per prompt (last token)
FEW = 32
NULL_REL = 1e-6
M_TARGETS, RANK = 256, 16

F64 = torch.float64


# ---- inputs --------------------------------------------------------------------------------------

def _householders(x: torch.Tensor, count: int, g: torch.Generator) -> torch.Tensor:
    """x @ H_1 ... H_count for random Householder reflections: a dense random rotation of the
    columns in O(count * rows * d) instead of a d x d QR."""
    for _ in range(count):
        v = torch.randn(x.shape[1], generator=g, dtype=F64)
        v /= v.norm()
        x = x - 2.0 * torch.outer(x @ v, v)
    return x


def safe_cov(d: int, n: int = N_SAFE, seed: int = 0) -> torch.Tensor:
    """XᵀX of n hidden-state-like rows: shared mean, 3 massive dimensions, power-law spectrum
    (nonzero eigenvalues from λ_max down to ~1e-6 λ_max, like SmolLM2's MLP inputs)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64) * torch.arange(1, d + 1, dtype=F64).pow(-0.6)
    x += 6.0 * torch.randn(d, generator=g, dtype=F64) / math.sqrt(d)
    x[:, :3] *= 4.0
    x = _householders(x, 6, g)
    return x.T @ x


def few_cov(d: int, seed: int = 0) -> tuple[torch.Tensor, float]:
    """A full-rank C with geometric spectrum 1 .. 1e-8 and a relative threshold with FEW below."""
    g = torch.Generator().manual_seed(seed)
    lam = torch.logspace(0, -8, d, dtype=F64)
    c = torch.diag(lam)
    for _ in range(6):  # H C H, H = I - 2vvᵀ
        v = torch.randn(d, generator=g, dtype=F64)
        v /= v.norm()
        cv = c @ v
        c = (c - 2 * torch.outer(v, cv) - 2 * torch.outer(cv, v)
             + 4 * float(v @ cv) * torch.outer(v, v))
    c = (c + c.T) * 0.5
    tau = float(lam[d - FEW - 1] + lam[d - FEW]) / 2  # between the 32nd and 33rd smallest
    return c, tau / float(lam[0])


def lowrank_problem(d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    c = safe_cov(d, seed=seed)
    q = c + 1e-2 * float(torch.trace(c)) / d * torch.eye(d, dtype=F64)
    b = c[:, :M_TARGETS] + torch.randn(d, M_TARGETS, generator=torch.Generator().manual_seed(1),
                                       dtype=F64)
    return q, b


# ---- the contenders ------------------------------------------------------------------------------

def projector_impls(c: torch.Tensor, null_rel: float) -> dict:
    """name -> zero-argument callable returning the null-space dimension it found."""
    from edit_runtime import _C

    impls = {
        "torch": lambda: _ext.eig_split_torch(c, null_rel, relative=True, side="auto").null_dim,
        "auto": lambda: _ext.eig_split(c, null_rel, relative=True, side="auto").null_dim,
        "below": lambda: _ext.eig_split(c, null_rel, relative=True, side="below").null_dim,
    }
    lam_max = float(torch.linalg.eigvalsh(c)[-1]) if c.shape[0] <= 1024 else None
    tau = null_rel * (lam_max if lam_max is not None else
                      _ext.eig_split(c, null_rel, relative=True).lam_max)
    cn = c.numpy()
    impls["evr"] = lambda: _C.nullspace_basis(cn, tau, False, "evr")[1].shape[1]
    try:
        import scipy.linalg
    except ImportError:
        pass
    else:
        impls["scipy"] = lambda: scipy.linalg.eigh(
            cn, driver="evr", subset_by_value=(-math.inf, tau))[1].shape[1]
    return impls


def lowrank_impls(q: torch.Tensor, b: torch.Tensor) -> dict:
    return {
        "torch": lambda: _ext.whitened_lowrank_torch(q, b, RANK),
        "cpp": lambda: _ext.whitened_lowrank(q, b, RANK),
    }


def timed(impls: dict, repeats: int) -> tuple[dict, dict]:
    """Minimum seconds per implementation (alternating), and each one's last result."""
    best = {k: math.inf for k in impls}
    out = {}
    for _ in range(repeats):
        for name, fn in impls.items():
            t0 = time.perf_counter()
            out[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best, out


# ---- table ---------------------------------------------------------------------------------------

def run(sizes, repeats: int, cases=("safe", "few"), lowrank: bool = True,
        skip: tuple = ()) -> list[dict]:
    if _ext.extension() is None:
        raise SystemExit("edit_runtime._C is not built (or EDIT_RUNTIME_FORCE_TORCH is set): "
                         "pip install --no-build-isolation --no-deps -e .")
    rows = []
    for d in sizes:
        for case in cases:
            if case == "safe":
                c, null_rel = safe_cov(d), NULL_REL
            else:
                c, null_rel = few_cov(d)
            impls = {k: f for k, f in projector_impls(c, null_rel).items() if k not in skip}
            best, out = timed(impls, repeats)
            ks = {name: int(k) for name, k in out.items()}
            if len(set(ks.values())) != 1:
                raise RuntimeError(f"d={d} {case}: the null-space dimensions disagree: {ks}")
            split = _ext.eig_split(c, null_rel, relative=True)
            row = dict(op="projector", d=d, case=case, null_dim=ks["torch"],
                       vectors=int(split.vectors.shape[1]), side="U0" if split.below else "U1")
            for name, t in best.items():
                row[f"{name}_s"] = t
                if name != "torch":
                    row[f"x_{name}"] = best["torch"] / t
            rows.append(row)
            print(_fmt(row), flush=True)
        if lowrank:
            q, b = lowrank_problem(d)
            best, out = timed(lowrank_impls(q, b), repeats)
            diff = (out["cpp"][0] @ out["cpp"][1] - out["torch"][0] @ out["torch"][1]).norm()
            rel = float(diff / (out["torch"][0] @ out["torch"][1]).norm())
            row = dict(op="whitened", d=d, case=f"m={M_TARGETS} r={RANK}", torch_s=best["torch"],
                       cpp_s=best["cpp"], x_cpp=best["torch"] / best["cpp"], rel_diff=rel)
            rows.append(row)
            print(_fmt(row), flush=True)
    return rows


def _fmt(row: dict) -> str:
    parts = []
    for k, v in row.items():
        parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return "  ".join(parts)


def markdown(rows: list[dict], threads: int) -> str:
    have_scipy = any("scipy_s" in r for r in rows)
    proj = [r for r in rows if r["op"] == "projector"]
    out = [f"Projector (null-space split), {threads} thread(s), seconds (speed-up vs torch):", "",
           "| d | case | null dim | C++ forms | torch eigh | C++ auto | C++ below | dsyevr"
           + (" | scipy evr |" if have_scipy else " |"),
           "|---|---|---|---|---|---|---|---" + ("|---|" if have_scipy else "|")]
    for r in proj:
        cells = [str(r["d"]), r["case"], str(r["null_dim"]), f"{r['vectors']} ({r['side']})",
                 f"{r['torch_s']:.3f}"]
        for name in ("auto", "below", "evr") + (("scipy",) if have_scipy else ()):
            cells.append(f"{r[name + '_s']:.3f} ({r['x_' + name]:.2f}x)" if name + "_s" in r
                         else "skipped")
        out.append("| " + " | ".join(cells) + " |")
    if not have_scipy:
        out += ["", "scipy: not installed, column skipped."]
    low = [r for r in rows if r["op"] == "whitened"]
    if low:
        out += ["", f"Whitened low-rank solve (Q (d, d), B (d, {M_TARGETS}), rank {RANK}), "
                f"{threads} thread(s):", "",
                "| d | torch | C++ | speed-up | rel. diff of left @ right |",
                "|---|---|---|---|---|"]
        for r in low:
            out.append(f"| {r['d']} | {r['torch_s']:.3f} | {r['cpp_s']:.3f} | {r['x_cpp']:.2f}x "
                       f"| {r['rel_diff']:.1e} |")
    return "\n".join(out)


# ---- pytest-benchmark ----------------------------------------------------------------------------
try:
    import pytest
except ImportError:  # the script needs no pytest
    pytest = None

if pytest is not None:
    _D = 896

    @pytest.fixture(scope="module")
    def _inputs():
        return {"safe": (safe_cov(_D), NULL_REL), "few": few_cov(_D),
                "lowrank": lowrank_problem(_D)}

    @pytest.mark.parametrize("case", ["safe", "few"])
    @pytest.mark.parametrize("impl", ["torch", "auto", "below", "evr"])
    def test_bench_projector(benchmark, _inputs, case, impl):
        if _ext.extension() is None and impl != "torch":
            pytest.skip("edit_runtime._C is not built")
        c, null_rel = _inputs[case]
        benchmark.group = f"projector d={_D} {case}"
        benchmark(projector_impls(c, null_rel)[impl])

    @pytest.mark.parametrize("impl", ["torch", "cpp"])
    def test_bench_whitened_lowrank(benchmark, _inputs, impl):
        if _ext.extension() is None and impl != "torch":
            pytest.skip("edit_runtime._C is not built")
        benchmark.group = f"whitened d={_D}"
        benchmark(lowrank_impls(*_inputs["lowrank"])[impl])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[896, 2048, 4096])
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for both sides")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cases", nargs="+", default=["safe", "few"], choices=["safe", "few"])
    p.add_argument("--no-lowrank", action="store_true", help="skip the whitened solve")
    p.add_argument("--skip", nargs="+", default=[], choices=["below", "evr", "scipy"],
                   help="projector contenders to leave out (evr takes ~2 min at d=4096, safe)")
    p.add_argument("--csv", help="also write the rows to this CSV file")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rows = run(a.sizes, a.repeats, tuple(a.cases), not a.no_lowrank, tuple(a.skip))
    print()
    print(markdown(rows, a.threads))
    if a.csv:
        keys = sorted({k for r in rows for k in r})
        with open(a.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
