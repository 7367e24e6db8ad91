"""The model worker: one export's pipelines, running one packed batch per call.

A :class:`Runner` lives in the server's process (one replica) or in each replica process of a
:class:`~aotdiffusion.runtime.parallel.ReplicaPool` (:func:`replica` is that pool's factory). It knows
nothing of HTTP or queues: it receives a :class:`Batch` that fills the compiled batch exactly and
returns one PNG per image slot.
"""

from __future__ import annotations

import inspect
import io
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import artifact
from ..pipelines.auto import CONTROLNET_FAMILIES, PIPELINES, TEXT_TO_IMAGE, family_of, task_classes

FACTORY = f"{__name__}:replica"
# Steps when a request names none: diffusers' 50 is slow on a CPU; LCM models are made for a few.
DEFAULT_STEPS = {"latent-consistency": 4}
DEFAULT_STEPS_OTHERWISE = 20


@dataclass(frozen=True)
class ExportInfo:
    """What the server needs to know about an export, read from its manifest without loading any code."""

    folder: Path
    pipeline_class: str
    family: str
    width: int
    height: int
    batch_size: int
    images_per_prompt: int
    guidance_batch: bool  # compiled with the classifier-free guidance batch
    guidance_embedding: bool  # LCM: guidance is an input of the UNet, not a second batch half
    tasks: tuple[str, ...]
    default_guidance_scale: float
    default_steps: int
    default_strength: dict[str, float] = field(default_factory=dict)
    # Every image size (height, width) the export holds a graph for (export --extra-sizes), the main one first.
    sizes: tuple[tuple[int, int], ...] = ()

    def at_sizes(self) -> list[ExportInfo]:
        """This export as served at each of its compiled sizes (one pipeline, several graphs)."""
        return [
            replace(self, height=height, width=width) for height, width in self.sizes or [(self.height, self.width)]
        ]

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def slots(self) -> int:
        """Images one pipeline call makes."""
        return self.batch_size * self.images_per_prompt

    def guidance_problem(self, guidance_scale: float) -> str | None:
        """Why ``guidance_scale`` cannot run on this export's compiled UNet, or None when it can."""
        if self.guidance_embedding:
            return None
        if guidance_scale > 1 and not self.guidance_batch:
            return (
                f"guidance_scale={guidance_scale} needs classifier-free guidance, but this export was compiled without "
                "it (e.g. a Turbo model). Use guidance_scale <= 1 (0 is usual)."
            )
        if guidance_scale <= 1 and self.guidance_batch:
            return (
                f"guidance_scale={guidance_scale} turns classifier-free guidance off, but this export was compiled for "
                f"it. Use a guidance_scale above 1 (default {self.default_guidance_scale})."
            )
        return None

    @classmethod
    def read(cls, folder: str | Path) -> ExportInfo:
        import inspect

        folder = Path(folder)
        _, block = artifact.read_pipeline_index(folder)
        name = block.get("pipeline_class")
        if name not in PIPELINES:
            raise artifact.ArtifactError(
                f"{folder} names the pipeline class {name!r}, which aotdiffusion does not have."
            )
        exported = PIPELINES[name]
        if family_of(exported) in CONTROLNET_FAMILIES:
            raise artifact.ArtifactError(
                f"{folder} is a ControlNet export, which the server does not serve yet (its API has no conditioning "
                "image); run it with `aotdiffusion generate --control-image` or the Python API."
            )
        # The denoiser: a UNet, or a transformer (PixArt).
        denoiser = "unet" if "unet" in block["components"] else "transformer"
        unet = artifact.read_json(folder / denoiser / "config.json")
        tasks = task_classes(
            exported, unet_in_channels=unet["in_channels"], vae_encoder="vae_encoder" in block["components"]
        )
        shapes = block["shapes"]
        embedding = unet.get("time_cond_proj_dim") is not None
        text_cls = tasks.get(TEXT_TO_IMAGE, exported)
        signature = inspect.signature(text_cls.diffusers_class.__call__).parameters
        if shapes["classifier_free_guidance"] or embedding:
            guidance = float(signature["guidance_scale"].default)
        else:
            guidance = 0.0  # compiled without the guidance batch (e.g. Turbo): guidance must stay off
        strengths = {
            task: float(inspect.signature(cls.diffusers_class.__call__).parameters["strength"].default)
            for task, cls in tasks.items()
            if "strength" in inspect.signature(cls.diffusers_class.__call__).parameters
        }
        family = family_of(exported)
        return cls(
            folder=folder,
            pipeline_class=name,
            family=family,
            width=shapes["width"],
            height=shapes["height"],
            batch_size=shapes["batch_size"],
            images_per_prompt=shapes["num_images_per_prompt"],
            guidance_batch=shapes["classifier_free_guidance"],
            guidance_embedding=embedding,
            tasks=tuple(tasks),
            default_guidance_scale=guidance,
            default_steps=DEFAULT_STEPS.get(family, DEFAULT_STEPS_OTHERWISE),
            default_strength=strengths,
            sizes=tuple(tuple(size) for size in block.get("sizes", [])),
        )


