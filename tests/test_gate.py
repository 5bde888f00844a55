"""Probe-gated edits (edit_runtime.gate): the probe fit, the per-sequence gate inside the prefill,
checks that refuse a gate before anything is hooked, the gate file, and the real SmolLM2."""
from __future__ import annotations

import pytest
import torch

from delta_helpers import random_delta
from edit_runtime.delta import ModuleEdit, SparseDelta
from edit_runtime.gate import (GatedDelta, GateError, ProbeGate, attach_gate, check_gate, fit_mapped_gate,
                               fit_probe_gate, last_token_hidden, threshold_at_most)
from edit_runtime.patch import PatchError, patch_model
from tiny_models import HIDDEN, make_tiny_model, tiny_input_ids

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EDIT_LAYER, GATE_LAYER = 2, 0


@pytest.fixture
def model():
    return make_tiny_model("llama", num_layers=3)


def _hidden(model, ids, attn=None, layer=GATE_LAYER):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states[layer + 1]


def _logits(model, ids, attn=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=attn).logits


def _splitting_gate(model, ids, attn=None, on=(0, 2)):
    """A gate scoring +1 on the rows ``on`` and -1 on the others (least squares through the
    rows' last hidden states, which are linearly independent), threshold 0."""
    last = _hidden(model, ids, attn)[:, -1].double()
    target = torch.tensor([1.0 if i in on else -1.0 for i in range(len(last))], dtype=torch.float64)
    w = torch.linalg.pinv(last) @ target
    return ProbeGate(GATE_LAYER, w.float(), 0.0, 0.0)


def test_probe_fit_is_the_logistic_optimum():
    """Against a float64 reference: the gradient of the class-balanced, L2 objective vanishes at
    the fitted (unfolded) parameters, and the folded gate scores raw inputs as the standardised
    probe would."""
    g = torch.Generator().manual_seed(0)
    d = 12
    shift = torch.randn(d, generator=g)
    harmful = torch.randn(40, d, generator=g) * 2 + shift + 5.0
    harmless = torch.randn(25, d, generator=g) * 2 + 5.0
    l2 = 0.05
    gate = fit_probe_gate(harmful, harmless, layer=3, l2=l2)
    X = torch.cat([harmful, harmless]).double()
    mu, sd = X.mean(0), X.std(0) + 1e-6
    w_std = gate.weight.double() * sd                   # unfold
    b_std = gate.bias + float(mu @ gate.weight.double())
    w = w_std.clone().requires_grad_(True)
    b = torch.tensor(b_std, dtype=torch.float64, requires_grad=True)
    Z = (X - mu) / sd
    y = torch.cat([torch.ones(40), torch.zeros(25)]).double()
    sw = torch.where(y > 0, 0.5 / 40, 0.5 / 25).double()
    loss = (sw * torch.nn.functional.binary_cross_entropy_with_logits(Z @ w + b, y, reduction="none")).sum()
    loss = loss + l2 * (w @ w) / 2
    gw, gb = torch.autograd.grad(loss, [w, b])
    assert float(gw.abs().max()) < 1e-4 and abs(float(gb)) < 1e-4
    # folded scores equal the standardised probe's (float32 weight, so fp32 tolerance)
    torch.testing.assert_close(gate.score(X.float()).double(), Z @ w_std + b_std, rtol=1e-4, atol=1e-3)
    # and it separates these two clouds better than chance
    assert float((gate.score(harmful) > 0).float().mean()) > 0.7
    assert float((gate.score(harmless) <= 0).float().mean()) > 0.7
    assert gate.layer == 3 and gate.metadata["n_harmful"] == 40


