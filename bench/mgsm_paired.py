"""MGSM accuracy of the base model and one or more deltas on the same questions, compared pairwise.

    python bench/mgsm_paired.py --delta R20.safetensors [--delta ...] [--langs en] [--split test] \
        [--max-new-tokens 512] [--threads 2] -o mgsm_paired/

Accuracy differences between variants are far more precise as paired differences than as two
separate rates: most questions keep their verdict under a small edit, so the difference is
carried by the few questions it flips. For each delta and language this prints the base and
edited accuracy, the questions that flipped (base wrong -> edited right, and the reverse), the
difference in points with a paired bootstrap 95 % interval (questions resampled, 2000 draws,
seed 0) and the exact two-sided McNemar p-value on the flips.

Writes ``-o/items_<variant>.jsonl`` (one line per question: ``id``, ``lang``, ``gold``, ``pred``,
``correct``, ``response``; a rerun reuses a variant's file when it holds the same questions and
settings) and ``-o/mgsm_paired.md``. Generation: ``edit_runtime.utility.mgsm_accuracy`` (greedy,
chat template, the native "The answer is N." instruction).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from edit_runtime import SparseDelta, patch_model
from edit_runtime.data import load_prompts
from edit_runtime.evaluate import paired_bootstrap_diff
from edit_runtime.models import load_model
from edit_runtime.utility import mgsm_accuracy


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for ``b`` and ``c`` discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_interval(base: np.ndarray, edit: np.ndarray, boot: int = 2000) -> tuple[float, float]:
    """Percentile bootstrap 95 % interval of mean(edit) - mean(base), questions resampled (the
    evaluator's paired bootstrap, :func:`edit_runtime.evaluate.paired_bootstrap_diff`, seed 0)."""
    _, lo, hi = paired_bootstrap_diff(base, edit, np.random.default_rng(0), boot, 0.05)
    return lo, hi


def _items(model, tok, prompts, path: Path, settings: dict, batch_size: int) -> list[dict]:
    if path.is_file():
        lines = [json.loads(s) for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
        if lines and lines[0].get("settings") == settings:
            return lines[1:]
    t = time.perf_counter()
    res = mgsm_accuracy(model, tok, prompts, max_new_tokens=settings["max_new_tokens"],
                        batch_size=batch_size, details=True)
    items = [{**it, "lang": lang} for lang, r in res.items() for it in r["items"]]
    with path.open("w", encoding="utf-8") as f:
        f.write(json.dumps({"settings": settings, "seconds": time.perf_counter() - t}) + "\n")
        for it in items:
            f.write(json.dumps(it, ensure_ascii=False) + "\n")
    return items


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--delta", action="append", required=True, type=Path, help="a delta file (repeatable)")
    ap.add_argument("--langs", default="en")
    ap.add_argument("--split", default="test", choices=["train", "validation", "test"])
    ap.add_argument("--limit", type=int, default=None, help="questions per language (default all)")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("-o", "--output", type=Path, default=Path("mgsm_paired"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    deltas, digests = {}, {}
    for path in args.delta:  # read every delta before the model loads: a bad file fails fast
        try:
            deltas[path.stem] = SparseDelta.load(path)
            digests[path.stem] = hashlib.sha256(path.read_bytes()).hexdigest()
        except Exception as e:  # noqa: BLE001 - report which file, then stop
            raise SystemExit(f"--delta {path}: {e}") from None
    langs = [x.strip() for x in args.langs.split(",") if x.strip()]
    prompts = load_prompts("mgsm", langs=langs, split=args.split, limit=args.limit)
    args.output.mkdir(parents=True, exist_ok=True)
    model, tok = load_model(args.model)
    settings = {"model": args.model, "langs": langs, "split": args.split, "limit": args.limit,
                "max_new_tokens": args.max_new_tokens, "ids": sorted({p.id for p in prompts})}
    base = _items(model, tok, prompts, args.output / "items_base.jsonl", settings, args.batch_size)
    edited = {}
    for name, delta in deltas.items():
        with patch_model(model, delta):
            edited[name] = _items(model, tok, prompts, args.output / f"items_{name}.jsonl",
                                  {**settings, "delta_sha256": digests[name]}, args.batch_size)
    lines = [f"MGSM {args.split} split, {args.max_new_tokens} new tokens, model `{args.model}`. "
             "Accuracy in %; flips = questions whose verdict changed (base wrong -> edited right / "
             "base right -> edited wrong); difference with a paired bootstrap 95 % interval; exact "
             "McNemar p on the flips.", "",
             "| delta | lang | n | base | edited | flips +/− | difference (points) | McNemar p |",
             "|---|---|---|---|---|---|---|---|"]
    for name, items in edited.items():
        for lang in langs:
            b = {it["id"]: it["correct"] for it in base if it["lang"] == lang}
            e = {it["id"]: it["correct"] for it in items if it["lang"] == lang}
            ids = sorted(b)
            bv = np.array([b[i] for i in ids], float)
            ev = np.array([e[i] for i in ids], float)
            gain = int(((bv == 0) & (ev == 1)).sum())
            loss = int(((bv == 1) & (ev == 0)).sum())
            lo, hi = paired_interval(bv, ev)
            lines.append(f"| {name} | {lang} | {len(ids)} | {100 * bv.mean():.1f} | {100 * ev.mean():.1f} | "
                         f"{gain} / {loss} | {100 * (ev.mean() - bv.mean()):+.1f} [{100 * lo:+.1f}, "
                         f"{100 * hi:+.1f}] | {mcnemar_p(gain, loss):.2f} |")
    text = "\n".join(lines)
    print(text)
    (args.output / "mgsm_paired.md").write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
