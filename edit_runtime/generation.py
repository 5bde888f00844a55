"""Batched greedy generation for evaluation, and resumable JSONL result files.

:func:`generate_responses` is the project's one generation routine (the judge, the utility
metrics and the evaluation all go through it):

* prompts are rendered with the model's chat template (:func:`edit_runtime.data.render_chat`,
  the same token ids as the fitting code's :func:`edit_runtime.capture.encode_prompts`), or fed
  raw with ``chat=False``;
* greedy decoding (``do_sample=False``, one beam), **left padding** with an explicit attention
  mask, so every row's last prompt token sits at the same position and new tokens follow it;
* within one call the prompts are sorted by their token budget (``max_new_tokens`` may be one
  int or one per prompt), then by length, longest first, and cut into full batches: a batch may
  mix budgets, and each row stops at its own (a per-row stopping criterion; greedy tokens do not
  depend on how long the other rows run), so a small leftover of one budget does not cost a
  batch of its own; results come back in input order;
* on CPU in fp32 the model's linear layers run on oneDNN-packed weights for the duration of the
  call (:mod:`edit_runtime.packed_linear`: small-batch decoding GEMMs are ~2x faster than eager
  MKL's, a generation call ~20 % faster; same tokens up to fp32 rounding of near-ties;
  ``EDIT_RUNTIME_PACKED_LINEAR=0`` turns it off);
* only the newly generated tokens are decoded, cut at the first end-of-sequence token (the
  tokenizer's and the generation config's EOS ids), special tokens stripped; a response cut by
  the budget loses trailing U+FFFD characters (the partial bytes of a character split by the
  cut, common in Bengali and Thai), which the judge would otherwise count as gibberish.

In fp32 a left-padded batch gives the same greedy tokens as one prompt at a time (checked on the
real SmolLM2 by ``tests/test_generation.py``); in bf16/fp16 padding can change the rounding of
attention sums and flip a near-tie.

Result files (:func:`generate_to_jsonl`)
---------------------------------------
One JSON object per line and prompt::

    {"id": "multijail:17", "lang": "bn", "label": "harmful", "source": "multijail",
     "prompt": "...", "response": "...", "variant": "base", "max_new_tokens": 192,
     "n_tokens": 57, "finish_reason": "stop", "settings": {...}}

``n_tokens`` counts the generated tokens up to and including the EOS token (``finish_reason``
``"stop"``) or all ``max_new_tokens`` of them (``"length"``). ``settings`` echoes what decides the
text: ``{"decoding": "greedy", "chat": true, "system_prompt": ..., "extra": ...}`` (``extra`` is
the caller's, e.g. the model name and the delta's digest). Lines are appended and flushed after
every batch, so an interrupted run loses at most one batch. A rerun on the same file skips every
``(id, lang, variant)`` already there, after checking that its prompt text, ``max_new_tokens``
and settings are those asked for now (a mismatch is an error: write to a new file); a truncated
last line (a crash mid-write) is dropped and redone.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

log = logging.getLogger(__name__)

__all__ = ["generate_responses", "generate_detailed", "generate_to_jsonl", "read_jsonl",
           "Generation", "SETTINGS_VERSION"]

#: bump when the generation procedure changes in a way that changes the text of a response
SETTINGS_VERSION = 1


class Generation(tuple):
    """``(text, n_tokens, finish_reason)`` of one prompt (a named 3-tuple)."""

    __slots__ = ()

    def __new__(cls, text: str, n_tokens: int, finish_reason: str) -> "Generation":
        return super().__new__(cls, (text, n_tokens, finish_reason))

    @property
    def text(self) -> str:
        return self[0]

    @property
    def n_tokens(self) -> int:
        return self[1]

    @property
    def finish_reason(self) -> str:
        return self[2]


# --------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------

def check_positive_int(name: str, v: Any) -> int:
    """``v`` if it is an int ≥ 1 (bools refused), else ``ValueError`` naming ``name``."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def _texts(texts: Any) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a sequence of strings, got a single string; wrap it in a list")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
    return out


