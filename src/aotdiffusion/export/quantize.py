"""``--quantize int8``: the UNet's convolutions and linears in int8, through torchao's PT2E flow for x86.

``X86InductorQuantizer`` marks every convolution and linear for static quantization (activations u8
per tensor, weights s8 per output channel); observers see the UNet's real inputs, recorded while the
eager pipeline runs a few built-in prompts at the export's shapes; ``convert_pt2e`` writes the
quantize/dequantize pairs, and AOTInductor with freezing fuses each pair with its operation into
oneDNN's int8 kernels (``qconv``/``qlinear``, weights prepacked at compile time). Attention,
normalisations and everything else stay fp32, as do the text encoders and the VAE (plain 8-bit
post-training quantization is what degrades Stable Diffusion images most in the VAE and the
attention; see the README for the measured difference).

Traps handled here: the compile must run under ``no_grad`` with freezing or the int8 operations
silently fall back to fp32 GEMMs (pytorch/ao #4566), so the compiled source is checked for the int8
kernels; and without VNNI, oneDNN's int8 kernels sum pairs of u8 x s8 products in int16
(``vpmaddubsw``), which saturates for activations above 127, so on such CPUs activations use 7 bits
(torchao's ``reduce_range``).
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import artifact
from ..shapes import PipelineShapes

QUANTIZE_MODES = ("none", "int8")
# The graphs that are quantized: the UNet holds nearly all of a pipeline's compute.
QUANTIZED_ROLES = ("unet", "unet_deep_cache")
# Validation tolerance of an int8 UNet (largest absolute error over the largest reference value, on
# random inputs). Measured on the full-size SD 1.5 architecture with random weights, AMD EPYC Zen 3: 0.04 simulated
# in fp32, up to 0.28 compiled without VNNI at 8-bit activations (int16 saturation) and 0.06 with the
# 7-bit activations used there. A broken graph is off by 100%.
INT8_TOLERANCE = 0.15
# What the observers see: the UNet's inputs while the eager pipeline denoises these prompts.
# Two prompts of three steps each (timesteps spread over the whole schedule): six UNet calls, about
# 3 minutes on a full-size SD 1.5 UNet on 2 cores of an AMD EPYC Zen 3, recording and observing included.
CALIBRATION_PROMPTS = (
    "a photo of an astronaut riding a horse on mars",
    "a watercolor painting of a lighthouse on a cliff at sunset",
)
CALIBRATION_STEPS = 3
_VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}
_INT8_KERNELS = re.compile(r"aoti_torch_cpu__(qconv\w*|qlinear\w*)\(")


class QuantizeError(RuntimeError):
    """int8 quantization that cannot run here or did not produce int8 kernels."""


def check_mode(quantize: str | None) -> str:
    quantize = quantize or "none"
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"`quantize` must be one of {QUANTIZE_MODES}, got {quantize!r}.")
    return quantize


def _pt2e() -> tuple[Callable, Callable, Any]:
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer
    except ImportError as error:
        raise QuantizeError(
            f"--quantize int8 needs torchao ({error}). Install it with `pip install 'aotdiffusion[int8]'`."
        ) from error
    return prepare_pt2e, convert_pt2e, x86_inductor_quantizer


def reduce_range() -> bool:
    """7-bit activations where oneDNN's int8 kernels would saturate in int16 (no VNNI instructions)."""
    flags = artifact.cpu_flags()
    return flags is None or not (flags & _VNNI_FLAGS)


