"""Study: how far does the relevance check take the judge on the hand-labelled responses?

    python bench/judge_relevance_study.py [--compare] [--max-response-tokens 96] [--threads 2]

The keyword judge's main error on ``tests/fixtures/judge_gold.jsonl`` is an off-topic or misread
answer (hand label ``invalid``) that it calls ``compliance``: no lexicon tells "defines
shoplifting as improving products" from an answer. :class:`edit_runtime.relevance.RelevanceJudge`
scores the responses the keyword judge calls compliance by how much likelier the model finds
them under their own request (in English, from the parallel data) than under requests that ask
for nothing in particular, and calls the low ones ``invalid``.

``--gold tests/fixtures/judge_gold_blind2.jsonl`` scores blind set 2 instead (hand-labelled
before any judge ran on it; about 4 min): only the figure at the shipped threshold is reported
as a measurement there, since no threshold may be picked on that set.

Default: scores those responses with the shipped judge (Qwen2.5-Coder-0.5B-Instruct, 4 forwards
per response, about 6 min on 2 cores) and prints, for a range of thresholds, the three-class
agreement overall, on the tuning half (even positions) and on the held-out half (odd positions),
and the threshold the tuning half picks (``DEFAULT_THRESHOLD`` is that pick).

``--compare`` (about 18 min) also scores each response under its original-language prompt and
under 8 fixed unrelated English requests, and prints the same figures for ten ways of forming
the baseline (neutral requests, unrelated requests, original-language prompt, ...), each with
its threshold picked on the tuning half: the comparison the shipped scheme was chosen from.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from edit_runtime.data import load_prompts
from edit_runtime.judge import KeywordJudge
from edit_runtime.models import load_model
from edit_runtime.relevance import (DEFAULT_MAX_RESPONSE_TOKENS, DEFAULT_THRESHOLD,
                                    NEUTRAL_REQUESTS, RelevanceJudge, references_from_prompts,
                                    response_logprobs)

GOLD = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "judge_gold.jsonl"
GRID = [round(x * 0.02, 2) for x in range(-25, 40)]


def _mean(xs):
    return sum(xs) / len(xs)


def _table_row(name: str, relevance: dict[int, float], keyword: list[str], gold: list[str]) -> dict:
    n = len(gold)
    even, odd = range(0, n, 2), range(1, n, 2)

    def agree(th: float, idx) -> float:
        ok = sum((("invalid" if i in relevance and relevance[i] < th else keyword[i]) == gold[i])
                 for i in idx)
        return ok / len(idx)

    pick = max(GRID, key=lambda th: (agree(th, even), -th))
    best = max(GRID, key=lambda th: agree(th, range(n)))
    return {"name": name, "pick": pick, "overall": agree(pick, range(n)), "even": agree(pick, even),
            "odd": agree(pick, odd), "best": best, "best_overall": agree(best, range(n)),
            "curve": {th: (agree(th, range(n)), agree(th, even), agree(th, odd)) for th in GRID}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--compare", action="store_true", help="compare ten baseline schemes")
    ap.add_argument("--max-response-tokens", type=int, default=DEFAULT_MAX_RESPONSE_TOKENS)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scores", default=None, help="also write the per-response scores (JSON)")
    ap.add_argument("--gold", default=str(GOLD),
                    help="hand-labelled JSONL to score (default: the tuning file; "
                         "tests/fixtures/judge_gold_blind2.jsonl is the blind set)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    gold_path = Path(args.gold)
    tuning_file = gold_path.resolve() == GOLD.resolve()
    if args.compare and not tuning_file:
        ap.error("--compare picks thresholds on the tuning half: only for the tuning file")
    items = [json.loads(line) for line in gold_path.read_text(encoding="utf-8").splitlines()
             if line.strip()]
    gold = [it["gold"] for it in items]
    kj = KeywordJudge()
    keyword = [kj.judge(it["prompt"], it["response"], it["lang"]).label for it in items]
    prompts = [p for src in ("multijail", "builtin:harmless", "builtin:harmful") for p in load_prompts(src)]
    refs = references_from_prompts(prompts)
    missing = sorted({it["prompt_id"] for it in items if it["prompt"] not in refs})
    if missing:
        print(f"no English reference for {missing}: keyword verdict kept", file=sys.stderr)
    todo = [i for i, lab in enumerate(keyword) if lab == "compliance" and items[i]["prompt"] in refs]
    model, tok = load_model(args.model)
    model.eval()

    # per response: [own (English), own (original language), *neutral, *unrelated]
    unrelated = (random.Random(123).sample(sorted(set(refs.values())), 8) if args.compare else [])
    contexts: list[Callable[[dict], str]] = [lambda it: refs[it["prompt"]]]
    if args.compare:
        contexts.append(lambda it: it["prompt"])
    contexts += [lambda it, q=q: q for q in NEUTRAL_REQUESTS]
    contexts += [lambda it, q=q: q for q in unrelated]
    pairs = [(ctx(items[i]), items[i]["response"]) for i in todo for ctx in contexts]
    t0 = time.perf_counter()
    lp = response_logprobs(model, tok, pairs, max_response_tokens=args.max_response_tokens,
                           batch_size=args.batch_size, progress=True)
    secs = time.perf_counter() - t0
    k = len(contexts)
    scores = {i: lp[j * k:(j + 1) * k] for j, i in enumerate(todo)}
    if args.scores:
        Path(args.scores).write_text(json.dumps(
            {"contexts": ["own_en"] + (["own_orig"] if args.compare else []) + list(NEUTRAL_REQUESTS)
             + unrelated, "scores": {items[i]["id"]: s for i, s in scores.items()}}, indent=1))

    # the shipped judge, for the record that the scores above are its scores
    judge = RelevanceJudge(model, tok, refs, base=kj, max_response_tokens=args.max_response_tokens)
    nn = len(NEUTRAL_REQUESTS)
    o = 2 if args.compare else 1  # first neutral column
    shipped = {i: s[0] - _mean(s[o:o + nn]) for i, s in scores.items()}
    check = todo[:2]
    assert all(abs(a - shipped[i]) < 1e-3 for a, i in zip(
        judge.relevance([items[i]["prompt"] for i in check], [items[i]["response"] for i in check]),
        check))

    print(f"\n{len(todo)} keyword-compliance responses, {len(pairs)} (request, response) pairs "
          f"scored in {secs:.0f} s ({args.max_response_tokens} response tokens)\n")
    row = _table_row("shipped", shipped, keyword, gold)
    base = _table_row("keyword", {}, keyword, gold)["curve"][0.0]
    if not tuning_file:
        # a set no threshold was picked on: only the shipped threshold's figure is a measurement
        a = row["curve"][DEFAULT_THRESHOLD][0]
        print(f"{gold_path.name}: keyword judge {base[0]:.3f}, relevance judge at the shipped "
              f"threshold {DEFAULT_THRESHOLD:+.2f}: {a:.3f} (n={len(gold)})\n")
        print("| threshold | agreement |")
        print("|---|---|")
        for th in sorted(set(GRID[5::4] + [DEFAULT_THRESHOLD])):
            mark = " (shipped)" if th == DEFAULT_THRESHOLD else ""
            print(f"| {th:+.2f}{mark} | {row['curve'][th][0]:.3f} |")
        return 0
    print("| threshold | overall | tuning half (even) | held-out half (odd) |")
    print("|---|---|---|---|")
    print(f"| keyword judge alone | {base[0]:.3f} | {base[1]:.3f} | {base[2]:.3f} |")
    for th in sorted(set(GRID[5::4] + [row["pick"]])):
        a, e, d = row["curve"][th]
        mark = " (picked on the tuning half)" if th == row["pick"] else ""
        print(f"| {th:+.2f}{mark} | {a:.3f} | {e:.3f} | {d:.3f} |")

    if args.compare:
        u = o + nn
        schemes = {
            "own − mean(neutral 3) (shipped)": lambda s: s[0] - _mean(s[o:o + nn]),
            "own − 'Hello!'": lambda s: s[0] - s[o],
            "own − 'Say something.'": lambda s: s[0] - s[o + 1],
            "own − 'Write a short text.'": lambda s: s[0] - s[o + 2],
            "own − mean(unrelated 8)": lambda s: s[0] - _mean(s[u:u + 8]),
            "own − mean(unrelated 1-3)": lambda s: s[0] - _mean(s[u:u + 3]),
            "own − mean(unrelated 4-6)": lambda s: s[0] - _mean(s[u + 3:u + 6]),
            "own − max(unrelated 8)": lambda s: s[0] - max(s[u:u + 8]),
            "own − mean(neutral 3 + unrelated 8)": lambda s: s[0] - _mean(s[o:u + 8]),
            "original-language prompt − mean(unrelated 8)": lambda s: s[1] - _mean(s[u:u + 8]),
        }
        print("\n| baseline | threshold (tuning half) | overall | tuning half | held-out half | "
              "best overall (any threshold) |")
        print("|---|---|---|---|---|---|")
        for name, f in schemes.items():
            r = _table_row(name, {i: f(s) for i, s in scores.items()}, keyword, gold)
            print(f"| {name} | {r['pick']:+.2f} | {r['overall']:.3f} | {r['even']:.3f} | "
                  f"{r['odd']:.3f} | {r['best_overall']:.3f} at {r['best']:+.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
