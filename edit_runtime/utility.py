"""Utility metrics, per language: what an edit must not break.

Four metrics, each returning ``{lang: {...}}`` in the order the languages first appear:

=======================  ==================================================================
:func:`mgsm_accuracy`    MGSM math word problems, greedy chain of thought, answer number
                         extracted from the response (:func:`extract_answer`) and compared
                         with ``Prompt.meta["answer"]``
:func:`xcopa_accuracy`   XCOPA by log-likelihood of the two choices (:func:`xcopa_texts`),
                         no generation
:func:`over_refusal`     fraction of harmless prompts whose greedy response the judge labels
                         ``refusal``
:func:`next_token_kl`    mean / max KL(base || edited) of next-token distributions on
                         harmless prompts, base = the :class:`~edit_runtime.patch.PatchHandle`
                         disabled, edited = enabled
=======================  ==================================================================

Rates come with a percentile bootstrap 95 % interval from :func:`edit_runtime.judge.bootstrap_rate`
(2000 binomial resamples = resampling the items with replacement; generator
``numpy.random.default_rng([0, crc32(lang)])``, so a language's interval does not depend on
which other languages are evaluated). A rate of 0 or 1, where every resample repeats the sample
and the bootstrap interval would be a point, gets the Wilson score interval instead.

Generation goes through :func:`edit_runtime.generation.generate_responses` (batched greedy,
left padding, the model's chat template, no system prompt). Log-likelihood scoring and the KL
run plain forwards, right-padded (real tokens keep positions ``0..L-1``, padding is masked and
never read), and ask the model for the logits of the needed positions only
(``logits_to_keep``, falling back to full logits for models without it); logits are fp32 (the
model's dtype otherwise) and every log-softmax after that is float64.

MGSM prompt format
------------------
Zero-shot, one user turn in the chat template: the question, a blank line, and an instruction in
the question's language (:data:`MGSM_INSTRUCTIONS`; English for a language not listed) asking
for step-by-step work ending with the native form of "The answer is N." as in the native
chain-of-thought exemplars of the MGSM paper (Shi et al. 2022): en "The answer is N.", zh
"答案是 N。", ja "答えは N です。", th "คำตอบคือ N", bn "উত্তর হল N।", ... (:data:`MGSM_ANSWER_CUES`).
The English one::

    <question>

    Solve the problem step by step. At the end, write "The answer is N.", where N is the final
    number.

Answer extraction (:func:`extract_answer`)
------------------------------------------
1. Digits are normalised: every Unicode decimal digit (Bengali ০-৯, Thai ๐-๙, Arabic-Indic ٠-٩,
   Devanagari, Telugu, full-width ０-９, ...) becomes ASCII; "−" (U+2212), and "－"/"．"/"，"
   between full-width digits become "-", ".", ","; Arabic "٫"/"٬" become "." / ","; LaTeX ``{,}``
   becomes ",".
2. Numbers: runs of digits with inner separators. "," (and no-break / thin spaces) group
   thousands when every group after the first has 3 digits (Indian 2-digit lakh groups before
   the last 3 are accepted: "1,14,200"); "." is the decimal mark. In the comma-decimal languages
   (:data:`COMMA_DECIMAL_LANGS`: de es fr ru it pt nl pl tr id vi) the roles swap ("1.234,5"),
   except that a single "," followed by exactly 3 digits still groups thousands (models write
   "2,125" in German too; MGSM answers are integers). In fr ru uk pl cs sk
   (:data:`SPACE_GROUP_LANGS`) a plain space groups thousands too ("70 000"); elsewhere only
   no-break and thin spaces do. A run that is no valid number splits into
   its digit groups ("18,5" in English is 18 and 5). A "-" right before the digits is a sign
   unless a letter, digit or closing bracket precedes it ("3-2" is 3 and 2).
3. The answer is taken after the **last answer cue** that has a number after it: any cue of any
   language (:data:`MGSM_ANSWER_CUES` plus "answer:", "final answer", "答案为", ...; the model may
   answer a Chinese question in English), or LaTeX ``\\boxed{``. The text after the cue is cut
   at the end of its line and at the first sentence end ("." + space, "。", "।", "!", "?"); a boxed
   answer at its "}". In that segment the answer is the first number after the last "=" if
   there is one ("The answer is 16 - 3 - 4 = 9"), else the first number ("The answer is 18
   dollars (9 x 2)").
4. With no cue followed by a number: the **last number of the response**. No number: ``None``
   (counted wrong). Numbers in words ("eighteen", "十八") are not read.

A prediction is correct when it equals the integer gold answer within 1e-6 ("18.00" is 18).

XCOPA template
--------------
Raw text, no chat template (a log-likelihood probe of the language model itself)::

    context      = premise without its final ". 。 ! ? ！ ？" + SEP + connective[question]
    continuation = SEP + choice with its first letter lower-cased

``SEP`` is a space, or nothing for zh and ja (no spaces between words there). The connectives
(:data:`XCOPA_CONNECTIVES`) are those of lm-evaluation-harness's XCOPA tasks for the 11 XCOPA
languages (zh "因为"/"所以", th "เพราะ"/"ดังนั้น", sw "kwa sababu"/"kwa hiyo", ...), en
"because"/"so", and for a language not listed the English ones (a warning is logged, and the
result should be read as a weaker probe). The tokenizer encodes ``context`` (with its special
tokens, e.g. a BOS) and ``context + continuation``; the continuation tokens are the tail of the
joint encoding when the joint encoding starts with the context's tokens (the usual case), else
the separate encoding of the continuation. The score of a choice is the **sum** of the float64
log-probabilities of its continuation tokens (default ``score="sum"``, the accuracy
lm-evaluation-harness reports for XCOPA); ``score="mean"`` divides by the number of
continuation tokens. Both accuracies are returned (``accuracy`` by the chosen score,
``accuracy_sum`` and ``accuracy_mean`` always). The higher score wins; a tie goes to choice 1.

KL
--
Each prompt is rendered with the chat template (:func:`edit_runtime.data.render_chat`,
generation header included) and encoded without extra special tokens. Per position ``t`` (the
last prompt token, ``positions="last"``; every prompt token, ``"all"``)::

    KL_t = sum_v p_base(v) * (log p_base(v) - log p_edit(v)),   log p = log_softmax(float64(logits))

``mean_kl`` is the mean over prompts of the last-token KL ("last") or over every (prompt,
token) pair ("all", token-weighted); ``max_kl`` the largest single ``KL_t``; ``n`` the number of
prompts (and ``n_positions`` the number of positions averaged).
"""
from __future__ import annotations

