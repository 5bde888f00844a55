"""Activation capture with streamed sufficient statistics, an on-disk cache, and merge by addition.

What is captured
----------------
For each chosen decoder layer ``l`` the gated MLP ``y = down(act(gate(x)) * up(x))`` is hooked:

- ``x``    ``(d_model,)`` the MLP input (post-attention-norm hidden state), forward pre-hook on
  the MLP module;
- ``up``   ``(d_ff,)`` the ``up_proj`` pre-activation, ``gate`` ``(d_ff,)`` the ``gate_proj``
  pre-activation (forward hooks on the projections; a fused ``gate_up_proj`` is split);
- ``h``    ``(d_ff,)`` the activation ``act(gate) * up``, read as the input of ``down_proj``
  (exact for any ``act`` and for ``position="mean"``).

One vector per prompt is kept: ``position="last"`` (default) takes the last prompt token after
the chat template (the assistant header), ``position="mean"`` averages over the prompt's tokens
(padding excluded). Batches are padded on either side (``padding_side``, default the
tokenizer's); attention masks and explicit ``position_ids`` (``cumsum(mask) - 1``) make left and
right padding give the same numbers. Hooks sit on the MLP module and on whatever module lives at
the projection paths, so a model patched with :func:`edit_runtime.patch_model` is captured as it
runs (patched outputs, unscaled ``down_proj`` input).

Work per prompt
---------------
The forward is the whole cost (CPU: ~0.6 GFLOP per token up to layer 20 of Qwen2.5-0.5B), so
capture forwards as few tokens as it can, all with the same statistics up to fp32 rounding:

- **Early stop**: the forward is stopped right after the MLP of the last needed layer (a private
  exception raised from a hook and caught), so neither the later layers nor the LM head run;
  with ``position="last"`` that last MLP runs on the last token of each prompt only.
- **Shared prefix** (``prefix_reuse=True``): the tokens every prompt of a call starts with (the
  chat template's system turn, e.g. Qwen's default system prompt, and the user header: 24 of
  Qwen's ~59 tokens per MultiJail prompt) are forwarded once; every batch continues from their
  KV cache (``position="mean"`` adds the prefix tokens' sums). Off where the model has
  sliding-window layers shorter than the prompts.
- **Length batching**: prompts are sorted by length and a batch closes early when the next one
  is much shorter (:data:`LENGTH_RATIO`), so little padding is forwarded; pass 2 batches the
  prompts of all languages together.
- **Packed MLP weights** (CPU, fp32): while a capture runs, the MLP projections of the layers
  it forwards use oneDNN-reordered weights (:mod:`edit_runtime.packed_linear`; the up/gate GEMMs
  alone run 10-25 % faster on the 2-core AVX2 machine, the MultiJail fit's harmful pass ~3 %;
  same results up to fp32 rounding; ~1.1 GiB of packed copies for Qwen2.5-0.5B while the capture
  runs; ``EDIT_RUNTIME_PACKED_LINEAR=0`` turns it off).
- **One forward per prompt**: :func:`collect_parallel_stats` gives pass 1 and pass 2 of the
  parallel harmful prompts from the same forwards (below).

Streaming
---------
Only running sums are kept, so memory does not grow with the number of prompts.

Pass 1, :func:`collect_neuron_stats` (no neuron set needed) -> ``{layer: NeuronStats}``: per
group ``(lang, label)`` the prompt count, per neuron sum and sum of squares of ``up``, ``gate``
and ``h``, the sum of ``|h|`` (SSN importance), the sum of ``x`` and ``XᵀX`` ``(d_model,
d_model)`` (``cov=``: every layer, none, or a list of layers; it is ``G * d_model² * 8`` bytes
per layer, so ask for it on the candidate layers of the edit). Everything for all chosen layers
comes from one forward per batch; the hooks write into one stacked buffer and the statistics of
all layers are updated with a handful of kernels per batch. ``XᵀX`` goes through
:func:`edit_runtime.ops.masked_cov_` (fp32 partials, added into the float64 sums every 16
batches).

Pass 2, :func:`collect_target_stats` (neuron sets S known) -> ``{layer: CovStats}``: harmful
prompts are forwarded by chunks of ``chunk_size`` ids, the anchor language (English) first
(its pre-activations are kept for the chunk), then every other language's prompts of those ids,
sorted by length and batched across languages; per language it accumulates ``XᵀX``,
``Xᵀ Y_anchor[:, S]`` (rows aligned by id: ``x`` of the prompt in that language, ``y`` the
anchor's pre-activations at S), ``Σx``, ``ΣY[:, S]``, ``ΣY[:, S]²`` and the row count. The
covariances go through :func:`edit_runtime.ops.masked_cov_` (Triton on CUDA, torch elsewhere;
rows buffered per language, fp32 partials into the float64 sums). The caller may patch the model
(earlier layers' edits) before pass 2.

Single pass, :func:`collect_parallel_stats` -> ``({layer: NeuronStats}, {layer: CovStats})``:
pass 1 needs no S, pass 2 needs S, but the sums pass 2 keeps are linear in the columns of Y, so
keeping **every** column (the full ``X_langᵀ Y_anchor`` ``(d_model, d_ff)`` per language,
:func:`full_xty_bytes`: 314 MB for Qwen2.5-0.5B and 9 languages) and slicing it to S afterwards
(:meth:`CovStats.select_neurons`) gives pass 2's statistics from pass 1's forwards. The same
forwards give every language's pass-1 statistics. Still streamed (constant in the number of
prompts), cached and mergeable. :func:`edit_runtime.fit.fit` uses it for the layers no earlier
edit changes, while the full matrix fits ``FitConfig.one_pass_max_bytes``; above that (large
``d_model``) and for the later layers of a joint edit it runs pass 2 with the masked kernel.

Caching
-------
With ``cache_dir`` each result is stored as ``<name>.safetensors`` (tensors) plus a ``<name>.json``
sidecar (what it is, :data:`FORMAT_VERSION`, and the full cache key). Pass 1 writes one file per
(layer, group) as soon as the forward that computes it is done (groups that need the same layers
are forwarded together, their prompts batched by length across groups), so a rerun only computes
what no file holds and a run asking for more layers only computes the new ones. The key hashes:
:data:`FORMAT_VERSION` (files of another version are neither found nor loaded),
:func:`model_fingerprint` (config shapes and an exact integer checksum of every weight and
buffer: another model, dtype or merged edit never hits), :func:`patch_fingerprint` (what runtime
wrappers such as an active ``patch_model`` add), the layer, the position, the token ids of the
group's rendered prompts (covering text, chat template, system prompt and tokenizer), the
statistics dtype and the covariance flag. A corrupt or unreadable file is ignored and recomputed.
Pass 2 writes one file per layer, its key adds the neuron set, ``proj`` and the anchor language;
the single pass writes a pair per layer (``par-*`` and ``parcov-*``), keyed like pass 2 with
"all" neurons.

Shards on several machines
--------------------------
Statistics are sums, so shards merge by addition: ``stats_a + stats_b`` or
:func:`merge_stats` (``NeuronStats.merge`` / ``CovStats.merge``), group by group (shards may hold
different groups). With ``torchrun`` or ``accelerate launch`` each rank takes every ``world``-th
prompt of each group (pass 2: every ``world``-th id, all languages of that id) and saves its
stats; one process merges::

    # collect.py -- torchrun --nproc-per-node 8 collect.py   (or: accelerate launch collect.py)
    import os, torch
    from edit_runtime.capture import collect_neuron_stats, merge_stats, NeuronStats
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    shard = {key: texts[rank::world] for key, texts in groups.items()}
    stats = collect_neuron_stats(model.cuda(), tok, shard, layers, cache_dir="stats_cache")
    for layer, s in stats.items():
        s.save(f"shards/L{layer}-rank{rank}.safetensors")
    # afterwards, once, anywhere:
    merged = {l: NeuronStats.merge([NeuronStats.load(f"shards/L{l}-rank{r}.safetensors")
                                    for r in range(world)]) for l in layers}

(``accelerate``: ``PartialState().process_index`` / ``num_processes`` give rank and world.) The
single pass shards the same way by id: ``{lang: aligned[lang][rank::world]}`` with
``aligned = align_parallel(prompts)``; both of its results merge by addition. The
merged statistics equal one pass over all prompts up to float rounding (tested). No collective
communication is needed; ranks may be separate jobs on separate machines.

Public API: :class:`NeuronStats`, :class:`CovStats`, :func:`collect_neuron_stats`,
:func:`collect_target_stats`, :func:`collect_parallel_stats`, :func:`full_xty_bytes`,
:func:`merge_stats`, :func:`group_prompts`,
:func:`align_parallel`, :func:`encode_prompts`, :func:`model_fingerprint`,
:func:`patch_fingerprint`, :data:`POSITIONS`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from edit_runtime.arch import find_decoder_layers, find_mlp
from edit_runtime.data import Prompt, render_chat
from edit_runtime.files import save_safetensors
from edit_runtime.ops import masked_cov_
from edit_runtime.packed_linear import packed_linears

log = logging.getLogger(__name__)

__all__ = [
    "POSITIONS",
    "ACTIVATIONS",
    "PROJS",
    "NeuronStats",
    "CovStats",
    "collect_neuron_stats",
    "collect_target_stats",
    "collect_parallel_stats",
    "full_xty_bytes",
    "ALL_NEURONS",
    "LENGTH_RATIO",
    "FORMAT_VERSION",
    "merge_stats",
    "group_prompts",
    "align_parallel",
    "encode_prompts",
    "model_fingerprint",
    "patch_fingerprint",
]

POSITIONS = ("last", "mean")
#: the d_ff activations recorded per neuron
ACTIVATIONS = ("up", "gate", "h")
PROJS = ("up", "gate", "both")
STATS_FORMAT = "edit_runtime.neuron_stats"
COV_FORMAT = "edit_runtime.cov_stats"
PARALLEL_FORMAT = "edit_runtime.parallel_stats"
#: bumped whenever what a statistics file means changes: part of every cache key, checked on load
#: (2: shared-prefix reuse, last-layer MLP on the last token, single-pass full XᵀY)
FORMAT_VERSION = 2

GroupKey = tuple[str, str]  # (lang, label)
Text = str | Prompt


class _StopForward(Exception):
    """Raised from the hook of the last needed layer to end the forward early."""


def _forward_until_stopped(model: nn.Module, batch: "_Batch") -> None:
    """One no-cache forward of ``batch`` (hooks read what they need); a hook's
    :class:`_StopForward` ends it early. Callers hold ``torch.no_grad()``."""
    try:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
              use_cache=False)
    except _StopForward:
        pass


# --------------------------------------------------------------------------------------------
# statistics containers
# --------------------------------------------------------------------------------------------

def _stat_names() -> list[str]:
    names = []
    for a in ACTIVATIONS:
        names += [f"{a}_sum", f"{a}_sumsq"]
    return names + ["h_abssum"]


_D_FF_STATS = tuple(_stat_names())  # each (G, d_ff)


def _check_meta_compatible(a: Mapping[str, Any], b: Mapping[str, Any], keys: Sequence[str],
                           what: str, strict: bool) -> None:
    """Raises on a differing shape/position; on other differing keys raises (``strict``) or warns."""
    for k in keys:
        if a.get(k) == b.get(k):
            continue
        msg = f"cannot merge {what}: {k} differs ({a.get(k)!r} vs {b.get(k)!r})"
        if k == "patch_fingerprint":  # rounding may differ across devices: warn only
            log.warning("merging %s whose runtime patches may differ (%s)", what, msg)
            continue
        if k in ("position", "d_model", "d_ff"):
            raise ValueError(msg)
        if strict:
            raise ValueError(msg + " (pass strict=False to merge anyway)")
        log.warning(msg)


def _write(path: Path, tensors: dict[str, torch.Tensor], sidecar: dict[str, Any]) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    side = path.with_suffix(".json")
    side_tmp = side.with_name(side.name + ".tmp")
    side_tmp.write_text(json.dumps(sidecar, indent=1, sort_keys=True, default=str))
    # sidecar first, tensors last: a file set is complete iff the .safetensors exists.
    side_tmp.replace(side)
    return save_safetensors(tensors, path, {"format": sidecar["format"]})


def _read(path: Path, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    side = path.with_suffix(".json")
    if not path.exists() or not side.exists():
        raise FileNotFoundError(f"statistics file {path} or its sidecar {side.name} is missing")
    sidecar = json.loads(side.read_text())
    if sidecar.get("format") != fmt:
        raise ValueError(f"{side}: format {sidecar.get('format')!r}, expected {fmt!r}")
    if sidecar.get("version") != FORMAT_VERSION:
        raise ValueError(f"{side}: version {sidecar.get('version')!r}, expected {FORMAT_VERSION}")
    return load_file(str(path)), sidecar


@dataclass
class NeuronStats:
    """Pass-1 statistics of one layer, as sums over prompts, per group ``(lang, label)``.

    G = number of groups, ``d_ff`` the MLP width, ``d_model`` the hidden size. All float64 by
    default (the ``stat_dtype`` of the collection).

    Attributes:
        layer: decoder layer index.
        groups: ``[(lang, label), ...]``, G entries, the row order of every ``(G, ...)`` tensor.
        count: ``(G,)`` number of prompts.
        up_sum, up_sumsq, gate_sum, gate_sumsq, h_sum, h_sumsq: ``(G, d_ff)`` per-neuron sums of
            the activation and of its square (``up``/``gate``: pre-activations, ``h``:
            ``act(gate) * up``).
        h_abssum: ``(G, d_ff)`` sum of ``|h|`` (SSN importance is ``mean|h| * down_col_norm``).
        x_sum: ``(G, d_model)`` sum of the MLP inputs.
        xtx: ``(G, d_model, d_model)`` ``Σ x xᵀ`` per group, or ``None`` (``cov=False``).
        down_col_norm: ``(d_ff,)`` ``‖W_down[:, j]‖₂`` of the base weight.
        meta: position, model fingerprint, dtypes, shapes (free-form, JSON-able).
    """

    layer: int
    groups: list[GroupKey]
    count: torch.Tensor
    up_sum: torch.Tensor
    up_sumsq: torch.Tensor
    gate_sum: torch.Tensor
    gate_sumsq: torch.Tensor
    h_sum: torch.Tensor
    h_sumsq: torch.Tensor
    h_abssum: torch.Tensor
    x_sum: torch.Tensor
    xtx: torch.Tensor | None
    down_col_norm: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    # -- structure ----------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self.groups = [(str(a), str(b)) for a, b in self.groups]
        if len(set(self.groups)) != len(self.groups):
            raise ValueError(f"NeuronStats layer {self.layer}: duplicated groups {self.groups}")
        G = len(self.groups)
        if self.count.shape != (G,):
            raise ValueError(f"count must be ({G},), got {tuple(self.count.shape)}")
        for name in _D_FF_STATS:
            t = getattr(self, name)
            if t.shape != (G, self.d_ff):
                raise ValueError(f"{name} must be ({G}, {self.d_ff}), got {tuple(t.shape)}")
        if self.x_sum.shape[0] != G:
            raise ValueError(f"x_sum must be ({G}, d_model), got {tuple(self.x_sum.shape)}")
        if self.xtx is not None and self.xtx.shape != (G, self.d_model, self.d_model):
            raise ValueError(f"xtx must be ({G}, {self.d_model}, {self.d_model}), "
                             f"got {tuple(self.xtx.shape)}")

    @property
    def d_ff(self) -> int:
        return int(self.down_col_norm.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.x_sum.shape[1])

    @property
    def langs(self) -> list[str]:
        """Languages present, in first-seen order."""
        return list(dict.fromkeys(g[0] for g in self.groups))

    @property
    def labels(self) -> list[str]:
        return list(dict.fromkeys(g[1] for g in self.groups))

    def has(self, lang: str, label: str) -> bool:
        return (lang, label) in self.groups

    def index(self, lang: str, label: str) -> int:
        try:
            return self.groups.index((lang, label))
        except ValueError:
            raise KeyError(f"layer {self.layer} has no group ({lang!r}, {label!r}); "
                           f"groups: {self.groups}") from None

    # -- derived quantities ---------------------------------------------------------------------
    def n(self, lang: str, label: str) -> int:
        """Number of prompts of the group."""
        return int(self.count[self.index(lang, label)])

    def mean(self, act: str, lang: str, label: str) -> torch.Tensor:
        """Mean over the group's prompts: ``act`` in up/gate/h ``(d_ff,)``, "abs_h" ``(d_ff,)``
        (mean ``|h|``) or "x" ``(d_model,)``."""
        g = self.index(lang, label)
        key = {"abs_h": "h_abssum", "x": "x_sum"}.get(act, f"{act}_sum")
        if not hasattr(self, key) or act not in (*ACTIVATIONS, "abs_h", "x"):
            raise ValueError(f"act must be one of {ACTIVATIONS + ('abs_h', 'x')}, got {act!r}")
        return getattr(self, key)[g] / self.count[g].clamp_min(1)

    def var(self, act: str, lang: str, label: str, *, unbiased: bool = True) -> torch.Tensor:
        """Per-neuron variance over the group's prompts ``(d_ff,)`` (``act`` in up/gate/h)."""
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
        g = self.index(lang, label)
        n = self.count[g]
        s, ss = getattr(self, f"{act}_sum")[g], getattr(self, f"{act}_sumsq")[g]
        denom = (n - 1) if unbiased else n
        return ((ss - s * s / n.clamp_min(1)) / denom.clamp_min(1)).clamp_min(0)

    def importance(self, lang: str, label: str) -> torch.Tensor:
        """SSN importance ``mean|h_j| * ‖W_down[:, j]‖`` ``(d_ff,)``."""
        return self.mean("abs_h", lang, label) * self.down_col_norm.to(self.h_abssum.dtype)

    def xtx_sum(self, langs: Iterable[str], label: str) -> torch.Tensor:
        """``Σ x xᵀ`` pooled over ``langs`` for ``label`` ``(d_model, d_model)``."""
        if self.xtx is None:
            raise ValueError(f"layer {self.layer}: collected with cov=False, no XᵀX")
        idx = [self.index(lang, label) for lang in langs]
        return self.xtx[idx].sum(0)

    def count_sum(self, langs: Iterable[str], label: str) -> int:
        return int(sum(self.n(lang, label) for lang in langs))

    @classmethod
    def from_activations(cls, layer: int, acts: Mapping[GroupKey, Mapping[str, torch.Tensor]],
                         down_col_norm: torch.Tensor, *, cov: bool = True,
                         dtype: torch.dtype = torch.float64,
                         meta: Mapping[str, Any] | None = None) -> "NeuronStats":
        """Statistics of explicitly gathered activations (the test oracle, synthetic data):
        ``acts[(lang, label)] = {"x": (n, d_model), "up"/"gate"/"h": (n, d_ff)}``. A missing
        "x" is taken as zeros of width 1 only if ``cov`` is False."""
        groups = list(acts)
        t: dict[str, list[torch.Tensor]] = {}
        for g in groups:
            a = {k: v.to(dtype) for k, v in acts[g].items()}
            n = a["up"].shape[0]
            x = a["x"] if "x" in a else torch.zeros(n, 1, dtype=dtype)
            row = {"count": torch.tensor(float(n), dtype=dtype), "x_sum": x.sum(0),
                   "h_abssum": a["h"].abs().sum(0)}
            for k in ACTIVATIONS:
                row[f"{k}_sum"], row[f"{k}_sumsq"] = a[k].sum(0), (a[k] * a[k]).sum(0)
            if cov:
                row["xtx"] = x.T @ x
            for k, v in row.items():
                t.setdefault(k, []).append(v)
        s = {k: torch.stack(v) for k, v in t.items()}
        return cls(layer=layer, groups=groups, xtx=s.pop("xtx", None),
                   down_col_norm=down_col_norm.to(dtype), meta=dict(meta or {}), **s)

    # -- algebra ------------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {name: getattr(self, name) for name in ("count", *_D_FF_STATS, "x_sum")}
        if self.xtx is not None:
            out["xtx"] = self.xtx
        return out

    @classmethod
    def merge(cls, parts: Sequence["NeuronStats"], *, strict: bool = True) -> "NeuronStats":
        """Sum of statistics: groups in several parts add up, the others are concatenated.

        All parts must be of the same layer, position and shapes; with ``strict`` (default) also
        of the same model fingerprint and statistics dtype (else a warning).
        """
        parts = list(parts)
        if not parts:
            raise ValueError("merge needs at least one NeuronStats")
        first = parts[0]
        for p in parts[1:]:
            if p.layer != first.layer:
                raise ValueError(f"cannot merge NeuronStats of layers {first.layer} and {p.layer}")
            _check_meta_compatible(first.meta, p.meta,
                                   ("position", "d_model", "d_ff", "model_fingerprint",
                                    "patch_fingerprint", "stat_dtype", "system_prompt"),
                                   "NeuronStats", strict)
            if (p.xtx is None) != (first.xtx is None):
                raise ValueError("cannot merge NeuronStats with and without XᵀX (cov flag differs)")
        groups: list[GroupKey] = list(dict.fromkeys(g for p in parts for g in p.groups))
        gi = {g: i for i, g in enumerate(groups)}
        dev = first.count.device
        out: dict[str, torch.Tensor] = {}
        for name, t in first._tensors().items():
            out[name] = torch.zeros((len(groups), *t.shape[1:]), dtype=t.dtype, device=dev)
        for p in parts:
            idx = torch.tensor([gi[g] for g in p.groups], device=dev)
            for name, t in p._tensors().items():
                out[name].index_add_(0, idx, t.to(device=dev, dtype=out[name].dtype))
        meta = dict(first.meta)
        meta["n_merged"] = sum(int(p.meta.get("n_merged", 1)) for p in parts)
        return cls(layer=first.layer, groups=groups, xtx=out.pop("xtx", None),
                   down_col_norm=first.down_col_norm, meta=meta, **out)

    def __add__(self, other: "NeuronStats") -> "NeuronStats":
        if not isinstance(other, NeuronStats):
            return NotImplemented
        return NeuronStats.merge([self, other])

    def __radd__(self, other: Any) -> "NeuronStats":
        if other == 0:  # so that sum([...]) works
            return self
        return NotImplemented

    def select(self, groups: Iterable[GroupKey]) -> "NeuronStats":
        """The statistics of a subset of groups (in the given order)."""
        groups = [tuple(g) for g in groups]
        idx = [self.index(*g) for g in groups]
        t = {k: v[idx] for k, v in self._tensors().items()}
        return NeuronStats(layer=self.layer, groups=groups, xtx=t.pop("xtx", None),
                           down_col_norm=self.down_col_norm, meta=dict(self.meta), **t)

    def to(self, device: torch.device | str) -> "NeuronStats":
        t = {k: v.to(device) for k, v in self._tensors().items()}
        return NeuronStats(layer=self.layer, groups=list(self.groups), xtx=t.pop("xtx", None),
                           down_col_norm=self.down_col_norm.to(device), meta=dict(self.meta), **t)

    # -- I/O ------------------------------------------------------------------------------------
    def save(self, path: str | Path, *, extra: Mapping[str, Any] | None = None) -> Path:
        """Writes ``path`` (.safetensors) and its ``.json`` sidecar; returns the tensor file path."""
        tensors = dict(self._tensors(), down_col_norm=self.down_col_norm)
        sidecar = {"format": STATS_FORMAT, "version": FORMAT_VERSION, "layer": self.layer,
                   "groups": [list(g) for g in self.groups],
                   "counts": {f"{g[0]}/{g[1]}": int(c) for g, c in zip(self.groups, self.count)},
                   "meta": self.meta, **(extra or {})}
        return _write(Path(path), tensors, sidecar)

    @classmethod
    def load(cls, path: str | Path, *, device: torch.device | str = "cpu") -> "NeuronStats":
        t, side = _read(Path(path), STATS_FORMAT)
        t = {k: v.to(device) for k, v in t.items()}
        return cls(layer=int(side["layer"]), groups=[tuple(g) for g in side["groups"]],
                   xtx=t.pop("xtx", None), down_col_norm=t.pop("down_col_norm"),
                   meta=side.get("meta", {}), **t)