def test_gated_rows_are_the_edited_or_the_base_model(model):
    ids = tiny_input_ids(batch=4, length=6)
    base = _logits(model, ids)
    gate = _splitting_gate(model, ids, on=(0, 2))
    handle = patch_model(model, random_delta(model, EDIT_LAYER, magnitude=1.0))
    edited = _logits(model, ids)
    assert not torch.allclose(edited, base, atol=1e-4), "the random edit must change the logits"
    with attach_gate(handle, gate) as gh:
        gated = _logits(model, ids)
        assert gh.last_mask.tolist() == [True, False, True, False]
    torch.testing.assert_close(gated[[0, 2]], edited[[0, 2]], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gated[[1, 3]], base[[1, 3]], rtol=1e-6, atol=1e-6)
    # detached: the row mask is cleared, every row edited again
    assert handle.row_mask is None
    torch.testing.assert_close(_logits(model, ids), edited, rtol=1e-6, atol=1e-6)
    handle.remove()


def test_gate_reads_the_last_real_token_under_left_padding_and_holds_for_decode(model):
    ids = tiny_input_ids(batch=3, length=7, seed=5)
    attn = torch.ones_like(ids)
    attn[1, :3] = 0                                   # row 1 left-padded: 4 real tokens
    ids[1, :3] = 0
    gate = _splitting_gate(model, ids, attn, on=(1,))
    handle = patch_model(model, random_delta(model, EDIT_LAYER, magnitude=1.0))

    def greedy(rows, edit_on):
        with (handle.enabled_ctx() if edit_on else handle.disabled()):
            return model.generate(input_ids=ids[rows], attention_mask=attn[rows], max_new_tokens=6,
                                  do_sample=False, pad_token_id=0)

    want = [greedy([0], False), greedy([1], True), greedy([2], False)]
    with attach_gate(handle, gate) as gh:
        got = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert gh.last_mask.tolist() == [False, True, False]
    for row in range(3):
        assert got[row, -6:].tolist() == want[row][0, -6:].tolist()
    handle.remove()


def test_one_token_prompts_are_decided_and_a_smaller_batch_follows(model):
    """A one-token prompt is a prefill too (its cache is empty): the gate decides it, and a new
    batch of another size does not inherit the previous forward's mask."""
    handle = patch_model(model, random_delta(model, EDIT_LAYER, magnitude=1.0))
    wide = tiny_input_ids(batch=3, length=5, seed=2)
    single = tiny_input_ids(batch=2, length=1, seed=4)
    gate = _splitting_gate(model, single, on=(1,))

    def greedy(ids, rows, edit_on):
        with (handle.enabled_ctx() if edit_on else handle.disabled()):
            return model.generate(input_ids=ids[rows], attention_mask=torch.ones_like(ids[rows]), max_new_tokens=5,
                                  do_sample=False, pad_token_id=0)

    want = [greedy(single, [0], False), greedy(single, [1], True)]
    with attach_gate(handle, gate) as gh:
        model.generate(input_ids=wide, attention_mask=torch.ones_like(wide), max_new_tokens=3, do_sample=False,
                       pad_token_id=0)
        assert len(gh.last_mask) == 3
        got = model.generate(input_ids=single, attention_mask=torch.ones_like(single), max_new_tokens=5,
                             do_sample=False, pad_token_id=0)
        assert gh.last_mask.tolist() == [False, True]
    for row in range(2):
        assert got[row].tolist() == want[row][0].tolist()
    handle.remove()