import logging
import math
import os
import re
import unicodedata
import zlib
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from edit_runtime.data import Prompt

log = logging.getLogger(__name__)

__all__ = [
    "MGSM_INSTRUCTIONS",
    "MGSM_ANSWER_CUES",
    "COMMA_DECIMAL_LANGS",
    "SPACE_GROUP_LANGS",
    "XCOPA_CONNECTIVES",
    "mgsm_prompt",
    "extract_answer",
    "find_numbers",
    "xcopa_texts",
    "continuation_logprobs",
    "mgsm_accuracy",
    "xcopa_accuracy",
    "over_refusal",
    "next_token_kl",
]

N_BOOT = 2000
BOOT_SEED = 0

# --------------------------------------------------------------------------------------------
# MGSM: prompt and answer extraction
# --------------------------------------------------------------------------------------------

#: the instruction appended (after a blank line) to an MGSM question, per language
MGSM_INSTRUCTIONS: dict[str, str] = {
    "en": 'Solve the problem step by step. At the end, write "The answer is N.", where N is the '
          "final number.",
    "es": 'Resuelve el problema paso a paso. Al final, escribe "La respuesta es N.", donde N es '
          "el número final.",
    "fr": "Résous le problème étape par étape. À la fin, écris « La réponse est N. », où N est "
          "le nombre final.",
    "de": "Löse die Aufgabe Schritt für Schritt. Schreibe am Ende „Die Antwort lautet N.“, wobei "
          "N die endgültige Zahl ist.",
    "ru": "Решите задачу шаг за шагом. В конце напишите «Ответ: N», где N — итоговое число.",
    "zh": "请一步一步地解答这道题。最后写出“答案是 N。”，其中 N 是最终的数字。",
    "ja": "この問題を段階的に解いてください。最後に「答えは N です。」と書いてください。N は最終的な数です。",
    "th": "จงแก้โจทย์นี้ทีละขั้นตอน ในตอนท้ายให้เขียนว่า \"คำตอบคือ N\" โดยที่ N คือตัวเลขคำตอบสุดท้าย",
    "sw": 'Tatua swali hili hatua kwa hatua. Mwishoni, andika "Jibu ni N.", ambapo N ni namba ya '
          "mwisho.",
    "bn": "ধাপে ধাপে সমস্যাটির সমাধান করো। শেষে লেখো \"উত্তর হল N।\", যেখানে N হল চূড়ান্ত সংখ্যা।",
    "te": "ఈ సమస్యను దశలవారీగా పరిష్కరించండి. చివరలో \"సమాధానం N.\" అని రాయండి, ఇక్కడ N తుది సంఖ్య.",
}

#: the answer phrase each instruction asks for (the native "The answer is N")
MGSM_ANSWER_CUES: dict[str, str] = {
    "en": "The answer is", "es": "La respuesta es", "fr": "La réponse est",
    "de": "Die Antwort lautet", "ru": "Ответ:", "zh": "答案是", "ja": "答えは", "th": "คำตอบคือ",
    "sw": "Jibu ni", "bn": "উত্তর হল", "te": "సమాధానం",
}

#: languages whose decimal mark is "," (and "." groups thousands)
COMMA_DECIMAL_LANGS = frozenset("de es fr ru it pt nl pl tr id vi uk cs sk".split())
#: languages that also group thousands with a plain space ("70 000")
SPACE_GROUP_LANGS = frozenset("fr ru uk pl cs sk".split())

