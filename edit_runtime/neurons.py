"""Safety neurons from pass-1 statistics (:class:`edit_runtime.capture.NeuronStats`) only.

SWE's dual metric (METHOD.md section 1), per layer l and language, on one activation per prompt::

    Delta_j = mean_harmful_j - mean_harmless_j
    z_j     = (Delta_j - mean_j(Delta)) / std_j(Delta)          # over the layer's d_ff neurons
    d_j     = Delta_j / s_pooled_j                               # Cohen's d, pooled std
    S_l     = {j : z_j > z_threshold} ∪ {j : d_j > d_threshold}  # one-sided: harmful > harmless

``std_j`` is the unbiased standard deviation over neurons; ``s_pooled² = ((n_h-1) s_h² + (n_s-1)
s_s²) / (n_h + n_s - 2)`` with unbiased group variances; a neuron with ``s_pooled = 0`` has
``d = +inf`` if ``Delta > 0`` else 0. Which activation (``activation=``):

- ``"up"`` (default): the ``up_proj`` pre-activation. The edit (METHOD.md section 2) rewrites
  the S rows of ``up_proj`` and its targets are ``up_proj`` pre-activations, so the neurons are
  chosen on the quantity the edit moves;
- ``"gate"``: the ``gate_proj`` pre-activation; ``"h"``: ``act(gate) * up``;
- ``"up_or_gate"``: the union of the "up" and "gate" sets (METHOD's "of up_proj and gate_proj").

SSN's neurons: importance ``I_j = mean over prompts |h_j| * ‖W_down[:, j]‖`` (the exact change of
the layer output when neuron j is zeroed). Per layer, the monolingual safety neurons are the top
``top_percent`` % (default 3, ``k = ceil(p/100 * d_ff)``) on harmful prompts minus the top p% on
harmless prompts: ``MS_l(lang)``; the shared safety neurons are ``SS_l(lang) = MS_l(lang) ∩
MS_l(anchor)`` (anchor = English).

Cross-language overlap: ``Jaccard(A, B) = |A ∩ B| / |A ∪ B|`` (1.0 for two empty sets), per
layer or pooled over layers (sets of (layer, neuron) pairs); :func:`save_jaccard` writes the
matrix as JSON and as an annotated PNG heatmap.

Public API: :class:`NeuronSets`, :func:`swe_neurons`, :func:`swe_scores`, :func:`ms_neurons`,
:func:`ss_neurons`, :func:`jaccard`, :func:`jaccard_matrix`, :func:`save_jaccard`,
:func:`plot_jaccard`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from edit_runtime.capture import NeuronStats

__all__ = [
    "NeuronSets",
    "SWE_ACTIVATIONS",
    "swe_scores",
    "swe_neurons",
    "ms_neurons",
    "ss_neurons",
    "jaccard",
    "jaccard_matrix",
    "save_jaccard",
    "plot_jaccard",
]

SWE_ACTIVATIONS = ("up", "gate", "h", "up_or_gate")
NEURON_SETS_FORMAT = "edit_runtime.neuron_sets"

StatsArg = NeuronStats | Mapping[int, NeuronStats] | Sequence[NeuronStats]


def _as_layers(stats: StatsArg) -> dict[int, NeuronStats]:
    if isinstance(stats, NeuronStats):
        return {stats.layer: stats}
    if isinstance(stats, Mapping):
        return {int(l): s for l, s in sorted(stats.items())}
    return {s.layer: s for s in sorted(stats, key=lambda s: s.layer)}


def _idx(t: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(t, as_tuple=False).reshape(-1).to(torch.long).cpu()


@dataclass
class NeuronSets:
    """Neuron sets per layer and language.

    Attributes:
        kind: "swe" (dual metric), "ms" (SSN monolingual) or "ss" (SSN shared).
        sets: ``{layer: {lang: (m,) int64 sorted neuron indices}}``.
        params: how they were found (thresholds, activation, labels, ...).
    """

    kind: str
    sets: dict[int, dict[str, torch.Tensor]]
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clean: dict[int, dict[str, torch.Tensor]] = {}
        for l, per in self.sets.items():
            clean[int(l)] = {str(lang): torch.unique(torch.as_tensor(s, dtype=torch.long).reshape(-1).cpu())
                             for lang, s in per.items()}
        self.sets = dict(sorted(clean.items()))

    @property
    def layers(self) -> list[int]:
        return list(self.sets)

    @property
    def langs(self) -> list[str]:
        return list(dict.fromkeys(lang for per in self.sets.values() for lang in per))

    def get(self, layer: int, lang: str) -> torch.Tensor:
        """``(m,)`` int64 sorted neuron indices of ``lang`` at ``layer``."""
        try:
            return self.sets[int(layer)][lang]
        except KeyError:
            raise KeyError(f"no {self.kind} neuron set for layer {layer}, language {lang!r}; "
                           f"layers {self.layers}, languages {self.langs}") from None

    def for_lang(self, lang: str) -> dict[int, torch.Tensor]:
        """``{layer: neurons}`` of one language (e.g. the English S for pass 2 / the fit)."""
        return {l: per[lang] for l, per in self.sets.items() if lang in per}

    def counts(self) -> dict[int, dict[str, int]]:
        return {l: {lang: int(s.numel()) for lang, s in per.items()} for l, per in self.sets.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"format": NEURON_SETS_FORMAT, "version": 1, "kind": self.kind,
                "params": self.params,
                "sets": {str(l): {lang: s.tolist() for lang, s in per.items()}
                         for l, per in self.sets.items()},
                "counts": {str(l): c for l, c in self.counts().items()}}

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load_json(cls, path: str | Path) -> "NeuronSets":
        d = json.loads(Path(path).read_text())
        if d.get("format") != NEURON_SETS_FORMAT:
            raise ValueError(f"{path}: format {d.get('format')!r}, expected {NEURON_SETS_FORMAT!r}")
        return cls(kind=d["kind"], params=d.get("params", {}),
                   sets={int(l): {lang: torch.tensor(s, dtype=torch.long) for lang, s in per.items()}
                         for l, per in d["sets"].items()})


# --------------------------------------------------------------------------------------------
# SWE dual metric
# --------------------------------------------------------------------------------------------

def swe_scores(stats: NeuronStats, lang: str, *, activation: str = "up",
               harmful: str = "harmful", harmless: str = "harmless") -> dict[str, torch.Tensor]:
    """``{"delta", "z", "d"}`` each ``(d_ff,)`` float64 for one layer, one language and one of
    "up", "gate", "h" (see the module docstring for the formulas)."""
    if activation not in ("up", "gate", "h"):
        raise ValueError(f"activation must be 'up', 'gate' or 'h' here, got {activation!r}")
    n_h, n_s = stats.n(lang, harmful), stats.n(lang, harmless)
    if n_h < 2 or n_s < 2:
        raise ValueError(f"layer {stats.layer}, {lang!r}: need >= 2 prompts per class for Cohen's d "
                         f"(harmful {n_h}, harmless {n_s})")
    mh = stats.mean(activation, lang, harmful).double()
    ms = stats.mean(activation, lang, harmless).double()
    vh = stats.var(activation, lang, harmful).double()
    vs = stats.var(activation, lang, harmless).double()
    delta = mh - ms
    std = delta.std()
    z = (delta - delta.mean()) / std if float(std) > 0 else torch.zeros_like(delta)
    s_pooled = (((n_h - 1) * vh + (n_s - 1) * vs) / (n_h + n_s - 2)).sqrt()
    d = torch.where(s_pooled > 0, delta / s_pooled.clamp_min(1e-300),
                    torch.where(delta > 0, torch.full_like(delta, math.inf), torch.zeros_like(delta)))
    return {"delta": delta, "z": z, "d": d}


def _swe_mask(stats: NeuronStats, lang: str, activation: str, z_threshold: float,
              d_threshold: float, harmful: str, harmless: str) -> torch.Tensor:
    acts = ("up", "gate") if activation == "up_or_gate" else (activation,)
    mask = torch.zeros(stats.d_ff, dtype=torch.bool)
    for a in acts:
        sc = swe_scores(stats, lang, activation=a, harmful=harmful, harmless=harmless)
        mask |= ((sc["z"] > z_threshold) | (sc["d"] > d_threshold)).cpu()
    return mask


def _langs_with_both(stats: NeuronStats, harmful: str, harmless: str) -> list[str]:
    return [lang for lang in stats.langs if stats.has(lang, harmful) and stats.has(lang, harmless)]


def swe_neurons(stats: StatsArg, *, langs: Sequence[str] | None = None, activation: str = "up",
                z_threshold: float = 2.0, d_threshold: float = 1.0, harmful: str = "harmful",
                harmless: str = "harmless") -> NeuronSets:
    """SWE safety neurons ``S_l(lang)`` for every layer in ``stats`` and every language with both
    classes (or ``langs``). ``activation``: "up" (default), "gate", "h" or "up_or_gate"."""
    if activation not in SWE_ACTIVATIONS:
        raise ValueError(f"activation must be one of {SWE_ACTIVATIONS}, got {activation!r}")
    sets: dict[int, dict[str, torch.Tensor]] = {}
    for l, st in _as_layers(stats).items():
        use = list(langs) if langs is not None else _langs_with_both(st, harmful, harmless)
        sets[l] = {lang: _idx(_swe_mask(st, lang, activation, z_threshold, d_threshold,
                                        harmful, harmless)) for lang in use}
    return NeuronSets(kind="swe", sets=sets, params={
        "activation": activation, "z_threshold": z_threshold, "d_threshold": d_threshold,
        "harmful": harmful, "harmless": harmless,
        "position": next(iter(_as_layers(stats).values())).meta.get("position") if sets else None})


# --------------------------------------------------------------------------------------------
# SSN monolingual / shared safety neurons
# --------------------------------------------------------------------------------------------

def _topk_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    # stable tie-break by index: sort descending by score, ascending by index
    order = torch.argsort(score.double().cpu(), descending=True, stable=True)
    mask[order[:k]] = True
    return mask


def ms_neurons(stats: StatsArg, *, langs: Sequence[str] | None = None, top_percent: float = 3.0,
               harmful: str = "harmful", harmless: str = "harmless") -> NeuronSets:
    """SSN monolingual safety neurons: top ``top_percent`` % by importance on harmful prompts
    minus the top ``top_percent`` % on harmless prompts, per layer and language."""
    if not 0 < top_percent <= 100:
        raise ValueError(f"top_percent must be in (0, 100], got {top_percent}")
    sets: dict[int, dict[str, torch.Tensor]] = {}
    for l, st in _as_layers(stats).items():
        k = max(1, math.ceil(top_percent / 100.0 * st.d_ff))
        use = list(langs) if langs is not None else _langs_with_both(st, harmful, harmless)
        sets[l] = {}
        for lang in use:
            top_h = _topk_mask(st.importance(lang, harmful), k)
            top_s = _topk_mask(st.importance(lang, harmless), k)
            sets[l][lang] = _idx(top_h & ~top_s)
    return NeuronSets(kind="ms", sets=sets, params={
        "top_percent": top_percent, "harmful": harmful, "harmless": harmless})


def ss_neurons(ms: NeuronSets, *, anchor_lang: str = "en") -> NeuronSets:
    """SSN shared safety neurons ``SS_l(lang) = MS_l(lang) ∩ MS_l(anchor_lang)``."""
    sets = {}
    for l, per in ms.sets.items():
        if anchor_lang not in per:
            raise KeyError(f"layer {l}: no MS neurons for the anchor language {anchor_lang!r}")
        anchor = per[anchor_lang]
        sets[l] = {lang: s[torch.isin(s, anchor)] for lang, s in per.items()}
    return NeuronSets(kind="ss", sets=sets, params=dict(ms.params, anchor_lang=anchor_lang))


# --------------------------------------------------------------------------------------------
# Jaccard overlap
# --------------------------------------------------------------------------------------------

def jaccard(a: Iterable[int] | torch.Tensor, b: Iterable[int] | torch.Tensor) -> float:
    """``|A ∩ B| / |A ∪ B|``; 1.0 when both are empty."""
    sa = set(a.tolist()) if isinstance(a, torch.Tensor) else set(a)
    sb = set(b.tolist()) if isinstance(b, torch.Tensor) else set(b)
    union = len(sa | sb)
    return 1.0 if union == 0 else len(sa & sb) / union


def jaccard_matrix(sets: NeuronSets, *, layer: int | None = None,
                   langs: Sequence[str] | None = None) -> tuple[list[str], list[list[float]]]:
    """``(langs, M)`` with ``M[i][j] = Jaccard(S(langs[i]), S(langs[j]))`` at ``layer``, or over
    all layers pooled (sets of (layer, neuron) pairs) when ``layer`` is None."""
    langs = list(langs) if langs is not None else sets.langs
    layers = sets.layers if layer is None else [int(layer)]

    def pooled(lang: str) -> set[tuple[int, int]]:
        return {(l, int(j)) for l in layers for j in sets.sets.get(l, {}).get(lang, torch.empty(0, dtype=torch.long)).tolist()}

    flat = {lang: pooled(lang) for lang in langs}
    return langs, [[jaccard(flat[a], flat[b]) for b in langs] for a in langs]


def plot_jaccard(langs: Sequence[str], matrix: Sequence[Sequence[float]], path: str | Path, *,
                 title: str = "Jaccard overlap of safety neurons") -> Path:
    """Annotated heatmap of a Jaccard matrix, written as PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(langs)
    size = max(4.0, 0.6 * n + 2.0)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    try:
        im = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_xticks(range(n), labels=list(langs))
        ax.set_yticks(range(n), labels=list(langs))
        ax.tick_params(top=True, bottom=False, labeltop=True, labelbottom=False)
        for i in range(n):
            for j in range(n):
                v = matrix[i][j]
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=9 if n <= 12 else 7,
                        color="black" if v > 0.6 else "white")
        ax.set_title(title, pad=12)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="Jaccard")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path


def save_jaccard(sets: NeuronSets, json_path: str | Path, png_path: str | Path | None = None, *,
                 layer: int | None = None, langs: Sequence[str] | None = None,
                 title: str | None = None) -> dict[str, Any]:
    """Jaccard matrix (one layer, or pooled over layers) as JSON (and PNG heatmap); returns it."""
    langs, M = jaccard_matrix(sets, layer=layer, langs=langs)
    where = f"layer {layer}" if layer is not None else f"layers {sets.layers} pooled"
    out = {"kind": sets.kind, "layer": layer, "layers": sets.layers if layer is None else [layer],
           "langs": langs, "matrix": M, "params": sets.params,
           "sizes": {lang: sum(int(sets.sets[l][lang].numel()) for l in
                               (sets.layers if layer is None else [int(layer)]) if lang in sets.sets.get(l, {}))
                     for lang in langs}}
    jp = Path(json_path)
    jp.parent.mkdir(parents=True, exist_ok=True)
    jp.write_text(json.dumps(out, indent=1))
    if png_path is not None:
        plot_jaccard(langs, M, png_path,
                     title=title or f"Jaccard overlap of {sets.kind.upper()} safety neurons ({where})")
    return out
