"""Torch operators run in the engine thread only. With OpenMP, every thread that starts a
parallel region gets a team of worker threads of its own, and once there are more of them
than cores, all teams stop spinning between regions: one adapter validated in a worker thread
made the engine's steps 15-60% slower for the rest of the process's life."""

from __future__ import annotations

import os
import threading

import torch
from http_helpers import TINY_ID, files_of, upload

from bench.peft_adapters import make_p_tuning, make_prefix_tuning


def native_threads_outside_python() -> set[int]:
    """OS threads of this process that Python did not start: OpenMP's workers."""
    python = {t.native_id for t in threading.enumerate()}
    return {int(tid) for tid in os.listdir("/proc/self/task")} - python


def test_uploads_and_adapter_loads_start_no_openmp_team(make_server, tiny_llm, tiny_ref, tmp_path):
    assert torch.get_num_threads() > 1, "needs more than one core to see OpenMP teams"
    server = make_server(tiny_llm)
    # Large enough (over ATen's grain of 32768 elements) for validation to go parallel.
    adapters = {
        "prefix": make_prefix_tuning(tiny_ref, tmp_path / "prefix", num_virtual_tokens=300),
        "ptune": make_p_tuning(tiny_ref, tmp_path / "ptune", num_virtual_tokens=500),
    }
    with server.http() as http:
        warm = {"model": TINY_ID, "prompt": "Hello", "max_tokens": 2, "temperature": 0}
        assert http.post("/v1/completions", json=warm).status_code == 200
        before = native_threads_outside_python()
        for name, path in adapters.items():
            assert upload(http, name, **files_of(path)).status_code == 201
            # A new resolver entry: the blob is read back and decoded (torch) once.
            server.ctx.resolver.on_store_event("reset", "", "")
            body = {**warm, "model": name}
            assert http.post("/v1/completions", json=body).status_code == 200
        after = native_threads_outside_python()
    assert after <= before, f"new OpenMP worker threads: {sorted(after - before)}"
