"""Capture overhead: streamed statistics vs a plain batched forward over the same batches.

Every row runs over the same prompts (the built-in parallel set: 8 languages x harmful/harmless),
rendered with the chat template, batched the same way (per group, sorted by length, padded
``--padding-side``). One process, one model, each configuration timed ``--repeats`` times after
a warm-up (median reported), so the ratios come from one run:

- ``plain``            ``model(...)`` per batch, logits included: what a capture replaces;
- ``capture-all``      :func:`collect_neuron_stats` on every layer, neuron statistics only, no
                       early stop (the work of ``plain`` plus hooks and statistics: the hooks'
                       overhead, target <= 10 %);
- ``capture-all-cov``  the same plus ``XᵀX`` per group on every layer (float64, exported to the
                       host: a fixed cost of G * L * d_model² * 8 bytes);
- ``capture-all-es``   every layer's neuron statistics, ``XᵀX`` on the middle third, early stop
                       (the LM head is skipped): a typical pass 1;
- ``capture-mid-es``   one middle layer with ``XᵀX``, early stop;
- ``pass2-mid``        :func:`collect_target_stats` at the middle layer, |S| = 64, harmful prompts
                       of all languages against English, vs ``plain`` on those prompts.

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


def timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up: kernels, Triton compilation, allocator
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def plain_forward(model, tok, groups, *, batch_size: int, side: str) -> None:
    """The baseline: the same encoding, batching and padding as the capture, no hooks."""
    device = capture._input_device(model)
    pad = capture._pad_id(tok)
    for texts in groups.values():
        seqs = capture.encode_prompts(tok, texts)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        for idx in capture._batches(len(order), batch_size):
            b = capture._make_batch([seqs[order[i]] for i in idx], pad_id=pad, side=side,
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
    ap.add_argument("--rows", default="capture-all,capture-all-cov,capture-all-es,capture-mid-es,pass2-mid")
    args = ap.parse_args(argv)
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))

    model, tok = load(args)
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
    kw = dict(batch_size=args.batch_size, padding_side=args.padding_side, progress=False)
    S = {mid: torch.randperm(model.config.intermediate_size, generator=torch.Generator().manual_seed(0))[:64]}

    t_fp = timed(lambda: capture.model_fingerprint(model), args.device, 1)
    rows = []
    wanted = args.rows.split(",")
    base = timed(lambda: plain_forward(model, tok, groups, batch_size=args.batch_size,
                                       side=args.padding_side), args.device, args.repeats)
    rows.append(("plain", "forward with logits, all prompts", base, base))
    third = list(range(n_layers // 3, 2 * n_layers // 3))
    if "capture-all" in wanted:
        t = timed(lambda: capture.collect_neuron_stats(model, tok, groups, range(n_layers), cov=False,
                                                       early_stop=False, **kw), args.device, args.repeats)
        rows.append(("capture-all", f"{n_layers} layers, no XᵀX, no early stop", t, base))
    if "capture-all-cov" in wanted:
        t = timed(lambda: capture.collect_neuron_stats(model, tok, groups, range(n_layers),
                                                       early_stop=False, **kw), args.device, args.repeats)
        rows.append(("capture-all-cov", f"{n_layers} layers, XᵀX all layers, no early stop", t, base))
    if "capture-all-es" in wanted:
        t = timed(lambda: capture.collect_neuron_stats(model, tok, groups, range(n_layers), cov=third,
                                                       **kw), args.device, args.repeats)
        rows.append(("capture-all-es", f"{n_layers} layers, XᵀX layers {third[0]}-{third[-1]}, early stop",
                     t, base))
    if "capture-mid-es" in wanted:
        t = timed(lambda: capture.collect_neuron_stats(model, tok, groups, [mid], **kw),
                  args.device, args.repeats)
        rows.append(("capture-mid-es", f"layer {mid}, XᵀX, early stop", t, base))
    if "pass2-mid" in wanted:
        base_h = timed(lambda: plain_forward(model, tok, harmful_groups, batch_size=args.batch_size,
                                             side=args.padding_side), args.device, args.repeats)
        rows.append(("plain-harmful", "forward with logits, harmful prompts", base_h, base_h))
        t = timed(lambda: capture.collect_target_stats(model, tok, harmful, S, proj="both", **kw),
                  args.device, args.repeats)
        rows.append(("pass2-mid", f"layer {mid}, |S|=64, up+gate, {len(harmful)} langs vs en",
                     t, base_h))

    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU x{torch.get_num_threads()} threads"
    print(f"\nmodel {args.model} ({type(model).__name__}, {n_layers} layers, d_model "
          f"{model.config.hidden_size}, d_ff {model.config.intermediate_size}, {args.dtype}"
          f"{', random init' if args.random_init else ''}) on {dev}")
    print(f"{n_prompts} prompts in {len(groups)} groups, {n_tokens} tokens, batch {args.batch_size}, "
          f"{args.padding_side} padding, median of {args.repeats}; fingerprint {t_fp * 1e3:.0f} ms "
          "(inside each capture row)\n")
    print(f"| {'row':<15} | {'what':<46} | {'seconds':>8} | {'vs plain':>9} |")
    print(f"|{'-' * 17}|{'-' * 48}|{'-' * 9}:|{'-' * 10}:|")
    for name, what, t, ref in rows:
        print(f"| {name:<15} | {what:<46} | {t:8.3f} | {t / ref:8.3f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
