"""Load test of ``edit-runtime serve`` on loopback: N concurrent streaming clients x M requests.

Starts the server in-process (uvicorn in a thread on a free 127.0.0.1 port, the real
SmolLM2-135M by default) with one delta (``--delta PATH``, else a random edit of a realistic
size: the middle layer's ``up_proj``, |S| 256, rank 16). Then, for ``--rounds`` rounds, runs
each phase in a shuffled order:

- ``unpatched``: a second server on an unpatched copy of the model (no delta at all);
- ``off``: the patched server, every request for the base model (row mask 0);
- ``on``: the patched server, every request for ``<base>+edit`` (row mask 1);
- ``mixed``: the patched server, alternating edited / unedited requests in the same batches.

Each phase: ``--clients`` concurrent clients, each sending ``--requests`` streaming chat
requests one after the other (greedy, ``--max-tokens`` tokens; EOS is ignored server-side so
that every request does the same amount of work and phases compare, as ``ignore_eos`` does in
other engines' benchmarks; ``--respect-eos`` turns that off). Reported per phase: errors,
tokens/s (completion tokens / phase wall time), p50/p95 request latency, p50/p95 time to first
token, mean decode batch size. Ratios are per round, against ``off`` of the same round, median
over rounds. Bounded: at most rounds x phases x clients x requests requests, and new requests
stop after ``--time-limit`` seconds (the table says so). Exit status 1 if any request failed.

    python bench/load_test.py [--clients 16] [--requests 2] [--max-tokens 32] [--rounds 2]
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import json
import logging
import random
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from edit_runtime import ModuleEdit, SparseDelta
from edit_runtime.arch import find_decoder_layers, find_mlp
from edit_runtime.data import load_prompts
from edit_runtime.models import load_model
from edit_runtime.serve.app import create_app
from edit_runtime.serve.engine import EngineConfig, ServingEngine

log = logging.getLogger("load_test")
PHASES = ("unpatched", "off", "on", "mixed")


def random_delta(model: torch.nn.Module, n_neurons: int = 256, rank: int = 16, seed: int = 0) -> SparseDelta:
    """A random side-"out" edit of the middle layer's ``up_proj`` (the shape of a fitted edit)."""
    g = torch.Generator().manual_seed(seed)
    layer = len(find_decoder_layers(model)[1]) // 2
    info = find_mlp(model, layer)
    path, side, offset = info.target("up")
    n = min(n_neurons, info.d_ff)
    S = torch.randperm(info.d_ff, generator=g)[:n].sort().values + offset
    U = 0.05 * torch.randn(n, rank, generator=g)
    V = 0.05 * torch.randn(rank, info.d_model, generator=g)
    return SparseDelta([ModuleEdit(path, side, S, U, V)], {"method": "random-load-test", "layer": layer})


