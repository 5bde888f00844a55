"""Probe-gated edits: a linear harmfulness probe on the residual stream turns a patch on per sequence.

An edit fitted to make harmful prompts refuse also moves some harmless ones ("teach my child to
tie shoelaces" answered "I can't assist"). A :class:`ProbeGate` reads the residual stream after
decoder layer ``layer`` at each sequence's last prompt token, scores it with a logistic probe
``s = h @ weight + bias`` (fitted on harmful vs harmless prompts, :func:`fit_probe_gate`), and
switches the patch on only for the sequences with ``s > threshold``, through the handle's
per-sequence row mask (:meth:`edit_runtime.patch.PatchHandle.set_row_mask`).

The decision is taken inside the prefill forward: a hook on decoder layer ``layer`` sets the mask
before the edited layers run, so the gate layer must come before every edited layer. A gated-on
sequence is then exactly the edited model's (every token, prompt included, goes through the
edit) and a gated-off one exactly the base model's. A forward whose KV cache already holds
tokens is a decode step and keeps the prefill's decision, so ``model.generate`` needs nothing
else; a forward without a cache, or with an empty one, is a prefill (a one-token prompt too).

Usage::

    handle = patch_model(model, delta)
    gate = ProbeGate.load("gate.safetensors")
    with attach_gate(handle, gate):
        out = model.generate(**batch)              # the edit on only where the probe fires

The gate owns the handle's row mask while attached (``handle.row_mask_owner`` is the
:class:`GateHandle`; a second gate is refused, and so is a mask set or cleared by hand meanwhile).
To combine it with a per-request mask (the server: only the rows that asked for the edit), set
:attr:`GateHandle.allowed` before the prefill: the decision is ANDed with it.

:func:`fit_mapped_gate` fits a gate for a delta that maps some languages onto an anchor: on for
the harmful prompts of the mapped languages, off for the anchor's, the held languages' and every
harmless prompt, its threshold set on validation prompts (the demo's gate).

:class:`GatedDelta` pairs a delta with its gate: :func:`edit_runtime.evaluate.evaluate` takes one as
a variant and the server (``edit-runtime serve --gate NAME=PATH``) serves one per request.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from edit_runtime.arch import find_decoder_layers
from edit_runtime.delta import SparseDelta
from edit_runtime.patch import PatchHandle

GATE_FORMAT = "edit_runtime.probe_gate/1"


class GateError(ValueError):
    """A probe gate that cannot be used as asked (bad values, wrong model, bad file)."""


@dataclass
class ProbeGate:
    """A logistic probe on the residual stream after decoder layer ``layer``.

    Args:
        layer: decoder layer whose output hidden state is read (0-based; the same index as
            ``hidden_states[layer + 1]`` of a transformers forward).
        weight: ``(d_model,)`` probe weights on the raw hidden state (standardisation folded in).
        bias: the probe's intercept.
        threshold: the edit is on for a sequence whose score ``h @ weight + bias`` exceeds it
            (0 is the probe's own boundary; higher is stricter: fewer sequences edited).
        metadata: JSON-serialisable description (training data, sizes, layer choice); default
            empty.

    The weight is stored as a detached, contiguous float32 CPU tensor, whatever was given.

    Raises:
        GateError: ``layer`` is not a non-negative int; ``weight`` is not a non-empty 1-D float
            tensor or has NaN/infinite entries; ``bias`` or ``threshold`` is not a finite number
            (a bool is refused); ``metadata`` is not JSON-serialisable.
    """

    layer: int
    weight: torch.Tensor
    bias: float
    threshold: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # the weight vector is d_model numbers: show its size, not its values
        return (f"ProbeGate(layer={self.layer}, d_model={self.weight.numel()}, bias={self.bias:.4g}, "
                f"threshold={self.threshold:g})")

    def __post_init__(self) -> None:
        if not isinstance(self.layer, int) or isinstance(self.layer, bool) or self.layer < 0:
            raise GateError(f"gate layer must be a non-negative int, got {self.layer!r}")
        w = torch.as_tensor(self.weight)
        if w.dim() != 1 or w.numel() == 0 or not w.is_floating_point():
            raise GateError(f"gate weight must be a non-empty 1-D float tensor, got shape {tuple(w.shape)}, {w.dtype}")
        if not bool(torch.isfinite(w).all()):
            raise GateError("gate weight has NaN or infinite entries")
        self.weight = w.detach().to(torch.float32).cpu().contiguous()
        for name in ("bias", "threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise GateError(f"gate {name} must be a finite number, got {value!r}")
            setattr(self, name, float(value))
        try:
            json.dumps(self.metadata)
        except TypeError as exc:
            raise GateError(f"gate metadata must be JSON-serialisable: {exc}") from None

    @property
    def d_model(self) -> int:
        """Width of the hidden states the probe reads (``weight.numel()``)."""
        return self.weight.numel()

    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        """Probe scores ``hidden @ weight + bias`` (compare with :attr:`threshold`).

        Args:
            hidden: ``(..., d_model)`` hidden states, any float dtype and device (computed in
                float32; the weight is moved to their device).

        Returns:
            ``(...,)`` float32 scores on ``hidden``'s device.

        Raises:
            GateError: the last dimension of ``hidden`` is not :attr:`d_model`.
        """
        if hidden.shape[-1] != self.d_model:
            raise GateError(f"hidden states have {hidden.shape[-1]} features, the gate expects {self.d_model}")
        w = self.weight.to(hidden.device)
        return hidden.to(torch.float32) @ w + self.bias

    def with_threshold(self, threshold: float) -> "ProbeGate":
        """The same probe with another threshold (e.g. one set on validation scores by
        :func:`threshold_at_most`); this gate is left unchanged.

        Args:
            threshold: the new decision threshold (a finite number).

        Returns:
            A new :class:`ProbeGate` with the same layer, weight and bias and a shallow copy of
            :attr:`metadata`.

        Raises:
            GateError: ``threshold`` is not a finite number.
        """
        return ProbeGate(self.layer, self.weight, self.bias, threshold, dict(self.metadata))

    # -- files -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Writes the gate as a safetensors file: the ``weight`` tensor plus a string header
        (format, layer, bias, threshold, JSON metadata) that :meth:`load` reads back exactly.

        The file appears whole or not at all and its parent folder is created
        (:func:`edit_runtime.files.save_safetensors`).

        Args:
            path: the file to write (replaced if it exists).

        Returns:
            ``path`` as a :class:`~pathlib.Path`.
        """
        from edit_runtime.files import save_safetensors, tensors_digest

        header = {"format": GATE_FORMAT, "layer": str(self.layer), "bias": repr(self.bias),
                  "threshold": repr(self.threshold), "metadata": json.dumps(self.metadata),
                  "tensors_sha256": tensors_digest({"weight": self.weight})}
        return save_safetensors({"weight": self.weight}, path, header)

    @classmethod
    def load(cls, path: str | Path) -> "ProbeGate":
        """Reads a gate file written by :meth:`save`.

        Args:
            path: the safetensors file.

        Returns:
            The :class:`ProbeGate` (validated as at construction).

        Raises:
            GateError: no file at ``path``; its header is not a probe gate's
                (:data:`GATE_FORMAT`); it holds tensors other than exactly ``weight``; the weight
                fails the header's checksum; it cannot be read or parsed; or the values it holds
                are not a valid gate.
        """
        from safetensors import SafetensorError, safe_open

        from edit_runtime.files import tensors_digest

        path = Path(path)
        if not path.is_file():
            raise GateError(f"no gate file at {path}")
        try:
            with safe_open(str(path), "pt") as f:
                header = f.metadata() or {}
                if header.get("format") != GATE_FORMAT:
                    raise GateError(f"{path} is not a probe gate file (format {header.get('format')!r}, "
                                    f"expected {GATE_FORMAT!r})")
                if set(f.keys()) != {"weight"}:
                    raise GateError(f"{path}: expected one tensor 'weight', found {sorted(f.keys())}")
                weight = f.get_tensor("weight")
            digest = header.get("tensors_sha256")  # absent in files written before it was added
            if digest is not None and digest != tensors_digest({"weight": weight}):
                raise GateError(f"{path}: the weight does not match the checksum in its header (the file is "
                                "corrupt or was altered after it was written)")
            return cls(int(header["layer"]), weight, float(header["bias"]), float(header["threshold"]),
                       json.loads(header.get("metadata", "{}")))
        except GateError:
            raise
        except (SafetensorError, KeyError, ValueError, OSError) as exc:
            raise GateError(f"{path}: not a readable probe gate file ({type(exc).__name__}: {exc})") from None


def fit_probe_gate(harmful: torch.Tensor, harmless: torch.Tensor, layer: int, *, l2: float = 1e-2,
                   threshold: float = 0.0, max_iter: int = 500,
                   metadata: dict[str, Any] | None = None) -> ProbeGate:
    """Class-balanced L2 logistic regression of harmful (1) vs harmless (0) hidden states.

    Fitted in float64 with L-BFGS on standardised features; the standardisation is folded into
    the returned weight and bias, so the gate scores raw hidden states.

    Args:
        harmful: ``(N1, d_model)`` hidden states after ``layer`` at the last prompt token
            (e.g. from :func:`last_token_hidden`); anything ``torch.as_tensor`` takes.
        harmless: ``(N0, d_model)`` the same for harmless prompts.
        layer: the decoder layer the features were read after; stored in the gate, which reads
            the same layer when attached.
        l2: ridge weight on the standardised features (each class weighs one half in the loss).
        threshold: the returned gate's threshold (0: the probe's own boundary); set it later
            with :meth:`ProbeGate.with_threshold`.
        max_iter: L-BFGS iteration limit of the single optimiser step.
        metadata: extra JSON-serialisable entries for the gate's metadata, added after (and
            overriding) the recorded ``n_harmful``, ``n_harmless`` and ``l2``.

    Returns:
        A :class:`ProbeGate` on ``layer`` whose ``(d_model,)`` float32 weight and bias score raw
        hidden states.

    Raises:
        GateError: the inputs are not 2-D or differ in width; a class has fewer than 2 rows;
            the hidden states have NaN/infinite entries; ``l2`` is not a positive finite number;
            or the result is not a valid gate (e.g. a negative ``layer``).
    """
    harmful, harmless = torch.as_tensor(harmful), torch.as_tensor(harmless)
    if harmful.dim() != 2 or harmless.dim() != 2 or harmful.shape[1] != harmless.shape[1]:
        raise GateError(f"need (N, d) hidden states of one width, got {tuple(harmful.shape)} and {tuple(harmless.shape)}")
    if len(harmful) < 2 or len(harmless) < 2:
        raise GateError(f"need at least 2 prompts per class, got {len(harmful)} harmful and {len(harmless)} harmless")
    X = torch.cat([harmful, harmless]).to(torch.float64)
    if not bool(torch.isfinite(X).all()):
        raise GateError("hidden states have NaN or infinite entries")
    if not (l2 > 0 and math.isfinite(l2)):
        raise GateError(f"l2 must be a positive number, got {l2!r}")
    mu, sd = X.mean(0), X.std(0) + 1e-6
    Z = (X - mu) / sd
    y = torch.cat([torch.ones(len(harmful)), torch.zeros(len(harmless))]).to(torch.float64)
    sample_w = torch.where(y > 0, 0.5 / len(harmful), 0.5 / len(harmless)).to(torch.float64)
    w = torch.zeros(Z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = Z @ w + b
        loss = (sample_w * nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")).sum()
        loss = loss + l2 * (w @ w) / 2
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w, b = w.detach(), b.detach()
    meta = {"n_harmful": len(harmful), "n_harmless": len(harmless), "l2": l2, **(metadata or {})}
    return ProbeGate(layer, (w / sd).to(torch.float32), float(b - (mu / sd) @ w), threshold, meta)


# ----------------------------------------------------------------------------------- runtime
def _edited_layers(module_paths: Sequence[str], prefix: str) -> list[int]:
    layers = []
    for path in module_paths:
        if not path.startswith(prefix + "."):
            raise GateError(f"edited module {path!r} is not inside the decoder layers ({prefix!r}): "
                            "a gate cannot order itself before it")
        layers.append(int(path[len(prefix) + 1:].split(".", 1)[0]))
    return layers


def check_gate(model: nn.Module, module_paths: Sequence[str], gate: "ProbeGate") -> None:
    """Checks that ``gate`` can gate an edit of ``module_paths`` on ``model``: the hidden size is
    the gate's, the gate layer exists and comes before every edited layer (the decision must be
    taken before the edit runs). Hooks nothing; :func:`attach_gate` runs the same checks.

    Args:
        model: the model the edit is (or will be) patched into.
        module_paths: dotted paths of the edited modules (e.g. ``handle.modules`` or
            ``[e.module for e in delta.edits]``), each inside the decoder layers.
        gate: the gate to check.

    Raises:
        GateError: the model's ``config.hidden_size`` (where it has one) is not
            ``gate.d_model``; the gate layer does not exist; an edited module is outside the
            decoder layers; ``module_paths`` is empty; or an edited layer is at or before the
            gate layer.
        ArchError: the model has no decoder-layer list
            (:func:`edit_runtime.arch.find_decoder_layers`).
    """
    prefix, layers = find_decoder_layers(model)
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if hidden is not None and hidden != gate.d_model:
        raise GateError(f"the gate expects hidden size {gate.d_model}, the model has {hidden}")
    if gate.layer >= len(layers):
        raise GateError(f"gate layer {gate.layer} does not exist: the model has {len(layers)} decoder layers")
    edited = _edited_layers(module_paths, prefix)
    if not edited:
        raise GateError("the edit touches no module: nothing to gate")
    if min(edited) <= gate.layer:
        raise GateError(f"gate layer {gate.layer} must come before every edited layer (edited: "
                        f"{sorted(set(edited))}): the decision is taken before the edit runs")


@dataclass(frozen=True)
class GatedDelta:
    """A delta that is applied only where its probe gate fires: a variant for
    :func:`edit_runtime.evaluate.evaluate` and a served edit (``ServingEngine(gates=...)``).

    Args:
        delta: the edit (:class:`~edit_runtime.delta.SparseDelta`).
        gate: the :class:`ProbeGate` that turns it on per sequence.

    Raises:
        TypeError: ``delta`` is not a :class:`~edit_runtime.delta.SparseDelta` or ``gate`` not a
            :class:`ProbeGate`.
    """

    delta: SparseDelta
    gate: "ProbeGate"

    def __post_init__(self) -> None:
        if not isinstance(self.delta, SparseDelta):
            raise TypeError(f"GatedDelta.delta must be a SparseDelta, got {type(self.delta).__name__}")
        if not isinstance(self.gate, ProbeGate):
            raise TypeError(f"GatedDelta.gate must be a ProbeGate, got {type(self.gate).__name__}")

    @classmethod
    def load(cls, delta_path: str | Path, gate_path: str | Path) -> "GatedDelta":
        """Reads a delta file and a gate file (:meth:`SparseDelta.load`, :meth:`ProbeGate.load`).

        Args:
            delta_path: the delta's safetensors file.
            gate_path: the gate's safetensors file.

        Returns:
            The pair as a :class:`GatedDelta` (not checked against a model: see :meth:`check`).

        Raises:
            DeltaError: the delta file cannot be read (``DeltaFormatError``).
            GateError: the gate file cannot be read.
        """
        return cls(SparseDelta.load(delta_path), ProbeGate.load(gate_path))

    def check(self, model: nn.Module) -> None:
        """:func:`check_gate` for this delta's modules on ``model`` (hooks nothing).

        Args:
            model: the model the delta would be patched into.

        Raises:
            GateError: the gate cannot gate this delta on ``model`` (see :func:`check_gate`).
        """
        check_gate(model, [e.module for e in self.delta.edits], self.gate)


def _cache_length(kwargs: dict) -> int | None:
    """Tokens already in the forward's KV cache (0: none or empty), ``None`` if unknown."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return 0
    get = getattr(cache, "get_seq_length", None)
    if get is None:
        return None
    try:
        return int(get())
    except Exception:  # noqa: BLE001 - a cache type we cannot read: fall back to the width rule
        return None


class GateHandle:
    """An attached :class:`ProbeGate`; ``remove()`` (or leaving the ``with`` block) detaches it
    and clears the patch's row mask.

    Made by :func:`attach_gate`, which checks the pair and registers the hooks; constructing one
    directly hooks nothing.

    Args:
        handle: the live patch whose row mask the gate sets (:attr:`handle`).
        gate: the probe that decides per sequence (:attr:`gate`).

    Attributes:
        handle: the :class:`~edit_runtime.patch.PatchHandle` being gated.
        gate: the :class:`ProbeGate` in use.
        last_scores: the latest prefill's ``(B,)`` float32 probe scores (CPU); ``None`` before
            the first prefill. Kept after :meth:`remove`.
        last_mask: the latest prefill's ``(B,)`` bool decisions (CPU), ``allowed`` applied;
            ``None`` before the first prefill.
        allowed: an optional ``(B,)`` bool mask of the rows the gate may turn the edit on for
            (ANDed with the probe's decision at the next prefills; ``None``: every row). The
            server sets it to the rows whose request asked for the edit. A mask whose shape is
            not the batch's raises :class:`GateError` in the forward.
    """

    def __init__(self, handle: PatchHandle, gate: ProbeGate) -> None:
        self.handle, self.gate = handle, gate
        self.last_scores: torch.Tensor | None = None
        self.last_mask: torch.Tensor | None = None
        self.allowed: torch.Tensor | Sequence[bool] | None = None
        self._attention_mask: torch.Tensor | None = None
        self._prefill = True
        self._hooks: list[Any] = []

    def __enter__(self) -> "GateHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    @property
    def removed(self) -> bool:
        """True once the gate's hooks are gone (after :meth:`remove`, or for a handle that was
        never attached)."""
        return not self._hooks

    def remove(self) -> None:
        """Detaches the gate: removes its hooks, gives up the handle's row mask
        (``handle.row_mask_owner`` back to ``None`` if it is this gate) and, unless the patch was
        removed already, clears the mask so that every row is edited again. Leaving the ``with``
        block calls it; the patch itself stays applied.
        """
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.handle.row_mask_owner is self:
            self.handle.row_mask_owner = None
        if not self.handle.removed:
            self.handle.clear_row_mask()

    def _remember_inputs(self, module, args, kwargs) -> None:
        self._attention_mask = kwargs.get("attention_mask")
        past = _cache_length(kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        width = ids.shape[-1] if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None
        # an empty (or no) cache is a prefill, whatever its width; an unreadable cache falls back
        # to "more than one new token"
        self._prefill = past == 0 if past is not None else (width is None or width > 1)

    def _decide(self, module, args, output) -> None:
        if not self._prefill:
            return  # a decode step: the prefill's decision holds
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if hidden.dim() != 3:
            return
        B, T = hidden.shape[:2]
        mask = self._attention_mask
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == B and mask.shape[1] >= T:
            # last real token of each row, left or right padding alike
            m = mask[:, -T:].to(torch.int64)
            last = (T - 1) - m.flip(1).argmax(1)
        else:
            last = torch.full((B,), T - 1, dtype=torch.int64, device=hidden.device)
        rows = torch.arange(B, device=hidden.device)
        scores = self.gate.score(hidden[rows, last.to(hidden.device)].detach())
        decision = scores > self.gate.threshold
        if self.allowed is not None:
            allowed = torch.as_tensor(self.allowed, dtype=torch.bool, device=decision.device)
            if allowed.shape != decision.shape:
                raise GateError(f"GateHandle.allowed has shape {tuple(allowed.shape)}, the batch has {B} rows")
            decision = decision & allowed
        self.handle.set_row_mask(decision, owner=self)
        self.last_scores, self.last_mask = scores.cpu(), decision.cpu()


def attach_gate(handle: PatchHandle, gate: ProbeGate) -> GateHandle:
    """Gates ``handle``'s edit per sequence with ``gate`` (see the module docstring).

    Registers a forward pre-hook on the model (it tells a prefill from a decode step and keeps the
    attention mask) and a forward hook on decoder layer ``gate.layer`` (it scores each row's last
    real token and sets the handle's row mask), and makes the returned handle the owner of the
    row mask (``handle.row_mask_owner``). Checked before anything is hooked: the handle is live,
    not merged and not gated already, and :func:`check_gate` (hidden size, gate layer exists and
    comes before every edited layer).

    Args:
        handle: a live, unmerged :class:`~edit_runtime.patch.PatchHandle` from
            :func:`~edit_runtime.patch.patch_model`.
        gate: the probe that decides per sequence.

    Returns:
        The attached :class:`GateHandle`: a context manager, attached until
        :meth:`GateHandle.remove` or the end of its ``with`` block.

    Raises:
        GateError: the handle was removed or is merged; it already has a gate; or
            :func:`check_gate` refuses the pair.
    """
    if handle.removed:
        raise GateError(f"{handle!r} was removed; patch the model again")
    if handle.merged:
        raise GateError(f"{handle!r} is merged into the weights: a merged edit cannot be gated per sequence")
    if handle.row_mask_owner is not None:
        raise GateError(f"{handle!r} already has a gate attached ({handle.row_mask_owner!r}): remove it first; "
                        "two gates would overwrite each other's row mask")
    model = handle.model
    check_gate(model, list(handle.modules), gate)
    layers = find_decoder_layers(model)[1]
    gh = GateHandle(handle, gate)
    gh._hooks.append(model.register_forward_pre_hook(gh._remember_inputs, with_kwargs=True))
    gh._hooks.append(layers[gate.layer].register_forward_hook(gh._decide))
    handle.row_mask_owner = gh
    return gh


def threshold_at_most(scores: torch.Tensor, rate: float) -> float:
    """The (k+1)-th highest of ``scores`` ``(n,)``, k = ⌊rate · n⌋: a gate with this threshold
    (on where ``score > threshold``) is on for at most ``rate`` of them (fewer where scores tie).

    Args:
        scores: ``(n,)`` probe scores (any shape is flattened), e.g. the validation prompts the
            gate is not for.
        rate: the largest fraction of ``scores`` allowed above the threshold, in ``[0, 1)``
            (0: the highest score, so none is above it).

    Returns:
        The threshold, one of ``scores`` (as a Python float).

    Raises:
        GateError: ``scores`` is empty or ``rate`` is outside ``[0, 1)``.
    """
    scores = torch.as_tensor(scores).flatten().double()
    if not len(scores):
        raise GateError("no scores to set a threshold on")
    if not 0 <= rate < 1:
        raise GateError(f"rate must be in [0, 1), got {rate!r}")
    ordered = scores.sort(descending=True).values
    return float(ordered[min(int(rate * len(ordered)), len(ordered) - 1)])


def mapped_harmful(prompts: Sequence[Any], mapped_langs: Sequence[str]) -> torch.Tensor:
    """The prompts a gate for a mapping edit is for: the harmful prompts of ``mapped_langs``
    (:func:`fit_mapped_gate`, ``edit-runtime gate --mapped-langs``).

    Args:
        prompts: ``n`` records with ``label`` and ``lang`` (:class:`edit_runtime.data.Prompt`).
        mapped_langs: the languages the edit maps onto the anchor.

    Returns:
        ``(n,)`` bool tensor, True where ``label == "harmful"`` and ``lang`` is mapped.
    """
    langs = set(mapped_langs)
    return torch.tensor([p.label == "harmful" and p.lang in langs for p in prompts], dtype=torch.bool)


def fit_mapped_gate(model: nn.Module, tokenizer: Any, train: Sequence[Any], validation: Sequence[Any],
                    mapped_langs: Sequence[str], *, layer: int, gate_on: float, batch_size: int = 16,
                    progress: bool = True) -> ProbeGate:
    """A probe gate that turns the edit on for what it was fitted for: harmful prompts of the
    mapped languages. English, held languages and every harmless prompt are the other class, so
    the gate leaves the anchor's own refusals and the harmless prompts to the base model.

    The probe (:func:`fit_probe_gate`, default ``l2``) is fitted on ``train``'s features; its
    threshold puts at most a ``gate_on`` fraction of the other class in ``validation`` above it
    (:func:`threshold_at_most`). Features are :func:`last_token_hidden` with the chat template and
    no system prompt. The class checks run before any forward.

    Args:
        model: the causal LM the gate will be attached to (the features are its hidden states).
        tokenizer: its tokenizer (chat template applied).
        train: :class:`edit_runtime.data.Prompt` records (``text``, ``lang``, ``label``),
            harmful and harmless together: the probe's training set.
        validation: the same kind of records: the threshold's calibration set.
        mapped_langs: the languages the edit maps onto the anchor.
        layer: the decoder layer the probe reads (before every edited layer).
        gate_on: the fraction of the validation prompts the gate is not for that it may turn on,
            in ``(0, 1)``.
        batch_size: prompts per forward when reading the features.
        progress: show a tqdm bar while reading the features.

    Returns:
        A :class:`ProbeGate` on ``layer`` with the calibrated threshold. Its metadata records
        what it is for (``for``), the class sizes (``n_train``, ``validation_n``), ``gate_on``
        and the validation on-rates of both classes (``validation_on``).

    Raises:
        GateError: ``gate_on`` is not in ``(0, 1)``; ``train`` or ``validation`` lacks either
            class; ``layer`` is out of range; or the probe cannot be fitted
            (:func:`fit_probe_gate`, e.g. fewer than 2 prompts in a class).
    """

    def features(prompts: Sequence[Any]) -> torch.Tensor:
        return last_token_hidden(model, tokenizer, [p.text for p in prompts], [layer],
                                 batch_size=batch_size, progress=progress)[layer]

    # checked before the forwards
    if not 0 < gate_on < 1:
        raise GateError(f"gate_on must be a fraction in (0, 1), got {gate_on!r}")
    pos, pos_val = mapped_harmful(train, mapped_langs), mapped_harmful(validation, mapped_langs)
    for name, mask in (("train", pos), ("validation", pos_val)):
        if not mask.any() or mask.all():
            raise GateError(f"the {name} prompts must hold both prompts the gate is for (harmful, "
                            f"{list(mapped_langs)}) and others")
    f_train, f_val = features(train), features(validation)
    gate = fit_probe_gate(f_train[pos], f_train[~pos], layer,
                          metadata={"for": {"label": "harmful", "langs": list(mapped_langs)},
                                    "n_train": {"for": int(pos.sum()), "other": int((~pos).sum())}})
    scores = gate.score(f_val)
    threshold = threshold_at_most(scores[~pos_val], gate_on)
    on = scores > threshold
    gate.metadata.update({"gate_on": gate_on,
                          "validation_n": {"for": int(pos_val.sum()), "other": int((~pos_val).sum())},
                          "validation_on": {"for": float(on[pos_val].float().mean()),
                                            "other": float(on[~pos_val].float().mean())}})
    return gate.with_threshold(threshold)


def last_token_hidden(model: nn.Module, tokenizer: Any, texts: Sequence[str], layers: Sequence[int], *,
                      batch_size: int = 16, system_prompt: str | None = None,
                      progress: bool = False) -> dict[int, torch.Tensor]:
    """Hidden states after each of ``layers`` at the last prompt token (chat template applied).

    These are the features a gate is fitted on and scores: the decoder layer's raw output, what
    the gate's hook reads. Prompts are sorted by length and left-padded, so the last position is
    the last prompt token; the forward runs without gradients and stops after the last layer asked
    for. Batching and padding are the capture's (:mod:`edit_runtime.capture`).

    Args:
        model: a loaded causal LM (any architecture :mod:`edit_runtime.arch` finds).
        tokenizer: its tokenizer (chat template applied to each text).
        texts: the user prompts, ``N`` of them.
        layers: 0-based decoder layer indices (no negative indices).
        batch_size: prompts per forward.
        system_prompt: system prompt for the chat template; ``None``: none.
        progress: show a tqdm bar over the batches.

    Returns:
        ``{layer: (N, d_model)}`` float32 CPU tensors, rows in ``texts`` order.

    Raises:
        GateError: ``layers`` is empty or a layer is out of range.
    """
    from edit_runtime.capture import (_forward_until_stopped, _input_device, _make_batch, _pad_id, _StopForward,
                                      encode_prompts)

    decoder_layers = find_decoder_layers(model)[1]
    if not layers:
        raise GateError("no layers asked for")
    for layer in layers:
        if not 0 <= layer < len(decoder_layers):
            raise GateError(f"layer {layer} out of range 0..{len(decoder_layers) - 1}")
    ids = encode_prompts(tokenizer, list(texts), system_prompt=system_prompt)
    device, pad_id = _input_device(model), _pad_id(tokenizer)
    out = {layer: torch.empty(len(ids), model.config.hidden_size) for layer in layers}
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="probe features", unit="batch")
    last_needed = max(layers)
    current: dict[int, torch.Tensor] = {}

    def keep(layer: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            current[layer] = hidden[:, -1].float().cpu()
            if layer == last_needed:
                raise _StopForward  # the later layers and the LM head are not needed
        return hook

    hooks = [decoder_layers[layer].register_forward_hook(keep(layer)) for layer in set(layers)]
    try:
        with torch.no_grad():
            for batch in batches:
                _forward_until_stopped(model, _make_batch([ids[i] for i in batch], pad_id=pad_id, side="left",
                                                          device=device))
                for layer in layers:
                    out[layer][batch] = current[layer]
    finally:
        for h in hooks:
            h.remove()
    return out
