"""Study: the similarity judge's threshold and accuracy on the hand-labelled responses.

    python bench/judge_similarity_study.py                      # pick the threshold (about 1 min)
    python bench/judge_similarity_study.py --gold tests/fixtures/judge_gold_blind2.jsonl

:class:`edit_runtime.similarity.SimilarityJudge` turns a keyword-judge ``compliance`` into
``invalid`` (off topic) when the reply is hardly more similar to its request than to unrelated
requests (multilingual-e5-small). Default: scores every keyword-compliance reply of the two
development files (``judge_gold.jsonl``, the tuning file, and ``judge_gold_blind.jsonl``, blind
set 1, which became development data once rules were written from it), prints the three-class
agreement for a range of thresholds on each file and on both, and the cross-file check: the
threshold picked on one file, measured on the other. The shipped ``DEFAULT_THRESHOLD`` is the
pick on both files together: the best agreement averaged over the neighbouring thresholds
(+-0.02), since the curve is peaked.

``--gold FILE`` scores another labelled file at the shipped threshold only (no threshold may be
picked on a blind set), next to the keyword judge.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from edit_runtime.data import load_prompts
from edit_runtime.judge import KeywordJudge
from edit_runtime.similarity import DEFAULT_THRESHOLD, SimilarityJudge, references_from_prompts

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
DEV = (FIXTURES / "judge_gold.jsonl", FIXTURES / "judge_gold_blind.jsonl")
GRID = [round(x * 0.01, 2) for x in range(-5, 26)]


def _load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def _agree(items: list[dict], keyword: list[str], spec: dict[int, float], th: float) -> float:
    ok = sum((("invalid" if i in spec and spec[i] < th else keyword[i]) == it["gold"])
             for i, it in enumerate(items))
    return ok / len(items)


def _pick(curve: dict[float, float], half_width: int = 2) -> float:
    """The threshold with the best agreement averaged over its neighbours (+-0.02): the curve
    is peaked, and a threshold on a plateau moves less from one set of replies to the next."""
    ths = sorted(curve)
    smooth = {th: sum(curve[t] for t in ths[max(0, k - half_width):k + half_width + 1])
              / len(ths[max(0, k - half_width):k + half_width + 1]) for k, th in enumerate(ths)}
    return max(ths, key=lambda th: (smooth[th], curve[th]))


def score(judge: SimilarityJudge, items: list[dict]) -> tuple[list[str], dict[int, float]]:
    kj = judge.base
    keyword = [kj.judge(it["prompt"], it["response"], it["lang"]).label for it in items]
    todo = [i for i, lab in enumerate(keyword) if lab == "compliance"]
    s = judge.specificity([items[i]["prompt"] for i in todo], [items[i]["response"] for i in todo])
    return keyword, dict(zip(todo, s))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gold", default=None, help="a labelled JSONL to score at the shipped threshold")
    args = ap.parse_args(argv)
    # the English version of every prompt of the labelled files (MultiJail and the built-in set)
    refs = references_from_prompts(p for src in ("multijail", "builtin:harmful", "builtin:harmless")
                                   for p in load_prompts(src))
    judge = SimilarityJudge(refs, base=KeywordJudge())
    t0 = time.perf_counter()

    if args.gold:
        items = _load(Path(args.gold))
        keyword, spec = score(judge, items)
        base = _agree(items, keyword, {}, 0.0)
        a = _agree(items, keyword, spec, DEFAULT_THRESHOLD)
        print(f"{Path(args.gold).name} (n={len(items)}): keyword judge {base:.3f}, similarity judge "
              f"at the shipped threshold {DEFAULT_THRESHOLD:+.2f}: {a:.3f} "
              f"({len(spec)} replies scored in {time.perf_counter() - t0:.0f} s)")
        return 0

    files = {p.name: _load(p) for p in DEV}
    scored = {name: score(judge, items) for name, items in files.items()}
    curves = {name: {th: _agree(files[name], *scored[name], th) for th in GRID} for name in files}
    n_all = sum(map(len, files.values()))
    curves["both"] = {th: sum(curves[name][th] * len(files[name]) for name in files) / n_all
                      for th in GRID}
    names = list(files)
    print(f"{sum(len(s[1]) for s in scored.values())} keyword-compliance replies scored in "
          f"{time.perf_counter() - t0:.0f} s\n")
    print(f"| threshold | {' | '.join(names)} | both (n={n_all}) |")
    print("|---|" + "---|" * (len(names) + 1))
    kw = {name: _agree(files[name], scored[name][0], {}, 0.0) for name in names}
    kw_all = sum(kw[n] * len(files[n]) for n in names) / n_all
    print(f"| keyword judge alone | {' | '.join(f'{kw[n]:.3f}' for n in names)} | {kw_all:.3f} |")
    pick = _pick(curves["both"])
    for th in sorted(set(GRID[::2] + [pick, DEFAULT_THRESHOLD])):
        mark = (" (pick)" if th == pick else "") + (" (shipped)" if th == DEFAULT_THRESHOLD else "")
        print(f"| {th:+.2f}{mark} | {' | '.join(f'{curves[n][th]:.3f}' for n in names)} | "
              f"{curves['both'][th]:.3f} |")
    print()
    for a, b in ((names[0], names[1]), (names[1], names[0])):
        th = _pick(curves[a])
        print(f"picked on {a} ({th:+.2f}): {b} {curves[b][th]:.3f} (keyword alone {kw[b]:.3f})")
    if pick != DEFAULT_THRESHOLD:
        print(f"\nnote: the pick {pick:+.2f} differs from the shipped DEFAULT_THRESHOLD "
              f"{DEFAULT_THRESHOLD:+.2f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