def test_allowed_rows_are_anded_with_the_decision(model):
    """GateHandle.allowed (the server's "this request asked for the edit") limits the probe's
    decision: a row is edited only if both hold; a wrong-sized mask is refused."""
    ids = tiny_input_ids(batch=4, length=6)
    base = _logits(model, ids)
    gate = _splitting_gate(model, ids, on=(0, 2))
    handle = patch_model(model, random_delta(model, EDIT_LAYER, magnitude=1.0))
    edited = _logits(model, ids)
    with attach_gate(handle, gate) as gh:
        gh.allowed = [True, True, False, False]
        gated = _logits(model, ids)
        assert gh.last_mask.tolist() == [True, False, False, False]
        assert gh.last_scores[2] > 0, "row 2's probe fires; only allowed keeps the edit off"
        gh.allowed = [True]
        with pytest.raises(GateError, match="allowed has shape"):
            _logits(model, ids)
    torch.testing.assert_close(gated[0], edited[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gated[1:], base[1:], rtol=1e-6, atol=1e-6)
    handle.remove()


def test_gated_delta_checks_without_hooking(model, tmp_path):
    delta = random_delta(model, EDIT_LAYER)
    GatedDelta(delta, ProbeGate(GATE_LAYER, torch.randn(HIDDEN), 0.0)).check(model)
    with pytest.raises(GateError, match="must come before every edited layer"):
        GatedDelta(delta, ProbeGate(EDIT_LAYER, torch.randn(HIDDEN), 0.0)).check(model)
    with pytest.raises(GateError, match="hidden size"):
        check_gate(model, [e.module for e in delta.edits], ProbeGate(GATE_LAYER, torch.randn(8), 0.0))
    with pytest.raises(GateError, match="touches no module"):
        check_gate(model, [], ProbeGate(GATE_LAYER, torch.randn(HIDDEN), 0.0))
    with pytest.raises(TypeError, match="must be a ProbeGate"):
        GatedDelta(delta, "gate.safetensors")
    with pytest.raises(TypeError, match="must be a SparseDelta"):
        GatedDelta(None, ProbeGate(GATE_LAYER, torch.randn(HIDDEN), 0.0))
    # load() reads both files
    delta.save(tmp_path / "d.safetensors")
    ProbeGate(GATE_LAYER, torch.randn(HIDDEN), 0.0, threshold=0.5).save(tmp_path / "g.safetensors")
    both = GatedDelta.load(tmp_path / "d.safetensors", tmp_path / "g.safetensors")
    assert both.gate.threshold == 0.5 and [e.module for e in both.delta.edits] == [e.module for e in delta.edits]
    assert not model._forward_pre_hooks and not any(layer._forward_hooks for layer in model.model.layers)


def test_bad_gates_are_refused_and_nothing_is_hooked(model):
    ids = tiny_input_ids(batch=2)
    handle = patch_model(model, random_delta(model, EDIT_LAYER))
    edited = _logits(model, ids)
    good = ProbeGate(GATE_LAYER, torch.randn(HIDDEN), 0.0)
    with pytest.raises(GateError, match="must come before every edited layer"):
        attach_gate(handle, ProbeGate(EDIT_LAYER, torch.randn(HIDDEN), 0.0))
    with pytest.raises(GateError, match="hidden size 8, the model has 64"):
        attach_gate(handle, ProbeGate(GATE_LAYER, torch.randn(8), 0.0))
    with pytest.raises(GateError, match="does not exist"):
        attach_gate(handle, ProbeGate(7, torch.randn(HIDDEN), 0.0))
    with pytest.raises(GateError, match="NaN"):
        ProbeGate(GATE_LAYER, torch.tensor([1.0, float("nan")]), 0.0)
    with pytest.raises(GateError, match="finite"):
        ProbeGate(GATE_LAYER, torch.randn(HIDDEN), float("inf"))
    with pytest.raises(GateError, match="non-negative"):
        ProbeGate(-1, torch.randn(HIDDEN), 0.0)
    handle.merge()
    with pytest.raises(GateError, match="merged"):
        attach_gate(handle, good)
    handle.unmerge()
    # nothing hooked, no row mask: the model runs as the plain patched model
    assert handle.row_mask is None
    assert not model._forward_pre_hooks and not any(layer._forward_hooks for layer in model.model.layers)
    torch.testing.assert_close(_logits(model, ids), edited, rtol=1e-6, atol=1e-6)
    handle.remove()
    with pytest.raises(GateError, match="removed"):
        attach_gate(handle, good)


def test_a_second_gate_is_refused_and_the_first_keeps_deciding(model):
    """One gate per handle: two would overwrite each other's row mask. The handle records its
    gate as the row mask's owner until the gate is removed, then takes another."""
    ids = tiny_input_ids(batch=4, length=6)
    handle = patch_model(model, random_delta(model, EDIT_LAYER, magnitude=1.0))
    first = _splitting_gate(model, ids, on=(0, 2))
    with attach_gate(handle, first) as gh:
        assert handle.row_mask_owner is gh
        hooks = (len(model._forward_pre_hooks), len(model.model.layers[GATE_LAYER]._forward_hooks))
        with pytest.raises(GateError, match="already has a gate attached"):
            attach_gate(handle, _splitting_gate(model, ids, on=(1,)))
        assert (len(model._forward_pre_hooks), len(model.model.layers[GATE_LAYER]._forward_hooks)) == hooks
        _logits(model, ids)
        assert gh.last_mask.tolist() == [True, False, True, False]
        # a mask written by hand would be overwritten by the gate in the next forward: refused
        for write in (lambda: handle.set_row_mask([True] * 4), handle.clear_row_mask,
                      lambda: handle.row_mask_ctx([True] * 4).__enter__()):
            with pytest.raises(PatchError, match="the attached gate .* decides it in every forward"):
                write()
        assert handle.row_mask.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert handle.row_mask_owner is None and handle.row_mask is None
    handle.set_row_mask([True, False, False, False])  # the gate removed: the handle's own again
    handle.clear_row_mask()
    with attach_gate(handle, _splitting_gate(model, ids, on=(1,))) as second:
        _logits(model, ids)
        assert second.last_mask.tolist() == [False, True, False, False]
    handle.remove()


def test_gate_file_round_trip_and_bad_files(tmp_path):
    gate = ProbeGate(4, torch.randn(HIDDEN), -0.25, 1.5, {"data": "unit test"})
    path = gate.save(tmp_path / "g.safetensors")
    back = ProbeGate.load(path)
    assert back.layer == 4 and back.bias == -0.25 and back.threshold == 1.5 and back.metadata == {"data": "unit test"}
    assert torch.equal(back.weight, gate.weight)
    assert back.with_threshold(0.0).threshold == 0.0 and back.threshold == 1.5
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(GateError, match="not a readable probe gate file"):
        ProbeGate.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file
    save_file({"weight": torch.randn(3)}, str(tmp_path / "other.safetensors"), metadata={"format": "x"})
    with pytest.raises(GateError, match="not a probe gate file"):
        ProbeGate.load(tmp_path / "other.safetensors")
    with pytest.raises(GateError, match="no gate file"):
        ProbeGate.load(tmp_path / "missing.safetensors")
    with pytest.raises(GateError, match="at least 2 prompts"):
        fit_probe_gate(torch.randn(1, 4), torch.randn(5, 4), layer=0)


def test_mapped_gate_is_on_for_the_mapped_languages_harmful_prompts(smollm2):
    """fit_mapped_gate on the real SmolLM2: the probe is fitted on the mapped languages' harmful
    prompts against everything else, and the threshold is the (k+1)-th highest validation score
    of the other class, k = floor(gate_on * n): at most that fraction of them is on."""
    from edit_runtime.data import first_ids, load_prompts

    model, tok = smollm2
    langs, mapped, layer = ["en", "zh", "fr"], ["zh"], 6

    def prompts(split, n):
        return (first_ids(load_prompts("builtin:harmful", langs=langs, split=split), n)
                + first_ids(load_prompts("builtin:harmless", langs=langs, split=split), n))

    train, val = prompts("train", 8), prompts("validation", 5)
    gate = fit_mapped_gate(model, tok, train, val, mapped, layer=layer, gate_on=0.1, progress=False)
    assert gate.layer == layer
    assert gate.metadata["for"] == {"label": "harmful", "langs": ["zh"]}
    assert gate.metadata["n_train"] == {"for": 8, "other": 40}           # zh harmful vs the rest
    is_for = torch.tensor([p.label == "harmful" and p.lang == "zh" for p in val])
    scores = gate.score(last_token_hidden(model, tok, [p.text for p in val], [layer])[layer]).double()
    others = scores[~is_for].sort(descending=True).values
    k = int(0.1 * len(others))                                            # 25 others: 2 may be on
    assert gate.threshold == pytest.approx(float(others[k]), abs=1e-4)
    assert int((scores[~is_for] > gate.threshold).sum()) <= k
    assert gate.metadata["validation_on"]["other"] == pytest.approx(k / len(others), abs=1e-6)
    assert gate.metadata["validation_n"] == {"for": 5, "other": 25}
    with pytest.raises(GateError, match="gate_on must be a fraction"):
        fit_mapped_gate(model, tok, train, val, mapped, layer=layer, gate_on=1.0)
    with pytest.raises(GateError, match="validation prompts must hold both"):
        fit_mapped_gate(model, tok, train, [p for p in val if p.lang != "zh"], mapped, layer=layer, gate_on=0.1)


def test_threshold_at_most_puts_at_most_the_rate_above_it():
    g = torch.Generator().manual_seed(1)
    for n in (1, 7, 28, 236):
        scores = torch.randn(n, generator=g)
        for rate in (0.0, 0.03, 0.1, 0.5, 0.99):
            t = threshold_at_most(scores, rate)
            k = int(rate * n)
            assert int((scores > t).sum()) == min(k, n - 1)        # distinct scores: exactly k above
            assert t in scores.tolist()
    tied = torch.tensor([1.0, 1.0, 1.0, 0.0])
    assert int((tied > threshold_at_most(tied, 0.5)).sum()) == 0   # ties: fewer, never more
    with pytest.raises(GateError, match="rate"):
        threshold_at_most(scores, 1.0)
    with pytest.raises(GateError, match="no scores"):
        threshold_at_most(torch.zeros(0), 0.1)


@pytest.mark.slow
def test_real_smollm2_gate_fitted_on_prompts(smollm2):
    """On the real SmolLM2: features from last_token_hidden equal the unpadded forward's, a gate
    fitted on built-in harmful vs harmless prompts separates held-out ones, and a gated batch
    generates exactly what the base or the edited model generates for each row."""
    from edit_runtime.data import load_prompts
    from edit_runtime.capture import encode_prompts

    model, tok = smollm2
    def texts(source, split, n):
        return [p.text for p in load_prompts(source, langs=["en", "fr"], split=split)][:n]

    # 32 harmful / 64 harmless train prompts, 38 / 38 held out (en and fr test ids)
    harmful, harmless = texts("builtin:harmful", "train", 32), texts("builtin:harmless", "train", 64)
    held_harmful, held_harmless = texts("builtin:harmful", "test", 38), texts("builtin:harmless", "test", 38)
    layer = 6
    feats_h = last_token_hidden(model, tok, harmful, [layer])[layer]
    feats_s = last_token_hidden(model, tok, harmless, [layer])[layer]
    # padding-free reference for one prompt: the layer's output read by a temporary hook (not
    # output_hidden_states: transformers then leaves capture hooks on the shared model)
    seq = torch.tensor([encode_prompts(tok, [harmful[3]])[0]])
    seen = []
    hook = model.model.layers[layer].register_forward_hook(
        lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out)[0, -1].clone()))
    try:
        with torch.no_grad():
            model(input_ids=seq)
    finally:
        hook.remove()
    ref = seen[0]
    torch.testing.assert_close(feats_h[3], ref, rtol=1e-4, atol=1e-4)
    gate = fit_probe_gate(feats_h, feats_s, layer=layer)
    held_h = last_token_hidden(model, tok, held_harmful, [layer])[layer]
    held_s = last_token_hidden(model, tok, held_harmless, [layer])[layer]
    acc = (float((gate.score(held_h) > 0).float().mean()) + float((gate.score(held_s) <= 0).float().mean())) / 2
    # SmolLM2 never refuses, yet its residual separates the two sets well above chance (0.5;
    # one standard error at 38 + 38 prompts is about 0.06); measured 0.79
    assert acc >= 0.7, f"held-out balanced accuracy {acc:.2f}"

    enc = encode_prompts(tok, held_harmful[:2] + held_harmless[:2])
    T = max(map(len, enc))
    ids = torch.full((4, T), tok.pad_token_id or 0, dtype=torch.long)
    attn = torch.zeros((4, T), dtype=torch.long)
    for i, s in enumerate(enc):
        ids[i, T - len(s):] = torch.tensor(s)
        attn[i, T - len(s):] = 1
    handle = patch_model(model, random_delta(model, 20, m=64, r=4, magnitude=2.0))
    try:
        with handle.disabled():
            base = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=8, do_sample=False)
        edited = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=8, do_sample=False)
        with attach_gate(handle, gate) as gh:
            gated = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=8, do_sample=False)
            decided = gh.last_mask.tolist()
        assert len(decided) == 4
        for row, on in enumerate(decided):
            assert gated[row].tolist() == (edited if on else base)[row].tolist()
    finally:
        handle.remove()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "a hook was left behind"


