"""OpenAI-compatible serving of a model with per-request edits (``edit-runtime serve``).

- :mod:`edit_runtime.serve.engine`: :class:`ServingEngine`, the continuous-batching engine (one
  background thread, one forward per decode step, per-row delta masks); needs torch and
  transformers only.
- :mod:`edit_runtime.serve.protocol`: the OpenAI request/response/error bodies (pydantic).
- :mod:`edit_runtime.serve.app`: ``create_app(engine)``, the FastAPI application.

FastAPI and pydantic are imported only when the app or the protocol is used, so
``import edit_runtime`` (and ``import edit_runtime.serve``) works without them.
"""
from __future__ import annotations

from typing import Any

__all__ = ["ServingEngine", "EngineConfig", "SamplingParams", "create_app"]


def __getattr__(name: str) -> Any:
    if name in ("ServingEngine", "EngineConfig", "SamplingParams"):
        from edit_runtime.serve import engine

        return getattr(engine, name)
    if name == "create_app":
        from edit_runtime.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'edit_runtime.serve' has no attribute {name!r}")
