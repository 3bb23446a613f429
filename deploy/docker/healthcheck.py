"""Container health check: exit 0 when GET /health answers 200 (the engine loop is alive)."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

port = os.environ.get("PREFIX_SERVE_PORT", "8000")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=4) as response:
        sys.exit(0 if response.status == 200 else 1)
except (OSError, urllib.error.URLError):
    sys.exit(1)
