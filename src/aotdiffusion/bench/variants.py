"""The pipelines a benchmark compares: how each one is built, in the process that measures it.

Each variant is a diffusers pipeline whose text encoder(s), UNet and VAE are run a different way;
the denoising loop, scheduler and image processing are diffusers' own in all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

VARIANTS = {
    "eager-fp32": "diffusers eager, fp32 (the default a user starts from)",
    "eager-bf16": "diffusers eager, bf16 weights and activations",
    "compile-bf16": "torch.compile, diffusion-fast CPU recipe: bf16, inductor, freezing, channels-last, fused QKV",
    "compile-fp32": "the same torch.compile recipe in fp32",
    "openvino": "OpenVINO as optimum-intel runs it: convert_model, static shapes, default precision hint",
    "openvino-fp32": "OpenVINO with the f32 precision hint",
    "openvino-int8": "OpenVINO, the UNet in NNCF's hybrid int8 as optimum-intel quantizes Stable Diffusion",
    "aotdiffusion": "aotdiffusion: the exported artifact, loaded without compiling",
    # Step caching (DeepCache): the export's shallow UNet on N-1 of every N steps (exported with --deep-cache).
    "aotdiffusion-cache2": "aotdiffusion with step caching, a full UNet pass every 2nd step",
    "aotdiffusion-cache3": "aotdiffusion with step caching, a full UNet pass every 3rd step",
    "aotdiffusion-cache5": "aotdiffusion with step caching, a full UNet pass every 5th step",
    # int8 (export --quantize int8): a second export, the UNet's convolutions and linears in int8.
    "aotdiffusion-int8": "aotdiffusion with the UNet in int8 (export --quantize int8)",
    "aotdiffusion-int8-cache3": "aotdiffusion int8 with step caching, a full UNet pass every 3rd step",
    "aotdiffusion-int8-cache5": "aotdiffusion int8 with step caching, a full UNet pass every 5th step",
}


def cache_interval(variant: str) -> int:
    """The step-caching interval a variant calls its pipeline with (1: none)."""
    _, _, interval = variant.partition("-cache")
    return int(interval) if variant.startswith("aotdiffusion") and interval else 1


def is_int8(variant: str) -> bool:
    """Whether a variant runs the int8 export (``--quantize int8``) instead of the float one."""
    return variant.startswith("aotdiffusion-int8")


DEFAULT_VARIANTS = ("eager-fp32", "eager-bf16", "compile-bf16", "openvino", "aotdiffusion")


@dataclass(frozen=True)
class BuildOptions:
    model: str
    aot_dir: str
    height: int
    width: int
    # torch.compile mode for the compile-* variants; diffusion-fast uses max-autotune on GPUs, which
    # autotunes every GEMM and takes far longer to compile on a small CPU.
    compile_mode: str | None = None


def build(variant: str, options: BuildOptions) -> tuple[Any, str]:
    """Returns the pipeline and a short description of the precision it runs in."""
    if variant not in VARIANTS:
        raise ValueError(f"Unknown benchmark variant {variant!r}; choose from {', '.join(VARIANTS)}.")
    if variant.startswith("aotdiffusion"):
        from ..pipelines.auto import AOTDiffusionPipeline

        pipe = AOTDiffusionPipeline.from_pretrained(options.aot_dir)
        interval = cache_interval(variant)
        return pipe, _aot_precision(pipe) + (f", cache interval {interval}" if interval > 1 else "")
    import torch

    dtype = torch.bfloat16 if variant.endswith("bf16") else torch.float32
    pipe = _eager(options.model, dtype)
    if variant.startswith("compile"):
        _compile(pipe, options.compile_mode)
        return pipe, str(dtype).removeprefix("torch.")
    if variant.startswith("openvino"):
        return _openvino(pipe, options, "f32" if variant == "openvino-fp32" else None, int8=variant == "openvino-int8")
    return pipe, str(dtype).removeprefix("torch.")


def _eager(model: str, dtype: Any):
    from diffusers import DiffusionPipeline

    from ..pipelines.auto import read_model_index

    extra = {"safety_checker": None} if "safety_checker" in read_model_index(model) else {}
    return DiffusionPipeline.from_pretrained(model, dtype=dtype, **extra)


def _compile(pipe: Any, mode: str | None) -> None:
    import torch

    # diffusion-fast's recipe (its CPU variant keeps bf16 and adds freezing, which folds and prepacks
    # the weights for oneDNN): fused QKV, channels-last, the UNet and the VAE decoder compiled whole.
    torch._inductor.config.conv_1x1_as_mm = True
    torch._inductor.config.freezing = True
    pipe.fuse_qkv_projections()
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    pipe.unet = torch.compile(pipe.unet, mode=mode, fullgraph=True)
    pipe.vae.decode = torch.compile(pipe.vae.decode, mode=mode, fullgraph=True)


def _openvino(pipe: Any, options: BuildOptions, hint: str | None, *, int8: bool = False) -> tuple[Any, str]:
    import gc
    import inspect

    from ..export.pipeline import default_shapes
    from .openvino import openvino_parts

    shapes = default_shapes(pipe, height=options.height, width=options.width)
    pipe.set_progress_bar_config(disable=True)  # the int8 calibration runs it
    parts = openvino_parts(pipe, shapes, precision_hint=hint, int8_unet=int8)
    precision = parts["unet"].compiled.precision + (", UNet hybrid int8" if int8 else "")
    cls, components = type(pipe), {**pipe.components, **parts}
    if "requires_safety_checker" in inspect.signature(cls.__init__).parameters:
        components["requires_safety_checker"] = False
    # Only OpenVINO's compiled copies run from here on: drop the torch weights.
    del pipe
    gc.collect()
    return cls(**components), f"openvino {precision}"


def _aot_precision(pipe: Any) -> str:
    manifest = pipe.unet.compiled.manifest
    quantization = manifest.get("quantization")
    if quantization:
        return f"int8 conv/linear ({quantization['activation_bits']}-bit activations), rest fp32"
    precision, measured = manifest["precision"], " (measured)" if "precision_choice" in manifest else ""
    if precision.get("auto_cast") in (None, "none") or precision["auto_cast_type"] == "fp32":
        winograd = manifest["compiler"].get("winograd")
        return "float32" + measured + (f", Winograd for {len(winograd)} 3x3 conv shapes" if winograd else "")
    return f"{precision['auto_cast_type']} ({precision['auto_cast']}){measured}"
