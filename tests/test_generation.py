"""Batched greedy generation and resumable JSONL result files (edit_runtime.generation)."""
from __future__ import annotations

import json

import pytest
import torch

from edit_runtime.data import Prompt
from edit_runtime.generation import (_plan, generate_detailed, generate_responses,
                                     generate_to_jsonl, read_jsonl)
from tiny_models import make_tiny_model


# the CLI's --threads 1 is undone after the module too
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2[1]


@pytest.fixture(scope="module")
def tiny(tok):
    """A tiny random Llama speaking SmolLM2's vocabulary (eos 2 = <|im_end|>)."""
    return make_tiny_model("llama", vocab_size=len(tok), seed=3)


class CountingGenerate:
    """Wraps model.generate to count calls and rows (restored by the test)."""

    def __init__(self, model):
        self.model, self.orig, self.calls, self.rows = model, model.generate, 0, 0

    def __call__(self, *a, **kw):
        self.calls += 1
        self.rows += kw["input_ids"].shape[0]
        return self.orig(*a, **kw)


def _prompts(n=4, langs=("en", "zh")):
    texts = {"en": ["Tell me a joke.", "How are you today, my friend?", "Name a color.",
                    "What is two plus two, and why is that so?"],
             "zh": ["讲个笑话。", "你今天好吗，我的朋友？", "说一种颜色。", "二加二等于几？为什么？"]}
    return [Prompt(id=f"t:{i}", lang=lg, text=texts[lg][i], label="harmful", source="t")
            for lg in langs for i in range(n)]


def test_batched_matches_unbatched_on_smollm2(smollm2):
    model, tok = smollm2
    texts = ["What is the capital of France?", "Name one planet.",
             "Explain in one sentence why the sky looks blue during the day."]
    batched = generate_detailed(model, tok, texts, max_new_tokens=10, batch_size=3, progress=False)
    single = [generate_detailed(model, tok, [t], max_new_tokens=10, batch_size=1, progress=False)[0]
              for t in texts]
    assert batched == single
    # and the single-prompt path is exactly transformers' own greedy generate, new tokens only
    ids = tok(tok.apply_chat_template([{"role": "user", "content": texts[1]}],
                                      add_generation_prompt=True, tokenize=False),
              add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**ids, max_new_tokens=10, do_sample=False)
    new = ref[0, ids["input_ids"].shape[1]:].tolist()
    if 2 in new:
        new = new[:new.index(2)]
    assert single[1].text == tok.decode(new, skip_special_tokens=True)
    assert all(g.finish_reason in ("stop", "length") and 1 <= g.n_tokens <= 10 for g in batched)


def test_order_budgets_and_buckets(tiny, tok):
    texts = ["a", "a much longer prompt with many more words in it", "mid length prompt", "b c"]
    budgets = [3, 5, 3, 6]
    counter = CountingGenerate(tiny)
    tiny.generate = counter
    try:
        out = generate_detailed(tiny, tok, texts, max_new_tokens=budgets, batch_size=8,
                                progress=False)
    finally:
        del tiny.generate
    assert counter.calls == 1  # one full batch: the budgets are mixed, each row stops at its own
    for g, b in zip(out, budgets):
        assert g.n_tokens <= b and (g.finish_reason == "stop" or g.n_tokens == b)
    # in input order, identical to one call per prompt
    for t, b, g in zip(texts, budgets, out):
        assert generate_detailed(tiny, tok, [t], max_new_tokens=b, progress=False)[0] == g
    assert generate_responses(tiny, tok, texts, max_new_tokens=budgets, batch_size=2,
                              progress=False) == [g.text for g in out]
    assert generate_responses(tiny, tok, [], progress=False) == []


def test_plan_fills_batches_largest_budget_then_longest_first():
    batches = _plan([5, 9, 2, 7, 9], [4, 4, 4, 8, 4], 2)
    assert batches == [[3, 1], [4, 0], [2]]


def test_mixed_budget_batch_equals_one_budget_per_call_on_smollm2(smollm2):
    """A row generated beside longer-budget rows (stopped by the per-row criterion) gives the
    tokens it gets alone with its own budget, finish reason and count included."""
    model, tok = smollm2
    texts = ["Write a long story about a dragon.", "Name one planet.",
             "List ten fruits, one per line."]
    budgets = [12, 3, 7]
    mixed = generate_detailed(model, tok, texts, max_new_tokens=budgets, batch_size=3,
                              progress=False)
    alone = [generate_detailed(model, tok, [t], max_new_tokens=b, progress=False)[0]
             for t, b in zip(texts, budgets)]
    assert mixed == alone
    assert [g.n_tokens for g in mixed][0] == 12 and mixed[1].n_tokens <= 3


@pytest.mark.parametrize("kwargs, err", [
    (dict(texts="one string"), TypeError),
    (dict(texts=["x", 3]), TypeError),
    (dict(texts=["x"], batch_size=0), ValueError),
    (dict(texts=["x"], max_new_tokens=0), ValueError),
    (dict(texts=["x", "y"], max_new_tokens=[4]), ValueError),
    (dict(texts=["x"], chat=False, system_prompt="be nice"), ValueError),
])
def test_bad_arguments(tiny, tok, kwargs, err):
    texts = kwargs.pop("texts")
    with pytest.raises(err):
        generate_responses(tiny, tok, texts, progress=False, **kwargs)


