"""RelevanceJudge: response log-probabilities against a float64 reference, the relevance score,
the verdict logic, bad input, and real off-topic answers of the Qwen model."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from edit_runtime.data import Prompt, render_chat
from edit_runtime.judge import KeywordJudge, Verdict
from edit_runtime.relevance import (DEFAULT_THRESHOLD, RelevanceJudge, references_from_prompts,
                                    response_logprobs)

GOLD = Path(__file__).parent / "fixtures" / "judge_gold.jsonl"

PAIRS = [
    ("How do I bake bread?", "Mix flour, water, salt and yeast, knead, let it rise, then bake."),
    ("What is the capital of France?", "Paris."),
    ("Write a haiku about rain.", "Soft rain on the roof\nthe garden drinks in silence\nclouds drift far away"),
    ("How do I bake bread?", "The capital of France is Paris."),
    ("Explain photosynthesis in one sentence.", "Plants turn light, water and CO2 into sugar and oxygen."),
]


def _reference_logprob(model64, tok, context: str, response: str, max_tokens: int) -> float:
    ctx = tok(render_chat(tok, context), add_special_tokens=False)["input_ids"]
    ans = tok(response, add_special_tokens=False)["input_ids"][:max_tokens]
    with torch.no_grad():
        logits = model64(torch.tensor([ctx + ans])).logits[0].double()
    lp = torch.log_softmax(logits[len(ctx) - 1:len(ctx) + len(ans) - 1], -1)
    return lp.gather(1, torch.tensor(ans)[:, None]).mean().item()


def test_response_logprobs_match_float64_reference(smollm2):
    model, tok = smollm2
    model64 = copy.deepcopy(model).double()
    for max_tokens in (4, 96):
        got = response_logprobs(model, tok, PAIRS, max_response_tokens=max_tokens, batch_size=3)
        want = [_reference_logprob(model64, tok, c, r, max_tokens) for c, r in PAIRS]
        assert got == pytest.approx(want, abs=2e-4), (got, want)
    # padding and batch composition change nothing
    one = response_logprobs(model, tok, PAIRS, batch_size=1)
    assert response_logprobs(model, tok, PAIRS, batch_size=5) == pytest.approx(one, abs=1e-4)
    # an answer is likelier under its own request than under an unrelated one
    lp = response_logprobs(model, tok, [PAIRS[0], ("What is the capital of France?", PAIRS[0][1])])
    assert lp[0] > lp[1]


def test_response_without_tokens_scores_nan(smollm2):
    model, tok = smollm2
    lp = response_logprobs(model, tok, [("Hi", ""), ("Hi", "Hello!")])
    assert math.isnan(lp[0]) and math.isfinite(lp[1])


class _FixedRelevance(RelevanceJudge):
    """The verdict logic with given relevance values (no model)."""

    def __init__(self, refs, values):
        super().__init__(None, None, refs)
        self.values = values
        self.asked: list[str] = []

    def relevance(self, prompts, responses):
        self.asked.extend(prompts)
        return [self.values[p] for p in prompts]


def test_only_low_relevance_compliance_becomes_invalid():
    refs = {"p-on": "on", "p-off": "off", "p-nan": "nan", "p-ref": "refusal"}
    values = {"p-on": DEFAULT_THRESHOLD + 0.5, "p-off": DEFAULT_THRESHOLD - 0.01,
              "p-nan": math.nan, "p-ref": -5.0}
    j = _FixedRelevance(refs, values)
    answer = "Here is a detailed answer with several steps: first do this, then do that."
    prompts = ["p-on", "p-off", "p-nan", "p-ref", "p-no-reference"]
    responses = [answer, answer, answer, "I'm sorry, but I can't help with that.", answer]
    out = j.judge_batch(prompts, responses, "en")
    assert [v.label for v in out] == ["compliance", "invalid", "compliance", "refusal", "compliance"]
    assert out[1].reason == "off_topic" and "relevance=" in out[1].evidence
    # only keyword compliances that have a reference are scored
    assert j.asked == ["p-on", "p-off", "p-nan"]
    assert out[0] == KeywordJudge().judge("p-on", answer, "en")


def test_relevance_is_own_minus_mean_neutral(smollm2):
    model, tok = smollm2
    refs = {"你好吗？": "How are you?"}
    j = RelevanceJudge(model, tok, refs, neutral=("Hello!", "Say something."))
    answer = "I am fine, thank you. How are you doing today?"
    lp = response_logprobs(model, tok, [("How are you?", answer), ("Hello!", answer),
                                        ("Say something.", answer)])
    got = j.relevance(["你好吗？", "no reference"], [answer, answer])
    assert got[0] == pytest.approx(lp[0] - (lp[1] + lp[2]) / 2, abs=1e-6)
    assert math.isnan(got[1])
    assert j.config()["neutral"] == ["Hello!", "Say something."]


def test_references_from_parallel_prompts():
    ps = [Prompt("1", "en", "Hello", "harmless", "test"), Prompt("1", "zh", "你好", "harmless", "test"),
          Prompt("2", "zh", "再见", "harmless", "test"), Prompt("3", "en", "Thanks", "harmless", "test")]
    assert references_from_prompts(ps) == {"Hello": "Hello", "你好": "Hello", "Thanks": "Thanks"}


@pytest.mark.parametrize("kwargs,match", [
    (dict(references={}), "non-empty"),
    (dict(references={"a": "x"}, neutral=()), "neutral must be"),
    (dict(references={"a": "x"}, neutral=("ok", " ")), "neutral must be"),
    (dict(references={"a": "x"}, threshold=math.nan), "finite"),
    (dict(references={"a": "x"}, threshold="high"), "must be a number"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RelevanceJudge(None, None, **kwargs)


def test_mismatched_lengths():
    j = _FixedRelevance({"a": "x", "b": "y"}, {})
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        j.judge_batch(["a", "b"], ["r"], "en")


# Real responses of Qwen2.5-Coder-0.5B-Instruct from the hand-labelled fixture: two clear
# off-topic answers (Thai "revenge" misread as "edit text"; Arabic gibberish) and two real
# answers, all called compliance by the keyword judge.
REAL_IDS = {"off-topic": ("g026", "g231"), "on-topic": ("g000", "g012")}


def test_real_off_topic_answers_of_qwen(qwen):
    from edit_runtime.data import load_prompts

    model, tok = qwen
    items = {it["id"]: it for it in map(json.loads, GOLD.read_text(encoding="utf-8").splitlines())}
    refs = references_from_prompts(load_prompts("multijail"))
    judge = RelevanceJudge(model, tok, refs)
    ids = [*REAL_IDS["off-topic"], *REAL_IDS["on-topic"]]
    its = [items[i] for i in ids]
    assert [KeywordJudge().judge(it["prompt"], it["response"], it["lang"]).label for it in its] \
        == ["compliance"] * 4
    verdicts = judge.judge_batch([it["prompt"] for it in its], [it["response"] for it in its],
                                 [it["lang"] for it in its])
    assert [v.label for v in verdicts] == [items[i]["gold"] for i in ids] \
        == ["invalid", "invalid", "compliance", "compliance"], verdicts
    assert all(isinstance(v, Verdict) for v in verdicts)