def _budgets(max_new_tokens: int | Sequence[int], n: int) -> list[int]:
    if isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool):
        return [check_positive_int("max_new_tokens", max_new_tokens)] * n
    try:
        budgets = list(max_new_tokens)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"max_new_tokens must be a positive int or one per text, got "
                         f"{max_new_tokens!r}") from None
    if len(budgets) != n:
        raise ValueError(f"max_new_tokens has {len(budgets)} entries for {n} texts")
    return [check_positive_int(f"max_new_tokens[{i}]", b) for i, b in enumerate(budgets)]


# --------------------------------------------------------------------------------------------
# model plumbing
# --------------------------------------------------------------------------------------------

def _device(model: Any):
    import torch

    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                getattr(tokenizer, "eos_token_id", None)):
        if src is None:
            continue
        for i in (src if isinstance(src, (list, tuple)) else [src]):
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError("neither the model's generation_config nor the tokenizer defines an "
                         "eos_token_id; greedy generation would never stop early")
    return ids


def _pad_id(model: Any, tokenizer: Any, eos: list[int]) -> int:
    for v in (getattr(tokenizer, "pad_token_id", None),
              getattr(getattr(model, "generation_config", None), "pad_token_id", None)):
        if v is not None:
            return int(v)
    return eos[0]


def _generation_config(model: Any, eos: list[int], pad: int, max_new_tokens: int):
    """A greedy GenerationConfig: the model's with sampling knobs cleared (no warnings)."""
    import copy

    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    cfg = copy.deepcopy(base) if base is not None else GenerationConfig()
    cfg.do_sample = False
    cfg.num_beams = 1
    for knob in ("temperature", "top_p", "top_k", "min_p", "typical_p"):
        if hasattr(cfg, knob):
            setattr(cfg, knob, None)
    cfg.max_new_tokens = max_new_tokens
    cfg.max_length = None
    cfg.min_new_tokens = None
    cfg.min_length = 0
    cfg.eos_token_id = eos
    cfg.pad_token_id = pad
    cfg.num_return_sequences = 1
    return cfg


def _encode(tokenizer: Any, texts: list[str], system_prompt: str | None, chat: bool) -> list[list[int]]:
    from edit_runtime.capture import encode_prompts

    if not chat and system_prompt is not None:
        raise ValueError("system_prompt needs chat=True (without the chat template there is no "
                         "system turn); prepend it to the texts yourself")
    return encode_prompts(tokenizer, texts, system_prompt=system_prompt, chat_template=chat)


