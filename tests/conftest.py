"""Suite-wide set-up: without CUDA, Triton kernels run under Triton's interpreter on the CPU
(the GPU decode path is checked that way, in the tests marked ``triton_interpreter``), so the
variable must be set before anything imports triton (transformers may). Where CUDA is
available those tests are skipped: triton compiles for the GPU there, and ``tests/gpu`` runs
the same kernels compiled."""

from __future__ import annotations

import os
import time

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


class StoreClock:
    """An adapter store's clock for tests: real time plus the jumps a test makes
    (``clock.now += 301``), so hidden versions age past a grace period at once while the blobs'
    own ages, their files' modification times, stay in step with it however slowly the test
    ran up to the jump."""

    def __init__(self) -> None:
        self.skew = 0.0

    @property
    def now(self) -> float:
        return time.time() + self.skew

    @now.setter
    def now(self, value: float) -> None:
        self.skew = value - time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store_clock() -> StoreClock:
    return StoreClock()
