"""Stable Diffusion XL (base, refiner, Turbo, LCM-SDXL): text-to-image, image-to-image, inpainting, InstructPix2Pix.

SDXL Turbo is the text-to-image pipeline exported with ``--no-classifier-free-guidance`` and called with
``guidance_scale=0.0``; LCM-SDXL is the same pipeline exported with ``unet_id=`` an LCM UNet. The
refiner is an export whose only text encoder is ``text_encoder_2``, loaded by the image-to-image class.
"""

from __future__ import annotations

from diffusers import (
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLInstructPix2PixPipeline,
    StableDiffusionXLPipeline,
)

from .base import AOTPipelineMixin


class AOTStableDiffusionXLPipeline(AOTPipelineMixin, StableDiffusionXLPipeline):
    diffusers_class = StableDiffusionXLPipeline


class AOTStableDiffusionXLImg2ImgPipeline(AOTPipelineMixin, StableDiffusionXLImg2ImgPipeline):
    diffusers_class = StableDiffusionXLImg2ImgPipeline


class AOTStableDiffusionXLInpaintPipeline(AOTPipelineMixin, StableDiffusionXLInpaintPipeline):
    diffusers_class = StableDiffusionXLInpaintPipeline


class AOTStableDiffusionXLInstructPix2PixPipeline(AOTPipelineMixin, StableDiffusionXLInstructPix2PixPipeline):
    """Edits ``image`` as the prompt says; the UNet is compiled for the three-way guidance batch it receives."""

    diffusers_class = StableDiffusionXLInstructPix2PixPipeline
