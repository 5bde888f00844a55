"""Op-level benchmark of the sparse low-rank apply against the ways one could run the same edit.

Variants, for one MLP projection ``W (out, in)`` edited on output neurons S (|S| = m, rank r):

- ``bare``:    ``F.linear(x, W)``, the unedited layer (the baseline of every ratio);
- ``patched``: ``F.linear(x, W)`` then ``ops.lowrank_apply_out`` on columns S, with a row mask
  (as the patched model runs it: the mask carries the "enabled" switch);
- ``merged``:  ``F.linear(x, W + ΔW)``, the delta merged into a dense weight copy;
- ``peft``:    unmerged LoRA on the full input, ``y + (x @ A.T) @ B.T`` with ``A = V (r, in)`` and
  ``B (out, r)`` = U scattered into rows S (what a PEFT export of the edit runs).

Shapes: Qwen2.5-0.5B ``up_proj`` (896 -> 4864, |S| 300, r 16) and Llama-3-8B ``up_proj``
(4096 -> 14336, |S| 1024, r 16); tokens 1, 8, 128, 512. On CUDA (bf16) times come from
``triton.testing.do_bench``; on CPU (fp32) from interleaved rounds, one call of each variant per
round in a shuffled order, so that load on the machine and cache state hit every variant alike:
times are medians, ratios the median over rounds of the variant's time over bare's time in the
same round.

    python bench/bench_lowrank_apply.py [--shapes qwen0.5b-up llama3-8b-up] [--tokens 1 8] [--threads 1]
    pytest bench/bench_lowrank_apply.py --benchmark-group-by=param:shape,param:tokens
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from edit_runtime import ops

SHAPES = {  # name: (in_features, out_features, |S|, rank)
    "qwen0.5b-up": (896, 4864, 300, 16),
    "llama3-8b-up": (4096, 14336, 1024, 16),
}
TOKENS = (1, 8, 128, 512)
VARIANTS = ("bare", "patched", "merged", "peft")
# Also timed: "apply", the op alone on a precomputed y (its own cost, without the Linear).


def make_case(shape: str, n_tokens: int, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    """Random weight, edit and input of one benchmark point (weights scaled as in a real layer)."""
    d_in, d_out, m, r = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g) * d_in**-0.5
    neurons = torch.randperm(d_out, generator=g)[:m].sort().values
    U = torch.randn(m, r, generator=g) * 0.02
    V = torch.randn(r, d_in, generator=g) * d_in**-0.5
    merged = W.clone()
    merged[neurons] += U @ V
    B = torch.zeros(d_out, r)
    B[neurons] = U
    x = torch.randn(n_tokens, d_in, generator=g)
    to = dict(device=device, dtype=dtype)
    return dict(x=x.to(**to), W=W.to(**to), merged=merged.to(**to), U=U.to(**to), V=V.to(**to),
                A=V.to(**to), B=B.to(**to), neurons=neurons.to(device),
                row_mask=torch.ones(n_tokens, device=device))


def variant_fns(case: dict) -> dict[str, Callable[[], torch.Tensor]]:
    x, W = case["x"], case["W"]

    def bare():
        return F.linear(x, W)

    def patched():
        y = F.linear(x, W)
        return ops.lowrank_apply_out(y, x, case["U"], case["V"], case["neurons"], case["row_mask"])

    def merged():
        return F.linear(x, case["merged"])

    def peft():
        y = F.linear(x, W)
        return y + (x @ case["A"].T) @ case["B"].T

    y0 = F.linear(x, W)

    def apply():  # in place on the same y each call: values drift, the cost does not
        return ops.lowrank_apply_out(y0, x, case["U"], case["V"], case["neurons"], case["row_mask"])

    return dict(bare=bare, patched=patched, merged=merged, peft=peft, apply=apply)


def check_agreement(fns: dict[str, Callable[[], torch.Tensor]]) -> float:
    """Largest |difference| between the edited variants, relative to the output's scale."""
    outs = {k: fns[k]().float() for k in ("patched", "merged", "peft")}
    scale = float(outs["merged"].abs().max())
    return max(float((outs[k] - outs["merged"]).abs().max()) for k in ("patched", "peft")) / scale


