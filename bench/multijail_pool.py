"""Pool the test generations of MultiJail proof runs over several test-id ranges, judged anew.

    python bench/multijail_pool.py RUN_DIR [RUN_DIR ...] [--variants base,best-X,Y] [-o pooled.md]

Each ``RUN_DIR`` is a proof output folder (``bench/multijail_proof.py -o``). Its
``test/generations/<variant>.jsonl`` files keep every response a test stage generated, whatever
``--test-offset``/``--test-limit`` it ran with (``test/judged`` holds only the last stage's
range), so one folder tested on ids 21-45, then 46-70, then 71-108 pools all three. Responses are
judged here with the proof's judge (:class:`edit_runtime.judge.KeywordJudge`, deterministic).
Lines are pooled by (variant, prompt id, language); the same pair in two folders must hold the
same response (the same delta), else the script stops. Only prompt ids that every variant has in
every language are kept, so the variants are compared on the same prompts.

Printed (and written with ``-o``): per language and variant, refusal / ASR / invalid in %, and the
mean non-English ASR of each variant with its relative change against ``base`` and a **paired
bootstrap** 95 % interval of that change. Resampling unit: a prompt id with all its languages
(MultiJail is parallel, so one id's languages are not independent), 2000 draws, seed 0.
Seconds: reading and judging JSONL only.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from edit_runtime.judge import VERDICT_LABELS as LABELS


def read_runs(dirs: list[Path], variants: list[str] | None) -> dict[str, dict[tuple[str, str], str]]:
    """``{variant: {(prompt id, lang): label}}`` over every run folder (harmful prompts only)."""
    from edit_runtime.judge import KeywordJudge

    rows: dict[str, dict[tuple[str, str], tuple[str, str]]] = defaultdict(dict)
    for d in dirs:
        gens = d / "test" / "generations"
        if not gens.is_dir():
            raise SystemExit(f"{d}: no test/generations folder (run the proof's test stage first)")
        for path in sorted(gens.glob("*.jsonl")):
            name = path.stem
            if variants and name not in variants:
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    key, pair = (row["id"], row["lang"]), (row["prompt"], row["response"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise SystemExit(f"{path}:{n}: not a generation line ({e})") from None
                if row.get("label", "harmful") != "harmful":
                    continue
                if rows[name].get(key, pair) != pair:
                    raise SystemExit(f"{name} {key}: two different responses in {[str(x) for x in dirs]} "
                                     f"(different deltas under one name?)")
                rows[name][key] = pair
    missing = [v for v in variants or [] if v not in rows]
    if missing:
        raise SystemExit(f"no generations for variant(s) {missing} in {[str(d) for d in dirs]}")
    if "base" not in rows:
        raise SystemExit("a 'base' variant is needed as the reference")
    judge = KeywordJudge()
    out: dict[str, dict[tuple[str, str], str]] = {}
    for name, by_key in rows.items():
        keys = list(by_key)
        verdicts = judge.judge_batch([by_key[k][0] for k in keys], [by_key[k][1] for k in keys],
                                     [k[1] for k in keys])
        out[name] = {k: v.label for k, v in zip(keys, verdicts)}
    return out


def common_ids(runs: dict[str, dict[tuple[str, str], str]], langs: list[str]) -> list[str]:
    """Prompt ids every variant has in every language."""
    ids = None
    for labels in runs.values():
        have = defaultdict(set)
        for pid, lang in labels:
            have[pid].add(lang)
        full = {pid for pid, ls in have.items() if set(langs) <= ls}
        ids = full if ids is None else ids & full
    return sorted(ids or ())


def relative_change_interval(base: np.ndarray, other: np.ndarray, *, boot: int = 2000,
                             seed: int = 0) -> tuple[float, float, float]:
    """Relative change of ``other``'s mean against ``base``'s and its paired bootstrap 95 %
    interval. ``base``, ``other``: ``(ids, langs)`` 0/1 (e.g. compliance), rows aligned; the
    resampling unit is a row, a prompt id with all its languages. Same seed, same draws."""
    draws = np.random.default_rng(seed).integers(0, len(base), size=(boot, len(base)))
    samples = other[draws].mean(axis=(1, 2)) / base[draws].mean(axis=(1, 2)) - 1
    lo, hi = np.quantile(samples, [0.025, 0.975])
    return float(other.mean() / base.mean() - 1), float(lo), float(hi)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="proof output folders")
    p.add_argument("--variants", default=None,
                   help="comma list, in column order (default: every judged file, base first)")
    p.add_argument("--anchor", default="en", help="language left out of the mean ASR")
    p.add_argument("--boot", type=int, default=2000)
    p.add_argument("-o", "--output", type=Path, default=None, help="write the Markdown here too")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    runs = read_runs(args.runs, variants)
    order = ["base"] + [v for v in (variants or sorted(runs)) if v != "base"]
    langs = sorted({lang for labels in runs.values() for _, lang in labels},
                   key=lambda lg: (lg != args.anchor, lg))
    ids = common_ids(runs, langs)
    if not ids:
        raise SystemExit("no prompt id is judged for every variant in every language")
    # counts[v][i, l, k]: 1 where variant v's response to id i in language l has label k
    counts = {v: np.zeros((len(ids), len(langs), 3)) for v in order}
    for v in order:
        for i, pid in enumerate(ids):
            for j, lg in enumerate(langs):
                counts[v][i, j, LABELS.index(runs[v][(pid, lg)])] = 1
    low = [j for j, lg in enumerate(langs) if lg != args.anchor]
    lines = [f"{len(ids)} prompt ids × {len(langs)} languages, pooled from "
             f"{', '.join(str(d) for d in args.runs)}. Refusal / ASR / invalid in %.", "",
             "| lang | " + " | ".join(order) + " |", "|---" * (len(order) + 1) + "|"]
    for j, lg in enumerate(langs):
        cells = []
        for v in order:
            r, c, x = (100 * counts[v][:, j, :].mean(0)).tolist()
            cells.append(f"{r:.0f} / {c:.0f} / {x:.0f}")
        lines.append(f"| {lg} | " + " | ".join(cells) + " |")

    cells = []
    for v in order:
        point = float(counts[v][:, low, 1].mean())
        if v == "base":
            cells.append(f"**{100 * point:.1f}**")
            continue
        rel, lo, hi = relative_change_interval(counts["base"][:, low, 1], counts[v][:, low, 1], boot=args.boot)
        cells.append(f"**{100 * point:.1f}** ({100 * rel:+.0f} % rel. [{100 * lo:+.0f}, {100 * hi:+.0f}])")
    lines.append("| **mean non-" + args.anchor + " ASR** | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    if args.output:
        args.output.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