def _plan(lengths: list[int], budgets: list[int], batch_size: int) -> list[list[int]]:
    """Batches of indices, full except the last: largest budget first, then longest prompt (a
    batch runs to its first row's budget; each row stops at its own)."""
    order = sorted(range(len(lengths)), key=lambda i: (-budgets[i], -lengths[i], i))
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def _row_budgets(prompt_len: int, budgets: list[int], device: Any):
    """A transformers stopping criterion that finishes row b once it has ``budgets[b]`` new
    tokens (generate pads a finished row and stops when every row has finished)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    limit = torch.as_tensor(budgets, device=device)

    class RowBudgets(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            return (input_ids.shape[1] - prompt_len) >= limit

    return StoppingCriteriaList([RowBudgets()])


def _linears(model: Any) -> list:
    """Every plain ``nn.Linear`` of ``model`` (the decoder's projections and the LM head): what a
    generation call packs for oneDNN on CPU."""
    from torch import nn

    return [m for m in model.modules() if type(m) is nn.Linear]


def _iter_generate(model: Any, tokenizer: Any, texts: list[str], budgets: list[int], *,
                   batch_size: int, system_prompt: str | None, chat: bool, progress: bool,
                   desc: str | None) -> Iterator[list[tuple[int, Generation]]]:
    """Yields, batch by batch, ``[(input index, Generation), ...]``."""
    from tqdm.auto import tqdm

    from edit_runtime.packed_linear import packed_linears

    if not texts:
        return
    seqs = _encode(tokenizer, texts, system_prompt, chat)
    eos = _eos_ids(model, tokenizer)
    pad = _pad_id(model, tokenizer, eos)
    device = _device(model)
    bar = tqdm(total=len(texts), desc=desc or "generate", disable=not progress, leave=False,
               unit="prompt")
    try:
        with packed_linears(_linears(model)):
            yield from _generate_batches(model, tokenizer, seqs, budgets, batch_size=batch_size,
                                         eos=eos, pad=pad, device=device, bar=bar)
    finally:
        bar.close()


def _generate_batches(model: Any, tokenizer: Any, seqs: list[list[int]], budgets: list[int], *,
                      batch_size: int, eos: list[int], pad: int, device: Any,
                      bar: Any) -> Iterator[list[tuple[int, Generation]]]:
    """Generates :func:`_plan`'s batches; yields ``[(input index, Generation), ...]`` per batch."""
    import torch

    eos_set = set(eos)
    for idx in _plan([len(s) for s in seqs], budgets, batch_size):
        T = max(len(seqs[i]) for i in idx)
        ids = torch.full((len(idx), T), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        for b, i in enumerate(idx):
            s = seqs[i]
            ids[b, T - len(s):] = torch.as_tensor(s, dtype=torch.long)
            mask[b, T - len(s):] = 1
        row_budgets = [budgets[i] for i in idx]
        cfg = _generation_config(model, eos, pad, max(row_budgets))
        stop_rows = (_row_budgets(T, row_budgets, device) if min(row_budgets) < max(row_budgets)
                     else None)
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 generation_config=cfg, stopping_criteria=stop_rows)
        if not isinstance(out, torch.Tensor):
            out = out.sequences
        new = out[:, T:].cpu().tolist()
        results = []
        for b, i in enumerate(idx):
            toks = new[b][:budgets[i]]
            stop = next((k for k, t in enumerate(toks) if t in eos_set), None)
            if stop is None:
                kept, n_tok, reason = toks, len(toks), "length"
            else:
                kept, n_tok, reason = toks[:stop], stop + 1, "stop"
            text = tokenizer.decode(kept, skip_special_tokens=True)
            if reason == "length":
                # a byte-level BPE cut mid-character decodes its partial bytes as U+FFFD;
                # that is the budget's artefact, not the model's output
                text = text.rstrip("\ufffd")
            results.append((i, Generation(text, n_tok, reason)))
        bar.update(len(idx))
        yield results


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------

def generate_detailed(model: Any, tokenizer: Any, texts: Sequence[str], *,
                      max_new_tokens: int | Sequence[int] = 128, batch_size: int = 8,
                      system_prompt: str | None = None, chat: bool = True,
                      progress: bool = True, desc: str | None = None) -> list[Generation]:
    """:func:`generate_responses` returning ``Generation(text, n_tokens, finish_reason)``."""
    texts = _texts(texts)
    budgets = _budgets(max_new_tokens, len(texts))
    check_positive_int("batch_size", batch_size)
    out: list[Generation | None] = [None] * len(texts)
    for results in _iter_generate(model, tokenizer, texts, budgets, batch_size=batch_size,
                                  system_prompt=system_prompt, chat=chat, progress=progress,
                                  desc=desc):
        for i, g in results:
            out[i] = g
    return [g for g in out if g is not None]


def generate_responses(model: Any, tokenizer: Any, texts: Sequence[str], *,
                       max_new_tokens: int | Sequence[int] = 128, batch_size: int = 8,
                       system_prompt: str | None = None, chat: bool = True,
                       progress: bool = True, desc: str | None = None) -> list[str]:
    """Greedy responses to ``texts``, batched with left padding; returns only the new text.

    Args:
        model: a ``*ForCausalLM`` (patched or not) on its device; ``generate`` is called on it.
        tokenizer: its tokenizer (a chat template is needed with ``chat=True``).
        texts: user messages, ``(N,)`` strings.
        max_new_tokens: budget of new tokens, one int or one per text (bucketed into batches of
            one budget each).
        batch_size: prompts per ``generate`` call.
        system_prompt: optional system turn (chat only).
        chat: render with the chat template (default) or feed the raw text with the
            tokenizer's special tokens.
        progress: tqdm bar over prompts; desc: its label.

    Returns:
        ``(N,)`` strings in input order: the generated tokens up to the first EOS, decoded with
        special tokens stripped.
    """
    return [g.text for g in generate_detailed(
        model, tokenizer, texts, max_new_tokens=max_new_tokens, batch_size=batch_size,
        system_prompt=system_prompt, chat=chat, progress=progress, desc=desc)]


# --------------------------------------------------------------------------------------------
# resumable JSONL
# --------------------------------------------------------------------------------------------

def _scan(path: Path) -> tuple[list[dict], int | None, bool]:
    """``(records, truncate_at, add_newline)``: the valid records; the byte offset of a
    truncated last line to cut (None if none); whether the file lacks its final newline."""
    if not path.exists():
        return [], None, False
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    last = max((k for k, line in enumerate(lines) if line.strip()), default=-1)
    records: list[dict] = []
    pos = 0
    for k, line in enumerate(lines):
        start = pos
        pos += len(line) + 1
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            if k != last:
                raise ValueError(f"{path}: line {k + 1} is not a JSON object ({e}); the file is "
                                 "corrupt: remove that line or write to a new file") from None
            log.warning("%s: ignoring the truncated last line %d (%d bytes); its prompt will be "
                        "generated again", path, k + 1, len(line))
            return records, start, False
        records.append(rec)
    return records, None, bool(raw) and not raw.endswith(b"\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a result file (``[]`` if it does not exist).

    A last line that is not valid JSON (an interrupted write) is ignored with a warning (and cut
    by the next :func:`generate_to_jsonl` on the file); a bad line anywhere else is an error
    naming it.
    """
    return _scan(Path(path))[0]


def _settings(system_prompt: str | None, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    s = {"decoding": "greedy", "chat": True, "system_prompt": system_prompt,
         "version": SETTINGS_VERSION, "extra": None if extra is None else dict(extra)}
    try:
        return json.loads(json.dumps(s, sort_keys=True))
    except TypeError as e:
        raise ValueError(f"extra must be JSON-serialisable: {e}") from None


def check_prompt_records(prompts: Sequence[Any]) -> None:
    """Raises ``TypeError`` naming the first item that is not a prompt record
    (:class:`edit_runtime.data.Prompt`: ``id``, ``lang``, ``text``, ``label``), e.g. a bare string."""
    for i, p in enumerate(prompts):
        if not all(hasattr(p, attr) for attr in ("id", "lang", "text", "label")):
            raise TypeError(f"prompts must be edit_runtime.data.Prompt records (id, lang, text, label; see "
                            f"load_prompts), got {type(p).__name__}: {p!r:.60} (prompts[{i}])")


def _settings_diff(old: Any, new: Any) -> str:
    """Where two settings differ, as ``dotted.key: old != new`` for each differing leaf, instead of
    both dicts whole (a changed delta reads ``extra.delta: 'e2da…' != 'f6fd…'``)."""
    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix or "settings": d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(old), flat(new)
    return ", ".join(f"{k}: {a.get(k)!r} != {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def _resumed(records: list[dict], prompts: Sequence[Any], keys: list[tuple[str, str]], budgets: list[int],
             settings: dict, variant: str, path: Path) -> dict[int, dict]:
    """``{prompt index: record}`` of the prompts the file already answers; raises ``ValueError``
    when a record for one of them was generated with another text, budget or settings."""
    existing: dict[tuple[str, str], dict] = {}
    for rec in records:
        if rec.get("variant") == variant:
            existing[(str(rec.get("id")), str(rec.get("lang")))] = rec
    done: dict[int, dict] = {}
    for i, (p, key) in enumerate(zip(prompts, keys)):
        rec = existing.get(key)
        if rec is None:
            continue
        problems = []
        if rec.get("prompt") != p.text:
            problems.append("the prompt text differs")
        if rec.get("max_new_tokens") != budgets[i]:
            problems.append(f"max_new_tokens {rec.get('max_new_tokens')} != {budgets[i]}")
        if rec.get("settings") != settings:
            problems.append(f"settings differ (the file's != now): {_settings_diff(rec.get('settings'), settings)}")
        if problems:
            raise ValueError(
                f"{path} already holds {key} of variant {variant!r} generated differently: "
                f"{'; '.join(problems)}. Write to a new file (or delete this one) to generate "
                "with the new settings")
        done[i] = rec
    return done


def check_resumable(prompts: Sequence[Any], path: str | os.PathLike, *,
                    max_new_tokens: int | Sequence[int] | None = None, system_prompt: str | None = None,
                    variant: str = "base", extra: Mapping[str, Any] | None = None) -> int:
    """The check :func:`generate_to_jsonl` makes before generating, alone: raises the same
    ``ValueError`` when ``path`` holds one of ``prompts`` generated with another text, budget or
    settings; returns how many of them it already answers. Lets a job with several result files
    refuse a stale one before generating anything."""
    from edit_runtime.judge import min_new_tokens_for

    prompts = list(prompts)
    budgets = ([int(min_new_tokens_for(p.lang)) for p in prompts] if max_new_tokens is None
               else _budgets(max_new_tokens, len(prompts)))
    keys = [(str(p.id), str(p.lang)) for p in prompts]
    records = _scan(Path(path))[0]
    return len(_resumed(records, prompts, keys, budgets, _settings(system_prompt, extra), variant, Path(path)))


def generate_to_jsonl(model: Any, tokenizer: Any, prompts: Sequence[Any], path: str | os.PathLike,
                      *, max_new_tokens: int | Sequence[int] | None = None, batch_size: int = 8,
                      system_prompt: str | None = None, variant: str = "base",
                      extra: Mapping[str, Any] | None = None, progress: bool = True,
                      desc: str | None = None) -> list[dict]:
    """Generate a response to every prompt into a resumable JSONL file (module docstring).

    Args:
        prompts: :class:`edit_runtime.data.Prompt` records, ``(id, lang)`` unique.
        path: the result file (created with its folder; appended to).
        max_new_tokens: one int, one per prompt, or ``None`` =
            :func:`edit_runtime.judge.min_new_tokens_for` of each prompt's language.
        variant: name stored in each line (base / a delta's name); part of the resume key.
        extra: JSON-serialisable settings echoed in each line and checked on resume (e.g.
            ``{"model": ..., "delta": digest}``).

    Returns:
        the records of ``prompts``, in their order (those found in the file and the new ones).

    Raises:
        ValueError: duplicate ``(id, lang)``; a record in the file for one of these prompts with
            another text, budget or settings (nothing is generated then).
    """
    from edit_runtime.judge import min_new_tokens_for

    prompts = list(prompts)
    check_prompt_records(prompts)
    if not isinstance(variant, str) or not variant:
        raise ValueError(f"variant must be a non-empty string, got {variant!r}")
    check_positive_int("batch_size", batch_size)
    if max_new_tokens is None:
        budgets = [int(min_new_tokens_for(p.lang)) for p in prompts]
    else:
        budgets = _budgets(max_new_tokens, len(prompts))
    settings = _settings(system_prompt, extra)
    keys = [(str(p.id), str(p.lang)) for p in prompts]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate prompt (id, lang) = {dup} in the prompts")

    path = Path(path)
    records, truncate_at, add_newline = _scan(path)
    done = _resumed(records, prompts, keys, budgets, settings, variant, path)
    todo = [i for i in range(len(prompts)) if i not in done]
    if done:
        log.info("%s: %d of %d responses of %r already there, generating %d", path, len(done),
                 len(prompts), variant, len(todo))
    if todo:
        path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_at is not None:  # cut a truncated last line before appending
            with path.open("r+b") as f:
                f.truncate(truncate_at)
        texts = [prompts[i].text for i in todo]
        with path.open("a", encoding="utf-8") as f:
            if add_newline:
                f.write("\n")
            for results in _iter_generate(model, tokenizer, texts, [budgets[i] for i in todo],
                                          batch_size=batch_size, system_prompt=system_prompt,
                                          chat=True, progress=progress,
                                          desc=desc or f"generate {variant}"):
                for j, g in results:
                    i = todo[j]
                    p = prompts[i]
                    rec = {"id": p.id, "lang": p.lang, "label": p.label,
                           "source": getattr(p, "source", None), "prompt": p.text,
                           "response": g.text, "variant": variant,
                           "max_new_tokens": budgets[i], "n_tokens": g.n_tokens,
                           "finish_reason": g.finish_reason, "settings": settings}
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    done[i] = rec
                f.flush()
                os.fsync(f.fileno())
    return [done[i] for i in range(len(prompts))]