@dataclass
class CovStats:
    """Pass-2 statistics of one layer: covariances of MLP inputs with the anchor's targets at S.

    L = number of languages, m = ``|S|``, k = number of target columns: m for ``proj`` "up" or
    "gate", 2m for "both" (the up columns of S first, then the gate columns of S).

    For every language ``lang`` and every id present in both ``lang`` and the anchor language:
    ``x`` = MLP input of the prompt in ``lang``, ``y`` = the anchor prompt's pre-activations at S.

    Attributes:
        layer: decoder layer index.
        neurons: ``(m,)`` int64 sorted neuron set S.
        proj: "up", "gate" or "both".
        anchor_lang: language of the targets (English).
        langs: ``[lang, ...]`` L entries, the row order of every ``(L, ...)`` tensor.
        count: ``(L,)`` number of aligned rows.
        xtx: ``(L, d_model, d_model)`` ``Σ x xᵀ``.
        xty: ``(L, d_model, k)`` ``Σ x yᵀ`` (= ``X_langᵀ Y_target``).
        x_sum: ``(L, d_model)``; y_sum, y_sumsq: ``(L, k)`` (sums of ``y`` and ``y²``, diagnostics
            and ``‖D‖²``).
        meta: free-form (position, fingerprint, ...).
    """

    layer: int
    neurons: torch.Tensor
    proj: str
    anchor_lang: str
    langs: list[str]
    count: torch.Tensor
    xtx: torch.Tensor
    xty: torch.Tensor
    x_sum: torch.Tensor
    y_sum: torch.Tensor
    y_sumsq: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)

    _NAMES = ("count", "xtx", "xty", "x_sum", "y_sum", "y_sumsq")

    def __post_init__(self) -> None:
        if self.proj not in PROJS:
            raise ValueError(f"proj must be one of {PROJS}, got {self.proj!r}")
        L, k = len(self.langs), self.num_targets
        if len(set(self.langs)) != L:
            raise ValueError(f"duplicated languages {self.langs}")
        if self.xty.shape[0] != L or self.xty.shape[2] != k:
            raise ValueError(f"xty must be ({L}, d_model, {k}), got {tuple(self.xty.shape)}")
        for name in ("y_sum", "y_sumsq"):
            if getattr(self, name).shape != (L, k):
                raise ValueError(f"{name} must be ({L}, {k}), got {tuple(getattr(self, name).shape)}")

    @property
    def num_targets(self) -> int:
        return int(self.neurons.numel()) * (2 if self.proj == "both" else 1)

    @property
    def d_model(self) -> int:
        return int(self.xtx.shape[-1])

    def index(self, lang: str) -> int:
        try:
            return self.langs.index(lang)
        except ValueError:
            raise KeyError(f"layer {self.layer}: no language {lang!r}; have {self.langs}") from None

    def pooled(self, langs: Iterable[str]) -> dict[str, torch.Tensor]:
        """Sums over ``langs``: ``{"count": (), "xtx": (d,d), "xty": (d,k), "x_sum": (d,),
        "y_sum": (k,), "y_sumsq": (k,)}`` (e.g. ``X_lowᵀX_low`` and ``X_lowᵀY_target``)."""
        idx = [self.index(lang) for lang in langs]
        return {name: getattr(self, name)[idx].sum(0) for name in self._NAMES}

    def target_slices(self) -> dict[str, slice]:
        """Which columns of ``xty`` hold which projection: ``{"up": slice, "gate": slice}``."""
        m = int(self.neurons.numel())
        if self.proj == "both":
            return {"up": slice(0, m), "gate": slice(m, 2 * m)}
        return {self.proj: slice(0, m)}

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self._NAMES}

    def select_neurons(self, neurons: Any) -> "CovStats":
        """The statistics of a subset S of :attr:`neurons`: the ``xty``/``y_sum``/``y_sumsq``
        columns of S (for every target projection), ``xtx``/``x_sum``/``count`` unchanged. Slicing
        the full ``XᵀY`` of :func:`collect_parallel_stats` to the safety neurons gives what
        :func:`collect_target_stats` with S accumulates (the same sums)."""
        S = torch.unique(torch.as_tensor(neurons, dtype=torch.long).reshape(-1).cpu())
        have = self.neurons.cpu().to(torch.long)
        if S.numel() == 0:
            raise ValueError(f"layer {self.layer}: the neuron set is empty")
        pos = torch.searchsorted(have, S).clamp_max(have.numel() - 1)
        if not torch.equal(have[pos], S):
            missing = S[have[pos] != S]
            raise ValueError(f"layer {self.layer}: neurons {missing[:8].tolist()} are not among the "
                             f"{have.numel()} neurons these statistics hold")
        m = have.numel()
        n_proj = 2 if self.proj == "both" else 1
        cols = torch.cat([pos + j * m for j in range(n_proj)]).to(self.xty.device)
        return CovStats(layer=self.layer, neurons=S, proj=self.proj, anchor_lang=self.anchor_lang,
                        langs=list(self.langs), count=self.count.clone(), xtx=self.xtx.clone(),
                        xty=self.xty.index_select(2, cols), x_sum=self.x_sum.clone(),
                        y_sum=self.y_sum.index_select(1, cols),
                        y_sumsq=self.y_sumsq.index_select(1, cols), meta=dict(self.meta))

    @classmethod
    def merge(cls, parts: Sequence["CovStats"], *, strict: bool = True) -> "CovStats":
        """Sum of statistics; languages in several parts add up, the others are concatenated."""
        parts = list(parts)
        if not parts:
            raise ValueError("merge needs at least one CovStats")
        first = parts[0]
        for p in parts[1:]:
            if (p.layer, p.proj, p.anchor_lang) != (first.layer, first.proj, first.anchor_lang):
                raise ValueError(
                    f"cannot merge CovStats (layer, proj, anchor) {(first.layer, first.proj, first.anchor_lang)}"
                    f" with {(p.layer, p.proj, p.anchor_lang)}")
            if not torch.equal(p.neurons.cpu(), first.neurons.cpu()):
                raise ValueError(f"cannot merge CovStats of layer {first.layer}: neuron sets differ")
            _check_meta_compatible(first.meta, p.meta,
                                   ("position", "model_fingerprint", "patch_fingerprint",
                                    "stat_dtype", "system_prompt"),
                                   "CovStats", strict)
        langs = list(dict.fromkeys(lang for p in parts for lang in p.langs))
        li = {lang: i for i, lang in enumerate(langs)}
        dev = first.count.device
        out = {name: torch.zeros((len(langs), *t.shape[1:]), dtype=t.dtype, device=dev)
               for name, t in first._tensors().items()}
        for p in parts:
            idx = torch.tensor([li[lang] for lang in p.langs], device=dev)
            for name, t in p._tensors().items():
                out[name].index_add_(0, idx, t.to(device=dev, dtype=out[name].dtype))
        meta = dict(first.meta)
        meta["n_merged"] = sum(int(p.meta.get("n_merged", 1)) for p in parts)
        return cls(layer=first.layer, neurons=first.neurons, proj=first.proj,
                   anchor_lang=first.anchor_lang, langs=langs, meta=meta, **out)

    def __add__(self, other: "CovStats") -> "CovStats":
        if not isinstance(other, CovStats):
            return NotImplemented
        return CovStats.merge([self, other])

    def __radd__(self, other: Any) -> "CovStats":
        if other == 0:
            return self
        return NotImplemented

    def save(self, path: str | Path, *, extra: Mapping[str, Any] | None = None) -> Path:
        tensors = dict(self._tensors(), neurons=self.neurons)
        sidecar = {"format": COV_FORMAT, "version": FORMAT_VERSION, "layer": self.layer,
                   "proj": self.proj, "anchor_lang": self.anchor_lang, "langs": self.langs,
                   "num_neurons": int(self.neurons.numel()),
                   "counts": {lang: int(c) for lang, c in zip(self.langs, self.count)},
                   "meta": self.meta, **(extra or {})}
        return _write(Path(path), tensors, sidecar)

    @classmethod
    def load(cls, path: str | Path, *, device: torch.device | str = "cpu") -> "CovStats":
        t, side = _read(Path(path), COV_FORMAT)
        t = {k: v.to(device) for k, v in t.items()}
        return cls(layer=int(side["layer"]), proj=side["proj"], anchor_lang=side["anchor_lang"],
                   langs=list(side["langs"]), neurons=t.pop("neurons"), meta=side.get("meta", {}),
                   **t)


