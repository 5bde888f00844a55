"""The main job (``python -m edit_runtime.demo``) end to end on the small model, and its option
checks. The full demo on Qwen is the README's first command, not a CI step."""
from __future__ import annotations

import json

import pytest

from edit_runtime import SparseDelta, demo
from edit_runtime.gate import ProbeGate


def _run(tmp_path, *extra):
    out = tmp_path / "demo"
    rc = demo.run(["--model", "smollm2-135m-instruct", "--quick", "--langs", "en,zh,bn,sw", "--layer", "20",
                   "--rank", "4", "--threads", "2", "-o", str(out), *extra])
    return rc, out


@pytest.mark.parametrize("extra", [[], ["--method", "swe", "--no-gate"],
                                   ["--hold-langs", "bn", "--harmless-lang-weights", "zh=3"]],
                         ids=["default-residual-gated", "swe-ungated", "residual-hold-bn"])
def test_demo_quick_runs_end_to_end(smollm2, tmp_path, capsys, extra):
    rc, out = _run(tmp_path, *extra)
    assert rc == 0
    printed = capsys.readouterr().out
    assert "refusal rate per language, base -> edited" in printed
    res = json.loads((out / "results.json").read_text("utf-8"))
    for variant in ("base", "edited"):
        langs = res["variants"][variant]["per_lang"]
        assert set(langs) == {"en", "zh", "bn", "sw"}
        assert all(v["n"] == 4 for v in langs.values())
    delta = SparseDelta.load(out / "delta.safetensors")
    described = res["config"]["variants"]["edited"]
    if "--method" in extra:
        assert delta.metadata["method"] != "residual-closed-form"
        assert not (out / "gate.safetensors").exists() and "gate" not in described
        return
    assert delta.metadata["method"] == "residual-closed-form"
    if extra:
        assert delta.metadata["languages"]["hold"] == ["bn"] and delta.metadata["languages"]["low"] == ["zh", "sw"]
        assert delta.metadata["config"]["harmless_lang_weights"] == {"zh": 3.0}
    else:  # the default holds bn and sw (DEFAULT_HOLD in --langs): zh alone is mapped
        assert delta.metadata["languages"]["hold"] == ["bn", "sw"] and delta.metadata["languages"]["low"] == ["zh"]
    assert delta.metadata["data"]["held_language_rows"] > 0
    # the gate: on for the mapped languages' harmful prompts, read before the edited layer, and
    # its threshold puts 3 % of the other validation prompts above it
    gate = ProbeGate.load(out / "gate.safetensors")
    assert gate.layer == 16 and described["gate"]["layer"] == 16
    assert gate.metadata["for"] == {"label": "harmful", "langs": delta.metadata["languages"]["low"]}
    assert gate.metadata["validation_on"]["other"] <= 0.03 + 1e-9
    assert described["gate"]["threshold"] == pytest.approx(gate.threshold)
    assert "fitting the probe gate on layer 16" in printed
    assert (out / "results.md").is_file()


@pytest.mark.parametrize("extra,msg", [
    (["--method", "swe", "--hold-langs", "bn"], "option(s) of --method residual"),
    (["--method", "swe", "--hold-weight", "4"], "--hold-weight: option(s) of --method residual"),
    (["--method", "swe", "--harmless-weight", "0"], "--harmless-weight: option(s) of --method residual"),
    (["--hold-langs", "ko"], "must be among the non-anchor"),
    (["--hold-langs", "zh,bn,sw"], "no language left to map onto en"),
    (["--method", "swe", "--harmless-lang-weights", "th=16"], "--harmless-lang-weights: option(s) of --method residual"),
    (["--harmless-lang-weights", "th:16"], "is not LANG=WEIGHT"),
    (["--gate-layer", "20"], "--gate-layer 20 must be a layer before the edited --layer 20"),
    (["--gate-on", "0"], "--gate-on 0.0 must be a fraction in (0, 1)"),
    (["--no-gate", "--gate-layer", "12"], "--gate-layer: option(s) of the gate, and --no-gate turns it off"),
])
def test_demo_refuses_bad_options_before_loading(tmp_path, capsys, extra, msg):
    with pytest.raises(SystemExit) as e:
        _run(tmp_path, *extra)
    assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "demo" / "delta.safetensors").exists()
