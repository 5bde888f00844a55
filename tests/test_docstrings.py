"""The public API of the fit and gate modules documents what ``help()`` shows: every parameter
(or dataclass field) has an entry in an ``Args:`` / ``Attributes:`` section, everything that
returns a value has a ``Returns:`` section, and everything that raises says so."""
from __future__ import annotations

import dataclasses
import inspect
import re

import pytest

from edit_runtime import fit as fit_mod
from edit_runtime import gate as gate_mod
from edit_runtime import residual_fit as residual_mod

PUBLIC = {
    "gate.attach_gate": gate_mod.attach_gate,
    "gate.fit_mapped_gate": gate_mod.fit_mapped_gate,
    "gate.fit_probe_gate": gate_mod.fit_probe_gate,
    "gate.ProbeGate": gate_mod.ProbeGate,
    "gate.GatedDelta": gate_mod.GatedDelta,
    "gate.GateHandle": gate_mod.GateHandle,
    "gate.check_gate": gate_mod.check_gate,
    "gate.threshold_at_most": gate_mod.threshold_at_most,
    "gate.mapped_harmful": gate_mod.mapped_harmful,
    "gate.last_token_hidden": gate_mod.last_token_hidden,
    "fit.fit": fit_mod.fit,
    "fit.FitConfig": fit_mod.FitConfig,
    "fit.FitResult": fit_mod.FitResult,
    "fit.LayerReport": fit_mod.LayerReport,
    "residual_fit.fit_residual": residual_mod.fit_residual,
    "residual_fit.ResidualFitConfig": residual_mod.ResidualFitConfig,
}

METHODS = {
    "ProbeGate.score": gate_mod.ProbeGate.score,
    "ProbeGate.with_threshold": gate_mod.ProbeGate.with_threshold,
    "ProbeGate.save": gate_mod.ProbeGate.save,
    "ProbeGate.load": gate_mod.ProbeGate.load,
    "GatedDelta.load": gate_mod.GatedDelta.load,
    "GatedDelta.check": gate_mod.GatedDelta.check,
    "GateHandle.remove": gate_mod.GateHandle.remove,
}

PROPERTIES = {
    "ProbeGate.d_model": gate_mod.ProbeGate.d_model,
    "GateHandle.removed": gate_mod.GateHandle.removed,
}

CONFIGS = [fit_mod.FitConfig, residual_mod.ResidualFitConfig]


def _names(obj) -> list[str]:
    """Dataclass fields, or the signature's named parameters (no self/cls, *args, **kwargs)."""
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
        return [f.name for f in dataclasses.fields(obj)]
    params = inspect.signature(obj).parameters.values()
    return [p.name for p in params if p.name not in ("self", "cls")
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _documented(doc: str, name: str) -> bool:
    """``name`` heads an entry (``name:`` or ``a, name, b:``) of an indented section."""
    return re.search(rf"^\s+(?:\w+, )*{re.escape(name)}(?:, \w+)*:", doc, re.MULTILINE) is not None


def _returns_something(func) -> bool:
    ann = inspect.signature(func).return_annotation
    return ann not in (inspect.Signature.empty, None, "None")


def _section(doc: str, title: str) -> bool:
    return re.search(rf"^{title}:\s*$", doc, re.MULTILINE) is not None


def _raises_in_body(obj) -> bool:
    """The function (or a dataclass's ``__post_init__``) raises an exception itself."""
    if inspect.isclass(obj):
        obj = obj.__dict__.get("__post_init__")
        if obj is None:
            return False
    return re.search(r"^\s+raise \w", inspect.getsource(obj), re.MULTILINE) is not None


ALL = {**PUBLIC, **METHODS}


@pytest.mark.parametrize("name", sorted(ALL))
def test_every_parameter_is_documented(name):
    obj = ALL[name]
    doc = inspect.getdoc(obj)
    assert doc, f"{name} has no docstring"
    missing = [n for n in _names(obj) if not _documented(doc, n)]
    assert not missing, f"{name}: no Args/Attributes entry for {missing}"


# only the callables the rule applies to (those returning a value; those raising themselves)
@pytest.mark.parametrize("name", sorted(n for n, o in ALL.items() if not inspect.isclass(o) and _returns_something(o)))
def test_functions_that_return_a_value_have_a_returns_section(name):
    assert _section(inspect.getdoc(ALL[name]), "Returns"), f"{name} has no Returns: section"


@pytest.mark.parametrize("name", sorted(n for n, o in ALL.items() if _raises_in_body(o)))
def test_what_raises_has_a_raises_section(name):
    assert _section(inspect.getdoc(ALL[name]), "Raises"), f"{name} raises but has no Raises: section"


@pytest.mark.parametrize("name", sorted(PROPERTIES))
def test_properties_are_documented(name):
    assert (PROPERTIES[name].__doc__ or "").strip(), f"{name} has no docstring"


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_config_fields_keep_their_help_metadata(cls):
    """The class docstring repeats the help; the field metadata stays for tools that read it."""
    doc = inspect.getdoc(cls)
    assert _section(doc, "Attributes")
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} lost its help metadata"


def test_the_entry_check_is_not_fooled_by_a_mention():
    """A name that only appears in prose is not an Args entry."""
    doc = "Uses layer and gate.\n\nArgs:\n    model, tokenizer: the LM.\n    gate: the probe.\n"
    assert _documented(doc, "model") and _documented(doc, "tokenizer") and _documented(doc, "gate")
    assert not _documented(doc, "layer")
