"""Decode-step latency of a real model: unpatched vs patched (runtime path) vs merged.

``unpatched`` has no patch installed at all (not a patch switched off).

One decode step = one token through the whole model with a KV cache of ``--context`` tokens, the
step a server repeats. The delta is random (seeded) on ``up_proj`` of ``--layers`` (|S| and r as
given), the shape a fitted safety edit has. Variants run in interleaved rounds in a shuffled
order, so machine load and cache state hit them alike; ratios are the median over rounds of the
variant's time over the unpatched time of the same round.

    python bench/bench_decode.py [--model qwen2.5-coder-0.5b-instruct] [--layers 20] [--rounds 30]
"""
from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import torch

from edit_runtime import ModuleEdit, SparseDelta, patch_model
from edit_runtime.arch import find_mlp
from edit_runtime.models import load_model


def random_delta(model: torch.nn.Module, layers: list[int], n_neurons: int, rank: int,
                 seed: int = 0) -> SparseDelta:
    """A random side-"out" edit of ``up_proj`` on ``n_neurons`` neurons of each layer."""
    g = torch.Generator().manual_seed(seed)
    edits = []
    for layer in layers:
        info = find_mlp(model, layer)
        path, side, offset = info.target("up")
        S = torch.randperm(info.d_ff, generator=g)[:n_neurons].sort().values + offset
        scale = 0.02
        edits.append(ModuleEdit(path, side, S, scale * torch.randn(n_neurons, rank, generator=g),
                                scale * torch.randn(rank, info.d_model, generator=g)))
    return SparseDelta(edits, {"method": "random-bench"})


@torch.no_grad()
def decode_step_fn(model, context: int, batch: int):
    """A closure running one decode step on a fresh copy of a prefilled KV cache."""
    ids = torch.randint(100, 1000, (batch, context), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, use_cache=True)
    cache = out.past_key_values
    nxt = out.logits[:, -1:].argmax(-1)

    def step():
        c = copy.deepcopy(cache)
        with torch.no_grad():
            return model(input_ids=nxt, past_key_values=c, use_cache=True).logits

    return step


def measure(model, delta: SparseDelta, *, context: int, batch: int, rounds: int) -> dict:
    """Median decode-step times of the variants, interleaved round by round.

    ``unpatched`` is the model with no patch at all (the handle removed, outputs bit-identical to
    the original); ``off`` is patched with the edit switched off; ``merged`` folds the edit into
    the weights (undone exactly after the step). Patching, removing, switching and merging all
    happen outside the timed region.
    """
    step = decode_step_fn(model, context, batch)
    state: dict = {"handle": None}

    def set_mode(mode: str) -> None:
        handle = state["handle"]
        if mode == "unpatched":
            if handle is not None:
                handle.remove()
                state["handle"] = None
            return
        if handle is None:
            handle = state["handle"] = patch_model(model, delta)
        handle.set_enabled(mode != "off")
        if mode == "merged":
            handle.merge()

    def run(mode: str) -> float:
        set_mode(mode)
        t0 = time.perf_counter()
        step()
        elapsed = time.perf_counter() - t0
        if mode == "merged":
            state["handle"].unmerge()
        return elapsed

    samples: dict[str, list[float]] = {"unpatched": [], "patched": [], "off": [], "merged": []}
    order = list(samples)
    rng = random.Random(0)
    for mode in order:
        run(mode)  # warm-up
    for _ in range(rounds):
        rng.shuffle(order)
        for mode in order:
            samples[mode].append(run(mode))
    set_mode("unpatched")
    logits_base = step()
    set_mode("patched")
    logits_patched = step()
    state["handle"].merge()
    logits_merged = step()
    state["handle"].unmerge()
    set_mode("unpatched")
    med = {k: statistics.median(v) for k, v in samples.items()}
    ratio = {k: statistics.median(a / b for a, b in zip(v, samples["unpatched"])) for k, v in samples.items()}
    return {
        "unpatched_ms": med["unpatched"] * 1e3,
        "patched_ms": med["patched"] * 1e3,
        "off_ms": med["off"] * 1e3,
        "merged_ms": med["merged"] * 1e3,
        "patched_ratio": ratio["patched"],
        "off_ratio": ratio["off"],
        "merged_ratio": ratio["merged"],
        "max_abs_diff_merged_vs_patched": float((logits_merged - logits_patched).abs().max()),
        "max_abs_diff_patched_vs_base": float((logits_patched - logits_base).abs().max()),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--layers", type=int, nargs="+", default=[20])
    p.add_argument("--neurons", type=int, default=300)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    delta = random_delta(model, args.layers, args.neurons, args.rank)
    r = measure(model, delta, context=args.context, batch=args.batch, rounds=args.rounds)
    print(f"# decode step, {args.model}, CPU {torch.get_num_threads()} threads, fp32, batch {args.batch}, "
          f"context {args.context}, edit: up_proj layers {args.layers}, |S| {args.neurons}, r {args.rank}; "
          f"median of {args.rounds} interleaved rounds")
    print("| unpatched | patched | patched, edit off | merged | patched/unpatched | off/unpatched "
          "| merged/unpatched |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {r['unpatched_ms']:.1f} ms | {r['patched_ms']:.1f} ms | {r['off_ms']:.1f} ms | "
          f"{r['merged_ms']:.1f} ms | {r['patched_ratio']:.3f} | {r['off_ratio']:.3f} | {r['merged_ratio']:.3f} |")
    print(f"\nthe edit changes the logits by up to {r['max_abs_diff_patched_vs_base']:.2e}; merged vs patched "
          f"differ by {r['max_abs_diff_merged_vs_patched']:.2e}")
    return r


if __name__ == "__main__":
    main()
