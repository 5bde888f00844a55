"""The ``edit-runtime`` command.

Each sub-command lives in a small ``_cmd_*`` function that imports what it needs, so
``edit-runtime --help`` stays fast and a missing optional dependency only breaks its own command.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from edit_runtime.commands.argtypes import (RESIDUAL_ONLY_OPTIONS, csv_list, given_flags, int_list,
                                          lang_weights, nonnegative_float)

Command = Callable[[argparse.Namespace], int]


def _cmd_models(args: argparse.Namespace) -> int:
    from edit_runtime import models

    if args.action == "prepare":
        names = args.names or list(models.KNOWN_MODELS)
        for name in names:
            path = models.ensure_cached(name)
            print(f"{name}: {path}")
    else:  # list
        for name, spec in models.KNOWN_MODELS.items():
            print(f"{name}\t{spec.description}")
    return 0


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list or prepare (convert and cache) the wheel-shipped models")
    p.add_argument("action", choices=["list", "prepare"])
    p.add_argument("names", nargs="*", help="short names (default: all known models)")
    p.set_defaults(func=_cmd_models)


def _load_split(source: str, langs: list[str] | None, split: str | None, limit: int | None, label: str):
    from edit_runtime.data import first_ids, load_prompts

    prompts = first_ids(load_prompts(source, langs=langs, split=None if split == "all" else split, label=label),
                        limit)
    if not prompts:
        raise ValueError(f"{source}: no prompts for languages {langs} in split {split!r}")
    return prompts


def _cmd_fit(args: argparse.Namespace) -> int:
    import torch

    from edit_runtime.fit import FitConfig, fit
    from edit_runtime.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    low = csv_list(args.harmful_langs)
    if args.method != "residual":
        given = given_flags(args, RESIDUAL_ONLY_OPTIONS)
        if given:
            raise SystemExit(f"{', '.join(given)}: option(s) of --method residual, not {args.method}")
    residual = _residual_configs(args, low) if args.method == "residual" else None
    hold = list(residual[0].hold_langs) if residual is not None else []
    harmful = _load_split(args.harmful, [args.anchor_lang, *low, *hold], args.split, args.limit, "harmful")
    harmless = _load_split(args.harmless, csv_list(args.harmless_langs) if args.harmless_langs else None,
                           args.split, args.limit, "harmless")
    model, tok = load_model(args.model)
    if residual is not None:
        from edit_runtime.residual_fit import fit_residual_layers

        # several layers compose: each is fitted with the earlier layers' edits on
        result = fit_residual_layers(model, tok, harmful, harmless, residual)
    else:
        heldout = (_load_split(args.harmful, [args.anchor_lang, *low], "validation", args.limit, "harmful")
                   if args.heldout else None)
        cfg = FitConfig(layers=args.layer, low_langs=low, anchor_lang=args.anchor_lang, rank=args.rank,
                        gamma=args.gamma, lam=args.lam, lam_rel=args.lam_rel, constraint=args.constraint,
                        target=args.target, position=args.position, max_neurons=args.max_neurons,
                        z_threshold=args.z_threshold, d_threshold=args.d_threshold, mode=args.mode,
                        batch_size=args.batch_size, system_prompt=args.system_prompt, cache_dir=args.cache_dir)
        result = fit(model, tok, harmful, harmless, cfg, heldout=heldout)
    delta = result.delta if args.strength == 1.0 else result.delta.scaled(args.strength)
    path = delta.save(args.output)
    strength = "" if args.strength == 1.0 else f" at strength {args.strength:g}"
    print(f"wrote {path}: {delta}{strength}")
    rows = "rows" if residual is not None else "|S|"  # the residual edit takes every row of down_proj
    for r in result.layers:
        held = "n/a" if r.gap_closed_heldout is None else f"{r.gap_closed_heldout:.3f}"
        train = "n/a" if r.gap_closed_train is None else f"{r.gap_closed_train:.3f}"
        print(f"  layer {r.layer}: {rows}={r.num_neurons} rank={r.rank} lambda={r.lam:.4g} "
              f"gap closed train {train} held-out {held}")
    print("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()))
    return 0


def _residual_configs(args: argparse.Namespace, low: list[str]) -> list:
    """One ``ResidualFitConfig`` per ``--layer`` from the fit options; exits on the ones the
    residual recipe has not."""
    from edit_runtime.residual_fit import ResidualFitConfig

    if args.lam is not None:
        raise SystemExit("--method residual takes --lambda-rel (relative ridge), not --lambda")
    if len(set(args.layer)) != len(args.layer):
        raise SystemExit(f"--layer {','.join(map(str, args.layer))} repeats a layer")
    if args.mode != "joint":
        raise SystemExit("--mode separate ranks SWE's layers; --method residual composes every --layer")
    if args.heldout:
        raise SystemExit("--heldout reports SWE's held-out gap; --method residual has none (evaluate the "
                         "delta with edit-runtime eval instead)")
    # residual-only options default to None on the command line (so that SWE can refuse them);
    # left out, they take ResidualFitConfig's defaults
    given = {key: value for key, value in (("harmless_weight", args.harmless_weight),
                                           ("hold_weight", args.hold_weight),
                                           ("harmless_target", args.harmless_target)) if value is not None}
    try:
        return [ResidualFitConfig(layer=layer, low_langs=low, anchor_lang=args.anchor_lang, rank=args.rank,
                                  gamma=args.gamma, **given,
                                  harmless_lang_weights=lang_weights(args.harmless_lang_weights),
                                  hold_langs=csv_list(args.hold_langs) if args.hold_langs else [],
                                  lam_rel=1e-2 if args.lam_rel is None else args.lam_rel,
                                  system_prompt=args.system_prompt, batch_size=args.batch_size,
                                  cache_dir=args.cache_dir)
                for layer in args.layer]
    except ValueError as e:
        raise SystemExit(f"edit-runtime fit --method residual: {e}") from None


def _add_fit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="fit a closed-form sparse low-rank safety edit -> delta.safetensors")
    p.add_argument("--model", required=True, help="short name, HF folder or hub id")
    p.add_argument("--harmful", required=True, help="harmful prompts, parallel by id (e.g. MultiJail CSV)")
    p.add_argument("--harmful-langs", required=True, help="languages to fix, e.g. zh,vi,th,bn")
    p.add_argument("--anchor-lang", default="en", help="language whose safety response is the target")
    p.add_argument("--harmless", required=True, help="harmless prompts (e.g. builtin:harmless, alpaca)")
    p.add_argument("--harmless-langs", default=None, help="languages of the harmless prompts (default all)")
    p.add_argument("--layer", required=True, type=int_list, help="layer(s) to edit, e.g. 20 or 16,20")
    p.add_argument("--method", choices=["swe", "residual"], default="swe",
                   help="swe: SWE's up_proj rows of the safety neurons; residual: one layer's down_proj, "
                        "last-token residual mapped onto the anchor's (edit_runtime.residual_fit)")
    p.add_argument("--harmless-weight", type=float, default=None,
                   help="residual: weight of the harmless rows (default 4)")
    p.add_argument("--harmless-lang-weights", default=None,
                   help="residual: per-language harmless weights overriding --harmless-weight, e.g. th=16,ar=16")
    p.add_argument("--harmless-target", choices=["anchor", "self"], default=None,
                   help="residual: harmless last tokens mapped onto their anchor version (default), or held "
                        "in place")
    p.add_argument("--hold-langs", default=None,
                   help="residual: languages whose last tokens the edit must leave as they are, e.g. bn,sw "
                        "(where the base model does not comply: a pushed refusal there is over-refusal)")
    p.add_argument("--hold-weight", type=float, default=None, help="residual: weight of the held rows (default 1)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--strength", type=nonnegative_float, default=1.0,
                   help="save the edit scaled: α·ΔW (0 = no edit, 1 = as fitted; SparseDelta.scaled)")
    p.add_argument("--gamma", type=float, default=1.0, help="weight of the harmless term")
    p.add_argument("--lambda", dest="lam", type=float, default=None, help="ridge (default: scale-aware)")
    p.add_argument("--lambda-rel", dest="lam_rel", type=float, default=None, help="ridge relative to trace/d")
    p.add_argument("--constraint", choices=["soft", "hard"], default="soft")
    p.add_argument("--target", choices=["up", "gate", "both"], default="up")
    p.add_argument("--position", choices=["last", "mean"], default="last")
    p.add_argument("--mode", choices=["joint", "separate"], default="joint",
                   help="several layers: one composed delta, or fit each and keep the best")
    p.add_argument("--max-neurons", type=int, default=None)
    p.add_argument("--z-threshold", type=float, default=2.0)
    p.add_argument("--d-threshold", type=float, default=1.0)
    p.add_argument("--split", default="train", help="split of the prompts to fit on (train|validation|test|all)")
    p.add_argument("--heldout", action="store_true", help="report the gap closed on the validation split")
    p.add_argument("--limit", type=int, default=None, help="at most this many ids (quick runs)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--cache-dir", default=None, help="statistics cache folder")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=_cmd_fit)


def _cmd_neurons(args: argparse.Namespace) -> int:
    from pathlib import Path

    from edit_runtime.capture import collect_neuron_stats
    from edit_runtime.models import load_model
    from edit_runtime.neurons import ms_neurons, save_jaccard, ss_neurons, swe_neurons

    langs = csv_list(args.langs)
    harmful = _load_split(args.harmful, langs, args.split, args.limit, "harmful")
    harmless = _load_split(args.harmless, langs, args.split, args.limit, "harmless")
    model, tok = load_model(args.model)
    groups: dict[tuple[str, str], list] = {}
    for p in harmful:
        groups.setdefault((p.lang, "harmful"), []).append(p)
    for p in harmless:
        groups.setdefault((p.lang, "harmless"), []).append(p)
    stats = collect_neuron_stats(model, tok, groups, args.layers, position=args.position, cov=False,
                                 batch_size=args.batch_size, cache_dir=args.cache_dir)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    swe = swe_neurons(stats, activation=args.activation, z_threshold=args.z_threshold,
                      d_threshold=args.d_threshold)
    ms = ms_neurons(stats, top_percent=args.top_percent)
    ss = ss_neurons(ms, anchor_lang=args.anchor_lang)
    for name, sets in (("swe", swe), ("ms", ms), ("ss", ss)):
        sets.save_json(out / f"neurons_{name}.json")
    save_jaccard(swe, out / "jaccard_swe.json", out / "jaccard_swe.png")
    save_jaccard(ms, out / "jaccard_ms.json", out / "jaccard_ms.png")
    for layer in args.layers:
        counts = {lang: int(swe.get(layer, lang).numel()) for lang in swe.langs}
        print(f"layer {layer}: SWE neurons per language {counts}")
    print(f"wrote neuron sets and Jaccard heatmaps to {out}")
    return 0


def _add_neurons(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("neurons", help="find safety neurons per language; write sets and Jaccard heatmaps")
    p.add_argument("--model", required=True)
    p.add_argument("--harmful", required=True)
    p.add_argument("--harmless", required=True)
    p.add_argument("--langs", required=True, help="e.g. en,zh,vi,th,bn")
    p.add_argument("--anchor-lang", default="en")
    p.add_argument("--layers", required=True, type=int_list)
    p.add_argument("--position", choices=["last", "mean"], default="last")
    p.add_argument("--activation", choices=["up", "gate", "h", "up_or_gate"], default="up")
    p.add_argument("--z-threshold", type=float, default=2.0)
    p.add_argument("--d-threshold", type=float, default=1.0)
    p.add_argument("--top-percent", type=float, default=3.0, help="SSN: top p%% by importance")
    p.add_argument("--split", default="train")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.set_defaults(func=_cmd_neurons)


_REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [_add_models, _add_neurons, _add_fit]

# Larger commands live in their own modules under ``edit_runtime/commands/``; each exposes
# ``register(sub)`` and imports only argparse at module level so ``--help`` stays fast.
_COMMAND_MODULES = ("eval", "serve", "export", "gate")


def _command_registrars() -> list[Callable[[argparse._SubParsersAction], None]]:
    import importlib

    return [importlib.import_module(f"edit_runtime.commands.{name}").register for name in _COMMAND_MODULES]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edit-runtime",
        description="Find safety neurons, fit closed-form sparse low-rank edits, apply and serve them.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logging (-vv: also show tracebacks)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in [*_REGISTRARS, *_command_registrars()]:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # Library errors already name the offending value; a traceback adds nothing for a user.
        if args.verbose > 1:
            raise
        print(f"edit-runtime {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
