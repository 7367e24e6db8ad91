"""Compiled components dressed as the diffusers/transformers models a pipeline expects.

This is the one module of compatibility shims: every attribute and call signature diffusers' own
``__call__`` touches on a text encoder, UNet or VAE (see the component contract in the docs) is
answered here, and nothing else in the project imitates diffusers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import torch
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.controlnets.controlnet import ControlNetModel, ControlNetOutput
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from ..export.components import DOWN_RESIDUAL, MID_RESIDUAL
from ..export.ip_adapter import IMAGE_EMBEDS, SCALE
from .compiled import CompiledComponent
from .hollow import meta_unet, with_ip_adapter_processors


class AOTModelPart:
    """What every compiled part shares: config, fp32 interface dtype, fixed device.

    Compiled components take and return fp32 whatever precision they run in inside, so ``dtype`` is
    fp32: diffusers then keeps latents and embeddings in fp32 and its scheduler math stays exact.
    """

    dtype = torch.float32

    def __init__(self, compiled: CompiledComponent):
        self.compiled = compiled
        self.config = compiled.config

    @property
    def device(self) -> torch.device:
        return self.compiled.device

    def to(self, *args: Any, **kwargs: Any) -> AOTModelPart:
        """Accepts only the device and dtype it was compiled for: a compiled graph cannot move."""
        for value in [*args, kwargs.get("device"), kwargs.get("dtype")]:
            if value is None:
                continue
            if isinstance(value, torch.dtype):
                if value != self.dtype:
                    raise ValueError(
                        f"{self.compiled.name} is compiled and exchanges {self.dtype} tensors; it cannot be cast to "
                        f"{value}. Choose the compute precision at export with --auto-cast/--auto-cast-type."
                    )
            elif torch.device(value).type != self.device.type:
                raise ValueError(
                    f"{self.compiled.name} was compiled for {self.device} and cannot move to {value}. "
                    f"Export again with --device {torch.device(value).type}."
                )
        return self

    def modules(self):
        # diffusers walks modules() for LoRA scaling and offload hooks; a compiled graph has none.
        return iter(())

    def parameters(self):
        return iter(())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.compiled.folder}, {self.compiled.manifest['precision']})"


class AOTTextEncoder(AOTModelPart):
    def __init__(self, compiled: CompiledComponent):
        super().__init__(compiled)
        self._output_class = compiled.output_class()
        final_layer_norm = compiled.load_extra_state("final_layer_norm")
        # diffusers applies the final LayerNorm itself when clip_skip picks an earlier hidden state.
        self.text_model = SimpleNamespace(final_layer_norm=final_layer_norm)

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                f"{self.compiled.name} was compiled for full 77-token sequences without an attention mask; "
                "a padded attention mask cannot be applied to it."
            )
        outputs = self.compiled(input_ids=input_ids)
        hidden = tuple(v for k, v in outputs.items() if k.startswith("hidden_states."))
        fields = {k: v for k, v in outputs.items() if not k.startswith("hidden_states.")}
        fields["hidden_states"] = hidden if output_hidden_states else None
        result = self._output_class(**fields)
        return result if return_dict else result.to_tuple()


class AOTT5EncoderModel(AOTModelPart):
    """A compiled T5 encoder (PixArt-Σ): the prompt's padding mask is a graph input, the last hidden state its
    output."""

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, return_dict: bool = True,
                 **kwargs: Any):  # fmt: skip
        from transformers.modeling_outputs import BaseModelOutput

        if unsupported := sorted(k for k, v in kwargs.items() if v is not None and v is not False):
            raise ValueError(f"The compiled T5 encoder does not take {unsupported}.")
        compiled = self.compiled.input_shape("input_ids")[1]
        if input_ids.shape[1] != compiled:
            raise ValueError(
                f"{self.compiled.name} was compiled for prompts of {compiled} tokens (max_sequence_length), got "
                f"{input_ids.shape[1]}: call with max_sequence_length={compiled}, or export again with "
                f"--sequence-length {input_ids.shape[1]}."
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.compiled(input_ids=input_ids, attention_mask=attention_mask)["last_hidden_state"]
        result = BaseModelOutput(last_hidden_state=hidden)
        return result if return_dict else result.to_tuple()


class AOTTransformer(AOTModelPart):
    """A compiled transformer denoiser, called as diffusers' pipelines call it: PixArt-Σ's ``PixArtTransformer2DModel``
    (a prompt mask) or SD3's ``SD3Transformer2DModel`` (pooled projections). The graph's inputs say which."""

    def __init__(self, compiled: CompiledComponent):
        super().__init__(compiled)
        self.replicas = None
        self._inputs = [spec["name"] for spec in compiled.inputs]

    @property
    def batch_size(self) -> int:
        return self.compiled.input_shape("hidden_states")[0]

    @contextmanager
    def step_cache(self, interval: int) -> Iterator[None]:
        if interval != 1:
            raise ValueError(
                f"cache_interval={interval} reuses a UNet's deep features between steps (DeepCache); a transformer "
                "model has no such blocks: call with cache_interval=1."
            )
        yield

    def __call__(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor | float | int,
        pooled_projections: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        # PixArt-Σ passes resolution and aspect_ratio as None; joint_attention_kwargs (a LoRA scale) and skip_layers
        # (skip-layer guidance) would change the graph.
        given = {k: v for k, v in {**(added_cond_kwargs or {}), **kwargs}.items() if v is not None}
        if given:
            raise ValueError(f"The compiled transformer does not take {sorted(given)}.")
        batch = hidden_states.shape[0]
        # Timesteps are embedded in fp32 whatever the scheduler's type, as in AOTUNet.
        timestep = torch.as_tensor(timestep, device=hidden_states.device).to(torch.float32).reshape(-1).expand(batch)
        inputs = {"hidden_states": hidden_states, "encoder_hidden_states": encoder_hidden_states, "timestep": timestep}
        if "encoder_attention_mask" in self._inputs:
            if encoder_attention_mask is None:
                encoder_attention_mask = torch.ones(encoder_hidden_states.shape[:2], device=hidden_states.device)
            inputs["encoder_attention_mask"] = encoder_attention_mask
        if "pooled_projections" in self._inputs:
            if pooled_projections is None:
                raise ValueError("This transformer (SD3) needs pooled_projections, which were not given.")
            inputs["pooled_projections"] = pooled_projections
        out = self.compiled(**inputs)["sample"]
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


class AOTUNet(AOTModelPart):
    def __init__(self, compiled: CompiledComponent, shallow: CompiledComponent | None = None):
        super().__init__(compiled)
        # Replicas of this UNet in other processes that run the two guidance halves side by side.
        self.replicas = None
        # Step caching: the shallow graph that reuses the full graph's deep feature (export --deep-cache).
        self.shallow = shallow
        self._cache_interval, self._step, self._feature = 1, 0, None
        in_features = compiled.static.get("add_embedding_in_features")
        if in_features is not None:  # SDXL validates its time ids against this
            self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(in_features=in_features))
        # IP-Adapters (export --ip-adapter): diffusers counts them, and picks each one's image encoder output, by
        # the classes of encoder_hid_proj's projection layers.
        self.ip_adapter = compiled.static.get("ip_adapter")
        self._ip_hollow = None
        if self.ip_adapter:
            layers = [_stand_in(_projection_class(name)) for name in self.ip_adapter["projections"]]
            self.encoder_hid_proj = SimpleNamespace(image_projection_layers=layers)

    # diffusers' set_ip_adapter_scale walks these (attention processors, blocks with attentions, layer names): a
    # hollow UNet with diffusers' IP-Adapter processors answers them, and the compiled graph takes their scales.
    @property
    def attn_processors(self) -> dict[str, Any]:
        return self._ip_adapter_model().attn_processors

    @property
    def down_blocks(self):
        return self._ip_adapter_model().down_blocks

    @property
    def up_blocks(self):
        return self._ip_adapter_model().up_blocks

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return self._ip_adapter_model().state_dict(*args, **kwargs)

    def _ip_adapter_model(self) -> torch.nn.Module:
        if not self.ip_adapter:
            raise ValueError(
                "This UNet was compiled without an IP-Adapter: export with --ip-adapter ID --ip-adapter-weight-name "
                "FILE (ip_adapter=..., ip_adapter_weight_name=...) to use one."
            )
        if self._ip_hollow is None:
            names = self.ip_adapter["processors"]
            adapters = len(self.ip_adapter["projections"])
            self._ip_hollow = with_ip_adapter_processors(meta_unet(self.config), names, adapters)
        return self._ip_hollow

    def _ip_adapter_inputs(self, sample: torch.Tensor, image_embeds: list | None) -> dict[str, torch.Tensor]:
        """The IP-Adapter graph inputs: the image embeddings and the processors' current scales. Without embeddings
        (a call with no ip_adapter_image) the adapters add nothing: zeros at scale 0, the plain UNet's output."""
        if not self.ip_adapter:
            if image_embeds is not None:
                raise ValueError(
                    "This UNet was compiled without an IP-Adapter: export with --ip-adapter to pass ip_adapter_image."
                )
            return {}
        names = [spec["name"] for spec in self.compiled.inputs if spec["name"].startswith(IMAGE_EMBEDS)]
        batch = sample.shape[0]
        if image_embeds is None:
            inputs = {name: sample.new_zeros((batch, *self.compiled.input_shape(name)[1:])) for name in names}
            return {**inputs, SCALE: sample.new_zeros(self.compiled.input_shape(SCALE))}
        if len(image_embeds) != len(names):
            raise ValueError(
                f"This UNet takes image embeddings for {len(names)} IP-Adapter(s), got {len(image_embeds)}."
            )
        for name, embeds in zip(names, image_embeds):
            compiled = self.compiled.input_shape(name)[1]
            if embeds.ndim < 3 or embeds.shape[1] != compiled:
                images = embeds.shape[1] if embeds.ndim >= 2 else embeds.shape
                raise ValueError(
                    f"This export was compiled for {compiled} IP-Adapter image(s) per adapter; got {images}. Pass one "
                    "image (or one embedding) for each adapter."
                )
        # Walked once per call (attn_processors visits every module of the hollow UNet); untouched, diffusers' 1.0.
        current = self._ip_hollow.attn_processors if self._ip_hollow is not None else None
        scales = []
        for name in self.ip_adapter["processors"]:
            row = current[name].scale if current is not None else [1.0] * len(names)
            if any(isinstance(value, list) for value in row):
                raise ValueError(
                    f"A list of scales per IP-Adapter ({row}) is for masked images (ip_adapter_masks), which a "
                    "compiled UNet does not take: give one scale per adapter."
                )
            scales.append([float(value) for value in row])
        return {**dict(zip(names, image_embeds)), SCALE: torch.tensor(scales, device=sample.device)}

    @property
    def batch_size(self) -> int:
        return self.compiled.input_shape("sample")[0]

    @contextmanager
    def step_cache(self, interval: int) -> Iterator[None]:
        """Within the block, runs the full UNet on one call of every ``interval`` and the shallow one between.

        A pipeline calls its UNet once per denoising step, so the first step of every call is full.
        """
        if interval != 1 and self.shallow is None:
            raise ValueError(
                f"cache_interval={interval} reuses the UNet's deep features between steps, but this export has no "
                "shallow UNet graph. Export again with --deep-cache (deep_cache=True), or call with cache_interval=1."
            )
        self._cache_interval, self._step, self._feature = interval, 0, None
        try:
            yield
        finally:
            self._cache_interval, self._step, self._feature = 1, 0, None

    def _run(self, inputs: dict[str, torch.Tensor | None]) -> torch.Tensor:
        if self.shallow is None:
            return self.compiled(**inputs)["sample"]
        if self._step % self._cache_interval == 0:
            outputs = self.compiled(**inputs)
            self._feature = outputs["deep_cache_feature"] if self._cache_interval > 1 else None
        else:
            outputs = self.shallow(**inputs, deep_cache_feature=self._feature)
        self._step += 1
        return outputs["sample"]

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        timestep_cond: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ):
        if cross_attention_kwargs:
            raise ValueError(
                f"`cross_attention_kwargs` ({sorted(cross_attention_kwargs)}) change the UNet's graph and cannot be "
                "applied to a compiled UNet; fuse LoRA weights into the model before export instead."
            )
        unsupported = sorted(k for k, v in kwargs.items() if v is not None)
        if unsupported:
            raise ValueError(f"The compiled UNet does not take {unsupported}.")
        # The UNet embeds the timestep in fp32 whatever the scheduler's type (int64 for DDIM/PNDM,
        # float for Euler), so a float32 vector of the batch size is exactly what eager computes with.
        timestep = torch.as_tensor(timestep, device=sample.device).to(torch.float32).reshape(-1)
        timestep = timestep.expand(sample.shape[0])
        added = added_cond_kwargs or {}
        inputs = {
            "sample": sample,
            "timestep": timestep,
            "encoder_hidden_states": encoder_hidden_states,
            "timestep_cond": timestep_cond,
            "text_embeds": added.get("text_embeds"),
            "time_ids": added.get("time_ids"),
            **self._residuals(sample, down_block_additional_residuals, mid_block_additional_residual),
            **self._ip_adapter_inputs(sample, added.get("image_embeds")),
        }
        if self.compiled.static.get("split_guidance_batch") and sample.shape[0] == 2 * self.batch_size:
            halves = [{k: None if v is None else v.chunk(2)[i] for k, v in inputs.items()} for i in range(2)]
            if self.replicas is not None:
                results = self.replicas.map(halves)
            else:
                results = [self.compiled(**half) for half in halves]
            out = torch.cat([r["sample"] for r in results])
        else:
            out = self._run(inputs)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    def _residuals(self, sample: torch.Tensor, down: tuple | None, mid: torch.Tensor | None) -> dict:
        """A ControlNet export's UNet takes the residuals as inputs: zeros (no control) when none are given."""
        names = [spec["name"] for spec in self.compiled.inputs if spec["name"].startswith(DOWN_RESIDUAL)]
        if not names:
            if down is not None or mid is not None:
                raise ValueError(
                    "This UNet was compiled without ControlNet residual inputs: export with --controlnet ID to run "
                    "a ControlNet."
                )
            return {}
        if down is None:
            batch = sample.shape[0]
            shapes = {name: (batch, *self.compiled.input_shape(name)[1:]) for name in [*names, MID_RESIDUAL]}
            return {name: sample.new_zeros(shape) for name, shape in shapes.items()}
        if len(down) != len(names):
            raise ValueError(f"This UNet takes {len(names)} ControlNet down-block residuals, got {len(down)}.")
        return {**dict(zip(names, down)), MID_RESIDUAL: mid}


