"""The delta format: ``SparseDelta`` holds ``ModuleEdit``s; safetensors I/O; base-model fingerprint.

A ``ModuleEdit`` names one ``torch.nn.Linear`` of a model by its dotted path and changes a
subset S of its neurons:

- ``side="out"`` (rows S, i.e. output neurons, e.g. ``up_proj``):
  ``W[S, :] += U @ V`` with ``U (|S|, r)`` and ``V (r, in_features)``;
- ``side="in"`` (columns S, i.e. input neurons, e.g. ``down_proj``):
  ``W[:, S] += U @ V`` with ``U (out_features, r)`` and ``V (r, |S|)``.

An edit may instead (or also) carry ``scale (|S|,)``, a multiplier on the activations of S in the
edited model (0 suppresses, >1 amplifies): for side "out" the outputs ``y[..., S]`` of the edited
weight are scaled, for side "in" the inputs ``x[..., S]`` are scaled before the edited weight.

On disk a delta is one safetensors file: tensors ``edits.<i>.neurons|U|V|scale`` and a JSON
header (format name and version, the edit list, free-form metadata about what produced it, and
an optional fingerprint of the base model). Nothing but safetensors and JSON is ever read.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import torch
from torch import nn

FORMAT_NAME = "edit_runtime.sparse_delta"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)

Side = Literal["out", "in"]

# Config fields whose values fix every tensor shape a delta can touch.
_SHAPE_CONFIG_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)
# Probe values compared with a dtype-aware tolerance, so a fingerprint taken on an fp32 model
# still matches the same model loaded in bf16/fp16 while another model's weights do not.
_N_PROBES = 64
_PROBE_RTOL = 2.0**-7  # twice bf16's unit roundoff


class DeltaError(ValueError):
    """A delta is malformed, or does not fit the model it is applied to."""


class DeltaFormatError(DeltaError):
    """A delta file cannot be read: not safetensors, truncated, or of an unknown format."""


class FingerprintMismatchError(DeltaError):
    """The delta was fitted on another base model than the one it is applied to."""


def _check_tensor(name: str, t: Any, *, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise DeltaError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        raise DeltaError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")
    return t


@dataclass
class ModuleEdit:
    """A sparse low-rank (and/or per-neuron scale) edit of one Linear layer.

    Attributes:
        module: dotted path of the ``nn.Linear`` in the model, e.g. ``model.layers.12.mlp.up_proj``.
        side: ``"out"`` edits rows S (output neurons), ``"in"`` edits columns S (input neurons).
        neurons: ``(m,)`` int64, sorted, unique, non-negative indices S.
        U: side out ``(m, r)``; side in ``(out_features, r)``. ``None`` for a scale-only edit.
        V: side out ``(r, in_features)``; side in ``(r, m)``. ``None`` for a scale-only edit.
        scale: optional ``(m,)`` multiplier on the activations of S in the edited model.
    """

    module: str
    side: Side
    neurons: torch.Tensor
    U: torch.Tensor | None = None
    V: torch.Tensor | None = None
    scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.validate()

    # -- structure ----------------------------------------------------------------------------
    @property
    def num_neurons(self) -> int:
        return int(self.neurons.numel())

    @property
    def rank(self) -> int:
        """Rank r of the low-rank term (0 for a scale-only edit)."""
        return 0 if self.U is None else int(self.U.shape[1])

    @property
    def has_lowrank(self) -> bool:
        return self.U is not None

    def validate(self) -> None:
        """Checks the edit on its own (shapes agree, indices sorted/unique, values finite)."""
        where = f"edit of {self.module!r}"
        if not isinstance(self.module, str) or not self.module:
            raise DeltaError(f"module must be a non-empty dotted path, got {self.module!r}")
        if self.side not in ("out", "in"):
            raise DeltaError(f"{where}: side must be 'out' or 'in', got {self.side!r}")
        neurons = _check_tensor(f"{where}: neurons", self.neurons, ndim=1)
        if neurons.dtype != torch.int64:
            raise DeltaError(f"{where}: neurons must be int64, got {neurons.dtype}")
        m = neurons.numel()
        if m == 0:
            raise DeltaError(f"{where}: neurons is empty")
        if int(neurons.min()) < 0:
            raise DeltaError(f"{where}: neurons has a negative index {int(neurons.min())}")
        if m > 1:
            steps = neurons[1:] - neurons[:-1]
            if bool((steps == 0).any()):
                dup = int(neurons[1:][steps == 0][0])
                raise DeltaError(f"{where}: neurons has duplicated index {dup}")
            if bool((steps < 0).any()):
                raise DeltaError(f"{where}: neurons must be sorted ascending")
        if (self.U is None) != (self.V is None):
            raise DeltaError(f"{where}: U and V must be given together (got only one)")
        if self.U is None and self.scale is None:
            raise DeltaError(f"{where}: an edit needs factors U, V or a scale (got neither)")
        if self.U is not None:
            U = _check_tensor(f"{where}: U", self.U, ndim=2)
            V = _check_tensor(f"{where}: V", self.V, ndim=2)
            if not (U.is_floating_point() and V.is_floating_point()):
                raise DeltaError(f"{where}: U and V must be floating point, got {U.dtype}, {V.dtype}")
            if U.dtype != V.dtype:
                raise DeltaError(f"{where}: U and V dtypes differ ({U.dtype} vs {V.dtype})")
            if U.shape[1] != V.shape[0] or U.shape[1] == 0:
                raise DeltaError(
                    f"{where}: rank mismatch, U is {tuple(U.shape)} and V is {tuple(V.shape)} "
                    "(expected U (., r) and V (r, .) with r >= 1)"
                )
            if self.side == "out" and U.shape[0] != m:
                raise DeltaError(f"{where}: side 'out' needs U of shape ({m}, r), got {tuple(U.shape)}")
            if self.side == "in" and V.shape[1] != m:
                raise DeltaError(f"{where}: side 'in' needs V of shape (r, {m}), got {tuple(V.shape)}")
            for name, t in (("U", U), ("V", V)):
                if not bool(torch.isfinite(t).all()):
                    raise DeltaError(f"{where}: {name} contains NaN or Inf")
        if self.scale is not None:
            scale = _check_tensor(f"{where}: scale", self.scale, ndim=1)
            if not scale.is_floating_point():
                raise DeltaError(f"{where}: scale must be floating point, got {scale.dtype}")
            if scale.numel() != m:
                raise DeltaError(f"{where}: scale must have shape ({m},), got {tuple(scale.shape)}")
            if not bool(torch.isfinite(scale).all()):
                raise DeltaError(f"{where}: scale contains NaN or Inf")

    def validate_for(self, linear: nn.Module) -> None:
        """Checks that the edit fits ``linear`` (an ``nn.Linear``): shapes and index ranges."""
        where = f"edit of {self.module!r}"
        weight = getattr(linear, "weight", None)
        if not isinstance(linear, nn.Linear) and not (
            isinstance(weight, torch.Tensor) and weight.ndim == 2 and hasattr(linear, "in_features")
        ):
            raise DeltaError(f"{where}: module is a {type(linear).__name__}, not a torch.nn.Linear")
        out_features, in_features = int(linear.out_features), int(linear.in_features)
        limit = out_features if self.side == "out" else in_features
        top = int(self.neurons.max())
        if top >= limit:
            kind = "out_features" if self.side == "out" else "in_features"
            raise DeltaError(f"{where}: neuron index {top} out of range for {kind}={limit}")
        if self.U is not None:
            if self.side == "out" and self.V.shape[1] != in_features:
                raise DeltaError(
                    f"{where}: V must be (r, in_features={in_features}), got {tuple(self.V.shape)}"
                )
            if self.side == "in" and self.U.shape[0] != out_features:
                raise DeltaError(
                    f"{where}: U must be (out_features={out_features}, r), got {tuple(self.U.shape)}"
                )

    def dense_rows(self) -> torch.Tensor:
        """The edited slice of the weight's change: ``U @ V`` in float64.

        Side out: ``(m, in_features)`` rows; side in: ``(out_features, m)`` columns. Only for
        tests, merging and export — the runtime never forms it.
        """
        if self.U is None:
            raise DeltaError(f"edit of {self.module!r} is scale-only: it has no U @ V")
        return self.U.double() @ self.V.double()

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "ModuleEdit":
        """A copy with floating tensors cast to ``dtype`` and all tensors moved to ``device``."""

        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if t.is_floating_point() and dtype else t.dtype)

        return ModuleEdit(
            self.module, self.side, self.neurons.to(device), cast(self.U), cast(self.V), cast(self.scale)
        )


@dataclass
class SparseDelta:
    """A set of ``ModuleEdit``s plus metadata about how they were produced.

    Args:
        edits: the module edits; at most one per (module, side).
        metadata: JSON-serialisable description (method, layer, rank, languages, hyper-parameters).
        fingerprint: optional base-model fingerprint (see ``compute_fingerprint``); a delta
            without one applies to any model whose shapes fit.
    """

    edits: list[ModuleEdit]
    metadata: dict[str, Any] = field(default_factory=dict)
    fingerprint: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.edits = list(self.edits)
        if not self.edits:
            raise DeltaError("a SparseDelta needs at least one ModuleEdit")
        seen: set[tuple[str, str]] = set()
        for edit in self.edits:
            if not isinstance(edit, ModuleEdit):
                raise DeltaError(f"edits must be ModuleEdit instances, got {type(edit).__name__}")
            key = (edit.module, edit.side)
            if key in seen:
                raise DeltaError(f"two edits of {edit.module!r} on side {edit.side!r}: merge them first")
            seen.add(key)
        try:
            json.dumps(self.metadata)
            json.dumps(self.fingerprint)
        except TypeError as exc:
            raise DeltaError(f"metadata and fingerprint must be JSON-serialisable: {exc}") from None
        if not isinstance(self.metadata, dict):
            raise DeltaError(f"metadata must be a JSON object (dict), got {type(self.metadata).__name__}")
        _check_fingerprint_shape(self.fingerprint)

    @property
    def modules(self) -> list[str]:
        """Dotted paths of the edited modules, in edit order (a module appears once per side)."""
        return [e.module for e in self.edits]

    @property
    def num_parameters(self) -> int:
        """Stored numbers (factors, indices, scales): what the file costs, not the dense delta."""
        n = 0
        for e in self.edits:
            for t in (e.neurons, e.U, e.V, e.scale):
                n += 0 if t is None else t.numel()
        return n

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "SparseDelta":
        """A copy with every edit's floating tensors (U, V, scale) in ``dtype`` and all tensors on
        ``device`` (indices stay int64); metadata and fingerprint are kept."""
        return SparseDelta([e.to(dtype, device) for e in self.edits], dict(self.metadata), self.fingerprint)

    def scaled(self, strength: float) -> "SparseDelta":
        """A copy applied at ``strength`` (the edit's dial, like a LoRA's scaling).

        Every low-rank term becomes ``strength · U @ V`` (``U`` is scaled, ``V`` kept), and every
        per-neuron multiplier ``s`` becomes ``1 + strength · (s − 1)``, so strength 0 is the
        unedited model and 1 the delta as it is. ``metadata["strength"]`` records the product of
        the strengths applied; the fingerprint is kept (the base model is the same).
        """
        try:
            alpha = float(strength)
        except (TypeError, ValueError):
            raise DeltaError(f"strength must be a number, got {strength!r}") from None
        if not math.isfinite(alpha) or alpha < 0:
            raise DeltaError(f"strength must be finite and >= 0, got {strength!r}")

        def one(e: ModuleEdit) -> ModuleEdit:
            U = None if e.U is None else e.U * alpha
            scale = None if e.scale is None else 1 + (e.scale - 1) * alpha
            return ModuleEdit(e.module, e.side, e.neurons.clone(), U, None if e.V is None else e.V.clone(), scale)

        metadata = dict(self.metadata)
        metadata["strength"] = float(metadata.get("strength", 1.0)) * alpha
        return SparseDelta([one(e) for e in self.edits], metadata, self.fingerprint)

    def __repr__(self) -> str:
        parts = ", ".join(f"{e.module}[{e.side}, |S|={e.num_neurons}, r={e.rank}]" for e in self.edits)
        return f"SparseDelta({parts})"

    # -- I/O ----------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Writes the delta as one safetensors file with a JSON header; returns the path."""
        from edit_runtime.files import save_safetensors, tensors_digest

        tensors: dict[str, torch.Tensor] = {}
        listing = []
        for i, e in enumerate(self.edits):
            tensors[f"edits.{i}.neurons"] = e.neurons.detach().cpu().contiguous()
            for name in ("U", "V", "scale"):
                t = getattr(e, name)
                if t is not None:
                    tensors[f"edits.{i}.{name}"] = t.detach().cpu().contiguous()
            listing.append({"module": e.module, "side": e.side})
        header = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "edits": json.dumps(listing),
            "metadata": json.dumps(self.metadata, sort_keys=True),
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
            "tensors_sha256": tensors_digest(tensors),
        }
        return save_safetensors(tensors, path, header)

    @classmethod
    def load(cls, path: str | Path) -> "SparseDelta":
        """Reads a delta written by ``save``; raises ``DeltaFormatError`` naming what is wrong."""
        from safetensors import safe_open

        from edit_runtime.files import tensors_digest

        path = Path(path)
        if path.is_dir():
            raise DeltaFormatError(f"{path}: is a folder, not a delta file")
        if not path.is_file():
            raise DeltaFormatError(f"{path}: no such delta file")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises several types for corrupt input
            raise DeltaFormatError(f"{path}: not a readable safetensors file ({exc})") from None
        if header.get("format") != FORMAT_NAME:
            raise DeltaFormatError(
                f"{path}: not an edit_runtime delta (header format={header.get('format')!r}, "
                f"expected {FORMAT_NAME!r})"
            )
        version = header.get("format_version")
        if not (version or "").isdigit() or int(version) not in SUPPORTED_FORMAT_VERSIONS:
            raise DeltaFormatError(
                f"{path}: unknown delta format version {version!r}; this edit_runtime reads "
                f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}"
            )
        digest = header.get("tensors_sha256")  # absent in files written before it was added
        if digest is not None and digest != tensors_digest(tensors):
            raise DeltaFormatError(f"{path}: the tensor data does not match the checksum in its header "
                                   "(the file is corrupt or was altered after it was written)")
        try:
            listing = json.loads(header["edits"])
            metadata = json.loads(header.get("metadata", "{}"))
            fingerprint = json.loads(header.get("fingerprint", "null"))
        except (KeyError, json.JSONDecodeError) as exc:
            raise DeltaFormatError(f"{path}: corrupt JSON header ({exc})") from None
        if not isinstance(listing, list) or not listing:
            raise DeltaFormatError(f"{path}: header 'edits' must be a non-empty JSON list, got {listing!r}")
        edits = []
        for i, item in enumerate(listing):
            key = f"edits.{i}.neurons"
            if key not in tensors:
                raise DeltaFormatError(f"{path}: tensor {key!r} is missing")
            try:
                edits.append(
                    ModuleEdit(
                        module=item["module"],
                        side=item["side"],
                        neurons=tensors[key],
                        U=tensors.get(f"edits.{i}.U"),
                        V=tensors.get(f"edits.{i}.V"),
                        scale=tensors.get(f"edits.{i}.scale"),
                    )
                )
            except DeltaError as exc:
                raise DeltaFormatError(f"{path}: {exc}") from None
            except (KeyError, TypeError) as exc:
                raise DeltaFormatError(f"{path}: corrupt edit entry {i} ({exc})") from None
        try:
            return cls(edits=edits, metadata=metadata, fingerprint=fingerprint)
        except DeltaError as exc:
            raise DeltaFormatError(f"{path}: {exc}") from None


