"""Shared helpers of the operations tests."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from server.metrics import SPECS, sample_names

ROOT = Path(__file__).resolve().parents[2]
METRIC_NAME = re.compile(r"\bprefix_serve_[a-z0-9_]+")


def exposition_samples(body: bytes) -> list[Sample]:
    return [s for f in text_string_to_metric_families(body.decode()) for s in f.samples]


def defined_series() -> set[str]:
    """Every series name server/metrics.py exposes (``_total``, ``_bucket``… included)."""
    return {name for spec in SPECS.values() for name in sample_names(spec)}


def undefined_metrics(promql: str) -> set[str]:
    """``prefix_serve_*`` names in a PromQL expression that server/metrics.py does not expose."""
    return set(METRIC_NAME.findall(promql)) - defined_series()


def tool(name: str) -> str:
    """The tool in the venv (pip-installed ones) or on PATH; fails, never skips."""
    local = Path(sys.executable).parent / name
    path = str(local) if local.is_file() else shutil.which(name)
    assert path, f"{name} is missing: run `make tools`"
    return path
