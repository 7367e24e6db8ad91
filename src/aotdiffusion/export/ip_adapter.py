"""--ip-adapter: IP-Adapters loaded with diffusers' own loader, their scales made graph inputs of the UNet.

diffusers' IP-Adapter attention adds ``scale * attention(query, image keys, image values)`` to each cross-attention's
output, the scale a Python float on the processor (``set_ip_adapter_scale``, per adapter and per block). A compiled
UNet would freeze it, so before tracing each adapter's value projection is made to multiply its output by one entry
of a ``[processors, adapters]`` input: attention is linear in the values, so that is the same sum, and the
processors' own floats stay 1.0. The runtime fills the input from diffusers' processors on a hollow UNet
(runtime/hollow.py), so ``set_ip_adapter_scale`` keeps its meanings, InstantStyle's per-block dicts included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

# The UNet graph's inputs: one image embedding per adapter, and the scales.
IMAGE_EMBEDS, SCALE = "ip_image_embeds_", "ip_adapter_scale"
# What the static shapes allow: one prompt per call (diffusers' image embeddings carry no prompt batch) and one
# image per adapter.
IMAGES_PER_ADAPTER = 1


@dataclass(frozen=True)
class IPAdapterSource:
    """Where one adapter comes from, as diffusers' ``load_ip_adapter`` takes it."""

    model: str
    subfolder: str
    weight_name: str


def sources(
    model: str | Sequence[str], subfolder: str | Sequence[str] | None, weight_name: str | Sequence[str] | None
) -> list[IPAdapterSource]:
    """The adapters asked for: lists of equal length, or one subfolder/weight name for every model (diffusers' rule)."""
    models = [model] if isinstance(model, str) else [str(m) for m in model]
    if not models:
        return []
    if weight_name is None:
        raise ValueError(
            f"An IP-Adapter is one weights file of {models[0]}: name it with ip_adapter_weight_name (CLI "
            "--ip-adapter-weight-name), e.g. ip-adapter_sd15.safetensors with subfolder models for h94/IP-Adapter."
        )
    names = [weight_name] if isinstance(weight_name, str) else list(weight_name)
    folders = [subfolder or ""] if subfolder is None or isinstance(subfolder, str) else list(subfolder)
    count = max(len(models), len(names), len(folders))
    for label, values in (("ip_adapter", models), ("ip_adapter_subfolder", folders), ("ip_adapter_weight_name", names)):
        if len(values) not in (1, count):
            raise ValueError(
                f"{label} has {len(values)} entries for {count} IP-Adapters: give one for each, or one for all."
            )
    pick = lambda values, i: values[0] if len(values) == 1 else values[i]  # noqa: E731
    return [IPAdapterSource(pick(models, i), pick(folders, i), pick(names, i)) for i in range(count)]


def load(pipe: Any, adapters: list[IPAdapterSource], image_encoder_folder: str = "image_encoder", **hub: Any) -> None:
    """diffusers' ``load_ip_adapter`` on the eager pipeline: the adapters' layers and, unless the pipeline has one,
    the CLIP image encoder (from ``image_encoder_folder``, under the adapter's subfolder as diffusers reads it)."""
    if not adapters:
        return
    if not hasattr(pipe, "load_ip_adapter"):
        raise ValueError(f"{type(pipe).__name__} takes no IP-Adapter (diffusers has no IP-Adapter loader for it).")
    pipe.load_ip_adapter(
        [a.model for a in adapters],
        subfolder=[a.subfolder for a in adapters],
        weight_name=[a.weight_name for a in adapters],
        image_encoder_folder=image_encoder_folder,
        **hub,
    )
    if getattr(pipe, "image_encoder", None) is None:
        raise ValueError(
            "The IP-Adapter was loaded without a CLIP image encoder, which the compiled pipeline runs on "
            "ip_adapter_image: give image_encoder_folder (--ip-adapter-image-encoder-folder) where it lies."
        )


class _Scales:
    """The current call's scale input, read by every scaled value projection during tracing."""

    value: torch.Tensor | None = None


class _ScaledValue(torch.nn.Module):
    def __init__(self, linear: torch.nn.Linear, scales: _Scales, row: int, column: int):
        super().__init__()
        self.linear = linear
        self.scales, self.row, self.column = scales, row, column

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * self.scales.value[self.row, self.column]


def processors(unet: torch.nn.Module) -> dict[str, Any]:
    """The UNet's IP-Adapter attention processors by name, in diffusers' order."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0

    kinds = (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0)
    return {name: p for name, p in unet.attn_processors.items() if isinstance(p, kinds)}


def scale_inputs(unet: torch.nn.Module) -> tuple[_Scales, dict[str, Any]] | None:
    """Makes the loaded adapters' scales graph inputs (see the module's docstring); None for a UNet without adapters.

    Returns the holder the UNet graph sets from its input, and what the runtime needs to know (written in the UNet's
    manifest): the processors' names, the adapters' projection classes.
    """
    found = processors(unet)
    if not found:
        return None
    # Another image size's spec of the same UNet (export --extra-sizes) shares the projections wrapped first.
    wrapped = [v for p in found.values() for v in p.to_v_ip if isinstance(v, _ScaledValue)]
    holder = wrapped[0].scales if wrapped else _Scales()
    for row, processor in enumerate(found.values()):
        for column, linear in enumerate(list(processor.to_v_ip)):
            if not isinstance(linear, _ScaledValue):
                processor.to_v_ip[column] = _ScaledValue(linear, holder, row, column)
        processor.scale = [1.0] * len(processor.to_v_ip)
    projections = unet.encoder_hid_proj.image_projection_layers
    layout = {
        "processors": list(found),
        "projections": [type(p).__name__ for p in projections],
    }
    return holder, layout


def uses_hidden_states(projection_class: str) -> bool:
    """diffusers feeds every projection but the plain IP-Adapter's the image encoder's penultimate hidden state."""
    return projection_class != "ImageProjection"
