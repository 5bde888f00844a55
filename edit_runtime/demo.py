"""The main job: fit a safety edit on the real Qwen model and show what it changes.

    python -m edit_runtime.demo [-o demo_out] [--method residual|swe] [--limit N] [--quick]

On the embedded default (Qwen2.5-Coder-0.5B-Instruct from its wheels, the team's own parallel
prompt set in ``edit_runtime/prompts``) it

1. fits a closed-form low-rank edit of layer 20 on the *train* split: by default the residual
   recipe (:mod:`edit_runtime.residual_fit`: the layer's ``down_proj``, the last-token residual
   of zh, vi, th and ar prompts mapped onto their English version's, harmless prompts mapped the
   same way, bn, sw and fr held in place); ``--method swe`` fits SWE's ``up_proj`` rows of the
   safety neurons instead (:mod:`edit_runtime.fit`),
2. fits a probe gate on layer 16 (:mod:`edit_runtime.gate`) that turns the edit on only for the
   prompts it is for, harmful prompts of the mapped languages; English, the held languages and
   every harmless prompt are the other class, and the threshold gates on 3 % of those on the
   *validation* split (``--gate-on``; ``--no-gate`` evaluates the bare edit),
3. evaluates the base model and the (gated) edited model on the held-out *test* split: greedy
   responses, judged refusal / compliance / invalid per language with bootstrap intervals, plus
   the over-refusal rate and next-token KL on held-out harmless prompts,
4. prints the per-language table and writes ``results.json``, ``results.md``, the plots, the
   delta, the gate and every response under the output folder.

Everything runs on CPU; with the defaults it takes about 18 minutes on a 2-core machine (2026-12-07).
Re-running the same command resumes: finished responses are not generated again.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from edit_runtime.commands.argtypes import RESIDUAL_ONLY_OPTIONS, csv_list, given_flags, lang_weights

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
DEFAULT_LANGS = ("en", "zh", "vi", "th", "bn", "sw", "fr", "ar")
#: held by default (--method residual), those of them in --langs: Qwen parrots bn and sw back,
#: harmful or not, and with 16 train ids per language the mapped edit cost French refusals
#: (README, the demo section)
DEFAULT_HOLD = ("bn", "sw", "fr")


def run(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edit_runtime.demo", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="short name, HF folder or hub id")
    p.add_argument("--harmful", default="builtin:harmful")
    p.add_argument("--harmless", default="builtin:harmless")
    p.add_argument("--langs", default=",".join(DEFAULT_LANGS), help="first one is the anchor (English)")
    p.add_argument("--layer", type=int, default=20)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--method", choices=["swe", "residual"], default="residual",
                   help="residual (default): the layer's down_proj, last-token residual mapped onto English "
                        "(edit_runtime.residual_fit); swe: up_proj rows of the safety neurons (edit_runtime.fit)")
    p.add_argument("--harmless-weight", type=float, default=None,
                   help="residual: weight of the harmless rows (default 4)")
    p.add_argument("--harmless-lang-weights", default=None,
                   help="residual: per-language harmless weights overriding --harmless-weight, e.g. th=16,ar=16")
    p.add_argument("--hold-langs", default=None,
                   help="residual: comma-separated languages of --langs whose last tokens the edit leaves in place "
                        f"(default: those of {','.join(DEFAULT_HOLD)} in --langs; 'none' holds none); they are "
                        "not mapped")
    p.add_argument("--hold-weight", type=float, default=None, help="residual: weight of the held rows (default 16)")
    p.add_argument("--gate-layer", type=int, default=None,
                   help="decoder layer the probe gate reads, before --layer (default 16); the edit is on only "
                        "for the prompts it scores above its threshold")
    p.add_argument("--gate-on", type=float, default=None,
                   help="the gate's threshold turns the edit on for at most this fraction of the validation "
                        "prompts it is not for: English, held languages, harmless (default 0.03)")
    p.add_argument("--no-gate", action="store_true", help="evaluate the bare edit, on every prompt")
    p.add_argument("--limit", type=int, default=None,
                   help="evaluate on at most N held-out prompt ids per language (the fit uses the whole train split)")
    p.add_argument("--harmless-limit", type=int, default=12,
                   help="held-out harmless ids per language for over-refusal and KL (0 = all 44; 12, the "
                        "paired ones, keeps the demo within 30 minutes)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 4 ids per split (fit included) and 32 new tokens")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("-o", "--output", default="demo_out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import torch

    from edit_runtime.data import first_ids, load_prompts
    from edit_runtime.evaluate import UtilityOptions, evaluate
    from edit_runtime.fit import FitConfig, fit
    from edit_runtime.gate import GatedDelta, fit_mapped_gate
    from edit_runtime.models import load_model
    from edit_runtime.residual_fit import ResidualFitConfig, fit_residual

    if args.threads:
        torch.set_num_threads(args.threads)
    limit = 4 if args.quick and not args.limit else args.limit
    fit_limit = 4 if args.quick else None
    max_new = 32 if args.quick else None
    langs = csv_list(args.langs)
    anchor, low = langs[0], langs[1:]
    residual_only = given_flags(args, RESIDUAL_ONLY_OPTIONS)
    if residual_only and args.method != "residual":
        p.error(f"{', '.join(residual_only)}: option(s) of --method residual")
    if args.method != "residual":
        hold = []
    elif args.hold_langs is None:
        hold = [l for l in DEFAULT_HOLD if l in low]
    else:
        hold = [] if args.hold_langs.strip().lower() == "none" else csv_list(args.hold_langs)
    if not set(hold) <= set(low):
        p.error(f"--hold-langs {hold} must be among the non-anchor --langs {low}")
    low = [l for l in low if l not in hold]
    if not low:
        p.error(f"no language left to map onto {anchor}: --langs {langs} minus the held {hold}")
    gated = not args.no_gate
    gate_flags = [flag for flag, value in (("--gate-layer", args.gate_layer), ("--gate-on", args.gate_on))
                  if value is not None]
    if gate_flags and not gated:
        p.error(f"{', '.join(gate_flags)}: option(s) of the gate, and --no-gate turns it off")
    args.gate_layer = 16 if args.gate_layer is None else args.gate_layer
    args.gate_on = 0.03 if args.gate_on is None else args.gate_on
    if gated and not 0 <= args.gate_layer < args.layer:
        p.error(f"--gate-layer {args.gate_layer} must be a layer before the edited --layer {args.layer}")
    if gated and not 0 < args.gate_on < 1:
        p.error(f"--gate-on {args.gate_on} must be a fraction in (0, 1)")
    try:  # checked before the model loads
        harmless_lang_weights = lang_weights(args.harmless_lang_weights)
    except SystemExit as exc:
        p.error(str(exc))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    seconds: dict[str, float] = {}

    def step(msg: str) -> None:
        print(f"\n== [{time.time() - t_start:6.0f} s] {msg}", flush=True)

    step(f"loading {args.model}")
    t = time.time()
    model, tok = load_model(args.model)
    seconds["load"] = time.time() - t

    harm_train = first_ids(load_prompts(args.harmful, langs=langs, split="train"), fit_limit)
    safe_train = first_ids(load_prompts(args.harmless, langs=langs, split="train"), fit_limit)
    harm_test = first_ids(load_prompts(args.harmful, langs=langs, split="test"), limit)
    safe_limits = [x for x in (limit, args.harmless_limit) if x]  # 0 / None: no bound
    safe_test = first_ids(load_prompts(args.harmless, langs=langs, split="test"),
                             min(safe_limits) if safe_limits else None)
    print(f"   fit on train: {len(harm_train)} harmful + {len(safe_train)} harmless prompts; "
          f"evaluate on test: {len(harm_test)} harmful + {len(safe_test)} harmless ({len(langs)} languages)")

    delta_path = out / "delta.safetensors"
    proj = "up_proj" if args.method == "swe" else "down_proj (residual recipe)"
    step(f"fitting layer {args.layer} {proj}, rank {args.rank}, {'+'.join(low)} -> {anchor}"
         + (f", {'+'.join(hold)} held" if hold else ""))
    t = time.time()
    if args.method == "swe":
        cfg = FitConfig(layers=[args.layer], low_langs=low, anchor_lang=anchor, rank=args.rank,
                        gamma=args.gamma, batch_size=args.batch_size)
        result = fit(model, tok, harm_train, safe_train, cfg)
    else:
        # --harmless-weight left out: ResidualFitConfig's default; the demo holds at 16 by default
        weights = {"harmless_weight": args.harmless_weight} if args.harmless_weight is not None else {}
        weights["harmless_lang_weights"] = harmless_lang_weights
        rcfg = ResidualFitConfig(layer=args.layer, low_langs=low, anchor_lang=anchor, rank=args.rank,
                                 gamma=args.gamma, **weights, hold_langs=hold,
                                 hold_weight=16.0 if args.hold_weight is None else args.hold_weight,
                                 batch_size=args.batch_size)
        result = fit_residual(model, tok, harm_train, safe_train, rcfg)
    result.delta.save(delta_path)
    seconds["fit"] = time.time() - t
    for r in result.layers:
        what = "neurons" if args.method == "swe" else "rows"
        print(f"   layer {r.layer}: |S| = {r.num_neurons} {what}, rank {r.rank}, "
              f"lambda {r.lam:.3g}, safety gap closed on train "
              f"{'n/a' if r.gap_closed_train is None else format(r.gap_closed_train, '.2f')}")
    print(f"   wrote {delta_path}")

    edited: object = delta_path
    if gated:
        step(f"fitting the probe gate on layer {args.gate_layer}: on for harmful {'+'.join(low)} prompts")
        t = time.time()
        harm_val = first_ids(load_prompts(args.harmful, langs=langs, split="validation"), fit_limit)
        safe_val = first_ids(load_prompts(args.harmless, langs=langs, split="validation"), fit_limit)
        gate = fit_mapped_gate(model, tok, harm_train + safe_train, harm_val + safe_val, low,
                               layer=args.gate_layer, gate_on=args.gate_on, batch_size=args.batch_size)
        gate_path = gate.save(out / "gate.safetensors")
        seconds["gate"] = time.time() - t
        m = gate.metadata
        print(f"   threshold {gate.threshold:.2f}: on for {m['validation_on']['for']:.0%} of the "
              f"{m['validation_n']['for']} validation prompts it is for, {m['validation_on']['other']:.0%} of the "
              f"{m['validation_n']['other']} others; wrote {gate_path}")
        edited = GatedDelta(result.delta, gate)

    step("evaluating base vs edited on the held-out test split (resumable)")
    t = time.time()
    res = evaluate(model, tok, harm_test, variants={"base": None, "edited": edited},
                   out_dir=out, max_new_tokens=max_new, batch_size=args.batch_size,
                   utility=UtilityOptions(harmless=safe_test, over_refusal_max_new_tokens=max_new),
                   model_name=args.model)
    seconds["evaluate"] = time.time() - t

    step("results")
    md = (out / "results.md").read_text(encoding="utf-8")
    print(md)
    base, edited = res.variants["base"].per_lang(), res.variants["edited"].per_lang()
    print("refusal rate per language, base -> edited:")
    for lang in res.langs:
        b, e = base[lang], edited[lang]
        print(f"   {lang}: {b['refusal_rate']:.0%} -> {e['refusal_rate']:.0%}   "
              f"(compliance {b['asr']:.0%} -> {e['asr']:.0%}, invalid {b['invalid_rate']:.0%} -> "
              f"{e['invalid_rate']:.0%}, n={e['n']})")
    seconds["total"] = time.time() - t_start
    print("\nseconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    print(f"report, plots and every response: {out.resolve()}/")
    return 0


def main() -> None:  # pragma: no cover
    from tqdm.contrib.logging import logging_redirect_tqdm

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with logging_redirect_tqdm():  # log lines print above a running progress bar, not into it
        code = run()
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
