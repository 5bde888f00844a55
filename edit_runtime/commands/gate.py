"""``edit-runtime gate``: fit a probe gate (:mod:`edit_runtime.gate`) from prompt sets.

    edit-runtime gate --model qwen2.5-coder-0.5b-instruct --layer 16 \\
        --harmful multijail --harmful advbench --harmless builtin:harmless --harmless alpaca \\
        --harmless mgsm --langs en,zh,vi,ar,ko,th,bn,sw,jv --limit 300 --harmless-on 0.03 \\
        -o gate.safetensors

The probe is fitted on the train split of every ``--harmful`` / ``--harmless`` source (repeat
them: a probe fitted on one harmful and one harmless source learns to tell the two sources apart,
style included, more than harm; MultiJail against the built-in set alone fired on every MGSM
question). ``--langs`` keeps those languages of each source (a source without any of them is an
error). The threshold is ``--threshold`` or, with ``--harmless-on RATE``, the one that turns the
edit on for that fraction of the *validation* harmless prompts. The validation split of the same
sources is then scored and printed per source: the fraction gated on at a few thresholds.

With ``--mapped-langs LANGS`` the probe is fitted for a delta that maps those languages onto an
anchor (the demo's gate, :func:`edit_runtime.gate.fit_mapped_gate`): on for the harmful prompts of
LANGS only, every other prompt (the anchor's and other languages' harmful prompts, every harmless
one) the other class; ``--others-on RATE`` then sets the threshold that turns the edit on for at
most that fraction of the validation prompts of the other class.
Use the gate with ``edit-runtime eval --gate`` and ``edit-runtime serve --gate``. Only argparse is
imported at module level.
"""
from __future__ import annotations

import argparse

from edit_runtime.commands.argtypes import HelpFormatter, csv_list, positive_int, user_description

