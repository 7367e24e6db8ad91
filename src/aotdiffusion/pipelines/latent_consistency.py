"""Latent Consistency Models distilled from SD: guidance enters as an embedding, so no guidance batch."""

from __future__ import annotations

from diffusers import LatentConsistencyModelPipeline

from .base import AOTPipelineMixin


class AOTLatentConsistencyModelPipeline(AOTPipelineMixin, LatentConsistencyModelPipeline):
    diffusers_class = LatentConsistencyModelPipeline