@pytest.mark.slow
def test_cli_gate_fits_reports_and_picks_the_threshold(smollm2, tmp_path, capsys):
    """``edit-runtime gate`` on the real SmolLM2: the written gate is the probe fitted on the train
    prompts' features (refitted here from last_token_hidden), its threshold turns the edit on for
    the asked fraction of the validation harmless prompts, and bad input fails before the model
    loads."""
    from edit_runtime.cli import main
    from edit_runtime.data import load_prompts

    model, tok = smollm2
    out = tmp_path / "gate.safetensors"
    args = ["gate", "--model", "smollm2-135m-instruct", "--layer", "6", "--harmful", "builtin:harmful",
            "--harmless", "builtin:harmless", "--langs", "en,fr", "--limit", "24", "--harmless-on", "0.25",
            "--no-progress", "--threads", "1", "-o", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| builtin:harmful | harmful |" in printed and "(chosen)" in printed
    gate = ProbeGate.load(out)

    def feats(source, label, split):
        ps = [p for p in load_prompts(source, split=split, label=label) if p.lang in ("en", "fr")]
        keep = set(sorted({p.id for p in ps})[:24])
        return last_token_hidden(model, tok, [p.text for p in ps if p.id in keep], [6])[6]

    train_h, train_s = feats("builtin:harmful", "harmful", "train"), feats("builtin:harmless", "harmless", "train")
    assert gate.layer == 6 and gate.metadata["harmful"] == {"builtin:harmful": len(train_h)}
    assert gate.metadata["harmless"] == {"builtin:harmless": len(train_s)} == {"builtin:harmless": 48}
    ref = fit_probe_gate(train_h, train_s, 6)
    torch.testing.assert_close(gate.weight, ref.weight, rtol=1e-4, atol=1e-5)
    val_s = gate.score(feats("builtin:harmless", "harmless", "validation"))
    on = float((val_s > gate.threshold).float().mean())
    assert abs(on - 0.25) <= 1.0 / len(val_s) + 1e-9, on
    val_h = gate.score(feats("builtin:harmful", "harmful", "validation"))
    assert gate.metadata["validation_on"] == {"harmless:builtin:harmless": pytest.approx(on),
                                              "harmful:builtin:harmful": pytest.approx(
                                                  float((val_h > gate.threshold).float().mean()))}
    # bad input: a source without those languages, before any model load
    assert main(["gate", "--model", "no-such-model", "--layer", "6", "--harmful", "advbench", "--harmless",
                 "builtin:harmless", "--langs", "zh", "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "--harmful advbench: no train prompts in languages ['zh']" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_gate_mapped_langs_is_the_demo_gate(smollm2, tmp_path, capsys):
    """``edit-runtime gate --mapped-langs zh --others-on R`` writes the gate fit_mapped_gate fits on
    the same train and validation prompts; its option errors come before the model loads."""
    from edit_runtime.cli import main
    from edit_runtime.data import first_ids, load_prompts

    model, tok = smollm2
    out = tmp_path / "mapped.safetensors"
    assert main(["gate", "--model", "smollm2-135m-instruct", "--layer", "6", "--harmful", "builtin:harmful",
                 "--harmless", "builtin:harmless", "--langs", "en,zh,fr", "--limit", "6", "--mapped-langs", "zh",
                 "--others-on", "0.1", "--no-progress", "--threads", "1", "-o", str(out)]) == 0
    gate = ProbeGate.load(out)

    def split(name):
        return [p for src, label in (("builtin:harmful", "harmful"), ("builtin:harmless", "harmless"))
                for p in first_ids(load_prompts(src, langs=["en", "zh", "fr"], split=name, label=label), 6)]

    ref = fit_mapped_gate(model, tok, split("train"), split("validation"), ["zh"], layer=6, gate_on=0.1,
                          progress=False)
    torch.testing.assert_close(gate.weight, ref.weight, rtol=1e-4, atol=1e-5)
    assert gate.threshold == pytest.approx(ref.threshold, abs=1e-4)
    assert gate.metadata["for"] == {"label": "harmful", "langs": ["zh"]}
    # the report counts the two classes the gate was fitted on, and shows each source's validation
    # prompts the gate is for apart from the others, whose rate the threshold bounds
    train = split("train")
    n_for = sum(p.label == "harmful" and p.lang == "zh" for p in train)
    printed = capsys.readouterr().out
    assert f"fitted on {n_for} prompts it is for (harmful, zh) + {len(train) - n_for} others" in printed
    assert gate.metadata["fitted"] == {"for": n_for, "other": len(train) - n_for}
    on = gate.metadata["validation_on"]
    assert set(on) == {"harmful, gate is for:builtin:harmful", "harmful, other:builtin:harmful",
                       "harmless, other:builtin:harmless"}
    assert "| builtin:harmful | harmful, gate is for |" in printed
    others = [p for p in split("validation") if not (p.label == "harmful" and p.lang == "zh")]
    n_harmful_other = sum(p.label == "harmful" for p in others)
    rate = (on["harmful, other:builtin:harmful"] * n_harmful_other
            + on["harmless, other:builtin:harmless"] * (len(others) - n_harmful_other)) / len(others)
    assert rate == pytest.approx(ref.metadata["validation_on"]["other"], abs=1e-6) and rate <= 0.1
    for extra, message in ((["--others-on", "0.1"], "--others-on goes with --mapped-langs"),
                           (["--mapped-langs", "zh"], "--mapped-langs needs --others-on RATE or --threshold T"),
                           (["--mapped-langs", "zh", "--harmless-on", "0.1"], "with --mapped-langs use --others-on"),
                           (["--mapped-langs", "ko", "--threshold", "0"], "no harmful train prompt")):
        assert main(["gate", "--model", "no-such-model", "--layer", "6", "--harmful", "builtin:harmful",
                     "--harmless", "builtin:harmless", "-o", str(tmp_path / "x.safetensors"), *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_gate_repr_is_short():
    """A gate's repr names its layer, size, bias and threshold, not d_model weight values."""
    gate = ProbeGate(16, torch.randn(896), 0.25, 1.0)
    assert repr(gate) == "ProbeGate(layer=16, d_model=896, bias=0.25, threshold=1)"
    edit = ModuleEdit("model.layers.20.mlp.up_proj", "out", torch.tensor([0]), U=torch.randn(1, 1),
                      V=torch.randn(1, 4))
    assert len(repr(GatedDelta(SparseDelta([edit]), gate))) < 200
