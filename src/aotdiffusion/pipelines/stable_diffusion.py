"""Stable Diffusion 1.x/2.x text-to-image, compiled ahead of time."""

from __future__ import annotations

from diffusers import StableDiffusionPipeline

from .base import AOTPipelineMixin


class AOTStableDiffusionPipeline(AOTPipelineMixin, StableDiffusionPipeline):
    diffusers_class = StableDiffusionPipeline
