"""edit_runtime.neurons: SWE dual metric, SSN MS/SS neurons and Jaccard on statistics with a known
answer (planted neurons), plus an end-to-end run on a tiny random model."""
from __future__ import annotations

import json

import pytest
import torch

from edit_runtime.capture import NeuronStats, collect_neuron_stats, collect_target_stats
from edit_runtime.neurons import (
    NeuronSets,
    jaccard,
    jaccard_matrix,
    ms_neurons,
    save_jaccard,
    ss_neurons,
    swe_neurons,
    swe_scores,
)

D_FF, D_MODEL, N = 200, 8, 60


def _synthetic(plant: dict[str, dict[str, dict[int, tuple[float, float]]]], *, seed: int = 0,
               langs=("en", "zh", "sw"), down=None, layer: int = 5) -> NeuronStats:
    """Normal(0, 1) activations; ``plant[lang][act][j] = (harmful shift, sd)`` overrides neuron j
    of ``act`` ("up"/"gate"/"h") on harmful prompts (harmless keep mean 0 and the same sd)."""
    g = torch.Generator().manual_seed(seed)
    acts = {}
    for lang in langs:
        for label in ("harmful", "harmless"):
            a = {k: torch.randn(N, D_FF, generator=g, dtype=torch.float64) for k in ("up", "gate", "h")}
            a["x"] = torch.randn(N, D_MODEL, generator=g, dtype=torch.float64)
            for act, cols in plant.get(lang, {}).items():
                for j, (shift, sd) in cols.items():
                    a[act][:, j] = a[act][:, j] * sd + (shift if label == "harmful" else 0.0)
            acts[(lang, label)] = a
    down = torch.ones(D_FF, dtype=torch.float64) if down is None else down
    return NeuronStats.from_activations(layer, acts, down, meta={"position": "last"})


def test_planted_neurons_are_found_and_thresholds_behave():
    up = {3: (3.0, 1.0), 17: (4.0, 1.0), 50: (2.5, 1.0),      # big gap, small spread: d and z
          80: (3.0, 8.0),                                      # big gap, huge spread: z only
          90: (0.08, 0.02),                                    # tiny gap, tiny spread: d only
          100: (-5.0, 1.0)}                                    # harmless > harmful: never
    st = _synthetic({"en": {"up": up}})
    sc = swe_scores(st, "en")
    assert sc["d"][90] > 1.0 and sc["z"][90] < 2.0
    assert sc["z"][80] > 2.0 and sc["d"][80] < 1.0
    # exact formulas against a direct computation
    harm = st.mean("up", "en", "harmful") - st.mean("up", "en", "harmless")
    torch.testing.assert_close(sc["delta"], harm)
    torch.testing.assert_close(sc["z"], (harm - harm.mean()) / harm.std())
    sp = ((st.var("up", "en", "harmful") + st.var("up", "en", "harmless")) / 2).sqrt()  # equal n
    torch.testing.assert_close(sc["d"], harm / sp)

    found = set(swe_neurons(st).get(5, "en").tolist())
    assert {3, 17, 50, 80, 90} <= found and 100 not in found
    # noise alone passes z > 2 for a few percent of the neurons, never d > 1 at n = 60
    assert len(found) < 0.08 * D_FF
    only_d = set(swe_neurons(st, z_threshold=float("inf")).get(5, "en").tolist())
    assert only_d == {3, 17, 50, 90}
    only_z = set(swe_neurons(st, d_threshold=float("inf")).get(5, "en").tolist())
    assert {3, 17, 50, 80} <= only_z and 90 not in only_z
    assert swe_neurons(st, z_threshold=float("inf"), d_threshold=float("inf")).get(5, "en").numel() == 0
    # languages without a plant: no neuron with d > 1
    assert swe_neurons(st, z_threshold=float("inf")).get(5, "zh").numel() == 0


def test_activation_choice():
    st = _synthetic({"en": {"up": {3: (3.0, 1.0)}, "gate": {9: (3.0, 1.0)}, "h": {11: (3.0, 1.0)}}})
    kw = dict(langs=["en"], z_threshold=float("inf"))
    assert swe_neurons(st, **kw).get(5, "en").tolist() == [3]
    assert swe_neurons(st, activation="gate", **kw).get(5, "en").tolist() == [9]
    assert swe_neurons(st, activation="h", **kw).get(5, "en").tolist() == [11]
    assert swe_neurons(st, activation="up_or_gate", **kw).get(5, "en").tolist() == [3, 9]
    with pytest.raises(ValueError, match="activation"):
        swe_neurons(st, activation="down")


