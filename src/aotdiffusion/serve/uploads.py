"""Input images for /v1/images/edits: decoded, checked and converted, or refused with a clear 400."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..pipelines.images import ImageInputError, decode_image, eight_bit
from .errors import APIError


def _open(data: bytes, param: str) -> Image.Image:
    try:
        return eight_bit(decode_image(data, param))
    except ImageInputError as error:
        raise APIError(400, str(error), param=param, code=error.code) from None


def _fit(image: Image.Image, param: str, size: tuple[int, int], resize: bool) -> Image.Image:
    if image.size == size:
        return image
    if not resize:
        raise APIError(
            400, f"`{param}` is {image.size[0]}x{image.size[1]} but the request is for {size[0]}x{size[1]} images. "
            "Send it at that size, ask for another served size, or pass resize=true to resize it.", param=param,
        )  # fmt: skip
    return image.resize(size, Image.Resampling.LANCZOS)


def read_image(data: bytes, size: tuple[int, int], *, resize: bool = False) -> Image.Image:
    """The image to edit as RGB at ``size`` (width, height); an alpha channel is dropped."""
    image = _open(data, "image")
    return _fit(image.convert("RGB"), "image", size, resize)


def read_mask(data: bytes, image_size: tuple[int, int], size: tuple[int, int], *, resize: bool = False) -> Image.Image:
    """The inpainting mask as diffusers wants it ("L", white = repaint).

    A mask with transparency follows OpenAI's rule (fully transparent = edit); one without follows
    diffusers' (white = repaint).
    """
    mask = _open(data, "mask")
    if mask.size != image_size:
        raise APIError(
            400, f"`mask` is {mask.size[0]}x{mask.size[1]} but `image` is {image_size[0]}x{image_size[1]}; "
            "the mask must have the image's size.", param="mask",
        )  # fmt: skip
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        alpha = np.asarray(mask.convert("RGBA"))[..., 3]
        mask = Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), "L")
    else:
        mask = mask.convert("L")
    return _fit(mask, "mask", size, resize)