@dataclass
class Batch:
    """One pipeline call at the compiled shapes: ``batch_size`` prompts, ``images_per_prompt`` seeds each.

    Picklable, so it crosses to a replica process as it is.
    """

    task: str
    prompts: list[str]
    negative_prompts: list[str] | None
    seeds: list[int]
    steps: int
    guidance_scale: float
    strength: float | None = None
    images: list[Any] | None = None  # PIL images, one per prompt (image-to-image, inpainting)
    masks: list[Any] | None = None  # PIL "L" masks, white = repaint (inpainting)
    size: tuple[int, int] | None = None  # (height, width): one of the export's sizes; None is its main one


class Runner:
    """One export loaded once, with a pipeline per task it serves; calls take turns (one device)."""

    def __init__(self, folder: str | Path, *, device: str | None = None, trust_remote_code: bool = False):
        import torch

        self.info = ExportInfo.read(folder)
        self._torch = torch
        exported = PIPELINES[self.info.pipeline_class].from_pretrained(
            folder, device=device, trust_remote_code=trust_remote_code
        )
        exported.set_progress_bar_config(disable=True)
        unet_channels = exported._denoiser.config.in_channels
        classes = task_classes(
            type(exported), unet_in_channels=unet_channels, vae_encoder=exported.vae.encoder is not None
        )
        self.pipelines = {task: exported.sibling(cls) for task, cls in classes.items()}

    def __call__(self, batch: Batch, report: Callable[[Any], None] | None = None) -> list[bytes]:
        torch = self._torch
        pipe = self.pipelines[batch.task]
        call: dict[str, Any] = {
            "prompt": batch.prompts,
            "num_inference_steps": batch.steps,
            "guidance_scale": batch.guidance_scale,
            "num_images_per_prompt": self.info.images_per_prompt,
            "generator": [torch.Generator().manual_seed(seed) for seed in batch.seeds],
            "output_type": "pil",
        }
        if batch.size is not None and "height" in inspect.signature(pipe.diffusers_class.__call__).parameters:
            call["height"], call["width"] = batch.size  # image-to-image takes the size of its (resized) images
        if batch.negative_prompts is not None:
            call["negative_prompt"] = batch.negative_prompts
        if batch.strength is not None:
            call["strength"] = batch.strength
        if batch.images is not None:
            call["image"] = batch.images
        if batch.masks is not None:
            call["mask_image"] = batch.masks
        if report is not None:

            def on_step(pipe, step: int, timestep, tensors: dict) -> dict:
                report({"step": step + 1, "total": pipe.num_timesteps})
                return tensors

            call["callback_on_step_end"] = on_step
        images = pipe(**call).images
        return [_png(image) for image in images]


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def replica(folder: str, trust_remote_code: bool = False, *, device: str | None = None):
    """:class:`~aotdiffusion.runtime.parallel.ReplicaPool` factory: a :class:`Runner` in the replica process."""
    runner = Runner(folder, device=device, trust_remote_code=trust_remote_code)
    return lambda batch, report: runner(batch, report)
