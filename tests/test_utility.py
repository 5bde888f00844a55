"""edit_runtime.utility: MGSM answer extraction and accounting, XCOPA log-likelihood scoring
(batched == unbatched, == a float64 reference), over-refusal accounting, next-token KL (0 for a
no-op edit, == a float64 reference for a random one).

Models: a tiny random Llama with SmolLM2's vocabulary (49152 ids, so the real SmolLM2 tokenizer
and chat template drive it) for the exact checks; SmolLM2-135M itself for one short MGSM run.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from delta_helpers import dense_edited, random_delta
from edit_runtime import utility
from edit_runtime.data import Prompt, load_prompts, render_chat
from edit_runtime.delta import ModuleEdit, SparseDelta
from edit_runtime.judge import Verdict, min_new_tokens_for, wilson_interval
from edit_runtime.patch import patch_model
from edit_runtime.utility import (MGSM_ANSWER_CUES, MGSM_INSTRUCTIONS, XCOPA_CONNECTIVES,
                                  continuation_logprobs, extract_answer, find_numbers,
                                  mgsm_accuracy, mgsm_prompt, next_token_kl, over_refusal,
                                  xcopa_accuracy, xcopa_texts)
from tiny_models import make_tiny_model


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2[1]


@pytest.fixture(scope="module")
def tiny(tok):
    """Tiny random Llama (3 layers, hidden 64) over SmolLM2's 49152-token vocabulary."""
    return make_tiny_model("llama", seed=3, vocab_size=len(tok))


class FakeGenerator:
    """Records its calls and answers from a text -> response table."""

    def __init__(self, table):
        self.table = table
        self.calls = []

    def __call__(self, model, tokenizer, texts, **kw):
        self.calls.append((list(texts), kw))
        return [self.table[t] for t in texts]


def _mgsm(i, lang, answer, text=None):
    return Prompt(f"mgsm:{i}", lang, text or f"question {i} in {lang}?", "harmless", "mgsm",
                  {"line": i, "answer": answer})


# -- answer extraction ---------------------------------------------------------------------------
EXTRACT_CASES = [
    # plain cue
    ("Janet sells 9 eggs at $2. The answer is 18.", "en", 18),
    ("The answer is 18", "en", 18),
    ("So the final answer is **18** dollars.", "en", 18),
    ("**Answer:** 42", "en", 42),
    ("The answer is:\n\n18", "en", 18),
    ("the answer is $18.", "en", 18),
    ("The answer is 18 dollars (9 x 2).", "en", 18),      # first number after the cue
    ("The answer is: 16 - 3 - 4 = 9", "en", 9),           # after the last "="
    ("The answer is 18.\n\nIf you have 3 more questions, ask!", "en", 18),  # line/sentence cut
    ("First 5 + 3 = 8. The answer is 8. Then 100 other things.", "en", 8),
    # the last cue with a number wins; a cue without a number is skipped
    ("The answer is 5. Wait, recheck: the answer is 7.", "en", 7),
    ('I will write "The answer is N." 3 + 4 = 7', "en", 7),
    # LaTeX boxed, thousands braces
    ("Thus $\\boxed{18}$ dollars, and 5 more.", "en", 18),
    ("The final answer is $\\boxed{1{,}250}$.", "en", 1250),
    # no cue: last number
    ("She makes 16 - 3 - 4 = 9 eggs, 9 * 2 = 18", "en", 18),
    ("no digits at all", "en", None),
    ("", "en", None),
    # thousands separators and decimals
    ("The answer is 2,125.", "en", 2125),
    ("The answer is 114,200 dollars.", "en", 114200),
    ("The answer is 1,14,200.", "bn", 114200),             # Indian grouping
    ("The answer is 12.5.", "en", 12.5),
    ("The answer is 18.00", "en", 18),
    ("The answer is 1,234.5", "en", 1234.5),
    ("The answer is 1\u202f234.", "fr", 1234),             # narrow no-break space grouping
    ("18,5", "en", 5),                                     # not a number: 18 and 5
    # comma-decimal languages
    ("Die Antwort lautet 2.125.", "de", 2125),
    ("Die Antwort lautet 2,5.", "de", 2.5),
    ("Die Antwort lautet 2,125.", "de", 2125),             # English-style grouping kept
    ("La réponse est 1.000.000,50 €.", "fr", 1000000.5),
    ("La respuesta es 70.000.", "es", 70000),
    ("Ответ: 70 000", "ru", 70000),                        # plain space groups in ru/fr
    ("The answer is 70 000", "en", 70),                    # ... not in English
    ("Ответ — 42.", "ru", 42),
    # negative numbers
    ("The answer is -5.", "en", -5),
    ("The answer is \u22125.", "en", -5),                  # U+2212 minus
    ("3-2", "en", 2),
    ("x-5", "en", 5),
    # native digits and cues
    ("答案是 18。", "zh", 18),
    ("所以她每天赚 9×2=18 美元。答案是：18。", "zh", 18),
    ("答案是 １８ 元。", "zh", 18),                         # full-width digits
    ("答案是：１，２３４", "zh", 1234),                      # full-width grouping comma
    ("共有18，然后", "zh", 18),                             # CJK comma is not a separator
    ("答えは 18 です。", "ja", 18),
    ("คำตอบคือ ๑๘", "th", 18),                               # Thai digits
    ("คำตอบคือ 18 บาท", "th", 18),
    ("উত্তর হল ১৮।", "bn", 18),                              # Bengali digits
    ("উত্তর হল ১৮। তারপর ৫", "bn", 18),                    # danda ends the sentence
    ("الجواب ٣ + ٥ = ٨", "ar", 8),                         # Arabic-Indic digits, no cue
    ("٣٫٥", "ar", 3.5),                                    # Arabic decimal separator
    ("Jibu ni 18.", "sw", 18),
    ("సమాధానం ౧౮.", "te", 18),                              # Telugu digits
    ("The answer is १८", "en", 18),                         # Devanagari digits
]


