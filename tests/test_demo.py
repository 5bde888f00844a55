"""The main job (``python -m edit_runtime.demo``) end to end on the small model, and its option
checks. The full demo on Qwen is the README's first command, not a CI step."""
from __future__ import annotations

import json

import pytest

from edit_runtime import SparseDelta, demo


def _run(tmp_path, *extra):
    out = tmp_path / "demo"
    rc = demo.run(["--model", "smollm2-135m-instruct", "--quick", "--langs", "en,zh,bn,sw", "--layer", "20",
                   "--rank", "4", "--threads", "2", "-o", str(out), *extra])
    return rc, out


@pytest.mark.parametrize("extra", [[], ["--method", "residual", "--hold-langs", "bn", "--harmless-lang-weights", "zh=3"]],
                         ids=["swe", "residual-hold"])
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
    if extra:
        assert delta.metadata["languages"]["hold"] == ["bn"]
        assert delta.metadata["languages"]["low"] == ["zh", "sw"]
        assert delta.metadata["data"]["held_language_rows"] > 0
        assert delta.metadata["config"]["harmless_lang_weights"] == {"zh": 3.0}
    assert (out / "results.md").is_file()


@pytest.mark.parametrize("extra,msg", [
    (["--hold-langs", "bn"], "option(s) of --method residual"),
    (["--hold-weight", "4"], "--hold-weight: option(s) of --method residual"),
    (["--harmless-weight", "0"], "--harmless-weight: option(s) of --method residual"),  # 0 is given too
    (["--method", "residual", "--hold-langs", "ko"], "must be among the non-anchor"),
    (["--harmless-lang-weights", "th=16"], "--harmless-lang-weights: option(s) of --method residual"),
    (["--method", "residual", "--harmless-lang-weights", "th:16"], "is not LANG=WEIGHT"),
])
def test_demo_refuses_bad_options_before_loading(tmp_path, capsys, extra, msg):
    with pytest.raises(SystemExit) as e:
        _run(tmp_path, *extra)
    assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "demo" / "delta.safetensors").exists()