def _time_cpu(fns: dict[str, Callable], min_time_s: float = 2.0, min_rounds: int = 7):
    """Round-robin timing: one call of each variant per round, in a shuffled order (what ran just
    before decides which weights are still in cache), so load and cache state hit all variants
    alike. Returns (median seconds per call, median over rounds of time / time of "bare")."""
    for fn in fns.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(0)
    start = time.perf_counter()
    while len(samples["bare"]) < min_rounds or time.perf_counter() - start < min_time_s:
        rng.shuffle(order)
        for name in order:
            fn = fns[name]
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    times = {k: statistics.median(v) for k, v in samples.items()}
    ratios = {k: statistics.median(a / b for a, b in zip(v, samples["bare"])) for k, v in samples.items()}
    return times, ratios


def _time_cuda(fns: dict[str, Callable]):
    from triton.testing import do_bench

    times = {k: do_bench(fn, warmup=25, rep=100) * 1e-3 for k, fn in fns.items()}
    return times, {k: t / times["bare"] for k, t in times.items()}


def measure(shape: str, n_tokens: int, device: str):
    """(seconds per call, ratio to bare) of each variant, and the variants' relative disagreement."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    fns = variant_fns(make_case(shape, n_tokens, device, dtype))
    disagreement = check_agreement(fns)
    times, ratios = _time_cuda(fns) if device == "cuda" else _time_cpu(fns)
    return times, ratios, disagreement


def sweep_grid(shape: str, n_tokens: int) -> dict[int, float]:
    """CUDA only: seconds per call of the side-"out" kernel alone for several grid sizes.

    ``target_programs`` (default 2 x SMs) trades parallelism against recomputing the shrink in
    every program of a token block; this is the knob to tune on a new GPU.
    """
    from triton.testing import do_bench

    from edit_runtime.kernels.lowrank_apply import lowrank_apply_out_triton

    case = make_case(shape, n_tokens, "cuda", torch.bfloat16)
    y = F.linear(case["x"], case["W"])
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = {}
    for target in (sms // 4, sms // 2, sms, 2 * sms, 4 * sms):
        def run():
            lowrank_apply_out_triton(y, case["x"], case["U"], case["V"], case["neurons"], case["row_mask"],
                                     target_programs=target)
        out[target] = do_bench(run, warmup=25, rep=100) * 1e-3
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sweep-grid", action="store_true",
                        help="CUDA: also time the kernel alone over target_programs")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: torch's). On a loaded machine 1 thread avoids "
                             "OpenMP barrier stalls that swamp the small GEMMs")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.device == "cpu":
        where = f"CPU, {torch.get_num_threads()} threads, fp32"
    else:
        where = f"{torch.cuda.get_device_name()}, bf16, triton.testing.do_bench"
    print(f"# lowrank_apply (side out): {where}; time per call, ratio to bare Linear of the same run")
    head = (f"| shape | tokens | {' | '.join(VARIANTS)} | " + " | ".join(f"{v}/bare" for v in VARIANTS[1:])
            + " | apply alone | max rel diff |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for shape in args.shapes:
        for n in args.tokens:
            times, ratios, diff = measure(shape, n, args.device)
            cells = [f"{times[v] * 1e6:,.0f} µs" for v in VARIANTS]
            ratio_cells = [f"{ratios[v]:.3f}" for v in VARIANTS[1:]]
            apply = f"{times['apply'] * 1e6:,.0f} µs ({ratios['apply']:.3f})"
            print(f"| {shape} | {n} | {' | '.join(cells)} | {' | '.join(ratio_cells)} | {apply} | {diff:.1e} |",
                  flush=True)
    if args.sweep_grid and args.device == "cuda":
        print("\n# kernel alone (µs) by target_programs")
        for shape in args.shapes:
            for n in args.tokens:
                row = sweep_grid(shape, n)
                print(f"| {shape} | {n} | " + " | ".join(f"{t}: {s * 1e6:.1f}" for t, s in row.items()) + " |")


# ------------------------------------------------------------------------------------------------
# pytest-benchmark entry points: pytest bench/bench_lowrank_apply.py
# ------------------------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # the script runs without pytest
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("variant", VARIANTS + ("apply",))
    @pytest.mark.parametrize("tokens", TOKENS)
    @pytest.mark.parametrize("shape", list(SHAPES))
    def test_lowrank_apply_out(benchmark, shape, tokens, variant):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        fns = variant_fns(make_case(shape, tokens, device, dtype))
        assert check_agreement(fns) < (2e-2 if device == "cuda" else 1e-5)
        fn = fns[variant]
        if device == "cuda":
            def run():
                fn()
                torch.cuda.synchronize()
        else:
            run = fn
        benchmark.group = f"{shape} tokens={tokens}"
        benchmark(run)


if __name__ == "__main__":
    main()