@pytest.mark.parametrize("text,lang,want", EXTRACT_CASES)
def test_extract_answer(text, lang, want):
    got = extract_answer(text, lang)
    if want is None:
        assert got is None
    else:
        assert got is not None and math.isclose(got, want, abs_tol=1e-9), (text, got, want)


def test_find_numbers():
    assert find_numbers("18,5 and 3.5 and \u22124, then 1,000") == [18, 5, 3.5, -4, 1000]
    assert find_numbers("٣ ০ ๓ ３ ౩") == [3, 0, 3, 3, 3]


@pytest.mark.parametrize("lang", sorted(MGSM_INSTRUCTIONS))
def test_every_instruction_cue_is_extracted(lang):
    """The answer phrase each language's instruction asks for is one the extractor knows."""
    cue = MGSM_ANSWER_CUES[lang]
    assert cue.split()[0].lower() in MGSM_INSTRUCTIONS[lang].lower()
    assert extract_answer(f"Work 3 + 4 = 7 and 10. {cue} 1234", lang) == 1234
    p = mgsm_prompt("Q?", lang)
    assert p.startswith("Q?\n\n") and p.endswith(MGSM_INSTRUCTIONS[lang])
    assert mgsm_prompt("Q?", "xx").endswith(MGSM_INSTRUCTIONS["en"])


def test_extract_answer_rejects_non_str():
    with pytest.raises(TypeError, match="str"):
        extract_answer(18)


