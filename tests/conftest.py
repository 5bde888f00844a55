"""Shared test set-up.

Without a GPU the Triton kernels run under the interpreter: ``TRITON_INTERPRET=1`` must be set
before any kernel module is imported, so it is set here, at collection time. On a CUDA machine
it is left alone and the kernels compile for real.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two cores here and in CI: one intra-op thread keeps parallel test processes from thrashing.
torch.set_num_threads(int(os.environ.get("EDIT_RUNTIME_TEST_THREADS", "2")))
