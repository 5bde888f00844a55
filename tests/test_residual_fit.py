"""residual_fit.py on the real SmolLM2 model: statistics against an unbatched float64 reference,
the solve against the dense ridge solution, the patched model against the solver's fit."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from edit_runtime import SparseDelta, patch_model
from edit_runtime.arch import find_decoder_layers, find_mlp
from edit_runtime.capture import encode_prompts
from edit_runtime.cli import main as cli_main
from edit_runtime.data import load_prompts
from edit_runtime.patch import patched_modules
from edit_runtime.residual_fit import (
    ResidualFitConfig,
    ResidualStats,
    anchor_refused_ids,
    collect_residual_stats,
    collect_residual_stats_layers,
    fit_residual,
    fit_residual_layers,
    prefetch_residual_stats,
    residual_problem,
)

LAYER = 15
LANGS = ["en", "zh", "vi"]


def _prompts(n_ids: int = 4):
    harm = load_prompts("builtin:harmful", langs=LANGS, split="train")
    keep = set(sorted({p.id for p in harm})[:n_ids])
    safe = load_prompts("builtin:harmless", langs=LANGS, split="train")
    keep_safe = set(sorted({p.id for p in safe})[:n_ids])
    return [p for p in harm if p.id in keep], [p for p in safe if p.id in keep_safe]


@torch.no_grad()
def _reference(model, tok, prompts, layer):
    """Each prompt alone (no padding): last-token h, r and Σ h hᵀ over the other positions."""
    info = find_mlp(model, layer)
    block = find_decoder_layers(model)[1][info.layer]
    got = {}
    hooks = [model.get_submodule(info.down).register_forward_pre_hook(lambda m, a: got.__setitem__("h", a[0])),
             block.register_forward_hook(lambda m, a, o: got.__setitem__("r", o[0] if isinstance(o, tuple) else o))]
    H, R, keep = [], [], 0
    try:
        for seq in encode_prompts(tok, [p.text for p in prompts]):
            model(input_ids=torch.tensor([seq]))
            h, r = got["h"][0].double(), got["r"][0].double()
            H.append(h[-1])
            R.append(r[-1])
            keep = keep + h[:-1].T @ h[:-1]
    finally:
        for hk in hooks:
            hk.remove()
    return torch.stack(H), torch.stack(R), keep


def _delta_w(delta: SparseDelta) -> torch.Tensor:
    """The edit in paper layout ``(d_ff, d_model)`` float64."""
    (edit,) = delta.edits
    return (edit.U.double() @ edit.V.double()).T


def test_statistics_match_an_unbatched_reference(smollm2):
    model, tok = smollm2
    harm, safe = _prompts(3)
    prompts = [*harm, *safe]
    stats = collect_residual_stats(model, tok, prompts, LAYER, batch_size=4, progress=False)
    H, R, keep = _reference(model, tok, prompts, LAYER)
    info = find_mlp(model, LAYER)
    assert stats.h_last.shape == (len(prompts), info.d_ff) and stats.r_last.shape == (len(prompts), info.d_model)
    assert stats.keys == [(p.id, p.lang, p.label) for p in prompts]
    torch.testing.assert_close(stats.h_last, H, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats.r_last, R, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(stats.keep_xtx, keep, rtol=1e-4, atol=1e-2 * float(keep.abs().max()) * 1e-3)
    n_tokens = sum(len(s) for s in encode_prompts(tok, [p.text for p in prompts]))
    assert stats.keep_count == n_tokens - len(prompts)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "a hook was left behind"


@pytest.mark.parametrize("variant", [
    {},
    {"hold_langs": ["vi"], "hold_weight": 5.0},
    {"harmless_target": "self"},
    {"harmless_lang_weights": {"vi": 7.0}},
    {"harmless_hold_ids": "first two harmless ids"},
], ids=["map-harmless-to-english", "hold-vi", "harmless-self", "harmless-weight-per-language",
        "harmless-ids-held"])
def test_full_rank_solve_is_the_dense_ridge_solution(smollm2, variant):
    """At full rank the solver's ΔW is (A + γC + λI)⁻¹B with A, B, C built here row by row:
    mapped rows add to A and B, held rows (a held language, or harmless rows with target
    'self' or an id of harmless_hold_ids) only to A, English last tokens to C."""
    model, tok = smollm2
    harm, safe = _prompts()
    info = find_mlp(model, LAYER)
    if "harmless_hold_ids" in variant:
        variant = {"harmless_hold_ids": sorted({p.id for p in safe})[:2]}
    low = [l for l in ("zh", "vi") if l not in variant.get("hold_langs", [])]
    cfg = ResidualFitConfig(layer=LAYER, low_langs=low, rank=info.d_model, gamma=2.0, harmless_weight=3.0,
                            **variant)
    res = fit_residual(model, tok, harm, safe, cfg, progress=False)
    (edit,) = res.delta.edits
    assert edit.module == info.down and edit.side == "out" and torch.equal(edit.neurons, torch.arange(info.d_model))
    assert res.delta.metadata["method"] == "residual-closed-form"
    assert res.delta.metadata["languages"]["hold"] == cfg.hold_langs

    prompts = [*harm, *safe]
    H, R, keep = _reference(model, tok, prompts, LAYER)
    row = {(p.id, p.lang, p.label): i for i, p in enumerate(prompts)}
    A = torch.zeros(info.d_ff, info.d_ff, dtype=torch.float64)
    B = torch.zeros(info.d_ff, info.d_model, dtype=torch.float64)
    C = keep.clone()
    for i, p in enumerate(prompts):
        en = row.get((p.id, "en", p.label))
        hh = torch.outer(H[i], H[i])
        if p.lang == "en":
            C += hh
        elif p.lang in cfg.hold_langs:
            A += cfg.hold_weight * hh
        elif p.label == "harmless" and (cfg.harmless_target == "self" or p.id in cfg.harmless_hold_ids):
            A += cfg.harmless_lang_weights.get(p.lang, cfg.harmless_weight) * hh
        elif en is not None:
            w = 1.0 if p.label == "harmful" else cfg.harmless_lang_weights.get(p.lang, cfg.harmless_weight)
            A += w * hh
            B += w * torch.outer(H[i], R[en] - R[i])
    Q = A + cfg.gamma * C
    lam = cfg.lam_rel * float(torch.diagonal(Q).sum()) / info.d_ff
    expected = torch.linalg.solve(Q + lam * torch.eye(info.d_ff, dtype=torch.float64), B)
    got = _delta_w(res.delta)
    assert float((got - expected).norm() / expected.norm()) < 2e-3


def test_patched_model_closes_the_gap_the_solver_reports(smollm2):
    """With the delta on, layer L's last-token output is r + hΔW, and the fit term it leaves is
    (1 - gap_closed)·‖D‖² of the solve; English last tokens (the keep set) barely move."""
    model, tok = smollm2
    harm, safe = _prompts()
    cfg = ResidualFitConfig(layer=LAYER, low_langs=["zh", "vi"], rank=8)
    res = fit_residual(model, tok, harm, safe, cfg, progress=False)
    prompts = [*harm, *safe]
    stats = collect_residual_stats(model, tok, prompts, LAYER, progress=False)
    prob = residual_problem(stats, cfg)
    with patch_model(model, res.delta):
        after = collect_residual_stats(model, tok, prompts, LAYER, progress=False)
    assert not patched_modules(model)
    dW = _delta_w(res.delta)
    torch.testing.assert_close(after.r_last, stats.r_last + stats.h_last @ dW, rtol=1e-4, atol=2e-3)

    row = {k: i for i, k in enumerate(stats.keys)}
    fit_term, gap, harm_gaps = 0.0, 0.0, []
    for i, (pid, lang, label) in enumerate(stats.keys):
        en = row.get((pid, "en", label))
        if lang == "en" or en is None:
            continue
        w = 1.0 if label == "harmful" else cfg.harmless_weight
        fit_term += w * float(((stats.r_last[en] - after.r_last[i]) ** 2).sum())  # target: unedited anchor
        gap += w * float(((stats.r_last[en] - stats.r_last[i]) ** 2).sum())
        if label == "harmful":
            harm_gaps.append(float((stats.r_last[en] - stats.r_last[i]).norm()))
    assert gap == pytest.approx(prob["dtd"], rel=1e-6)
    gap_closed = res.layers[0].gap_closed_train
    assert 0.3 < gap_closed < 1.0
    assert fit_term == pytest.approx((1 - gap_closed) * gap, rel=1e-2)
    en = torch.tensor([row[k] for k in stats.keys if k[1] == "en"])
    moved = (stats.h_last[en] @ dW).norm(dim=1).mean()
    assert float(moved) < 0.25 * sum(harm_gaps) / len(harm_gaps)


def test_statistics_cache_is_reused(smollm2, tmp_path, monkeypatch):
    model, tok = smollm2
    harm, safe = _prompts(2)
    cfg = ResidualFitConfig(layer=LAYER, low_langs=["zh"], rank=4, cache_dir=str(tmp_path))
    first = fit_residual(model, tok, harm, safe, cfg, progress=False)
    (path,) = tmp_path.glob("residual_L15_*.safetensors")
    stats, meta = ResidualStats.load(path)
    assert meta["layer"] == LAYER and stats.h_last.dtype == torch.float64

    def no_forward(*a, **k):
        raise AssertionError("statistics were captured again instead of read from the cache")

    monkeypatch.setattr("edit_runtime.residual_fit.collect_residual_stats", no_forward)
    again = fit_residual(model, tok, harm, safe, cfg, progress=False)
    assert torch.equal(first.delta.edits[0].U, again.delta.edits[0].U)
    # the same texts under another chat template are other token ids: another key, a new capture
    monkeypatch.setattr(tok, "chat_template", "{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}A:")
    with pytest.raises(AssertionError, match="captured again"):
        fit_residual(model, tok, harm, safe, cfg, progress=False)
    monkeypatch.undo()
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(Exception):
        fit_residual(model, tok, harm, safe, cfg, progress=False)


def test_several_layers_in_one_pass_match_one_layer_each(smollm2):
    model, tok = smollm2
    harm, safe = _prompts(2)
    prompts = [*harm, *safe]
    both = collect_residual_stats_layers(model, tok, prompts, [LAYER - 3, LAYER], batch_size=4, progress=False)
    assert sorted(both) == [LAYER - 3, LAYER]
    for layer, got in both.items():
        alone = collect_residual_stats(model, tok, prompts, layer, batch_size=4, progress=False)
        assert got.layer == layer and got.keys == alone.keys and got.keep_count == alone.keep_count
        for name in ("h_last", "r_last", "keep_xtx"):
            torch.testing.assert_close(getattr(got, name), getattr(alone, name), rtol=1e-6, atol=1e-6)
    assert not torch.equal(both[LAYER].r_last, both[LAYER - 3].r_last)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "a hook was left behind"
    with pytest.raises(ValueError, match="no layers"):
        collect_residual_stats_layers(model, tok, prompts, [], progress=False)


def test_prefetch_fills_the_cache_the_fits_read(smollm2, tmp_path, monkeypatch):
    model, tok = smollm2
    harm, safe = _prompts(2)
    cfgs = [ResidualFitConfig(layer=l, low_langs=["zh"], rank=4, cache_dir=str(tmp_path)) for l in (LAYER - 2, LAYER)]
    calls = []
    real = collect_residual_stats_layers

    def counting(*a, **k):
        calls.append(list(a[3]))
        return real(*a, **k)

    monkeypatch.setattr("edit_runtime.residual_fit.collect_residual_stats_layers", counting)
    written = prefetch_residual_stats(model, tok, harm, safe, cfgs, progress=False)
    assert calls == [[LAYER - 2, LAYER]] and len(written) == 2     # one pass for both layers
    assert prefetch_residual_stats(model, tok, harm, safe, cfgs, progress=False) == [] and len(calls) == 1

    def no_forward(*a, **k):
        raise AssertionError("statistics were captured again instead of read from the cache")

    monkeypatch.setattr("edit_runtime.residual_fit.collect_residual_stats", no_forward)
    cached = fit_residual(model, tok, harm, safe, cfgs[0], progress=False)
    monkeypatch.undo()
    fresh = fit_residual(model, tok, harm, safe, dataclasses.replace(cfgs[0], cache_dir=None), progress=False)
    torch.testing.assert_close(cached.delta.edits[0].U, fresh.delta.edits[0].U, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="no cache_dir"):
        prefetch_residual_stats(model, tok, harm, safe, [dataclasses.replace(cfgs[0], cache_dir=None)])


def test_composed_layers_fit_each_layer_on_the_edited_model(smollm2, tmp_path):
    """Layer B of a composed fit is the single-layer fit of B on the model with A's edit on; A's
    is the single-layer fit of A; the model is left unpatched and B's cache is keyed by A's edit."""
    model, tok = smollm2
    harm, safe = _prompts(2)
    a, b = (ResidualFitConfig(layer=l, low_langs=["zh", "vi"], rank=4, cache_dir=str(tmp_path))
            for l in (LAYER - 2, LAYER))
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    res = fit_residual_layers(model, tok, harm, safe, [b, a], progress=False)   # any order: fitted by layer
    assert not patched_modules(model)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    assert res.delta.metadata["layers"] == [LAYER - 2, LAYER] and res.delta.metadata["composed"]
    ea, eb = res.delta.edits
    assert (ea.module, eb.module) == (find_mlp(model, LAYER - 2).down, find_mlp(model, LAYER).down)
    alone_a = fit_residual(model, tok, harm, safe, dataclasses.replace(a, cache_dir=None), progress=False)
    torch.testing.assert_close(ea.U, alone_a.delta.edits[0].U, rtol=1e-4, atol=1e-6)
    with patch_model(model, alone_a.delta):
        on_a = fit_residual(model, tok, harm, safe, dataclasses.replace(b, cache_dir=None), progress=False)
    torch.testing.assert_close(_delta_w(SparseDelta(edits=[eb])), _delta_w(on_a.delta), rtol=1e-3, atol=1e-6)
    alone_b = fit_residual(model, tok, harm, safe, dataclasses.replace(b, cache_dir=None), progress=False)
    assert float((_delta_w(alone_b.delta) - _delta_w(on_a.delta)).norm()) > 1e-3 * float(_delta_w(on_a.delta).norm())
    assert len(list(tmp_path.glob(f"residual_L{LAYER}_*.safetensors"))) == 1
    fit_residual(model, tok, harm, safe, b, progress=False)        # unedited model: another key
    assert len(list(tmp_path.glob(f"residual_L{LAYER}_*.safetensors"))) == 2
    with patch_model(model, res.delta):                            # the composed delta applies as one
        assert len(patched_modules(model)) == 2
    with pytest.raises(ValueError, match="repeat a layer"):
        fit_residual_layers(model, tok, harm, safe, [a, a], progress=False)
    with pytest.raises(ValueError, match="no layer configs"):
        fit_residual_layers(model, tok, harm, safe, [], progress=False)


class _RefusesSome:
    """A judge that calls the replies to chosen prompt texts refusals (SmolLM2 never refuses)."""

    def __init__(self, refused_texts):
        self.refused, self.seen = set(refused_texts), []

    def min_new_tokens_for(self, lang):
        return 4

    def judge_batch(self, prompts, responses, langs):
        from edit_runtime.judge import Verdict

        self.seen += list(zip(prompts, langs))
        return [Verdict("refusal", "refusal_phrase") if p in self.refused else Verdict("compliance", "no_refusal")
                for p in prompts]


def test_anchor_refused_ids_reads_the_anchor_replies_only(smollm2, tmp_path):
    model, tok = smollm2
    _, safe = _prompts(3)
    en = [p for p in safe if p.lang == "en"]
    judge = _RefusesSome([en[1].text])
    weight = model.get_submodule(find_mlp(model, LAYER).down).weight.detach().clone()
    path = tmp_path / "en.jsonl"
    assert anchor_refused_ids(model, tok, safe, judge=judge, progress=False, responses_path=path) == [en[1].id]
    assert sorted(judge.seen) == sorted((p.text, "en") for p in en)        # only English replies judged
    assert len(path.read_text().splitlines()) == len(en)                     # and cached
    assert anchor_refused_ids(model, tok, safe, anchor_lang="zh", judge=_RefusesSome([]), progress=False) == []
    with pytest.raises(ValueError, match="no harmless prompt in the anchor language 'ko'"):
        anchor_refused_ids(model, tok, safe, anchor_lang="ko", judge=judge, progress=False)
    assert torch.equal(model.get_submodule(find_mlp(model, LAYER).down).weight, weight)


def test_bad_input_is_refused_and_the_model_is_untouched(smollm2):
    model, tok = smollm2
    harm, safe = _prompts(2)
    weight = model.get_submodule(find_mlp(model, LAYER).down).weight.detach().clone()
    with pytest.raises(ValueError, match="also among low_langs"):
        ResidualFitConfig(layer=LAYER, low_langs=["en", "zh"])
    with pytest.raises(ValueError, match="low_langs is empty"):
        ResidualFitConfig(layer=LAYER, low_langs=[])
    with pytest.raises(ValueError, match="harmless_weight"):
        ResidualFitConfig(layer=LAYER, low_langs=["zh"], harmless_weight=float("nan"))
    with pytest.raises(ValueError, match=r"harmless_lang_weights\['zh'\] must be >= 0"):
        ResidualFitConfig(layer=LAYER, low_langs=["zh"], harmless_lang_weights={"zh": -1})
    with pytest.raises(ValueError, match="the anchor 'en' has no harmless rows"):
        ResidualFitConfig(layer=LAYER, low_langs=["zh"], harmless_lang_weights={"en": 2})
    with pytest.raises(ValueError, match=r"\['vi'\] are in both low_langs and hold_langs"):
        ResidualFitConfig(layer=LAYER, low_langs=["zh", "vi"], hold_langs=["vi"])
    with pytest.raises(ValueError, match="hold_weight"):
        ResidualFitConfig(layer=LAYER, low_langs=["zh"], hold_langs=["vi"], hold_weight=-1.0)
    with pytest.raises(ValueError, match="harmless_target must be one of"):
        ResidualFitConfig(layer=LAYER, low_langs=["zh"], harmless_target="english")
    with pytest.raises(ValueError, match=r"no harmful prompts in \['th'\]"):
        fit_residual(model, tok, harm, safe, ResidualFitConfig(layer=LAYER, low_langs=["th"]), progress=False)
    with pytest.raises(ValueError, match=r"hold_langs \['ko'\] have no prompts"):
        fit_residual(model, tok, harm, safe, ResidualFitConfig(layer=LAYER, low_langs=["zh"], hold_langs=["ko"]),
                     progress=False)
    with pytest.raises(TypeError, match="not one string"):
        ResidualFitConfig(layer=LAYER, low_langs=["zh"], harmless_hold_ids="b001")
    with pytest.raises(ValueError, match=r"harmless_hold_ids \['nope'\] \(1 in all\) match no harmless prompt"):
        fit_residual(model, tok, harm, safe, ResidualFitConfig(layer=LAYER, low_langs=["zh"],
                                                               harmless_hold_ids=["nope"]), progress=False)
    shifted = [p.__class__(**{**p.__dict__, "id": p.id + "-x"}) if p.lang == "zh" else p for p in harm]
    with pytest.raises(ValueError, match="parallel prompts"):
        fit_residual(model, tok, shifted, safe, ResidualFitConfig(layer=LAYER, low_langs=["zh"]), progress=False)
    with pytest.raises(Exception, match="out of range"):
        fit_residual(model, tok, harm, safe, ResidualFitConfig(layer=99, low_langs=["zh"]), progress=False)
    assert torch.equal(model.get_submodule(find_mlp(model, LAYER).down).weight, weight)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_cli_fit_method_residual(smollm2, tmp_path, capsys):
    out = tmp_path / "residual.safetensors"
    rc = cli_main(["fit", "--model", "smollm2-135m-instruct", "--method", "residual",
                   "--harmful", "builtin:harmful", "--harmful-langs", "zh", "--harmless", "builtin:harmless",
                   "--harmless-langs", "en,zh,vi", "--layer", str(LAYER), "--rank", "4", "--limit", "2",
                   "--harmless-weight", "2", "--harmless-lang-weights", "zh=3", "--hold-langs", "vi",
                   "--hold-weight", "8", "-o", str(out)])
    assert rc == 0
    delta = SparseDelta.load(out)
    assert delta.metadata["method"] == "residual-closed-form"
    cfg = delta.metadata["config"]
    assert cfg["harmless_weight"] == 2.0 and cfg["layer"] == LAYER and cfg["hold_langs"] == ["vi"]
    assert cfg["hold_weight"] == 8.0 and delta.metadata["languages"]["low"] == ["zh"]
    assert cfg["harmless_lang_weights"] == {"zh": 3.0}
    # vi's harmful prompts were read (held rows), 2 ids each of en, zh, vi; vi's harmless rows are held too
    assert delta.metadata["data"]["n_harmful"] == 6 and delta.metadata["data"]["held_language_rows"] == 4
    model, _ = smollm2
    with patch_model(model, delta) as handle:
        assert handle is not None and patched_modules(model)
    assert "gap closed train" in capsys.readouterr().out
    # several layers compose into one delta
    two = tmp_path / "two.safetensors"
    assert cli_main(["fit", "--model", "smollm2-135m-instruct", "--method", "residual", "--harmful",
                     "builtin:harmful", "--harmful-langs", "zh", "--harmless", "builtin:harmless", "--limit", "2",
                     "--rank", "4", "--layer", "15,14", "-o", str(two)]) == 0
    composed = SparseDelta.load(two)
    assert composed.metadata["layers"] == [14, 15] and len(composed.edits) == 2
    assert [c["layer"] for c in composed.metadata["config"]["layers"]] == [14, 15]
    for bad, message in ((["--heldout"], "--heldout"), (["--hold-langs", "zh"], "both low_langs and hold_langs"),
                         (["--layer", "15,15"], "repeats a layer"), (["--mode", "separate"], "--mode separate"),
                         (["--harmless-lang-weights", "zh:3"], "is not LANG=WEIGHT"),
                         (["--harmless-lang-weights", "zh=-1"], "must be >= 0"),
                         (["--method", "swe", "--hold-langs", "vi"], "option\\(s\\) of --method residual"),
                         (["--method", "swe", "--harmless-weight", "4"], "--harmless-weight: option"),
                         (["--method", "swe", "--harmless-target", "self"], "--harmless-target: option")):
        with pytest.raises(SystemExit, match=message):
            cli_main(["fit", "--model", "smollm2-135m-instruct", "--method", "residual", "--harmful",
                      "builtin:harmful", "--harmful-langs", "zh", "--harmless", "builtin:harmless",
                      "--layer", str(LAYER), "-o", str(tmp_path / "bad.safetensors"), *bad])
    assert not (tmp_path / "bad.safetensors").exists()


def test_residual_delta_exports_to_peft_exactly(smollm2, tmp_path):
    """A residual delta (every row of one down_proj) is a plain LoRA: PEFT's logits equal patch_model's."""
    peft = pytest.importorskip("peft", reason="peft is in requirements/dev.txt; without it there is nothing to load")
    from edit_runtime.export import export_peft

    model, tok = smollm2
    harm, safe = _prompts(2)
    delta = fit_residual(model, tok, harm, safe, ResidualFitConfig(layer=LAYER, low_langs=["zh"], rank=4),
                         progress=False).delta
    out = export_peft(delta, model, tmp_path / "adapter")
    ids = torch.tensor([encode_prompts(tok, ["Comment faire du pain ?"])[0]])
    with torch.no_grad():
        base = model(ids).logits
        with patch_model(model, delta):
            patched = model(ids).logits
        # on a copy, as in test_export: PEFT wraps the modules of the model it is given
        via_peft = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(out)).eval()(ids).logits
    assert float((patched - base).abs().max()) > 1e-3, "the edit should move the logits"
    torch.testing.assert_close(via_peft, patched, rtol=1e-5, atol=1e-4)
    assert not patched_modules(model)
