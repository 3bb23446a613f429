"""Suite-wide set-up: without CUDA, Triton kernels run under Triton's interpreter on the CPU
(the GPU decode path is checked that way, in the tests marked ``triton_interpreter``), so the
variable must be set before anything imports triton (transformers may). Where CUDA is
available those tests are skipped: triton compiles for the GPU there, and ``tests/gpu`` runs
the same kernels compiled."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from triton.runtime import interpreter

    # Triton 3.6's interpreter holds a scalar as a one-element array and turns it into a loop
    # bound with int(), which NumPy 2.4 refuses for arrays with a dimension: read the element.
    _patch_tensor = interpreter._patch_lang_tensor

    def _patch_with_scalar_bounds(tensor, scope):
        _patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).flat[0]))

    interpreter._patch_lang_tensor = _patch_with_scalar_bounds


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="runs Triton's CPU interpreter; tests/gpu runs the kernels")
    for item in items:
        if "triton_interpreter" in item.keywords:
            item.add_marker(skip)
