"""edit_runtime: closed-form sparse low-rank safety edits for multilingual LLMs.

Public API: ``SparseDelta``, ``ModuleEdit`` (the delta format), ``patch_model`` /
``PatchHandle`` (apply a delta to a loaded Hugging Face model without forming the dense delta),
``check_patch`` (the same checks, model untouched), and the errors they raise.
"""
from __future__ import annotations

from edit_runtime.delta import (
    DeltaError,
    DeltaFormatError,
    FingerprintMismatchError,
    ModuleEdit,
    SparseDelta,
)

__all__ = [
    "ModuleEdit",
    "SparseDelta",
    "patch_model",
    "check_patch",
    "PatchHandle",
    "PatchError",
    "DeltaError",
    "DeltaFormatError",
    "FingerprintMismatchError",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # patch.py pulls in the kernels; import it on first use so `import edit_runtime` stays light.
    if name in ("patch_model", "check_patch", "PatchHandle", "PatchError"):
        from edit_runtime import patch

        return getattr(patch, name)
    raise AttributeError(f"module 'edit_runtime' has no attribute {name!r}")
