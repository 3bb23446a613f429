"""HTTP API: OpenAI-compatible generation, adapter management, health (see docs/api.md)."""

from __future__ import annotations

from server.api.app import create_app

__all__ = ["create_app"]
