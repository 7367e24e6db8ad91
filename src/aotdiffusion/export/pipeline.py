"""Exports a whole diffusers pipeline: every component compiled, validated and written with its manifest."""

from __future__ import annotations

import inspect
import resource
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from .. import artifact, checksums
from ..runtime.compiled import CompiledComponent
from ..runtime.memory import freed_memory_returned
from ..shapes import PipelineShapes
from . import attention, ip_adapter, sizes, staging, winograd
from .choose_precision import INT8, LinearChoice, choose, choose_fp32_linear, dominant_ops
from .compile import CompilerOptions, compile_component, write_manifest
from .components import (
    ComponentSpec,
    controlnet_spec,
    image_encoder_spec,
    ip_image_embeds_shapes,
    sd3_transformer_spec,
    t5_encoder_spec,
    text_encoder_spec,
    transformer_spec,
    unet_spec,
    vae_decoder_spec,
    vae_encoder_spec,
)
from .deep_cache import FEATURE, deep_cache_specs
from .lora import FUSED_ATTRIBUTE
from .precision import Precision
from .quantize import (
    CALIBRATION_PROMPTS,
    CALIBRATION_STEPS,
    INT8_TOLERANCE,
    QUANTIZED_ROLES,
    held_out,
    record_unet_inputs,
)
from .validate import ValidationError, ValidationReport, eager_reference, validate_component

# Pipeline attributes that are compiled; everything else (scheduler, tokenizers, feature extractor)
# is saved by its own library and loaded back by it.
COMPILED_ATTRIBUTES = (
    "text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "vae", "controlnet", "image_encoder",
)  # fmt: skip


@dataclass
class ComponentResult:
    name: str
    trace_s: float
    compile_s: float
    size_bytes: int
    validation: ValidationReport | None


# diffusers pipelines whose guidance batch holds three copies of the latents (text and image guidance).
THREE_WAY_GUIDANCE = ("StableDiffusionInstructPix2PixPipeline", "StableDiffusionXLInstructPix2PixPipeline")


CONTROLNET_PREFIX = "controlnet_"  # folders controlnet_0, controlnet_1, ...


def controlnets_of(pipe: DiffusionPipeline) -> list:
    """The pipeline's ControlNets, in order (a MultiControlNetModel's nets, or the one)."""
    controlnet = getattr(pipe, "controlnet", None)
    if controlnet is None:
        return []
    return list(getattr(controlnet, "nets", [controlnet]))


def denoiser_of(pipe: Any) -> Any:
    """The model the denoising loop calls: a UNet, or a transformer (PixArt)."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


def downsampling_of(denoiser: Any) -> int:
    """How many latent pixels one position of the denoiser's coarsest level covers: a UNet's downsampling, a
    transformer's patch size."""
    config = denoiser.config
    if "patch_size" in config:
        return config.patch_size
    return 2 ** (len(config.block_out_channels) - 1)


def _default_sequence_length(pipe: DiffusionPipeline) -> tuple[int, bool]:
    """The prompt length compiled by default, and whether the pipeline lets a call choose it: T5 pipelines take
    ``max_sequence_length`` (PixArt-Σ's default 300); CLIP ones always use the tokenizer's 77."""
    asked = inspect.signature(type(pipe).__call__).parameters.get("max_sequence_length")
    if asked is not None and isinstance(asked.default, int):
        return asked.default, True
    tokenizer = getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)
    return tokenizer.model_max_length, False


def default_shapes(pipe: DiffusionPipeline, **requested: Any) -> PipelineShapes:
    """Fills what the user left out from the model itself, the way diffusers' ``__call__`` does."""
    denoiser = denoiser_of(pipe)
    sample_size = denoiser.config.sample_size
    if isinstance(sample_size, int):
        sample_size = (sample_size, sample_size)
    requested = {k: v for k, v in requested.items() if v is not None}
    requested.setdefault("height", sample_size[0] * pipe.vae_scale_factor)
    requested.setdefault("width", sample_size[1] * pipe.vae_scale_factor)
    is_lcm = denoiser.config.get("time_cond_proj_dim") is not None
    if is_lcm and requested.get("classifier_free_guidance"):
        raise ValueError(
            "This UNet takes its guidance scale as an embedding (LCM, `time_cond_proj_dim` is set) and never runs "
            "a guidance batch: export it without --classifier-free-guidance."
        )
    requested.setdefault("classifier_free_guidance", not is_lcm)
    if type(pipe).__name__ in THREE_WAY_GUIDANCE:
        requested["guidance_copies"] = 3
    length, choosable = _default_sequence_length(pipe)
    if not choosable and requested.get("sequence_length", length) != length:
        raise ValueError(
            f"{type(pipe).__name__} encodes every prompt as {length} CLIP tokens, a length its text encoders are "
            f"built for; --sequence-length {requested['sequence_length']} is for T5 models (PixArt-Σ): leave it out."
        )
    requested.setdefault("sequence_length", length)
    shapes = PipelineShapes(**requested)
    shapes.check_divisible(pipe.vae_scale_factor, downsampling_of(denoiser))
    return shapes


