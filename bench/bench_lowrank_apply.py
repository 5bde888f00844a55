"""Benchmark of a patched Linear against the ways one could run the same edit.

Variants, for one MLP projection ``W (out, in)`` edited on output neurons S (|S| = m, rank r),
all under ``torch.no_grad()`` on the same weight tensor:

- ``bare``:    the unedited ``nn.Linear`` (the baseline of every ratio);
- ``patched``: that Linear patched by ``edit_runtime.patch_model`` (an ``EditedLinear``: on CPU
  fp32 its fast path, on CUDA the Triton kernel through ``ops.lowrank_apply_out``);
- ``masked``:  the same with a row mask set (every other row edited), as a mixed batch runs;
- ``merged``:  an ``nn.Linear`` holding a dense copy of ``W + ΔW``;
- ``peft``:    unmerged LoRA on the full input, ``lin(x) + (x @ A.T) @ B.T`` with ``A = V (r, in)``
  and ``B (out, r)`` = U scattered into rows S (what a PEFT export of the edit runs, without
  PEFT's own Python overhead).

Also timed, on a precomputed y so that the matmul's noise is out: ``edit``, the edit term alone
as the patched Linear adds it (CPU fp32: its fast path ``patch._fast_apply``; CUDA: the Triton
op), and ``peft_term``, PEFT's ``y + (x @ A.T) @ B.T`` alone; on CPU each right after an untimed
bare Linear, so with the caches as the matmul leaves them.

Shapes: Qwen2.5-0.5B ``up_proj`` (896 -> 4864, |S| 300, r 16) and Llama-3-8B ``up_proj``
(4096 -> 14336, |S| 1024, r 16); tokens 1, 8, 128, 512. On CUDA (bf16) times come from
``triton.testing.do_bench``; on CPU (fp32) from interleaved rounds, one call of each variant per
round in a shuffled order, so that load on the machine and cache state hit every variant alike:
times are medians, ratios the median over rounds of the variant's time over bare's time in the
same round, with the interquartile range of those per-round ratios for ``patched`` (the noise).

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
from torch import nn

from edit_runtime import ModuleEdit, SparseDelta, ops, patch_model
from edit_runtime.patch import _fast_apply

SHAPES = {  # name: (in_features, out_features, |S|, rank)
    "qwen0.5b-up": (896, 4864, 300, 16),
    "llama3-8b-up": (4096, 14336, 1024, 16),
}
TOKENS = (1, 8, 128, 512)
VARIANTS = ("bare", "patched", "masked", "merged", "peft")
# Also timed: "edit" and "peft_term", the two add-on terms alone on a precomputed y.
TARGET = 1.05  # issue 2: patched <= 1.05x bare at every size (and below peft)


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


def _linear(weight: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` without bias holding ``weight`` itself (no copy)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    return lin


def _patched(case: dict, row_mask: torch.Tensor | None) -> nn.Module:
    """A module ``up`` = a Linear on the case's weight, patched with the case's edit."""
    holder = nn.Module()
    holder.up = _linear(case["W"])
    delta = SparseDelta([ModuleEdit("up", "out", case["neurons"], case["U"], case["V"])])
    patch_model(holder, delta, check_fingerprint=False, row_mask=row_mask)
    return holder.up


def variant_fns(case: dict) -> dict[str, Callable[[], torch.Tensor]]:
    x = case["x"]
    lin = _linear(case["W"])
    edited = _patched(case, None)
    mask = torch.arange(x.shape[0]) % 2 == 0  # every other row edited (row 0 always)
    edited_masked = _patched(case, mask)
    merged_lin = _linear(case["merged"])
    A, B = case["A"], case["B"]

    def bare():
        return lin(x)

    def patched():
        return edited(x)

    def masked():
        return edited_masked(x)

    def merged():
        return merged_lin(x)

    def peft():
        return lin(x) + (x @ A.T) @ B.T

    y0 = F.linear(x, case["W"])
    fast = edited._fast  # None on CUDA: the module runs the Triton op there

    def edit():  # in place on the same y each call: values drift, the cost does not
        if fast is not None:
            return _fast_apply(fast, x, y0)
        return ops.lowrank_apply_out(y0, x, case["U"], case["V"], case["neurons"])

    def peft_term():
        return y0 + (x @ A.T) @ B.T

    fns = dict(bare=bare, patched=patched, masked=masked, merged=merged, peft=peft, edit=edit,
               peft_term=peft_term)
    return {k: torch.no_grad()(fn) for k, fn in fns.items()}


def check_agreement(fns: dict[str, Callable[[], torch.Tensor]]) -> float:
    """Largest |difference| between the edited variants, relative to the output's scale (the
    masked variant: its edited rows against merged, the others against bare)."""
    outs = {k: fns[k]().float() for k in ("bare", "patched", "masked", "merged", "peft")}
    scale = float(outs["merged"].abs().max())
    diff = max(float((outs[k] - outs["merged"]).abs().max()) for k in ("patched", "peft"))
    edited = (torch.arange(outs["masked"].shape[0]) % 2 == 0).to(outs["masked"].device)
    want = torch.where(edited[:, None], outs["merged"], outs["bare"])
    return max(diff, float((outs["masked"] - want).abs().max())) / scale


def _time_cpu(fns: dict[str, Callable], min_time_s: float = 2.0, min_rounds: int = 7,
              base: str = "bare", spread: str | None = "patched", before: Callable | None = None):
    """Round-robin timing: one call of each variant per round, in a shuffled order (what ran just
    before decides which weights are still in cache), so load and cache state hit all variants
    alike; ``before`` (untimed) runs ahead of every timed call. Returns (median seconds per call,
    median over rounds of time / time of ``base``, plus the interquartile range of ``spread``'s
    per-round ratios and the number of rounds)."""
    for fn in fns.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(0)
    start = time.perf_counter()
    while len(samples[base]) < min_rounds or time.perf_counter() - start < min_time_s:
        rng.shuffle(order)
        for name in order:
            fn = fns[name]
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    times = {k: statistics.median(v) for k, v in samples.items()}
    per_round = {k: [a / b for a, b in zip(v, samples[base])] for k, v in samples.items()}
    ratios = {k: statistics.median(v) for k, v in per_round.items()}
    if spread is not None:
        q = statistics.quantiles(per_round[spread], n=4)
        ratios[f"{spread}_iqr"] = (q[0], q[2])
    ratios["rounds"] = len(samples[base])
    return times, ratios


def _time_cuda(fns: dict[str, Callable]):
    from triton.testing import do_bench

    times = {k: do_bench(fn, warmup=25, rep=100) * 1e-3 for k, fn in fns.items()}
    return times, {k: t / times["bare"] for k, t in times.items()}


def measure(shape: str, n_tokens: int, device: str, min_time_s: float = 2.0):
    """(seconds per call, ratio to bare) of each variant, and the variants' relative disagreement."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    fns = variant_fns(make_case(shape, n_tokens, device, dtype))
    disagreement = check_agreement(fns)
    if device == "cuda":
        times, ratios = _time_cuda(fns)
        return times, ratios, disagreement
    # The Linear variants in rounds of their own, so that every call follows a big matmul (as in
    # a model); then the two add-on terms alone, each timed right after an untimed bare Linear
    # (caches as after the matmul, without its noise), in a shorter second loop.
    times, ratios = _time_cpu({k: fns[k] for k in VARIANTS}, min_time_s=min_time_s)
    terms, _ = _time_cpu({k: fns[k] for k in ("edit", "peft_term")}, min_time_s=min_time_s / 4,
                         base="edit", spread=None, before=fns["bare"])
    return {**times, **terms}, ratios, disagreement


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


