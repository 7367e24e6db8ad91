"""``AOTDiffusionPipeline``: the right compiled class for any model or export, like ``DiffusionPipeline``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import artifact
from .latent_consistency import AOTLatentConsistencyModelPipeline
from .pixart import AOTPixArtSigmaPipeline
from .stable_diffusion import (
    AOTStableDiffusionControlNetImg2ImgPipeline,
    AOTStableDiffusionControlNetInpaintPipeline,
    AOTStableDiffusionControlNetPipeline,
    AOTStableDiffusionImg2ImgPipeline,
    AOTStableDiffusionInpaintPipeline,
    AOTStableDiffusionInstructPix2PixPipeline,
    AOTStableDiffusionPipeline,
)
from .stable_diffusion_3 import AOTStableDiffusion3Pipeline
from .stable_diffusion_xl import (
    AOTStableDiffusionXLControlNetImg2ImgPipeline,
    AOTStableDiffusionXLControlNetInpaintPipeline,
    AOTStableDiffusionXLControlNetPipeline,
    AOTStableDiffusionXLImg2ImgPipeline,
    AOTStableDiffusionXLInpaintPipeline,
    AOTStableDiffusionXLInstructPix2PixPipeline,
    AOTStableDiffusionXLPipeline,
)

PIPELINES = {
    cls.__name__: cls
    for cls in (
        AOTStableDiffusionPipeline,
        AOTStableDiffusionImg2ImgPipeline,
        AOTStableDiffusionInpaintPipeline,
        AOTStableDiffusionXLPipeline,
        AOTStableDiffusionXLImg2ImgPipeline,
        AOTStableDiffusionXLInpaintPipeline,
        AOTLatentConsistencyModelPipeline,
        AOTStableDiffusionInstructPix2PixPipeline,
        AOTStableDiffusionXLInstructPix2PixPipeline,
        AOTStableDiffusionControlNetPipeline,
        AOTStableDiffusionControlNetImg2ImgPipeline,
        AOTStableDiffusionControlNetInpaintPipeline,
        AOTStableDiffusionXLControlNetPipeline,
        AOTStableDiffusionXLControlNetImg2ImgPipeline,
        AOTStableDiffusionXLControlNetInpaintPipeline,
        AOTPixArtSigmaPipeline,
        AOTStableDiffusion3Pipeline,
    )
}
# The diffusers class a model's model_index.json names -> the compiled class that exports it.
BY_DIFFUSERS_CLASS = {cls.diffusers_class.__name__: cls for cls in PIPELINES.values()}
# --task -> (text-to-image, image-to-image, inpainting) classes of that family.
FAMILIES: dict[str, tuple[type, type | None, type | None]] = {
    "stable-diffusion": (
        AOTStableDiffusionPipeline,
        AOTStableDiffusionImg2ImgPipeline,
        AOTStableDiffusionInpaintPipeline,
    ),
    "stable-diffusion-xl": (
        AOTStableDiffusionXLPipeline,
        AOTStableDiffusionXLImg2ImgPipeline,
        AOTStableDiffusionXLInpaintPipeline,
    ),
    "latent-consistency": (AOTLatentConsistencyModelPipeline, None, None),
    # Instruction editing: the input image is what the prompt edits, so image-to-image is all they do.
    "instruct-pix2pix": (AOTStableDiffusionInstructPix2PixPipeline, None, None),
    "stable-diffusion-xl-instruct-pix2pix": (AOTStableDiffusionXLInstructPix2PixPipeline, None, None),
    "pixart-sigma": (AOTPixArtSigmaPipeline, None, None),
    "stable-diffusion-3": (AOTStableDiffusion3Pipeline, None, None),
}
EDITING = ("instruct-pix2pix", "stable-diffusion-xl-instruct-pix2pix")
# Guided by conditioning images (export with --controlnet): text-to-image takes them as `image`, image-to-image and
# inpainting as `control_image`.
FAMILIES["stable-diffusion-controlnet"] = (
    AOTStableDiffusionControlNetPipeline,
    AOTStableDiffusionControlNetImg2ImgPipeline,
    AOTStableDiffusionControlNetInpaintPipeline,
)
FAMILIES["stable-diffusion-xl-controlnet"] = (
    AOTStableDiffusionXLControlNetPipeline,
    AOTStableDiffusionXLControlNetImg2ImgPipeline,
    AOTStableDiffusionXLControlNetInpaintPipeline,
)
CONTROLNET_FAMILIES = ("stable-diffusion-controlnet", "stable-diffusion-xl-controlnet")
# The family a model's task becomes with --controlnet.
WITH_CONTROLNET = {
    "stable-diffusion": "stable-diffusion-controlnet",
    "stable-diffusion-xl": "stable-diffusion-xl-controlnet",
}


def family_of(pipeline_cls: type) -> str:
    return next(task for task, classes in FAMILIES.items() if pipeline_cls in classes)


def read_model_index(model: str | Path, **hub_kwargs: Any) -> dict[str, Any]:
    path = Path(model)
    if path.is_dir():
        return artifact.read_json(path / artifact.MODEL_INDEX_FILE)
    from huggingface_hub import hf_hub_download

    return artifact.read_json(Path(hf_hub_download(str(model), artifact.MODEL_INDEX_FILE, **hub_kwargs)))


def pipeline_class_for(model: str | Path, *, exported: bool, **hub_kwargs: Any) -> type:
    index = read_model_index(model, **hub_kwargs)
    if exported:
        block = index.get(artifact.MANIFEST_KEY)
        if block is None:
            artifact.read_pipeline_index(Path(model))  # raises the "not compiled, export it" error
        name = block.get("pipeline_class")
        if name not in PIPELINES:
            raise artifact.ArtifactError(
                f"{model} names the pipeline class {name!r}, which aotdiffusion does not have; known: "
                f"{', '.join(sorted(PIPELINES))}. Export the model again with this version."
            )
        return PIPELINES[name]
    name = index.get("_class_name")
    if name not in BY_DIFFUSERS_CLASS:
        supported = ", ".join(sorted(BY_DIFFUSERS_CLASS))
        raise ValueError(f"{model} is a {name}, which aotdiffusion does not compile; supported: {supported}.")
    return BY_DIFFUSERS_CLASS[name]


class AOTDiffusionPipeline:
    """Not instantiated: ``from_pretrained`` returns an instance of the matching compiled pipeline class."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *, export: bool = False, **kwargs: Any):
        hub = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
        if not export and not Path(pretrained_model_name_or_path).is_dir():
            from .base import _local_or_download

            trusted = kwargs.get("trust_remote_code", False)
            pretrained_model_name_or_path = _local_or_download(pretrained_model_name_or_path, hub, trusted)
        pipeline_cls = pipeline_class_for(pretrained_model_name_or_path, exported=not export, **hub)
        return pipeline_cls.from_pretrained(pretrained_model_name_or_path, export=export, **kwargs)


# What a served export can do, by name (the names the server and its page use).
TEXT_TO_IMAGE, IMAGE_TO_IMAGE, INPAINTING = "text-to-image", "image-to-image", "inpainting"


def task_classes(exported_cls: type, *, unet_in_channels: int, vae_encoder: bool) -> dict[str, type]:
    """The compiled classes one export can run, by task, all over the same loaded components.

    A text-to-image (or image-to-image) export with the VAE encoder also does image-to-image and
    inpainting (diffusers' inpainting pipeline blends latents for a 4-channel UNet); a 9-channel
    inpainting UNet only inpaints; without the encoder only text-to-image is possible. InstructPix2Pix
    edits an input image: image-to-image.
    """
    family = family_of(exported_cls)
    if family in EDITING:
        return {IMAGE_TO_IMAGE: exported_cls}
    text, image, inpaint = FAMILIES[family]
    if unet_in_channels != 4:
        return {INPAINTING: exported_cls}
    tasks = {TEXT_TO_IMAGE: text}
    if vae_encoder:
        tasks.update({name: cls for name, cls in ((IMAGE_TO_IMAGE, image), (INPAINTING, inpaint)) if cls is not None})
    return tasks