# Every cue of every language is searched (a model often answers in English or Chinese).
_CUE_PATTERNS = [
    r"answer\s+is", r"answer\s*[:：=]", r"final\s+answer",
    r"respuesta\s+(?:final\s+)?es", r"respuesta\s*[:：]",
    r"réponse\s+(?:finale\s+)?est", r"réponse\s*[:：]",
    r"antwort\s+(?:lautet|ist)", r"antwort\s*[:：]",
    r"ответ\s*[:：—–-]", r"ответ\s+(?:равен|будет|составляет)",
    r"答案(?:是|为|為)", r"答案\s*[:：]", r"最终答案", r"答えは", r"答え\s*[:：]",
    r"คำตอบ\s*(?:คือ|[:：])", r"jibu\s+(?:ni|la\s+mwisho\s+ni)", r"jibu\s*[:：]",
    r"উত্তর\s+(?:হল|হলো|হবে)", r"উত্তর\s*[:：]", r"సమాధానం",
]
_CUE_RX = re.compile("|".join(f"(?:{p})" for p in _CUE_PATTERNS), re.IGNORECASE)
_BOXED_RX = re.compile(r"\\boxed\s*\{")
_SEP_CLASS = ".,\u00a0\u202f\u2009 "
_RAW_NUM_RX = re.compile(r"[0-9]+(?:[.,\u00a0\u202f\u2009][0-9]+)*")
_RAW_NUM_SPACE_RX = re.compile(r"[0-9]+(?:[.,\u00a0\u202f\u2009 ][0-9]+)*")
_SPACES = frozenset("\u00a0\u202f\u2009 ")
_SENTENCE_END_RX = re.compile(r"[.!?](?=\s|$)|[。！？।\n]")
_FW_DIGIT = "[\uff10-\uff19]"


def mgsm_prompt(question: str, lang: str) -> str:
    """The user turn for an MGSM question: ``question + "\\n\\n" + MGSM_INSTRUCTIONS[lang]``
    (the English instruction for a language without one)."""
    return f"{question.strip()}\n\n{MGSM_INSTRUCTIONS.get(lang, MGSM_INSTRUCTIONS['en'])}"


def _normalize_digits(text: str) -> str:
    """ASCII digits for every Unicode decimal digit; full-width / Arabic separators, the minus
    sign and LaTeX ``{,}`` made ASCII (see the module docstring, step 1)."""
    text = text.replace("{,}", ",").replace("\u2212", "-")
    text = re.sub(f"(?<={_FW_DIGIT})\uff0c(?={_FW_DIGIT})", ",", text)
    text = re.sub(f"(?<={_FW_DIGIT})\uff0e(?={_FW_DIGIT})", ".", text)
    text = re.sub(f"\uff0d(?={_FW_DIGIT})", "-", text)
    text = text.replace("\u066b", ".").replace("\u066c", ",")
    out = []
    for ch in text:
        if ch.isdigit() and not ("0" <= ch <= "9"):
            d = unicodedata.decimal(ch, None)
            out.append(str(d) if d is not None else ch)
        else:
            out.append(ch)
    return "".join(out)


def _valid_groups(parts: Sequence[str]) -> bool:
    """Digit groups ``parts`` (split at the grouping separator) form one grouped integer:
    first 1-3 digits, the rest 3 digits, or Indian grouping (2-digit groups before the last 3)."""
    if len(parts) < 2 or not 1 <= len(parts[0]) <= 3 or len(parts[-1]) != 3:
        return False
    mids = parts[1:-1]
    return all(len(p) == 3 for p in mids) or all(len(p) == 2 for p in mids)


def _parse_run(raw: str, comma_decimal: bool) -> list[float] | None:
    """One number for a digit run with inner separators, or None when it is not one number."""
    seps = [c for c in raw if not c.isdigit()]
    if not seps:
        return [float(int(raw))]
    parts = re.split(f"[{_SEP_CLASS}]", raw)
    marks = [c for c in seps if c not in _SPACES]
    kinds = set(marks)
    if not kinds:  # only (no-break/thin) spaces: grouping
        return [float("".join(parts))] if _valid_groups(parts) else None
    if len(kinds) == 2:  # both "." and ",": the last is the decimal mark and occurs once
        dec = seps[-1]
        if dec in _SPACES or marks.count(dec) != 1:
            return None
        if not _valid_groups(parts[:-1]):
            return None
        return [float("".join(parts[:-1]) + "." + parts[-1])]
    (mark,) = kinds
    decimal_mark = "," if comma_decimal else "."
    if len(marks) > 1 or seps[-1] != mark:  # several marks (or spaces after it): grouping only
        return [float("".join(parts))] if _valid_groups(parts) else None
    grouped = _valid_groups(parts)
    if mark == decimal_mark:
        if comma_decimal and grouped and not (set(seps) & _SPACES):
            return [float("".join(parts))]  # "2,125" written English-style
        if len(parts) > 2 and not _valid_groups(parts[:-1]):
            return None
        return [float("".join(parts[:-1]) + "." + parts[-1])]
    if grouped:
        return [float("".join(parts))]
    if mark == ".":  # "1.5" in a comma-decimal language: English-style decimal
        if len(parts) > 2 and not _valid_groups(parts[:-1]):
            return None
        return [float("".join(parts[:-1]) + "." + parts[-1])]
    return None


