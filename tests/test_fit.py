"""fit.py end to end on the real SmolLM2 model with a few built-in prompts (kept small: CPU)."""
from __future__ import annotations

import pytest
import torch

from edit_runtime import SparseDelta, patch_model
from edit_runtime.arch import find_mlp
from edit_runtime.capture import encode_prompts
from edit_runtime.cli import main as cli_main
from edit_runtime.data import load_prompts
from edit_runtime.fit import FitConfig, fit

LANGS = ["en", "zh", "vi"]
LOW = ["zh", "vi"]


def _prompts(n_ids: int = 5):
    harm = load_prompts("builtin:harmful", langs=LANGS, split="train")
    ids = sorted({p.id for p in harm})[:n_ids]
    harm = [p for p in harm if p.id in ids]
    safe = load_prompts("builtin:harmless", langs=LANGS, split="train")
    safe_ids = sorted({p.id for p in safe})[:n_ids]
    return harm, [p for p in safe if p.id in safe_ids]


@torch.no_grad()
def _mlp_io(model, tok, texts, layer):
    """Explicit last-token MLP input x (N, d) and up_proj output (N, d_ff) of ``layer``."""
    info = find_mlp(model, layer)
    mlp, up = model.get_submodule(info.path), model.get_submodule(info.up)
    got = {}
    h1 = mlp.register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0][:, -1].double()))
    h2 = up.register_forward_hook(lambda m, a, o: got.__setitem__("up", o[:, -1].double()))
    xs, ups = [], []
    try:
        for seq in encode_prompts(tok, texts):
            model(input_ids=torch.tensor([seq]))
            xs.append(got["x"])
            ups.append(got["up"])
    finally:
        h1.remove()
        h2.remove()
    return torch.cat(xs), torch.cat(ups)


def test_fit_closes_the_gap_it_reports(smollm2):
    """The delta's effect on the real model equals the solver's training gap closed."""
    model, tok = smollm2
    harm, safe = _prompts()
    layer = 12
    res = fit(model, tok, harm, safe, FitConfig(layers=[layer], low_langs=LOW, rank=4), progress=False)
    (edit,) = res.delta.edits
    assert edit.module == find_mlp(model, layer).up and edit.side == "out"
    S = res.neurons[layer]
    assert torch.equal(edit.neurons, S) and edit.rank == 4
    assert res.delta.fingerprint and res.delta.metadata["layers"] == [layer]

    by = {(p.id, p.lang): p.text for p in harm}
    ids = sorted({p.id for p in harm})
    _, y_en = _mlp_io(model, tok, [by[(i, "en")] for i in ids], layer)
    before, after = 0.0, 0.0
    for lang in LOW:
        x, y = _mlp_io(model, tok, [by[(i, lang)] for i in ids], layer)
        with patch_model(model, res.delta):
            _, y_edit = _mlp_io(model, tok, [by[(i, lang)] for i in ids], layer)
        target = y_en[:, S]
        before += float((target - y[:, S]).square().sum())
        after += float((target - y_edit[:, S]).square().sum())
        # the edited pre-activation is exactly x (W_S + ΔW_S): the patch applies the solved factors
        dW = (edit.U.double() @ edit.V.double()).T  # (d, m) paper layout
        torch.testing.assert_close(y_edit[:, S], y[:, S] + x @ dW, rtol=1e-4, atol=1e-4)
    gap = 1.0 - after / before
    assert 0.0 < gap <= 1.0
    assert abs(gap - res.layers[0].gap_closed_train) < 1e-3
    # remove() left the model as it was
    assert not any(type(m).__name__ == "EditedLinear" for m in model.modules())


def test_joint_layers_compose(smollm2):
    """Joint mode: the second layer is fitted on the model with the first layer's edit applied.

    With gamma = 0 the harmless statistics drop out of the problem, so fitting layer 14 alone on
    a model already patched with the joint delta's layer-8 edit must give the same edit."""
    model, tok = smollm2
    harm, safe = _prompts(4)
    cfg = dict(low_langs=LOW, rank=2, gamma=0.0)
    joint = fit(model, tok, harm, safe, FitConfig(layers=[14, 8], **cfg), progress=False)
    assert [e.module for e in joint.delta.edits] == [find_mlp(model, 8).up, find_mlp(model, 14).up]
    neurons = {14: joint.neurons[14]}
    with patch_model(model, SparseDelta([joint.delta.edits[0]])):
        alone = fit(model, tok, harm, safe, FitConfig(layers=[14], **cfg), neurons=neurons, progress=False)
    torch.testing.assert_close(alone.delta.edits[0].dense_rows(), joint.delta.edits[1].dense_rows(),
                               rtol=1e-3, atol=1e-6)
    # and the composition matters: fitted on the unedited model, layer 14's edit differs
    plain = fit(model, tok, harm, safe, FitConfig(layers=[14], **cfg), neurons=neurons, progress=False)
    assert not torch.allclose(plain.delta.edits[0].dense_rows(), joint.delta.edits[1].dense_rows(),
                              rtol=1e-3, atol=1e-6)


