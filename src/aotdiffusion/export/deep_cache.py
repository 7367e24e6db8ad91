"""Step caching (DeepCache, Ma et al. 2023) as two compiled UNet graphs.

Adjacent denoising steps change the UNet's deep features very little. DeepCache runs the full UNet on
one step of every N and keeps the feature that enters the last up block (the highest-resolution
one); the N-1 steps in between run only a shallow UNet: time embedding, ``conv_in``, the first down
block (whose outputs the last up block takes as skip connections), then the last up block on the
cached feature, and the output head. That is the paper's split (and OneDiff's) for its cheapest
setting, the whole first down block and the whole last up block.

Both graphs are diffusers' own ``forward``: the full graph only adds a hook that returns the cached
feature as a second output, and the shallow graph runs the same ``forward`` with the deep blocks
swapped for stand-ins that pass tensors through (the last stand-in hands over the cached feature),
so nothing of the UNet's code is copied here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .components import ComponentSpec

FEATURE = "deep_cache_feature"
SHALLOW_COMPONENT = "unet_deep_cache"


def _unet(graph: torch.nn.Module) -> torch.nn.Module:
    return graph.unet


class FullWithFeature(torch.nn.Module):
    """The whole UNet, also returning the hidden state that enters its last up block."""

    def __init__(self, graph: torch.nn.Module):
        super().__init__()
        self.graph = graph

    def forward(self, *tensors: torch.Tensor):
        captured: list[torch.Tensor] = []

        def keep(_module, args, kwargs):
            captured.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

        handle = _unet(self.graph).up_blocks[-1].register_forward_pre_hook(keep, with_kwargs=True)
        try:
            outputs = self.graph(*tensors)
        finally:
            handle.remove()
        return (*outputs, captured[0])


class _PassDown(torch.nn.Module):
    """A down block's stand-in: hands its input on and as many skip tensors as the real block makes."""

    def __init__(self, skips: int):
        super().__init__()
        self.skips = skips

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return hidden_states, (hidden_states,) * self.skips


class _PassMid(torch.nn.Module):
    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return hidden_states


class _PassUp(torch.nn.Module):
    """An up block's stand-in; the last one before the kept block returns the cached feature."""

    def __init__(self, resnets: int, feature: list[torch.Tensor] | None):
        super().__init__()
        self.__dict__["resnets"] = [None] * resnets  # diffusers' loop reads len(block.resnets)
        self.feature = feature

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return self.feature[0] if self.feature is not None else hidden_states


@contextmanager
def _deep_blocks_skipped(unet: torch.nn.Module, feature: list[torch.Tensor]) -> Iterator[None]:
    down, mid, up = list(unet.down_blocks), unet.mid_block, list(unet.up_blocks)
    try:
        for i in range(1, len(down)):
            block = down[i]
            skips = len(block.resnets) + (len(block.downsamplers) if getattr(block, "downsamplers", None) else 0)
            unet.down_blocks[i] = _PassDown(skips)
        unet.mid_block = _PassMid() if mid is not None else None
        for i in range(len(up) - 1):
            unet.up_blocks[i] = _PassUp(len(up[i].resnets), feature if i == len(up) - 2 else None)
        yield
    finally:
        for i, block in enumerate(down):
            unet.down_blocks[i] = block
        unet.mid_block = mid
        for i, block in enumerate(up):
            unet.up_blocks[i] = block


class Shallow(torch.nn.Module):
    """The UNet's first down block and last up block around a cached deep feature (the last input)."""

    def __init__(self, graph: torch.nn.Module):
        super().__init__()
        self.graph = graph

    def forward(self, *tensors: torch.Tensor):
        *inputs, feature = tensors
        with _deep_blocks_skipped(_unet(self.graph), [feature]):
            return self.graph(*inputs)


def deep_cache_specs(unet: ComponentSpec) -> tuple[ComponentSpec, ComponentSpec]:
    """The UNet spec with the feature as an extra output, and the shallow UNet's spec."""
    inner = unet.module
    if len(_unet(inner).up_blocks) < 2:
        raise ValueError("Step caching needs a UNet with at least two up blocks.")
    full = FullWithFeature(inner).eval()
    with torch.no_grad():
        feature = full(*unet.example_inputs().values())[-1]
    feature_shape = tuple(feature.shape)

    def shallow_inputs(gen: torch.Generator) -> dict[str, torch.Tensor]:
        return {**unet.make_inputs(gen), FEATURE: torch.randn(feature_shape, generator=gen)}

    full_spec = ComponentSpec(
        name=unet.name,
        role=unet.role,
        module=full,
        make_inputs=unet.make_inputs,
        output_names=[*unet.output_names, FEATURE],
        config=unet.config,
        output_class=unet.output_class,
        static={**unet.static, "deep_cache": True},
    )
    shallow_spec = ComponentSpec(
        name=SHALLOW_COMPONENT,
        role="unet_deep_cache",
        module=Shallow(inner).eval(),
        make_inputs=shallow_inputs,
        output_names=list(unet.output_names),
        config=unet.config,
        static={**unet.static, "deep_cache": True},
    )
    return full_spec, shallow_spec
