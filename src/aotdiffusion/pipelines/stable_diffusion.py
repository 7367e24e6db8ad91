"""Stable Diffusion 1.x/2.x: text-to-image, image-to-image, inpainting, InstructPix2Pix, ControlNet, compiled ahead of
time."""

from __future__ import annotations

from diffusers import (
    StableDiffusionControlNetPipeline,
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


class AOTStableDiffusionControlNetPipeline(AOTPipelineMixin, StableDiffusionControlNetPipeline):
    """Text-to-image guided by one ControlNet or several (``image``: the conditioning image, or one per ControlNet);
    each ControlNet is compiled with the UNet's static shapes, its scales graph inputs."""

    diffusers_class = StableDiffusionControlNetPipeline

    def _unsplit(self) -> tuple[str, ...]:
        # Several ControlNets: `image` holds one conditioning image per ControlNet, not one per prompt.
        return ("image",) if hasattr(self.controlnet, "nets") else ()