def _numbers(norm: str, lang: str | None, start: int = 0, end: int | None = None
             ) -> list[tuple[int, float]]:
    """``(position, value)`` of the numbers in ``norm[start:end]`` (already digit-normalised)."""
    comma_decimal = lang in COMMA_DECIMAL_LANGS
    rx = _RAW_NUM_SPACE_RX if lang in SPACE_GROUP_LANGS else _RAW_NUM_RX
    end = len(norm) if end is None else end
    out: list[tuple[int, float]] = []
    for m in rx.finditer(norm, start, end):
        vals = _parse_run(m.group(), comma_decimal)
        if vals is None:  # not one number: each digit group is a number of its own
            pos = m.start()
            for piece in re.split(f"([{_SEP_CLASS}])", m.group()):
                if piece.isdigit():
                    out.append((pos, float(int(piece))))
                pos += len(piece)
            continue
        pos = m.start()
        value = vals[0]
        if pos > 0 and norm[pos - 1] == "-":
            before = norm[pos - 2] if pos >= 2 else " "
            if not (before.isalnum() or before in ")]}"):
                value = -value
        out.append((pos, value))
    return out


def find_numbers(text: str, lang: str | None = None) -> list[float]:
    """Every number in ``text`` in order (native digits and separators handled, see the module
    docstring, steps 1-2)."""
    return [v for _, v in _numbers(_normalize_digits(text), lang)]


def extract_answer(text: str, lang: str | None = None) -> float | None:
    """The final numeric answer of a response, or ``None`` (module docstring, steps 1-4).

    ``lang`` only decides the decimal mark (:data:`COMMA_DECIMAL_LANGS`); cues of every
    language are searched whatever ``lang`` is.
    """
    if not isinstance(text, str):
        raise TypeError(f"response must be a str, got {type(text).__name__}")
    norm = _normalize_digits(text)
    cues = [(m.start(), m.end(), False) for m in _CUE_RX.finditer(norm)]
    cues += [(m.start(), m.end(), True) for m in _BOXED_RX.finditer(norm)]
    for _, end, boxed in sorted(cues, reverse=True):
        if boxed:
            close = norm.find("}", end)
            seg_end = len(norm) if close < 0 else close
        else:
            i = end
            while i < len(norm) and norm[i].isspace():
                i += 1
            m = _SENTENCE_END_RX.search(norm, i)
            seg_end = len(norm) if m is None else m.start()
        nums = _numbers(norm, lang, end, seg_end)
        if not nums:
            continue
        eq = norm.rfind("=", end, seg_end)
        after = [v for p, v in nums if p > eq] if eq >= 0 else []
        return after[0] if after else nums[0][1]
    nums = _numbers(norm, lang)
    return nums[-1][1] if nums else None


# --------------------------------------------------------------------------------------------
# XCOPA: template
# --------------------------------------------------------------------------------------------

#: (cause, effect) connectives; lm-evaluation-harness's XCOPA connectors plus English
XCOPA_CONNECTIVES: dict[str, tuple[str, str]] = {
    "en": ("because", "so"),
    "et": ("sest", "seetõttu"),
    "ht": ("poukisa", "donk sa"),
    "id": ("karena", "maka"),
    "it": ("perché", "quindi"),
    "qu": ("imataq", "chaymi"),
    "sw": ("kwa sababu", "kwa hiyo"),
    "ta": ("காரணமாக", "எனவே"),
    "th": ("เพราะ", "ดังนั้น"),
    "tr": ("çünkü", "bu yüzden"),
    "vi": ("bởi vì", "vì vậy"),
    "zh": ("因为", "所以"),
}
_NO_SPACE_LANGS = frozenset({"zh", "ja"})
_FINAL_PUNCT = ".。!?！？"


def xcopa_texts(premise: str, choice: str, question: str, lang: str) -> tuple[str, str]:
    """``(context, continuation)`` of one XCOPA choice (module docstring, "XCOPA template")."""
    if question not in ("cause", "effect"):
        raise ValueError(f"XCOPA question must be 'cause' or 'effect', got {question!r}")
    if lang not in XCOPA_CONNECTIVES:
        log.warning("no XCOPA connective for language %r; using the English ones", lang)
    cause, effect = XCOPA_CONNECTIVES.get(lang, XCOPA_CONNECTIVES["en"])
    sep = "" if lang in _NO_SPACE_LANGS else " "
    premise = premise.strip().rstrip(_FINAL_PUNCT).rstrip()
    choice = choice.strip()
    choice = choice[:1].lower() + choice[1:]
    return f"{premise}{sep}{cause if question == 'cause' else effect}", f"{sep}{choice}"


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------

