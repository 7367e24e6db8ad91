"""Input images and masks checked against the compiled size before diffusers sees them.

diffusers resizes an inpainting image to ``height``/``width`` silently and fails deep inside the
UNet on an img2img image of another size; here both are a clear error unless the caller asks for
a resize. Any PIL mode (RGBA, L, P, ...) is converted: images to RGB, masks to L.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import torch

from ..shapes import PipelineShapes

_MODES = {"image": "RGB", "mask_image": "L"}


def conform_images(call: dict[str, Any], shapes: PipelineShapes, vae_scale_factor: int, *, resize: bool) -> None:
    given = {
        key: call[key] if isinstance(call[key], list) else [call[key]] for key in _MODES if call.get(key) is not None
    }
    pixel_sizes = {key: {_size(item) for item in items if not _is_latent(item)} for key, items in given.items()}
    if pixel_sizes.get("image") and pixel_sizes.get("mask_image") and pixel_sizes["image"] != pixel_sizes["mask_image"]:
        raise ValueError(
            f"`mask_image` is {_fmt(pixel_sizes['mask_image'])} but `image` is {_fmt(pixel_sizes['image'])} "
            "(width x height): a mask must have the size of its image."
        )
    for key, items in given.items():
        conformed = [_conform_one(item, key, _MODES[key], shapes, vae_scale_factor, resize) for item in items]
        call[key] = conformed if isinstance(call[key], list) else conformed[0]


def _is_latent(item: Any) -> bool:
    # A 4-channel tensor is a latent (SDXL base -> refiner hand-off), not an image.
    return isinstance(item, torch.Tensor) and item.ndim >= 3 and item.shape[-3] == 4


def _conform_one(item: Any, key: str, mode: str, shapes: PipelineShapes, scale: int, resize: bool) -> Any:
    target = (shapes.width, shapes.height)
    if isinstance(item, PIL.Image.Image):
        if item.mode != mode:
            item = item.convert(mode)
        if item.size != target:
            if not resize:
                _size_error(key, item.size, shapes)
            resample = PIL.Image.NEAREST if key == "mask_image" else PIL.Image.LANCZOS
            item = item.resize(target, resample)
        return item
    size = _size(item)
    if _is_latent(item):
        if size != (shapes.width // scale, shapes.height // scale):
            raise ValueError(
                f"`{key}` is a latent of {size[0]}x{size[1]} (width x height) but this pipeline was compiled for "
                f"{shapes.width // scale}x{shapes.height // scale} latents ({shapes.width}x{shapes.height} images)."
            )
        return item
    if size != target:
        if resize:
            raise ValueError(f"resize_images=True resizes PIL images only; resize the {type(item).__name__} `{key}`.")
        _size_error(key, size, shapes)
    return item


def _size(item: Any) -> tuple[int, int]:
    """(width, height) of a PIL image, an HWC/BHWC array or a CHW/BCHW tensor."""
    if isinstance(item, PIL.Image.Image):
        return item.size
    if isinstance(item, np.ndarray):
        h, w = (item.shape[-3], item.shape[-2]) if item.ndim >= 3 else item.shape[-2:]
        return (w, h)
    if isinstance(item, torch.Tensor):
        return (item.shape[-1], item.shape[-2])
    raise TypeError(f"Unsupported image type {type(item).__name__}; pass a PIL image, numpy array or torch tensor.")


def _size_error(key: str, size: tuple[int, int], shapes: PipelineShapes) -> None:
    raise ValueError(
        f"`{key}` is {size[0]}x{size[1]} (width x height) but this pipeline was compiled for {shapes.width}x"
        f"{shapes.height} images. Resize it, pass resize_images=True to resize it to {shapes.width}x{shapes.height}, "
        f"or export again with --height {size[1]} --width {size[0]}."
    )


def _fmt(sizes: set[tuple[int, int]]) -> str:
    return ", ".join(f"{w}x{h}" for w, h in sorted(sizes))