def component_specs(
    pipe: DiffusionPipeline,
    shapes: PipelineShapes,
    precision: Precision,
    *,
    vae_encoder: bool = True,
    deep_cache: bool = False,
) -> list[ComponentSpec]:
    specs = []
    if getattr(pipe, "transformer", None) is not None:
        return _transformer_specs(pipe, shapes, deep_cache=deep_cache)
    for name in ("text_encoder", "text_encoder_2"):
        model = getattr(pipe, name, None)
        if model is not None:
            specs.append(text_encoder_spec(name, model, shapes))
    unet = pipe.unet
    added: dict[str, int] = {}
    if unet.config.addition_embed_type == "text_time":
        # SDXL: pooled text embeddings of text_encoder_2 plus `time_ids` micro-conditioning values
        # (6 for the base model, 5 for the refiner's aesthetic score variant).
        in_features = unet.add_embedding.linear_1.in_features
        text_embeds_dim = pipe.text_encoder_2.config.projection_dim
        added = {
            "text_embeds_dim": text_embeds_dim,
            "time_ids_dim": (in_features - text_embeds_dim) // unet.config.addition_time_embed_dim,
        }
    controlnets = controlnets_of(pipe)
    if controlnets:
        if deep_cache:
            raise ValueError(
                "Step caching (--deep-cache) skips the UNet's deep blocks, where a ControlNet's residuals enter: "
                "export a ControlNet pipeline without --deep-cache."
            )
        for i, net in enumerate(controlnets):
            spec, residuals = controlnet_spec(f"{CONTROLNET_PREFIX}{i}", net, shapes, pipe.vae_scale_factor, **added)
            specs.append(spec)
        added["residuals"] = residuals
    if ip_adapter.processors(unet):
        _check_ip_adapter_shapes(pipe, shapes, deep_cache)
        encoder = image_encoder_spec(pipe.image_encoder)
        specs.append(encoder)
        projections = [type(p).__name__ for p in unet.encoder_hid_proj.image_projection_layers]
        added["image_embeds"] = ip_image_embeds_shapes(encoder, projections)
    specs.append(unet_spec(unet, shapes, pipe.vae_scale_factor, **added))
    if deep_cache:
        if shapes.split_guidance_batch:
            raise ValueError(
                "Step caching (--deep-cache) keeps one cached feature per step, but a UNet compiled for half the "
                "guidance batch (--split-guidance-batch) runs twice per step. Export with one of the two."
            )
        specs.extend(deep_cache_specs(specs.pop()))
    fp16 = precision.auto_cast != "none" and precision.auto_cast_type == "fp16"
    if getattr(pipe, "text_encoder_2", None) is not None and fp16:
        if pipe.vae.config.force_upcast:
            raise ValueError(
                "The SDXL VAE overflows in fp16 (its config sets `force_upcast`), which gives NaNs and black images, "
                "and a compiled VAE cannot be upcast at run time. Export with --auto-cast-type bf16 (same range as "
                "fp32) or use a VAE fine-tuned for fp16 (e.g. madebyollin/sdxl-vae-fp16-fix) with force_upcast off."
            )
    if vae_encoder:
        specs.append(vae_encoder_spec(pipe.vae, shapes))
    specs.append(vae_decoder_spec(pipe.vae, shapes, pipe.vae_scale_factor))
    return specs


