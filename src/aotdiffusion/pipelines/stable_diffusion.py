"""Stable Diffusion 1.x/2.x: text-to-image, image-to-image, inpainting, compiled ahead of time."""

from __future__ import annotations

from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline

from .base import AOTPipelineMixin


class AOTStableDiffusionPipeline(AOTPipelineMixin, StableDiffusionPipeline):
    diffusers_class = StableDiffusionPipeline


class AOTStableDiffusionImg2ImgPipeline(AOTPipelineMixin, StableDiffusionImg2ImgPipeline):
    diffusers_class = StableDiffusionImg2ImgPipeline


class AOTStableDiffusionInpaintPipeline(AOTPipelineMixin, StableDiffusionInpaintPipeline):
    """Works with the 9-channel inpainting UNet and with a regular 4-channel one, as diffusers does."""

    diffusers_class = StableDiffusionInpaintPipeline