# -- MGSM accounting -----------------------------------------------------------------------------
def test_mgsm_accounting_exact(monkeypatch):
    prompts = [_mgsm(0, "en", 18), _mgsm(1, "en", 3), _mgsm(2, "en", 70000), _mgsm(3, "en", 5),
               _mgsm(0, "zh", 18), _mgsm(1, "zh", 3)]
    responses = {
        mgsm_prompt(prompts[0].text, "en"): "9 * 2 = 18. The answer is 18.",      # right
        mgsm_prompt(prompts[1].text, "en"): "The answer is 4.",                   # wrong
        mgsm_prompt(prompts[2].text, "en"): "Profit: The answer is 70,000.",      # right
        mgsm_prompt(prompts[3].text, "en"): "I do not know.",                     # no number
        mgsm_prompt(prompts[4].text, "zh"): "答案是 １８。",                        # right
        mgsm_prompt(prompts[5].text, "zh"): "答案是 3。",                           # right
    }
    fake = FakeGenerator(responses)
    monkeypatch.setattr(utility, "_generate", fake)
    res = mgsm_accuracy("model", "tok", prompts, max_new_tokens=17, batch_size=3, progress=False,
                        details=True)
    assert list(res) == ["en", "zh"]
    en, zh = res["en"], res["zh"]
    assert (en["n"], en["correct"], en["accuracy"], en["no_answer"]) == (4, 2, 0.5, 1)
    assert (zh["n"], zh["correct"], zh["accuracy"], zh["no_answer"]) == (2, 2, 1.0, 0)
    assert 0.0 <= en["ci_low"] <= 0.5 <= en["ci_high"] <= 1.0 and en["ci_low"] < en["ci_high"]
    # 2 of 2: the bootstrap would collapse to [1, 1]; the Wilson score interval is reported instead
    assert zh["ci_low"] == pytest.approx(wilson_interval(2, 2)[0]) and zh["ci_high"] == 1.0
    assert [it["correct"] for it in en["items"]] == [True, False, True, False]
    assert [it["pred"] for it in en["items"]] == [18, 4, 70000, None]
    # one generator call per language, with the documented prompt format and settings
    assert len(fake.calls) == 2
    texts, kw = fake.calls[0]
    assert texts == [mgsm_prompt(p.text, "en") for p in prompts[:4]]
    assert kw["max_new_tokens"] == 17 and kw["batch_size"] == 3 and kw["chat"] is True
    assert kw["system_prompt"] is None and kw["progress"] is False


