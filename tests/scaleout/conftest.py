"""Scale-out tests: replicas behind a real nginx, the registry outage over HTTP, the capacity
simulation. They use the HTTP tests' fixtures (models) and the reliability suite's helpers
(real ``prefix-serve serve`` processes, its figures)."""

import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_TESTS / "reliability"))
sys.path.insert(0, str(_TESTS / "http"))

from http_fixtures import default_model_dir, tiny_llm, tiny_model_dir  # noqa: E402, F401
