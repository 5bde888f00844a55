"""Writing the package's safetensors files: atomically, with the permissions the umask gives.

safetensors (0.8) writes through a private temporary file, so its output is ``-rw-------`` whatever
the umask; a delta or a gate written that way cannot be read by a server running as another user
(a container, a service account). Every file the package writes for users goes through
:func:`save_safetensors`, and folders it publishes through :func:`apply_umask`.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping

import torch


def umask_mode(directory: bool = False) -> int:
    """The mode a new file (``0o666``) or folder (``0o777``) gets under the current umask."""
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def apply_umask(path: str | Path) -> None:
    """Gives ``path`` (and, for a folder, everything under it) the umask's usual permissions."""
    path = Path(path)
    file_mode, dir_mode = umask_mode(), umask_mode(directory=True)  # read the umask once
    for p in [path, *(path.rglob("*") if path.is_dir() else ())]:
        p.chmod(dir_mode if p.is_dir() else file_mode)


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Writes ``tensors`` (contiguous, moved to CPU) to ``path`` with string ``metadata``.

    The file appears whole or not at all (written beside it, then renamed over it), with the
    umask's permissions. Creates the parent folder. Returns the path.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata=dict(metadata) if metadata is not None else None)
        apply_umask(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order: stored in a file's
    header at save and compared at load, so a flipped byte in the data is caught, not applied."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
