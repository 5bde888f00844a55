"""Build script: maps ``kernels/`` to ``edit_runtime.kernels`` and builds ``edit_runtime._C``."""
from setuptools import setup

setup(
    packages=["edit_runtime", "edit_runtime.kernels"],
    package_dir={"edit_runtime": "edit_runtime", "edit_runtime.kernels": "kernels"},
)
