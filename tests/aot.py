"""Ahead-of-time compilation of Triton kernels for a GPU that is not here.

``compile_for(kernel, signature, constexprs, cap)`` runs Triton's whole pipeline (TTIR -> TTGIR ->
LLVM IR -> PTX -> ptxas) for compute capability ``cap`` (80 = A100, 90 = H100) and returns the
assembly it produced, so a test can fail on a configuration that would not compile on the real
GPU. No GPU or driver is needed: the target is given explicitly and ptxas ships with Triton.

Under ``TRITON_INTERPRET=1`` (set by tests/conftest.py on CPU machines) ``@triton.jit`` yields
interpreter objects that cannot be compiled, so the work then runs in one subprocess with the
variable removed. ``compile_many`` batches several builds into that one subprocess (importing
torch and Triton costs seconds; a compile costs a fraction of one).

Kernels are named by "module:attribute" (or passed as the kernel object, whose module and name
are used), so that the subprocess can import them.

Example::

    asm = compile_for("edit_runtime.kernels.lowrank_apply:_lowrank_out_kernel",
                      {"y_ptr": "*bf16", ..., "BLOCK_N": "constexpr"}, {"BLOCK_N": 16, ...}, 90)
    assert asm["cubin"]
"""
from __future__ import annotations

import importlib
import os
import pickle
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

__all__ = ["Build", "compile_for", "compile_many", "resource_usage"]


@dataclass(frozen=True)
class Build:
    """One compile job.

    kernel: "package.module:attr" of a ``@triton.jit`` function.
    signature: every argument name -> Triton type ("*fp16", "*i64", "i32", "fp32", ...), with
        "constexpr" for compile-time arguments (any order).
    constexprs: values of the "constexpr" arguments.
    cap: compute capability as an int (80, 90).
    aligned: names of pointer/integer arguments to mark divisible by 16, as Triton does at a real
        launch for 16-byte-aligned tensors and strides that are multiples of 16.
    """

    kernel: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    cap: int
    num_warps: int = 4
    num_stages: int = 3
    aligned: tuple[str, ...] = ()


def _kernel_name(kernel: Any) -> str:
    if isinstance(kernel, str):
        return kernel
    fn = getattr(kernel, "fn", kernel)  # JITFunction / InterpretedFunction wrap the Python function
    return f"{fn.__module__}:{fn.__name__}"


def _resolve(name: str):
    """The compilable JITFunction for "module:attr"."""
    import triton

    module, attr = name.split(":")
    obj = getattr(importlib.import_module(module), attr)
    if not isinstance(obj, triton.runtime.jit.JITFunction):
        raise TypeError(f"{name} is a {type(obj).__name__}, not a compilable @triton.jit kernel")
    return obj


def _compile_in_process(build: Build) -> dict[str, Any]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _resolve(build.kernel)
    names = list(fn.arg_names)
    unknown = set(build.signature) - set(names)
    if unknown:
        raise ValueError(f"signature names {sorted(unknown)} are not arguments of {build.kernel}")
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in build.aligned}
    src = ASTSource(fn=fn, signature=build.signature, constexprs=build.constexprs, attrs=attrs)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", build.cap, 32),
        options={"num_warps": build.num_warps, "num_stages": build.num_stages},
    )
    asm = dict(compiled.asm)
    asm["metadata"] = {"shared": int(compiled.metadata.shared), "name": compiled.metadata.name}
    return asm


def _subprocess_entry() -> None:
    """``python tests/aot.py`` reads pickled Builds on stdin and writes pickled results."""
    builds = pickle.load(sys.stdin.buffer)
    sys.stdout.buffer.write(pickle.dumps([_compile_guarded(b) for b in builds]))


def _compile_guarded(build: Build) -> dict[str, Any]:
    try:
        return _compile_in_process(build)
    except Exception as exc:  # reported per build, so one failure does not hide the rest
        return {"error": f"{type(exc).__name__}: {exc}"}


def compile_many(builds: list[Build], workers: int | None = None) -> list[dict[str, Any]]:
    """Compiles each build; returns, per build, the asm dict (see ``compile_for``).

    A build that fails to compile yields ``{"error": "..."}`` instead of raising, so callers can
    report every failure at once. ``workers`` subprocesses (default: one per CPU, at most 4)
    share the builds; in-process when one worker suffices and the interpreter is off.
    """
    builds = list(builds)
    workers = max(1, min(workers or min(os.cpu_count() or 1, 4), len(builds)))
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if workers == 1 and not interpreting:
        return [_compile_guarded(b) for b in builds]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    chunks = [list(range(i, len(builds), workers)) for i in range(workers)]
    procs = []
    for chunk in chunks:
        err = tempfile.TemporaryFile()  # a file, not a pipe: a chatty worker cannot block on it
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, env=env)
        # Feed and close stdin now; outputs are collected below while the workers run in parallel.
        proc.stdin.write(pickle.dumps([builds[i] for i in chunk]))
        proc.stdin.close()
        procs.append((proc, err))
    results: list[dict[str, Any] | None] = [None] * len(builds)
    for chunk, (proc, err) in zip(chunks, procs):
        out = proc.stdout.read()
        with err:
            if proc.wait() != 0:
                err.seek(0)
                raise RuntimeError(f"AOT compile subprocess failed ({proc.returncode}):\n"
                                   f"{err.read().decode(errors='replace')[-4000:]}")
        for i, res in zip(chunk, pickle.loads(out)):
            results[i] = res
    return results


def compile_for(
    kernel: Any,
    signature: dict[str, str],
    constexprs: dict[str, Any],
    cap: int,
    *,
    num_warps: int = 4,
    num_stages: int = 3,
    aligned: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Compiles ``kernel`` for compute capability ``cap``; returns its asm by stage.

    Keys: "ttir", "ttgir", "llir", "ptx" (text), "cubin" (bytes; empty or missing means no
    binary came out) and "metadata" ({"shared": bytes of shared memory, "name": ...}).
    Raises ``RuntimeError`` with Triton's message if compilation fails.
    """
    build = Build(_kernel_name(kernel), dict(signature), dict(constexprs), int(cap), num_warps, num_stages,
                  tuple(aligned))
    (result,) = compile_many([build])
    if "error" in result:
        raise RuntimeError(f"compiling {build.kernel} for sm_{cap}: {result['error']}")
    return result


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers, stack, local (spill) and static shared bytes of a cubin, via Triton's cuobjdump.

    Returns e.g. ``{"REG": 61, "STACK": 0, "SHARED": 0, "LOCAL": 0}``; empty if cuobjdump is not
    shipped with this Triton.
    """
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


if __name__ == "__main__":
    _subprocess_entry()