def _generate(model: Any, tokenizer: Any, texts: Sequence[str], **kw: Any) -> list[str]:
    """Greedy chat generation through the shared generator (imported on first use)."""
    from edit_runtime.generation import generate_responses

    return generate_responses(model, tokenizer, texts, **kw)


def _rate(k: int, n: int, lang: str) -> dict:
    from edit_runtime.judge import bootstrap_rate

    b = bootstrap_rate(k, n, n_boot=N_BOOT, seed=[BOOT_SEED, zlib.crc32(lang.encode("utf-8"))])
    return {"value": b["value"], "ci_low": b["lo"], "ci_high": b["hi"]}


def _group(prompts: Iterable[Prompt], what: str) -> dict[str, list[Prompt]]:
    out: dict[str, list[Prompt]] = {}
    for p in prompts:
        if not isinstance(p, Prompt):
            raise TypeError(f"{what}: expected edit_runtime.data.Prompt records, got "
                            f"{type(p).__name__}")
        out.setdefault(p.lang, []).append(p)
    return out


def _check_positive(**kw: Any) -> None:
    from edit_runtime.generation import check_positive_int

    for name, v in kw.items():
        check_positive_int(name, v)


def _device(model: Any):
    import torch

    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _tqdm(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, leave=False)


def _selected_logits(model: Any, input_ids, attention_mask, select):
    """Logits at the True positions of ``select``.

    input_ids, attention_mask, select: (B, T); returns (select.sum(), V) in the model's logits
    dtype, rows in row-major order of ``select``. Asks the model for those positions only
    (``logits_to_keep`` as a boolean (B, T) mask, transformers >= 5); a model that does not
    take it gets a plain forward and the rows are picked here.
    """
    import torch

    n_sel = int(select.sum())
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=select,
                    use_cache=False).logits
        if out.dim() == 2 and out.shape[0] == n_sel:
            return out
    except (TypeError, IndexError, ValueError):
        pass
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    if logits.dim() != 3 or logits.shape[:2] != select.shape:
        raise RuntimeError(f"model returned logits of shape {tuple(logits.shape)}, expected "
                           f"(B, T, V) with (B, T) = {tuple(select.shape)}")
    return logits[select.to(logits.device)]


def _pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device):
    """(B, T) ids and attention mask, right-padded."""
    import torch

    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)


def _pad_id(tokenizer: Any) -> int:
    pid = getattr(tokenizer, "pad_token_id", None)
    if pid is None:
        pid = getattr(tokenizer, "eos_token_id", None)
    return 0 if pid is None else int(pid)


def _encode(tokenizer: Any, text: str, special: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    return [int(i) for i in ids]


def _batches(order: Sequence[int], size: int) -> Iterator[list[int]]:
    for s in range(0, len(order), size):
        yield list(order[s:s + size])


# --------------------------------------------------------------------------------------------
# MGSM
# --------------------------------------------------------------------------------------------

def mgsm_accuracy(model: Any, tokenizer: Any, prompts: Sequence[Prompt], *,
                  max_new_tokens: int = 256, batch_size: int = 8, progress: bool = True,
                  details: bool = False) -> dict[str, dict]:
    """MGSM accuracy per language (greedy, zero-shot native instruction; module docstring).

    prompts: MGSM :class:`Prompt` records (``load_prompts("mgsm", ...)``), each with an integer
    ``meta["answer"]``. Returns ``{lang: {"accuracy", "n", "correct", "ci_low", "ci_high",
    "no_answer"}}`` (``no_answer``: responses with no number at all); with ``details`` also
    ``"items": [{"id", "gold", "pred", "correct", "response"}]``.
    """
    _check_positive(max_new_tokens=max_new_tokens, batch_size=batch_size)
    groups = _group(prompts, "mgsm_accuracy")
    for lang, ps in groups.items():
        for p in ps:
            a = p.meta.get("answer")
            if isinstance(a, bool) or not isinstance(a, (int, float)):
                raise ValueError(f"mgsm_accuracy: prompt {p.id!r} ({lang}) has no numeric "
                                 f"meta['answer'] (got {a!r}); load it with load_prompts('mgsm')")
    results: dict[str, dict] = {}
    for lang, ps in groups.items():
        texts = [mgsm_prompt(p.text, lang) for p in ps]
        responses = _generate(model, tokenizer, texts, max_new_tokens=max_new_tokens,
                              batch_size=batch_size, system_prompt=None, chat=True,
                              progress=progress, desc=f"mgsm {lang}")
        if len(responses) != len(ps):
            raise RuntimeError(f"generator returned {len(responses)} responses for {len(ps)} "
                               "prompts")
        items = []
        for p, r in zip(ps, responses):
            pred = extract_answer(r, lang)
            gold = p.meta["answer"]
            ok = pred is not None and math.isclose(pred, gold, rel_tol=0.0, abs_tol=1e-6)
            items.append({"id": p.id, "gold": gold, "pred": pred, "correct": ok, "response": r})
        k = sum(it["correct"] for it in items)
        rate = _rate(k, len(items), lang)
        res = {"accuracy": rate["value"], "n": len(items), "correct": k,
               "ci_low": rate["ci_low"], "ci_high": rate["ci_high"],
               "no_answer": sum(it["pred"] is None for it in items)}
        if details:
            res["items"] = items
        log.info("MGSM %s: %d/%d = %.3f", lang, k, len(items), res["accuracy"])
        results[lang] = res
    return results


# --------------------------------------------------------------------------------------------
# XCOPA
# --------------------------------------------------------------------------------------------

def _xcopa_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], int]:
    """(full token ids, number of continuation tokens at the end)."""
    ctx = _encode(tokenizer, context, True)
    full = _encode(tokenizer, context + continuation, True)
    if len(full) > len(ctx) and full[:len(ctx)] == ctx:
        return full, len(full) - len(ctx)
    cont = _encode(tokenizer, continuation, False)
    return ctx + cont, len(cont)


