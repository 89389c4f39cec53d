"""
One check before any test: transformers (the tests' oracle) must be able to build a model here.

transformers imports the Hugging Face `kernels` package by that name whenever it is installed (5.25 and
later require it). With the repository root on sys.path, as in these tests, that name is this project's
kernels/ package, and every transformers model class fails to import: one sentence now, instead of a
hundred errors about `CUDAProperties`.
"""
import importlib.metadata

import pytest


def pytest_configure(config):
    try:
        v = importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    pytest.exit(f"the `kernels` package {v} is installed (transformers >= 5.25 requires it); its name is this "
                "project's kernels/, so transformers cannot load models here: pip install 'transformers<5.25' && "
                "pip uninstall -y kernels", returncode=4)