def _projection_class(name: str) -> type:
    """An IP-Adapter projection class a UNet manifest names: only diffusers' own, looked up by name."""
    from diffusers.models import embeddings

    found = getattr(embeddings, name, None) if name.isidentifier() else None
    if not (isinstance(found, type) and issubclass(found, torch.nn.Module) and "Projection" in name):
        raise ValueError(f"The UNet's manifest names the IP-Adapter projection {name!r}, not one of diffusers'.")
    return found


def _stand_in(cls: type) -> Any:
    """An object diffusers' isinstance checks take for a ``cls`` (its work is compiled into the UNet)."""
    return type(f"Compiled{cls.__name__}", (), {"__class__": property(lambda self: cls)})()


class AOTImageEncoder(AOTModelPart):
    """The IP-Adapter's CLIP image encoder, compiled for one image: a batch is encoded image by image. Of the hidden
    states only the last two are kept (diffusers reads the penultimate one)."""

    def parameters(self):
        # diffusers' encode_image takes the type it feeds the encoder from its first parameter.
        yield torch.empty(0, device=self.device)

    def __call__(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None, return_dict: bool = True,
                 **kwargs: Any):  # fmt: skip
        from transformers.modeling_outputs import ModelOutput
        from transformers.models.clip.modeling_clip import CLIPVisionModelOutput

        if unsupported := sorted(k for k, v in kwargs.items() if v is not None):
            raise ValueError(f"The compiled image encoder does not take {unsupported}.")
        rows = [self.compiled(pixel_values=pixel_values[i : i + 1]) for i in range(pixel_values.shape[0])]
        out = {name: torch.cat([row[name] for row in rows]) for name in rows[0]}
        hidden = (out["penultimate_hidden_state"], out["last_hidden_state"]) if output_hidden_states else None
        result: ModelOutput = CLIPVisionModelOutput(
            image_embeds=out["image_embeds"], last_hidden_state=out["last_hidden_state"], hidden_states=hidden
        )
        return result if return_dict else result.to_tuple()


