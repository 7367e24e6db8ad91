"""Input images for /v1/images/edits: decoded, checked and converted, or refused with a clear 400."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import APIError

# Decoding more pixels than this is refused before decoding (PIL's own bomb check is at 89M pixels).
MAX_PIXELS = 4096 * 4096


def _open(data: bytes, param: str) -> Image.Image:
    if not data:
        raise APIError(400, f"`{param}` is an empty file; send a PNG, JPEG or WebP image.", param=param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise APIError(
                    400, f"`{param}` is {width}x{height} pixels, more than this server decodes ({MAX_PIXELS}); "
                    "send an image at the requested size.", param=param, code="image_too_large",
                )  # fmt: skip
            if getattr(image, "n_frames", 1) > 1:
                raise APIError(
                    400, f"`{param}` is animated ({image.n_frames} frames); send a single still image.", param=param
                )
            image.load()
    except APIError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise APIError(
            400, f"`{param}` is too large to decode safely: {error}", param=param, code="image_too_large"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise APIError(
            400, f"`{param}` is not a readable image ({error}); send a PNG, JPEG or WebP file.", param=param
        ) from None
    if width == 0 or height == 0:
        raise APIError(400, f"`{param}` has no pixels ({width}x{height}).", param=param)
    return image


def _eight_bit(image: Image.Image) -> Image.Image:
    """16- and 32-bit single-channel images scaled to 8 bits (PIL's convert would clip them to white)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        return Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "F":
        return Image.fromarray(np.clip(np.asarray(image) * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return image


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
    image = _eight_bit(_open(data, "image"))
    return _fit(image.convert("RGB"), "image", size, resize)


def read_mask(data: bytes, image_size: tuple[int, int], size: tuple[int, int], *, resize: bool = False) -> Image.Image:
    """The inpainting mask as diffusers wants it ("L", white = repaint).

    A mask with transparency follows OpenAI's rule (fully transparent = edit); one without follows
    diffusers' (white = repaint).
    """
    mask = _eight_bit(_open(data, "mask"))
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