def test_mgsm_bad_input(monkeypatch):
    monkeypatch.setattr(utility, "_generate", FakeGenerator({}))
    bad = Prompt("mgsm:9", "en", "q", "harmless", "mgsm", {"line": 9})
    with pytest.raises(ValueError, match="mgsm:9"):
        mgsm_accuracy(None, None, [bad], progress=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        mgsm_accuracy(None, None, [_mgsm(0, "en", 1)], max_new_tokens=0)
    with pytest.raises(TypeError, match="Prompt"):
        mgsm_accuracy(None, None, ["a string"])
    assert mgsm_accuracy(None, None, []) == {}


def test_mgsm_end_to_end_smollm2(smollm2):
    """Through the real edit_runtime.generation.generate_responses (batched greedy, chat)."""
    model, tokenizer = smollm2
    prompts = load_prompts("mgsm", langs=["en"])[:2]
    res = mgsm_accuracy(model, tokenizer, prompts, max_new_tokens=12, batch_size=2,
                        progress=False, details=True)
    en = res["en"]
    assert en["n"] == 2 and 0 <= en["correct"] <= 2
    assert en["accuracy"] == en["correct"] / 2
    for it, p in zip(en["items"], prompts):
        assert it["gold"] == p.meta["answer"] and isinstance(it["response"], str)
        assert it["response"].strip()  # the model said something
        assert it["pred"] == extract_answer(it["response"], "en")
        assert it["correct"] == (it["pred"] is not None and it["pred"] == it["gold"])


# -- XCOPA ---------------------------------------------------------------------------------------
def test_xcopa_template(caplog):
    assert xcopa_texts("The man fell.", "He tripped.", "cause", "en") == (
        "The man fell because", " he tripped.")
    assert xcopa_texts("该物品用气泡包装纸包着。", "它很易碎。", "cause", "zh") == (
        "该物品用气泡包装纸包着因为", "它很易碎。")
    assert xcopa_texts("Nilikula.", "Nilishiba.", "effect", "sw") == (
        "Nilikula kwa hiyo", " nilishiba.")
    with caplog.at_level("WARNING", logger="edit_runtime.utility"):
        assert xcopa_texts("A.", "B.", "effect", "xx") == ("A so", " b.")
    assert "xx" in caplog.text
    with pytest.raises(ValueError, match="cause"):
        xcopa_texts("A.", "B.", "why", "en")
    assert set(XCOPA_CONNECTIVES) >= {"et", "ht", "id", "it", "qu", "sw", "ta", "th", "tr", "vi",
                                      "zh", "en"}


def _reference_scores(model64, tokenizer, pairs):
    """Float64, one sequence at a time, full logits: sum log p(continuation | context)."""
    out = []
    for context, cont in pairs:
        ctx = tokenizer(context)["input_ids"]
        full = tokenizer(context + cont)["input_ids"]
        assert full[:len(ctx)] == ctx
        k = len(full) - len(ctx)
        ids = torch.tensor([full])
        with torch.no_grad():
            lp = torch.log_softmax(model64(ids, use_cache=False).logits[0].double(), -1)
        out.append((sum(float(lp[t - 1, full[t]]) for t in range(len(full) - k, len(full))), k))
    return out


@pytest.fixture(scope="module")
def xcopa_items():
    ps = load_prompts("xcopa", langs=["zh", "sw", "it"])
    keep = {"xcopa:test:0", "xcopa:test:1", "xcopa:test:2", "xcopa:test:3"}
    return [p for p in ps if p.id in keep]


def test_xcopa_batched_equals_unbatched_and_float64(tiny, tok, xcopa_items):
    pairs = [xcopa_texts(p.text, p.meta[c], p.meta["question"], p.lang)
             for p in xcopa_items for c in ("choice1", "choice2")]
    batched = continuation_logprobs(tiny, tok, pairs, batch_size=5)
    single = [continuation_logprobs(tiny, tok, [pr], batch_size=1)[0] for pr in pairs]
    ref = _reference_scores(copy.deepcopy(tiny).double(), tok, pairs)
    for (sb, kb), (ss, ks), (sr, kr) in zip(batched, single, ref):
        assert kb == ks == kr and kb >= 1
        assert math.isclose(sb, ss, rel_tol=1e-5, abs_tol=1e-4)
        assert math.isclose(sb, sr, rel_tol=1e-5, abs_tol=1e-4)
    spread = max(s for s, _ in ref) - min(s for s, _ in ref)
    assert spread > 1.0  # the scores differ: the comparison is not vacuous


class NoLogitsToKeep(torch.nn.Module):
    """A model whose forward does not take ``logits_to_keep`` (full logits path)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


def test_xcopa_accuracy_matches_reference(tiny, tok, xcopa_items):
    model64 = copy.deepcopy(tiny).double()
    res = xcopa_accuracy(tiny, tok, xcopa_items, batch_size=3, progress=False, details=True)
    res_mean = xcopa_accuracy(NoLogitsToKeep(tiny), tok, xcopa_items, batch_size=8,
                              progress=False, score="mean")
    groups = _by_lang(xcopa_items)
    assert list(res) == list(res_mean) == list(groups) and set(groups) == {"it", "sw", "zh"}
    for lang, items in groups.items():
        ref = _reference_scores(model64, tok, [
            xcopa_texts(p.text, p.meta[c], p.meta["question"], lang)
            for p in items for c in ("choice1", "choice2")])
        want_sum = want_mean = 0
        for j, (p, item) in enumerate(zip(items, res[lang]["items"])):
            (s1, n1), (s2, n2) = ref[2 * j], ref[2 * j + 1]
            assert item["id"] == p.id
            assert item["logprob_sum"] == pytest.approx([s1, s2], rel=1e-5, abs=1e-4)
            assert item["n_tokens"] == [n1, n2]
            gold = p.meta["answer"]
            want_sum += (0 if s1 >= s2 else 1) == gold
            want_mean += (0 if s1 / n1 >= s2 / n2 else 1) == gold
        r, n = res[lang], len(items)
        assert r["n"] == n and r["correct"] == want_sum and r["accuracy"] == want_sum / n
        assert r["accuracy_sum"] == want_sum / n and r["accuracy_mean"] == want_mean / n
        assert r["score"] == "sum" and r["ci_low"] <= r["accuracy"] <= r["ci_high"]
        # score="mean" through the full-logits path (no logits_to_keep) agrees
        assert res_mean[lang]["accuracy"] == want_mean / n == res_mean[lang]["accuracy_mean"]
        assert res_mean[lang]["accuracy_sum"] == want_sum / n


def _by_lang(prompts):
    out = {}
    for p in prompts:
        out.setdefault(p.lang, []).append(p)
    return out


def test_xcopa_bad_input(tiny, tok):
    bad = Prompt("xcopa:test:0", "zh", "p", "harmless", "xcopa", {"choice1": "a"})
    with pytest.raises(ValueError, match="xcopa:test:0"):
        xcopa_accuracy(tiny, tok, [bad], progress=False)
    with pytest.raises(ValueError, match="score"):
        xcopa_accuracy(tiny, tok, [], score="max")


# -- over-refusal --------------------------------------------------------------------------------
class StubJudge:
    """refusal if the response contains REFUSE, invalid if it is '???', else compliance."""

    def __init__(self, budget=None):
        self.calls = []
        if budget is not None:
            self.min_new_tokens_for = lambda lang: budget

    def judge_batch(self, prompts, responses, langs):
        self.calls.append((list(prompts), list(responses), list(langs)))
        return [Verdict("refusal", "refusal_phrase") if "REFUSE" in r else
                Verdict("invalid", "gibberish") if r == "???" else
                Verdict("compliance", "no_refusal") for r in responses]


def _harmless(i, lang, text):
    return Prompt(f"h{i:03d}", lang, text, "harmless", "builtin")


def test_over_refusal_accounting(monkeypatch):
    prompts = [_harmless(1, "en", "a"), _harmless(2, "en", "b"), _harmless(3, "en", "c"),
               _harmless(1, "bn", "ক"), _harmless(2, "bn", "খ")]
    fake = FakeGenerator({"a": "REFUSE", "b": "sure, here", "c": "???", "ক": "ok", "খ": "REFUSE"})
    monkeypatch.setattr(utility, "_generate", fake)
    judge = StubJudge()
    res = over_refusal("model", "tok", prompts, judge=judge, batch_size=4, progress=False,
                       details=True)
    assert (res["en"]["n"], res["en"]["refusals"], res["en"]["invalid"]) == (3, 1, 1)
    assert res["en"]["rate"] == pytest.approx(1 / 3)
    assert (res["bn"]["n"], res["bn"]["refusals"], res["bn"]["rate"]) == (2, 1, 0.5)
    assert res["en"]["ci_low"] <= res["en"]["rate"] <= res["en"]["ci_high"]
    assert [it["label"] for it in res["en"]["items"]] == ["refusal", "compliance", "invalid"]
    # budget per language from edit_runtime.judge.min_new_tokens_for; chat, no system prompt
    # one generation call for all languages, with one budget per prompt
    assert [kw["max_new_tokens"] for _, kw in fake.calls] == [[min_new_tokens_for("en")] * 3
                                                              + [min_new_tokens_for("bn")] * 2]
    assert res["bn"]["max_new_tokens"] == min_new_tokens_for("bn") > min_new_tokens_for("en")
    assert all(kw["chat"] and kw["system_prompt"] is None for _, kw in fake.calls)
    assert judge.calls[1] == (["ক", "খ"], ["ok", "REFUSE"], ["bn", "bn"])
    # an explicit budget wins; a judge's own budget is used when it has one
    fake.calls.clear()
    over_refusal(None, None, prompts, judge=StubJudge(), max_new_tokens=7, progress=False)
    assert {kw["max_new_tokens"] for _, kw in fake.calls} == {7}
    fake.calls.clear()
    over_refusal(None, None, prompts, judge=StubJudge(budget=11), progress=False)
    assert {kw["max_new_tokens"] for _, kw in fake.calls} == {11}


def test_over_refusal_default_keyword_judge(monkeypatch):
    prompts = [_harmless(1, "en", "How do I bake bread?"),
               _harmless(2, "en", "Name three rivers in Europe.")]
    monkeypatch.setattr(utility, "_generate", FakeGenerator({
        prompts[0].text: "I'm sorry, but I can't help with that request.",
        prompts[1].text: "Three rivers in Europe are the Danube, the Rhine and the Seine."}))
    res = over_refusal(None, None, prompts, progress=False)
    assert (res["en"]["refusals"], res["en"]["n"], res["en"]["rate"]) == (1, 2, 0.5)


# -- next-token KL -------------------------------------------------------------------------------
KL_PROMPTS = [_harmless(1, "en", "How do I bake bread at home?"),
              _harmless(2, "en", "Name three rivers."),
              _harmless(1, "zh", "如何在家烤面包？"),
              _harmless(2, "zh", "请说出三条河流的名字，并简单介绍一下它们。"),
              _harmless(3, "zh", "你好")]


def _reference_kl(base64, edit64, tokenizer, prompts):
    """{lang: (mean last-token KL, max, mean all-token KL, max)} in float64, one prompt at a time."""
    per: dict[str, list] = {}
    for p in prompts:
        ids = tokenizer(render_chat(tokenizer, p.text), add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            lb = torch.log_softmax(base64(x, use_cache=False).logits[0].double(), -1)
            le = torch.log_softmax(edit64(x, use_cache=False).logits[0].double(), -1)
        kl = (lb.exp() * (lb - le)).sum(-1)  # (T,)
        per.setdefault(p.lang, []).append(kl)
    out = {}
    for lang, kls in per.items():
        last = torch.stack([k[-1] for k in kls])
        allk = torch.cat(kls)
        out[lang] = (float(last.mean()), float(last.max()), float(allk.mean()),
                     float(allk.max()), int(allk.numel()))
    return out


def test_next_token_kl_random_delta_matches_float64(tiny, tok):
    delta = random_delta(tiny, 1, magnitude=1.0, seed=5)
    base64 = copy.deepcopy(tiny).double()
    edit64 = dense_edited(tiny, delta).double()
    ref = _reference_kl(base64, edit64, tok, KL_PROMPTS)
    handle = patch_model(tiny, delta)
    try:
        last = next_token_kl(tiny, tok, KL_PROMPTS, handle, batch_size=2, progress=False)
        allp = next_token_kl(tiny, tok, KL_PROMPTS, handle, positions="all", batch_size=3,
                             progress=False)
        assert handle.enabled  # state restored
        handle.disable()
        again = next_token_kl(tiny, tok, KL_PROMPTS, handle, batch_size=5, progress=False)
        assert not handle.enabled  # still disabled afterwards, yet edited = enabled inside
    finally:
        handle.remove()
    for lang, (m_last, x_last, m_all, x_all, n_pos) in ref.items():
        assert m_last > 1e-4  # the edit moves the distribution
        assert last[lang]["n"] == allp[lang]["n"] == sum(p.lang == lang for p in KL_PROMPTS)
        assert last[lang]["n_positions"] == last[lang]["n"]
        assert allp[lang]["n_positions"] == n_pos
        assert last[lang]["mean_kl"] == pytest.approx(m_last, rel=1e-3, abs=1e-7)
        assert last[lang]["max_kl"] == pytest.approx(x_last, rel=1e-3, abs=1e-7)
        assert allp[lang]["mean_kl"] == pytest.approx(m_all, rel=1e-3, abs=1e-7)
        assert allp[lang]["max_kl"] == pytest.approx(x_all, rel=1e-3, abs=1e-7)
        assert again[lang]["mean_kl"] == pytest.approx(last[lang]["mean_kl"], rel=1e-6, abs=1e-12)


def test_next_token_kl_noop_delta_is_zero(tiny, tok):
    real = random_delta(tiny, 1)
    zero = SparseDelta([ModuleEdit(e.module, e.side, e.neurons, torch.zeros_like(e.U),
                                   torch.zeros_like(e.V)) for e in real.edits])
    handle = patch_model(tiny, zero)
    try:
        for positions in ("last", "all"):
            res = next_token_kl(tiny, tok, KL_PROMPTS, handle, positions=positions,
                                batch_size=2, progress=False)
            for r in res.values():
                assert r["mean_kl"] == 0.0 and r["max_kl"] == 0.0
    finally:
        handle.remove()


def test_next_token_kl_bad_input(tiny, tok):
    handle = patch_model(tiny, random_delta(tiny, 1))
    try:
        with pytest.raises(ValueError, match="positions"):
            next_token_kl(tiny, tok, KL_PROMPTS, handle, positions="first")
        with pytest.raises(TypeError, match="PatchHandle"):
            next_token_kl(tiny, tok, KL_PROMPTS, object())
        handle.set_row_mask([True])
        with pytest.raises(ValueError, match="row mask"):
            next_token_kl(tiny, tok, KL_PROMPTS, handle)
        handle.clear_row_mask()
        # a gate's row mask is no error: the gate re-decides it in every forward; one that turns
        # the edit off everywhere leaves KL 0 (test_evaluate checks a gate that splits the rows)
        from edit_runtime.gate import ProbeGate, attach_gate
        off = ProbeGate(0, torch.zeros(tiny.config.hidden_size), -1.0, 0.0)
        with attach_gate(handle, off) as gh:
            handle.set_row_mask([True], owner=gh)  # the gate's, left by a previous forward of another size
            res = next_token_kl(tiny, tok, KL_PROMPTS, handle, batch_size=2, progress=False)
        assert all(r["mean_kl"] == 0.0 for r in res.values())
        handle.merge()
        with pytest.raises(ValueError, match="merged"):
            next_token_kl(tiny, tok, KL_PROMPTS, handle)
        handle.unmerge()
    finally:
        handle.remove()