def test_cli_fit_writes_a_delta_that_patches(smollm2, tmp_path, capsys):
    model, _ = smollm2
    out = tmp_path / "delta.safetensors"
    rc = cli_main(["fit", "--model", "smollm2-135m-instruct", "--harmful", "builtin:harmful",
                   "--harmful-langs", "zh,vi", "--harmless", "builtin:harmless", "--harmless-langs",
                   "en,zh,vi", "--layer", "10", "--rank", "2", "--limit", "4", "-o", str(out)])
    assert rc == 0 and out.exists()
    assert "layer 10" in capsys.readouterr().out
    delta = SparseDelta.load(out)
    assert delta.metadata["config"]["low_langs"] == ["zh", "vi"]
    with patch_model(model, delta) as handle:
        assert handle.modules == [find_mlp(model, 10).up]
    # --strength saves the same fit scaled (the statistics and the solve are deterministic)
    half = tmp_path / "half.safetensors"
    assert cli_main(["fit", "--model", "smollm2-135m-instruct", "--harmful", "builtin:harmful",
                     "--harmful-langs", "zh,vi", "--harmless", "builtin:harmless", "--harmless-langs",
                     "en,zh,vi", "--layer", "10", "--rank", "2", "--limit", "4", "--strength", "0.5",
                     "-o", str(half)]) == 0
    assert "at strength 0.5" in capsys.readouterr().out
    scaled = SparseDelta.load(half)
    assert scaled.metadata["strength"] == 0.5
    torch.testing.assert_close(scaled.edits[0].dense_rows(), 0.5 * delta.edits[0].dense_rows(),
                               rtol=1e-6, atol=1e-9)
    with pytest.raises(SystemExit):
        cli_main(["fit", "--model", "smollm2-135m-instruct", "--harmful", "builtin:harmful",
                  "--harmful-langs", "zh", "--harmless", "builtin:harmless", "--layer", "10",
                  "--strength", "-1", "-o", str(tmp_path / "bad.safetensors")])
    assert not (tmp_path / "bad.safetensors").exists()


def test_single_pass_fit_equals_two_passes(smollm2):
    """The default fit forwards every prompt once (full XᵀY sliced to S); the two-pass fit
    (``one_pass=False``) finds the same neurons and the same edit up to fp32 rounding."""
    model, tok = smollm2
    harm, safe = _prompts(4)
    cfg = dict(layers=[12], low_langs=LOW, rank=4)
    one = fit(model, tok, harm, safe, FitConfig(**cfg), progress=False)
    two = fit(model, tok, harm, safe, FitConfig(one_pass=False, **cfg), progress=False)
    assert one.delta.metadata["single_pass_layers"] == [12]
    assert two.delta.metadata["single_pass_layers"] == []
    assert "pass1_harmful" in one.seconds and "pass1_harmful" not in two.seconds
    assert torch.equal(one.neurons[12], two.neurons[12])
    a, b = one.delta.edits[0].dense_rows(), two.delta.edits[0].dense_rows()
    assert float((a - b).norm() / b.norm()) < 1e-3
    assert abs(one.layers[0].gap_closed_train - two.layers[0].gap_closed_train) < 1e-4
    # the heldout report takes pass 2 on the held-out ids (neurons known by then)
    held = load_prompts("builtin:harmful", langs=LANGS, split="validation")
    held = [p for p in held if p.id in sorted({p.id for p in held})[:2]]
    res = fit(model, tok, harm, safe, FitConfig(**cfg), heldout=held, progress=False)
    assert res.layers[0].gap_closed_heldout is not None


def test_one_pass_layers_policy(smollm2):
    from edit_runtime.capture import full_xty_bytes
    from edit_runtime.fit import one_pass_layers

    model, _ = smollm2
    per_layer = full_xty_bytes(model, 8, 3)
    assert per_layer == 3 * 576 * 1536 * 8
    base = dict(layers=[8, 10, 12], low_langs=LOW)
    assert one_pass_layers(model, FitConfig(**base), 3) == [8]  # joint: the first layer only
    assert one_pass_layers(model, FitConfig(mode="separate", **base), 3) == [8, 10, 12]
    small = FitConfig(mode="separate", one_pass_max_bytes=2 * per_layer, **base)
    assert one_pass_layers(model, small, 3) == [8, 10]  # size-based default
    assert one_pass_layers(model, FitConfig(one_pass_max_bytes=0, **base), 3) == []
    assert one_pass_layers(model, FitConfig(one_pass_max_bytes=0, **base), 3, neurons_given=True) == [8]
    assert one_pass_layers(model, FitConfig(one_pass=True, one_pass_max_bytes=0, **base), 3) == [8]
    assert one_pass_layers(model, FitConfig(one_pass=False, **base), 3, neurons_given=True) == []