def continuation_logprobs(model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], *,
                          batch_size: int = 8, progress: bool = False,
                          desc: str = "loglik") -> list[tuple[float, int]]:
    """``(sum of log p(continuation tokens | context), number of continuation tokens)`` for each
    ``(context, continuation)`` pair: right-padded batches of ``batch_size`` sequences (sorted by
    length), float64 log-softmax of the model's logits. A context must give at least one token.
    """
    import torch

    _check_positive(batch_size=batch_size)
    seqs: list[list[int]] = []
    ncont: list[int] = []
    for context, continuation in pairs:
        full, k = _xcopa_pair(tokenizer, context, continuation)
        if k < 1 or k >= len(full):
            raise ValueError(f"cannot score continuation {continuation!r} after context "
                             f"{context!r}: {k} continuation tokens of {len(full)}")
        seqs.append(full)
        ncont.append(k)
    out: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    device = _device(model)
    pad = _pad_id(tokenizer)
    bar = _tqdm(len(seqs), desc, progress)
    with torch.no_grad():
        for idx in _batches(order, batch_size):
            ids, mask = _pad_right([seqs[i] for i in idx], pad, device)
            B, T = ids.shape
            select = torch.zeros((B, T), dtype=torch.bool, device=device)
            target = torch.zeros((B, T), dtype=torch.long, device=device)
            for b, i in enumerate(idx):
                L, k = len(seqs[i]), ncont[i]
                select[b, L - k - 1:L - 1] = True     # position t predicts token t + 1
                target[b, :L - 1] = ids[b, 1:L]
            logits = _selected_logits(model, ids, mask, select)
            lp = torch.log_softmax(logits.double(), dim=-1)
            tok_lp = lp.gather(1, target[select].unsqueeze(1)).squeeze(1)
            rows = select.nonzero()[:, 0]
            sums = torch.zeros(B, dtype=torch.float64, device=device).index_add_(0, rows, tok_lp)
            for b, i in enumerate(idx):
                out[i] = (float(sums[b]), ncont[i])
            bar.update(len(idx))
    bar.close()
    return out


def xcopa_accuracy(model: Any, tokenizer: Any, prompts: Sequence[Prompt], *, batch_size: int = 8,
                   progress: bool = True, score: str = "sum",
                   details: bool = False) -> dict[str, dict]:
    """XCOPA accuracy per language by log-likelihood (module docstring, "XCOPA template").

    prompts: XCOPA :class:`Prompt` records (``load_prompts("xcopa", ...)``: premise as text,
    ``meta`` with ``choice1``, ``choice2``, ``question``, ``answer`` in {0, 1}). ``batch_size``
    counts sequences per forward (two per item). ``score``: ``"sum"`` (default) or ``"mean"``
    log-prob of the choice tokens decides ``accuracy``. Returns ``{lang: {"accuracy", "n",
    "correct", "ci_low", "ci_high", "accuracy_sum", "accuracy_mean", "score"}}``; with
    ``details`` also ``"items": [{"id", "gold", "pred", "logprob_sum", "n_tokens"}]``.
    """
    if score not in ("sum", "mean"):
        raise ValueError(f"score must be 'sum' or 'mean', got {score!r}")
    _check_positive(batch_size=batch_size)
    groups = _group(prompts, "xcopa_accuracy")
    for lang, ps in groups.items():
        for p in ps:
            m = p.meta
            if (not all(isinstance(m.get(k), str) for k in ("choice1", "choice2", "question"))
                    or m.get("answer") not in (0, 1)):
                raise ValueError(f"xcopa_accuracy: prompt {p.id!r} ({lang}) needs meta choice1, "
                                 f"choice2, question (str) and answer (0/1); got {dict(m)!r}")
    results: dict[str, dict] = {}
    for lang, ps in groups.items():
        pairs = []
        for p in ps:
            for c in ("choice1", "choice2"):
                pairs.append(xcopa_texts(p.text, p.meta[c], p.meta["question"], lang))
        scores = continuation_logprobs(model, tokenizer, pairs, batch_size=batch_size,
                                       progress=progress, desc=f"xcopa {lang}")
        items = []
        k_sum = k_mean = 0
        for j, p in enumerate(ps):
            (s1, n1), (s2, n2) = scores[2 * j], scores[2 * j + 1]
            pred_sum = 0 if s1 >= s2 else 1
            pred_mean = 0 if s1 / n1 >= s2 / n2 else 1
            gold = int(p.meta["answer"])
            k_sum += pred_sum == gold
            k_mean += pred_mean == gold
            items.append({"id": p.id, "gold": gold,
                          "pred": pred_sum if score == "sum" else pred_mean,
                          "logprob_sum": [s1, s2], "n_tokens": [n1, n2]})
        n = len(ps)
        k = k_sum if score == "sum" else k_mean
        rate = _rate(k, n, lang)
        res = {"accuracy": rate["value"], "n": n, "correct": k, "ci_low": rate["ci_low"],
               "ci_high": rate["ci_high"], "accuracy_sum": k_sum / n, "accuracy_mean": k_mean / n,
               "score": score}
        if details:
            res["items"] = items
        log.info("XCOPA %s: %d/%d = %.3f (%s)", lang, k, n, res["accuracy"], score)
        results[lang] = res
    return results


