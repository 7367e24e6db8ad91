"""Stable Diffusion 1.x/2.x: text-to-image, image-to-image, inpainting, InstructPix2Pix, compiled ahead of time."""

from __future__ import annotations

from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionPipeline,
)

from .base import AOTPipelineMixin


class AOTStableDiffusionPipeline(AOTPipelineMixin, StableDiffusionPipeline):
    diffusers_class = StableDiffusionPipeline


class AOTStableDiffusionImg2ImgPipeline(AOTPipelineMixin, StableDiffusionImg2ImgPipeline):
    diffusers_class = StableDiffusionImg2ImgPipeline


class AOTStableDiffusionInpaintPipeline(AOTPipelineMixin, StableDiffusionInpaintPipeline):
    """Works with the 9-channel inpainting UNet and with a regular 4-channel one, as diffusers does."""

    diffusers_class = StableDiffusionInpaintPipeline


class AOTStableDiffusionInstructPix2PixPipeline(AOTPipelineMixin, StableDiffusionInstructPix2PixPipeline):
    """Edits ``image`` as the prompt says; the UNet is compiled for the three-way guidance batch it receives."""

    diffusers_class = StableDiffusionInstructPix2PixPipeline