# -- fingerprint ------------------------------------------------------------------------------
def _config_shapes(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return {k: getattr(config, k, None) for k in _SHAPE_CONFIG_KEYS} if config is not None else {}


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _weight_digest(weight: torch.Tensor) -> dict[str, Any]:
    w = weight.detach().float().cpu().contiguous()
    flat = w.reshape(-1)
    # Probes at fixed, spread-out positions (a Weyl sequence), the same for every dtype.
    n = flat.numel()
    idx = torch.tensor([int(n * ((k * 0.6180339887498949) % 1.0)) for k in range(_N_PROBES)])
    return {
        "shape": list(w.shape),
        "sha256_fp32": hashlib.sha256(w.numpy().tobytes()).hexdigest(),
        "probes": flat[idx].double().tolist(),
        "rms": float(flat.double().pow(2).mean().sqrt()),
    }


def _check_fingerprint_shape(fp: Any) -> None:
    """A fingerprint is None or what :func:`compute_fingerprint` returns; anything else (a hand-edited
    or corrupt header) is refused here, not met as an AttributeError in the middle of a patch."""
    if fp is None:
        return
    problem = None
    if not isinstance(fp, dict):
        problem = f"a JSON object, got {type(fp).__name__}"
    elif not isinstance(fp.get("config_sha256"), str) or not isinstance(fp.get("config", {}), dict):
        problem = "config_sha256 (a string) and config (an object)"
    elif not isinstance(fp.get("modules", {}), dict):
        problem = f"modules as an object of module name -> digest, got {type(fp['modules']).__name__}"
    else:
        for name, digest in fp.get("modules", {}).items():
            if (not isinstance(digest, dict) or not isinstance(digest.get("shape"), list)
                    or not isinstance(digest.get("sha256_fp32"), str) or not isinstance(digest.get("probes"), list)
                    or not all(isinstance(x, (int, float)) for x in digest["probes"])
                    or not isinstance(digest.get("rms"), (int, float))):
                problem = f"for module {name!r} a digest with shape, sha256_fp32, probes and rms"
                break
    if problem is not None:
        raise DeltaError(f"fingerprint must be None or a base-model fingerprint (compute_fingerprint) with "
                         f"{problem}")


def compute_fingerprint(model: nn.Module, modules: Iterable[str]) -> dict[str, Any]:
    """Fingerprint of ``model``: a hash of its config shapes and a digest of the named weights.

    The digest keeps an exact sha256 of the fp32 weight plus probe values, so the same base model
    loaded in another dtype still matches (within its rounding) while another model does not.
    """
    shapes = _config_shapes(model)
    fp: dict[str, Any] = {"config_sha256": _sha256_json(shapes), "config": shapes, "modules": {}}
    for name in modules:
        module = model.get_submodule(name)
        weight = getattr(module, "base_layer", module).weight
        fp["modules"][name] = _weight_digest(weight)
    return fp


def fingerprint_mismatches(model: nn.Module, fingerprint: Mapping[str, Any]) -> list[str]:
    """Human-readable reasons why ``model`` is not the model ``fingerprint`` was taken on ([] = fits)."""
    problems = []
    shapes = _config_shapes(model)
    if _sha256_json(shapes) != fingerprint.get("config_sha256"):
        theirs = fingerprint.get("config", {})
        diff = {k: (theirs.get(k), v) for k, v in shapes.items() if theirs.get(k) != v}
        problems.append(f"config shapes differ (delta's vs model's): {diff}")
    for name, want in (fingerprint.get("modules") or {}).items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            problems.append(f"{name}: no such module in the model")
            continue
        got = _weight_digest(getattr(module, "base_layer", module).weight)
        if got["shape"] != want.get("shape"):
            problems.append(f"{name}: weight shape {got['shape']} != fingerprint's {want.get('shape')}")
        elif got["sha256_fp32"] != want.get("sha256_fp32"):
            tol = _PROBE_RTOL
            close = all(
                math.isclose(a, b, rel_tol=tol, abs_tol=1e-6 * max(got["rms"], 1e-12))
                for a, b in zip(got["probes"], want.get("probes", []))
            ) and math.isclose(got["rms"], want.get("rms", -1.0), rel_tol=tol)
            if not close:
                problems.append(f"{name}: weights differ from those the delta was fitted on")
    return problems


def check_fingerprint(model: nn.Module, delta: SparseDelta) -> None:
    """Raises ``FingerprintMismatchError`` when ``delta`` carries a fingerprint ``model`` fails."""
    if not delta.fingerprint:
        return
    problems = fingerprint_mismatches(model, delta.fingerprint)
    if problems:
        raise FingerprintMismatchError(
            "this delta was fitted on another base model: "
            + "; ".join(problems)
            + " (to apply it anyway: check_fingerprint=False in Python, --no-check-fingerprint on the"
            " command line)"
        )
