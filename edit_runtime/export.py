"""Export a ``SparseDelta`` for other engines: a PEFT LoRA adapter, or a merged checkpoint.

**PEFT LoRA adapter** (:func:`export_peft`, ``edit-runtime export peft``). A LoRA layer computes
``y = W x + s * B (A x)`` with ``A (r, in)``, ``B (out, r)`` and ``s = lora_alpha / r``; the
adapter is written with ``lora_alpha = r`` so ``s = 1`` and each edit maps exactly:

- side ``"out"`` (``W[S, :] += U @ V``): ``B = zeros(out, r)`` with ``B[S] = U``, ``A = V``;
- side ``"in"``  (``W[:, S] += U @ V``): ``B = U``, ``A = zeros(r, in)`` with ``A[:, S] = V``.

Several edits of one module (both sides, or stacked deltas) are purely additive, so their
factors concatenate along the rank: ``B = [B1 B2]``, ``A = [A1; A2]``. A fused Phi-3
``gate_up_proj`` is a plain Linear and maps the same way. Per-neuron ``scale`` edits multiply
existing weights (and biases) rather than add a fixed low-rank term; they are refused
(:class:`ExportError`), ``export merged`` handles them.

Layout choices (documented in the README):

- ``target_modules`` lists the **full dotted names** of the adapted modules. PEFT matches a list
  entry ``t`` against a module name ``k`` by ``k == t or k.endswith("." + t)``, so a full name
  matches exactly one module, while a bare suffix such as ``"up_proj"`` would match every layer.
  SGLang keeps only the last component of each name; vLLM reads the tensor names. The match is
  re-checked against every module of the model before anything is written.
- Modules of different ranks are **zero-padded to the largest rank** (``rank_layout="pad"``,
  default): extra rank-1 terms with zero ``A`` rows / ``B`` columns add nothing, every engine
  accepts a uniform rank, and ``s = 1`` everywhere. ``rank_layout="pattern"`` keeps each
  module's rank through PEFT's ``rank_pattern``/``alpha_pattern`` (alpha = rank per module);
  vLLM ignores the patterns but takes ranks from the tensors and scales by the global
  ``lora_alpha / r = 1``, so both layouts are exact there.
- ``pair_gate_up=True`` (default) adds an all-zero LoRA on the sibling ``gate_proj`` of an
  edited ``up_proj`` (and vice versa): SGLang stacks gate/up LoRA weights into its fused
  ``gate_up_proj`` only when a ``gate_proj`` weight is present and leaves an orphan
  ``up_proj`` unused. The zero pair changes no output.
- ``max_rank``: a module whose rank exceeds it is truncated to its best rank-``max_rank``
  approximation (Eckart-Young, exact SVD of ``B @ A`` through QR factors, never forming the
  dense product); the relative Frobenius error ``||dW - dW_k||_F / ||dW||_F`` of each module is
  logged, written to ``edit_runtime_export.json``, and checked against ``max_rel_error``.

**Merged checkpoint** (:func:`export_merged`, ``edit-runtime export merged``): ``patch_model``
+ ``merge()`` writes the edit into the base weights, ``save_pretrained(safe_serialization=True)``
saves them under the unpatched model's ``state_dict`` keys (checked), then the patch is
removed so the in-memory model is bit-identical to before. Scale edits are supported here.

Both exports validate everything (shapes, index ranges, fingerprint, refusals, the output folder)
before writing, write into a temporary folder next to ``out_dir`` and rename it into place, so a
failure leaves no half-written adapter or checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import nn

from edit_runtime.delta import DeltaError, ModuleEdit, SparseDelta
from edit_runtime.delta import check_fingerprint as _check_fingerprint
from edit_runtime.files import apply_umask

log = logging.getLogger(__name__)

__all__ = [
    "ExportError",
    "LoraModule",
    "LoraAdapter",
    "VLLM_MAX_LORA_RANKS",
    "build_lora",
    "export_peft",
    "export_merged",
    "suggest_vllm_max_lora_rank",
    "peft_target_matches",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PROVENANCE_NAME = "edit_runtime_export.json"
PROVENANCE_FORMAT = "edit_runtime.export"
PROVENANCE_VERSION = 1

# vllm/config/lora.py: ``MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]``.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

RankLayout = Literal["pad", "pattern"]


class ExportError(DeltaError):
    """A delta cannot be exported as asked (scale edits as LoRA, rank too high, output exists...)."""


# ------------------------------------------------------------------------------------ structures
@dataclass
class LoraModule:
    """The LoRA factors of one adapted ``nn.Linear``: ``dW = B @ A`` (scale 1).

    Attributes:
        path: dotted module path in the model (PEFT's key without ``base_model.model.``).
        A: ``(r, in_features)`` float64.
        B: ``(out_features, r)`` float64.
        source_rank: rank before truncation/padding (sum of the edits' ranks; 0 for a zero pair).
        rel_error: ``||dW - B @ A||_F / ||dW||_F`` of the truncation (0.0 when exact).
        zero_pair: True for an all-zero LoRA added only for engine compatibility.
    """

    path: str
    A: torch.Tensor
    B: torch.Tensor
    source_rank: int
    rel_error: float = 0.0
    zero_pair: bool = False

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter in memory: modules (model order) plus the config fields derived from them."""

    modules: list[LoraModule]
    rank_layout: RankLayout
    metadata: list[dict[str, Any]] = field(default_factory=list)  # the source deltas' metadata

    @property
    def r(self) -> int:
        """The global ``r`` (= ``lora_alpha``): the largest module rank."""
        return max(m.rank for m in self.modules)

    @property
    def target_modules(self) -> list[str]:
        return [m.path for m in self.modules]

    @property
    def max_rel_error(self) -> float:
        return max(m.rel_error for m in self.modules)

    def config(self, base_model_name_or_path: str | None) -> dict[str, Any]:
        """The ``adapter_config.json`` dict (PEFT ``LoraConfig`` field names)."""
        r = self.r
        rank_pattern: dict[str, int] = {}
        if self.rank_layout == "pattern":
            # Keys are regexes in PEFT (matched as ``(.*\.)?(key)$``): escape the dots.
            rank_pattern = {re.escape(m.path): m.rank for m in self.modules if m.rank != r}
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "revision": None,
            "inference_mode": True,
            "r": r,
            "lora_alpha": r,  # integer, = r: the LoRA scale alpha / r is exactly 1
            "lora_dropout": 0.0,
            "target_modules": self.target_modules,
            "exclude_modules": None,
            "fan_in_fan_out": False,
            "bias": "none",
            "use_rslora": False,
            "use_dora": False,
            "modules_to_save": None,
            "init_lora_weights": True,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": rank_pattern,
            "alpha_pattern": dict(rank_pattern),  # alpha = rank per module: scale 1 everywhere
        }

    def tensors(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """``adapter_model.safetensors`` content: ``base_model.model.<path>.lora_A/B.weight``."""
        out: dict[str, torch.Tensor] = {}
        for m in self.modules:
            prefix = f"base_model.model.{m.path}"
            out[f"{prefix}.lora_A.weight"] = m.A.to(dtype).contiguous()
            out[f"{prefix}.lora_B.weight"] = m.B.to(dtype).contiguous()
        return out


def suggest_vllm_max_lora_rank(rank: int) -> int:
    """The smallest value vLLM accepts for ``--max-lora-rank`` that serves ``rank``.

    Raises ``ExportError`` above 512 (vLLM's largest); truncate with ``max_rank`` then.
    """
    for allowed in VLLM_MAX_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise ExportError(
        f"rank {rank} exceeds vLLM's largest --max-lora-rank {VLLM_MAX_LORA_RANKS[-1]}; "
        "export with max_rank=512 (or lower) to truncate, or refit with a lower rank"
    )


def peft_target_matches(target_modules: Sequence[str] | str, key: str) -> bool:
    """PEFT's ``target_modules`` rule (``check_target_module_exists``, no layer filters).

    A string is a regex that must match the whole key; a list entry ``t`` matches ``key`` when
    ``key == t`` or ``key.endswith("." + t)``.
    """
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, key) is not None
    return key in target_modules or any(key.endswith("." + t) for t in target_modules)


# ------------------------------------------------------------------------------------ resolution
def _as_deltas(delta) -> list[SparseDelta]:
    items = list(delta) if isinstance(delta, (list, tuple)) else [delta]
    if not items:
        raise ExportError("no delta given: pass a SparseDelta, a delta file, or a list of them")
    out = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            item = SparseDelta.load(item)
        if not isinstance(item, SparseDelta):
            raise ExportError(f"delta must be a SparseDelta or a path, got {type(item).__name__}")
        out.append(item)
    return out


def _load(model_or_name, tokenizer=None):
    """``(model, tokenizer, name)``: loads by name (``models.load_model``) or takes the model given."""
    if isinstance(model_or_name, (str, os.PathLike)):
        from edit_runtime.models import load_model

        model, tok = load_model(model_or_name)
        return model, (tokenizer if tokenizer is not None else tok), str(model_or_name)
    if not isinstance(model_or_name, nn.Module):
        raise ExportError(f"model_or_name must be a model name/path or an nn.Module, got {type(model_or_name).__name__}")
    return model_or_name, tokenizer, None


def _default_base_name(model: nn.Module, name: str | None) -> str | None:
    """What ``base_model_name_or_path`` should say: the folder a short name resolves to (the
    weights the delta was fitted on), a given path/hub id, else the model's own ``name_or_path``."""
    if name is not None:
        from edit_runtime.models import resolve_model

        try:
            target = resolve_model(name)
        except (FileNotFoundError, ValueError):
            return name
        return str(Path(target).resolve()) if isinstance(target, Path) else str(target)
    value = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(value) if value else None


def _base_linear(model: nn.Module, edit: ModuleEdit) -> nn.Linear:
    try:
        module = model.get_submodule(edit.module)
    except AttributeError:
        raise ExportError(f"edit of {edit.module!r}: no such module in {type(model).__name__}") from None
    base = getattr(module, "base_layer", module)
    if not isinstance(base, nn.Linear):
        raise ExportError(f"edit of {edit.module!r}: module is a {type(module).__name__}, not a torch.nn.Linear")
    edit.validate_for(base)
    return base


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"output {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"output folder {out_dir} exists and is not empty (pass overwrite=True / --overwrite)")


def _publish(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Renames the finished ``tmp`` folder to ``out_dir`` (replacing it only when ``overwrite``)."""
    _check_out_dir(out_dir, overwrite)
    apply_umask(tmp)  # mkdtemp makes a 0700 folder and safetensors 0600 files
    old = None
    if out_dir.is_dir() and any(out_dir.iterdir()):
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    elif out_dir.is_dir():
        out_dir.rmdir()
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _tmp_dir(out_dir: Path) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))


# -------------------------------------------------------------------------------- LoRA factors
def _edit_factors(edit: ModuleEdit, base: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A (r, in), B (out, r))`` float64 with ``B @ A`` = the edit's dense weight change."""
    out_f, in_f = int(base.out_features), int(base.in_features)
    U, V, S = edit.U.detach().double().cpu(), edit.V.detach().double().cpu(), edit.neurons.cpu()
    r = U.shape[1]
    if edit.side == "out":
        B = torch.zeros(out_f, r, dtype=torch.float64)
        B[S] = U
        return V.clone(), B
    A = torch.zeros(r, in_f, dtype=torch.float64)
    A[:, S] = V
    return A, U.clone()


def _truncate(A: torch.Tensor, B: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-k approximation of ``B @ A`` (Frobenius, Eckart-Young) and its relative error.

    ``B = Qb Rb``, ``A^T = Qa Ra`` (reduced QR), ``B A = Qb (Rb Ra^T) Qa^T``; the SVD of the
    ``R x R`` core gives that of ``B A`` exactly, without forming the ``(out, in)`` product.
    Factors are split as ``sqrt(sigma)`` on both sides. Rows of B (columns of A) that were zero
    stay exactly zero (only round-off could put something there).
    """
    Qb, Rb = torch.linalg.qr(B)                 # (out, R), (R, R)
    Qa, Ra = torch.linalg.qr(A.T)               # (in, R), (R, R)
    Uc, s, Vch = torch.linalg.svd(Rb @ Ra.T)    # (R, R), (R,), (R, R)
    total = float(s.square().sum())
    tail = float(s[k:].square().sum())
    root = s[:k].sqrt()
    B2 = (Qb @ Uc[:, :k]) * root[None, :]       # (out, k)
    A2 = root[:, None] * (Vch[:k] @ Qa.T)       # (k, in)
    B2[B.abs().sum(1) == 0] = 0.0
    A2[:, A.abs().sum(0) == 0] = 0.0
    rel = math.sqrt(tail / total) if total > 0 else 0.0
    return A2, B2, rel


def _gate_up_siblings(model: nn.Module) -> dict[str, str]:
    """``{up_proj path: gate_proj path, gate_proj path: up_proj path}`` for split gated MLPs."""
    from edit_runtime.arch import ArchError, find_mlps

    try:
        mlps = find_mlps(model)
    except ArchError as exc:
        log.debug("no gated MLPs found (%s): no gate/up pairing", exc)
        return {}
    pairs: dict[str, str] = {}
    for info in mlps:
        if info.gate and info.up:
            pairs[info.up], pairs[info.gate] = info.gate, info.up
    return pairs


def build_lora(
    delta,
    model: nn.Module,
    *,
    max_rank: int | None = None,
    max_rel_error: float | None = None,
    rank_layout: RankLayout = "pad",
    pair_gate_up: bool = True,
    check_fingerprint: bool = True,
) -> LoraAdapter:
    """The LoRA factors of ``delta`` on ``model`` (no I/O); see the module docstring for the rules.

    Args:
        delta: a ``SparseDelta``, a delta file, or a list of them (stacked in order).
        model: the base model the adapter is for (shapes, fingerprint, module names).
        max_rank: truncate modules of higher rank by exact SVD (None: keep exact ranks).
        max_rel_error: refuse a truncation whose relative Frobenius error exceeds this.
        rank_layout: ``"pad"`` (zero-pad every module to the largest rank) or ``"pattern"``.
        pair_gate_up: add zero LoRAs on the gate/up siblings of edited up/gate projections.
        check_fingerprint: refuse deltas fitted on another base model.

    Raises:
        ExportError / DeltaError (incl. ``FingerprintMismatchError``) naming the problem.
    """
    deltas = _as_deltas(delta)
    if rank_layout not in ("pad", "pattern"):
        raise ExportError(f"rank_layout must be 'pad' or 'pattern', got {rank_layout!r}")
    if max_rank is not None and (not isinstance(max_rank, int) or max_rank < 1):
        raise ExportError(f"max_rank must be a positive integer or None, got {max_rank!r}")
    if max_rel_error is not None and not (max_rel_error >= 0):
        raise ExportError(f"max_rel_error must be >= 0, got {max_rel_error!r}")

    groups: dict[str, list[tuple[ModuleEdit, nn.Linear]]] = {}
    for d in deltas:
        for edit in d.edits:
            edit.validate()
            base = _base_linear(model, edit)
            if edit.scale is not None:
                raise ExportError(
                    f"edit of {edit.module!r} (side {edit.side!r}, |S|={edit.num_neurons}) has a per-neuron "
                    "scale: it multiplies existing weights and biases instead of adding a fixed low-rank "
                    "term B @ A, so a LoRA adapter cannot express it at the edit's rank; use "
                    "`edit-runtime export merged` (export_merged) for scale edits"
                )
            groups.setdefault(edit.module, []).append((edit, base))
        if check_fingerprint:
            _check_fingerprint(model, d)

    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    modules: list[LoraModule] = []
    for path in sorted(groups, key=lambda p: order.get(p, len(order))):
        parts = [_edit_factors(e, base) for e, base in groups[path]]
        A = torch.cat([a for a, _ in parts], dim=0)
        B = torch.cat([b for _, b in parts], dim=1)
        source_rank = int(A.shape[0])
        rel = 0.0
        if max_rank is not None and source_rank > max_rank:
            A, B, rel = _truncate(A, B, max_rank)
            # the summary (provenance.json, the CLI) reports it; debug for library callers
            log.debug("%s: rank %d truncated to %d (relative Frobenius error %.3g)", path, source_rank, max_rank, rel)
            if max_rel_error is not None and rel > max_rel_error:
                raise ExportError(
                    f"{path}: truncating rank {source_rank} to max_rank={max_rank} has relative Frobenius "
                    f"error {rel:.4g} > max_rel_error={max_rel_error:g}; raise max_rank or refit with a lower rank"
                )
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ExportError(f"{path}: LoRA factors are not finite")
        modules.append(LoraModule(path, A, B, source_rank, rel))

    if rank_layout == "pad":
        R = max(m.rank for m in modules)
        for m in modules:
            if m.rank < R:
                pad = R - m.rank
                m.A = torch.cat([m.A, m.A.new_zeros(pad, m.A.shape[1])], dim=0)
                m.B = torch.cat([m.B, m.B.new_zeros(m.B.shape[0], pad)], dim=1)

    if pair_gate_up:
        siblings = _gate_up_siblings(model)
        have = {m.path for m in modules}
        extra = []
        for m in modules:
            sib = siblings.get(m.path)
            if sib is None or sib in have:
                continue
            lin = model.get_submodule(sib)
            lin = getattr(lin, "base_layer", lin)
            extra.append(LoraModule(sib, m.A.new_zeros(m.rank, int(lin.in_features)),
                                    m.B.new_zeros(int(lin.out_features), m.rank), 0, 0.0, zero_pair=True))
            have.add(sib)
        modules = sorted(modules + extra, key=lambda m: order.get(m.path, len(order)))

    adapter = LoraAdapter(modules, rank_layout, [d.metadata for d in deltas])
    _check_targets(model, adapter)
    return adapter


def _check_targets(model: nn.Module, adapter: LoraAdapter) -> None:
    """The config's ``target_modules`` must select exactly the adapted modules under PEFT's rule."""
    want = set(adapter.target_modules)
    matched = set()
    for name, module in model.named_modules():
        if name and peft_target_matches(adapter.target_modules, name) and not name.endswith(".base_layer"):
            matched.add(name)
    if matched != want:
        raise ExportError(
            f"target_modules would select {sorted(matched ^ want)} wrongly in {type(model).__name__} "
            "(PEFT matches list entries by exact name or '.'-suffix); cannot write an exact adapter"
        )


# ------------------------------------------------------------------------------------ writers
def _dtype(dtype, adapter_deltas: list[SparseDelta]) -> torch.dtype:
    if dtype is None:
        found = [e.U.dtype for d in adapter_deltas for e in d.edits if e.U is not None]
        out = found[0] if found else torch.float32
        for t in found[1:]:
            out = torch.promote_types(out, t)
        return out
    if isinstance(dtype, str):
        table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
        if dtype not in table:
            raise ExportError(f"dtype must be one of {sorted(table)}, got {dtype!r}")
        return table[dtype]
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ExportError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return dtype


def export_peft(
    delta,
    model_or_name,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    max_rank: int | None = None,
    max_rel_error: float | None = None,
    rank_layout: RankLayout = "pad",
    pair_gate_up: bool = True,
    dtype: torch.dtype | str | None = None,
    check_fingerprint: bool = True,
    overwrite: bool = False,
) -> Path:
    """Writes ``delta`` as a PEFT LoRA adapter folder; returns ``out_dir``.

    Files: ``adapter_config.json`` (``peft_type`` LORA, ``task_type`` CAUSAL_LM, ``r`` =
    ``lora_alpha``, full-name ``target_modules``), ``adapter_model.safetensors``
    (``base_model.model.<module>.lora_A.weight (r, in)`` / ``.lora_B.weight (out, r)``), and
    ``edit_runtime_export.json`` (per-module ranks, truncation errors, the deltas' metadata).

    Args:
        delta: a ``SparseDelta``, a delta file, or a list of them (stacked).
        model_or_name: the base model, or its name/path for ``models.load_model``.
        out_dir: the adapter folder to create (must not exist or be empty unless ``overwrite``).
        base_model_name_or_path: written to the config (default: the folder/hub id the model
            loads from; engines do not read it, ``AutoPeftModelForCausalLM`` does).
        max_rank, max_rel_error, rank_layout, pair_gate_up, check_fingerprint: see :func:`build_lora`.
        dtype: dtype of the saved factors (default: the deltas' factor dtype).
        overwrite: replace an existing non-empty ``out_dir``.

    Everything is validated before anything is written; the folder appears atomically.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    deltas = _as_deltas(delta)
    model, _, name = _load(model_or_name)
    adapter = build_lora(deltas, model, max_rank=max_rank, max_rel_error=max_rel_error,
                         rank_layout=rank_layout, pair_gate_up=pair_gate_up,
                         check_fingerprint=check_fingerprint)
    out_dtype = _dtype(dtype, deltas)
    tensors = adapter.tensors(out_dtype)
    for key, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise ExportError(f"{key} overflows in {out_dtype}; export with dtype=float32")
    base_name = base_model_name_or_path or _default_base_name(model, name)
    config = adapter.config(base_name)
    provenance = {
        "format": PROVENANCE_FORMAT,
        "format_version": PROVENANCE_VERSION,
        "kind": "peft_lora",
        "r": adapter.r,
        "rank_layout": rank_layout,
        "dtype": str(out_dtype).replace("torch.", ""),
        "vllm_max_lora_rank": suggest_vllm_max_lora_rank(adapter.r) if adapter.r <= VLLM_MAX_LORA_RANKS[-1] else None,
        "max_rel_error": adapter.max_rel_error,
        "modules": {m.path: {"rank": m.rank, "source_rank": m.source_rank, "rel_error": m.rel_error,
                             "zero_pair": m.zero_pair} for m in adapter.modules},
        "deltas": [{"metadata": d.metadata, "has_fingerprint": bool(d.fingerprint)} for d in deltas],
    }

    from safetensors.torch import save_file

    tmp = _tmp_dir(out_dir)
    try:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
        _publish(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.debug("wrote PEFT LoRA adapter %s: r=%d, %d module(s), max truncation error %.3g",
             out_dir, adapter.r, len(adapter.modules), adapter.max_rel_error)
    return out_dir


# ------------------------------------------------------------------------------------- merged
def _saved_keys(folder: Path) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            keys.update(handle.keys())
    return keys


def _tied_groups(model: nn.Module) -> dict[str, set[str]]:
    """state_dict key -> all keys sharing its storage (tied weights are saved once)."""
    by_ptr: dict[tuple[int, int], set[str]] = {}
    sd = model.state_dict()
    for k, v in sd.items():
        by_ptr.setdefault((v.untyped_storage().data_ptr(), v.storage_offset()), set()).add(k)
    return {k: group for group in by_ptr.values() for k in group}


def export_merged(
    delta,
    model_or_name,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    check_fingerprint: bool = True,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Writes a full safetensors checkpoint with ``delta`` folded into the weights; returns ``out_dir``.

    ``patch_model`` + ``merge()`` (fp32 arithmetic, one rounding to the weight dtype), then
    ``save_pretrained(safe_serialization=True)`` (+ the tokenizer when known), then the patch is
    removed: the in-memory model ends bit-identical to how it started. The saved tensor names
    are checked to be the unpatched model's ``state_dict`` keys (tied weights saved once), so
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` (or vLLM/SGLang/TGI) loads it as a plain
    checkpoint. Scale edits are supported. ``model_or_name`` must be unpatched.
    """
    from edit_runtime.patch import patch_model, patched_modules

    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    deltas = _as_deltas(delta)
    model, tokenizer, _ = _load(model_or_name, tokenizer)
    if not hasattr(model, "save_pretrained"):
        raise ExportError(f"{type(model).__name__} has no save_pretrained: export_merged needs a transformers model")
    if patched_modules(model):
        raise ExportError(
            f"the model already has patched modules {sorted(patched_modules(model))}: remove those patches "
            "first (a merged export must start from the base weights)"
        )
    keys_before = list(model.state_dict().keys())
    tied = _tied_groups(model)

    handles = []
    tmp = None
    try:
        for d in deltas:  # validates everything (shapes, fingerprint, stacking) before touching
            handles.append(patch_model(model, d, check_fingerprint=check_fingerprint))
        for h in handles:
            h.merge()
        keys_now = list(model.state_dict().keys())
        if keys_now != keys_before:
            raise ExportError(f"patched state_dict keys differ from the base model's: {sorted(set(keys_now) ^ set(keys_before))[:5]}")
        tmp = _tmp_dir(out_dir)
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for h in reversed(handles):
            h.remove()  # unmerges first: the saved rows/columns come back bit for bit
    try:
        saved = _saved_keys(tmp)
        extra = sorted(saved - set(keys_before))
        missing = sorted(k for k in set(keys_before) - saved if not (tied.get(k, {k}) & saved))
        if extra or missing:
            raise ExportError(
                f"the saved checkpoint's tensor names are not the base model's state_dict keys "
                f"(unexpected {extra[:5]}, missing {missing[:5]})"
            )
        provenance = {
            "format": PROVENANCE_FORMAT,
            "format_version": PROVENANCE_VERSION,
            "kind": "merged",
            "deltas": [{"metadata": d.metadata, "modules": d.modules, "has_fingerprint": bool(d.fingerprint)}
                       for d in deltas],
        }
        (tmp / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
        _publish(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.debug("wrote merged checkpoint %s (%d tensors)", out_dir, len(saved))
    return out_dir
