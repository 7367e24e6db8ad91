"""What each diffusers component looks like as a graph: positional tensors in, a flat tuple out.

A :class:`ComponentSpec` is everything the compiler and the validator need about one component:
the traceable module, named example inputs at the static shapes, the names of its outputs and the
config to write beside it. Random inputs come from a seeded generator so validation is repeatable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..shapes import PipelineShapes
from . import ip_adapter


@dataclass
class ComponentSpec:
    name: str  # folder name in the exported pipeline
    role: str  # text_encoder | unet | vae_encoder | vae_decoder
    module: torch.nn.Module
    make_inputs: Callable[[torch.Generator], dict[str, torch.Tensor]]
    output_names: list[str]
    config: dict[str, Any]
    # Which diffusers/transformers output class the runtime rebuilds from the flat outputs.
    output_class: str | None = None
    static: dict[str, Any] = field(default_factory=dict)
    # Small eager pieces diffusers calls directly (e.g. CLIP's final LayerNorm for clip_skip).
    extra_state: dict[str, torch.nn.Module] = field(default_factory=dict)
    # int8 only: the inputs the observers see (recorded from the eager pipeline), and what the graph
    # returned for them (filled in by the compile).
    calibration: list[dict[str, torch.Tensor]] = field(default_factory=list)
    calibration_outputs: list[tuple[torch.Tensor, ...]] = field(default_factory=list)

    def example_inputs(self, seed: int = 0) -> dict[str, torch.Tensor]:
        return self.make_inputs(torch.Generator().manual_seed(seed))


def _config_dict(model: Any) -> dict[str, Any]:
    config = model.config
    return dict(config) if not hasattr(config, "to_dict") else config.to_dict()


class _TextEncoderGraph(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor):
        out = self.model(input_ids, output_hidden_states=True, return_dict=True)
        flat = []
        for key, value in out.items():
            flat.extend(value if key == "hidden_states" else (value,))
        return tuple(flat)


def text_encoder_spec(name: str, model: torch.nn.Module, shapes: PipelineShapes) -> ComponentSpec:
    """CLIP text encoders, with and without projection, returning every hidden state.

    All hidden states are outputs because SDXL reads the penultimate one and ``clip_skip`` reads
    earlier ones; on a 77-token sequence they cost a few MiB.
    """
    batch, seq = shapes.batch_size, shapes.sequence_length
    vocab = model.config.vocab_size

    def make_inputs(gen: torch.Generator) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=gen)}

    with torch.no_grad():
        probe = model(make_inputs(torch.Generator().manual_seed(0))["input_ids"], output_hidden_states=True)
    names = []
    for key, value in probe.items():
        names.extend(f"hidden_states.{i}" for i in range(len(value))) if key == "hidden_states" else names.append(key)
    # transformers 5 flattened CLIPTextModel (no `.text_model`); older versions nest it.
    owner = getattr(model, "text_model", model)
    extra = {"final_layer_norm": owner.final_layer_norm} if hasattr(owner, "final_layer_norm") else {}
    return ComponentSpec(
        name=name,
        role="text_encoder",
        module=_TextEncoderGraph(model).eval(),
        make_inputs=make_inputs,
        output_names=names,
        config=_config_dict(model),
        output_class=f"{type(probe).__module__}.{type(probe).__qualname__}",
        static={"batch_size": batch, "sequence_length": seq},
        extra_state=extra,
    )


def _denoiser_static(shapes: PipelineShapes, vae_scale_factor: int) -> dict[str, Any]:
    """The static facts of a denoiser (UNet or transformer) that the runtime's call checks read."""
    return {
        "batch_size": shapes.unet_batch,
        "height": shapes.height // vae_scale_factor,
        "width": shapes.width // vae_scale_factor,
        "sequence_length": shapes.sequence_length,
        "classifier_free_guidance": shapes.classifier_free_guidance,
        "split_guidance_batch": shapes.split_guidance_batch,
        "guidance_copies": shapes.guidance_copies,
    }


def _transformer_component(graph: torch.nn.Module, make_inputs, transformer: torch.nn.Module,
                           static: dict[str, Any]) -> ComponentSpec:  # fmt: skip
    return ComponentSpec(
        name="transformer",
        role="transformer",
        module=graph.eval(),
        make_inputs=make_inputs,
        output_names=["sample"],
        config=_config_dict(transformer),
        static=static,
    )


