"""PixArt-Σ: a DiT denoiser over T5 prompt embeddings, compiled ahead of time."""

from __future__ import annotations

import importlib.util
from typing import Any

from diffusers import PixArtSigmaPipeline
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
    ASPECT_RATIO_256_BIN,
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
)
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN

from .base import AOTPipelineMixin

# The aspect-ratio bins diffusers' PixArt-Σ pipeline snaps a requested size to, by the transformer's sample size.
_BINS = {256: ASPECT_RATIO_2048_BIN, 128: ASPECT_RATIO_1024_BIN, 64: ASPECT_RATIO_512_BIN, 32: ASPECT_RATIO_256_BIN}


class AOTPixArtSigmaPipeline(AOTPipelineMixin, PixArtSigmaPipeline):
    """Text-to-image with PixArt-Σ: the T5 encoder (at the compiled ``max_sequence_length``), the transformer and
    the VAE compiled.

    With ``use_resolution_binning`` (diffusers' default) a requested size is snapped to the nearest of the model's
    aspect-ratio bins, generated there and resized back, as diffusers does: the bin is what must be compiled.
    """

    diffusers_class = PixArtSigmaPipeline

    def check_call(self, call: dict[str, Any]) -> tuple[int, int]:
        if call.get("clean_caption") and not _caption_cleaning_available():
            # Without beautifulsoup4 and ftfy diffusers warns on every call and goes on without cleaning: the same
            # result, without the warning.
            call["clean_caption"] = False
        if not call.get("use_resolution_binning"):
            return super().check_call(call)
        # diffusers generates at the bin and resizes to the size asked: the bin is what must be compiled.
        shapes = self.static_shapes
        asked = {name: call.get(name) or getattr(shapes, name) for name in ("height", "width")}
        call["height"], call["width"] = self._binned_size(**asked)
        try:
            return super().check_call(call)
        finally:
            call.update(asked)

    def _binned_size(self, height: int, width: int) -> tuple[int, int]:
        """The compiled size diffusers will generate ``height`` x ``width`` at with resolution binning on."""
        sample_size = self.transformer.config.sample_size
        bins = _BINS.get(sample_size)
        compiled = ", ".join(f"{h}x{w}" for h, w in self.compiled_sizes)
        if bins is None:
            raise ValueError(
                f"use_resolution_binning snaps sizes to PixArt's aspect-ratio bins, which exist for transformers of "
                f"sample size {sorted(_BINS)}; this one's is {sample_size}. Call with use_resolution_binning=False "
                f"at a compiled size ({compiled})."
            )
        binned = tuple(self.image_processor.classify_height_width_bin(height, width, ratios=bins))
        if binned not in self.compiled_sizes:
            raise ValueError(
                f"With use_resolution_binning (the default) height={height}, width={width} is generated at "
                f"{binned[0]}x{binned[1]} and resized back, but this pipeline was compiled for {compiled}. Ask for a "
                f"compiled size, call with use_resolution_binning=False, or export with --extra-sizes "
                f"{binned[0]}x{binned[1]}."
            )
        return binned


def _caption_cleaning_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("bs4", "ftfy"))
