"""Models rebuilt on the meta device from a compiled component's config: the structure diffusers' helpers walk
(module names, attention processors, config), no weights.

LoRA on a loaded export (pipelines/lora.py) and ``set_ip_adapter_scale`` (runtime/components.py) run diffusers'
own code on such a model, then carry what it changed over to the compiled graphs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def meta_unet(config: Mapping[str, Any]) -> torch.nn.Module:
    """The UNet of ``config`` on the meta device. An IP-Adapter export's config names the ``ip_image_proj`` encoder
    projection, which diffusers' loader adds to a built UNet and its constructor refuses: built without it."""
    from diffusers import UNet2DConditionModel

    config = dict(config)
    if config.get("encoder_hid_dim_type") == "ip_image_proj":
        config["encoder_hid_dim_type"] = None
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def with_ip_adapter_processors(unet: torch.nn.Module, names: Sequence[str], adapters: int) -> torch.nn.Module:
    """``unet`` with diffusers' IP-Adapter attention processor (``adapters`` adapters, scales 1.0 as its loader
    leaves them) at each of ``names``, on the meta device: what ``set_ip_adapter_scale`` reads and sets."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    wanted = set(names)
    processors = {}
    with torch.device("meta"):
        for name, processor in unet.attn_processors.items():
            if name in wanted:
                processor = IPAdapterAttnProcessor2_0(1, 1, num_tokens=(1,) * adapters, scale=1.0)
            processors[name] = processor
    unet.set_attn_processor(processors)
    return unet