def _transformer_specs(pipe: DiffusionPipeline, shapes: PipelineShapes, *, deep_cache: bool) -> list[ComponentSpec]:
    """PixArt-Σ (its T5 encoder, its DiT) and SD3 (two CLIP encoders, T5, its MMDiT), and the VAE decoder."""
    if deep_cache:
        raise ValueError(
            "Step caching (--deep-cache) reuses a UNet's deep blocks between steps; a transformer (PixArt, SD3) has "
            "none: export it without --deep-cache."
        )
    if shapes.split_guidance_batch:
        raise ValueError(
            "--split-guidance-batch is for UNet models (data_parallel_mode='unet'); export the transformer model "
            "without it."
        )
    # No VAE encoder: only text-to-image is compiled for these (no image-to-image or inpainting sibling uses it).
    decoder = vae_decoder_spec(pipe.vae, shapes, pipe.vae_scale_factor)
    if not hasattr(pipe, "text_encoder_3"):  # PixArt-Σ: one T5 encoder
        return [
            t5_encoder_spec("text_encoder", pipe.text_encoder, shapes),
            transformer_spec(pipe.transformer, shapes, pipe.vae_scale_factor),
            decoder,
        ]
    # SD3: two CLIP encoders at their own 77 tokens, T5 (optional: diffusers uses zeros without it) at the compiled
    # prompt length.
    clip_length = pipe.tokenizer.model_max_length
    clip_shapes = replace(shapes, sequence_length=clip_length)
    specs = [text_encoder_spec(name, getattr(pipe, name), clip_shapes) for name in ("text_encoder", "text_encoder_2")]
    if pipe.text_encoder_3 is not None:
        specs.append(t5_encoder_spec("text_encoder_3", pipe.text_encoder_3, shapes))
    specs.append(sd3_transformer_spec(pipe.transformer, shapes, pipe.vae_scale_factor, clip_length))
    return [*specs, decoder]


def _check_ip_adapter_shapes(pipe: DiffusionPipeline, shapes: PipelineShapes, deep_cache: bool) -> None:
    """What an IP-Adapter export's static shapes allow: diffusers' image embeddings have no prompt batch, so one
    prompt a call (more run in chunks of one); its scales enter the UNet's cross-attention of every block."""
    name = type(pipe).__name__
    if shapes.batch_size != 1:
        raise ValueError(
            "diffusers gives an IP-Adapter's image embeddings no prompt batch, so an IP-Adapter export is compiled "
            f"for one prompt per call, not {shapes.batch_size}: export with --batch-size 1 (calls with more prompts "
            "run in chunks of one)."
        )
    refusals = [
        (shapes.guidance_copies != 2, f"{name} runs a three-way guidance batch, which diffusers' IP-Adapter image "
                                      "embeddings (two halves) do not match: export it without --ip-adapter"),
        (shapes.split_guidance_batch, "--split-guidance-batch splits every UNet input in two halves, the adapters' "
                                      "scales too: export without --split-guidance-batch"),
        (deep_cache, "step caching has no IP-Adapter inputs in its shallow graph yet: export without --deep-cache"),
    ]  # fmt: skip
    for refused, why in refusals:
        if refused:
            raise ValueError(f"An IP-Adapter cannot be compiled here: {why}.")


