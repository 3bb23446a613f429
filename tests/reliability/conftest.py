"""The reliability suite shares the HTTP tests' fixtures (tiny model, in-thread servers)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "http"))

from http_fixtures import (  # noqa: E402, F401 (fixtures)
    default_model_dir,
    make_server,
    tiny_llm,
    tiny_model_dir,
    tiny_ref,
)
from sharp_model import llm, model_dir, peft, ref  # noqa: E402, F401 (fixtures)
