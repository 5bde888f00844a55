"""Capture overhead: streamed statistics vs a plain batched forward over the same batches.

Every row runs over the same prompts (the built-in parallel set: 8 languages x harmful/harmless),
rendered with the chat template, batched the same way (all groups pooled, sorted by length, padded
``--padding-side``). One process, one model, each configuration timed ``--repeats`` times after
a warm-up (median reported), so the ratios come from one run:

- ``plain``            ``model(...)`` per batch, logits included: what a capture replaces (its
                       MLP weights oneDNN-packed as in a capture, on CPU fp32: same GEMMs);
- ``plain-eager``      the same without packing (PyTorch's eager ``F.linear``): what packing saves;
- ``capture-all``      :func:`collect_neuron_stats` on every layer, neuron statistics only, no
                       early stop (the work of ``plain`` plus hooks and statistics: the hooks'
                       overhead, target <= 10 %);
- ``capture-all-cov``  the same plus ``XᵀX`` per group on every layer (float64, exported to the
                       host: a fixed cost of G * L * d_model² * 8 bytes);
- ``capture-all-es``   every layer's neuron statistics, ``XᵀX`` on the middle third, early stop
                       (the LM head is skipped): a typical pass 1;
- ``capture-mid-es``   one middle layer with ``XᵀX``, early stop (its MLP on the last tokens only);
- ``capture-mid-prefix`` the same with the chat template's shared prefix forwarded once (KV
                       reused): fewer tokens, not a hook overhead;
- ``pass2-mid``        :func:`collect_target_stats` at the middle layer, |S| = 64, harmful prompts
                       of all languages against English, vs ``plain`` on those prompts;
- ``single-mid``       :func:`collect_parallel_stats` on the same prompts: pass-1 statistics of
                       every language plus the full ``XᵀY`` (all neurons), vs the same ``plain``.

The hook-overhead rows run with ``prefix_reuse=False`` so that they forward exactly the tokens of
``plain`` (same length-sorted batches).

``--fit-breakdown`` instead reports the MultiJail fit (train split, ``--harmful-langs``, the
built-in harmless prompts): prompts and tokens per language (chat template included), the
shared prefix, the tokens the full fit forwards under the old scheme (two passes, pass 2 in id
order, no prefix reuse) and the new one, and the measured time split of the fit on the first
``--fit-limit`` ids for two passes vs the single pass, with the projection to the full split::

    python bench/bench_capture.py --fit-breakdown --threads 2 --fit-limit 12

``--model`` is a short name (:data:`edit_runtime.models.KNOWN_MODELS`) or a folder; with
``--random-init`` only the folder's config and tokenizer are read and the weights are random
(same shapes, same cost: used on machines the real weights cannot reach).

    python bench/bench_capture.py --model smollm2-135m-instruct --n-per-group 8
    python bench/bench_capture.py --model qwen2.5-coder-0.5b-instruct --device cuda --dtype bfloat16
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edit_runtime import capture  # noqa: E402
from edit_runtime.arch import find_decoder_layers  # noqa: E402
from edit_runtime.data import load_prompts  # noqa: E402
from edit_runtime.packed_linear import packed_linears, packing_enabled  # noqa: E402


def load(args):
    if args.random_init:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from edit_runtime.models import resolve_model

        src = resolve_model(args.model) if not Path(args.model).exists() else args.model
        cfg = AutoConfig.from_pretrained(src)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=args.dtype).to(args.device).eval()
        return model, AutoTokenizer.from_pretrained(src)
    from edit_runtime.models import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CLOCK = time.perf_counter  # --clock cpu: time.process_time (robust on a shared CPU machine)


def timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up: kernels, Triton compilation, allocator
    sync(device)
    times = []
    for _ in range(repeats):
        t = CLOCK()
        fn()
        sync(device)
        times.append(CLOCK() - t)
    return statistics.median(times)


def plain_forward(model, tok, groups, *, batch_size: int, side: str, packed: bool = True) -> None:
    """The baseline: the same encoding, batching and padding as the capture (the groups' prompts
    pooled and batched by length), no hooks. With ``packed`` the MLP projections run on the
    oneDNN-packed weights a capture uses (where the capture would pack them), so the hook rows
    compare the same GEMMs; ``packed=False`` is PyTorch's eager forward."""
    device = capture._input_device(model)
    pad = capture._pad_id(tok)
    seqs = [s for texts in groups.values() for s in capture.encode_prompts(tok, texts)]
    n_layers = len(find_decoder_layers(model)[1])
    with packed_linears(capture.mlp_linears(model, range(n_layers)), enabled=None if packed else False):
        for idx in capture._length_batches([len(s) for s in seqs], batch_size):
            b = capture._make_batch([seqs[i] for i in idx], pad_id=pad, side=side,
                                    device=device)
            with torch.no_grad():
                model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                      position_ids=b.position_ids, use_cache=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 "
                    "(default: bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--n-per-group", type=int, default=40, help="prompts per (lang, label)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--padding-side", default="left")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", default="plain-eager,capture-all,capture-all-cov,capture-all-es,"
                    "capture-mid-es,capture-mid-prefix,pass2-mid")
    ap.add_argument("--fit-breakdown", action="store_true",
                    help="instead of the rows: token counts and the time breakdown of the MultiJail fit "
                    "(two passes vs one pass + prefix reuse), projected to the full train split")
    ap.add_argument("--fit-limit", type=int, default=12, help="ids timed by --fit-breakdown")
    ap.add_argument("--fit-layer", type=int, default=20)
    ap.add_argument("--harmful-langs", default="zh,vi,ar,ko,th,bn,sw,jv")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: this process's CPU seconds (use with --threads 1 on a shared machine)")
    args = ap.parse_args(argv)
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = load(args)
    if args.fit_breakdown:
        return fit_breakdown(model, tok, args)
    n_layers = len(find_decoder_layers(model)[1])
    mid = n_layers // 2
    prompts = load_prompts("builtin")
    groups: dict = {}
    for p in prompts:
        g = groups.setdefault((p.lang, p.label), [])
        if len(g) < args.n_per_group:
            g.append(p.text)
    harmful = {lang: t for (lang, label), t in groups.items() if label == "harmful"}
    harmful_groups = {(lang, "harmful"): t for lang, t in harmful.items()}
    n_prompts = sum(len(v) for v in groups.values())
    n_tokens = sum(len(s) for v in groups.values() for s in capture.encode_prompts(tok, v))
    # the hook-overhead rows forward exactly the plain rows' tokens: no shared-prefix reuse
    kw = dict(batch_size=args.batch_size, padding_side=args.padding_side, progress=False,
              prefix_reuse=False)
    S = {mid: torch.randperm(model.config.intermediate_size, generator=torch.Generator().manual_seed(0))[:64]}

    t_fp = timed(lambda: capture._model_fingerprint(model), args.device, 1)  # unmemoised
    rows = []

    def add_row(row: tuple) -> None:
        rows.append(row)  # the table prints at the end; a long run shows each row as it lands
        print(f"[{row[0]}] {row[2]:.3f} s ({row[2] / row[3]:.3f}x plain)", file=sys.stderr, flush=True)

    wanted = args.rows.split(",")
    base = timed(lambda: plain_forward(model, tok, groups, batch_size=args.batch_size,
                                       side=args.padding_side), args.device, args.repeats)
    add_row(("plain", "forward with logits, all prompts", base, base))
    if "plain-eager" in wanted:
        t = timed(lambda: plain_forward(model, tok, groups, batch_size=args.batch_size,
                                        side=args.padding_side, packed=False), args.device, args.repeats)
        add_row(("plain-eager", "the same, MLP weights not packed (eager F.linear)", t, base))
    third = list(range(n_layers // 3, 2 * n_layers // 3))
    if "capture-all" in wanted:
        t = timed(lambda: capture.collect_neuron_stats(model, tok, groups, range(n_layers), cov=False,
                                                       early_stop=False, **kw), args.device, args.repeats)
        add_row(("capture-all", f"{n_layers} layers, no XᵀX, no early stop", t, base))
    if "capture-all-cov" in wanted:
        t = timed(lambda: capture.collect_neuron_stats(model, tok, groups, range(n_layers),
                                                       early_stop=False, **kw), args.device, args.repeats)
        add_row(("capture-all-cov", f"{n_layers} layers, XᵀX all layers, no early stop", t, base))
    if "capture-all-es" in wanted:
        t = timed(lambda: capture.collect_neuron_stats(model, tok, groups, range(n_layers), cov=third,
                                                       **kw), args.device, args.repeats)
        add_row(("capture-all-es", f"{n_layers} layers, XᵀX layers {third[0]}-{third[-1]}, early stop",
                     t, base))
    if "capture-mid-es" in wanted:
        t = timed(lambda: capture.collect_neuron_stats(model, tok, groups, [mid], **kw),
                  args.device, args.repeats)
        add_row(("capture-mid-es", f"layer {mid}, XᵀX, early stop", t, base))
    if "capture-mid-prefix" in wanted:
        t = timed(lambda: capture.collect_neuron_stats(model, tok, groups, [mid],
                                                       **dict(kw, prefix_reuse=True)),
                  args.device, args.repeats)
        add_row(("capture-mid-prefix", f"layer {mid}, XᵀX, early stop, prefix KV reused", t, base))
    if "pass2-mid" in wanted:
        base_h = timed(lambda: plain_forward(model, tok, harmful_groups, batch_size=args.batch_size,
                                             side=args.padding_side), args.device, args.repeats)
        add_row(("plain-harmful", "forward with logits, harmful prompts", base_h, base_h))
        t = timed(lambda: capture.collect_target_stats(model, tok, harmful, S, proj="both", **kw),
                  args.device, args.repeats)
        add_row(("pass2-mid", f"layer {mid}, |S|=64, up+gate, {len(harmful)} langs vs en",
                     t, base_h))
        t = timed(lambda: capture.collect_parallel_stats(model, tok, harmful, [mid], proj="both",
                                                         **kw), args.device, args.repeats)
        add_row(("single-mid", f"layer {mid}, pass-1 stats + full XᵀY (all {model.config.intermediate_size})",
                     t, base_h))

    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU x{torch.get_num_threads()} threads"
    print(f"\nmodel {args.model} ({type(model).__name__}, {n_layers} layers, d_model "
          f"{model.config.hidden_size}, d_ff {model.config.intermediate_size}, {args.dtype}"
          f"{', random init' if args.random_init else ''}) on {dev}")
    print(f"MLP weights packed for oneDNN: {'yes' if packing_enabled() else 'no'} "
          "(EDIT_RUNTIME_PACKED_LINEAR; CPU fp32 only)")
    print(f"{n_prompts} prompts in {len(groups)} groups, {n_tokens} tokens, batch {args.batch_size}, "
          f"{args.padding_side} padding, median of {args.repeats} ({args.clock} clock); fingerprint "
          f"{t_fp * 1e3:.0f} ms (memoised after the first row)\n")
    print(f"| {'row':<15} | {'what':<46} | {'seconds':>8} | {'vs plain':>9} |")
    print(f"|{'-' * 17}|{'-' * 48}|{'-' * 9}:|{'-' * 10}:|")
    for name, what, t, ref in rows:
        print(f"| {name:<15} | {what:<46} | {t:8.3f} | {t / ref:8.3f}x |")
    return 0


# ------------------------------------------------------------------------------ fit breakdown

def _padded(lengths, batches) -> int:
    return sum(max(lengths[i] for i in b) * len(b) for b in batches)


def fit_breakdown(model, tok, args) -> int:
    """Token counts of the MultiJail fit and its time split, two passes vs the single pass."""
    import logging

    from edit_runtime.cli import _load_split
    from edit_runtime.fit import FitConfig, fit

    logging.getLogger("edit_runtime").setLevel(logging.WARNING)
    low = [x for x in args.harmful_langs.split(",") if x]
    split = lambda src, langs, limit, label: _load_split(src, langs, "train", limit, label)  # noqa: E731
    harm = split("multijail", ["en", *low], None, "harmful")
    safe = split("builtin:harmless", None, None, "harmless")
    bs = args.batch_size if args.batch_size != 32 else 8  # the fit's default batch
    par = capture.align_parallel(harm, anchor_lang="en")
    seqs = {lang: capture.encode_prompts(tok, [p.text for p in v if p]) for lang, v in par.items()}
    enc = {lang: [len(s) for s in v] for lang, v in seqs.items()}
    enc_safe: dict = {}
    for p in safe:
        enc_safe.setdefault(p.lang, []).append(p.text)
    enc_safe = {lang: [len(s) for s in capture.encode_prompts(tok, v)] for lang, v in enc_safe.items()}
    P = capture._shared_prefix_len([s for v in seqs.values() for s in v])
    print(f"\nMultiJail train split: {len(par['en'])} ids x {len(par)} languages = "
          f"{sum(map(len, enc.values()))} harmful prompts; {sum(map(len, enc_safe.values()))} harmless "
          f"prompts ({len(enc_safe)} languages); shared chat-template prefix {P} tokens\n")
    print("| prompts | language | n | mean tokens | max | tokens | after the prefix |")
    print("|---|---|---|---|---|---|---|")
    real = 0
    for kind, table in (("harmful", enc), ("harmless", enc_safe)):
        for lang, L in table.items():
            real += sum(L)
            print(f"| {kind} | {lang} | {len(L)} | {sum(L) / len(L):.1f} | {max(L)} | {sum(L)} | "
                  f"{sum(L) - P * len(L)} |")
    n_prompts = sum(map(len, enc.values())) + sum(map(len, enc_safe.values()))
    # forwarded tokens (padding included) of the full fit under each scheme
    sorted_b = lambda L: capture._batches(len(L), bs)  # noqa: E731
    old_p1 = sum(_padded(sorted(L, reverse=True), sorted_b(L)) for L in [enc["en"], *enc_safe.values()])
    n = len(enc["en"])
    old_p2 = sum(max(L[i:i + bs]) * len(L[i:i + bs]) for L in enc.values() for i in range(0, n, bs))
    cut = lambda L: [x - P for x in L]  # noqa: E731
    lb = lambda L: _padded(L, capture._length_batches(L, bs))  # noqa: E731
    new = (sum(lb(cut(L)) for L in enc_safe.values()) + lb(cut(enc["en"]))
           + lb([x for lang, L in enc.items() if lang != "en" for x in cut(L)]) + 2 * P)
    print(f"\nreal tokens {real}; forwarded by the full fit: two passes as before (pass 1 + pass 2 in "
          f"id order, no prefix reuse) {old_p1 + old_p2} (pass 1 {old_p1}, pass 2 {old_p2}); single pass + "
          f"prefix reuse + length batching {new}\n")

    # timed on the first --fit-limit ids (the same subset for both schemes, one process)
    sub = split("multijail", ["en", *low], args.fit_limit, "harmful")
    sub_safe = split("builtin:harmless", None, args.fit_limit, "harmless")
    counted = {"tokens": 0}

    def count(module, a, kw):
        counted["tokens"] += kw["input_ids"].numel() if "input_ids" in kw else a[0].numel()

    h = model.register_forward_pre_hook(count, with_kwargs=True)
    capture.model_fingerprint(model)  # memoised: not part of either row
    rows = []
    try:
        for name, cfg in (("two passes, no prefix reuse", dict(one_pass=False, prefix_reuse=False)),
                          ("single pass + prefix reuse", {})):
            counted["tokens"] = 0
            c, w = time.process_time(), time.perf_counter()
            res = fit(model, tok, sub, sub_safe, FitConfig(layers=[args.fit_layer], low_langs=low, rank=16,
                                                        batch_size=bs, **cfg), progress=False)
            rows.append((name, time.perf_counter() - w, time.process_time() - c, counted["tokens"],
                         res.seconds, int(res.neurons[args.fit_layer].numel())))
    finally:
        h.remove()
    print(f"timed: {args.fit_limit} ids ({len(sub)} harmful + {len(sub_safe)} harmless prompts), layer "
          f"{args.fit_layer}, {torch.get_num_threads()} threads\n")
    print("| scheme | wall s | CPU s | tokens | tokens / wall s | tokens / CPU s | pass 1 | pass 2 | "
          "solve | |S| |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, w, c, t, sec, m in rows:
        print(f"| {name} | {w:.1f} | {c:.1f} | {t} | {t / w:.0f} | {t / c:.0f} | "
              f"{sec['pass1_neurons']:.1f} | {sec['pass2_targets']:.1f} | {sec['solve']:.2f} | {m} |")
    (_, w_old, c_old, t_old, _, _), (_, w_new, c_new, t_new, _, _) = rows
    print(f"\nprojected full fit ({n_prompts} prompts; forwarded tokens / measured throughput; model "
          f"load, fingerprint and solve excluded): single pass {new / (t_new / w_new):.0f} wall s "
          f"({new / (t_new / c_new):.0f} CPU s); two passes as before "
          f"{(old_p1 + old_p2) / (t_old / w_old):.0f} wall s ({(old_p1 + old_p2) / (t_old / c_old):.0f} CPU s). "
          "On a busy machine use the CPU seconds of a 1-thread run: its wall time on k idle cores is "
          "about CPU s / (0.9 k).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