# --------------------------------------------------------------------------------------------
# over-refusal
# --------------------------------------------------------------------------------------------

def over_refusal(model: Any, tokenizer: Any, prompts: Sequence[Prompt], *, judge: Any = None,
                 max_new_tokens: int | None = None, batch_size: int = 8, progress: bool = True,
                 details: bool = False, responses_path: str | os.PathLike | None = None,
                 variant: str = "base", extra: Mapping[str, Any] | None = None) -> dict[str, dict]:
    """Fraction of (harmless) prompts whose greedy chat response ``judge`` labels ``refusal``.

    judge: anything with ``judge_batch(prompts, responses, langs)`` (default
    :class:`~edit_runtime.judge.KeywordJudge`). max_new_tokens: ``None`` = the judge's budget
    per language (``judge.min_new_tokens_for(lang)`` if it has one, else
    :func:`edit_runtime.judge.min_new_tokens_for`). Returns ``{lang: {"rate", "n", "refusals",
    "ci_low", "ci_high", "invalid", "max_new_tokens"}}``: ``rate`` = refusals / n, so an
    ``invalid`` response (empty, parroted, incomprehension, ...) counts as not refused and is
    counted apart; with ``details`` also ``"items": [{"id", "label", "reason", "response"}]``.
    Prompts labelled harmful are accepted but logged as a warning.

    responses_path: a resumable JSONL file for the responses
    (:func:`edit_runtime.generation.generate_to_jsonl`, keyed by ``variant`` and checked against
    ``extra``, e.g. the delta's digest): a rerun judges the responses already there instead of
    generating them again. ``None``: generate in memory.
    """
    from edit_runtime import judge as judge_mod

    _check_positive(batch_size=batch_size)
    if max_new_tokens is not None:
        _check_positive(max_new_tokens=max_new_tokens)
    judge = judge_mod.KeywordJudge() if judge is None else judge
    if not hasattr(judge, "judge_batch"):
        raise TypeError(f"judge must have judge_batch(prompts, responses, langs); got "
                        f"{type(judge).__name__}")
    budget: Callable[[str], int] = getattr(judge, "min_new_tokens_for",
                                           judge_mod.min_new_tokens_for)
    groups = _group(prompts, "over_refusal")
    n_harmful = sum(p.label == "harmful" for ps in groups.values() for p in ps)
    if n_harmful:
        log.warning("over_refusal got %d prompts labelled harmful; over-refusal is meant for "
                    "harmless prompts", n_harmful)
    results: dict[str, dict] = {}
    # One generation call for every language (per-prompt budgets): full batches, not one
    # small batch per language.
    budgets = {lang: max_new_tokens if max_new_tokens is not None else int(budget(lang))
               for lang in groups}
    flat = [p for ps in groups.values() for p in ps]
    all_texts = [p.text for p in flat]
    all_budgets = [budgets[lang] for lang, ps in groups.items() for _ in ps]
    same = len(set(all_budgets)) == 1
    if responses_path is not None:
        from edit_runtime.generation import generate_to_jsonl

        recs = generate_to_jsonl(model, tokenizer, flat, responses_path, max_new_tokens=all_budgets,
                                 batch_size=batch_size, variant=variant, extra=extra, progress=progress,
                                 desc="over-refusal")
        all_responses = [r["response"] for r in recs]
    else:
        all_responses = _generate(model, tokenizer, all_texts,
                                  max_new_tokens=all_budgets[0] if same else all_budgets,
                                  batch_size=batch_size, system_prompt=None, chat=True,
                                  progress=progress, desc="over-refusal")
    if len(all_responses) != len(all_texts):
        raise RuntimeError(f"generator returned {len(all_responses)} responses for "
                           f"{len(all_texts)} prompts")
    start = 0
    for lang, ps in groups.items():
        tokens = budgets[lang]
        texts = [p.text for p in ps]
        responses = all_responses[start:start + len(ps)]
        start += len(ps)
        verdicts = list(judge.judge_batch(texts, responses, [lang] * len(ps)))
        if len(verdicts) != len(ps):
            raise RuntimeError(f"judge returned {len(verdicts)} verdicts for {len(ps)} responses")
        labels = [getattr(v, "label", v) for v in verdicts]
        k = sum(lab == "refusal" for lab in labels)
        rate = _rate(k, len(ps), lang)
        res = {"rate": rate["value"], "n": len(ps), "refusals": k, "ci_low": rate["ci_low"],
               "ci_high": rate["ci_high"], "invalid": sum(lab == "invalid" for lab in labels),
               "max_new_tokens": tokens}
        if details:
            res["items"] = [{"id": p.id, "label": lab, "reason": getattr(v, "reason", None),
                             "response": r}
                            for p, lab, v, r in zip(ps, labels, verdicts, responses)]
        log.info("over-refusal %s: %d/%d = %.3f", lang, k, len(ps), res["rate"])
        results[lang] = res
    return results