def test_jsonl_resume_and_truncated_line(tiny, tok, tmp_path):
    path = tmp_path / "gen" / "out.jsonl"
    prompts = _prompts()
    first = generate_to_jsonl(tiny, tok, prompts, path, max_new_tokens=4, batch_size=3,
                              extra={"model": "tiny"}, progress=False)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(prompts) == len(first)
    rec = json.loads(lines[0])
    assert set(rec) == {"id", "lang", "label", "source", "prompt", "response", "variant",
                        "max_new_tokens", "n_tokens", "finish_reason", "settings"}
    assert [(r["id"], r["lang"]) for r in first] == [(p.id, p.lang) for p in prompts]
    assert rec["settings"]["extra"] == {"model": "tiny"} and rec["variant"] == "base"

    # rerun: nothing generated, same records
    counter = CountingGenerate(tiny)
    tiny.generate = counter
    try:
        again = generate_to_jsonl(tiny, tok, prompts, path, max_new_tokens=4, batch_size=3,
                                  extra={"model": "tiny"}, progress=False)
        assert counter.calls == 0 and again == first
        # a crash mid-write: the last line cut in half is dropped and redone
        raw = path.read_bytes()
        last_start = raw.rstrip(b"\n").rfind(b"\n") + 1
        path.write_bytes(raw[:last_start + 25])
        assert len(read_jsonl(path)) == len(prompts) - 1
        redone = generate_to_jsonl(tiny, tok, prompts, path, max_new_tokens=4, batch_size=3,
                                   extra={"model": "tiny"}, progress=False)
        assert counter.rows == 1
    finally:
        del tiny.generate
    assert redone == first
    assert len(path.read_text(encoding="utf-8").splitlines()) == len(prompts)
    on_disk = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    key = lambda r: (r["id"], r["lang"])  # noqa: E731 - lines are in generation order
    assert sorted(on_disk, key=key) == sorted(first, key=key)

    # another variant in the same file is independent
    other = generate_to_jsonl(tiny, tok, prompts[:2], path, max_new_tokens=4, variant="edited",
                              extra={"model": "tiny"}, progress=False)
    assert [r["variant"] for r in other] == ["edited", "edited"]
    assert len(read_jsonl(path)) == len(prompts) + 2


def test_jsonl_settings_mismatch_refused(tiny, tok, tmp_path):
    path = tmp_path / "out.jsonl"
    prompts = _prompts(2, ("en",))
    generate_to_jsonl(tiny, tok, prompts, path, max_new_tokens=3, progress=False)
    before = path.read_bytes()
    for kw in (dict(max_new_tokens=5), dict(max_new_tokens=3, system_prompt="Be safe."),
               dict(max_new_tokens=3, extra={"delta": "abc"})):
        with pytest.raises(ValueError, match="new file"):
            generate_to_jsonl(tiny, tok, prompts, path, progress=False, **kw)
    changed = [Prompt(id=p.id, lang=p.lang, text=p.text + "!", label=p.label, source=p.source)
               for p in prompts]
    with pytest.raises(ValueError, match="prompt text differs"):
        generate_to_jsonl(tiny, tok, changed, path, max_new_tokens=3, progress=False)
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="duplicate"):
        generate_to_jsonl(tiny, tok, prompts + prompts[:1], tmp_path / "dup.jsonl", progress=False)


def test_jsonl_default_budget_per_language_and_corrupt_file(tiny, tok, tmp_path):
    from edit_runtime.judge import min_new_tokens_for

    prompts = [Prompt(id="x:0", lang="en", text="Hi.", label="harmful", source="x"),
               Prompt(id="x:0", lang="bn", text="হ্যালো।", label="harmful", source="x")]
    counter = CountingGenerate(tiny)
    tiny.generate = counter
    try:
        recs = generate_to_jsonl(tiny, tok, prompts, tmp_path / "b.jsonl", progress=False)
    finally:
        del tiny.generate
    assert [r["max_new_tokens"] for r in recs] == [min_new_tokens_for("en"), min_new_tokens_for("bn")]
    assert counter.calls == 1  # two budgets in one batch, each row stopped at its own
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(ValueError, match="line 2"):
        generate_to_jsonl(tiny, tok, prompts, bad, max_new_tokens=2, progress=False)


def test_partial_character_at_the_budget_is_dropped(tiny, tok):
    """A cut mid-character decodes as U+FFFD; only a length-finished response loses it."""

    class CutTokenizer:
        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, *a, **kw):
            return tok(*a, **kw)

        def decode(self, ids, **kw):
            return tok.decode(ids, **kw) + "\ufffd\ufffd"

    out = generate_detailed(tiny, CutTokenizer(), ["Hello there."], max_new_tokens=3,
                            progress=False)[0]
    plain = generate_detailed(tiny, tok, ["Hello there."], max_new_tokens=3, progress=False)[0]
    assert out.finish_reason == "length" and out.text == plain.text.rstrip("\ufffd")