@contextmanager
def _heartbeat(log: Callable[[str], None], label: str, every: float = 30.0):
    """Says every ``every`` seconds that a long phase is still running (a full-size UNet takes minutes)."""
    start = time.perf_counter()
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every):
            log(f"      ... {label} ({time.perf_counter() - start:.0f}s)")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def export_pipeline(
    pipe: DiffusionPipeline,
    output_dir: str | Path,
    shapes: PipelineShapes,
    options: CompilerOptions,
    *,
    pipeline_class: str,
    validate: bool = True,
    vae_encoder: bool = True,
    deep_cache: bool = False,
    log: Callable[[str], None] | None = None,
    compile_fn: Callable[[ComponentSpec, CompilerOptions, Path], dict] = compile_component,
    release_weights: bool = False,
    overwrite: bool = False,
    compile_cache: bool = True,
    extra_sizes: Sequence[tuple[int, int]] = (),
) -> list[ComponentResult]:
    """Writes an exported pipeline to ``output_dir``; returns one result per component.

    The export is written beside ``output_dir`` and moved there when complete (export/staging.py):
    a non-empty ``output_dir`` is an error unless ``overwrite``, and is replaced only by a complete export.

    ``compile_fn`` is the per-component compiler (a seam for tests that need a broken artifact).
    ``compile_cache=False`` compiles every component even where the compile cache holds its package.
    ``extra_sizes`` ((height, width) pairs besides ``shapes``') gives each component whose inputs depend on the
    image size one more graph per size, sharing the main graph's weights (export/sizes.py).
    ``release_weights`` frees each eager text encoder and UNet once compiled and validated, so that a
    full-size SDXL export holds one fp32 model at a time; it leaves ``pipe`` unusable (for callers
    that loaded it only to export it).
    """
    # Flushed: the progress of a many-minute export must show when stdout is a log file too.
    log = log or partial(print, flush=True)
    output = Path(output_dir)
    if not vae_encoder and type(pipe).__name__ in THREE_WAY_GUIDANCE:
        raise ValueError(
            f"{type(pipe).__name__} encodes the image it edits with the VAE encoder: export it without "
            "--no-vae-encoder."
        )
    if compile_fn is compile_component and not compile_cache:
        compile_fn = partial(compile_component, cache=False)
    with staging.staged(output, overwrite=overwrite) as folder:
        pipe.set_progress_bar_config(disable=True)
        specs = component_specs(pipe, shapes, options.precision, vae_encoder=vae_encoder, deep_cache=deep_cache)
        extra_sizes = list(extra_sizes)
        if extra_sizes and options.quantize == INT8:
            raise ValueError(
                "--quantize int8 calibrates the UNet on recorded calls at one image size; export an int8 pipeline "
                "without --extra-sizes (one export per size)."
            )
        # The same components at each extra size, by name (the modules are shared; only example inputs differ).
        sized = {
            size: {
                spec.name: spec
                for spec in component_specs(
                    pipe,
                    replace(shapes, height=size[0], width=size[1]),
                    options.precision,
                    vae_encoder=vae_encoder,
                    deep_cache=deep_cache,
                )  # fmt: skip
            }
            for size in extra_sizes
        }
        also = "".join(f", {h}x{w}" for h, w in extra_sizes)
        log(
            f"Exporting {type(pipe).__name__} to {output}: {shapes.batch_size} prompt(s) x "
            f"{shapes.num_images_per_prompt} image(s), {shapes.height}x{shapes.width}{also}, "
            f"guidance batch {'on' if shapes.classifier_free_guidance else 'off'}, {options.precision.describe()} "
            f"on {options.device}"
        )
        int8 = options.quantize == "int8"
        if int8 and getattr(pipe, "unet", None) is None:
            raise ValueError(
                "--quantize int8 calibrates and quantizes a UNet; this model's denoiser is a transformer: export it "
                "without --quantize (bf16 is the fast type on CPUs with AVX512-BF16 or AMX)."
            )
        if int8 and ip_adapter.processors(pipe.unet):
            raise ValueError(
                "--quantize int8 calibrates the UNet without IP-Adapter inputs; export an IP-Adapter pipeline without "
                "it."
            )
        if int8 and controlnets_of(pipe):
            raise ValueError(
                "--quantize int8 calibrates the UNet without ControlNet residuals; export a ControlNet pipeline "
                "without it."
            )
        if int8:
            unet = next(spec for spec in specs if spec.role == "unet")
            log(
                f"Recording int8 calibration inputs: the eager pipeline on {len(CALIBRATION_PROMPTS)} built-in "
                f"prompts, {CALIBRATION_STEPS} steps each"
            )
            with _heartbeat(log, "calibration"):
                unet.calibration = record_unet_inputs(pipe, list(unet.example_inputs()), shapes)
        results = []
        hashed: dict[str, dict] = {}  # component -> the files its manifest records
        chosen: dict[str, str] = {}
        for i, spec in enumerate(specs, 1):
            step = f"[{i}/{len(specs)}] {spec.name}"
            # The shallow step-caching graph is int8 only with its full UNet, whose calibration outputs hold
            # its feature.
            quantizable = int8 and spec.role in QUANTIZED_ROLES and (spec.role == "unet" or chosen.get("unet") == INT8)
            if quantizable and spec.role != "unet":
                spec.calibration = _shallow_calibration(next(s for s in specs if s.role == "unet"))
            choice = ops = None
            if not (options.precision.is_auto or quantizable):
                tries = _compiled_in(replace(options, quantize="none"))
            else:
                ops = dominant_ops(spec)  # traced once on fake tensors, for both timings below
                only = None  # auto: every float type; else int8 is timed against the one the user asked for
                if not options.precision.is_auto:
                    only = "fp32" if options.precision.auto_cast == "none" else options.precision.auto_cast_type
                timed = " against int8" if quantizable else ""
                log(f"{step}: timing {only or 'fp32/bf16/fp16'}{timed} on this {options.device} to choose its type")
                choice = choose(spec, options.device, int8=quantizable, only=only, ops=ops, reuse=compile_cache)
                log(f"{step}: {choice.describe()}")
                if quantizable and choice.ranked[0] != INT8:
                    log(f"{step}: int8 is not faster than {choice.ranked[0]} on this {options.device}: not quantized")
                tries = [scoped for name in choice.ranked for scoped in _compiled_in(_options_for(options, name))]
            attention_choice = None
            if options.attention == "auto":
                first = tries[0].precision
                dtype = torch.float32 if first.auto_cast == "none" else first.low_dtype
                ops = ops if ops is not None else dominant_ops(spec)
                attention_choice = attention.choose(ops[0], dtype, options.device, reuse=compile_cache)
                chosen_attention = attention_choice.chosen if attention_choice else "sdpa"
                if attention_choice is not None:
                    log(f"{step}: {attention_choice.describe()}")
                tries = [replace(candidate, attention=chosen_attention) for candidate in tries]
            kernels = _KernelChoices(spec, options, ops, step, log, compile_cache)
            manifest = None
            for attempt, candidate in enumerate(tries):
                variants = kernels.options(candidate)
                for spec_options in variants:
                    last = attempt == len(tries) - 1 and spec_options is variants[-1]
                    manifest, report = _compile_and_validate(spec, spec_options, folder / spec.name, step, validate,
                                                             log, compile_fn, last=last)  # fmt: skip
                    if manifest is not None:
                        break
                if manifest is not None:
                    break
            linear_choice, conv_choice = kernels.linear, kernels.conv
            if choice is not None:
                chosen[spec.name] = INT8 if spec_options.quantize == INT8 else spec_options.precision.auto_cast_type
                manifest["precision_choice"] = {**choice.to_dict(), "chosen": chosen[spec.name]}
            if linear_choice is not None:
                manifest["fp32_linear_choice"] = {**linear_choice.to_dict(), "used": spec_options.fp32_linear}
            if conv_choice is not None:
                used = "winograd" if spec_options.winograd else "direct"
                manifest["conv_algorithm_choice"] = {**conv_choice.to_dict(), "used": used}
            size_records = _compile_extra_sizes(spec, spec_options, sized, folder, step, validate, log, compile_fn,
                                                hashed, shapes)  # fmt: skip
            if size_records:
                manifest["sizes"] = size_records
            if attention_choice is not None:
                manifest["attention_choice"] = {**attention_choice.to_dict(), "used": spec_options.attention}
            changed = (choice, linear_choice, conv_choice, attention_choice)
            if any(c is not None for c in changed) or size_records:
                write_manifest(folder / spec.name, spec.config, manifest)
            # The shallow step-caching graph, compiled after the UNet, runs the same UNet weights: freed after it.
            last_use = ("text_encoder", "transformer", "unet_deep_cache" if deep_cache else "unet")
            if release_weights and spec.role in last_use:
                spec.module.to("meta")  # the VAE's encoder and decoder share one module: kept
            hashed[spec.name] = manifest["files"]
            size = sum(record["bytes"] for record in manifest["files"].values())
            timings = manifest["timings"]
            results.append(ComponentResult(spec.name, timings["trace_s"], timings["compile_s"], size, report))
            log(
                f"[{i}/{len(specs)}] {spec.name}: done in {timings['trace_s'] + timings['compile_s']:.1f}s, "
                f"{size / 2**20:.1f} MiB"
                + (f", max rel error {report.max_rel_error:.2e}" if report else ", not validated")
            )
        save_uncompiled_parts(pipe.components, folder)
        _write_model_index(pipe, folder, shapes, options, pipeline_class, [s.name for s in specs], chosen,
                           extra_sizes)  # fmt: skip
    remember_checksums(output, hashed)
    log(summary_table(results))
    return results