def record_unet_inputs(
    pipe: Any,
    input_names: list[str],
    shapes: PipelineShapes,
    *,
    prompts: tuple[str, ...] = CALIBRATION_PROMPTS,
    steps: int = CALIBRATION_STEPS,
) -> list[dict[str, torch.Tensor]]:
    """The UNet's inputs, by compiled-graph input name, while the eager ``pipe`` runs ``prompts`` at ``shapes``.

    The pipeline's own ``__call__`` builds them (its text encoders, scheduler, guidance batch and,
    for image-to-image and inpainting pipelines, a neutral input image and mask), so calibration
    sees what a compiled call will.
    """
    calls: list[dict[str, torch.Tensor]] = []

    def record(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        bound = dict(zip(("sample", "timestep", "encoder_hidden_states"), args))
        bound.update(kwargs)
        bound.update(bound.pop("added_cond_kwargs", None) or {})
        inputs = {}
        for name in input_names:
            tensor = torch.as_tensor(bound[name]).detach().float()
            if name == "timestep":  # diffusers passes one timestep for the batch; the graph takes (batch,)
                tensor = tensor.reshape(-1).expand(shapes.unet_batch)
            inputs[name] = tensor.clone()
        calls.append(inputs)

    parameters = inspect.signature(pipe.__call__).parameters
    extra: dict[str, Any] = {}
    if "image" in parameters:
        from PIL import Image

        gray = np.full((shapes.height, shapes.width, 3), 127, dtype=np.uint8)
        extra["image"] = Image.fromarray(gray)
        if "mask_image" in parameters:
            mask = np.zeros((shapes.height, shapes.width), dtype=np.uint8)
            mask[:, shapes.width // 2 :] = 255
            extra["mask_image"] = Image.fromarray(mask)
    if "height" in parameters:  # InstructPix2Pix has none: its size is its image's
        extra.update(height=shapes.height, width=shapes.width)
    # Guidance on or off exactly as compiled: a scale above 1 doubles the UNet batch.
    guidance = 7.5 if shapes.classifier_free_guidance else 1.0
    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), shapes.batch_size):
                chunk = list(prompts[start : start + shapes.batch_size])
                chunk += chunk[-1:] * (shapes.batch_size - len(chunk))
                pipe(
                    prompt=chunk,
                    num_images_per_prompt=shapes.num_images_per_prompt,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    generator=torch.Generator().manual_seed(start),
                    output_type="latent",
                    **extra,
                )
    finally:
        handle.remove()
    return calls


def quantize_program(
    program: torch.export.ExportedProgram, calibration: list[dict[str, torch.Tensor]], *, seven_bit: bool
) -> tuple[torch.export.ExportedProgram, list[tuple[torch.Tensor, ...]]]:
    """The int8 program of ``program``, and the (fp32) outputs of each calibration call it observed.

    The last recorded call is held out (:func:`held_out`): validation runs it. The outputs are what the
    eager graph returns for those inputs (observers do not change values): the step-caching graph is
    calibrated on the deep feature they hold.
    """
    observed = calibration[:-1]
    if not observed:
        raise QuantizeError("int8 quantization needs at least two recorded UNet calls (one is held out).")
    prepare_pt2e, convert_pt2e, x86 = _pt2e()
    quantizer = x86.X86InductorQuantizer()
    quantizer.set_global(x86.get_default_x86_inductor_quantization_config(reduce_range=seven_bit))
    module = program.module()
    # The step-caching graph computes values its stand-ins then drop (the first down block's downsampler);
    # the quantizer cannot annotate an operation nobody uses, and the compiler would drop it anyway.
    module.graph.eliminate_dead_code()
    module.recompile()
    with torch.no_grad():
        prepared = prepare_pt2e(module, quantizer)
        outputs = []
        for inputs in observed:
            out = prepared(*inputs.values())
            outputs.append(tuple(out) if isinstance(out, (tuple, list)) else (out,))
        converted = convert_pt2e(prepared)
        quantized = torch.export.export(converted, tuple(observed[0].values()), strict=False)
    return quantized, outputs


def held_out(calibration: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The recorded call the observers never saw: an int8 graph is validated on real inputs it was not
    calibrated on (random inputs lie outside the range a static int8 graph is calibrated for)."""
    return calibration[-1]


@contextmanager
def quiet_int8_lowering() -> Iterator[None]:
    """torch 2.13's int8 lowering warns once per weight zero point about its own ``torch.tensor(tensor)``
    call: nothing a user can act on, kept off the export's output."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="To copy construct from a tensor", category=UserWarning)
        yield


def int8_kernels(folder: Path) -> dict[str, int]:
    """How many of each oneDNN int8 kernel a compiled component calls (read from its generated source)."""
    counts: dict[str, int] = {}
    for match in _INT8_KERNELS.finditer(artifact.generated_code(folder)):
        counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    return counts
