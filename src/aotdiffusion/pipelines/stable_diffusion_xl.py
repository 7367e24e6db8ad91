"""Stable Diffusion XL (base, refiner, Turbo, LCM-SDXL): text-to-image, image-to-image, inpainting, InstructPix2Pix,
ControlNet.

SDXL Turbo is the text-to-image pipeline exported with ``--no-classifier-free-guidance`` and called with
``guidance_scale=0.0``; LCM-SDXL is the same pipeline exported with ``unet_id=`` an LCM UNet. The
refiner is an export whose only text encoder is ``text_encoder_2``, loaded by the image-to-image class.
"""

from __future__ import annotations

from diffusers import (
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLInstructPix2PixPipeline,
    StableDiffusionXLPipeline,
)

from .base import AOTPipelineMixin, ControlNetCalls


class AOTStableDiffusionXLPipeline(AOTPipelineMixin, StableDiffusionXLPipeline):
    diffusers_class = StableDiffusionXLPipeline


class AOTStableDiffusionXLImg2ImgPipeline(AOTPipelineMixin, StableDiffusionXLImg2ImgPipeline):
    diffusers_class = StableDiffusionXLImg2ImgPipeline


class AOTStableDiffusionXLInpaintPipeline(AOTPipelineMixin, StableDiffusionXLInpaintPipeline):
    diffusers_class = StableDiffusionXLInpaintPipeline


class AOTStableDiffusionXLInstructPix2PixPipeline(AOTPipelineMixin, StableDiffusionXLInstructPix2PixPipeline):
    """Edits ``image`` as the prompt says; the UNet is compiled for the three-way guidance batch it receives."""

    diffusers_class = StableDiffusionXLInstructPix2PixPipeline


class AOTStableDiffusionXLControlNetPipeline(ControlNetCalls, AOTPipelineMixin, StableDiffusionXLControlNetPipeline):
    """Text-to-image guided by SDXL ControlNets (``image``: the condition, or one per ControlNet); each ControlNet takes
    the UNet's micro-conditioning (``text_embeds``, ``time_ids``) as graph inputs too."""

    diffusers_class = StableDiffusionXLControlNetPipeline


class AOTStableDiffusionXLControlNetImg2ImgPipeline(
    ControlNetCalls, AOTPipelineMixin, StableDiffusionXLControlNetImg2ImgPipeline
):
    """SDXL image-to-image guided by ControlNets (``image``: the input image; ``control_image``: the condition)."""

    diffusers_class = StableDiffusionXLControlNetImg2ImgPipeline
    condition_argument = "control_image"


class AOTStableDiffusionXLControlNetInpaintPipeline(
    ControlNetCalls, AOTPipelineMixin, StableDiffusionXLControlNetInpaintPipeline
):
    """SDXL inpainting guided by ControlNets (``image``, ``mask_image``, ``control_image``)."""

    diffusers_class = StableDiffusionXLControlNetInpaintPipeline
    condition_argument = "control_image"
