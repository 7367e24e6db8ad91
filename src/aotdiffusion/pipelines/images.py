"""Input images and masks checked against the compiled size before diffusers sees them.

diffusers resizes an inpainting image to ``height``/``width`` silently and fails deep inside the
UNet on an img2img image of another size; here both are a clear error unless the caller asks for
a resize. Any PIL mode (RGBA, L, P, CMYK, 16-bit, ...) is converted: images to RGB, masks to L.
Files and uploaded bytes are decoded here too (``decode_image``), for the CLI and the server alike:
an image that cannot be decoded safely is a ``ValueError`` that says why, never a crash.
"""

from __future__ import annotations

import io
import struct
import warnings
from typing import Any

import numpy as np
import PIL.Image
import torch

from ..shapes import PipelineShapes

_MODES = {"image": "RGB", "mask_image": "L", "control_image": "RGB"}
# Decoding more pixels than this is refused before decoding (PIL's own bomb check is at 89M pixels).
MAX_PIXELS = 4096 * 4096


class ImageInputError(ValueError):
    """An input image that cannot be used, with the reason; ``code`` names the kind for HTTP errors."""

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        self.code = code


def decode_image(data: bytes, param: str = "image") -> PIL.Image.Image:
    """Decodes image file bytes, refusing empty, unreadable, animated, pixel-less and over-large images.

    The pixel count is checked from the header, before anything is decoded (a decompression bomb).
    """
    if not data:
        raise ImageInputError(f"`{param}` is an empty file; give a PNG, JPEG or WebP image.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            image = PIL.Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ImageInputError(
                    f"`{param}` is {width}x{height} pixels, more than {MAX_PIXELS} (4096x4096) are decoded; give an "
                    "image at the compiled size.",
                    code="image_too_large",
                )
            check_still(image, param)
            image.load()
    except ImageInputError:
        raise
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as error:
        raise ImageInputError(f"`{param}` is too large to decode safely: {error}", code="image_too_large") from None
    except (PIL.UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error) as error:
        raise ImageInputError(f"`{param}` is not a readable image ({error}); give a PNG, JPEG or WebP file.") from None
    return image


def check_still(image: PIL.Image.Image, param: str) -> None:
    """A still image with pixels: an animation or an empty image is refused, never a silent first frame."""
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        raise ImageInputError(
            f"`{param}` is animated ({frames} frames); give a single still image (e.g. image.seek(0); image.copy())."
        )
    if image.width == 0 or image.height == 0:
        raise ImageInputError(f"`{param}` has no pixels ({image.width}x{image.height}).")


def eight_bit(image: PIL.Image.Image) -> PIL.Image.Image:
    """16- and 32-bit single-channel images scaled to 8 bits (PIL's convert would clip them to white)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        return PIL.Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "F":
        return PIL.Image.fromarray(np.clip(np.asarray(image) * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return image


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
        try:  # a lazily opened file is decoded here: a broken one fails in PIL's reader
            check_still(item, key)
            item.load()
            item = eight_bit(item)
            if item.mode != mode:
                item = item.convert(mode)
        except ImageInputError:
            raise
        except (OSError, ValueError, SyntaxError, struct.error) as error:
            raise ImageInputError(f"`{key}` is not a readable image ({error or type(error).__name__}).") from None
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


def image_size(image: Any) -> tuple[int, int] | None:
    """(height, width) of a call's input image (the first of a list); None for none or a latent."""
    item = image[0] if isinstance(image, (list, tuple)) and image else image
    if item is None or _is_latent(item) or isinstance(item, (list, tuple)):
        return None
    try:
        width, height = _size(item)
    except TypeError:
        return None
    return (height, width)


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
