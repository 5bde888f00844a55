"""Causal checks: suppress or amplify a neuron set through the runtime's ``scale``, with a
random control of the same size, and measure the refusal change per language.

The check of SWE and SSN: if a set S of MLP neurons of layer ``l`` carries the safety response,
zeroing it (×0) should lower refusals, and amplifying it (×α) should raise them, while a random
set of the same size drawn from the same layer moves little. Each manipulation is a
**scale-only delta** (a :class:`~edit_runtime.delta.ModuleEdit` with ``scale`` and no factors),
applied by :func:`edit_runtime.patch.patch_model` like any other edit, so the check runs
through the very runtime path that serves the real edits.

Where the scale acts (``module=``), for the MLP ``down(act(gate(x)) * up(x))``:

- ``"up"``: rows S of ``up_proj`` (side ``"out"``; rows ``d_ff + S`` of a fused
  ``gate_up_proj``): ``up[S] *= f``. Because ``h = act(gate) * up`` is linear in ``up``, this
  scales the activations ``h[S]`` by ``f`` exactly like ``"act"``.
- ``"act"``: columns S of ``down_proj`` (side ``"in"``), i.e. its inputs ``h[S] *= f``.
- ``"gate"``: rows S of ``gate_proj`` (pre-activation; ×0 gives ``act(0) = 0`` for SiLU/GELU,
  ×α is non-linear).

The random control for a set S of size m: ``m`` indices drawn uniformly without replacement from
``{0..d_ff-1} \\ S`` with ``torch.Generator().manual_seed(seed + k)`` (k = position of the set in
``neuron_sets``), sorted. The refusal evaluation is :func:`edit_runtime.evaluate.evaluate` with
variants ``base``, ``<set>_x<f>`` and ``random_<set>_x<f>`` for every factor f; the change per
language is the paired difference against the base with its bootstrap interval (see
:func:`edit_runtime.evaluate.paired_flips`).

Outputs in ``out_dir``: everything :func:`~edit_runtime.evaluate.write_report` writes, plus
``causal.json`` (sets, controls, changes), ``causal.md`` (table) and ``causal_refusal.png``
(refusal change per language, set vs control).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from edit_runtime.delta import ModuleEdit, SparseDelta

log = logging.getLogger(__name__)

__all__ = ["CAUSAL_MODULES", "scale_target", "scale_delta", "random_control", "causal_checks",
           "CausalResult", "causal_neuron_set"]

CAUSAL_MODULES = ("up", "act", "gate")


def _as_index(neurons: Any, d_ff: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(neurons)
    if t.numel() == 0:
        raise ValueError(f"{what}: the neuron set is empty")
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"{what}: neuron indices must be integers, got {t.dtype}")
    t = t.reshape(-1).to(torch.long).cpu()
    if t.numel() == 0:
        raise ValueError(f"{what}: the neuron set is empty")
    if int(t.min()) < 0 or int(t.max()) >= d_ff:
        raise ValueError(f"{what}: neuron indices must lie in [0, {d_ff}), got "
                         f"[{int(t.min())}, {int(t.max())}]")
    u = torch.unique(t)
    if u.numel() != t.numel():
        raise ValueError(f"{what}: the neuron set has duplicated indices")
    return u


def scale_target(model: torch.nn.Module, layer: int, module: str = "up") -> tuple[str, str, int, int]:
    """``(module path, side, index offset, d_ff)`` of the neurons ``module`` scales in ``layer``."""
    from edit_runtime.arch import find_mlp

    if module not in CAUSAL_MODULES:
        raise ValueError(f"module must be one of {CAUSAL_MODULES}, got {module!r}")
    info = find_mlp(model, layer)
    proj = {"up": "up", "gate": "gate", "act": "down"}[module]
    path, side, offset = info.target(proj)
    return path, side, offset, info.d_ff


def scale_delta(model: torch.nn.Module, layer: int, neurons: Any, factor: float, *,
                module: str = "up", metadata: Mapping[str, Any] | None = None) -> SparseDelta:
    """A scale-only delta multiplying the activations of ``neurons`` (of ``d_ff``) of ``layer``
    by ``factor`` at ``module`` ("up", "act" or "gate"; module docstring)."""
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not math.isfinite(factor):
        raise ValueError(f"factor must be a finite number, got {factor!r}")
    path, side, offset, d_ff = scale_target(model, layer, module)
    idx = _as_index(neurons, d_ff, f"layer {layer} {module}")
    edit = ModuleEdit(module=path, side=side, neurons=idx + offset,
                      scale=torch.full((idx.numel(),), float(factor), dtype=torch.float32))
    meta = {"method": "causal_scale", "layer": int(layer), "module": module,
            "factor": float(factor), "num_neurons": int(idx.numel())}
    meta.update(metadata or {})
    return SparseDelta([edit], metadata=meta)


def random_control(neurons: Any, d_ff: int, *, seed: int = 0) -> torch.Tensor:
    """``(m,)`` sorted int64: ``m = |neurons|`` indices of ``[0, d_ff)`` outside ``neurons``,
    uniformly without replacement, from ``torch.Generator().manual_seed(seed)``."""
    idx = _as_index(neurons, d_ff, "random_control")
    m = idx.numel()
    keep = torch.ones(d_ff, dtype=torch.bool)
    keep[idx] = False
    pool = torch.nonzero(keep).reshape(-1)
    if pool.numel() < m:
        raise ValueError(f"random_control: a set of {m} neurons leaves only {pool.numel()} of "
                         f"d_ff={d_ff} to draw an equal-sized disjoint control from")
    g = torch.Generator().manual_seed(int(seed))
    pick = torch.randperm(pool.numel(), generator=g)[:m]
    return torch.sort(pool[pick]).values


def causal_neuron_set(sets: Any, layer: int, kind: str = "en", *, anchor_lang: str = "en") -> torch.Tensor:
    """The neuron set of a causal check from :class:`~edit_runtime.neurons.NeuronSets`.

    ``kind="en"``: the anchor language's set at ``layer`` (SWE or MS neurons).
    ``kind="ss"``: SSN's shared safety neurons, the union over the other languages of
    ``SS(lang) = MS(lang) ∩ MS(anchor)`` (``sets`` of kind "ms" are intersected here, kind "ss"
    used as is).
    """
    from edit_runtime.neurons import ss_neurons

    if kind == "en":
        return sets.get(layer, anchor_lang)
    if kind != "ss":
        raise ValueError(f"kind must be 'en' or 'ss', got {kind!r}")
    if sets.kind == "ms":
        sets = ss_neurons(sets, anchor_lang=anchor_lang)
    elif sets.kind != "ss":
        raise ValueError(f"kind 'ss' needs MS or SS neuron sets, got {sets.kind!r} sets")
    per = sets.sets.get(int(layer))
    if per is None:
        raise KeyError(f"no neuron sets for layer {layer}; layers {sets.layers}")
    others = [s for lang, s in per.items() if lang != anchor_lang]
    if not others:
        raise ValueError(f"SS neurons need a language besides {anchor_lang!r} at layer {layer}")
    return torch.unique(torch.cat(others))


@dataclass
class CausalResult:
    """Sets and controls, the refusal change per variant and language, and the evaluation."""

    layer: int
    module: str
    factors: list[float]
    sets: dict[str, dict[str, Any]]        # name -> {"neurons", "control", "size"}
    changes: dict[str, dict[str, dict]]    # variant -> lang -> {"refusal", "base_refusal", ...}
    evaluation: Any                        # EvalResult

    def to_json(self) -> dict[str, Any]:
        from edit_runtime.evaluate import _jsonable

        return _jsonable({"format": "edit_runtime.causal_results", "version": 1,
                          "layer": self.layer, "module": self.module, "factors": self.factors,
                          "sets": self.sets, "changes": self.changes,
                          "results_json": "results.json"})


def _variant_name(prefix: str, factor: float) -> str:
    return f"{prefix}_x{factor:g}"


def causal_checks(model: Any, tokenizer: Any, prompts: Sequence[Any],
                  neuron_sets: Mapping[str, Any], *, layer: int, module: str = "up",
                  factors: Sequence[float] = (0.0, 2.0), seed: int = 0, out_dir: str | Path,
                  controls: bool = True, judge: Any = None, max_new_tokens: int | None = None,
                  batch_size: int = 8, system_prompt: str | None = None, progress: bool = True,
                  model_name: str | None = None, n_boot: int = 2000,
                  jaccard_sets: Any = None) -> CausalResult:
    """Suppress / amplify each neuron set (and its random control) and report the refusal
    change per language against the unedited model (module docstring).

    Args:
        prompts: harmful prompts (all languages to report).
        neuron_sets: ``{name: (m,) int indices into d_ff}``, e.g. ``{"en": S_en, "ss": SS}``.
            Names become file names.
        layer: decoder layer. module: "up", "act" or "gate".
        factors: scale factors (0 = suppress, α > 1 = amplify).
        seed: seed of the random controls (set k uses ``seed + k``) and of the bootstrap.
        controls: also run the equal-sized random control of each set.
        out_dir: report folder (generations resume there).
        jaccard_sets: optional ``NeuronSets`` for the Jaccard heatmap of the report.
        judge, max_new_tokens, batch_size, system_prompt, progress, model_name, n_boot: as in
            :func:`edit_runtime.evaluate.evaluate`.
    """
    from edit_runtime.evaluate import evaluate

    if not neuron_sets:
        raise ValueError("causal_checks: neuron_sets is empty")
    factors = [float(f) for f in factors]
    if not factors:
        raise ValueError("causal_checks: factors is empty")
    _, _, _, d_ff = scale_target(model, layer, module)
    sets: dict[str, dict[str, Any]] = {}
    variants: dict[str, Any] = {"base": None}
    for k, (name, neurons) in enumerate(neuron_sets.items()):
        idx = _as_index(neurons, d_ff, f"neuron set {name!r}")
        entry: dict[str, Any] = {"size": int(idx.numel()), "neurons": idx.tolist()}
        ctrl = random_control(idx, d_ff, seed=seed + k) if controls else None
        if ctrl is not None:
            entry["control"] = ctrl.tolist()
            entry["control_seed"] = seed + k
        sets[name] = entry
        for f in factors:
            variants[_variant_name(name, f)] = scale_delta(
                model, layer, idx, f, module=module, metadata={"set": name})
            if ctrl is not None:
                variants[_variant_name(f"random_{name}", f)] = scale_delta(
                    model, layer, ctrl, f, module=module,
                    metadata={"set": f"random_{name}", "control_seed": seed + k})
    log.info("causal checks at layer %d (%s): sets %s, factors %s, %d variants", layer, module,
             {n: e["size"] for n, e in sets.items()}, factors, len(variants))
    res = evaluate(model, tokenizer, prompts, variants=variants, judge=judge, out_dir=out_dir,
                   max_new_tokens=max_new_tokens, batch_size=batch_size,
                   system_prompt=system_prompt, progress=progress, model_name=model_name,
                   seed=seed, n_boot=n_boot, check_fingerprint=False, neuron_sets=jaccard_sets)
    base = res.variants["base"].per_lang()
    changes: dict[str, dict[str, dict]] = {}
    for vname, per in res.flips.items():
        pl = res.variants[vname].per_lang()
        changes[vname] = {
            lang: {"base_refusal": base[lang]["refusal_rate"], "refusal": pl[lang]["refusal_rate"],
                   "delta_refusal": f["delta_refusal"], "delta_refusal_ci": f["delta_refusal_ci"],
                   "base_asr": base[lang]["asr"], "asr": pl[lang]["asr"],
                   "delta_asr": f["delta_asr"], "delta_asr_ci": f["delta_asr_ci"],
                   "invalid": pl[lang]["invalid_rate"], "n": f["n_paired"]}
            for lang, f in per.items()}
    result = CausalResult(layer=int(layer), module=module, factors=factors, sets=sets,
                          changes=changes, evaluation=res)
    _write(result, Path(out_dir))
    return result


def _write(result: CausalResult, out: Path) -> None:
    from edit_runtime.evaluate import _pct

    out.mkdir(parents=True, exist_ok=True)
    (out / "causal.json").write_text(json.dumps(result.to_json(), indent=1) + "\n")
    langs = result.evaluation.langs
    lines = [f"# Causal checks: layer {result.layer}, `{result.module}` scaled", "",
             "Set sizes: " + ", ".join(f"{n} {e['size']}" for n, e in result.sets.items()) +
             " (each random control has the same size, disjoint from its set). Refusal change in "
             "points vs the unedited model, paired by prompt id, [95 % bootstrap interval].", "",
             "| variant | " + " | ".join(langs) + " |", "|---|" + "---|" * len(langs)]
    for vname, per in result.changes.items():
        cells = []
        for lang in langs:
            c = per.get(lang)
            if c is None:
                cells.append("–")
                continue
            lo, hi = c["delta_refusal_ci"]
            cells.append(f"{_pct(c['delta_refusal'])} [{_pct(lo)}, {_pct(hi)}]")
        lines.append(f"| {vname} | " + " | ".join(cells) + " |")
    (out / "causal.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _plot(result, out / "causal_refusal.png")


def _plot(result: CausalResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    langs = result.evaluation.langs
    names = list(result.changes)
    if not names:
        return
    x = np.arange(len(langs))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(langs) * len(names) + 2), 4.0))
    try:
        for k, nm in enumerate(names):
            per = result.changes[nm]
            vals = np.array([100 * per[lg]["delta_refusal"] if lg in per else np.nan for lg in langs])
            lo = np.array([100 * per[lg]["delta_refusal_ci"][0] if lg in per else np.nan for lg in langs])
            hi = np.array([100 * per[lg]["delta_refusal_ci"][1] if lg in per else np.nan for lg in langs])
            err = np.vstack([np.clip(vals - lo, 0, None), np.clip(hi - vals, 0, None)])
            ax.bar(x + (k - (len(names) - 1) / 2) * width, vals, width, yerr=err, capsize=2,
                   label=nm, hatch="//" if nm.startswith("random_") else None)
        ax.axhline(0, color="black", linewidth=0.8)
        lo_, hi_ = ax.get_ylim()
        ax.set_ylim(min(lo_, -10.0), max(hi_, 10.0))  # points; a flat result still reads as one
        ax.set_xticks(x, labels=langs)
        ax.set_ylabel("Δ refusal rate vs base (points)")
        ax.set_title(f"Causal checks, layer {result.layer} ({result.module})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
