"""Fitting: prompts -> statistics -> safety neurons -> closed-form solve -> ``SparseDelta``.

The recipe is SWE's algorithm 1 (docs/METHOD.md section 2) for one or several decoder layers:

1. **Pass 1** (:func:`edit_runtime.capture.collect_neuron_stats`, one forward for all layers):
   per-neuron statistics of the anchor language's harmful and harmless prompts (to find S) and
   ``X_safeᵀX_safe`` over the harmless prompts of every language.
2. **Neurons**: S = the anchor's SWE safety neurons (z > ``z_threshold`` ∪ d > ``d_threshold``
   on the ``neuron_activation`` pre-activation), optionally capped at ``max_neurons`` by z-score.
3. **Pass 2** (:func:`edit_runtime.capture.collect_target_stats`): for harmful prompts parallel
   by id, ``X_langᵀX_lang`` and ``X_langᵀY_anchor[:, S]`` per language. Pooled over the
   low-resource languages: ``xtx_low``, ``xty``; with the current weight rows ``W_S`` the
   solver's ``xtd = xty - xtx_low W_S`` and ``‖D‖² = ΣY² - 2 tr(W_SᵀXᵀY) + tr(W_SᵀXᵀX W_S)``.
4. **Solve** (:func:`edit_runtime.solver.solve`), float64, then cast to the model dtype:
   ``weight[S] += right.T @ left.T``, i.e. ``U = right.T`` ``(m, r)`` and ``V = left.T``
   ``(r, d_model)``, for ``up_proj`` rows, ``gate_proj`` rows, or both (one joint solve over
   ``2m`` targets sharing ``V``).

**Single pass** (``FitConfig.one_pass``, default on when it fits): passes 1 and 2 are merged.
The harmless prompts go through pass 1; the harmful prompts of every language go once through
:func:`edit_runtime.capture.collect_parallel_stats`, which keeps the full ``X_langᵀY_anchor``
``(d_model, d_ff)`` (every neuron) next to the pass-1 sums; once S is chosen the full matrix is
sliced to S, which is exactly pass 2's statistics. So each prompt is forwarded once instead of
the anchor's harmful prompts twice and pass 2 waiting for pass 1. It applies to the layers
whose inputs no earlier edit changes (mode "joint": the first layer; "separate": all of them)
while the full matrices fit ``one_pass_max_bytes`` (1 GiB; 314 MB per layer for Qwen2.5-0.5B
with 9 languages; a 4096-wide model with 14336 neurons needs 4.2 GB, so it falls back to pass 2
with the masked-covariance kernel). Given neuron sets (``neurons=``) need only their columns.

Several layers (``FitConfig.mode``):

- ``"joint"`` (default): one delta editing every layer. Layers are fitted in increasing order;
  pass 2 of each layer runs with the earlier layers' edits applied (patched), so its inputs and
  its English targets are those of the edited model and the edits compose. ``X_safeᵀX_safe``
  comes from pass 1 (unedited): the γ term keeps harmless inputs of the later layers close to
  unedited, which is what makes this approximation hold.
- ``"separate"``: each layer is fitted alone (one pass 2 for all layers) and the layers are ranked
  by the share of the safety gap closed on held-out harmful prompts (``heldout=``); the delta
  holds the best layer only, and every layer's report is returned.

Defaults the papers leave open are fields of :class:`FitConfig`, each with its reason.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

import edit_runtime
from edit_runtime.arch import find_mlp
from edit_runtime.capture import (
    CovStats,
    NeuronStats,
    collect_neuron_stats,
    collect_parallel_stats,
    collect_target_stats,
    full_xty_bytes,
)
from edit_runtime.data import Prompt, dataset_hash
from edit_runtime.delta import ModuleEdit, SparseDelta, compute_fingerprint
from edit_runtime.neurons import swe_neurons, swe_scores
from edit_runtime.patch import PatchHandle, patch_model
from edit_runtime.solver import SolveResult, objective_terms, solve

log = logging.getLogger(__name__)

__all__ = ["FitConfig", "LayerReport", "FitResult", "fit", "select_neurons", "layer_problem", "one_pass_layers"]

TARGETS = ("up", "gate", "both")
MODES = ("joint", "separate")


@dataclass
class FitConfig:
    """Every choice of the fit, with its default and why.

    Each field's one-line help also sits in its ``field(metadata={"help": ...})``.

    Attributes:
        layers: decoder layers to edit (required, at least one; stored sorted and deduplicated).
        low_langs: languages whose harmful prompts are mapped onto the anchor's (required, at
            least one; the anchor may not be among them).
        anchor_lang: the language whose safety response is the target. Default ``"en"``.
        rank: rank r of each layer's edit (SWE: 8-16 is enough). Default 16.
        gamma: weight γ of the harmless-utility term (SWE: 1-100). Default 1.0.
        lam: ridge λ; ``None`` (default) = ``lam_rel`` · trace/d, scale-aware
            (:func:`edit_runtime.solver.default_lam`).
        lam_rel: relative ridge, used when ``lam`` is ``None``; ``None`` (default) = the solver's
            default 1e-2.
        constraint: ``"soft"`` (default, SWE γ term) or ``"hard"`` (restrict the edit to the null
            space of the harmless statistics).
        null_rel: ``"hard"`` constraint only: eigenvalue threshold as a fraction of λ_max;
            ``None`` (default) = the solver's default.
        target: edited rows: ``"up"`` (default, SWE), ``"gate"`` or ``"both"`` (one joint solve
            sharing ``V``).
        neuron_activation: activation the neurons are chosen on: ``"up"`` (default), ``"gate"``,
            ``"h"`` or ``"up_or_gate"``.
        z_threshold: SWE z-score threshold. Default 2.0.
        d_threshold: SWE Cohen's d threshold. Default 1.0.
        max_neurons: cap |S| by z-score; ``None`` (default) = all.
        position: ``"last"`` (default) prompt token or ``"mean"`` over prompt tokens.
        system_prompt: system prompt for the chat template; default ``None``.
        batch_size: prompts (pass 1) or ids (pass 2) per forward. Default 8.
        mode: ``"joint"`` (default: compose the layers into one delta) or ``"separate"`` (fit
            each alone and keep the best by gap closed, held-out where given).
        cache_dir: statistics cache folder; ``None`` (default) = no cache.
        one_pass: forward each harmful prompt once, keeping the full XᵀY (sliced to S afterwards)
            for the layers whose inputs no earlier edit changes (joint: the first layer;
            separate: all). ``None`` (default) = when given neurons or when the full XᵀY fits
            ``one_pass_max_bytes``; ``True`` = regardless of the size; ``False`` = the two passes.
        one_pass_max_bytes: size limit of the full XᵀY kept by the single pass, all its layers
            together (Qwen2.5-0.5B, 9 languages, ``"up"``: 314 MB per layer). Default 1 GiB
            (``1 << 30``); must be >= 0.
        prefix_reuse: forward the chat template's shared prefix once and reuse its KV cache.
            Default ``True``.

    Raises:
        ValueError: ``layers`` or ``low_langs`` is empty; ``anchor_lang`` is among
            ``low_langs``; ``target`` or ``mode`` is not one of its values;
            ``one_pass_max_bytes`` < 0; or ``max_neurons`` < 1.
    """

    layers: Sequence[int] = field(default_factory=list, metadata={"help": "decoder layers to edit"})
    low_langs: Sequence[str] = field(
        default_factory=list, metadata={"help": "languages whose harmful prompts are mapped onto the anchor's"})
    anchor_lang: str = field(default="en", metadata={"help": "the language whose safety response is the target"})
    rank: int = field(default=16, metadata={"help": "rank r of each layer's edit (SWE: 8-16 is enough)"})
    gamma: float = field(default=1.0, metadata={"help": "weight of the harmless-utility term (SWE: 1-100)"})
    lam: float | None = field(default=None, metadata={"help": "ridge λ; None = lam_rel · trace/d (scale-aware)"})
    lam_rel: float | None = field(default=None, metadata={"help": "relative ridge; None = solver default 1e-2"})
    constraint: str = field(default="soft", metadata={"help": "'soft' (SWE γ term) or 'hard' (null space)"})
    null_rel: float | None = field(default=None, metadata={"help": "hard constraint: eigenvalue threshold / λ_max"})
    target: str = field(default="up", metadata={"help": "edited rows: 'up' (SWE), 'gate' or 'both'"})
    neuron_activation: str = field(default="up", metadata={"help": "activation the neurons are chosen on"})
    z_threshold: float = field(default=2.0, metadata={"help": "SWE z-score threshold"})
    d_threshold: float = field(default=1.0, metadata={"help": "SWE Cohen's d threshold"})
    max_neurons: int | None = field(default=None, metadata={"help": "cap |S| by z-score; None = all"})
    position: str = field(default="last", metadata={"help": "'last' prompt token or 'mean' over prompt tokens"})
    system_prompt: str | None = field(default=None, metadata={"help": "system prompt for the chat template"})
    batch_size: int = field(default=8, metadata={"help": "prompts (pass 1) or ids (pass 2) per forward"})
    mode: str = field(default="joint", metadata={"help": "'joint' (compose layers) or 'separate' (rank them)"})
    cache_dir: str | None = field(default=None, metadata={"help": "statistics cache folder; None = no cache"})
    one_pass: bool | None = field(
        default=None, metadata={"help": "forward each harmful prompt once, keeping the full XᵀY (sliced to S "
                                "afterwards) for the layers whose inputs no earlier edit changes (joint: the "
                                "first layer; separate: all); None = when given neurons or when the full "
                                "XᵀY fits one_pass_max_bytes; False = the two passes"})
    one_pass_max_bytes: int = field(
        default=1 << 30, metadata={"help": "size limit of the full XᵀY kept by the single pass, all its layers "
                                   "together (Qwen2.5-0.5B, 9 languages, 'up': 314 MB per layer)"})
    prefix_reuse: bool = field(
        default=True, metadata={"help": "forward the chat template's shared prefix once and reuse its KV cache"})

    def __post_init__(self) -> None:
        self.layers = sorted({int(l) for l in self.layers})
        self.low_langs = [str(l) for l in self.low_langs]
        if not self.layers:
            raise ValueError("FitConfig.layers is empty: give at least one layer to edit")
        if not self.low_langs:
            raise ValueError("FitConfig.low_langs is empty: give the languages to fix")
        if self.anchor_lang in self.low_langs:
            raise ValueError(f"anchor language {self.anchor_lang!r} is also among low_langs {self.low_langs}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.one_pass_max_bytes < 0:
            raise ValueError(f"one_pass_max_bytes must be >= 0, got {self.one_pass_max_bytes}")
        if self.max_neurons is not None and self.max_neurons < 1:
            raise ValueError(f"max_neurons must be >= 1 or None, got {self.max_neurons}")


@dataclass
class LayerReport:
    """What the fit of one layer saw and achieved.

    Attributes:
        layer: the decoder layer.
        num_neurons: number of edited rows: |S| for :func:`fit`, ``d_model`` (every output row of
            ``down_proj``) for :func:`edit_runtime.residual_fit.fit_residual`.
        rank: the edit's rank after the solver's clamping (at most the requested one).
        lam: the ridge λ the solve used (the scale-aware default when none was given).
        gap_closed_train: share of the safety gap closed on the training statistics,
            ``1 - ‖XΔW - D‖² / ‖D‖²``; ``None`` when ``‖D‖²`` is 0.
        gap_closed_heldout: the same on the held-out prompts; ``None`` without them (always for
            the residual fit).
        solve: the solver's scalar diagnostics (:meth:`edit_runtime.solver.SolveResult.summary`).
    """

    layer: int
    num_neurons: int
    rank: int
    lam: float
    gap_closed_train: float | None
    gap_closed_heldout: float | None
    solve: dict[str, Any]


@dataclass
class FitResult:
    """The delta plus per-layer reports, the neuron sets and the time each step took.

    Attributes:
        delta: the fitted :class:`~edit_runtime.delta.SparseDelta`, not applied to the model; its
            metadata records the method, config (without ``cache_dir``), languages, data hashes,
            reports and timings, and its fingerprint the edited modules of the base model.
        layers: one :class:`LayerReport` per fitted layer, in fit order (mode ``"separate"``:
            every layer's, though the delta holds the best layer only).
        neurons: ``{layer: (m,) int64}`` edited row indices S per layer (the residual fit:
            ``arange(d_model)``).
        seconds: wall time of each step, e.g. ``"pass1_neurons"``, ``"pass2_targets"``,
            ``"solve"`` (:func:`fit`) or ``"statistics"``, ``"solve"`` (residual fit), and
            ``"total"``.
    """

    delta: SparseDelta
    layers: list[LayerReport]
    neurons: dict[int, torch.Tensor]
    seconds: dict[str, float]


# ---- pieces ------------------------------------------------------------------------------------

def select_neurons(stats: dict[int, NeuronStats], cfg: FitConfig) -> dict[int, torch.Tensor]:
    """``{layer: S}``: the anchor language's SWE safety neurons, capped at ``max_neurons`` by z."""
    sets = swe_neurons(stats, langs=[cfg.anchor_lang], activation=cfg.neuron_activation,
                       z_threshold=cfg.z_threshold, d_threshold=cfg.d_threshold)
    out = {}
    for layer in cfg.layers:
        s = sets.get(layer, cfg.anchor_lang)
        if s.numel() == 0:
            raise ValueError(
                f"layer {layer}: no {cfg.anchor_lang!r} safety neurons at z > {cfg.z_threshold}, "
                f"d > {cfg.d_threshold}; lower the thresholds or add prompts")
        if cfg.max_neurons is not None and s.numel() > cfg.max_neurons:
            act = "up" if cfg.neuron_activation == "up_or_gate" else cfg.neuron_activation
            z = swe_scores(stats[layer], cfg.anchor_lang, activation=act)["z"]
            s = s[torch.argsort(z[s], descending=True)[: cfg.max_neurons]].sort().values
        out[layer] = s
    return out


def _rows(model: nn.Module, layer: int, proj: str, neurons: torch.Tensor) -> torch.Tensor:
    """Current weight rows ``W[S]`` of ``proj`` ("up"/"gate") as float64 ``(m, d_model)``."""
    path, _, offset = find_mlp(model, layer).target(proj)
    module = model.get_submodule(path)
    weight = getattr(module, "base_layer", module).weight
    return weight.detach()[neurons.to(weight.device) + offset].double().cpu()


def layer_problem(model: nn.Module, cov: CovStats, langs: Sequence[str]) -> dict[str, Any]:
    """The solver's inputs for one layer from pass-2 statistics pooled over ``langs``.

    Returns ``{"xtx_low" (d, d), "xtd" (d, k), "dtd" float, "count" int}`` in float64, with
    ``k = m`` (or ``2m`` for proj "both", up columns first) and ``W_S`` the current rows.
    """
    pooled = cov.pooled(langs)
    xtx = pooled["xtx"].double()
    xty = pooled["xty"].double()
    w_cols = torch.cat([_rows(model, cov.layer, proj, cov.neurons).T
                        for proj in cov.target_slices()], dim=1)  # (d, k), paper layout W_S
    xtd = xty - xtx @ w_cols
    dtd = float(pooled["y_sumsq"].double().sum() - 2.0 * (w_cols * xty).sum()
                + (w_cols * (xtx @ w_cols)).sum())
    return {"xtx_low": xtx, "xtd": xtd, "dtd": dtd, "count": int(pooled["count"])}


def _edits(model: nn.Module, layer: int, cov: CovStats, res: SolveResult,
           dtype: torch.dtype) -> list[ModuleEdit]:
    """``ModuleEdit``s of one layer from the solver's factors (PyTorch layout, model dtype)."""
    info = find_mlp(model, layer)
    v = res.left.T.contiguous()  # (r, d_model), shared by the up and gate targets
    parts = {proj: res.right[:, cols].T.contiguous() for proj, cols in cov.target_slices().items()}
    by_module: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for proj, u in parts.items():
        path, _, offset = info.target(proj)
        by_module.setdefault(path, []).append((cov.neurons + offset, u))
    edits = []
    for path, pieces in by_module.items():  # a fused gate_up_proj gets both pieces in one edit
        idx = torch.cat([p[0] for p in pieces])
        u = torch.cat([p[1] for p in pieces])
        order = torch.argsort(idx)
        edits.append(ModuleEdit(module=path, side="out", neurons=idx[order].to(torch.int64),
                                U=u[order].to(dtype), V=v.to(dtype)))
    return edits


def _gap_closed(model: nn.Module, cov: CovStats, langs: Sequence[str], res: SolveResult) -> float | None:
    prob = layer_problem(model, cov, langs)
    terms = objective_terms((res.left, res.right), prob["xtx_low"], None, prob["xtd"],
                            gamma=0.0, lam=0.0, dtd=prob["dtd"])
    return terms.gap_closed


def one_pass_layers(model: nn.Module, cfg: FitConfig, n_langs: int, *, neurons_given: bool = False) -> list[int]:
    """The layers whose pass-2 statistics come from the single pass (see ``FitConfig.one_pass``).

    Only layers whose inputs no earlier edit changes qualify: the first layer in mode "joint",
    every layer in mode "separate". With the neuron sets given up front only their columns are
    kept, so there is no size limit; otherwise layers are taken in order while the full ``XᵀY``
    (:func:`edit_runtime.capture.full_xty_bytes`, ``n_langs`` languages) fits
    ``cfg.one_pass_max_bytes`` (``one_pass=True`` ignores the limit)."""
    if cfg.one_pass is False:
        return []
    eligible = list(cfg.layers[:1]) if cfg.mode == "joint" else list(cfg.layers)
    if neurons_given or cfg.one_pass:
        return eligible
    out, used = [], 0
    for layer in eligible:
        size = full_xty_bytes(model, layer, n_langs, proj=cfg.target)
        if used + size > cfg.one_pass_max_bytes:
            log.info("layer %d: the full XᵀY (%.0f MB) exceeds one_pass_max_bytes; pass 2 collects it",
                     layer, size / 1e6)
            break
        out.append(layer)
        used += size
    return out


# ---- the fit -----------------------------------------------------------------------------------

def fit(model: nn.Module, tokenizer: Any, harmful: Sequence[Prompt], harmless: Sequence[Prompt],
        cfg: FitConfig, *, heldout: Sequence[Prompt] | None = None,
        neurons: Mapping[int, Any] | None = None, progress: bool = True) -> FitResult:
    """Fits a sparse low-rank safety edit; returns the delta (not applied) and its reports.

    Args:
        model, tokenizer: a loaded causal LM (any architecture :mod:`edit_runtime.arch` finds).
        harmful: harmful prompts, parallel across languages by ``id`` (anchor + ``low_langs``).
            Give the training split only (e.g. ``load_prompts(..., split="train")``).
        harmless: harmless prompts (any languages; the anchor's are needed to find neurons).
        cfg: :class:`FitConfig`.
        heldout: harmful prompts of held-out ids (e.g. the validation split), used to report
            (and, in mode "separate", rank layers by) the share of the safety gap closed.
        neurons: ``{layer: S}`` to use instead of the anchor's SWE neurons (e.g. SSN's
            SS-neurons from :mod:`edit_runtime.neurons`); every layer of ``cfg`` needs one. Each
            ``S`` is anything ``torch.as_tensor`` takes; it is made unique and sorted.
        progress: show tqdm bars during the statistics passes.

    Harmful prompts of languages other than the anchor and ``low_langs`` are ignored. In mode
    "joint" the earlier layers' edits are patched in temporarily for the later layers' pass 2
    and removed again, so the model is returned as it came.

    Returns:
        A :class:`FitResult`: the delta, one :class:`LayerReport` per fitted layer, the neuron
        sets and the step timings (also in ``delta.metadata["seconds"]``).

    Raises:
        ValueError: the anchor or a low language has no harmful prompts; the anchor has no
            harmless prompts; ``neurons`` misses a layer of ``cfg``; a layer has no safety
            neurons at the thresholds; or the solver refuses the problem
            (:func:`edit_runtime.solver.solve`).
    """
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    dtype = next(model.parameters()).dtype
    langs_needed = {cfg.anchor_lang, *cfg.low_langs}
    harmful = [p for p in harmful if p.lang in langs_needed]
    missing = langs_needed - {p.lang for p in harmful}
    if missing:
        raise ValueError(f"no harmful prompts in {sorted(missing)} (have {sorted({p.lang for p in harmful})})")
    if not any(p.lang == cfg.anchor_lang for p in harmless):
        raise ValueError(f"no harmless prompts in the anchor language {cfg.anchor_lang!r}")
    common = dict(position=cfg.position, system_prompt=cfg.system_prompt, batch_size=cfg.batch_size,
                  cache_dir=cfg.cache_dir, progress=progress, prefix_reuse=cfg.prefix_reuse)
    if neurons is not None:
        missing_layers = set(cfg.layers) - {int(l) for l in neurons}
        if missing_layers:
            raise ValueError(f"neurons given for layers {sorted(neurons)}, missing {sorted(missing_layers)}")
        neurons = {int(l): torch.as_tensor(s, dtype=torch.int64).unique() for l, s in neurons.items()}
    harmless_groups: dict[tuple[str, str], list[Prompt]] = {}
    for p in harmless:
        harmless_groups.setdefault((p.lang, "harmless"), []).append(p)
    safe_langs = sorted({lang for (lang, _) in harmless_groups})
    n_langs = len({p.lang for p in harmful})
    single = one_pass_layers(model, cfg, n_langs, neurons_given=neurons is not None)

    # Pass 1: neuron statistics of the anchor's harmful and of every harmless prompt, X_safeᵀX_safe.
    t0 = time.perf_counter()
    cov_pre: dict[int, CovStats] = {}
    if single:
        # One forward per prompt: the harmful prompts of every language (by id) give the pass-1
        # statistics and, for the layers in `single`, the pass-2 statistics (full XᵀY, or the
        # given neurons' columns), so pass 2 only runs for layers behind an earlier edit.
        stats_safe = collect_neuron_stats(model, tokenizer, harmless_groups, cfg.layers, **common)
        seconds["pass1_harmless"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        targets = {l: (neurons[l] if neurons is not None else None) for l in single}
        stats_harm, cov_single = collect_parallel_stats(
            model, tokenizer, harmful, cfg.layers, neurons=targets, anchor_lang=cfg.anchor_lang,
            proj=cfg.target, **common)
        seconds["pass1_harmful"] = time.perf_counter() - t1
        stats1 = {l: NeuronStats.merge([stats_harm[l], stats_safe[l]]) for l in cfg.layers}
    else:
        groups: dict[tuple[str, str], list[Prompt]] = {
            (cfg.anchor_lang, "harmful"): [p for p in harmful if p.lang == cfg.anchor_lang]}
        groups.update(harmless_groups)
        stats1 = collect_neuron_stats(model, tokenizer, groups, cfg.layers, **common)
    seconds["pass1_neurons"] = time.perf_counter() - t0
    if neurons is None:
        neurons = select_neurons(stats1, cfg)
    if single:
        cov_pre = {l: cov_single.pop(l).select_neurons(neurons[l]) for l in single}
        del cov_single

    handles: list[PatchHandle] = []
    edits: list[ModuleEdit] = []
    reports: list[LayerReport] = []
    results: dict[int, tuple[SolveResult, CovStats, CovStats | None]] = {}
    try:
        plan = [[l] for l in cfg.layers] if cfg.mode == "joint" else [list(cfg.layers)]
        seconds["pass2_targets"] = seconds["solve"] = 0.0
        for layers in plan:
            t0 = time.perf_counter()
            rest = [l for l in layers if l not in cov_pre]
            cov = dict(collect_target_stats(model, tokenizer, harmful, {l: neurons[l] for l in rest},
                                            anchor_lang=cfg.anchor_lang, proj=cfg.target, **common)
                       if rest else {})
            cov.update({l: cov_pre[l] for l in layers if l in cov_pre})
            cov_held = (collect_target_stats(model, tokenizer, heldout, {l: neurons[l] for l in layers},
                                             anchor_lang=cfg.anchor_lang, proj=cfg.target, **common)
                        if heldout else None)
            seconds["pass2_targets"] += time.perf_counter() - t0
            for layer in layers:
                t0 = time.perf_counter()
                prob = layer_problem(model, cov[layer], cfg.low_langs)
                xtx_safe = stats1[layer].xtx_sum(safe_langs, "harmless").double()
                res = solve(prob["xtx_low"], xtx_safe, prob["xtd"], gamma=cfg.gamma, rank=cfg.rank,
                            lam=cfg.lam, lam_rel=cfg.lam_rel if cfg.lam is None else None,
                            constraint=cfg.constraint, null_rel=cfg.null_rel, dtd=prob["dtd"])
                seconds["solve"] += time.perf_counter() - t0
                held = _gap_closed(model, cov_held[layer], cfg.low_langs, res) if cov_held else None
                results[layer] = (res, cov[layer], cov_held[layer] if cov_held else None)
                reports.append(LayerReport(layer=layer, num_neurons=int(neurons[layer].numel()),
                                           rank=res.rank, lam=res.lam, gap_closed_train=res.gap_closed,
                                           gap_closed_heldout=held, solve=res.summary()))
                log.info("layer %d: |S|=%d r=%d gap closed train %.3f held-out %s", layer,
                         neurons[layer].numel(), res.rank, res.gap_closed or float("nan"),
                         "n/a" if held is None else f"{held:.3f}")
                layer_edits = _edits(model, layer, cov[layer], res, dtype)
                if cfg.mode == "joint":
                    edits.extend(layer_edits)
                    if layer != cfg.layers[-1]:  # later layers see this edit
                        handles.append(patch_model(model, SparseDelta(layer_edits), check_fingerprint=False))
    finally:
        for h in reversed(handles):
            h.remove()

    if cfg.mode == "separate":
        def score(r: LayerReport) -> float:
            g = r.gap_closed_heldout if r.gap_closed_heldout is not None else r.gap_closed_train
            return float("-inf") if g is None else g

        best = max(reports, key=score)
        res, cov_best, _ = results[best.layer]
        edits = _edits(model, best.layer, cov_best, res, dtype)
        kept_layers = [best.layer]
    else:
        kept_layers = list(cfg.layers)

    modules = sorted({e.module for e in edits})
    metadata = {
        "method": "swe-closed-form",
        "edit_runtime_version": edit_runtime.__version__,
        "layers": kept_layers,
        "config": {k: v for k, v in asdict(cfg).items() if k != "cache_dir"},
        "languages": {"anchor": cfg.anchor_lang, "low": list(cfg.low_langs), "safe": safe_langs},
        "data": {"harmful_sha256": dataset_hash(harmful), "harmless_sha256": dataset_hash(harmless),
                 "heldout_sha256": dataset_hash(heldout) if heldout else None,
                 "n_harmful": len(harmful), "n_harmless": len(harmless)},
        "neurons": {str(l): int(neurons[l].numel()) for l in kept_layers},
        "single_pass_layers": list(single),
        "reports": [asdict(r) for r in reports],
    }
    delta = SparseDelta(edits=edits, metadata=metadata, fingerprint=compute_fingerprint(model, modules))
    seconds["total"] = time.perf_counter() - t_start
    delta.metadata["seconds"] = seconds
    return FitResult(delta=delta, layers=reports, neurons=neurons, seconds=seconds)

