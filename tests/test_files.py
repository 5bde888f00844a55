"""Files the package writes: whole or absent, readable by others as the umask allows."""
from __future__ import annotations

import os
import stat

import pytest
import torch

from edit_runtime.delta import ModuleEdit, SparseDelta
from edit_runtime.files import save_safetensors, umask_mode
from edit_runtime.gate import ProbeGate


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_umask_mode_follows_the_umask(umask_022):
    assert umask_mode() == 0o644 and umask_mode(directory=True) == 0o755
    os.umask(0o077)
    assert umask_mode() == 0o600 and umask_mode(directory=True) == 0o700


def test_deltas_gates_and_tensors_are_written_with_the_umask_permissions(tmp_path, umask_022):
    """safetensors alone writes 0600 files; a delta, a gate and a plain tensor file are 0644 here,
    and the folder holds nothing else (no temporary file left behind)."""
    edit = ModuleEdit("model.layers.0.mlp.up_proj", "out", torch.tensor([1, 4]), U=torch.randn(2, 1),
                      V=torch.randn(1, 8))
    delta_path = SparseDelta([edit]).save(tmp_path / "sub" / "delta.safetensors")
    gate_path = ProbeGate(0, torch.randn(8), 0.5, 1.0).save(tmp_path / "gate.safetensors")
    plain = save_safetensors({"x": torch.arange(3.0)}, tmp_path / "plain.safetensors", {"k": "v"})
    for path in (delta_path, gate_path, plain):
        assert _mode(path) == 0o644, path
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["delta.safetensors", "gate.safetensors",
                                                          "plain.safetensors", "sub"]
    assert SparseDelta.load(delta_path).edits[0].module == edit.module
    assert ProbeGate.load(gate_path).threshold == 1.0


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = save_safetensors({"x": torch.zeros(2)}, tmp_path / "t.safetensors")
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_safetensors({"x": "not a tensor"}, path)  # type: ignore[dict-item]
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]


def _saved_delta(path):
    edit = ModuleEdit("model.layers.0.mlp.up_proj", "out", torch.tensor([1, 4]), U=torch.randn(2, 2),
                      V=torch.randn(2, 8))
    return SparseDelta([edit]).save(path)


@pytest.mark.parametrize("save, load", [(_saved_delta, SparseDelta.load),
                                        (lambda p: ProbeGate(3, torch.randn(16), 0.5, 1.0).save(p), ProbeGate.load)],
                         ids=["delta", "gate"])
def test_a_changed_byte_fails_the_checksum(tmp_path, save, load):
    """save writes a sha256 of the tensors into the header and load recomputes it, so corruption
    that leaves a well-formed file (one flipped byte of the last tensor) is caught, not applied."""
    path = save(tmp_path / "f.safetensors")
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x10
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match the checksum"):  # DeltaFormatError / GateError
        load(bad)
    load(path)  # the intact file loads