class _KernelChoices:
    """A component's kernel choices: MKL or oneDNN fp32 linears, timed the first time an fp32 candidate is about
    to compile, and direct or Winograd 3x3 convolutions, timed in the type of the first candidate that computes
    them in fp32 or bf16 (every op in bf16): where a faster type validates, nothing is timed for the others."""

    def __init__(self, spec: ComponentSpec, options: CompilerOptions, ops, step: str, log, cache) -> None:
        self.spec, self.base, self.ops, self.step, self.log, self.cache = spec, options, ops, step, log, cache
        self.linear: LinearChoice | None = None
        self.linear_timed = False
        self.convs: dict[torch.dtype, winograd.ConvChoice | None] = {}
        # The convolution choice of the last candidate that had one (what the manifest records).
        self.conv: winograd.ConvChoice | None = None

    def options(self, candidate: CompilerOptions) -> list[CompilerOptions]:
        """The candidate's options with these choices resolved: Winograd first where it timed faster, then direct."""
        if _computes_in_fp32(candidate) and not self.linear_timed:
            self.linear_timed = True
            self._time_linears()
        dtype = _winograd_dtype(candidate)
        if dtype is not None and dtype not in self.convs:
            self.convs[dtype] = self._time_convs(dtype)
        choice = self.convs.get(dtype) if dtype is not None else None
        self.conv = choice or self.conv
        return _with_conv_choice(_with_fp32_linear(candidate, self.linear), choice)

    def _time_linears(self) -> None:
        if self.base.fp32_linear == "auto":
            self.linear = choose_fp32_linear(self.spec, self.base.device, ops=self.ops, reuse=self.cache)
            if self.linear is not None:
                self.log(f"{self.step}: {self.linear.describe()}")

    def _time_convs(self, dtype: torch.dtype) -> winograd.ConvChoice | None:
        options, step, device = self.base, self.step, self.base.device
        if options.conv_algorithm == "direct":
            return None
        self.ops = self.ops or dominant_ops(self.spec)
        if device != "cpu" or not winograd.eligible_ops(self.ops[0]):
            return None
        name = winograd.DTYPE_NAMES[dtype]
        self.log(f"{step}: timing its {name} 3x3 convolutions direct and as Winograd on this {device}")
        force = options.conv_algorithm == "winograd"
        choice = winograd.choose(self.ops[0], device, dtype=dtype, force=force, reuse=self.cache)
        if choice is not None:
            self.log(f"{step}: {choice.describe()}")
        return choice


