"""patch_model on the two wheel-shipped models (SmolLM2-135M, Llama; Qwen2.5-Coder-0.5B, Qwen2):
a random delta on a middle layer's up_proj (side out) and down_proj (side in) gives the densely
edited model's logits, removal is bit-exact, greedy generate() reacts and comes back, and a
mixed batch equals the separate runs. Short prompts and few new tokens keep it fast.

The fixtures (tests/conftest.py) are shared, session-scoped (model, tokenizer) pairs: every test
leaves the model exactly as it found it (patches removed, dense edits restored bit for bit).
"""
from __future__ import annotations

import pytest
import torch

from delta_helpers import dense_edited_inplace, random_delta
from edit_runtime.arch import find_decoder_layers, find_mlp
from edit_runtime.patch import patch_model, patched_modules

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def add(a, b):\n    return"]
REAL = dict(rtol=1e-4, atol=1e-4)  # fp32; logits are O(10), so this is ~1e-5 relative


@pytest.fixture(params=["smollm2", "qwen"])
def real(request):
    model, tok = request.getfixturevalue(request.param)
    assert not patched_modules(model)
    yield model, tok
    assert not patched_modules(model), "a test left a patch on the shared model"


def _ids(tok) -> torch.Tensor:
    """(2, L) token ids of PROMPTS cut to a common length, so a batch needs no padding."""
    rows = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    n = min(len(r) for r in rows)
    return torch.tensor([r[:n] for r in rows])


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _greedy(model, ids, n=4):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=model.generation_config.eos_token_id
                             if model.generation_config.pad_token_id is None else None)
    return out[:, ids.shape[1]:]


def _middle(model) -> int:
    return len(find_decoder_layers(model)[1]) // 2


def _storage_state(model) -> dict[str, tuple[int, int]]:
    """Per state_dict tensor: (data pointer, version counter). Equal before and after means the
    same tensors, never written in place (every in-place write bumps ``_version``)."""
    return {k: (v.data_ptr(), v._version) for k, v in model.state_dict().items()}


def test_patch_equals_dense_mixed_batch_and_remove_is_exact(real):
    model, tok = real
    ids = _ids(tok)
    layer = _middle(model)
    info = find_mlp(model, layer)
    assert not info.fused
    delta = random_delta(model, layer, m=32, r=4, magnitude=0.1, scale=True)
    assert [e.module for e in delta.edits] == [info.up, info.down]
    assert [e.side for e in delta.edits] == ["out", "in"]

    base = _logits(model, ids)
    with dense_edited_inplace(model, delta):
        want = _logits(model, ids)
    keys, storage = list(model.state_dict()), _storage_state(model)
    weights = {p: model.get_submodule(p).weight.detach().clone() for p in delta.modules}

    handle = patch_model(model, delta)
    try:
        got = _logits(model, ids)
        with handle.row_mask_ctx([True, False]):
            mixed = _logits(model, ids)
        on_alone = _logits(model, ids[0:1])
        with handle.disabled():
            off_alone = _logits(model, ids[1:2])
    finally:
        handle.remove()
    after = _logits(model, ids)

    # The runtime path equals the densely edited model.
    torch.testing.assert_close(got, want, **REAL)
    assert (got - base).abs().max() > 1e-2  # the edit is visible
    # A mixed batch: exactly the all-on / all-off rows of the same batch, and the separate runs.
    assert torch.equal(mixed[0], got[0]) and torch.equal(mixed[1], base[1])
    torch.testing.assert_close(mixed[0:1], on_alone, **REAL)
    torch.testing.assert_close(mixed[1:2], off_alone, **REAL)
    # remove(): bit-identical logits and state_dict (same tensors, unwritten, same values).
    assert torch.equal(after, base)
    assert list(model.state_dict()) == keys and _storage_state(model) == storage
    for p, w in weights.items():
        assert torch.equal(model.get_submodule(p).weight, w)


def test_generate_reacts_and_returns(real):
    model, tok = real
    ids = _ids(tok)
    delta = random_delta(model, _middle(model), m=256, r=8, magnitude=1.0, seed=3)
    base = _greedy(model, ids)
    handle = patch_model(model, delta)
    try:
        on = _greedy(model, ids)
        handle.set_row_mask([False, True])
        mixed = _greedy(model, ids)
        handle.clear_row_mask()
        with handle.disabled():
            off = _greedy(model, ids)
    finally:
        handle.remove()
    assert not torch.equal(on, base), "a large random edit should change greedy decoding"
    assert torch.equal(off, base)  # off: the original continuation again
    assert torch.equal(mixed[0], base[0]) and torch.equal(mixed[1], on[1])
