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


# --- real models -------------------------------------------------------------------------------
# Session-scoped: each model is loaded once per test run, fp32, eval mode, on CPU, from the
# safetensors cache made by `python -m edit_runtime.models prepare` (converted here on first use if
# the cache is missing: ~30 s / ~70 s). Tests share these objects: do not change their weights or
# config in place, and undo any patch (e.g. with the PatchHandle) before the test ends.

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct (LlamaForCausalLM), fp32, eval."""
    from edit_runtime.models import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def qwen():
    """(model, tokenizer) of Qwen2.5-Coder-0.5B-Instruct (Qwen2ForCausalLM), fp32, eval."""
    from edit_runtime.models import load_model

    return load_model("qwen2.5-coder-0.5b-instruct")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread while a module's tests run (restored after); modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``. Small generate() steps gain
    nothing from a second thread, and where a module runs an engine thread, an event loop and
    client threads on the two cores, OpenMP threads spinning against them cost 3-10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