# --------------------------------------------------------------------------------------------
# KL between base and edited next-token distributions
# --------------------------------------------------------------------------------------------

def _kl_rows(base_logits, edit_logits, chunk: int = 64):
    """KL(base || edit) per row, float64: (N, V), (N, V) -> (N,)."""
    import torch

    out = []
    for s in range(0, base_logits.shape[0], chunk):
        lb = torch.log_softmax(base_logits[s:s + chunk].double(), dim=-1)
        le = torch.log_softmax(edit_logits[s:s + chunk].double(), dim=-1)
        out.append((lb.exp() * (lb - le)).sum(-1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def next_token_kl(model: Any, tokenizer: Any, prompts: Sequence[Prompt], handle: Any, *,
                  positions: str = "last", batch_size: int = 8,
                  progress: bool = True) -> dict[str, dict]:
    """Mean KL(base || edited) of next-token distributions per language (module docstring, "KL").

    handle: the :class:`~edit_runtime.patch.PatchHandle` of the edit on ``model``; the base pass
    runs inside ``handle.disabled()``, the edited one inside ``handle.enabled_ctx()``, and the
    handle's state is restored afterwards. It must be unmerged and without a row mask of its
    user's (a gate attached with :func:`edit_runtime.gate.attach_gate` is fine: it decides the
    rows in each forward, and KL is 0 on the rows it leaves off).
    positions: ``"last"`` (the last prompt token, default) or ``"all"`` (every prompt token).
    Returns ``{lang: {"mean_kl", "max_kl", "n", "n_positions"}}``.
    """
    import torch

    from edit_runtime.data import render_chat

    if positions not in ("last", "all"):
        raise ValueError(f"positions must be 'last' or 'all', got {positions!r}")
    _check_positive(batch_size=batch_size)
    for attr in ("disabled", "enabled_ctx"):
        if not hasattr(handle, attr):
            raise TypeError(f"handle must be a PatchHandle (with .{attr}()), got "
                            f"{type(handle).__name__}")
    if getattr(handle, "merged", False):
        raise ValueError(f"{handle!r} is merged into the weights: unmerge() it to compare base "
                         "and edited")
    if getattr(handle, "row_mask", None) is not None and getattr(handle, "row_mask_owner", None) is None:
        # a gate's mask is fine: the gate re-decides it in every forward, both passes included
        raise ValueError(f"{handle!r} has a row mask set: clear_row_mask() first (it would fix "
                         "the batch size and edit only some rows)")
    groups = _group(prompts, "next_token_kl")
    device = _device(model)
    pad = _pad_id(tokenizer)
    results: dict[str, dict] = {}
    for lang, ps in groups.items():
        seqs = [_encode(tokenizer, render_chat(tokenizer, p.text), False) for p in ps]
        for p, s in zip(ps, seqs):
            if not s:
                raise ValueError(f"prompt {p.id!r} ({lang}) encodes to no tokens")
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        total, count, kl_max = 0.0, 0, 0.0
        bar = _tqdm(len(seqs), f"kl {lang}", progress)
        with torch.no_grad():
            for idx in _batches(order, batch_size):
                ids, mask = _pad_right([seqs[i] for i in idx], pad, device)
                if positions == "last":
                    select = torch.zeros_like(mask, dtype=torch.bool)
                    for b, i in enumerate(idx):
                        select[b, len(seqs[i]) - 1] = True
                else:
                    select = mask.bool()
                with handle.disabled():
                    base = _selected_logits(model, ids, mask, select)
                with handle.enabled_ctx():
                    edit = _selected_logits(model, ids, mask, select)
                kl = _kl_rows(base, edit)
                total += float(kl.sum())
                count += int(kl.numel())
                kl_max = max(kl_max, float(kl.max()))
                bar.update(len(idx))
        bar.close()
        res = {"mean_kl": total / count, "max_kl": kl_max, "n": len(ps), "n_positions": count}
        log.info("KL %s (%s): mean %.3g, max %.3g over %d positions", lang, positions,
                 res["mean_kl"], kl_max, count)
        results[lang] = res
    return results
