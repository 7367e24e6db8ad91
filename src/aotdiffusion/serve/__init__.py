"""Serving compiled pipelines: an OpenAI-compatible HTTP API with dynamic batching, replicas and Ray.

Above ``pipelines/``: the front (``app``), the batcher, and the model workers (``runner``).
"""

from .app import create_app

__all__ = ["create_app"]