def merge_stats(parts: Sequence[Any], *, strict: bool = True) -> Any:
    """Merges a list of :class:`NeuronStats` or :class:`CovStats`, or of ``{layer: stats}``
    dicts (layer by layer), by addition."""
    parts = list(parts)
    if not parts:
        raise ValueError("merge_stats needs at least one part")
    if isinstance(parts[0], Mapping):
        layers = list(dict.fromkeys(l for p in parts for l in p))
        return {l: merge_stats([p[l] for p in parts if l in p], strict=strict) for l in layers}
    return type(parts[0]).merge(parts, strict=strict)


# --------------------------------------------------------------------------------------------
# inputs: grouping, alignment, tokenisation, batching
# --------------------------------------------------------------------------------------------

def _text(t: Text) -> str:
    return t.text if isinstance(t, Prompt) else str(t)


def group_prompts(prompts: Iterable[Prompt]) -> dict[GroupKey, list[Prompt]]:
    """``{(lang, label): [Prompt, ...]}`` keeping order."""
    out: dict[GroupKey, list[Prompt]] = {}
    for p in prompts:
        out.setdefault((p.lang, p.label), []).append(p)
    return out


def align_parallel(prompts: Iterable[Prompt], *, anchor_lang: str = "en",
                   langs: Sequence[str] | None = None) -> dict[str, list[Prompt | None]]:
    """Aligns parallel prompts by id: ``{lang: [Prompt or None, ...]}``, position i = the i-th id
    of the anchor language (ids without an anchor prompt are dropped: they have no target)."""
    by: dict[str, dict[str, Prompt]] = {}
    for p in prompts:
        by.setdefault(p.lang, {}).setdefault(p.id, p)
    if anchor_lang not in by:
        raise ValueError(f"no prompt in the anchor language {anchor_lang!r}; have {sorted(by)}")
    ids = list(by[anchor_lang])
    langs = list(by) if langs is None else list(langs)
    if anchor_lang not in langs:
        langs = [anchor_lang, *langs]
    return {lang: [by.get(lang, {}).get(i) for i in ids] for lang in langs}


def encode_prompts(tokenizer: Any, texts: Sequence[Text], *, system_prompt: str | None = None,
                   chat_template: bool = True, max_length: int | None = None) -> list[list[int]]:
    """Token ids of each prompt, rendered with the tokenizer's chat template (user turn plus
    assistant header, :func:`edit_runtime.data.render_chat`). ``chat_template=False`` feeds the
    raw text with the tokenizer's special tokens. ``max_length`` keeps the last tokens."""
    if chat_template:
        rendered = [render_chat(tokenizer, _text(t), system_prompt) for t in texts]
        add_special = False  # the template writes BOS itself where the model wants one
    else:
        rendered = [(system_prompt + "\n\n" if system_prompt else "") + _text(t) for t in texts]
        add_special = True
    if not rendered:
        return []
    ids = tokenizer(rendered, add_special_tokens=add_special)["input_ids"]
    out = []
    for text, seq in zip(rendered, ids):
        seq = list(seq)
        if not seq:
            raise ValueError(f"prompt {text[:60]!r} encodes to no tokens")
        out.append(seq[-max_length:] if max_length else seq)
    return out


def _token_hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()


@dataclass
class _GroupPlan:
    """One (lang, label) group of :func:`collect_neuron_stats`: its encoded prompts, cache keys and
    files per layer, and the layers the cache did not have (``todo``, empty = all cached)."""

    g: int                        # row of the group in the statistics
    lang: str
    label: str
    seqs: list[list[int]]         # token ids per prompt
    data_hash: str
    keys: dict[int, str]          # layer -> cache key
    paths: dict[int, Path]        # layer -> cache file ({} without a cache folder)
    todo: list[int]               # layers still to capture


@dataclass
class _Batch:
    """One padded batch of token sequences, optionally continuing a shared prefix of P tokens
    held in a KV cache (:class:`_Prefix`): then ``input_ids`` are only the tokens after it."""

    input_ids: torch.Tensor       # (B, T) int64
    attention_mask: torch.Tensor  # (B, P + T) int64, 1 = real token (the P prefix tokens are real)
    position_ids: torch.Tensor    # (B, T) int64, P + cumsum(mask) - 1 (clamped on padding)
    last_idx: torch.Tensor        # (B,) index of the last real token in T
    mean_w: torch.Tensor          # (B, T) fp32, mask / (P + number of real tokens)
    flat_last: torch.Tensor       # (B,) row of the last real token in the (B*T, D) flattening
    prefix_w: torch.Tensor | None = None  # (B,) fp32, 1 / (P + real tokens): weight of prefix sums
    prefix_len: int = 0           # P

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        """Tokens the forward computes (padding included, the cached prefix excluded)."""
        return int(self.input_ids.numel())


def _mlp_shape(parts: Mapping[int, "_LayerParts"]) -> tuple[int, int]:
    """``(d_model, d_ff)`` shared by the layers of ``parts`` (one recorder holds one shape)."""
    shapes = {(p.d_model, p.d_ff) for p in parts.values()}
    if len(shapes) != 1:
        raise ValueError(f"layers {sorted(parts)} have different MLP shapes {sorted(shapes)}; "
                         "capture them in separate calls")
    return shapes.pop()


def _base_meta(model: nn.Module, *, position: str, stat_dtype: torch.dtype,
               system_prompt: str | None, chat_template: bool) -> dict[str, Any]:
    """What every statistics file records and keys its cache on, besides the layer and data."""
    return {"position": position, "model_fingerprint": model_fingerprint(model),
            "patch_fingerprint": patch_fingerprint(model), "model_dtype": _model_dtype(model),
            "stat_dtype": _dtype_name(stat_dtype), "system_prompt": system_prompt,
            "chat_template": chat_template}


def _cov_layer_set(cov: bool | Iterable[int], layers: Sequence[int]) -> set[int]:
    """The layers that get ``XᵀX``: all (True), none (False) or the given ones (among ``layers``)."""
    out = set(layers) if cov is True else set() if cov is False else {int(l) for l in cov}
    if not out <= set(layers):
        raise ValueError(f"cov layers {sorted(out - set(layers))} are not among layers {layers}")
    return out


