"""Residual fit: a closed-form low-rank edit of one layer's ``down_proj`` that maps the
last-token residual stream of low-resource prompts onto that of their English version.

Why a second recipe. On Qwen2.5-Coder-0.5B the SWE edit (``up_proj`` rows of the English safety
neurons, :mod:`edit_runtime.fit`) does not move refusals at any layer swept (README, MultiJail
proof). Oracle interventions located what does: replacing layer 20's *MLP output* at the last
prompt token with the English prompt's changes nothing for Chinese or Korean, while replacing
the *residual stream* (the decoder layer's output) there makes the model answer in English and
refuse. The down projection writes straight into that residual, so its edit can carry it.

The problem (layer ``L``; ``h`` is ``down_proj``'s input ``(d_ff,)`` at a position, ``r`` the
layer's output ``(d_model,)``; ΔW in paper layout ``(d_ff, d_model)``; ``i`` ranges over the
last prompt token of harmful prompts of ``low_langs`` with the anchor's version ``i_en`` of the
same id, ``j`` over the last token of harmless prompts of other languages with an anchor
version, ``k`` over the keep set)::

    min  Σ_i ‖h_iᵀΔW - (r_{i_en} - r_i)‖² + w Σ_j ‖h_jᵀΔW - (r_{j_en} - r_j)‖²
       + w_hold Σ_l ‖h_lᵀΔW‖² + γ Σ_k ‖h_kᵀΔW‖² + λ‖ΔW‖²           rank ΔW <= r

The change of layer ``L``'s output at a position is exactly ``h ΔW`` there, so the targets are
exact at that layer. The keep set is every prompt position except the last (harmful and
harmless, all languages: the edit must not change how a prompt is read) plus the anchor
language's last tokens (English behaviour stays). The harmless rows (weight ``w``,
``harmless_weight``, per language ``harmless_lang_weights``) map harmless prompts onto *their*
English versions, so "answer as in English" is learned from both sides and harmless requests are
not pushed towards a refusal (``harmless_target="self"`` holds them in place instead). ``l``
ranges over the last tokens, harmful and harmless, of the ``hold_langs`` (weight ``w_hold``,
``hold_weight``): languages the model barely reads (Qwen parrots Bengali and Swahili prompts
back, harmful or not), where an edit learned from the other languages would otherwise turn
harmless requests into refusals too. ``harmless_hold_ids`` holds chosen harmless ids in place in
every language instead: the ones the anchor itself refuses (:func:`anchor_refused_ids`), whose
English residual is a refusal.
:func:`edit_runtime.solver.solve` gives the minimiser (``A = Σ h hᵀ`` over i, w·j and w_hold·l,
``C`` the keep set, ``B = Σ h Dᵀ`` over i and w·j: held rows have target 0). The edit is
``weight += U V`` on every row of ``down_proj`` (``U = right.T (d_model, r)``,
``V = left.T (r, d_ff)``): low-rank, not row-sparse.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

import edit_runtime
from edit_runtime.arch import find_decoder_layers, find_mlp
from edit_runtime.capture import (_forward_until_stopped, _input_device, _make_batch, _pad_id, _StopForward,
                                  encode_prompts, model_fingerprint, patch_fingerprint)
from edit_runtime.data import Prompt, dataset_hash
from edit_runtime.delta import ModuleEdit, SparseDelta, compute_fingerprint
from edit_runtime.fit import FitResult, LayerReport
from edit_runtime.patch import patch_model
from edit_runtime.solver import solve

log = logging.getLogger(__name__)

__all__ = ["ResidualFitConfig", "ResidualStats", "collect_residual_stats", "collect_residual_stats_layers",
           "prefetch_residual_stats", "residual_problem", "anchor_refused_ids", "fit_residual",
           "fit_residual_layers"]

_STATS_FORMAT = "edit_runtime.residual_stats/1"
HARMLESS_TARGETS = ("anchor", "self")


@dataclass
class ResidualFitConfig:
    """Every choice of the residual fit, with its default and why.

    Each field's one-line help also sits in its ``field(metadata={"help": ...})``.

    Attributes:
        layer: decoder layer whose ``down_proj`` is edited (required; Qwen2.5-0.5B: 20 of 24; a
            negative index counts from the end).
        low_langs: languages whose harmful prompts are mapped onto the anchor's (required, at
            least one).
        anchor_lang: the language whose residual is the target. Default ``"en"``.
        rank: rank r of the edit. Default 16.
        gamma: weight γ of the keep term (other prompt positions, the anchor's last tokens).
            Default 1.0.
        harmless_weight: weight w of the harmless rows (harmless prompts onto their English
            version). Default 4.0; Qwen, MultiJail validation: over-refusal 0.33 at w 1, 0.31 at
            4, 0.27 at 16 (base 0.08), attack success rate about the same.
        harmless_lang_weights: per-language override of ``harmless_weight``, e.g. ``{"th": 16}``:
            more weight where harmless requests of one language are pushed towards a refusal.
            Default empty; the anchor may not appear.
        hold_langs: languages whose last tokens (harmful and harmless) the edit must leave as
            they are (target 0): for languages the base model does not comply in, where a pushed
            refusal only costs over-refusal. Default empty; disjoint from ``low_langs``.
        hold_weight: weight of each held row (``hold_langs``). Default 1.0.
        harmless_target: where harmless non-anchor last tokens go: ``"anchor"`` (default, their
            English version's residual) or ``"self"`` (unchanged, target 0).
        harmless_hold_ids: harmless ids held in place (target 0) in every language instead of
            mapped onto the anchor: the ones the anchor itself refuses
            (:func:`anchor_refused_ids`), whose anchor residual would teach a refusal. Default
            empty; stored sorted and deduplicated.
        lam_rel: ridge relative to the mean eigenvalue of A + γC. Default 1e-2.
        system_prompt: system prompt for the chat template; default ``None``.
        batch_size: prompts per forward. Default 8.
        cache_dir: statistics cache folder; ``None`` (default) = no cache.

    Raises:
        ValueError: ``low_langs`` is empty; the anchor is among ``low_langs`` or ``hold_langs``
            (or has a ``harmless_lang_weights`` entry); a language is in both ``low_langs`` and
            ``hold_langs``; ``harmless_target`` is not one of its values; a weight is negative
            or NaN; or ``batch_size`` < 1.
        TypeError: ``harmless_hold_ids`` is a single string.
    """

    layer: int = field(metadata={"help": "decoder layer whose down_proj is edited (Qwen2.5-0.5B: 20 of 24)"})
    low_langs: Sequence[str] = field(
        default_factory=list, metadata={"help": "languages whose harmful prompts are mapped onto the anchor's"})
    anchor_lang: str = field(default="en", metadata={"help": "the language whose residual is the target"})
    rank: int = field(default=16, metadata={"help": "rank r of the edit"})
    gamma: float = field(default=1.0, metadata={"help": "weight of the keep term (other positions, anchor)"})
    harmless_weight: float = field(
        default=4.0, metadata={"help": "weight w of the harmless rows (harmless prompts onto their English "
                                       "version); Qwen, MultiJail validation: over-refusal 0.33 at w 1, "
                                       "0.31 at 4, 0.27 at 16 (base 0.08), ASR about the same"})
    harmless_lang_weights: dict[str, float] = field(
        default_factory=dict, metadata={"help": "per-language override of harmless_weight, e.g. {'th': 16}: "
                                                "more weight where harmless requests of one language are "
                                                "pushed towards a refusal"})
    hold_langs: Sequence[str] = field(
        default_factory=list, metadata={"help": "languages whose last tokens (harmful and harmless) the edit must "
                                                "leave as they are (target 0): for languages the base model does "
                                                "not comply in, where a pushed refusal only costs over-refusal"})
    hold_weight: float = field(default=1.0, metadata={"help": "weight of each held row (hold_langs)"})
    harmless_target: str = field(
        default="anchor", metadata={"help": "where harmless non-anchor last tokens go: 'anchor' (their English "
                                            "version's residual) or 'self' (unchanged, target 0)"})
    harmless_hold_ids: Sequence[str] = field(
        default_factory=list, metadata={"help": "harmless ids held in place (target 0) in every language instead of "
                                                "mapped onto the anchor: the ones the anchor itself refuses "
                                                "(anchor_refused_ids), whose anchor residual would teach a refusal"})
    lam_rel: float = field(default=1e-2, metadata={"help": "ridge relative to the mean eigenvalue of A + γC"})
    system_prompt: str | None = field(default=None, metadata={"help": "system prompt for the chat template"})
    batch_size: int = field(default=8, metadata={"help": "prompts per forward"})
    cache_dir: str | None = field(default=None, metadata={"help": "statistics cache folder; None = no cache"})

    def __post_init__(self) -> None:
        self.layer = int(self.layer)
        self.low_langs = [str(l) for l in self.low_langs]
        self.hold_langs = [str(l) for l in self.hold_langs]
        if isinstance(self.harmless_hold_ids, str):
            raise TypeError("harmless_hold_ids must be a list of ids, not one string")
        self.harmless_hold_ids = sorted({str(i) for i in self.harmless_hold_ids})
        if not self.low_langs:
            raise ValueError("ResidualFitConfig.low_langs is empty: give the languages to fix")
        if self.anchor_lang in self.low_langs or self.anchor_lang in self.hold_langs:
            raise ValueError(f"anchor language {self.anchor_lang!r} is also among low_langs {self.low_langs} "
                             f"or hold_langs {self.hold_langs}")
        both = sorted(set(self.low_langs) & set(self.hold_langs))
        if both:
            raise ValueError(f"languages {both} are in both low_langs and hold_langs")
        if self.harmless_target not in HARMLESS_TARGETS:
            raise ValueError(f"harmless_target must be one of {HARMLESS_TARGETS}, got {self.harmless_target!r}")
        self.harmless_lang_weights = {str(k): float(v) for k, v in dict(self.harmless_lang_weights).items()}
        weights = {"gamma": self.gamma, "harmless_weight": self.harmless_weight, "hold_weight": self.hold_weight,
                   **{f"harmless_lang_weights[{k!r}]": v for k, v in self.harmless_lang_weights.items()}}
        for name, v in weights.items():
            if not v >= 0 or v != v:
                raise ValueError(f"{name} must be >= 0, got {v!r}")
        if self.anchor_lang in self.harmless_lang_weights:
            raise ValueError(f"harmless_lang_weights: the anchor {self.anchor_lang!r} has no harmless rows "
                             "(its last tokens are in the keep set)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class ResidualStats:
    """What the residual fit needs from one layer, for a list of prompts.

    Attributes:
        layer: the decoder layer.
        keys: ``(id, lang, label)`` of each row of ``h_last`` / ``r_last``.
        h_last: ``down_proj`` input at each prompt's last token, float64 ``(n, d_ff)``.
        r_last: the layer's output there, float64 ``(n, d_model)``.
        keep_xtx: ``Σ h hᵀ`` over every other prompt position, float64 ``(d_ff, d_ff)``.
        keep_count: number of those positions.
    """

    layer: int
    keys: list[tuple[str, str, str]]
    h_last: torch.Tensor
    r_last: torch.Tensor
    keep_xtx: torch.Tensor
    keep_count: int

    def save(self, path: str | Path, meta: dict[str, Any]) -> Path:
        """Writes the statistics as a safetensors file with ``meta`` (JSON-serialisable, e.g. the
        cache key's inputs) in its header; returns ``path`` as a :class:`~pathlib.Path`."""
        from edit_runtime.files import save_safetensors

        side = {"format": _STATS_FORMAT, "layer": self.layer, "keys": self.keys,
                "keep_count": self.keep_count, **meta}
        return save_safetensors({"h_last": self.h_last, "r_last": self.r_last, "keep_xtx": self.keep_xtx},
                                path, {"meta": json.dumps(side)})

    @classmethod
    def load(cls, path: str | Path) -> tuple["ResidualStats", dict[str, Any]]:
        """Reads a file written by :meth:`save`: ``(stats, header)``, the header holding the
        ``meta`` given to :meth:`save`; raises ``ValueError`` for a file of another format."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            side = json.loads((f.metadata() or {}).get("meta", "{}"))
            if side.get("format") != _STATS_FORMAT:
                raise ValueError(f"{path}: not a residual statistics file (format {side.get('format')!r})")
            t = {k: f.get_tensor(k) for k in ("h_last", "r_last", "keep_xtx")}
        keys = [tuple(k) for k in side["keys"]]
        return cls(int(side["layer"]), keys, t["h_last"], t["r_last"], t["keep_xtx"], int(side["keep_count"])), side


@torch.no_grad()
def collect_residual_stats(model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt], layer: int, *,
                           system_prompt: str | None = None, batch_size: int = 8, progress: bool = True,
                           token_ids: Sequence[Sequence[int]] | None = None) -> ResidualStats:
    """One forward per prompt (stopped after ``layer``): the last-token ``down_proj`` input and
    layer output of each prompt, and ``Σ h hᵀ`` over all other positions (see the module doc).

    Prompts are batched by length with left padding and explicit positions, so each row sees
    exactly what it would alone. ``token_ids``: the prompts already encoded
    (:func:`edit_runtime.capture.encode_prompts` with ``system_prompt``), to skip encoding again.
    """
    return collect_residual_stats_layers(model, tokenizer, prompts, [layer], system_prompt=system_prompt,
                                         batch_size=batch_size, progress=progress, token_ids=token_ids)[layer]


@torch.no_grad()
def collect_residual_stats_layers(model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt],
                                  layers: Sequence[int], *, system_prompt: str | None = None, batch_size: int = 8,
                                  progress: bool = True, token_ids: Sequence[Sequence[int]] | None = None
                                  ) -> dict[int, ResidualStats]:
    """:func:`collect_residual_stats` for several layers in one forward per prompt (stopped after
    the deepest): the forward dominates the cost, so a layer sweep pays for it once.

    Returns ``{layer: ResidualStats}`` with the layers normalised as :func:`find_mlp` does
    (a negative index counts from the end). Each layer's ``keep_xtx`` is ``(d_ff, d_ff)`` float64.
    """
    from tqdm.auto import tqdm

    if not layers:
        raise ValueError("collect_residual_stats_layers: no layers given")
    infos = {}
    for layer in layers:
        info = find_mlp(model, layer)
        infos[info.layer] = info
    _, blocks = find_decoder_layers(model)
    last = max(infos)
    device, pad_id = _input_device(model), _pad_id(tokenizer)
    seqs = (list(token_ids) if token_ids is not None
            else encode_prompts(tokenizer, [p.text for p in prompts], system_prompt=system_prompt))
    if len(seqs) != len(prompts):
        raise ValueError(f"token_ids has {len(seqs)} rows for {len(prompts)} prompts")
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    acc = {l: {"h_last": torch.zeros(len(seqs), info.d_ff, dtype=torch.float64),
               "r_last": torch.zeros(len(seqs), info.d_model, dtype=torch.float64),
               "keep": torch.zeros(info.d_ff, info.d_ff, dtype=torch.float64)} for l, info in infos.items()}
    count = 0
    got: dict[tuple[str, int], torch.Tensor] = {}

    def grab_h(layer):
        def hook(_m, args):
            got["h", layer] = args[0]
        return hook

    def grab_r(layer):
        def hook(_m, _args, out):
            got["r", layer] = out[0] if isinstance(out, tuple) else out
            if layer == last:
                raise _StopForward
        return hook

    hooks = []
    for l, info in infos.items():
        hooks.append(model.get_submodule(info.down).register_forward_pre_hook(grab_h(l)))
        hooks.append(blocks[l].register_forward_hook(grab_r(l)))
    was_training = model.training
    model.eval()
    names = ", ".join(str(l) for l in sorted(infos))
    bar = tqdm(total=len(seqs), desc=f"residual stats, layer{'s' if len(infos) > 1 else ''} {names}",
               unit="prompt", disable=not progress)
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            b = _make_batch([seqs[i] for i in idx], pad_id=pad_id, side="left", device=device)
            _forward_until_stopped(model, b)
            other = b.attention_mask.cpu().bool().clone()
            other[:, -1] = False                                  # left padding: the last column is the last token
            for l, a in acc.items():
                h = got.pop(("h", l)).double().cpu()              # (B, T, d_ff)
                r = got.pop(("r", l)).double().cpu()              # (B, T, d_model)
                a["h_last"][idx] = h[:, -1]
                a["r_last"][idx] = r[:, -1]
                x = h[other]                                      # (positions, d_ff)
                a["keep"] += x.T @ x
            count += int(other.sum())
            bar.update(len(idx))
    finally:
        bar.close()
        for hk in hooks:
            hk.remove()
        model.train(was_training)
    keys = [(p.id, p.lang, p.label) for p in prompts]
    return {l: ResidualStats(l, list(keys), a["h_last"], a["r_last"], a["keep"], count) for l, a in acc.items()}


def residual_problem(stats: ResidualStats, cfg: ResidualFitConfig) -> dict[str, Any]:
    """The solver's inputs from the statistics (float64): ``xtx_low`` ``(d_ff, d_ff)``, ``xtd``
    ``(d_ff, d_model)``, ``xtx_safe`` (the keep set), ``dtd`` and the row counts."""
    row = {k: i for i, k in enumerate(stats.keys)}
    harm, safe, anchor = [], [], []
    held_lang, held_harmless = [], []                              # target: no change
    held_ids = set(cfg.harmless_hold_ids)
    for i, (pid, lang, label) in enumerate(stats.keys):
        target = row.get((pid, cfg.anchor_lang, label))
        if lang == cfg.anchor_lang:
            anchor.append(i)
        elif lang in cfg.hold_langs:
            held_lang.append(i)
        elif label == "harmless" and (cfg.harmless_target == "self" or pid in held_ids):
            held_harmless.append(i)
        elif target is None:
            continue
        elif label == "harmful" and lang in cfg.low_langs:
            harm.append((i, target))
        elif label == "harmless":
            safe.append((i, target))
    if not harm:
        raise ValueError(f"no harmful prompt of {list(cfg.low_langs)} has a {cfg.anchor_lang!r} version with "
                         "the same id: the residual targets need parallel prompts")
    H, R = stats.h_last, stats.r_last

    def rows(pairs):
        src = torch.tensor([a for a, _ in pairs], dtype=torch.long)
        dst = torch.tensor([b for _, b in pairs], dtype=torch.long)
        return H[src], R[dst] - R[src]

    def harmless_w(i: int) -> float:
        return cfg.harmless_lang_weights.get(stats.keys[i][1], cfg.harmless_weight)

    # one weight per row; a held row is its own target (D = 0): it only adds to XᵀX
    weighted = ([(i, t, 1.0) for i, t in harm] + [(i, t, harmless_w(i)) for i, t in safe]
                + [(i, i, cfg.hold_weight) for i in held_lang] + [(i, i, harmless_w(i)) for i in held_harmless])
    weighted = [(i, t, w) for i, t, w in weighted if w > 0]
    X, D = rows([(i, t) for i, t, _ in weighted])
    w = torch.tensor([w for *_, w in weighted], dtype=H.dtype)
    xtx, xtd, dtd = (w[:, None] * X).T @ X, (w[:, None] * X).T @ D, float((w * (D * D).sum(1)).sum())
    Xa = H[torch.tensor(anchor, dtype=torch.long)] if anchor else H[:0]
    keep = stats.keep_xtx + Xa.T @ Xa
    return {"xtx_low": xtx, "xtd": xtd, "xtx_safe": keep, "dtd": dtd,
            "counts": {"harmful_rows": len(harm), "harmless_rows": sum(harmless_w(i) > 0 for i, _ in safe),
                       "held_language_rows": len(held_lang) if cfg.hold_weight > 0 else 0,
                       "held_harmless_rows": sum(harmless_w(i) > 0 for i in held_harmless),
                       "keep_positions": stats.keep_count + len(anchor)}}


def _cache_path(model: nn.Module, prompts: Sequence[Prompt], token_ids: Sequence[Sequence[int]],
                cfg: ResidualFitConfig) -> tuple[Path, dict]:
    # the rows are stored in prompt order, so the key hashes the ordered prompts; the token ids
    # are hashed too, so a changed tokenizer or chat template is a different key
    ordered = json.dumps([[p.id, p.lang, p.label, p.text] for p in prompts], ensure_ascii=False)
    ids = json.dumps([list(s) for s in token_ids])
    meta = {"model": model_fingerprint(model), "layer": cfg.layer,
            "prompts_sha256": hashlib.sha256(ordered.encode("utf-8")).hexdigest(),
            "token_ids_sha256": hashlib.sha256(ids.encode()).hexdigest(), "system_prompt": cfg.system_prompt}
    patched = patch_fingerprint(model)
    if patched is not None:                    # statistics read under earlier layers' edits (composed fits)
        meta["patches"] = patched
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.cache_dir) / f"residual_L{cfg.layer}_{key}.safetensors", meta


def _fit_prompts(harmful: Sequence[Prompt], harmless: Sequence[Prompt],
                 cfg: ResidualFitConfig) -> tuple[list[Prompt], list[Prompt]]:
    """The prompts a fit reads, in the order its statistics store them (checked, relabelled)."""
    needed = {cfg.anchor_lang, *cfg.low_langs, *cfg.hold_langs}
    harmful = [p for p in harmful if p.lang in needed]
    missing = {cfg.anchor_lang, *cfg.low_langs} - {p.lang for p in harmful}
    if missing:
        raise ValueError(f"no harmful prompts in {sorted(missing)} (have {sorted({p.lang for p in harmful})})")
    unheld = set(cfg.hold_langs) - {p.lang for p in [*harmful, *harmless]}
    if unheld:
        raise ValueError(f"hold_langs {sorted(unheld)} have no prompts, harmful or harmless: nothing to hold")
    unknown = set(cfg.harmless_hold_ids) - {p.id for p in harmless}
    if unknown:
        raise ValueError(f"harmless_hold_ids {sorted(unknown)[:5]} ({len(unknown)} in all) match no harmless prompt")
    # the label is part of each row's key: a harmful and a harmless prompt may share an id
    harmful = [p if p.label == "harmful" else replace(p, label="harmful") for p in harmful]
    harmless = [p if p.label == "harmless" else replace(p, label="harmless") for p in harmless]
    return harmful, harmless


def prefetch_residual_stats(model: nn.Module, tokenizer: Any, harmful: Sequence[Prompt],
                            harmless: Sequence[Prompt], cfgs: Sequence[ResidualFitConfig], *,
                            progress: bool = True) -> list[Path]:
    """Fills the statistics cache for several fits with one forward pass per group of fits that
    read the same prompts (a layer sweep): afterwards each :func:`fit_residual` of ``cfgs`` reads
    its layer from the cache. Fits whose file already exists cost nothing.

    Every config needs a ``cache_dir``. Returns the cache files written.
    """
    groups: dict[tuple, dict[int, tuple[Path, dict]]] = {}
    encoded: dict[tuple, tuple[list[Prompt], list]] = {}
    batch: dict[tuple, int] = {}
    for cfg in cfgs:
        if not cfg.cache_dir:
            raise ValueError(f"prefetch_residual_stats: the config of layer {cfg.layer} has no cache_dir")
        h, s = _fit_prompts(harmful, harmless, cfg)
        prompts = [*h, *s]
        key = (cfg.cache_dir, cfg.system_prompt, tuple((p.id, p.lang, p.label, p.text) for p in prompts))
        if key not in encoded:
            encoded[key] = (prompts, encode_prompts(tokenizer, [p.text for p in prompts],
                                                    system_prompt=cfg.system_prompt))
        path, meta = _cache_path(model, prompts, encoded[key][1], cfg)
        if not path.exists():
            groups.setdefault(key, {})[find_mlp(model, cfg.layer).layer] = (path, meta)
            batch[key] = min(batch.get(key, cfg.batch_size), cfg.batch_size)
    written = []
    for key, todo in groups.items():
        prompts, seqs = encoded[key]
        stats = collect_residual_stats_layers(model, tokenizer, prompts, sorted(todo), system_prompt=key[1],
                                              progress=progress, token_ids=seqs, batch_size=batch[key])
        for layer, (path, meta) in todo.items():
            written.append(stats[layer].save(path, meta))
    return written


def anchor_refused_ids(model: nn.Module, tokenizer: Any, harmless: Sequence[Prompt], *, anchor_lang: str = "en",
                       judge: Any = None, batch_size: int = 8, progress: bool = True,
                       responses_path: str | Path | None = None) -> list[str]:
    """Ids of the harmless prompts whose ``anchor_lang`` version the model refuses (greedy chat
    reply, ``judge``: default :class:`~edit_runtime.judge.KeywordJudge`), for
    :attr:`ResidualFitConfig.harmless_hold_ids`.

    Why: a harmless row's target is its anchor version's residual. Where the anchor refuses a
    harmless request ("How do I kill the weeds in my lawn?"), that target is a refusal, and mapping
    the other languages onto it teaches the anchor's over-refusal. Call it on the unedited model.
    ``responses_path``: a resumable JSONL of the replies (:func:`edit_runtime.utility.over_refusal`).
    """
    from edit_runtime.utility import over_refusal

    prompts = [p for p in harmless if p.lang == anchor_lang]
    if not prompts:
        raise ValueError(f"no harmless prompt in the anchor language {anchor_lang!r} "
                         f"(have {sorted({p.lang for p in harmless})})")
    if patch_fingerprint(model) is not None:
        log.warning("anchor_refused_ids: the model is patched; the ids are those the edited model refuses")
    stats = over_refusal(model, tokenizer, prompts, judge=judge, batch_size=batch_size, progress=progress,
                         details=True, responses_path=responses_path)
    ids = sorted({it["id"] for it in stats[anchor_lang]["items"] if it["label"] == "refusal"})
    log.info("the model refuses %d of %d harmless %s prompts: %s", len(ids), len(prompts), anchor_lang, ids)
    return ids


def fit_residual(model: nn.Module, tokenizer: Any, harmful: Sequence[Prompt], harmless: Sequence[Prompt],
                 cfg: ResidualFitConfig, *, progress: bool = True) -> FitResult:
    """Fits the residual edit (module doc); returns the delta (not applied) and its report.

    Args:
        model, tokenizer: a loaded causal LM (any architecture :mod:`edit_runtime.arch` finds).
        harmful: harmful prompts parallel by ``id`` over the anchor and ``low_langs`` (train split),
            plus any of ``hold_langs`` (held rows; they need no anchor version).
        harmless: harmless prompts; those with an anchor version of the same id become harmless
            rows (weight ``harmless_weight``), the anchor's join the keep set.
        cfg: :class:`ResidualFitConfig`.
        progress: show a tqdm bar while the statistics are collected (not when they come from
            the cache).

    The model is not modified (statistics are read with hooks only). With ``cfg.cache_dir`` the
    statistics are read from the cache when their file exists and written there otherwise.

    Returns:
        A :class:`~edit_runtime.fit.FitResult` whose delta edits every output row of the layer's
        ``down_proj``, with one :class:`~edit_runtime.fit.LayerReport` (no held-out gap),
        ``neurons`` ``{layer: arange(d_model)}`` and the timings ``"statistics"``, ``"solve"``
        and ``"total"``.

    Raises:
        ValueError: the anchor or a low language has no harmful prompts; a hold language has no
            prompts; a ``harmless_hold_ids`` id matches no harmless prompt; no harmful prompt of
            ``low_langs`` has an anchor version with the same id; or the solver refuses the
            problem.
        ArchError: the model has no gated MLP at ``cfg.layer``
            (:func:`edit_runtime.arch.find_mlp`).
    """
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    info = find_mlp(model, cfg.layer)
    harmful, harmless = _fit_prompts(harmful, harmless, cfg)
    prompts = [*harmful, *harmless]
    t0 = time.perf_counter()
    stats = None
    seqs = encode_prompts(tokenizer, [p.text for p in prompts], system_prompt=cfg.system_prompt)
    if cfg.cache_dir:
        path, meta = _cache_path(model, prompts, seqs, cfg)
        if path.exists():
            stats, _ = ResidualStats.load(path)
            log.info("residual statistics from %s", path)
    if stats is None:
        stats = collect_residual_stats(model, tokenizer, prompts, cfg.layer, system_prompt=cfg.system_prompt,
                                       batch_size=cfg.batch_size, progress=progress, token_ids=seqs)
        if cfg.cache_dir:
            stats.save(path, meta)
    seconds["statistics"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    prob = residual_problem(stats, cfg)
    res = solve(prob["xtx_low"], prob["xtx_safe"], prob["xtd"], gamma=cfg.gamma, rank=cfg.rank,
                lam_rel=cfg.lam_rel, dtd=prob["dtd"])
    seconds["solve"] = time.perf_counter() - t0
    dtype = model.get_submodule(info.down).weight.dtype
    edit = ModuleEdit(module=info.down, side="out", neurons=torch.arange(info.d_model, dtype=torch.int64),
                      U=res.right.T.contiguous().to(dtype), V=res.left.T.contiguous().to(dtype))
    report = LayerReport(layer=info.layer, num_neurons=info.d_model, rank=res.rank, lam=res.lam,
                         gap_closed_train=res.gap_closed, gap_closed_heldout=None, solve=res.summary())
    log.info("residual fit, layer %d: rank %d, gap closed on the fit rows %.3f", info.layer, res.rank,
             res.gap_closed or float("nan"))
    seconds["total"] = time.perf_counter() - t_start
    metadata = {
        "method": "residual-closed-form",
        "edit_runtime_version": edit_runtime.__version__,
        "layers": [info.layer],
        "config": {k: v for k, v in asdict(cfg).items() if k != "cache_dir"},
        "languages": {"anchor": cfg.anchor_lang, "low": list(cfg.low_langs), "hold": list(cfg.hold_langs),
                      "harmless": sorted({p.lang for p in harmless})},
        "data": {"harmful_sha256": dataset_hash(harmful), "harmless_sha256": dataset_hash(harmless),
                 "n_harmful": len(harmful), "n_harmless": len(harmless), **prob["counts"]},
        "reports": [asdict(report)],
        "seconds": seconds,
    }
    delta = SparseDelta(edits=[edit], metadata=metadata, fingerprint=compute_fingerprint(model, [info.down]))
    return FitResult(delta=delta, layers=[report], neurons={info.layer: edit.neurons}, seconds=seconds)


def fit_residual_layers(model: nn.Module, tokenizer: Any, harmful: Sequence[Prompt], harmless: Sequence[Prompt],
                        cfgs: Sequence[ResidualFitConfig], *, progress: bool = True) -> FitResult:
    """Several layers composed into one delta: the layers are fitted in increasing order, each
    with the earlier layers' edits applied (patched), so its inputs and targets are those of the
    edited model and it closes what the earlier edits left of the gap. English last tokens are in
    every layer's keep set, so the English targets barely move under the earlier edits.

    Args:
        cfgs: one :class:`ResidualFitConfig` per layer (distinct layers; any order). A statistics
            cache of a later layer is keyed by the earlier edits too.

    Returns one :class:`FitResult` whose delta edits every layer's ``down_proj``; the model is
    left unpatched. One config is :func:`fit_residual`'s fit, returned as it is.
    """
    if not cfgs:
        raise ValueError("fit_residual_layers: no layer configs given")
    if len(cfgs) == 1:
        return fit_residual(model, tokenizer, harmful, harmless, cfgs[0], progress=progress)
    layers = [find_mlp(model, c.layer).layer for c in cfgs]
    if len(set(layers)) != len(layers):
        raise ValueError(f"fit_residual_layers: layers {layers} repeat a layer")
    order = sorted(range(len(cfgs)), key=lambda i: layers[i])
    results: list[FitResult] = []
    t0 = time.perf_counter()
    with ExitStack() as stack:
        for i in order:
            res = fit_residual(model, tokenizer, harmful, harmless, cfgs[i], progress=progress)
            results.append(res)
            if len(results) < len(cfgs):
                stack.enter_context(patch_model(model, res.delta))   # the next layer sees this edit
    edits = [e for r in results for e in r.delta.edits]
    metas = [r.delta.metadata for r in results]
    seconds = {f"layer {m['layers'][0]}": m["seconds"]["total"] for m in metas}
    seconds["total"] = time.perf_counter() - t0
    metadata = {
        "method": "residual-closed-form",
        "edit_runtime_version": edit_runtime.__version__,
        "layers": [m["layers"][0] for m in metas],
        "composed": True,
        "config": {"layers": [m["config"] for m in metas]},
        "languages": metas[0]["languages"],
        "data": metas[0]["data"],
        "reports": [rep for m in metas for rep in m["reports"]],
        "seconds": seconds,
    }
    delta = SparseDelta(edits=edits, metadata=metadata,
                        fingerprint=compute_fingerprint(model, [e.module for e in edits]))
    reports = [rep for r in results for rep in r.layers]
    neurons = {k: v for r in results for k, v in r.neurons.items()}
    return FitResult(delta=delta, layers=reports, neurons=neurons, seconds=seconds)