REPORT_THRESHOLDS = (-1.0, 0.0, 1.0, 2.0, 3.0)


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction strictly between 0 and 1, got {text!r}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    """Adds the ``gate`` sub-command."""
    p = sub.add_parser("gate", help="fit a probe gate (harmful vs harmless, one layer) for eval/serve --gate",
                       description=user_description(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="short name, HF folder, .gguf file or hub id")
    p.add_argument("--layer", type=int, required=True,
                   help="decoder layer whose output the probe reads (before every layer the delta edits)")
    p.add_argument("--harmful", action="append", required=True, metavar="SOURCE",
                   help="harmful prompts (repeatable), e.g. multijail, advbench, a CSV/JSONL file")
    p.add_argument("--harmless", action="append", required=True, metavar="SOURCE",
                   help="harmless prompts (repeatable), e.g. builtin:harmless, alpaca, mgsm")
    p.add_argument("--langs", type=csv_list, default=None, help="languages to keep from each source (default all)")
    p.add_argument("--limit", type=positive_int, default=None, help="at most this many prompt ids per source and split")
    p.add_argument("--split", default="train", help="split to fit on (default train; validation is reported)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--threshold", type=float, default=None, help="probe score above which the edit is on (default 0)")
    group.add_argument("--harmless-on", type=_rate, default=None, metavar="RATE",
                       help="pick the threshold that turns the edit on for RATE of the validation harmless prompts")
    group.add_argument("--others-on", type=_rate, default=None, metavar="RATE",
                       help="with --mapped-langs: the threshold that turns the edit on for at most RATE of the "
                            "validation prompts the gate is not for")
    p.add_argument("--mapped-langs", type=csv_list, default=None,
                   help="fit the gate for a delta that maps these languages onto an anchor: on for their harmful "
                        "prompts only, every other prompt is the other class")
    p.add_argument("--l2", type=float, default=1e-2, help="ridge weight of the logistic probe")
    p.add_argument("--batch-size", type=positive_int, default=16, help="prompts per forward pass")
    p.add_argument("--system-prompt", default=None, help="system message for the chat template (default: none)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-o", "--output", required=True, help="the gate file to write (.safetensors)")
    p.set_defaults(func=run)


def _source(source: str, label: str, langs: list[str] | None, split: str, limit: int | None) -> list:
    """One source's prompts of ``split`` in ``langs`` (those it has), at most ``limit`` ids."""
    from edit_runtime.data import first_ids, load_prompts

    # not load_prompts(langs=...): that refuses a language the source lacks (AdvBench is English only)
    prompts = first_ids([p for p in load_prompts(source, split=split, label=label)
                         if langs is None or p.lang in langs], limit)
    if not prompts:
        raise ValueError(f"--{label} {source}: no {split} prompts"
                         + (f" in languages {langs}" if langs is not None else ""))
    return prompts


def run(args: argparse.Namespace) -> int:
    """Loads the prompts, then the model; fits, reports validation, writes the gate."""
    from pathlib import Path

    import torch

    from edit_runtime.gate import fit_probe_gate, last_token_hidden, mapped_harmful, threshold_at_most
    from edit_runtime.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    sources = {"harmful": list(dict.fromkeys(args.harmful)), "harmless": list(dict.fromkeys(args.harmless))}
    # every prompt is read before the model loads: a bad source fails at once
    train = {(label, s): _source(s, label, args.langs, args.split, args.limit) for label, srcs in sources.items()
             for s in srcs}
    held = {}
    if args.split == "train":
        for (label, s) in train:
            try:
                held[(label, s)] = _source(s, label, args.langs, "validation", args.limit)
            except ValueError:
                pass  # a source without a validation split is fitted on, not reported
    if args.harmless_on is not None and not any(label == "harmless" for label, _ in held):
        raise ValueError("--harmless-on needs validation prompts of a --harmless source; none has any")
    mapped = args.mapped_langs
    if mapped is None and args.others_on is not None:
        raise ValueError("--others-on goes with --mapped-langs")
    if mapped is not None and args.harmless_on is not None:
        raise ValueError("--harmless-on is for a harmful-vs-harmless gate; with --mapped-langs use --others-on")
    if mapped is not None and args.others_on is None and args.threshold is None:
        raise ValueError("--mapped-langs needs --others-on RATE or --threshold T")
    if mapped is not None:
        if not any(bool(mapped_harmful(ps, mapped).any()) for ps in train.values()):
            raise ValueError(f"--mapped-langs {mapped}: no harmful train prompt in those languages")
        if args.others_on is not None and all(bool(mapped_harmful(ps, mapped).all()) for ps in held.values()):
            raise ValueError("--others-on needs validation prompts the gate is not for; none has any")
    model, tok = load_model(args.model)  # a --layer the model lacks: GateError from the first features

    def features(prompts: list) -> torch.Tensor:
        return last_token_hidden(model, tok, [p.text for p in prompts], [args.layer], batch_size=args.batch_size,
                                 system_prompt=args.system_prompt, progress=not args.no_progress)[args.layer]

    feats = {key: features(ps) for key, ps in train.items()}
    held_feats = {key: features(ps) for key, ps in held.items()}
    meta = {"model": args.model, "split": args.split, "langs": args.langs, "limit": args.limit,
            "harmful": {s: len(train[("harmful", s)]) for s in sources["harmful"]},
            "harmless": {s: len(train[("harmless", s)]) for s in sources["harmless"]}}

    # the rows the gate is for: a harmful-vs-harmless gate, by label; a mapped gate, the harmful
    # prompts of the mapped languages
    is_for = {key: (torch.full((len(ps),), key[0] == "harmful", dtype=torch.bool) if mapped is None
                    else mapped_harmful(ps, mapped)) for key, ps in train.items()}
    if mapped is not None:
        meta["for"] = {"label": "harmful", "langs": list(mapped)}
        meta["fitted"] = {"for": sum(int(m.sum()) for m in is_for.values()),
                          "other": sum(int((~m).sum()) for m in is_for.values())}
    gate = fit_probe_gate(torch.cat([f[is_for[key]] for key, f in feats.items()]),
                          torch.cat([f[~is_for[key]] for key, f in feats.items()]),
                          args.layer, l2=args.l2, metadata=meta)
    scores = {key: gate.score(f) for key, f in held_feats.items()}
    if args.harmless_on is not None:
        harmless = torch.cat([sc for (label, _), sc in scores.items() if label == "harmless"]).double()
        threshold = float(torch.quantile(harmless, 1.0 - args.harmless_on))
    elif args.others_on is not None:
        others = torch.cat([sc[~mapped_harmful(held[key], mapped)] for key, sc in scores.items()])
        threshold = threshold_at_most(others, args.others_on)
    else:
        threshold = 0.0 if args.threshold is None else args.threshold
    gate = gate.with_threshold(threshold)
    shown = sorted({*REPORT_THRESHOLDS, threshold})
    lines = [f"validation split: fraction of prompts the gate turns the edit on for (layer {args.layer})", "",
             "| source | kind | n | " + " | ".join(f"t = {t:.3g}" + (" (chosen)" if t == threshold else "")
                                                  for t in shown) + " |",
             "|---" * (3 + len(shown)) + "|"]
    for (label, s), sc in scores.items():
        # a mapped gate: each source's prompts it is for and the others, apart (the threshold is set on
        # the others; pooled, the two would hide each other)
        if mapped is None:
            parts = [(label, sc)]
        else:
            mine = mapped_harmful(held[(label, s)], mapped)
            parts = [(f"{label}, {'gate is for' if want else 'other'}", sc[mine == want]) for want in (True, False)
                     if bool((mine == want).any())]
        for kind, part in parts:
            lines.append(f"| {s} | {kind} | {len(part)} | " + " | ".join(f"{float((part > t).float().mean()):.2f}"
                                                                      for t in shown) + " |")
            gate.metadata.setdefault("validation_on", {})[f"{kind}:{s}"] = float((part > threshold).float().mean())
    if not scores:
        lines.append("(no validation prompts: --split is not train, or no source has a validation split)")
    path = gate.save(Path(args.output))
    print("\n".join(lines))
    if mapped is None:
        fitted = f"{sum(meta['harmful'].values())} harmful + {sum(meta['harmless'].values())} harmless prompts"
    else:
        fitted = (f"{meta['fitted']['for']} prompts it is for (harmful, {','.join(mapped)}) + "
                  f"{meta['fitted']['other']} others")
    print(f"\nwrote {path}: layer {gate.layer}, threshold {threshold:.4g}, fitted on {fitted}")
    return 0
