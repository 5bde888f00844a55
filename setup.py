"""Build script: maps ``kernels/`` to ``edit_runtime.kernels`` and builds ``edit_runtime._C``.

``edit_runtime._C`` (``csrc/``) is a pybind11 module linked against LAPACK from the PyPI package
``scipy-openblas32`` (symbols prefixed ``scipy_``; rpath set to the package's ``lib/`` so nothing
needs ``LD_LIBRARY_PATH``). It needs no torch and no root. When pybind11 or scipy-openblas32 is
not importable the extension is skipped with a warning and the package still installs
(``edit_runtime._ext`` then falls back to torch). Compilation goes through ninja when the
``ninja`` binary (or the PyPI ``ninja`` package) is available (``EDIT_RUNTIME_NO_NINJA=1``
turns it off), else through setuptools directly. A failed compile warns and installs the package
without ``_C`` (the extension is ``optional``).

    pip install --no-build-isolation --no-deps -e .     # builds edit_runtime/_C*.so in place
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings

from setuptools import setup

PACKAGES = dict(
    # edit_runtime.prompts is a data folder (no __init__.py); listed so setuptools ships it as one
    packages=["edit_runtime", "edit_runtime.commands", "edit_runtime.serve", "edit_runtime.kernels",
              "edit_runtime.prompts"],
    package_dir={"edit_runtime": "edit_runtime", "edit_runtime.kernels": "kernels"},
    # The team's own prompt set ships with the package so the demo needs no outside data.
    package_data={"edit_runtime.prompts": ["*.jsonl", "README.md"]},
)
SOURCES = ["csrc/ext.cpp"]
DEPENDS = ["csrc/lapack.h"]


def _blas_prefix(openblas) -> str:
    """Symbol prefix of scipy-openblas32 (``scipy_``), read from its pkg-config ``Cflags``."""
    try:
        found = re.search(r"-DBLAS_SYMBOL_PREFIX=(\w*)", openblas.get_pkg_config())
    except Exception:  # older releases: no pkg-config helper; the prefix has always been scipy_
        found = None
    return found.group(1) if found else "scipy_"


def _ninja_binary() -> str | None:
    if os.environ.get("EDIT_RUNTIME_NO_NINJA", "") not in ("", "0"):
        return None
    try:
        import ninja  # PyPI package: ships the binary

        path = os.path.join(ninja.BIN_DIR, "ninja")
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    return shutil.which("ninja")


def _extension_setup():
    """(ext_modules, cmdclass), or ([], {}) with a warning when the build tools are missing."""
    try:
        import scipy_openblas32 as openblas
        from pybind11.setup_helpers import Pybind11Extension, build_ext
        from setuptools.errors import CompileError
    except ImportError as exc:
        warnings.warn(
            f"edit_runtime._C is not built ({exc}); install pybind11 and scipy-openblas32 and "
            "reinstall to get it. edit_runtime falls back to torch.linalg.",
            stacklevel=1,
        )
        return [], {}

    lib_dir = openblas.get_lib_dir()
    rpaths = [lib_dir]
    if sys.platform.startswith("linux"):
        # A wheel install puts _C next to scipy_openblas32 in site-packages.
        rpaths.append("$ORIGIN/../scipy_openblas32/lib")
    ext = Pybind11Extension(
        "edit_runtime._C",
        SOURCES,
        depends=DEPENDS,
        include_dirs=[openblas.get_include_dir(), "csrc"],
        library_dirs=[lib_dir],
        libraries=[openblas.get_library()],
        runtime_library_dirs=rpaths if sys.platform != "win32" else [],
        define_macros=[("ER_BLAS_PREFIX", _blas_prefix(openblas))],
        extra_compile_args=["-O3"] if sys.platform != "win32" else [],
        cxx_std=17,
        # A failed compile (no C++ compiler, say) warns and installs the package without _C.
        optional=True,
    )

    class BuildExt(build_ext):
        """pybind11's build_ext; compiles through a generated build.ninja when ninja exists."""

        def build_extension(self, ext):
            ninja = _ninja_binary()
            if ninja is None or self.compiler.compiler_type != "unix":
                return super().build_extension(ext)
            original = self.compiler.compile

            def ninja_compile(sources, output_dir=None, macros=None, include_dirs=None,
                              debug=0, extra_preargs=None, extra_postargs=None, depends=None):
                macros, objects, postargs, pp_opts, build = self.compiler._setup_compile(
                    output_dir, macros, include_dirs, sources, depends, extra_postargs)
                cc_args = self.compiler._get_cc_args(pp_opts, debug, extra_preargs)
                cxx = getattr(self.compiler, "compiler_so_cxx", None) or self.compiler.compiler_so
                out_dir = os.path.abspath(output_dir or self.build_temp)
                os.makedirs(out_dir, exist_ok=True)
                lines = [
                    "ninja_required_version = 1.3",
                    f"cxx = {shlex.join(cxx)}",
                    f"cflags = {shlex.join(cc_args + list(postargs))}",
                    "rule compile",
                    "  command = $cxx -MMD -MF $out.d $cflags -c $in -o $out",
                    "  depfile = $out.d",
                    "  deps = gcc",
                    "  description = compile $in",
                ]
                for obj, (src, _ext) in build.items():
                    os.makedirs(os.path.dirname(os.path.abspath(obj)), exist_ok=True)
                    lines.append(f"build {_esc(os.path.abspath(obj))}: compile "
                                 f"{_esc(os.path.abspath(src))}")
                path = os.path.join(out_dir, "build.ninja")
                with open(path, "w", encoding="utf-8") as fh:
                    fh.write("\n".join(lines) + "\n")
                jobs = os.environ.get("MAX_JOBS") or str(max(1, min(4, os.cpu_count() or 1)))
                try:
                    subprocess.run([ninja, "-f", path, "-j", jobs], check=True, cwd=out_dir)
                except (OSError, subprocess.CalledProcessError) as exc:
                    raise CompileError(f"ninja build of {ext.name} failed: {exc}") from exc
                return [os.path.abspath(o) for o in objects]

            self.compiler.compile = ninja_compile
            try:
                return super().build_extension(ext)
            finally:
                self.compiler.compile = original

    return [ext], {"build_ext": BuildExt}


def _esc(path: str) -> str:
    """A path escaped for a ninja build line."""
    return path.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


ext_modules, cmdclass = _extension_setup()
setup(**PACKAGES, ext_modules=ext_modules, cmdclass=cmdclass)