class _T5EncoderGraph(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return (self.model(input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state,)


def t5_encoder_spec(name: str, model: torch.nn.Module, shapes: PipelineShapes) -> ComponentSpec:
    """A T5 encoder at the static sequence length, with its attention mask an input: diffusers pads T5 prompts to
    ``max_sequence_length`` and masks the padding, so the mask changes per prompt (CLIP's does not exist)."""
    batch, seq = shapes.batch_size, shapes.sequence_length
    vocab = model.config.vocab_size

    def make_inputs(gen: torch.Generator) -> dict[str, torch.Tensor]:
        lengths = torch.randint(1, seq + 1, (batch, 1), generator=gen)
        return {
            "input_ids": torch.randint(0, vocab, (batch, seq), generator=gen),
            "attention_mask": (torch.arange(seq) < lengths).long(),
        }

    return ComponentSpec(
        name=name,
        role="text_encoder",
        module=_T5EncoderGraph(model).eval(),
        make_inputs=make_inputs,
        output_names=["last_hidden_state"],
        config=_config_dict(model),
        output_class="transformers.modeling_outputs.BaseModelOutput",
        static={"batch_size": batch, "sequence_length": seq},
    )


class _PixArtTransformerGraph(torch.nn.Module):
    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, encoder_hidden_states, timestep, encoder_attention_mask):
        # PixArt-Σ conditions on no resolution or aspect ratio (use_additional_conditions is off): diffusers passes
        # these as None.
        return self.transformer(
            hidden_states, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
            encoder_attention_mask=encoder_attention_mask, added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )  # fmt: skip


def transformer_spec(transformer: torch.nn.Module, shapes: PipelineShapes, vae_scale_factor: int) -> ComponentSpec:
    """PixArt's DiT at the batch it really receives (doubled for guidance), its prompt mask an input."""
    config = transformer.config
    if transformer.use_additional_conditions:
        raise ValueError(
            "This transformer conditions on the image's resolution and aspect ratio (PixArt-α at 1024px), which "
            "aotdiffusion does not compile yet; PixArt-Σ models (use_additional_conditions off) are supported."
        )
    batch = shapes.unet_batch
    h, w = shapes.height // vae_scale_factor, shapes.width // vae_scale_factor
    seq = shapes.sequence_length

    def make_inputs(gen: torch.Generator) -> dict[str, torch.Tensor]:
        lengths = torch.randint(1, seq + 1, (batch, 1), generator=gen)
        return {
            "hidden_states": torch.randn(batch, config.in_channels, h, w, generator=gen),
            "encoder_hidden_states": torch.randn(batch, seq, config.caption_channels, generator=gen),
            "timestep": torch.randint(0, 1000, (batch,), generator=gen).float(),
            "encoder_attention_mask": (torch.arange(seq) < lengths).long(),
        }

    static = _denoiser_static(shapes, vae_scale_factor)
    return _transformer_component(_PixArtTransformerGraph(transformer), make_inputs, transformer, static)


class _SD3TransformerGraph(torch.nn.Module):
    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        return self.transformer(
            hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections, timestep=timestep, return_dict=False,
        )  # fmt: skip


def sd3_transformer_spec(
    transformer: torch.nn.Module, shapes: PipelineShapes, vae_scale_factor: int, clip_length: int
) -> ComponentSpec:
    """SD3's MMDiT at the batch it really receives: its prompt is the CLIP encoders' ``clip_length`` tokens followed
    by T5's ``shapes.sequence_length``, and its pooled projection the two CLIP encoders' pooled outputs."""
    config = transformer.config
    batch = shapes.unet_batch
    h, w = shapes.height // vae_scale_factor, shapes.width // vae_scale_factor
    tokens = clip_length + shapes.sequence_length

    def make_inputs(gen: torch.Generator) -> dict[str, torch.Tensor]:
        return {
            "hidden_states": torch.randn(batch, config.in_channels, h, w, generator=gen),
            "encoder_hidden_states": torch.randn(batch, tokens, config.joint_attention_dim, generator=gen),
            "pooled_projections": torch.randn(batch, config.pooled_projection_dim, generator=gen),
            # Flow-matching timesteps: sigmas (0-1] times 1000, any real value.
            "timestep": torch.rand(batch, generator=gen) * 1000,
        }

    static = {**_denoiser_static(shapes, vae_scale_factor), "clip_sequence_length": clip_length}
    return _transformer_component(_SD3TransformerGraph(transformer), make_inputs, transformer, static)


class _UNetGraph(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module, input_names: list[str], ip_scales: Any = None):
        super().__init__()
        self.unet = unet
        self.input_names = input_names
        # IP-Adapters: the holder their value projections read the scale input from (export/ip_adapter.py).
        self.ip_scales = ip_scales

    def forward(self, *tensors: torch.Tensor):
        named = dict(zip(self.input_names, tensors))
        added = {k: named[k] for k in ("text_embeds", "time_ids") if k in named}
        down = [named[k] for k in self.input_names if k.startswith(DOWN_RESIDUAL)]
        if self.ip_scales is not None:
            added["image_embeds"] = [named[k] for k in self.input_names if k.startswith(ip_adapter.IMAGE_EMBEDS)]
            self.ip_scales.value = named[ip_adapter.SCALE]
        return self.unet(
            named["sample"],
            named["timestep"],
            encoder_hidden_states=named["encoder_hidden_states"],
            timestep_cond=named.get("timestep_cond"),
            added_cond_kwargs=added or None,
            down_block_additional_residuals=tuple(down) or None,
            mid_block_additional_residual=named.get(MID_RESIDUAL),
            return_dict=False,
        )


def _micro_conditioning(
    rows: int, text_embeds_dim: int | None, time_ids_dim: int | None, gen: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """SDXL's added conditioning (pooled text embeddings, time ids) as the UNet and its ControlNets take it; none
    for models without it."""
    if text_embeds_dim is None:
        return {}
    return {
        "text_embeds": torch.randn(rows, text_embeds_dim, generator=gen),
        "time_ids": torch.randint(0, 1024, (rows, time_ids_dim), generator=gen).float(),
    }


# A ControlNet export's UNet takes the ControlNets' residuals as inputs (down_residual_0.., mid_residual).
DOWN_RESIDUAL, MID_RESIDUAL = "down_residual_", "mid_residual"


def unet_spec(
    unet: torch.nn.Module,
    shapes: PipelineShapes,
    vae_scale_factor: int,
    *,
    text_embeds_dim: int | None = None,
    time_ids_dim: int | None = None,
    residuals: list[tuple[int, ...]] | None = None,
    image_embeds: list[tuple[int, ...]] | None = None,
) -> ComponentSpec:
    """The UNet at the batch it really receives: doubled when compiled for classifier-free guidance.

    The timestep is a graph input of shape (batch,), so any scheduler can drive the compiled UNet.
    ``residuals``: the shapes of a ControlNet's outputs (down blocks, then mid block), taken as inputs.
    ``image_embeds``: with IP-Adapters loaded, each adapter's image embedding shape (without the batch), taken as
    inputs with the adapters' scales (export/ip_adapter.py).
    """
    config = unet.config
    batch = shapes.unet_batch
    h, w = shapes.height // vae_scale_factor, shapes.width // vae_scale_factor
    cross_dim = config.cross_attention_dim
    train_steps = 1000

    def make_inputs(gen: torch.Generator) -> dict[str, torch.Tensor]:
        inputs = {
            "sample": torch.randn(batch, config.in_channels, h, w, generator=gen),
            "timestep": torch.randint(0, train_steps, (batch,), generator=gen).float(),
            "encoder_hidden_states": torch.randn(batch, shapes.sequence_length, cross_dim, generator=gen),
        }
        if config.time_cond_proj_dim is not None:
            inputs["timestep_cond"] = torch.randn(batch, config.time_cond_proj_dim, generator=gen)
        inputs.update(_micro_conditioning(batch, text_embeds_dim, time_ids_dim, gen))
        if residuals:
            for i, shape in enumerate(residuals[:-1]):
                inputs[f"{DOWN_RESIDUAL}{i}"] = torch.randn(shape, generator=gen)
            inputs[MID_RESIDUAL] = torch.randn(residuals[-1], generator=gen)
        if ip:
            for i, shape in enumerate(image_embeds):
                inputs[f"{ip_adapter.IMAGE_EMBEDS}{i}"] = torch.randn(batch, *shape, generator=gen)
            inputs[ip_adapter.SCALE] = torch.rand(len(ip[1]["processors"]), len(image_embeds), generator=gen) + 0.5
        return inputs

    ip = ip_adapter.scale_inputs(unet) if image_embeds else None
    names = list(make_inputs(torch.Generator().manual_seed(0)))
    return ComponentSpec(
        name="unet",
        role="unet",
        module=_UNetGraph(unet, names, ip[0] if ip else None).eval(),
        make_inputs=make_inputs,
        output_names=["sample"],
        config=_config_dict(unet),
        static={
            **_denoiser_static(shapes, vae_scale_factor),
            # SDXL's pipeline checks its time ids against the UNet's add_embedding width.
            "add_embedding_in_features": unet.add_embedding.linear_1.in_features if text_embeds_dim else None,
            "ip_adapter": ip[1] if ip else None,
        },
    )


class _VaeDecoderGraph(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor):
        return self.vae.decode(latent_sample, return_dict=False)


class _VaeEncoderGraph(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor):
        # The moments (mean and log-variance) leave the graph; sampling from them stays in Python
        # with the caller's generator, so img2img draws exactly the noise diffusers would.
        return (self.vae.encode(sample).latent_dist.parameters,)


def vae_decoder_spec(vae: torch.nn.Module, shapes: PipelineShapes, vae_scale_factor: int) -> ComponentSpec:
    config = vae.config
    batch = shapes.images
    h, w = shapes.height // vae_scale_factor, shapes.width // vae_scale_factor

    def make_inputs(gen: torch.Generator) -> dict[str, torch.Tensor]:
        return {"latent_sample": torch.randn(batch, config.latent_channels, h, w, generator=gen)}

    return ComponentSpec(
        name="vae_decoder",
        role="vae_decoder",
        module=_VaeDecoderGraph(vae).eval(),
        make_inputs=make_inputs,
        output_names=["sample"],
        config=_config_dict(vae),
        static={"batch_size": batch, "height": h, "width": w},
    )


def vae_encoder_spec(vae: torch.nn.Module, shapes: PipelineShapes) -> ComponentSpec:
    config = vae.config
    # Compiled for one image: the runtime encodes image by image, so any number of input images
    # works (diffusers itself encodes one at a time when given a generator per image).
    batch = 1

    def make_inputs(gen: torch.Generator) -> dict[str, torch.Tensor]:
        image = torch.rand(batch, config.in_channels, shapes.height, shapes.width, generator=gen)
        return {"sample": image * 2 - 1}

    return ComponentSpec(
        name="vae_encoder",
        role="vae_encoder",
        module=_VaeEncoderGraph(vae).eval(),
        make_inputs=make_inputs,
        output_names=["latent_parameters"],
        config=_config_dict(vae),
        static={"batch_size": batch, "height": shapes.height, "width": shapes.width},
    )


class _ControlNetGraph(torch.nn.Module):
    """A ControlNet whose residuals leave scaled by a graph input, one scale per residual: the conditioning
    scale (and guess mode's per-block ramp, and control_guidance_start/end) change per call and per step."""

    def __init__(self, controlnet: torch.nn.Module):
        super().__init__()
        self.controlnet = controlnet

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, scales, text_embeds=None,
                time_ids=None):  # fmt: skip
        added = {"text_embeds": text_embeds, "time_ids": time_ids} if text_embeds is not None else None
        down, mid = self.controlnet(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, controlnet_cond=controlnet_cond,
            conditioning_scale=1.0, guess_mode=False, added_cond_kwargs=added, return_dict=False,
        )  # fmt: skip
        return (*(d * scales[i] for i, d in enumerate(down)), mid * scales[-1])


def controlnet_spec(
    name: str,
    controlnet: torch.nn.Module,
    shapes: PipelineShapes,
    vae_scale_factor: int,
    *,
    text_embeds_dim: int | None = None,
    time_ids_dim: int | None = None,
):
    """One ControlNet at the UNet's batch, with its conditioning image at the compiled image size; an SDXL
    ControlNet also takes the UNet's micro-conditioning (``text_embeds``, ``time_ids``).

    Returns the spec and its outputs' shapes (the UNet's residual inputs).
    """
    config = controlnet.config
    batch = shapes.unet_batch
    h, w = shapes.height // vae_scale_factor, shapes.width // vae_scale_factor
    module = _ControlNetGraph(controlnet).eval()
    probe_added = _micro_conditioning(1, text_embeds_dim, time_ids_dim) or None
    with torch.no_grad():
        probe = controlnet(
            torch.zeros(1, config.in_channels, h, w), torch.zeros(1), encoder_hidden_states=torch.zeros(
                1, shapes.sequence_length, config.cross_attention_dim), controlnet_cond=torch.zeros(
                1, config.conditioning_channels, shapes.height, shapes.width), added_cond_kwargs=probe_added,
            return_dict=False,
        )  # fmt: skip
    count = len(probe[0]) + 1

    def make_inputs(gen: torch.Generator) -> dict[str, torch.Tensor]:
        return {
            "sample": torch.randn(batch, config.in_channels, h, w, generator=gen),
            "timestep": torch.randint(0, 1000, (batch,), generator=gen).float(),
            "encoder_hidden_states": torch.randn(
                batch, shapes.sequence_length, config.cross_attention_dim, generator=gen
            ),  # fmt: skip
            "controlnet_cond": torch.rand(
                batch, config.conditioning_channels, shapes.height, shapes.width, generator=gen
            ),  # fmt: skip
            "scales": torch.rand(count, generator=gen) + 0.5,
            **_micro_conditioning(batch, text_embeds_dim, time_ids_dim, gen),
        }

    residuals = [(batch, *t.shape[1:]) for t in (*probe[0], probe[1])]
    spec = ComponentSpec(
        name=name,
        role="controlnet",
        module=module,
        make_inputs=make_inputs,
        output_names=[f"{DOWN_RESIDUAL}{i}" for i in range(count - 1)] + [MID_RESIDUAL],
        config=_config_dict(controlnet),
        static={"batch_size": batch, "height": shapes.height, "width": shapes.width},
    )
    return spec, residuals


class _ImageEncoderGraph(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor):
        out = self.model(pixel_values, output_hidden_states=True, return_dict=True)
        return out.image_embeds, out.last_hidden_state, out.hidden_states[-2]


IMAGE_ENCODER_OUTPUTS = ["image_embeds", "last_hidden_state", "penultimate_hidden_state"]


def image_encoder_spec(model: torch.nn.Module) -> ComponentSpec:
    """The IP-Adapter's CLIP image encoder, one image a call at its own resolution (diffusers encodes each adapter's
    image, and a zero image for the plus adapters' guidance, one call each).

    Its outputs are what diffusers reads: the projected embedding (plain IP-Adapter) and the penultimate hidden
    state (the others), with the last one.
    """
    config = model.config
    size = config.image_size

    def make_inputs(gen: torch.Generator) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.randn(1, config.num_channels, size, size, generator=gen)}

    return ComponentSpec(
        name="image_encoder",
        role="image_encoder",
        module=_ImageEncoderGraph(model).eval(),
        make_inputs=make_inputs,
        output_names=IMAGE_ENCODER_OUTPUTS,
        config=_config_dict(model),
        static={"batch_size": 1, "height": size, "width": size},
    )


def ip_image_embeds_shapes(image_encoder: ComponentSpec, projections: list[str]) -> list[tuple[int, ...]]:
    """Each adapter's image embedding as the UNet takes it, without the batch: one image of the encoder's output
    that adapter's projection reads (export/ip_adapter.py)."""
    with torch.no_grad():
        outputs = dict(zip(image_encoder.output_names, image_encoder.module(**image_encoder.example_inputs())))
    shapes = []
    for projection in projections:
        output = outputs["penultimate_hidden_state" if ip_adapter.uses_hidden_states(projection) else "image_embeds"]
        shapes.append((ip_adapter.IMAGES_PER_ADAPTER, *output.shape[1:]))
    return shapes
