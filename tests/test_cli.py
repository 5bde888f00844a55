"""The ``edit-runtime`` command line itself: help text, --version, usage errors, ``models``.

Nothing here loads a model: every command exits before (help, usage errors) or never needs one.
"""
from __future__ import annotations

import argparse
import re
from importlib.metadata import version

import pytest

from edit_runtime import models
from edit_runtime.cli import build_parser, main
from edit_runtime.commands.argtypes import UsageExit, user_description

SMOL = "smollm2-135m-instruct"
RST = re.compile(r"``|:(?:mod|func|class|meth|attr|data|exc|obj):`")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _every_command() -> dict[str, argparse.ArgumentParser]:
    """``{"fit": parser, ..., "export peft": parser, ...}``: every sub-command, nested ones included."""
    out = {}
    for name, p in _subparsers(build_parser()).items():
        out[name] = p
        if any(isinstance(a, argparse._SubParsersAction) for a in p._actions):
            out.update({f"{name} {kind}": q for kind, q in _subparsers(p).items()})
    return out


COMMANDS = _every_command()


def test_every_command_is_covered():
    assert {"models", "neurons", "fit", "eval", "causal", "serve", "export", "gate", "export peft",
            "export merged"} <= set(COMMANDS)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_is_user_documentation(command, capsys):
    """--help prints no Sphinx/RST markup and no notes about the implementation's imports."""
    with pytest.raises(SystemExit) as e:
        main([*command.split(), "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: edit-runtime {command}")
    assert not RST.search(text), RST.search(text).group(0)
    assert "imported at module level" not in text and "Only argparse" not in text


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help(command):
    missing = [a.option_strings or a.dest for a in COMMANDS[command]._actions
               if not isinstance(a, argparse._SubParsersAction) and not (a.help or "").strip()]
    assert not missing, f"edit-runtime {command}: options without help: {missing}"


@pytest.mark.parametrize("command", ["fit", "neurons", "eval"])
def test_fit_neurons_eval_options_all_have_help(command):
    actions = [a for a in COMMANDS[command]._actions if a.option_strings]
    assert len(actions) > 10
    for a in actions:
        assert a.help and a.help.strip(), f"{command} {a.option_strings}: no help"


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    for shown in ("(default: 16)", "(default: soft)", "(default: up)", "(default: 2.0)", "(default: 8)"):
        assert shown in text
    assert "(default: None)" not in text and "(default: False)" not in text
    with pytest.raises(SystemExit):
        main(["neurons", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "comma-separated numbers, e.g. 20 or 10,14,20" in text and "(default: 3.0)" in text


def test_causal_has_its_own_description(capsys):
    with pytest.raises(SystemExit):
        main(["causal", "--help"])
    text = capsys.readouterr().out
    description = text.split("\n\n")[1]
    assert description.startswith("Causal checks")
    assert "edit-runtime causal --model" in text and "edit-runtime eval --model" not in text
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    assert "edit-runtime eval --model" in text and "edit-runtime causal --model" not in text


def test_user_description_strips_markup_and_implementation_notes():
    doc = """``edit-runtime x``: uses :mod:`edit_runtime.gate` and :func:`~a.b` on *validation* data.

    Several files stack. Only argparse is
imported at module level; torch is imported when the command runs.
"""
    assert user_description(doc) == ("edit-runtime x: uses edit_runtime.gate and a.b on validation data.\n\n"
                                     "    Several files stack.")


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"edit-runtime {version('edit_runtime')}"


def test_neurons_takes_threads():
    args = build_parser().parse_args(["neurons", "--model", SMOL, "--harmful", "builtin:harmful", "--harmless",
                                      "builtin:harmless", "--langs", "en,zh", "--layers", "3", "--threads", "2",
                                      "-o", "out"])
    assert args.threads == 2 and args.layers == [3]
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["neurons", "--model", SMOL, "--harmful", "h", "--harmless", "s", "--langs",
                                   "en", "--layers", "3", "--threads", "0", "-o", "out"])
    assert e.value.code == 2


# ------------------------------------------------------------------------------- usage errors

_FIT = ["fit", "--model", SMOL, "--harmful", "builtin:harmful", "--harmful-langs", "zh", "--harmless",
        "builtin:harmless", "--layer", "3"]


@pytest.mark.parametrize("extra,message", [
    (["--method", "swe", "--hold-langs", "bn"], "--hold-langs: option(s) of --method residual, not swe"),
    (["--hold-weight", "2", "--harmless-target", "self"],
     "--harmless-target, --hold-weight: option(s) of --method residual, not swe"),
    (["--method", "residual", "--lambda", "1"], "--method residual takes --lambda-rel"),
    (["--method", "residual", "--mode", "separate"], "--mode separate ranks SWE's layers"),
    (["--method", "residual", "--harmless-lang-weights", "zh:3"], "--harmless-lang-weights: 'zh:3' is not LANG=WEIGHT"),
])
def test_fit_option_combination_is_a_usage_error(tmp_path, capsys, extra, message):
    """Exit status 2 and the standard ``edit-runtime fit: error:`` prefix, before any model loads."""
    out = tmp_path / "delta.safetensors"
    with pytest.raises(SystemExit) as e:
        main([*_FIT, "-o", str(out), *extra])
    assert e.value.code == 2
    assert isinstance(e.value, UsageExit) and message in str(e.value)
    err = capsys.readouterr().err
    assert err.startswith("usage: edit-runtime fit")
    assert f"edit-runtime fit: error: {message}" in err
    assert not out.exists()


# ------------------------------------------------------------------------------------ models

def _printed(capsys, argv, entry=main) -> str:
    assert entry(argv) == 0
    return capsys.readouterr().out


def test_models_command_matches_python_m_edit_runtime_models(capsys):
    """``edit-runtime models`` runs the same code as ``python -m edit_runtime.models``."""
    listed = _printed(capsys, ["models", "list"])
    assert SMOL in listed and listed == _printed(capsys, ["list"], models.main)
    assert _printed(capsys, ["models", "path"]) == _printed(capsys, ["path"], models.main)
    args = build_parser().parse_args(["models", "prepare", SMOL, "--force"])
    assert args.action == "prepare" and args.names == [SMOL] and args.force is True


def test_models_path_name(capsys):
    assert SMOL in _printed(capsys, ["models", "list"]).split()
    printed = _printed(capsys, ["models", "path", SMOL]).strip()
    assert printed == str(models.model_cache_path(SMOL))
    assert main(["models", "path", "not-a-model"]) == 2
    assert "edit-runtime models: error: unknown model short name 'not-a-model'" in capsys.readouterr().err


def test_models_path_is_the_prepared_folder(capsys):
    if not models.cache_is_valid(models.KNOWN_MODELS[SMOL]):
        pytest.skip(f"{SMOL} is not prepared in {models.cache_dir()} (run edit-runtime models prepare {SMOL}): "
                    f"its cache folder cannot be checked")
    from pathlib import Path

    folder = Path(_printed(capsys, ["models", "path", SMOL]).strip())
    assert (folder / "config.json").is_file() and (folder / models.MARKER_NAME).is_file()