class LiveServer:
    """uvicorn serving ``create_app(engine)`` on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, engine: ServingEngine):
        import uvicorn

        self.engine = engine.start()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.engine.shutdown()
        self.sock.close()


@dataclass
class Result:
    ok: bool
    latency: float
    ttft: float | None
    tokens: int
    error: str = ""


@dataclass
class PhaseStats:
    phase: str
    round: int
    wall: float
    results: list[Result] = field(default_factory=list)
    mean_batch: float | None = None
    cut_short: bool = False

    @property
    def errors(self) -> int:
        return sum(not r.ok for r in self.results)

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.results if r.ok)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall if self.wall > 0 else 0.0


async def one_request(client, url: str, model: str, prompt: str, max_tokens: int) -> Result:
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return Result(False, time.perf_counter() - t0, None, 0, f"HTTP {r.status_code}: {await r.aread()!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    return Result(False, time.perf_counter() - t0, ttft, 0, str(obj["error"]))
                if obj.get("usage"):
                    tokens = obj["usage"]["completion_tokens"]
                if ttft is None and any(c["delta"].get("content") for c in obj["choices"]):
                    ttft = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - counted as an error and reported
        return Result(False, time.perf_counter() - t0, ttft, 0, f"{type(exc).__name__}: {exc}")
    return Result(True, time.perf_counter() - t0, ttft, tokens)


async def run_phase(url: str, models: list[str], prompts: list[str], clients: int, requests: int,
                    max_tokens: int, deadline: float) -> tuple[list[Result], float, bool]:
    """``clients`` concurrent loops of ``requests`` sequential requests; model i of client c is
    ``models[(c + i) % len(models)]`` (so 'mixed' alternates within every batch)."""
    import httpx

    cut = False
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def loop(c: int) -> list[Result]:
            nonlocal cut
            out = []
            for i in range(requests):
                if time.monotonic() > deadline:
                    cut = True
                    break
                prompt = prompts[(c * requests + i) % len(prompts)]
                out.append(await one_request(client, url, models[(c + i) % len(models)], prompt, max_tokens))
            return out

        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(loop(c) for c in range(clients)))
        wall = time.perf_counter() - t0
    return [r for rs in per_client for r in rs], wall, cut


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def fmt_ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 1000:,.0f} ms"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--delta", default=None, help="delta file (default: a random edit, |S| 256, r 16)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (N)")
    ap.add_argument("--requests", type=int, default=2, help="sequential requests per client and phase (M)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of all phases, shuffled order per round")
    ap.add_argument("--phases", default=",".join(PHASES), help=f"subset of {','.join(PHASES)}")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: the clients and the event loop need the other core)")
    ap.add_argument("--time-limit", type=float, default=300.0, help="no new requests after this many seconds")
    ap.add_argument("--respect-eos", action="store_true", help="let EOS end requests (phases then do unequal work)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    bad = sorted(set(phases) - set(PHASES))
    if bad or args.clients < 1 or args.requests < 1 or args.max_tokens < 1 or args.rounds < 1:
        ap.error(f"bad arguments (unknown phases {bad})" if bad else "counts must be >= 1")
    if args.clients < 16:
        print(f"note: {args.clients} clients (the issue's load test asks for at least 16)")

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    delta = SparseDelta.load(args.delta) if args.delta else random_delta(model, seed=args.seed)
    texts = [p.text for p in load_prompts("builtin:harmless", langs=["en", "zh", "sw", "fr"])]
    random.Random(args.seed).shuffle(texts)
    cfg = EngineConfig(max_batch_size=args.max_batch_size, max_queue=max(64, 2 * args.clients),
                       max_model_len=1024, max_tokens_limit=max(args.max_tokens, 16),
                       check_fingerprint=bool(args.delta))
    servers: dict[str, LiveServer] = {}
    base = "base"
    try:
        if "unpatched" in phases:
            servers["unpatched"] = LiveServer(ServingEngine(copy.deepcopy(model), tok, {}, config=cfg,
                                                            served_name=base))
        servers["patched"] = LiveServer(ServingEngine(model, tok, {"edit": delta}, config=cfg, served_name=base))
        for s in servers.values():
            if not args.respect_eos:
                s.engine.eos_ids = frozenset()
        route = {"unpatched": ("unpatched", [base]), "off": ("patched", [base]),
                 "on": ("patched", [f"{base}+edit"]), "mixed": ("patched", [f"{base}+edit", base])}
        # warm-up: one short request per server, not measured
        for name, s in servers.items():
            asyncio.run(run_phase(s.url, route["off"][1], texts, 2, 1, 4, float("inf")))
        deadline = time.monotonic() + args.time_limit
        rng = random.Random(args.seed)
        stats: list[PhaseStats] = []
        t_start = time.perf_counter()
        for rnd in range(args.rounds):
            if time.monotonic() > deadline:
                break  # a round started past the deadline would send nothing
            order = phases[:]
            rng.shuffle(order)
            for phase in order:
                server = servers[route[phase][0]]
                before = server.engine.stats()["batch_size"]
                results, wall, cut = asyncio.run(run_phase(server.url, route[phase][1], texts, args.clients,
                                                           args.requests, args.max_tokens, deadline))
                after = server.engine.stats()["batch_size"]
                steps = after["count"] - before["count"]
                mean_batch = (after["sum"] - before["sum"]) / steps if steps else None
                stats.append(PhaseStats(phase, rnd, wall, results, mean_batch, cut))
                print(f"round {rnd} {phase:9s}: {len(results)} requests, {stats[-1].errors} errors, "
                      f"{stats[-1].tokens_per_s:,.1f} tok/s in {wall:.1f} s", flush=True)
        total = time.perf_counter() - t_start
    finally:
        for s in servers.values():
            s.close()

    print_table(stats, args, total)
    errors = sum(s.errors for s in stats)
    for s in stats:
        for r in s.results:
            if not r.ok:
                print(f"error ({s.phase}): {r.error}")
                break
    return 1 if errors else 0


def print_table(stats: list[PhaseStats], args: argparse.Namespace, total: float) -> None:
    print()
    print(f"Load test: {args.model}, {args.clients} clients x {args.requests} requests per phase, "
          f"{args.max_tokens} tokens each (EOS {'respected' if args.respect_eos else 'ignored'}), "
          f"{args.rounds} round(s), max batch {args.max_batch_size}, {args.threads} torch thread(s); "
          f"{total:.0f} s in all{' (cut short by --time-limit)' if any(s.cut_short for s in stats) else ''}")
    print()
    # a phase cut short by --time-limit ran a lighter load (fewer clients at the end): its requests
    # count for errors and latencies, but only complete phases count for throughput
    complete = [s for s in stats if not s.cut_short]
    dropped = len(stats) - len(complete)
    if dropped:
        print(f"({dropped} phase(s) cut short by --time-limit: left out of tokens/s and the ratios)")
        print()
    print("| phase | requests | errors | tokens/s | latency p50 | latency p95 | TTFT p50 | TTFT p95 | mean batch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for phase in PHASES:
        runs = [s for s in stats if s.phase == phase]
        if not runs:
            continue
        ok = [r for s in runs for r in s.results if r.ok]
        lat = [r.latency for r in ok]
        ttft = [r.ttft for r in ok if r.ttft is not None]
        full = [s.tokens_per_s for s in complete if s.phase == phase]
        tps = f"{statistics.median(full):,.1f}" if full else "n/a"
        batches = [s.mean_batch for s in runs if s.mean_batch is not None]
        batch = f"{statistics.mean(batches):.1f}" if batches else "n/a"
        print(f"| {phase} | {sum(len(s.results) for s in runs)} | {sum(s.errors for s in runs)} | {tps} | "
              f"{fmt_ms(pct(lat, .5))} | {fmt_ms(pct(lat, .95))} | {fmt_ms(pct(ttft, .5))} | "
              f"{fmt_ms(pct(ttft, .95))} | {batch} |")
    print()
    off = {s.round: s.tokens_per_s for s in complete if s.phase == "off"}
    for phase, label in (("on", "edit on / off"), ("mixed", "mixed / off"), ("unpatched", "unpatched / off")):
        ratios = [s.tokens_per_s / off[s.round] for s in complete if s.phase == phase and off.get(s.round)]
        if ratios:
            per = ", ".join(f"{r:.3f}" for r in ratios)
            print(f"throughput {label}: {statistics.median(ratios):.3f} (median over {len(ratios)} "
                  f"round(s); per round: {per})")


if __name__ == "__main__":
    sys.exit(main())