def _verdict(ratios: dict, times: dict) -> str:
    """The target of issue 2: patched <= 1.05x bare, and below PEFT. Below PEFT by the ratios of
    the run, or (where the matmul's noise swamps both add-ons, e.g. the 8B shape) by the two
    add-on terms timed alone."""
    if ratios["patched"] > TARGET:
        return f"MISSED (> {TARGET})"
    if ratios["patched"] < ratios["peft"]:
        return "met"
    if times["edit"] < times["peft_term"]:
        return "met (< PEFT by the terms alone)"
    return "MISSED (not below PEFT)"


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
    parser.add_argument("--min-time", type=float, default=2.0,
                        help="CPU: seconds of interleaved rounds per point (at least 7 rounds)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.device == "cpu":
        where = f"CPU, {torch.get_num_threads()} threads, fp32"
    else:
        where = f"{torch.cuda.get_device_name()}, bf16, triton.testing.do_bench"
    print(f"# patched Linear (side out): {where}; time per call, ratio to the bare Linear of the "
          f"same round (median; patched: [interquartile range of the per-round ratios])")
    head = (f"| shape | tokens | {' | '.join(VARIANTS)} | " + " | ".join(f"{v}/bare" for v in VARIANTS[1:])
            + " | edit alone / PEFT term alone | max rel diff | target |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for shape in args.shapes:
        for n in args.tokens:
            times, ratios, diff = measure(shape, n, args.device, min_time_s=args.min_time)
            cells = [f"{times[v] * 1e6:,.0f} µs" for v in VARIANTS]
            ratio_cells = [f"{ratios[v]:.3f}" for v in VARIANTS[1:]]
            if "patched_iqr" in ratios:
                lo, hi = ratios["patched_iqr"]
                ratio_cells[0] += f" [{lo:.3f}–{hi:.3f}]"
            apply = f"{times['edit'] * 1e6:,.0f} / {times['peft_term'] * 1e6:,.0f} µs"
            print(f"| {shape} | {n} | {' | '.join(cells)} | {' | '.join(ratio_cells)} | {apply} | {diff:.1e} "
                  f"| {_verdict(ratios, times)} |", flush=True)
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

    @pytest.mark.parametrize("variant", VARIANTS + ("edit", "peft_term"))
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
