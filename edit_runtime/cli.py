"""The ``edit-runtime`` command.

Each sub-command lives in a small ``_cmd_*`` function that imports what it needs, so
``edit-runtime --help`` stays fast and a missing optional dependency only breaks its own command.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, NoReturn, Sequence

from edit_runtime.commands.argtypes import (RESIDUAL_ONLY_OPTIONS, HelpFormatter, csv_list, given_flags, int_list,
                                          lang_weights, nonnegative_float, positive_int, usage_error)

Command = Callable[[argparse.Namespace], int]


def _cmd_models(args: argparse.Namespace) -> int:
    from edit_runtime import models

    return models.run_command(args)  # the same code as `python -m edit_runtime.models`


def _add_models(sub: argparse._SubParsersAction) -> None:
    from edit_runtime import models  # light: torch and transformers are imported when a model converts

    p = sub.add_parser("models", help="list the wheel-shipped models, prepare (convert and cache) them, or print "
                                      "their cache folders",
                       description="List the wheel-shipped models, convert them once into the safetensors cache,\n"
                                   "or print their cache folders (the same as python -m edit_runtime.models).",
                       epilog=models.ACTIONS_HELP, formatter_class=HelpFormatter)
    models.add_arguments(p)
    p.set_defaults(func=_cmd_models)


def _load_split(source: str, langs: list[str] | None, split: str | None, limit: int | None, label: str):
    from edit_runtime.data import first_ids, load_prompts

    prompts = first_ids(load_prompts(source, langs=langs, split=None if split == "all" else split, label=label),
                        limit)
    if not prompts:
        raise ValueError(f"{source}: no prompts for languages {langs} in split {split!r}")
    return prompts


def _usage_error(args: argparse.Namespace, message: str) -> NoReturn:
    """Options that do not go together: ``edit-runtime COMMAND: error: MESSAGE`` and exit status 2,
    like any other usage error (through the sub-command's parser.error)."""
    parser = getattr(args, "_parser", None)
    if parser is None:  # a Namespace not made by build_parser
        raise SystemExit(message)
    usage_error(parser, message)


def _cmd_fit(args: argparse.Namespace) -> int:
    import torch

    from edit_runtime.fit import FitConfig, fit
    from edit_runtime.models import load_model

    low = csv_list(args.harmful_langs)
    if args.method != "residual":
        given = given_flags(args, RESIDUAL_ONLY_OPTIONS)
        if given:
            _usage_error(args, f"{', '.join(given)}: option(s) of --method residual, not {args.method}")
    residual = _residual_configs(args, low) if args.method == "residual" else None
    if args.threads:
        torch.set_num_threads(args.threads)
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
    """One ``ResidualFitConfig`` per ``--layer`` from the fit options; a usage error (exit 2) on
    the ones the residual recipe has not."""
    from edit_runtime.residual_fit import ResidualFitConfig

    if args.lam is not None:
        _usage_error(args, "--method residual takes --lambda-rel (relative ridge), not --lambda")
    if len(set(args.layer)) != len(args.layer):
        _usage_error(args, f"--layer {','.join(map(str, args.layer))} repeats a layer")
    if args.mode != "joint":
        _usage_error(args, "--mode separate ranks SWE's layers; --method residual composes every --layer")
    if args.heldout:
        _usage_error(args, "--heldout reports SWE's held-out gap; --method residual has none (evaluate the "
                           "delta with edit-runtime eval instead)")
    try:
        harmless_lang_weights = lang_weights(args.harmless_lang_weights)
    except SystemExit as exc:  # a malformed LANG=WEIGHT item
        _usage_error(args, str(exc))
    # residual-only options default to None on the command line (so that SWE can refuse them);
    # left out, they take ResidualFitConfig's defaults
    given = {key: value for key, value in (("harmless_weight", args.harmless_weight),
                                           ("hold_weight", args.hold_weight),
                                           ("harmless_target", args.harmless_target)) if value is not None}
    try:
        return [ResidualFitConfig(layer=layer, low_langs=low, anchor_lang=args.anchor_lang, rank=args.rank,
                                  gamma=args.gamma, **given,
                                  harmless_lang_weights=harmless_lang_weights,
                                  hold_langs=csv_list(args.hold_langs) if args.hold_langs else [],
                                  lam_rel=1e-2 if args.lam_rel is None else args.lam_rel,
                                  system_prompt=args.system_prompt, batch_size=args.batch_size,
                                  cache_dir=args.cache_dir)
                for layer in args.layer]
    except ValueError as e:
        _usage_error(args, f"--method residual: {e}")


_MODEL_HELP = "short name (see edit-runtime models list), Hugging Face folder, .gguf file or Hub id"
_SOURCES = "multijail, builtin:harmful, a CSV/JSONL file or hf:<id>"

FIT_DESCRIPTION = """\
Fit a closed-form sparse low-rank safety edit and save it as a delta file.

--method swe (default) finds the anchor language's safety neurons in each --layer and rewrites
their up_proj (or gate_proj) rows so that the harmful prompts of --harmful-langs produce the
activations of the same prompts in --anchor-lang, while the harmless prompts stay unchanged
(weighted by --gamma). --method residual edits one layer's down_proj instead, mapping the
last-token residual of each language onto the anchor's.

example:
  edit-runtime fit --model smollm2-135m-instruct --harmful multijail --harmful-langs zh,vi,bn \\
      --harmless builtin:harmless --layer 20 --rank 16 -o delta.safetensors

Evaluate the delta with edit-runtime eval, serve it with edit-runtime serve, or export it with
edit-runtime export."""


def _add_fit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="fit a closed-form sparse low-rank safety edit -> delta.safetensors",
                       description=FIT_DESCRIPTION, formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument("--harmful", required=True,
                   help=f"harmful prompts, parallel by id across languages: {_SOURCES}")
    p.add_argument("--harmful-langs", required=True,
                   help="comma-separated languages to fix (mapped onto --anchor-lang), e.g. zh,vi,th,bn")
    p.add_argument("--anchor-lang", default="en", help="language whose safety response is the target")
    p.add_argument("--harmless", required=True,
                   help="harmless prompts the edit must leave unchanged, e.g. builtin:harmless, alpaca, "
                        "a CSV/JSONL file")
    p.add_argument("--harmless-langs", default=None,
                   help="comma-separated languages of the harmless prompts (default: all the source has)")
    p.add_argument("--layer", required=True, type=int_list,
                   help="decoder layer(s) to edit: one number or comma-separated numbers, e.g. 20 or 16,20")
    p.add_argument("--method", choices=["swe", "residual"], default="swe",
                   help="swe: SWE's up_proj rows of the safety neurons; residual: one layer's down_proj, "
                        "last-token residual mapped onto the anchor's")
    p.add_argument("--harmless-weight", type=float, default=None,
                   help="residual: weight of the harmless rows (default 4)")
    p.add_argument("--harmless-lang-weights", default=None, metavar="LANG=WEIGHT,...",
                   help="residual: per-language harmless weights overriding --harmless-weight, e.g. th=16,ar=16")
    p.add_argument("--harmless-target", choices=["anchor", "self"], default=None,
                   help="residual: harmless last tokens mapped onto their anchor version (anchor, the default), "
                        "or held in place (self)")
    p.add_argument("--hold-langs", default=None,
                   help="residual: languages whose last tokens the edit must leave as they are, e.g. bn,sw "
                        "(where the base model does not comply: a pushed refusal there is over-refusal)")
    p.add_argument("--hold-weight", type=float, default=None, help="residual: weight of the held rows (default 1)")
    p.add_argument("--rank", type=int, default=16, help="rank r of each layer's edit (SWE: 8-16 is enough)")
    p.add_argument("--strength", type=nonnegative_float, default=1.0,
                   help="save the edit scaled: α·ΔW (0 = no edit, 1 = as fitted)")
    p.add_argument("--gamma", type=float, default=1.0,
                   help="weight of the harmless term: how strongly harmless activations are kept (SWE: 1-100)")
    p.add_argument("--lambda", dest="lam", type=float, default=None,
                   help="swe: absolute ridge λ of the solve (default: scale-aware, --lambda-rel times the mean "
                        "eigenvalue of the statistics)")
    p.add_argument("--lambda-rel", dest="lam_rel", type=float, default=None,
                   help="ridge relative to the mean eigenvalue (trace/d) of the statistics (default 1e-2)")
    p.add_argument("--constraint", choices=["soft", "hard"], default="soft",
                   help="swe: soft = harmless term weighted by --gamma; hard = edit restricted to the null "
                        "space of the harmless activations")
    p.add_argument("--target", choices=["up", "gate", "both"], default="up",
                   help="swe: rows of the safety neurons to edit: up_proj, gate_proj or both")
    p.add_argument("--position", choices=["last", "mean"], default="last",
                   help="swe: one activation per prompt: the last prompt token (after the chat template) or "
                        "the mean over the prompt's tokens")
    p.add_argument("--mode", choices=["joint", "separate"], default="joint",
                   help="swe, several layers: one delta composing every layer (joint), or fit each layer alone "
                        "and keep the one that closes most of the safety gap (separate; held-out with --heldout)")
    p.add_argument("--max-neurons", type=positive_int, default=None,
                   help="swe: keep at most this many safety neurons per layer, those of highest z-score "
                        "(default: all)")
    _add_swe_thresholds(p, "swe")
    p.add_argument("--split", default="train", help="split of the prompts to fit on: train, validation, test or all")
    p.add_argument("--heldout", action="store_true",
                   help="swe: also report the gap closed on the validation split")
    _add_capture_options(p, system_prompt=True)
    p.add_argument("-o", "--output", required=True, help="the delta file to write (.safetensors)")
    p.set_defaults(func=_cmd_fit, _parser=p)


def _cmd_neurons(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from edit_runtime.capture import collect_neuron_stats
    from edit_runtime.models import load_model
    from edit_runtime.neurons import ms_neurons, save_jaccard, ss_neurons, swe_neurons

    if args.threads:
        torch.set_num_threads(args.threads)
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


NEURONS_DESCRIPTION = """\
Find the safety neurons of each language in the given layers and write the sets and their
cross-language overlap.

Three kinds of set are written to the output folder: SWE's safety neurons (neurons_swe.json:
harmful-minus-harmless activation gap by z-score or Cohen's d), SSN's monolingual safety neurons
(neurons_ms.json: top --top-percent by importance on harmful prompts, minus those on harmless
ones) and SSN's shared safety neurons (neurons_ss.json: MS(lang) ∩ MS(--anchor-lang)), with
Jaccard overlap matrices and heatmaps (jaccard_swe.json/.png, jaccard_ms.json/.png).

example:
  edit-runtime neurons --model smollm2-135m-instruct --harmful multijail \\
      --harmless builtin:harmless --langs en,zh,vi,th,bn --layers 10,14,20 -o neurons/

The JSON files feed edit-runtime eval --neurons and causal --neurons-file."""


def _add_neurons(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("neurons", help="find safety neurons per language; write sets and Jaccard heatmaps",
                       description=NEURONS_DESCRIPTION, formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument("--harmful", required=True, help=f"harmful prompts: {_SOURCES}")
    p.add_argument("--harmless", required=True,
                   help="harmless prompts, e.g. builtin:harmless, alpaca, a CSV/JSONL file")
    p.add_argument("--langs", required=True,
                   help="comma-separated languages, e.g. en,zh,vi,th,bn (a language needs harmful and "
                        "harmless prompts)")
    p.add_argument("--anchor-lang", default="en",
                   help="the language the shared safety neurons are shared with: SS(lang) = MS(lang) ∩ MS(anchor)")
    p.add_argument("--layers", required=True, type=int_list,
                   help="decoder layers: one number or comma-separated numbers, e.g. 20 or 10,14,20")
    p.add_argument("--position", choices=["last", "mean"], default="last",
                   help="one activation per prompt: the last prompt token (after the chat template) or the "
                        "mean over the prompt's tokens")
    p.add_argument("--activation", choices=["up", "gate", "h", "up_or_gate"], default="up",
                   help="SWE: activation the neurons are chosen on: up_proj or gate_proj pre-activation, "
                        "h = act(gate)·up, or up_or_gate (the union of the up and gate sets)")
    _add_swe_thresholds(p, "SWE")
    p.add_argument("--top-percent", type=float, default=3.0,
                   help="SSN: percentage p of the layer's neurons: the top p%% by importance on harmful prompts, "
                        "minus the top p%% on harmless ones")
    p.add_argument("--split", default="train", help="split of the prompts: train, validation, test or all")
    _add_capture_options(p, system_prompt=False)
    p.add_argument("-o", "--output", required=True, help="output folder (created if missing)")
    p.set_defaults(func=_cmd_neurons, _parser=p)


_REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [_add_models, _add_neurons, _add_fit]

# Larger commands live in their own modules under ``edit_runtime/commands/``; each exposes
# ``register(sub)`` and imports only argparse at module level so ``--help`` stays fast.
_COMMAND_MODULES = ("eval", "serve", "export", "gate")


def _command_registrars() -> list[Callable[[argparse._SubParsersAction], None]]:
    import importlib

    return [importlib.import_module(f"edit_runtime.commands.{name}").register for name in _COMMAND_MODULES]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edit_runtime")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree without installing
        from edit_runtime import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edit-runtime",
        description="Find safety neurons, fit closed-form sparse low-rank edits, apply and serve them.",
        epilog="Run edit-runtime COMMAND --help for a command's options.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logging (-vv: also show tracebacks)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in [*_REGISTRARS, *_command_registrars()]:
        register(sub)
    return parser


def _add_capture_options(p: argparse.ArgumentParser, *, system_prompt: bool) -> None:
    """The options of a command that runs prompts through the model for statistics (fit, neurons)."""
    p.add_argument("--limit", type=positive_int, default=None,
                   help="at most this many prompt ids, every language of each (quick runs; default: all)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="prompts per forward pass")
    if system_prompt:
        p.add_argument("--system-prompt", default=None, help="system message for the chat template (default: none)")
    p.add_argument("--cache-dir", default=None,
                   help="folder caching the activation statistics for later runs (default: no cache)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch intra-op threads (default: torch's choice)")


def _add_swe_thresholds(p: argparse.ArgumentParser, tag: str) -> None:
    """``--z-threshold`` and ``--d-threshold``, the SWE safety-neuron rule (``fit`` and ``neurons``)."""
    p.add_argument("--z-threshold", type=float, default=2.0,
                   help=f"{tag}: a neuron is a safety neuron if the z-score (over the layer's neurons) of its "
                        "harmful-minus-harmless activation gap exceeds this, or if its Cohen's d exceeds "
                        "--d-threshold")
    p.add_argument("--d-threshold", type=float, default=1.0,
                   help=f"{tag}: Cohen's d threshold (the gap over the pooled standard deviation); see "
                        "--z-threshold")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():  # log lines print above a running progress bar, not into it
            return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # Library errors already name the offending value; a traceback adds nothing for a user.
        if args.verbose > 1:
            raise
        print(f"edit-runtime {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