def _options_for(options: CompilerOptions, candidate: str) -> CompilerOptions:
    """The compiler options of one measured candidate: int8 keeps everything it does not quantize in fp32."""
    if candidate == INT8:
        return replace(options, precision=Precision("none", "fp32"), quantize=INT8)
    return replace(options, precision=options.precision.resolved(candidate), quantize="none")


def _compiled_in(options: CompilerOptions) -> list[CompilerOptions]:
    """The options to compile in turn, each next one where the one before fails validation: ``--auto-cast
    auto`` is every operation in the low type, then matmul/conv/attention only (export/precision.py)."""
    return [replace(options, precision=precision) for precision in options.precision.compiled_in()]


def _computes_in_fp32(options: CompilerOptions) -> bool:
    return options.quantize == "none" and options.precision.low_dtype == torch.float32


def _with_fp32_linear(options: CompilerOptions, choice: LinearChoice | None) -> CompilerOptions:
    """Resolves ``fp32_linear="auto"``: the measured kernel where fp32 linears run, oneDNN (moot) elsewhere."""
    if options.fp32_linear != "auto":
        return options
    kernel = choice.kernel if choice is not None and _computes_in_fp32(options) else "onednn"
    return replace(options, fp32_linear=kernel)


def _winograd_dtype(options: CompilerOptions) -> torch.dtype | None:
    """The type a candidate's convolutions would run Winograd in: fp32, or bf16 where every op is bf16 (with
    matmuls alone in bf16 the convolutions' inputs are fp32 casts: no Winograd); None for the others."""
    if _computes_in_fp32(options):
        return torch.float32
    precision = options.precision
    if options.quantize == "none" and precision.auto_cast == "all" and precision.low_dtype in winograd.TILES_BY_DTYPE:
        return precision.low_dtype
    return None


