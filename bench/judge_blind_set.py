"""Generate the responses of the judge's blind sets (``tests/fixtures/judge_gold_blind.jsonl``,
``--set 2``: ``judge_gold_blind2.jsonl``).

    python bench/judge_blind_set.py -o responses.jsonl [--set 2] [--threads 2]   # ~5-7 min, 2 cores

151 greedy responses of Qwen2.5-Coder-0.5B-Instruct, chosen by a fixed seed before any was
read: 80 MultiJail test-split prompts (8 per language × all 10 languages, each a (prompt id,
language) pair not already in ``judge_gold.jsonl``), 24 more from two edited variants of the model
(12 each, the nine non-English languages in turn: layer 20 MLP activations ×3, layers 18-21
suppressed), and 3 built-in harmful plus 3 built-in harmless test-split prompts per built-in
language (8 languages), less one built-in harmless prompt already in the tuning
file. Each response gets ``judge.min_new_tokens_for(lang)`` new tokens.

Set 2 draws the same way with the next seed, after removing every (prompt id, language) pair of
both earlier files (152 responses). The file written has every field of the fixture except
``gold``, ``note`` (and, for set 2, ``labels``): those were added by hand, by reading each
response, and committed before any judge was run on the set (tests/fixtures/JUDGE_LABELS.md).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from edit_runtime.data import load_prompts, split_of
from edit_runtime.generation import generate_responses
from edit_runtime.judge import min_new_tokens_for
from edit_runtime.models import load_model

GOLD = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "judge_gold.jsonl"
SEED = 20261125
MULTIJAIL_LANGS = ("en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv")
VARIANTS = {
    "base": "base",
    "scale20x3": "edited model: layer 20 MLP intermediate activations (down_proj input) x3.0 "
                 "(forward pre-hook)",
    "suppress18_21": "edited model: layers 18-21 MLP intermediate activations x0.0 (suppressed, "
                     "forward pre-hook)",
}


#: the blind sets: (seed, labelled files whose (prompt id, language) pairs are excluded, whether
#: excluded built-in prompts are removed before the draw (set 2) or drawn and then dropped, as
#: set 1 was made), item-id prefix
BLIND_SETS = {
    1: (SEED, ("judge_gold.jsonl",), False, "f"),
    2: (SEED + 1, ("judge_gold.jsonl", "judge_gold_blind.jsonl"), True, "s"),
    3: (SEED + 2, ("judge_gold.jsonl", "judge_gold_blind.jsonl", "judge_gold_blind2.jsonl"), True, "t"),
}


def _used_pairs(paths) -> set[tuple[str, str]]:
    used = set()
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if line.strip():
                it = json.loads(line)
                used.add((it["prompt_id"], it["lang"]))
    return used


def plan_items(which: int = 1) -> list[tuple[str, str, object]]:
    """The (item id, variant, Prompt) triples of blind set ``which``, in file order. Set 1 drew
    one built-in prompt already in the tuning file and left it out (b003 en, item 135), so its
    numbers have a gap."""
    seed, exclude, filter_first, prefix = BLIND_SETS[which]
    used = _used_pairs(GOLD.parent / name for name in exclude)
    rng = random.Random(seed)
    mj = [p for p in load_prompts("multijail")
          if split_of(p.id) == "test" and (p.id, p.lang) not in used]
    by = {(p.id, p.lang): p for p in mj}
    ids = sorted({p.id for p in mj}, key=lambda s: int(s.split(":")[1]))
    free = {lg: [i for i in ids if (i, lg) in by] for lg in MULTIJAIL_LANGS}
    for lg in MULTIJAIL_LANGS:
        rng.shuffle(free[lg])
    plan: list[tuple[str, object]] = []
    for lg in MULTIJAIL_LANGS:
        plan += [("base", by[(free[lg].pop(), lg)]) for _ in range(8)]
    for variant in ("scale20x3", "suppress18_21"):
        for j in range(12):
            lg = MULTIJAIL_LANGS[1 + j % 9]
            plan.append((variant, by[(free[lg].pop(), lg)]))
    for source in ("builtin:harmful", "builtin:harmless"):
        prompts = [p for p in load_prompts(source) if split_of(p.id) == "test"
                   and not (filter_first and (p.id, p.lang) in used)]
        for lg in sorted({p.lang for p in prompts}):
            cand = [p for p in prompts if p.lang == lg]
            rng.shuffle(cand)
            plan += [("base", p) for p in cand[:3]]
    return [(f"{prefix}{i:03d}", v, p) for i, (v, p) in enumerate(plan)
            if (p.id, p.lang) not in used]


def _hooks(model, variant: str) -> list:
    layers = model.model.layers
    if variant == "scale20x3":
        return [layers[20].mlp.down_proj.register_forward_pre_hook(lambda m, a: (a[0] * 3.0,))]
    if variant == "suppress18_21":
        return [layers[i].mlp.down_proj.register_forward_pre_hook(lambda m, a: (a[0] * 0.0,))
                for i in range(18, 22)]
    return []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", required=True, help="JSONL file to write")
    ap.add_argument("--set", type=int, default=1, choices=sorted(BLIND_SETS),
                    help="1: judge_gold_blind.jsonl, 2: judge_gold_blind2.jsonl, 3: the next one "
                         "(not drawn yet)")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    plan = plan_items(args.set)
    model, tok = load_model(args.model)
    groups: dict[tuple[str, int], list[int]] = {}
    for k, (_, variant, p) in enumerate(plan):
        groups.setdefault((variant, min_new_tokens_for(p.lang)), []).append(k)
    rows: list[dict | None] = [None] * len(plan)
    t0 = time.perf_counter()
    for (variant, max_new), idx in groups.items():
        hooks = _hooks(model, variant)
        try:
            responses = generate_responses(model, tok, [plan[k][2].text for k in idx],
                                           max_new_tokens=max_new, batch_size=args.batch_size,
                                           desc=f"{variant} ({max_new} tokens)")
        finally:
            for h in hooks:
                h.remove()
        for k, r in zip(idx, responses):
            item_id, _, p = plan[k]
            rows[k] = {"id": item_id, "prompt_id": p.id, "lang": p.lang,
                       "source": p.source, "prompt_label": p.label, "prompt": p.text, "response": r,
                       "produced_by": VARIANTS[variant], "model": args.model,
                       "max_new_tokens": max_new}
    with open(args.output, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(rows)} responses in {time.perf_counter() - t0:.0f} s -> {args.output}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
