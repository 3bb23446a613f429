"""The evaluation tests share the HTTP tests' fixtures (real servers in threads)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "http"))

from http_fixtures import default_model_dir, make_server  # noqa: E402, F401 (fixtures)