def _with_conv_choice(options: CompilerOptions, choice: winograd.ConvChoice | None) -> list[CompilerOptions]:
    """Resolves ``conv_algorithm``: where fp32 (or all-bf16) convolutions run and Winograd was faster for some
    shapes, those options first, then the same with every convolution direct (tried if Winograd fails
    validation). ``choice`` was timed in the candidate's type."""
    direct = replace(options, conv_algorithm="direct", winograd=())
    if choice is None or not choice.tiles() or _winograd_dtype(options) is None:
        return [direct]
    return [replace(options, winograd=tuple(sorted(choice.tiles().items()))), direct]


def _shallow_calibration(full: ComponentSpec) -> list[dict[str, torch.Tensor]]:
    """The step-caching graph's calibration: the full UNet's inputs plus the deep feature it returned for them."""
    index = full.output_names.index(FEATURE)
    return [{**inputs, FEATURE: outputs[index]} for inputs, outputs in zip(full.calibration, full.calibration_outputs)]


def _compile_and_validate(
    spec: ComponentSpec,
    options: CompilerOptions,
    folder: Path,
    step: str,
    validate: bool,
    log: Callable[[str], None],
    compile_fn: Callable[[ComponentSpec, CompilerOptions, Path], dict],
    *,
    last: bool,
) -> tuple[dict | None, ValidationReport | None]:
    """Compiles (and validates) ``spec`` in ``options``; ``(None, None)`` when validation failed and another
    measured type is left to try, which is then compiled in its place."""
    int8 = options.quantize == INT8
    describe = "int8 convolutions and linears, the rest fp32" if int8 else options.precision.describe()
    # The eager reference first, while the fp32 weights are in memory anyway: validation then holds the compiled
    # component alone (the compile offloads the fp32 weights and brings them back mapped from a file, unread).
    reference = None
    if validate:
        reference = eager_reference(spec, inputs=held_out(spec.calibration) if int8 else None, device=options.device)
    log(f"{step}: tracing{', calibrating' if int8 else ''} and compiling ({describe})")
    with _heartbeat(log, f"compiling {spec.name}"), freed_memory_returned():
        manifest = compile_fn(spec, options, folder)
    if manifest.get("compile_cache") == "hit":
        log(f"{step}: the compile cache held this graph with these weights and options: package copied, not compiled")
    if not validate:
        return manifest, None
    log(f"{step}: validating against eager PyTorch")
    compiled = CompiledComponent(folder, device=options.device)
    try:
        report = validate_component(
            spec,
            compiled,
            options.precision,
            tolerance=INT8_TOLERANCE if int8 else None,
            describe=describe,
            reference=reference,
        )
    except ValidationError as error:
        if last:
            raise
        log(f"{step}: {describe} fails validation ({error}); trying the next candidate")
        del compiled
        shutil.rmtree(folder)
        return None, None
    manifest["validation"] = report.to_dict()
    write_manifest(folder, spec.config, manifest)
    return manifest, report


def _compile_extra_sizes(
    spec: ComponentSpec,
    options: CompilerOptions,
    sized: dict[tuple[int, int], dict[str, ComponentSpec]],
    folder: Path,
    step: str,
    validate: bool,
    log: Callable[[str], None],
    compile_fn: Callable[[ComponentSpec, CompilerOptions, Path], dict],
    hashed: dict[str, dict],
    shapes: PipelineShapes,
) -> list[dict[str, Any]]:
    """Compiles ``spec`` at each extra size where its inputs depend on the size, in the options its main graph
    was compiled in, each sharing the main graph's constants; validated after sharing, loaded as calls load it.
    Returns the manifest's ``sizes`` records (none for a component the size does not change)."""
    main_shapes = {name: tuple(t.shape) for name, t in spec.example_inputs().items()}
    records = []
    main = None
    for size, specs in sized.items():
        other = specs[spec.name]
        if {name: tuple(t.shape) for name, t in other.example_inputs().items()} == main_shapes:
            continue
        if main is None:
            main = CompiledComponent(folder / spec.name, device=options.device)
        where = f"{step} at {size[0]}x{size[1]}"
        relative = sizes.folder_name(*size)
        sub = folder / spec.name / relative
        reference = eager_reference(other, device=options.device) if validate else None
        log(f"{where}: compiling ({options.precision.describe()}, as the main size)")
        with _heartbeat(log, f"compiling {spec.name} at {size[0]}x{size[1]}"), freed_memory_returned():
            manifest = compile_fn(other, options, sub)
        if options.device == "cpu":  # loaded constants are handed between graphs on CPU (runtime/compiled.py)
            weights = sizes.share_constants(folder / spec.name, sub, log)
            if weights:
                manifest["weights"] = weights
                manifest["files"] = sizes.package_records(sub)
        if validate:
            log(f"{where}: validating against eager PyTorch")
            write_manifest(sub, other.config, manifest)
            compiled = CompiledComponent(sub, device=options.device, main=main)
            report = validate_component(other, compiled, options.precision, describe=options.precision.describe(),
                                        reference=reference)  # fmt: skip
            manifest["validation"] = report.to_dict()
            log(f"{where}: max rel error {report.max_rel_error:.2e}")
            del compiled
        write_manifest(sub, other.config, manifest)
        hashed[f"{spec.name}/{relative}"] = manifest["files"]
        records.append({"height": size[0], "width": size[1], "folder": relative})
    if not records:
        return []
    return [{"height": shapes.height, "width": shapes.width, "folder": "."}, *records]