def _down_col_norms(parts: Mapping[int, "_LayerParts"], dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """``{layer: ||W_down[:, j]||}`` (d_ff,) on CPU, for SSN's importance."""
    return {l: _base_weight(p.down).detach().double().norm(dim=0).to(dtype).cpu() for l, p in parts.items()}


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, list):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return 0


def _make_batch(seqs: Sequence[Sequence[int]], *, pad_id: int, side: str,
                device: torch.device, prefix_len: int = 0) -> _Batch:
    """Pads ``seqs`` on ``side``. With ``prefix_len`` P > 0 the sequences are the tokens after a
    shared P-token prefix that the forward reads from a KV cache: the mask covers P + T columns
    and the positions start at P (left padding then sits between prefix and prompt, masked)."""
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    B, T = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, sl] = 1
    pos = (mask.cumsum(1) - 1).clamp_min(0) + prefix_len
    lengths = mask.sum(1)
    last = torch.full((B,), T - 1, dtype=torch.long) if side == "left" else lengths - 1
    n_real = (lengths + prefix_len).float()
    mean_w = mask.float() / n_real[:, None]
    flat_last = torch.arange(B) * T + last
    full_mask = torch.cat([torch.ones((B, prefix_len), dtype=torch.long), mask], 1) if prefix_len else mask
    return _Batch(ids.to(device), full_mask.to(device), pos.to(device), last.to(device),
                  mean_w.to(device), flat_last.to(device),
                  (1.0 / n_real).to(device) if prefix_len else None, int(prefix_len))


def _input_device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device


# --------------------------------------------------------------------------------------------
# model fingerprint (cache key)
# --------------------------------------------------------------------------------------------

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# model -> (state key, fingerprint). Hashing every weight costs seconds on a 0.5B model and a fit
# asks once per pass; the key (each tensor's storage address and in-place version counter)
# changes whenever a weight is replaced or written in place (e.g. a merge), so a hit is exact.
_FINGERPRINTS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]]" = weakref.WeakKeyDictionary()


def _state_key(model: nn.Module) -> tuple:
    return tuple((name, t.data_ptr(), t._version, t.dtype, tuple(t.shape))
                 for name, t in model.state_dict(keep_vars=True).items())


def model_fingerprint(model: nn.Module) -> str:
    """sha256 hex of the config's shape fields and of every parameter and persistent buffer:
    name, shape, dtype and an exact integer checksum of its bits (the wrapping int64 sum of its
    bytes read as 8-byte words, order-independent, so identical on any device; a tied weight is
    read once) plus 16 probe values.
    Another model, another dtype or an in-place (merged) edit changes it; runtime wrappers
    (unmerged patches) keep the unpatched ``state_dict`` and are covered by
    :func:`patch_fingerprint`. Cost: one reduction per tensor on its device, one host transfer."""
    key = _state_key(model)
    hit = _FINGERPRINTS.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    fingerprint = _model_fingerprint(model)
    _FINGERPRINTS[model] = (key, fingerprint)
    return fingerprint


def _int_sum(flat: torch.Tensor) -> torch.Tensor:
    """Order-independent exact checksum of a flat integer view: the sum of its bytes taken as
    int64 words (wrapping), 20x faster than widening every element; the sum of the widened
    elements where the bytes do not split into aligned words."""
    nbytes = flat.numel() * flat.element_size()
    if nbytes % 8 == 0 and flat.data_ptr() % 8 == 0:
        try:
            return flat.view(torch.uint8).view(torch.int64).sum()
        except RuntimeError:
            pass
    return flat.sum(dtype=torch.int64)


