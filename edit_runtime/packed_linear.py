"""oneDNN-prepacked fp32 ``nn.Linear`` on CPU, for the forwards that only read activations.

Statistics capture is one long forward over thousands of prompts, and on a CPU its time is the
MLP's GEMMs. PyTorch's eager ``F.linear`` calls MKL with the weight in its natural layout; on
the 2-core AVX2 machine this project is measured on, oneDNN with the weight reordered once into
its blocked layout (what ``torch.compile``'s CPU "freezing" does) runs the
``(tokens, 896) x (896, 4864)`` up/gate GEMMs of Qwen2.5-0.5B 10-25 % faster at 300-600 rows (the
size of a capture batch) in isolation, yet a whole large-batch forward gains little (0.6 % in
``bench/bench_capture.py``'s ``plain-eager`` row, ~3 % on the MultiJail fit's harmful pass). The
big win is small batches: at 16 rows (greedy decoding) oneDNN runs the same GEMM ~2x faster than
eager MKL, and a generation call is ~20 % faster. :func:`packed_linears` reorders the given
modules' weights once and routes their forward through ``torch.ops.mkldnn._linear_pointwise``
until the context exits, when the modules are exactly as before.

Semantics: ``y = x @ W.T + b``, the same as ``F.linear`` up to fp32 rounding (oneDNN and MKL
sum in different orders: relative differences ~1e-6). Where a call cannot take the packed path
(a CUDA or non-fp32 input, autograd wanting a graph, an empty input, or a weight or bias changed
in place or replaced since it was packed) it runs ``F.linear`` on the module's own tensors.

Packing is skipped, and the modules are left untouched, when oneDNN or the private op is missing
(the op is what inductor itself emits; :func:`packed_linear_available` checks it once), when a
module is not a plain fp32 CPU ``nn.Linear`` or already has an instance ``forward``, when the
packed copies would exceed ``max_bytes`` (they live beside the weights for the duration of the
context), or when ``EDIT_RUNTIME_PACKED_LINEAR=0``.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

#: set to 0 / false / no to never pack (e.g. to time the plain eager forward)
PACKED_LINEAR_ENV = "EDIT_RUNTIME_PACKED_LINEAR"

#: the packed copies live beside the weights while the context is open; above this many bytes
#: the memory is worth more than the 15-25 % (Qwen2.5-0.5B's 21 MLPs: 1.1 GiB)
MAX_PACKED_BYTES = 4 << 30

#: the row count oneDNN tunes the blocked layout for (any row count is correct); a capture
#: batch holds about 512 tokens (``capture.BATCH_TOKENS``)
BATCH_HINT = 512


@functools.lru_cache(maxsize=None)
def packed_linear_available() -> bool:
    """Whether this torch build can reorder and run a packed fp32 linear (checked once)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ones(4, 3)
        wp = torch.ops.mkldnn._reorder_linear_weight(w, 2)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 3), wp, None, "none", [], "")
        return bool(torch.equal(y, torch.full((2, 4), 3.0)))
    except (AttributeError, RuntimeError, TypeError):  # op missing or changed signature
        return False


def packing_enabled() -> bool:
    """False when ``EDIT_RUNTIME_PACKED_LINEAR`` is 0/false/no/off."""
    return os.environ.get(PACKED_LINEAR_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _packable(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return (type(module) is nn.Linear and "forward" not in module.__dict__
            and isinstance(w, torch.Tensor) and w.device.type == "cpu"
            and w.dtype == torch.float32 and w.dim() == 2 and not w.is_sparse)


def _packed_forward(module: nn.Linear, packed: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    weight, bias, out = module.weight, module.bias, module.out_features
    versions = (weight._version, None if bias is None else bias._version)

    def forward(x: torch.Tensor) -> torch.Tensor:
        grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        # an in-place change of the weight or bias (a merged edit, a loaded state dict) makes
        # the packed copy stale: the module's own tensors are used from then on
        stale = (module.weight is not weight or module.bias is not bias
                 or versions != (weight._version, None if bias is None else bias._version))
        if grad or stale or x.device.type != "cpu" or x.dtype != torch.float32 or x.numel() == 0:
            return F.linear(x, module.weight, module.bias)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]).contiguous(), packed,
                                               None if bias is None else bias.detach(),
                                               "none", [], "")
        return y.view(*x.shape[:-1], out)
    return forward


@contextlib.contextmanager
def packed_linears(modules: Iterable[nn.Module], *, enabled: bool | None = None,
                   max_bytes: int = MAX_PACKED_BYTES, batch_hint: int = BATCH_HINT) -> Iterator[int]:
    """Runs the plain fp32 CPU ``nn.Linear`` among ``modules`` on oneDNN-packed weights.

    Args:
        modules: candidate modules (others are ignored), e.g. a model's MLP projections.
        enabled: ``None`` follows ``EDIT_RUNTIME_PACKED_LINEAR`` (default on); ``False`` packs
            nothing.
        max_bytes: pack nothing when the packed copies would take more (they are released on
            exit).
        batch_hint: rows per call that the layout is tuned for.

    Yields:
        the number of modules packed (0 when packing is off, unavailable or over budget).
    """
    on = packing_enabled() if enabled is None else bool(enabled)
    todo = list(dict.fromkeys(m for m in modules if _packable(m))) if on else []
    size = sum(m.weight.numel() * m.weight.element_size() for m in todo)
    if todo and size > max_bytes:
        log.info("packed linears: %.1f GiB of packed weights exceed max_bytes (%.1f GiB); "
                 "running the plain forward", size / 2**30, max_bytes / 2**30)
        todo = []
    if todo and not packed_linear_available():
        todo = []
    done: list[nn.Module] = []
    try:
        with torch.no_grad():
            for m in todo:
                packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), batch_hint)
                m.forward = _packed_forward(m, packed)
                done.append(m)
        yield len(done)
    finally:
        for m in done:
            m.__dict__.pop("forward", None)
