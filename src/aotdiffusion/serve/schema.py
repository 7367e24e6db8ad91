"""The API's request and response bodies: OpenAI's Images API with diffusers-named extensions."""

from __future__ import annotations

import re
from typing import Literal

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field

SIZE_PATTERN = re.compile(r"^(\d+)x(\d+)$")
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit seed; each image adds its index


class ImageOptions(BaseModel):
    """Fields shared by generations and edits."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(
        max_length=32000, description="What to draw. CLIP reads 77 tokens; the rest is cut, as diffusers does."
    )
    model: str | None = Field(None, description="A served model's id (GET /v1/models); default: the first served.")
    n: int = Field(1, ge=1, le=10, description="Number of images, 1-10 (OpenAI's limit).")
    size: str | None = Field(
        None, description='"WIDTHxHEIGHT", one of the sizes the model was compiled for; default or "auto": its first.'
    )
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description='Only "b64_json": this server keeps no images to link to.'
    )
    output_format: Literal["png"] | None = Field(None, description="Images are PNG.")
    user: str | None = Field(None, max_length=256, description="An end-user id, for the caller's records (unused).")
    negative_prompt: str | None = Field(
        None, max_length=32000, description="What to avoid (needs classifier-free guidance, guidance_scale > 1)."
    )
    num_inference_steps: int | None = Field(
        None, ge=1, le=1000, description="Denoising steps (default: 20; 4 for LCM models)."
    )
    guidance_scale: float | None = Field(
        None, ge=0, le=100, allow_inf_nan=False, description="Classifier-free guidance scale (default: diffusers')."
    )
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED - 64, description="Seed of the first image; image i uses seed + i. Default: random."
    )


class GenerationRequest(ImageOptions):
    stream: bool = Field(
        False,
        description="Server-sent events: image_generation.progress per denoising step, then "
        "image_generation.completed per image.",
    )


class EditOptions(ImageOptions):
    strength: float | None = Field(
        None, gt=0, le=1, allow_inf_nan=False, description="How much of the image to repaint, (0, 1]."
    )
    resize: bool = Field(
        False, description="Resize an image (and mask) of another size to the requested size instead of refusing it."
    )


class EditForm(EditOptions):
    """The multipart form of /v1/images/edits: the options and the files."""

    image: UploadFile = Field(description="The image to edit (PNG, JPEG or WebP).")
    mask: UploadFile | None = Field(
        None, description="Inpainting mask: fully transparent (OpenAI) or white (diffusers) = repaint."
    )


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None
    seed: int = Field(description="The seed that reproduces this image with the same request.")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "aotdiffusion"
    tasks: list[str] = Field(description="text-to-image, image-to-image, inpainting")
    sizes: list[str] = Field(description='Sizes it was compiled for, "WIDTHxHEIGHT"')
    batch_size: int = Field(description="Prompts per pipeline call (compiled)")
    images_per_prompt: int
    default_steps: int
    default_guidance_scale: float


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
