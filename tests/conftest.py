"""
One check before any test: transformers (the tests' oracle) must be able to build and save a model here.

transformers imports the Hugging Face `kernels` package by that name whenever it is installed, and from 5.25
on requires it. With the repository root on sys.path, as in these tests, that name is this project's kernels/
package, so every transformers model class fails to import (or, without the package, to save): one sentence
now, instead of a hundred errors about `CUDAProperties`.
"""
import importlib.metadata

import pytest


def version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def pytest_configure(config):
    tf, kernels = version("transformers"), version("kernels")
    fix = "pip install 'transformers<5.25' && pip uninstall -y kernels"
    if tf is not None and tuple(int(p) for p in tf.split(".")[:2] if p.isdigit()) >= (5, 25):
        pytest.exit(f"transformers {tf} needs the `kernels` package, whose name is this project's kernels/: {fix}",
                    returncode=4)
    if kernels is not None:
        pytest.exit(f"the `kernels` package {kernels} is installed; its name is this project's kernels/, so "
                    f"transformers cannot load models here: {fix}", returncode=4)
