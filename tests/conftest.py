"""
One check before any test: transformers (the tests' oracle) must be able to build and save a model here.

transformers imports the Hugging Face `kernels` package by that name when a version it supports is installed,
and from 5.25 on requires it. With the repository root on sys.path, as in these tests, that name is this
project's kernels/ package, so every transformers model class fails to import (or, without the package, to
save): one sentence now, instead of a hundred errors about `CUDAProperties`.
"""
import importlib.metadata

import pytest


def pytest_configure(config):
    try:
        tf = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return
    fix = "pip install 'transformers<5.25' && pip uninstall -y kernels"
    if tuple(int(p) for p in tf.split(".")[:2] if p.isdigit()) >= (5, 25):
        pytest.exit(f"transformers {tf} needs the `kernels` package, whose name is this project's kernels/: {fix}",
                    returncode=4)
    try:  # what transformers itself asks before it imports the package (a metadata lookup, no import)
        from transformers.utils.import_utils import is_kernels_available
    except ImportError:  # older transformers: it never imports `kernels`
        return
    if is_kernels_available():
        pytest.exit(f"the `kernels` package {importlib.metadata.version('kernels')} is installed and transformers "
                    f"{tf} would import it, but its name is this project's kernels/: {fix}", returncode=4)