class AOTControlNet(AOTModelPart):
    """A compiled ControlNet, answering diffusers' ``isinstance(controlnet, ControlNetModel)`` checks.

    Its graph runs at the UNet's batch with one scale per residual (export/components.py): the conditioning
    scale, or guess mode's ramp over the blocks, times the step's control_guidance keep factor. In guess mode
    with guidance, diffusers runs it on the conditional half only: that half runs twice (padding), half kept.
    """

    @property
    def __class__(self):  # noqa: D105 - diffusers' pipelines branch on isinstance(self.controlnet, ControlNetModel)
        return ControlNetModel

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        controlnet_cond: torch.Tensor,
        conditioning_scale: float = 1.0,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guess_mode: bool = False,
        return_dict: bool = True,
    ):
        unsupported = [n for n, v in (("class_labels", class_labels), ("timestep_cond", timestep_cond),
                                      ("attention_mask", attention_mask),
                                      ("cross_attention_kwargs", cross_attention_kwargs)) if v]  # fmt: skip
        if unsupported:
            raise ValueError(f"The compiled ControlNet does not take {unsupported}.")
        # An SDXL ControlNet takes the UNet's micro-conditioning; an SD one none.
        added_names = [spec["name"] for spec in self.compiled.inputs if spec["name"] in ("text_embeds", "time_ids")]
        added = {name: (added_cond_kwargs or {}).get(name) for name in added_names}
        if missing := [name for name, value in added.items() if value is None]:
            raise ValueError(f"This SDXL ControlNet needs added_cond_kwargs {missing}, which were not given.")
        if added_cond_kwargs and not added_names:
            raise ValueError(f"The compiled ControlNet does not take added_cond_kwargs ({sorted(added_cond_kwargs)}).")
        count = len(self.compiled.output_names)
        if guess_mode and not self.config.get("global_pool_conditions"):
            # diffusers' guess mode: the residuals ramp from 0.1 (first block) to 1 (mid block).
            scales = torch.logspace(-1, 0, count, device=sample.device) * conditioning_scale
        else:
            scales = torch.full((count,), float(conditioning_scale), device=sample.device)
        batch, compiled = sample.shape[0], self.compiled.input_shape("sample")[0]
        timestep = torch.as_tensor(timestep, device=sample.device).to(torch.float32).reshape(-1).expand(batch)
        inputs = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states,
                  "controlnet_cond": controlnet_cond, **added}  # fmt: skip
        if batch * 2 == compiled:  # guess mode with guidance: the conditional half only
            inputs = {k: torch.cat([v, v]) for k, v in inputs.items()}
        outputs = list(self.compiled(**inputs, scales=scales).values())
        outputs = [o[:batch] for o in outputs]
        down, mid = tuple(outputs[:-1]), outputs[-1]
        return ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=mid) if return_dict else (down, mid)