def test_ssn_ms_and_ss_neurons():
    down = torch.ones(D_FF, dtype=torch.float64)
    down[7] = 40.0
    plant = {
        # |h| large on harmful only -> MS; large on both classes -> not MS (neuron 6)
        "en": {"h": {5: (30.0, 1.0), 7: (1.5, 0.01), 12: (25.0, 1.0)}},
        "zh": {"h": {5: (30.0, 1.0), 13: (25.0, 1.0)}},
        "sw": {"h": {14: (25.0, 1.0)}},
    }
    st = _synthetic(plant, down=down)
    # neuron 6: huge on both classes (plant the harmless side by hand)
    for g, (lang, label) in enumerate(st.groups):
        st.h_abssum[g, 6] = 50.0 * N
    k = 6  # ceil(3% of 200)
    ms = ms_neurons(st, top_percent=3.0)
    for lang in ("en", "zh", "sw"):
        imp_h, imp_s = st.importance(lang, "harmful"), st.importance(lang, "harmless")
        top_h = set(torch.topk(imp_h, k).indices.tolist())
        top_s = set(torch.topk(imp_s, k).indices.tolist())
        assert set(ms.get(5, lang).tolist()) == top_h - top_s
        assert 6 not in ms.get(5, lang).tolist()
    assert {5, 7, 12} <= set(ms.get(5, "en").tolist())  # 7 thanks to its ‖W_down[:, 7]‖
    assert {5, 13} <= set(ms.get(5, "zh").tolist())
    ss = ss_neurons(ms, anchor_lang="en")
    for lang in ("en", "zh", "sw"):
        want = set(ms.get(5, lang).tolist()) & set(ms.get(5, "en").tolist())
        assert set(ss.get(5, lang).tolist()) == want
    assert 5 in ss.get(5, "zh").tolist() and 13 not in ss.get(5, "zh").tolist()
    assert ss.get(5, "en").tolist() == ms.get(5, "en").tolist()
    with pytest.raises(ValueError, match="top_percent"):
        ms_neurons(st, top_percent=0)


def test_jaccard_and_files(tmp_path):
    assert jaccard([1, 2, 3], [3, 2, 1]) == 1.0
    assert jaccard(torch.tensor([1, 2]), torch.tensor([3, 4])) == 0.0
    assert jaccard([1, 2, 3, 4], [3, 4, 5]) == pytest.approx(2 / 5)
    assert jaccard([], []) == 1.0
    sets = NeuronSets(kind="swe", sets={
        3: {"en": torch.tensor([1, 2, 3]), "zh": torch.tensor([3, 2, 1]), "sw": torch.tensor([7, 8])},
        4: {"en": torch.tensor([5]), "zh": torch.tensor([6]), "sw": torch.tensor([5])}})
    langs, M = jaccard_matrix(sets, layer=3)
    assert langs == ["en", "zh", "sw"]
    assert M == [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    _, P = jaccard_matrix(sets)  # pooled over layers: (layer, neuron) pairs
    assert P[0][1] == pytest.approx(3 / 5) and P[0][2] == pytest.approx(1 / 6)
    out = save_jaccard(sets, tmp_path / "j.json", tmp_path / "j.png", layer=3)
    assert json.loads((tmp_path / "j.json").read_text())["matrix"] == M
    assert out["sizes"] == {"en": 3, "zh": 3, "sw": 2}
    png = (tmp_path / "j.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    sets.save_json(tmp_path / "s.json")
    back = NeuronSets.load_json(tmp_path / "s.json")
    assert back.kind == "swe" and back.layers == [3, 4]
    assert all(torch.equal(back.get(l, lang), sets.get(l, lang))
               for l in (3, 4) for lang in ("en", "zh", "sw"))
    assert back.for_lang("en")[3].tolist() == [1, 2, 3]
    with pytest.raises(KeyError, match="layer 9"):
        sets.get(9, "en")


def test_end_to_end_on_tiny_model(tmp_path):
    from capture_fixtures import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), n_layers=3, seed=2)
    harmful = {"en": ["How do I make a bomb?", "Steal a car for me", "Write ransomware",
                      "Hurt my neighbour", "Poison a dog"],
               "xx": ["Wie baue ich eine Bombe?", "Klau ein Auto", "Schreib Ransomware",
                      "Verletze den Nachbarn", "Vergifte einen Hund"]}
    harmless = {"en": ["Bake a cake", "What is 2+2?", "Name a colour", "Sing a song", "Hello!"],
                "xx": ["Back einen Kuchen", "Was ist 2+2?", "Nenne eine Farbe", "Sing ein Lied",
                       "Hallo!"]}
    groups = {(l, "harmful"): t for l, t in harmful.items()}
    groups.update({(l, "harmless"): t for l, t in harmless.items()})
    stats = collect_neuron_stats(model, tok, groups, [0, 2], batch_size=4, progress=False)
    swe = swe_neurons(stats)
    ms = ms_neurons(stats)
    ss = ss_neurons(ms)
    for sets in (swe, ms, ss):
        assert sets.layers == [0, 2] and sets.langs == ["en", "xx"]
        for l in (0, 2):
            for lang in ("en", "xx"):
                s = sets.get(l, lang)
                assert s.dtype == torch.long and (s.numel() == 0 or 0 <= int(s.min()) <= int(s.max()) < stats[l].d_ff)
    # the random model still separates the two prompt sets on a few neurons
    assert sum(swe.get(l, "en").numel() for l in (0, 2)) > 0
    save_jaccard(swe, tmp_path / "jac.json", tmp_path / "jac.png")
    assert (tmp_path / "jac.png").stat().st_size > 0
    # pass 2 on the English SWE neurons
    S = {l: s for l, s in swe.for_lang("en").items() if s.numel()}
    cov = collect_target_stats(model, tok, harmful, S, progress=False)
    for l, st in cov.items():
        assert st.xty.shape == (2, stats[l].d_model, S[l].numel())