def _model_fingerprint(model: nn.Module) -> str:
    # (documented on model_fingerprint)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "hidden_act")
    cfg = {k: str(getattr(config, k, None)) for k in keys} if config is not None else {}
    descr, sums = [], []
    done: dict[tuple, torch.Tensor] = {}  # tied weights (embedding = LM head) are summed once
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            t = t.detach()
            if t.numel() == 0:
                continue
            if t.dtype == torch.bool:
                t = t.to(torch.uint8)
            key = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()), str(t.device))
            if key not in done:
                flat = t.contiguous().reshape(-1).view(_INT_VIEW.get(t.element_size(), torch.uint8))
                n = flat.numel()
                probes = flat[torch.arange(16, device=flat.device, dtype=torch.int64) * (n - 1) // 15]
                done[key] = torch.cat([_int_sum(flat).reshape(1), probes.to(torch.int64)])
            sums.append(done[key])
            descr.append([name, list(t.shape), str(t.dtype)])
    h = hashlib.sha256(json.dumps([cfg, descr], separators=(",", ":")).encode())
    for s in sums:
        h.update(s.cpu().numpy().tobytes())
    return h.hexdigest()


def patch_fingerprint(model: nn.Module) -> str | None:
    """Hash of what runtime wrappers add, or None for a model without any.

    A wrapper is any module with a ``base_layer`` (an :func:`edit_runtime.patch_model` patch, a
    PEFT LoRA layer): it is run on a fixed random input and the bits of ``wrapper(x) -
    base_layer(x)`` are hashed, so the enabled state, factors and scales all count. Exact on one
    device; another GPU may round differently, which only costs a cache miss (and a warning when
    merging shards). A wrapper that cannot be probed makes the statistics uncacheable."""
    h = hashlib.sha256()
    found = False
    with torch.no_grad():
        for name, mod in model.named_modules():
            base = getattr(mod, "base_layer", None)
            w = getattr(base, "weight", None)
            if not isinstance(base, nn.Module) or not isinstance(w, torch.Tensor) or w.dim() != 2:
                continue
            found = True
            g = torch.Generator().manual_seed(0)
            x = torch.randn(1, 4, w.shape[1], generator=g).to(device=w.device, dtype=w.dtype)
            try:
                diff = (mod(x) - base(x)).float()
            except Exception as exc:  # noqa: BLE001 - e.g. a row mask of another batch size
                log.warning("cannot probe wrapper %s (%s): its statistics are not cached", name, exc)
                return "uncacheable-" + os.urandom(16).hex()
            h.update(name.encode())
            h.update(diff.cpu().numpy().tobytes())
    return h.hexdigest() if found else None


# --------------------------------------------------------------------------------------------
# hooks
# --------------------------------------------------------------------------------------------

@dataclass
class _LayerParts:
    mlp: nn.Module
    gate: nn.Module | None       # gate_proj (None when fused)
    up: nn.Module | None         # up_proj (None when fused)
    gate_up: nn.Module | None    # fused gate_up_proj: output = cat([gate, up], -1)
    down: nn.Module
    d_model: int
    d_ff: int


def _check_layers(model: nn.Module, layers: Iterable[int]) -> list[int]:
    n_layers = len(find_decoder_layers(model)[1])
    out = sorted(set(int(l) for l in layers))
    for l in out:
        if not 0 <= l < n_layers:
            raise ValueError(f"layer {l} out of range: the model has {n_layers} decoder layers")
    if not out:
        raise ValueError("no layer given")
    return out


def _parts(model: nn.Module, layer: int) -> _LayerParts:
    info = find_mlp(model, layer)
    get = model.get_submodule
    fused = getattr(info, "gate_up", None)
    return _LayerParts(
        mlp=get(info.path),
        gate=None if fused else get(info.gate),
        up=None if fused else get(info.up),
        gate_up=get(fused) if fused else None,
        down=get(info.down),
        d_model=int(info.d_model),
        d_ff=int(info.d_ff),
    )


def mlp_linears(model: nn.Module, layers: Iterable[int], *,
                parts: Mapping[int, _LayerParts] | None = None) -> list[nn.Module]:
    """The MLP projections (gate, up or fused gate_up, down) of ``layers``, the base ``nn.Linear``
    where a patch wrapper holds one: what :func:`edit_runtime.packed_linear.packed_linears` packs
    for a capture (benchmarks pack the same modules around a plain forward)."""
    out = []
    for l in layers:
        p = parts[l] if parts is not None and l in parts else _parts(model, l)
        out.extend(getattr(m, "base_layer", m) for m in (p.gate, p.up, p.gate_up, p.down)
                   if m is not None)
    return out


def _packed_mlps(model: nn.Module, layers: Sequence[int], *, early_stop: bool,
                 parts: Mapping[int, _LayerParts]):
    """One :func:`packed_linears` context for a whole capture call (the prefix and every batch):
    the MLP projections of every layer the forwards run, up to the last of ``layers`` with
    ``early_stop`` (none for no layer). Packing costs ~10 ms per projection, so it is done once
    per call."""
    if not layers:
        return contextlib.nullcontext(0)
    n = max(layers) + 1 if early_stop else len(find_decoder_layers(model)[1])
    return packed_linears(mlp_linears(model, range(n), parts=parts))


def _base_weight(module: nn.Module) -> torch.Tensor:
    return getattr(module, "base_layer", module).weight


class _Recorder:
    """Registers the capture hooks for ``layers`` (L of them); :meth:`run` forwards one batch.

    The hooks reduce each tensor to one row per prompt (``position``) and write it into two
    stacked buffers: ``X (L, B, d_model)`` (MLP inputs) and ``A (L, n_acts, B, d_ff)`` (the
    activations ``acts``, in that order), so a hook is one kernel and the statistics update
    touches all layers with a few kernels. ``position="last"`` keeps the model's dtype (a row
    selection is exact); ``"mean"`` averages in fp32. ``slot[layer]`` is the layer's index in L.

    With ``early_stop`` and ``position="last"`` the MLP of the last recorded layer runs on the
    last token of each prompt only (its pre-hook hands the MLP ``x[:, last]`` of shape
    ``(B, 1, d_model)``): the forward stops right after it, so nothing else reads the MLP's
    other rows, and the MLP is position-wise, so the recorded rows are the same.

    With ``prefix`` (a :class:`_Prefix`), batches made with ``prefix_len=P`` continue the shared
    prefix from its KV cache; for ``position="mean"`` the prefix's sums are added to each mean.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int], *, position: str,
                 acts: Sequence[str], early_stop: bool = True,
                 parts: Mapping[int, _LayerParts] | None = None, prefix: "_Prefix | None" = None,
                 slice_last: bool = True):
        if position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
        self.model = model
        # walking the module tree costs milliseconds per layer: callers pass `parts` once
        self.layers = _check_layers(model, layers) if parts is None else sorted(set(layers))
        self.position = position
        self.acts = tuple(acts)
        self.early_stop = early_stop
        self.parts = {l: parts[l] if parts is not None else _parts(model, l) for l in self.layers}
        self.d_model, self.d_ff = _mlp_shape(self.parts)
        self.slot = {l: i for i, l in enumerate(self.layers)}
        self.act_index = {a: k for k, a in enumerate(self.acts)}
        w = _base_weight(self.parts[self.layers[0]].down)
        self.device = w.device
        self.dtype = w.dtype if position == "last" and w.is_floating_point() else torch.float32
        self.slice_slot = len(self.layers) - 1 if (slice_last and early_stop and position == "last") else -1
        self.prefix = prefix
        self._px: torch.Tensor | None = None    # (L, d_model) fp32 prefix sums of x ("mean")
        self._pa: torch.Tensor | None = None    # (L, n_acts, d_ff) fp32 prefix sums of the acts
        if prefix is not None:
            missing = [l for l in self.layers if l not in prefix.sums]
            if missing or (early_stop and prefix.num_layers <= self.layers[-1]):
                raise ValueError(f"the shared prefix was computed for layers {sorted(prefix.sums)} "
                                 f"(KV of {prefix.num_layers} layers), not for {self.layers}")
            if position == "mean":
                self._px = torch.stack([prefix.sums[l]["x"] for l in self.layers]).to(self.device)
                self._pa = torch.stack([torch.stack([prefix.sums[l][a] for a in self.acts])
                                        for l in self.layers]).to(self.device)
        self.X: torch.Tensor | None = None
        self.A: torch.Tensor | None = None
        self._B = self._T = 0
        self._idx: torch.Tensor | None = None   # (B,) rows of the last tokens in (B*T, D)
        self._w: torch.Tensor | None = None     # (B, 1, T) fp32 mean weights
        self._pw: torch.Tensor | None = None    # (B, 1) fp32 weights of the prefix sums
        self._fired = 0
        self._expected = 0
        self._handles: list[Any] = []
        self.batches = 0
        self.tokens = 0  # tokens forwarded (padding included, the cached prefix excluded)

    def __enter__(self) -> "_Recorder":
        per_layer = 1
        for l, p in self.parts.items():
            i = self.slot[l]
            self._handles.append(p.mlp.register_forward_pre_hook(self._pre_mlp(i), with_kwargs=True))
            if p.gate_up is not None and ("up" in self.acts or "gate" in self.acts):
                self._handles.append(p.gate_up.register_forward_hook(self._out_fused(i)))
                per_layer += 1 if l == self.layers[0] else 0
            else:
                for name, mod in (("up", p.up), ("gate", p.gate)):
                    if name in self.acts:
                        self._handles.append(mod.register_forward_hook(self._out(i, name)))
                        per_layer += 1 if l == self.layers[0] else 0
            if "h" in self.acts:
                self._handles.append(p.down.register_forward_pre_hook(self._pre_down(i)))
                per_layer += 1 if l == self.layers[0] else 0
        self._expected = per_layer * len(self.layers)
        if self.early_stop:
            last = self.parts[self.layers[-1]].mlp
            self._handles.append(last.register_forward_hook(self._stop))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- reduction over tokens -------------------------------------------------------------------
    def _put(self, dst: torch.Tensor, t: torch.Tensor, prefix_sum: torch.Tensor | None = None) -> None:
        """dst (B, D) <- the last real token's row of t (B, T, D), or the mean over real tokens
        (plus the shared prefix's sum ``prefix_sum`` (D,), weighted by 1 / (P + length))."""
        if self.position == "last":
            t2 = t.reshape(-1, t.shape[-1])
            if t2.shape[0] == self._B:  # one row per prompt already (T = 1, or the sliced MLP)
                dst.copy_(t2)
            elif t2.dtype == dst.dtype and t2.device == dst.device:
                torch.index_select(t2, 0, self._idx, out=dst)
            else:
                dst.copy_(t2.index_select(0, self._idx.to(t2.device)))
            return
        t3 = t.reshape(self._B, self._T, t.shape[-1]).float()
        v = torch.bmm(self._w.to(t3.device), t3).squeeze(1)
        if prefix_sum is not None and self._pw is not None:
            v.addcmul_(self._pw.to(v.device), prefix_sum.to(v.device)[None, :])
        dst.copy_(v)

    def _pre_mlp(self, i: int):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            self._fired += 1
            if i == self.slice_slot and x.dim() == 3 and x.shape[1] > 1:
                xs = x.reshape(-1, x.shape[-1]).index_select(0, self._idx.to(x.device)).unsqueeze(1)
                self._put(self.X[i], xs)
                if args:
                    return (xs, *args[1:]), kwargs
                kwargs = dict(kwargs)
                kwargs[next(iter(kwargs))] = xs
                return args, kwargs
            self._put(self.X[i], x, None if self._px is None else self._px[i])
            return None
        return hook

    def _out(self, i: int, name: str):
        k = self.act_index[name]

        def hook(module, args, output):
            self._put(self.A[i, k], output, None if self._pa is None else self._pa[i, k])
            self._fired += 1
        return hook

    def _out_fused(self, i: int):
        f = self.d_ff

        def hook(module, args, output):  # output (..., 2 d_ff) = [gate; up]
            for name, lo in (("gate", 0), ("up", f)):
                if name in self.act_index:
                    k = self.act_index[name]
                    self._put(self.A[i, k], output[..., lo:lo + f],
                              None if self._pa is None else self._pa[i, k])
            self._fired += 1
        return hook

    def _pre_down(self, i: int):
        k = self.act_index["h"]

        def hook(module, args):
            self._put(self.A[i, k], args[0], None if self._pa is None else self._pa[i, k])
            self._fired += 1
        return hook

    def _stop(self, module, args, output):
        raise _StopForward

    # -- one batch ------------------------------------------------------------------------------
    def run(self, batch: _Batch, *, cache: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Forwards ``batch``; returns ``X (L, B, d_model)`` and ``A (L, n_acts, B, d_ff)`` in
        :attr:`dtype` (fresh buffers per call). A batch with ``prefix_len`` P continues
        :attr:`prefix`; ``cache`` (a fresh transformers cache, no prefix) is filled instead."""
        L, (B, T) = len(self.layers), batch.input_ids.shape
        self.X = torch.empty((L, B, self.d_model), dtype=self.dtype, device=self.device)
        self.A = torch.empty((L, len(self.acts), B, self.d_ff), dtype=self.dtype, device=self.device)
        self._B, self._T, self._fired = B, T, 0
        self.batches += 1
        self.tokens += batch.num_tokens
        self._idx = batch.flat_last.to(self.device)
        self._w = batch.mean_w.to(self.device)[:, None, :]
        self._pw = None if batch.prefix_w is None else batch.prefix_w.to(self.device)[:, None]
        kw: dict[str, Any] = {"use_cache": False}
        if batch.prefix_len:
            if self.prefix is None or self.prefix.length != batch.prefix_len:
                raise RuntimeError(f"batch continues a {batch.prefix_len}-token prefix the recorder "
                                   "does not hold")
            kw = {self.prefix.cache_kwarg: self.prefix.make_cache(self.model, B), "use_cache": True}
        elif cache is not None:
            kw = {_cache_kwarg(self.model) or "past_key_values": cache, "use_cache": True}
        try:
            with torch.no_grad():
                self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids, **kw)
        except _StopForward:
            pass
        if self._fired != self._expected:
            raise RuntimeError(f"capture hooks fired {self._fired} times, expected {self._expected} "
                               f"for layers {self.layers} (is an MLP bypassed or replaced?)")
        X, A = self.X, self.A
        self.X = self.A = None
        return X, A


# --------------------------------------------------------------------------------------------
# shared prefix (the chat template's system turn): forwarded once, reused from its KV cache
# --------------------------------------------------------------------------------------------

@dataclass
class _Prefix:
    """The token prefix every prompt of a capture shares (with a chat template: the system turn,
    Qwen's default one included, and the user header), forwarded once.

    ``kv[i]`` = ``(keys, values)`` ``(1, n_kv_heads, P, head_dim)`` of decoder layer i (the first
    :attr:`num_layers` layers: up to the last recorded one with early stop); ``sums[layer]`` =
    ``{"x": (d_model,), act: (d_ff,)}`` fp32 sums over the P prefix tokens (``position="mean"``
    counts the prefix tokens as prompt tokens, as a plain forward does)."""

    ids: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    sums: dict[int, dict[str, torch.Tensor]]
    cache_kwarg: str

    @property
    def length(self) -> int:
        return len(self.ids)

    @property
    def num_layers(self) -> int:
        return len(self.kv)

    def make_cache(self, model: nn.Module, batch_size: int) -> Any:
        """A fresh transformers ``DynamicCache`` holding the prefix for ``batch_size`` rows."""
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        for i, (k, v) in enumerate(self.kv):
            cache.update(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1), i)
        return cache


def _cache_kwarg(model: nn.Module) -> str | None:
    """Name of the forward's KV-cache argument (transformers 5 renames ``past_key_values``)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def _shared_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common token prefix of ``seqs``, at most ``min(len) - 1`` (every
    prompt keeps at least its last token to forward)."""
    if len(seqs) < 2:
        return 0
    first, n = seqs[0], min(len(s) for s in seqs) - 1
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
        if n == 0:
            break
    return max(n, 0)


def _prefix_unsupported(model: nn.Module, total_len: int) -> str | None:
    """Why prefix reuse cannot run on ``model`` (None: it can)."""
    if _cache_kwarg(model) is None:
        return "the model's forward takes no KV cache"
    try:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    except Exception as exc:  # noqa: BLE001 - any model without a transformers cache
        return f"no transformers DynamicCache for this model ({exc})"
    layers = getattr(cache, "layers", None)
    if layers is None:
        return "this transformers version's cache has no per-layer storage"
    if any(getattr(layer, "is_sliding", False) for layer in layers):
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        window = getattr(config, "sliding_window", None)
        if window is None or total_len > int(window):
            return f"sliding-window layers (window {window}) shorter than the prompts ({total_len})"
    return None


def _compute_prefix(model: nn.Module, ids: Sequence[int], layers: Sequence[int], *,
                    parts: Mapping[int, _LayerParts], acts: Sequence[str], early_stop: bool,
                    device: torch.device) -> _Prefix:
    """Forwards the shared prefix once (hooks on ``layers`` give its per-token sums)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    batch = _make_batch([list(ids)], pad_id=0, side="right", device=device)
    with _Recorder(model, layers, position="mean", acts=acts, early_stop=early_stop,
                   parts=parts) as rec:
        X, A = rec.run(batch, cache=cache)
    P = len(ids)
    kv = []
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False) or layer.keys is None or layer.keys.numel() == 0:
            break
        kv.append((layer.keys.detach(), layer.values.detach()))
    sums = {l: {"x": X[rec.slot[l], 0].float() * P,
                **{a: A[rec.slot[l], k, 0].float() * P for k, a in enumerate(rec.acts)}}
            for l in rec.layers}
    return _Prefix(ids=list(ids), kv=kv, sums=sums, cache_kwarg=_cache_kwarg(model) or "past_key_values")


def _plan_prefix(model: nn.Module, seqs: Sequence[Sequence[int]], enabled: bool) -> int:
    """P, the number of shared leading tokens to forward once (0: no reuse)."""
    if not enabled or len(seqs) < 2:
        return 0
    P = _shared_prefix_len(seqs)
    if P == 0:
        return 0
    why = _prefix_unsupported(model, max(len(s) for s in seqs))
    if why:
        log.info("shared prefix of %d tokens not reused: %s", P, why)
        return 0
    return P


def _batches(n: int, batch_size: int) -> list[list[int]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


#: length-sorted batching closes a batch early when the next prompt is shorter than this share of
#: the batch's longest prompt: the long tail (Bengali MultiJail prompts run to 1000 tokens) gets
#: small batches instead of padding. On the MultiJail fit (train split, 9 languages) 0.85 cuts the
#: forwarded tokens from 62.8k to 57.0k (real: 55.8k).
LENGTH_RATIO = 0.85

#: a batch of short prompts takes more than ``batch_size`` prompts, up to ``4 * batch_size``,
#: until it holds this many tokens: after the shared prefix a MultiJail prompt is ~25 tokens,
#: and 8 of them make GEMMs too small for the CPU (8 -> ~20 prompts: 10 % more tokens per
#: second on the 2-core machine; the statistics do not depend on the batching).
BATCH_TOKENS = 512


def _length_batches(lengths: Sequence[int], batch_size: int, ratio: float = LENGTH_RATIO,
                    min_tokens: int = BATCH_TOKENS) -> list[list[int]]:
    """Indices of ``lengths`` in batches, longest first (stable). A batch closes when the next
    length is below ``ratio`` times the batch's first (longest), or once it has ``batch_size``
    prompts and ``min_tokens`` padded tokens, or at ``4 * batch_size`` prompts."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out:
            b = out[-1]
            full = len(b) >= 4 * batch_size or (
                len(b) >= batch_size and len(b) * lengths[b[0]] >= min_tokens)
            if not full and lengths[i] >= ratio * lengths[b[0]]:
                b.append(i)
                continue
        out.append([i])
    return out


def _cov_update(xtx: torch.Tensor, xty: torch.Tensor, X: torch.Tensor, Y: torch.Tensor,
                cols: torch.Tensor) -> None:
    """``xtx += XᵀX`` and ``xty += Xᵀ Y[:, cols]`` through :func:`edit_runtime.ops.masked_cov_`.

    masked_cov_ accumulates in fp32; float64 running sums get each batch through an fp32
    scratch that is then added in float64 (fp32 error only within one batch of rows).
    """
    if X.dtype == torch.float64:  # a float64 model (reference runs): no fp32 step at all
        xtx.addmm_(X.T.to(xtx.dtype), X.to(xtx.dtype))
        xty.addmm_(X.T.to(xty.dtype), Y.index_select(1, cols).to(xty.dtype))
        return
    if xtx.dtype == torch.float32 and xty.dtype == torch.float32:
        masked_cov_(xtx, xty, X, Y, cols, None)
        return
    sx = torch.zeros(xtx.shape, dtype=torch.float32, device=X.device)
    sy = torch.zeros(xty.shape, dtype=torch.float32, device=X.device)
    masked_cov_(sx, sy, X, Y, cols, None)
    xtx += sx
    xty += sy


# --------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------

def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)[:40] or "_"


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _model_dtype(model: nn.Module) -> str:
    return _dtype_name(next(model.parameters()).dtype)


# --------------------------------------------------------------------------------------------
# pass 1
# --------------------------------------------------------------------------------------------

def _normalise_groups(groups: Mapping[GroupKey, Sequence[Text]] | Iterable[Prompt]
                      ) -> dict[GroupKey, list[Text]]:
    if isinstance(groups, Mapping):
        out = {}
        for key, texts in groups.items():
            if not (isinstance(key, tuple) and len(key) == 2):
                raise ValueError(f"group keys must be (lang, label) tuples, got {key!r}")
            out[(str(key[0]), str(key[1]))] = list(texts)
        return out
    return dict(group_prompts(groups))


#: fp32 covariance partials are added into the float64 running sums every this many batches
_FLUSH_EVERY = 16


class _GroupAccum:
    """Running sums of one group for all captured layers, stacked over layers (L) on the device.

    ``act_sum``/``act_sumsq`` are ``(L, 3, d_ff)`` for up, gate, h (the recorder's layout). ``XᵀX`` goes through ``masked_cov_`` into fp32 partials that are added into the
    ``stat_dtype`` sums every ``_FLUSH_EVERY`` batches (fp32 error only within a few hundred rows).
    """

    def __init__(self, L: int, d_model: int, d_ff: int, *, cov_slots: Sequence[int],
                 dtype: torch.dtype, device: torch.device):
        z = lambda *shape, dt=dtype: torch.zeros(shape, dtype=dt, device=device)  # noqa: E731
        self.d_ff = d_ff
        self.count = 0
        self.act_sum, self.act_sumsq = z(L, 3, d_ff), z(L, 3, d_ff)
        self.h_abssum, self.x_sum = z(L, d_ff), z(L, d_model)
        self.cov_slots = {i: j for j, i in enumerate(cov_slots)}  # layer slot -> row of xtx
        Lc = len(self.cov_slots)
        self.xtx = z(Lc, d_model, d_model) if Lc else None
        self._part = (self.xtx if dtype == torch.float32 else z(Lc, d_model, d_model, dt=torch.float32)) \
            if Lc else None
        self._pending = 0
        self._no_y = torch.zeros((d_model, 0), dtype=torch.float32, device=device)  # m = 0
        self._no_cols = torch.zeros(0, dtype=torch.long, device=device)

    def add(self, X: torch.Tensor, A: torch.Tensor) -> None:
        """``X (L, B, d_model)``, ``A (L, 3, B, d_ff)`` rows of one batch (model dtype or fp32)."""
        dt = self.act_sum.dtype
        self.count += X.shape[1]
        A = A.to(dt)
        self.act_sum += A.sum(2)
        self.act_sumsq += A.square().sum(2)
        self.h_abssum += A[:, 2].abs().sum(1)
        self.x_sum += X.sum(1, dtype=dt)
        if self._part is not None:
            for i, j in self.cov_slots.items():
                if X.dtype == torch.float64:  # a float64 model: straight into the sums
                    self.xtx[j].addmm_(X[i].T.to(dt), X[i].to(dt))
                else:
                    masked_cov_(self._part[j], self._no_y, X[i], X[i], self._no_cols, None)
            self._pending += 1
            if self._pending >= _FLUSH_EVERY:
                self.flush()

    def flush(self) -> None:
        if self._part is not None and self._part is not self.xtx and self._pending:
            self.xtx += self._part
            self._part.zero_()
        self._pending = 0

    def export(self, out: Mapping[str, torch.Tensor], i: int, g: int) -> None:
        """Copies layer slot ``i`` into row ``g`` of the (G, ...) output tensors ``out``."""
        self.flush()
        out["count"][g] = float(self.count)
        for k, a in enumerate(ACTIVATIONS):
            out[f"{a}_sum"][g].copy_(self.act_sum[i, k])
            out[f"{a}_sumsq"][g].copy_(self.act_sumsq[i, k])
        out["h_abssum"][g].copy_(self.h_abssum[i])
        out["x_sum"][g].copy_(self.x_sum[i])
        if i in self.cov_slots:
            out["xtx"][g].copy_(self.xtx[self.cov_slots[i]])


def _empty_stats(G: int, d_model: int, d_ff: int, cov: bool, dtype: torch.dtype
                 ) -> dict[str, torch.Tensor]:
    """Uninitialised (G, ...) CPU tensors of a NeuronStats; every row gets written."""
    out = {"count": torch.empty(G, dtype=dtype), "x_sum": torch.empty(G, d_model, dtype=dtype)}
    for name in _D_FF_STATS:
        out[name] = torch.empty(G, d_ff, dtype=dtype)
    if cov:
        out["xtx"] = torch.empty(G, d_model, d_model, dtype=dtype)
    return out


def collect_neuron_stats(
    model: nn.Module,
    tokenizer: Any,
    groups: Mapping[GroupKey, Sequence[Text]] | Iterable[Prompt],
    layers: Sequence[int],
    *,
    position: str = "last",
    system_prompt: str | None = None,
    batch_size: int = 8,
    cache_dir: str | Path | None = None,
    cov: bool | Iterable[int] = True,
    padding_side: str | None = None,
    chat_template: bool = True,
    max_length: int | None = None,
    stat_dtype: torch.dtype = torch.float64,
    early_stop: bool = True,
    sort_by_length: bool = True,
    prefix_reuse: bool = True,
    progress: bool = True,
) -> dict[int, NeuronStats]:
    """Pass 1: streamed per-neuron statistics and ``XᵀX`` per ``(lang, label)`` for ``layers``.

    Args:
        groups: ``{(lang, label): [text or Prompt, ...]}`` or a flat iterable of :class:`Prompt`
            (grouped by its ``lang`` and ``label``).
        layers: decoder layer indices; all are captured in the same forward passes.
        position: "last" (last prompt token, default) or "mean" (mean over prompt tokens).
        system_prompt: optional system message for the chat template.
        batch_size: prompts per forward. With ``sort_by_length`` the prompts of all groups are
            pooled and batched together by length (each row still counts for its own group);
            without it each group is batched alone, in the order given.
        cache_dir: folder of the on-disk cache (None: no cache). See the module docstring.
        cov: also accumulate ``XᵀX`` ``(d_model, d_model)`` per group: True (every layer),
            False, or the layers that need it (``G * d_model² * 8`` bytes per such layer in
            float64: 16 groups of Qwen2.5-0.5B are 103 MB per layer; about 2.5x that while the
            pooled groups' running sums are open).
        padding_side: "left" or "right" (default: the tokenizer's, else "left").
        chat_template: render with the chat template (default) or feed raw text.
        max_length: keep only the last ``max_length`` tokens of each prompt.
        stat_dtype: dtype of the running sums (float64 default).
        early_stop: stop the forward after the last needed layer's MLP.
        sort_by_length: batch prompts of similar length together (less padding; same result).
        prefix_reuse: forward the token prefix all prompts share (the chat template's system
            turn and user header) once and continue every batch from its KV cache (same
            statistics up to fp32 rounding; skipped where the model cannot, e.g. sliding-window
            layers shorter than the prompts).
        progress: show tqdm progress bars.

    Returns:
        ``{layer: NeuronStats}`` with the groups in the order given (on CPU).
    """
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
    layers = _check_layers(model, layers)
    groups_n = _normalise_groups(groups)
    for key, texts in groups_n.items():
        if not texts:
            log.warning("group %s is empty, skipped", key)
    keys_g = [k for k, texts in groups_n.items() if texts]
    if not keys_g:
        raise ValueError("no prompt groups given (or all are empty)")
    side = padding_side or getattr(tokenizer, "padding_side", None) or "left"
    device = _input_device(model)
    pad_id = _pad_id(tokenizer)
    parts = {l: _parts(model, l) for l in layers}
    cov_layers = _cov_layer_set(cov, layers)
    down_norm = _down_col_norms(parts, stat_dtype)
    cache = Path(cache_dir) if cache_dir is not None else None
    base_meta = _base_meta(model, position=position, stat_dtype=stat_dtype,
                           system_prompt=system_prompt, chat_template=chat_template)
    meta = {l: dict(base_meta, d_model=parts[l].d_model, d_ff=parts[l].d_ff, cov=l in cov_layers)
            for l in layers}
    G = len(keys_g)
    out = {l: _empty_stats(G, parts[l].d_model, parts[l].d_ff, l in cov_layers, stat_dtype)
           for l in layers}

    # Encode every group and look up the cache first, so that the shared prefix is known.
    plan: list[_GroupPlan] = []
    for g, (lang, label) in enumerate(keys_g):
        seqs = encode_prompts(tokenizer, groups_n[(lang, label)], system_prompt=system_prompt,
                              chat_template=chat_template, max_length=max_length)
        data_hash = _token_hash(seqs)
        keys = {l: _token_hash(STATS_FORMAT, FORMAT_VERSION, meta[l], l, lang, label, data_hash)
                for l in layers}
        paths = {l: cache / f"L{l:03d}" / f"{_safe(lang)}-{_safe(label)}-{keys[l][:20]}.safetensors"
                 for l in layers} if cache else {}
        todo = []
        for l in layers:
            if cache and paths[l].exists():
                try:
                    hit = NeuronStats.load(paths[l])
                    for name, t in hit._tensors().items():
                        out[l][name][g].copy_(t[0])
                    log.info("cache hit: layer %d group (%s, %s) from %s", l, lang, label, paths[l])
                    continue
                except (OSError, ValueError, KeyError, RuntimeError) as exc:
                    log.warning("ignoring unreadable cache file %s (%s)", paths[l], exc)
            todo.append(l)
        plan.append(_GroupPlan(g, lang, label, seqs, data_hash, keys, paths, todo))

    busy = [e for e in plan if e.todo]
    all_todo = sorted({l for e in busy for l in e.todo})
    P = _plan_prefix(model, [s for e in busy for s in e.seqs], prefix_reuse and bool(busy))
    with _packed_mlps(model, all_todo, early_stop=early_stop, parts=parts):
        prefix = (_compute_prefix(model, busy[0].seqs[0][:P], all_todo, parts=parts,
                                  acts=ACTIVATIONS, early_stop=early_stop, device=device)
                  if P else None)
        # Groups that need the same layers are forwarded together: their prompts pooled, sorted by
        # length and batched across groups (small groups alone make small, slow GEMMs); each row's
        # statistics go to its own group. Other groups (partial cache hits) run on their own.
        pools: dict[tuple[int, ...], list[_GroupPlan]] = {}
        for e in busy:
            pools.setdefault(tuple(e.todo) if sort_by_length else (e.g, *e.todo), []).append(e)
        bar = tqdm(total=sum(len(e.seqs) for e in busy), desc="capture prompts", unit="prompt",
                   disable=not progress, leave=False)
        for pool in pools.values():
            todo = pool[0].todo
            rows = [(k, i) for k, e in enumerate(pool) for i in range(len(e.seqs))]
            lengths = [len(pool[k].seqs[i]) for k, i in rows]
            batches = (_length_batches(lengths, batch_size) if sort_by_length
                       else _batches(len(rows), batch_size))
            with _Recorder(model, todo, position=position, acts=ACTIVATIONS, early_stop=early_stop,
                           parts=parts, prefix=prefix) as rec:
                accs = [_GroupAccum(len(todo), rec.d_model, rec.d_ff, dtype=stat_dtype,
                                    device=rec.device,
                                    cov_slots=[rec.slot[l] for l in todo if l in cov_layers])
                        for _ in pool]
                for idx in batches:
                    batch = _make_batch([pool[rows[j][0]].seqs[rows[j][1]][P:] for j in idx],
                                        pad_id=pad_id, side=side, device=device, prefix_len=P)
                    X, A = rec.run(batch)
                    owner = [rows[j][0] for j in idx]
                    if len(set(owner)) == 1:
                        accs[owner[0]].add(X, A)
                        owner = []
                    for k in dict.fromkeys(owner):  # a batch across groups: each its rows
                        sel = torch.tensor([b for b, o in enumerate(owner) if o == k],
                                           device=X.device)
                        accs[k].add(X.index_select(1, sel), A.index_select(2, sel))
                    bar.update(len(idx))
                for k, e in enumerate(pool):
                    for l in todo:
                        accs[k].export(out[l], rec.slot[l], e.g)
                log.info("capture %s: %d prompts of %d group(s) in %d forwards, %d tokens forwarded "
                         "(shared prefix of %d tokens forwarded once)",
                         ", ".join(f"{e.lang}/{e.label}" for e in pool), len(rows), len(pool), rec.batches,
                         rec.tokens, P)
            if cache:
                for e in pool:
                    for l in e.todo:
                        one = {name: t[e.g:e.g + 1] for name, t in out[l].items()}
                        st = NeuronStats(layer=l, groups=[(e.lang, e.label)], xtx=one.pop("xtx", None),
                                         down_col_norm=down_norm[l], meta=dict(meta[l]), **one)
                        st.save(e.paths[l], extra={"cache_key": e.keys[l],
                                                   "dataset_hash": e.data_hash})
        bar.close()
    return {l: NeuronStats(layer=l, groups=list(keys_g), xtx=out[l].pop("xtx", None),
                           down_col_norm=down_norm[l], meta=dict(meta[l]), **out[l])
            for l in layers}


# --------------------------------------------------------------------------------------------
# pass 2 and the single pass: harmful prompts parallel by id
# --------------------------------------------------------------------------------------------

#: ``neurons`` value meaning "every neuron": the full ``Xᵀ Y`` ``(d_model, d_ff)`` is kept
ALL_NEURONS = "all"

#: rows buffered per language before one covariance update (bigger GEMMs; constant memory)
_FLUSH_ROWS = 256


def _normalise_parallel(parallel: Mapping[str, Sequence[Text | None]] | Iterable[Prompt],
                        anchor_lang: str) -> dict[str, list[Text | None]]:
    if not isinstance(parallel, Mapping):
        parallel = align_parallel(parallel, anchor_lang=anchor_lang)
    par = {str(k): list(v) for k, v in parallel.items()}
    if anchor_lang not in par:
        raise ValueError(f"the anchor language {anchor_lang!r} is missing; have {sorted(par)}")
    n = len(par[anchor_lang])
    for lang, v in par.items():
        if len(v) != n:
            raise ValueError(f"parallel lists must be aligned by id: {lang!r} has {len(v)} "
                             f"entries, {anchor_lang!r} has {n}")
    return par


def _check_neurons(neurons: Mapping[int, Any], d_ff: Mapping[int, int]) -> dict[int, torch.Tensor]:
    """``{layer: sorted unique S}``; ``None`` or ``"all"`` gives every neuron ``arange(d_ff)``."""
    out = {}
    for l, s in neurons.items():
        if s is None or (isinstance(s, str) and s == ALL_NEURONS):
            out[int(l)] = torch.arange(d_ff[int(l)])
            continue
        if isinstance(s, str):
            raise ValueError(f"layer {l}: neurons must be indices, None or {ALL_NEURONS!r}, got {s!r}")
        s = torch.as_tensor(s, dtype=torch.long).reshape(-1).cpu()
        if s.numel() == 0:
            raise ValueError(f"layer {l}: the neuron set is empty")
        s = torch.unique(s)  # sorted
        if int(s.min()) < 0 or int(s.max()) >= d_ff[int(l)]:
            raise ValueError(f"layer {l}: neuron indices must lie in [0, {d_ff[int(l)]}), got "
                             f"[{int(s.min())}, {int(s.max())}]")
        out[int(l)] = s
    return out


def full_xty_bytes(model: nn.Module, layer: int, n_langs: int, *, proj: str = "up",
                   stat_dtype: torch.dtype = torch.float64) -> int:
    """Bytes of the full ``Xᵀ Y`` of one layer (``n_langs`` languages, every neuron): what
    :func:`collect_parallel_stats` keeps so that pass 2 is not needed. Qwen2.5-0.5B, 9 languages,
    "up", float64: 9 · 896 · 4864 · 8 = 314 MB; Llama-3-8B: 9 · 4096 · 14336 · 8 = 4.2 GB."""
    if proj not in PROJS:
        raise ValueError(f"proj must be one of {PROJS}, got {proj!r}")
    info = find_mlp(model, layer)
    k = int(info.d_ff) * (2 if proj == "both" else 1)
    return int(n_langs) * int(info.d_model) * k * torch.empty((), dtype=stat_dtype).element_size()


class _ParallelAccum:
    """Running sums of the parallel pass, per language (row order of ``langs``).

    Rows of a language are its prompts whose id has an anchor prompt. Per language: the count,
    ``Σx`` for every recorded layer; with ``neuron`` the per-neuron sums of up/gate/h (pass-1
    statistics of the group ``(lang, label)``); ``XᵀX`` for ``cov_layers``; for the target layers
    ``Xᵀ Y_anchor[:, cols]``, ``ΣY``, ``ΣY²``, where ``Y_anchor`` rows are taken from the chunk's
    anchor store by id. Covariance rows are buffered per language (``_FLUSH_ROWS``) and go through
    :func:`_cov_update` (the masked-covariance kernel, fp32 partials into ``stat_dtype``)."""

    def __init__(self, rec: _Recorder, n_langs: int, *, neuron: bool, cov_layers: Sequence[int],
                 cols: Mapping[int, torch.Tensor], dtype: torch.dtype):
        z = lambda *shape: torch.zeros(shape, dtype=dtype, device=rec.device)  # noqa: E731
        Lr, d, f = len(rec.layers), rec.d_model, rec.d_ff
        self.rec, self.dtype, self.neuron = rec, dtype, neuron
        self.count = [0] * n_langs
        self.x_sum = z(n_langs, Lr, d)
        if neuron:
            self.act_sum, self.act_sumsq = z(n_langs, Lr, 3, f), z(n_langs, Lr, 3, f)
            self.h_abssum = z(n_langs, Lr, f)
        self.cov_layers = [l for l in rec.layers if l in set(cov_layers)]
        self.xtx = {l: z(n_langs, d, d) for l in self.cov_layers}
        self.cols = {l: c.to(rec.device) for l, c in cols.items()}
        self.xty = {l: z(n_langs, d, c.numel()) for l, c in self.cols.items()}
        self.y_sum = {l: z(n_langs, c.numel()) for l, c in self.cols.items()}
        self.y_sumsq = {l: z(n_langs, c.numel()) for l, c in self.cols.items()}
        self._no_y = torch.zeros((d, 0), dtype=dtype, device=rec.device)
        self._no_cols = torch.zeros(0, dtype=torch.long, device=rec.device)
        self._buf: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(n_langs)]
        self._nbuf = [0] * n_langs
        self.store: torch.Tensor | None = None  # (L_targets, n_chunk, k_all) anchor rows

    def add(self, X: torch.Tensor, A: torch.Tensor, lang_of_row: Sequence[int],
            pos_of_row: Sequence[int]) -> None:
        """One batch: ``X (L, B, d)``, ``A (L, n_acts, B, d_ff)``; row b is language
        ``lang_of_row[b]`` of the id at position ``pos_of_row[b]`` of the current chunk."""
        lang_t = torch.as_tensor(list(lang_of_row))
        pos_t = torch.as_tensor(list(pos_of_row), dtype=torch.long)
        slots = [self.rec.slot[l] for l in self.cov_layers]
        for li in torch.unique(lang_t).tolist():
            rows = torch.nonzero(lang_t == li).flatten()
            r = rows.to(X.device)
            Xr = X.index_select(1, r)
            self.count[li] += int(rows.numel())
            self.x_sum[li] += Xr.sum(1, dtype=self.dtype)
            if self.neuron:
                Ar = A.index_select(2, r).to(self.dtype)
                self.act_sum[li] += Ar.sum(2)
                self.act_sumsq[li] += Ar.square().sum(2)
                self.h_abssum[li] += Ar[:, self.rec.act_index["h"]].abs().sum(1)
            if slots:
                self._buf[li].append((Xr[slots], pos_t[rows]))
                self._nbuf[li] += int(rows.numel())
                if self._nbuf[li] >= _FLUSH_ROWS:
                    self.flush(li)

    def flush(self, li: int | None = None) -> None:
        """Covariance update of the buffered rows (all languages when ``li`` is None)."""
        if li is None:
            for i in range(len(self._buf)):
                self.flush(i)
            return
        if not self._buf[li]:
            return
        Xb = torch.cat([b[0] for b in self._buf[li]], 1)          # (L_cov, R, d)
        pos = torch.cat([b[1] for b in self._buf[li]]).to(Xb.device)
        self._buf[li], self._nbuf[li] = [], 0
        targets = list(self.cols)
        for c, l in enumerate(self.cov_layers):
            X = Xb[c]
            if l in self.cols:
                Y = self.store[targets.index(l)].index_select(0, pos)  # (R, k_all), X's dtype
                _cov_update(self.xtx[l][li], self.xty[l][li], X, Y, self.cols[l])
                ys = Y.index_select(1, self.cols[l]).to(self.dtype)
                self.y_sum[l][li] += ys.sum(0)
                self.y_sumsq[l][li] += ys.square().sum(0)
            else:
                _cov_update(self.xtx[l][li], self._no_y, X, X, self._no_cols)


def _parallel_pass(model: nn.Module, enc: Mapping[str, Sequence[list[int] | None]],
                   langs: Sequence[str], anchor_lang: str, *, layers: Sequence[int],
                   parts: Mapping[int, _LayerParts], targets: Mapping[int, torch.Tensor],
                   cov_layers: Sequence[int], neuron: bool, proj: str, position: str,
                   batch_size: int, chunk_size: int, side: str, pad_id: int,
                   device: torch.device, stat_dtype: torch.dtype, early_stop: bool,
                   prefix_reuse: bool, progress: bool, desc: str) -> _ParallelAccum:
    """Forwards the parallel prompts and returns the filled accumulator.

    The ids (those with an anchor prompt) are taken in chunks of ``chunk_size``. In a chunk the
    anchor prompts are forwarded first, longest first, and their ``proj`` pre-activations (all
    ``d_ff`` columns, model dtype, ``chunk_size · n_acts · d_ff`` values per target layer) are
    kept as the targets; then the chunk's prompts of the other languages are pooled, sorted by
    length and batched across languages (little padding); each row is paired with its id's
    anchor row. Memory does not grow with the number of ids beyond one chunk."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    y_acts = ("up", "gate") if proj == "both" else (proj,)
    acts = ACTIVATIONS if neuron else y_acts
    order_langs = list(dict.fromkeys([anchor_lang, *langs]))
    P = _plan_prefix(model, [s for lang in order_langs for s in enc[lang] if s is not None],
                     prefix_reuse)
    first = next(s for s in enc[anchor_lang] if s is not None)
    prefix = (_compute_prefix(model, first[:P], layers, parts=parts, acts=acts,
                              early_stop=early_stop, device=device) if P else None)
    d_ff = parts[layers[0]].d_ff
    cols = {l: torch.cat([targets[l] + j * d_ff for j in range(len(y_acts))]) for l in targets}
    anchor_rows = [i for i, s in enumerate(enc[anchor_lang]) if s is not None]
    n_rows = sum(1 for lang in order_langs for i in anchor_rows if enc[lang][i] is not None)
    others = [lang for lang in langs if lang != anchor_lang]
    li_of = {lang: i for i, lang in enumerate(langs)}
    target_layers = list(targets)
    with _packed_mlps(model, layers, early_stop=early_stop, parts=parts), \
            _Recorder(model, layers, position=position, acts=acts, early_stop=early_stop,
                      parts=parts, prefix=prefix) as rec:
        acc = _ParallelAccum(rec, len(langs), neuron=neuron, cov_layers=cov_layers, cols=cols,
                             dtype=stat_dtype)
        y_idx = [rec.act_index[a] for a in y_acts]
        bar = tqdm(total=n_rows, desc=desc, disable=not progress, leave=False, unit="prompt")
        for chunk in _batches(len(anchor_rows), chunk_size):
            ids = [anchor_rows[j] for j in chunk]
            acc.store = (torch.empty((len(target_layers), len(ids), len(y_acts) * d_ff),
                                     dtype=rec.dtype, device=rec.device) if target_layers else None)
            # anchor prompts first: their pre-activations are the targets of the chunk's ids;
            # then every other language's prompts of the chunk, batched together by length
            jobs = [[(li_of.get(anchor_lang, -1), p, anchor_lang) for p in range(len(ids))],
                    [(li_of[lang], p, lang) for lang in others for p, i in enumerate(ids)
                     if enc[lang][i] is not None]]
            for step, job in enumerate(jobs):
                for b in _length_batches([len(enc[lang][ids[p]]) for _, p, lang in job], batch_size):
                    lang_rows = [job[k][0] for k in b]
                    pos = [job[k][1] for k in b]
                    seqs = [enc[job[k][2]][ids[job[k][1]]] for k in b]
                    X, A = rec.run(_make_batch([s[P:] for s in seqs], pad_id=pad_id, side=side,
                                               device=device, prefix_len=P))
                    if step == 0 and target_layers:
                        pt = torch.as_tensor(pos, device=rec.device)
                        for t, l in enumerate(target_layers):
                            Y = A[rec.slot[l]][y_idx]                      # (n_y, b, d_ff)
                            acc.store[t].index_copy_(0, pt, Y.permute(1, 0, 2).reshape(len(pos), -1))
                    if step == 1 or anchor_lang in li_of:
                        acc.add(X, A, lang_rows, pos)
                    bar.update(len(b))
            acc.flush()
        bar.close()
    log.info("%s: %d prompts in %d forwards, %d tokens forwarded (padding included; shared "
             "prefix of %d tokens forwarded once)", desc, n_rows, rec.batches, rec.tokens, P)
    acc.store = None
    return acc


def _parallel_setup(model: nn.Module, tokenizer: Any, parallel: Any, anchor_lang: str,
                    langs: Sequence[str] | None, *, system_prompt: str | None, chat_template: bool,
                    max_length: int | None) -> tuple[list[str], dict[str, list[list[int] | None]], str]:
    """``(langs, {lang: token ids per id or None}, data hash)`` of parallel prompts."""
    par = _normalise_parallel(parallel, anchor_lang)
    langs = list(par) if langs is None else list(dict.fromkeys(langs))
    for lang in langs:
        if lang not in par:
            raise ValueError(f"language {lang!r} not in parallel data ({sorted(par)})")
    enc: dict[str, list[list[int] | None]] = {}
    for lang in dict.fromkeys([anchor_lang, *langs]):
        present = [i for i, t in enumerate(par[lang]) if t is not None]
        seqs = encode_prompts(tokenizer, [par[lang][i] for i in present],
                              system_prompt=system_prompt, chat_template=chat_template,
                              max_length=max_length)
        col: list[list[int] | None] = [None] * len(par[lang])
        for i, s in zip(present, seqs):
            col[i] = s
        enc[lang] = col
    if not any(s is not None for s in enc[anchor_lang]):
        raise ValueError("no aligned rows: every anchor prompt is missing")
    return langs, enc, _token_hash(anchor_lang, langs, list(enc.values()))


def _cov_result(acc: _ParallelAccum, li_langs: Sequence[str], l: int, S: torch.Tensor, proj: str,
                anchor_lang: str, meta: Mapping[str, Any]) -> CovStats:
    return CovStats(layer=l, neurons=S.cpu(), proj=proj, anchor_lang=anchor_lang, langs=list(li_langs),
                    count=torch.tensor(acc.count, dtype=acc.dtype), xtx=acc.xtx[l].cpu(),
                    xty=acc.xty[l].cpu(), x_sum=acc.x_sum[:, acc.rec.slot[l]].cpu(),
                    y_sum=acc.y_sum[l].cpu(), y_sumsq=acc.y_sumsq[l].cpu(), meta=dict(meta))


def collect_target_stats(
    model: nn.Module,
    tokenizer: Any,
    parallel: Mapping[str, Sequence[Text | None]] | Iterable[Prompt],
    neurons: Mapping[int, Any],
    *,
    anchor_lang: str = "en",
    langs: Sequence[str] | None = None,
    proj: str = "up",
    position: str = "last",
    system_prompt: str | None = None,
    batch_size: int = 8,
    cache_dir: str | Path | None = None,
    padding_side: str | None = None,
    chat_template: bool = True,
    max_length: int | None = None,
    stat_dtype: torch.dtype = torch.float64,
    early_stop: bool = True,
    prefix_reuse: bool = True,
    chunk_size: int = 512,
    progress: bool = True,
) -> dict[int, CovStats]:
    """Pass 2: ``X_langᵀX_lang`` and ``X_langᵀ Y_anchor[:, S]`` per language, rows aligned by id.

    Args:
        parallel: ``{lang: [text or Prompt or None, ...]}`` aligned by id (entry i of every list
            is the same prompt; ``None`` = missing translation, skipped), or a flat iterable of
            :class:`Prompt` (aligned by ``id`` with :func:`align_parallel`). Harmful prompts.
        neurons: ``{layer: S}`` with S ``(m,)`` neuron indices (any int sequence; sorted here),
            or ``None`` / ``"all"`` for every neuron (the full ``XᵀY``, sliced later with
            :meth:`CovStats.select_neurons`; see :func:`full_xty_bytes`).
        anchor_lang: the language whose pre-activations at S are the targets Y.
        langs: languages to accumulate (default: every language in ``parallel``, anchor
            included, so ``X_enᵀY_en`` is there too).
        proj: "up" (targets ``up_proj`` pre-activations), "gate", or "both" (2m columns).
        batch_size: prompts per forward.
        chunk_size: ids whose anchor targets are held at once (memory: ``chunk_size`` rows of
            ``n_acts · d_ff`` values per layer); the order of the forwards inside a chunk is free,
            so prompts of all languages are sorted by length and batched together.
        Other arguments as in :func:`collect_neuron_stats`.

    Works on a model patched with :func:`edit_runtime.patch_model` (statistics of the patched
    model): the caller patches the earlier layers' edits before a joint fit's later layers.

    Returns:
        ``{layer: CovStats}`` (on CPU).
    """
    if proj not in PROJS:
        raise ValueError(f"proj must be one of {PROJS}, got {proj!r}")
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
    langs, enc, data_hash = _parallel_setup(model, tokenizer, parallel, anchor_lang, langs,
                                            system_prompt=system_prompt, chat_template=chat_template,
                                            max_length=max_length)
    if not neurons:
        raise ValueError("neurons is empty: give {layer: neuron indices}")
    layers = _check_layers(model, neurons)
    parts = {l: _parts(model, l) for l in layers}
    S = _check_neurons({int(l): s for l, s in neurons.items()}, {l: p.d_ff for l, p in parts.items()})
    side = padding_side or getattr(tokenizer, "padding_side", None) or "left"
    meta = _base_meta(model, position=position, stat_dtype=stat_dtype, system_prompt=system_prompt,
                      chat_template=chat_template)
    cache = Path(cache_dir) if cache_dir is not None else None
    keys = {l: _token_hash(COV_FORMAT, FORMAT_VERSION, meta, l, proj, anchor_lang,
                           S[l].tolist(), data_hash) for l in layers}
    paths = {l: cache / f"L{l:03d}" / f"cov-{proj}-{_safe(anchor_lang)}-{keys[l][:20]}.safetensors"
             for l in layers} if cache else {}
    results: dict[int, CovStats] = {}
    todo = []
    for l in layers:
        if cache and paths[l].exists():
            try:
                results[l] = CovStats.load(paths[l])
                log.info("cache hit: pass-2 layer %d from %s", l, paths[l])
                continue
            except (OSError, ValueError, KeyError) as exc:
                log.warning("ignoring unreadable cache file %s (%s)", paths[l], exc)
        todo.append(l)
    if not todo:
        return {l: results[l] for l in layers}
    acc = _parallel_pass(model, enc, langs, anchor_lang, layers=todo, parts=parts,
                         targets={l: S[l] for l in todo}, cov_layers=todo, neuron=False, proj=proj,
                         position=position, batch_size=batch_size, chunk_size=chunk_size, side=side,
                         pad_id=_pad_id(tokenizer), device=_input_device(model), stat_dtype=stat_dtype,
                         early_stop=early_stop, prefix_reuse=prefix_reuse, progress=progress,
                         desc="capture targets")
    for l in todo:
        st = _cov_result(acc, langs, l, S[l], proj, anchor_lang,
                         dict(meta, d_model=parts[l].d_model, d_ff=parts[l].d_ff))
        if cache:
            st.save(paths[l], extra={"cache_key": keys[l], "dataset_hash": data_hash})
        results[l] = st
    return {l: results[l] for l in layers}


def collect_parallel_stats(
    model: nn.Module,
    tokenizer: Any,
    parallel: Mapping[str, Sequence[Text | None]] | Iterable[Prompt],
    layers: Sequence[int],
    *,
    neurons: Mapping[int, Any] | None = None,
    anchor_lang: str = "en",
    langs: Sequence[str] | None = None,
    label: str = "harmful",
    proj: str = "up",
    cov: bool | Iterable[int] = True,
    position: str = "last",
    system_prompt: str | None = None,
    batch_size: int = 8,
    chunk_size: int = 512,
    cache_dir: str | Path | None = None,
    padding_side: str | None = None,
    chat_template: bool = True,
    max_length: int | None = None,
    stat_dtype: torch.dtype = torch.float64,
    early_stop: bool = True,
    prefix_reuse: bool = True,
    progress: bool = True,
) -> tuple[dict[int, NeuronStats], dict[int, CovStats]]:
    """Pass 1 and pass 2 of the parallel (harmful) prompts in one forward per prompt.

    Every prompt of ``parallel`` is forwarded once (anchor first, by id chunks, as in
    :func:`collect_target_stats`) and feeds both:

    - pass-1 statistics of the groups ``(lang, label)`` for every language of ``langs``
      (:class:`NeuronStats`, ``XᵀX`` for the ``cov`` layers), ready to merge with the harmless
      groups of :func:`collect_neuron_stats`;
    - pass-2 statistics (:class:`CovStats`) for the layers of ``neurons``: by default (None) every
      layer with **every** neuron, i.e. the full ``X_langᵀ Y_anchor`` ``(d_model, n_acts·d_ff)``.
      Once the safety neurons S are chosen from the pass-1 statistics,
      ``cov.select_neurons(S)`` is exactly what :func:`collect_target_stats` with S would have
      returned, so no second forward is needed (a joint multi-layer fit still needs pass 2 for
      the later layers, whose inputs change with the earlier edits). The full matrix costs
      :func:`full_xty_bytes` per layer: the fit switches to pass 2 above a size limit.

    Rows are the ids that have an anchor prompt (in every language: its prompts of those ids),
    so ``(anchor, label)`` holds every anchor prompt. Arguments as in
    :func:`collect_target_stats` and :func:`collect_neuron_stats`; ``neurons`` maps a layer to S,
    ``None`` or ``"all"``; its layers must be among ``layers`` and get ``XᵀX`` whatever ``cov``
    says. Cached per layer (both results) with ``cache_dir``.

    Returns:
        ``({layer: NeuronStats}, {layer: CovStats})`` on CPU.
    """
    if proj not in PROJS:
        raise ValueError(f"proj must be one of {PROJS}, got {proj!r}")
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
    layers = _check_layers(model, layers)
    langs, enc, data_hash = _parallel_setup(model, tokenizer, parallel, anchor_lang, langs,
                                            system_prompt=system_prompt, chat_template=chat_template,
                                            max_length=max_length)
    parts = {l: _parts(model, l) for l in layers}
    _mlp_shape(parts)  # one recorder: fail before the fingerprint, not after it
    neurons = {l: None for l in layers} if neurons is None else {int(l): s for l, s in neurons.items()}
    if not set(neurons) <= set(layers):
        raise ValueError(f"neurons given for layers {sorted(set(neurons) - set(layers))} not among {layers}")
    S = _check_neurons(neurons, {l: p.d_ff for l, p in parts.items()})
    cov_layers = _cov_layer_set(cov, layers) | set(S)
    side = padding_side or getattr(tokenizer, "padding_side", None) or "left"
    base_meta = _base_meta(model, position=position, stat_dtype=stat_dtype,
                           system_prompt=system_prompt, chat_template=chat_template)
    meta = {l: dict(base_meta, d_model=parts[l].d_model, d_ff=parts[l].d_ff) for l in layers}
    down_norm = _down_col_norms(parts, stat_dtype)
    cache = Path(cache_dir) if cache_dir is not None else None
    full = {l: S[l].numel() == parts[l].d_ff for l in S}
    keys = {l: _token_hash(PARALLEL_FORMAT, FORMAT_VERSION, meta[l], l, proj, anchor_lang, label,
                           l in cov_layers, None if l not in S else ALL_NEURONS if full[l] else S[l].tolist(),
                           data_hash) for l in layers}
    paths = {l: cache / f"L{l:03d}" / f"par-{proj}-{_safe(anchor_lang)}-{keys[l][:20]}.safetensors"
             for l in layers} if cache else {}
    cpaths = {l: p.with_name(p.name.replace("par-", "parcov-", 1)) for l, p in paths.items()}
    n_out: dict[int, NeuronStats] = {}
    c_out: dict[int, CovStats] = {}
    todo = []
    for l in layers:
        if cache and paths[l].exists() and (l not in S or cpaths[l].exists()):
            try:
                n_out[l] = NeuronStats.load(paths[l])
                if l in S:
                    c_out[l] = CovStats.load(cpaths[l])
                log.info("cache hit: parallel pass layer %d from %s", l, paths[l])
                continue
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                n_out.pop(l, None)
                log.warning("ignoring unreadable cache file %s (%s)", paths[l], exc)
        todo.append(l)
    if todo:
        acc = _parallel_pass(model, enc, langs, anchor_lang, layers=todo, parts=parts,
                             targets={l: S[l] for l in todo if l in S},
                             cov_layers=[l for l in todo if l in cov_layers], neuron=True, proj=proj,
                             position=position, batch_size=batch_size, chunk_size=chunk_size,
                             side=side, pad_id=_pad_id(tokenizer), device=_input_device(model),
                             stat_dtype=stat_dtype, early_stop=early_stop,
                             prefix_reuse=prefix_reuse, progress=progress, desc="capture prompts")
        groups = [(lang, label) for lang in langs]
        for l in todo:
            i = acc.rec.slot[l]
            t = {"count": torch.tensor(acc.count, dtype=stat_dtype), "x_sum": acc.x_sum[:, i].cpu(),
                 "h_abssum": acc.h_abssum[:, i].cpu()}
            for a in ACTIVATIONS:
                t[f"{a}_sum"] = acc.act_sum[:, i, acc.rec.act_index[a]].cpu()
                t[f"{a}_sumsq"] = acc.act_sumsq[:, i, acc.rec.act_index[a]].cpu()
            n_out[l] = NeuronStats(layer=l, groups=groups, down_col_norm=down_norm[l],
                                   xtx=acc.xtx[l].cpu().clone() if l in cov_layers else None,
                                   meta=dict(meta[l], cov=l in cov_layers), **t)
            if l in S:
                c_out[l] = _cov_result(acc, langs, l, S[l], proj, anchor_lang, meta[l])
            if cache:
                extra = {"cache_key": keys[l], "dataset_hash": data_hash}
                if l in S:
                    c_out[l].save(cpaths[l], extra=extra)
                n_out[l].save(paths[l], extra=extra)  # last: the pair is complete iff this exists
    return {l: n_out[l] for l in layers}, {l: c_out[l] for l in layers if l in S}
