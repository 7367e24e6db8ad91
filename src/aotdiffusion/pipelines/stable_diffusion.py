"""Stable Diffusion 1.x/2.x: text-to-image, image-to-image, inpainting, InstructPix2Pix, ControlNet, compiled ahead of
time."""

from __future__ import annotations

from diffusers import (
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionPipeline,
)

from .base import AOTPipelineMixin, ControlNetCalls


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


class AOTStableDiffusionControlNetPipeline(ControlNetCalls, AOTPipelineMixin, StableDiffusionControlNetPipeline):
    """Text-to-image guided by one ControlNet or several (``image``: the conditioning image, or one per ControlNet);
    each ControlNet is compiled with the UNet's static shapes, its scales graph inputs."""

    diffusers_class = StableDiffusionControlNetPipeline


class AOTStableDiffusionControlNetImg2ImgPipeline(
    ControlNetCalls, AOTPipelineMixin, StableDiffusionControlNetImg2ImgPipeline
):
    """Image-to-image guided by ControlNets (``image``: the input image; ``control_image``: the condition, or one
    per ControlNet), over a ControlNet export's components (it needs the VAE encoder)."""

    diffusers_class = StableDiffusionControlNetImg2ImgPipeline
    condition_argument = "control_image"


class AOTStableDiffusionControlNetInpaintPipeline(
    ControlNetCalls, AOTPipelineMixin, StableDiffusionControlNetInpaintPipeline
):
    """Inpainting guided by ControlNets (``image``, ``mask_image``, ``control_image``), with the 9-channel inpainting
    UNet or a regular 4-channel one, as diffusers does."""

    diffusers_class = StableDiffusionControlNetInpaintPipeline
    condition_argument = "control_image"
