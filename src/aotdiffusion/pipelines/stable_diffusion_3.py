"""Stable Diffusion 3: an MMDiT denoiser over two CLIP encoders and T5, compiled ahead of time."""

from __future__ import annotations

from typing import Any

from diffusers import StableDiffusion3Pipeline

from .base import AOTPipelineMixin


class AOTStableDiffusion3Pipeline(AOTPipelineMixin, StableDiffusion3Pipeline):
    """Text-to-image with SD3: both CLIP encoders (77 tokens), T5 (at the compiled ``max_sequence_length``), the
    transformer and the VAE decoder compiled. LoRA adapters (transformer and CLIP encoders) change the compiled
    weights in place, as on the UNet pipelines."""

    diffusers_class = StableDiffusion3Pipeline

    def check_call(self, call: dict[str, Any]) -> tuple[int, int]:
        if call.get("skip_guidance_layers"):
            raise ValueError(
                f"skip_guidance_layers={call['skip_guidance_layers']} runs the transformer without those layers "
                "(skip-layer guidance), another graph than the compiled one: call without it."
            )
        if call.get("joint_attention_kwargs"):
            raise ValueError(
                f"joint_attention_kwargs ({sorted(call['joint_attention_kwargs'])}) change the transformer's graph; "
                "for a LoRA scale use set_adapters or fuse_lora(lora_scale=...) on the loaded pipeline."
            )
        return super().check_call(call)