def save_uncompiled_parts(components: dict[str, Any], output: Path) -> dict[str, list[str]]:
    """Saves the scheduler, tokenizers and other library-saved parts over any in ``output``.

    Returns their model_index entries ``{name: [library, class]}``. Eager torch modules that are not
    compiled (a safety checker, an image encoder) are left out.
    """
    entries = {}
    for name, component in components.items():
        if name in COMPILED_ATTRIBUTES or component is None or not hasattr(component, "save_pretrained"):
            continue
        if isinstance(component, torch.nn.Module):
            continue
        target = output / name
        if target.exists():
            shutil.rmtree(target)
        component.save_pretrained(target)
        entries[name] = [type(component).__module__.split(".")[0], type(component).__name__]
    return entries


def _write_model_index(
    pipe: DiffusionPipeline,
    output: Path,
    shapes: PipelineShapes,
    options: CompilerOptions,
    pipeline_class: str,
    compiled: list[str],
    chosen: dict[str, str],
    extra_sizes: Sequence[tuple[int, int]] = (),
) -> None:
    import diffusers

    index: dict[str, Any] = {"_class_name": type(pipe).__name__, "_diffusers_version": diffusers.__version__}
    for key, value in pipe.config.items():
        if key.startswith("_"):
            continue
        component = pipe.components.get(key)
        dropped = isinstance(component, torch.nn.Module) and key not in COMPILED_ATTRIBUTES
        index[key] = [None, None] if dropped else (list(value) if isinstance(value, tuple) else value)
    index[artifact.MANIFEST_KEY] = {
        "format_version": artifact.FORMAT_VERSION,
        "pipeline_class": pipeline_class,
        "diffusers_class": type(pipe).__name__,
        "shapes": shapes.to_dict(),
        # Every image size (height, width) compiled, the main one (``shapes``) first.
        "sizes": [[shapes.height, shapes.width], *[list(size) for size in extra_sizes]],
        "components": compiled,
        "precision": {**options.precision.to_dict(), **({"chosen": chosen} if chosen else {})},
        "quantize": options.quantize,
        "device": options.device,
        "versions": artifact.environment_versions(),
        "exported_on": artifact.machine_id(),
        "source": getattr(pipe, "name_or_path", None),
        "loras": getattr(pipe, FUSED_ATTRIBUTE, []),
    }
    artifact.write_json(output / artifact.MODEL_INDEX_FILE, index)


def remember_checksums(output: Path, hashed: dict[str, dict]) -> None:
    """The files were hashed as they were written: their first load need not read them again (checksums.py)."""
    files = {
        output / name / file: record["sha256"] for name, records in hashed.items() for file, record in records.items()
    }
    checksums.remember({path: digest for path, digest in files.items() if path.is_file()})


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def summary_table(results: list[ComponentResult]) -> str:
    rows = [("component", "trace s", "compile s", "size MiB", "max abs err", "max rel err")]
    for r in results:
        v = r.validation
        rows.append(
            (
                r.name,
                f"{r.trace_s:.1f}",
                f"{r.compile_s:.1f}",
                f"{r.size_bytes / 2**20:.1f}",
                f"{v.max_abs_error:.2e}" if v else "-",
                f"{v.max_rel_error:.2e}" if v else "skipped",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"peak memory: {peak_rss_bytes() / 2**30:.2f} GiB")
    return "\n".join(lines)