class AOTMultiControlNet:
    """Several compiled ControlNets as diffusers' ``MultiControlNetModel``: its own forward sums their residuals."""

    dtype = torch.float32

    def __init__(self, nets: list[AOTControlNet]):
        self.nets = nets

    @property
    def __class__(self):  # noqa: D105 - see AOTControlNet
        return MultiControlNetModel

    @property
    def device(self) -> torch.device:
        return self.nets[0].device

    def to(self, *args: Any, **kwargs: Any) -> AOTMultiControlNet:
        for net in self.nets:
            net.to(*args, **kwargs)
        return self

    def __call__(self, *args: Any, **kwargs: Any):
        return MultiControlNetModel.forward(self, *args, **kwargs)

    def __repr__(self) -> str:
        return f"AOTMultiControlNet({self.nets})"


class AOTAutoencoderKL:
    """The VAE as diffusers sees it: ``encode`` and ``decode`` over two compiled graphs."""

    dtype = torch.float32

    def __init__(self, decoder: CompiledComponent, encoder: CompiledComponent | None = None):
        self.decoder = decoder
        self.encoder = encoder
        self.config = decoder.config

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    to = AOTModelPart.to
    modules = AOTModelPart.modules
    parameters = AOTModelPart.parameters

    @property
    def compiled(self) -> CompiledComponent:  # for AOTModelPart.to's messages
        return self.decoder

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        if self.encoder is None:
            raise ValueError(
                "This pipeline was exported without a VAE encoder, which image-to-image and inpainting need. "
                "Export it again with the encoder (the default)."
            )
        moments = torch.cat([self.encoder(sample=x[i : i + 1])["latent_parameters"] for i in range(x.shape[0])])
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None):
        sample = self.decoder(latent_sample=z)["sample"]
        if not torch.isfinite(sample).all():
            raise FloatingPointError(
                "The VAE decoder produced NaN or infinite values, which would come out as black images. "
                f"It runs in {self.decoder.manifest['precision']}; fp16 overflows in the SD/SDXL VAE: export with "
                "--auto-cast-type bf16 or --auto-cast none."
            )
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def __repr__(self) -> str:
        return f"AOTAutoencoderKL(decoder={self.decoder.folder}, encoder={self.encoder and self.encoder.folder})"
