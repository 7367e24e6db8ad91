"""What every compiled pipeline adds to its diffusers parent: load, export, save, push, and static-shape checks.

A compiled pipeline is ``class AOTXPipeline(AOTPipelineMixin, XPipeline)``: diffusers' own ``__call__``
runs the denoising loop, and this mixin only checks the call against the compiled shapes first.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import math
import numbers
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from .. import artifact
from ..export import ip_adapter as ip_adapters
from ..export import staging
from ..export.compile import CompilerOptions
from ..export.deep_cache import SHALLOW_COMPONENT
from ..export.lora import fuse_loras
from ..export.pipeline import (
    COMPILED_ATTRIBUTES,
    CONTROLNET_PREFIX,
    controlnets_of,
    default_shapes,
    denoiser_of,
    downsampling_of,
    export_pipeline,
    save_uncompiled_parts,
)
from ..export.precision import Precision
from ..export.sizes import check_sizes
from ..runtime import trusted
from ..runtime.compiled import CompiledComponent
from ..runtime.components import (
    AOTAutoencoderKL,
    AOTControlNet,
    AOTImageEncoder,
    AOTMultiControlNet,
    AOTT5EncoderModel,
    AOTTextEncoder,
    AOTTransformer,
    AOTUNet,
)
from ..shapes import PipelineShapes
from .batches import chunk_call, combine_outputs, prompt_count
from .images import conform_images, image_size
from .lora import CHANGING_METHODS, CompiledLoras, lora_method

logger = logging.getLogger(__name__)

# export() arguments that a reused export takes from the export whose code it reuses.
REUSED_ARGUMENTS = (
    "device", "auto_cast", "auto_cast_type", "freezing", "vae_encoder", "deep_cache", "quantize", "fp32_linear",
    "conv_algorithm", "batch_size", "height", "width", "num_images_per_prompt", "classifier_free_guidance",
    "split_guidance_batch", "extra_sizes", "group_norm", "attention", "sequence_length",
)  # fmt: skip


class AOTPipelineMixin:
    """Mixed in before a diffusers pipeline class; ``diffusers_class`` names that parent."""

    diffusers_class: type[DiffusionPipeline]

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        export: bool = False,
        device: str | None = None,
        verify_checksums: bool = False,
        trust_remote_code: bool = False,
        data_parallel_mode: str = "none",
        devices: list | None = None,
        export_dir: str | Path | None = None,
        **export_kwargs: Any,
    ):
        """Loads an exported pipeline, or with ``export=True`` compiles a diffusers one first.

        Without ``export`` nothing is compiled: the folder (or Hub repository) must hold an export, and
        the keyword arguments go to the Hub (``revision``, ``token``, ``cache_dir``...). With ``export``
        they are :meth:`export`'s compiler arguments and input shapes; the export is written to
        ``export_dir`` (a temporary folder when left out: ``save_pretrained`` keeps it).
        ``trust_remote_code=True`` is needed to load compiled code that was not exported on this
        machine (a Hub repository, a copied folder): loading it runs that native code.
        """
        if not export:
            export_only = sorted(set(export_kwargs) & set(inspect.signature(cls.export).parameters))
            if export_only:
                raise ValueError(
                    f"{export_only} are export arguments, but export=False loads an existing export as it was "
                    "compiled. Pass export=True to compile with them."
                )
            folder = _local_or_download(pretrained_model_name_or_path, export_kwargs, trust_remote_code)
            pipe = cls._from_exported(
                folder, device=device, verify_checksums=verify_checksums, trust_remote_code=trust_remote_code
            )
            return pipe.enable_data_parallel(data_parallel_mode, devices)
        tmp = None
        if export_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="aotdiffusion-")
            export_dir = tmp.name
        cls.export(pretrained_model_name_or_path, export_dir, device=device or "cpu", **export_kwargs)
        pipe = cls._from_exported(Path(export_dir), device=device)
        pipe._export_tmpdir = tmp  # lives as long as the pipeline: save_pretrained copies from it
        return pipe.enable_data_parallel(data_parallel_mode, devices)

    @classmethod
    def export(
        cls,
        model: str | Path,
        output_dir: str | Path,
        *,
        device: str = "cpu",
        # compiler arguments
        auto_cast: str = "auto",
        auto_cast_type: str = "auto",
        validate: bool = True,
        freezing: bool = True,
        vae_encoder: bool = True,
        deep_cache: bool = False,
        quantize: str = "none",
        fp32_linear: str = "auto",
        conv_algorithm: str = "auto",
        group_norm: str = "channel-stats",
        attention: str = "auto",
        unet_id: str | None = None,
        # input shapes
        batch_size: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int | None = None,
        classifier_free_guidance: bool | None = None,
        split_guidance_batch: bool = False,
        extra_sizes: list[tuple[int, int]] | str | None = None,
        sequence_length: int | None = None,
        overwrite: bool = False,
        compile_cache: bool = True,
        reuse_compiled: str | Path | None = None,
        lora: list | None = None,
        controlnet: list | str | Path | None = None,
        ip_adapter: list | str | Path | None = None,
        ip_adapter_subfolder: list | str | None = None,
        ip_adapter_weight_name: list | str | None = None,
        ip_adapter_image_encoder_folder: str = "image_encoder",
        **hub_kwargs: Any,
    ) -> list:
        """Compiles ``model`` (hub id or diffusers folder) into ``output_dir``, without loading the result.

        ``output_dir`` must be new or empty unless ``overwrite``; it is replaced only once the new export
        is complete. ``compile_cache=False`` compiles every component even if the compile cache holds it.
        ``reuse_compiled`` (an export of a model of the same architecture) compiles nothing: its code runs the
        new weights, with its shapes and compiler options (export/reuse.py). ``lora``: adapters fused into the
        weights first, each ``"PATH_OR_ID[:SCALE]"`` or ``(source, scale)`` (export/lora.py). ``controlnet``: the
        ControlNet(s) of a ControlNet pipeline, hub ids or folders (several: multi-ControlNet), each compiled.
        ``ip_adapter``, ``ip_adapter_subfolder``, ``ip_adapter_weight_name``, ``ip_adapter_image_encoder_folder``:
        IP-Adapters as diffusers' ``load_ip_adapter`` takes them (lists: several), loaded before compiling; their
        CLIP image encoder is compiled and their scales stay settable per call (export/ip_adapter.py).
        ``extra_sizes``: more image sizes, (height, width) pairs or ``"768x512,512x768"``: one more graph per size
        for each component the size changes, all sharing one copy of the weights; a call picks the graph by its
        height and width (export/sizes.py).
        Returns one :class:`~aotdiffusion.export.pipeline.ComponentResult` per compiled component.
        """
        if reuse_compiled is not None:
            arguments = locals()
            defaults = inspect.signature(cls.export).parameters
            given = [
                name
                for name in REUSED_ARGUMENTS
                if arguments[name] is not defaults[name].default and arguments[name] != defaults[name].default
            ]
            if given:
                raise ValueError(
                    f"reuse_compiled runs the code compiled in {reuse_compiled} with its shapes and compiler "
                    f"options, so {given} cannot be set with it. Drop them, or export without reuse_compiled."
                )
        staging.check_target(Path(output_dir), overwrite)  # before minutes of loading and compiling
        source = cls.load_source(model, unet_id=unet_id, controlnet=controlnet, **hub_kwargs)
        fuse_loras(source, lora or [])
        adapters = ip_adapters.sources(ip_adapter or [], ip_adapter_subfolder, ip_adapter_weight_name)
        if adapters and reuse_compiled is not None:
            raise ValueError(
                "reuse_compiled does not refit IP-Adapters yet: export the IP-Adapter pipeline without it."
            )
        ip_adapters.load(source, adapters, ip_adapter_image_encoder_folder, **_loader_hub_kwargs(hub_kwargs))
        if reuse_compiled is not None:
            from ..export.reuse import reuse_compiled as reuse

            if source_controlnets := controlnets_of(source):
                raise ValueError(
                    f"reuse_compiled does not refit ControlNets yet ({len(source_controlnets)} here): export the "
                    "ControlNet pipeline without it."
                )

            return reuse(source, reuse_compiled, output_dir, validate=validate, overwrite=overwrite)
        shapes = default_shapes(
            source,
            batch_size=batch_size,
            height=height,
            width=width,
            num_images_per_prompt=num_images_per_prompt,
            classifier_free_guidance=classifier_free_guidance,
            split_guidance_batch=split_guidance_batch,
            sequence_length=sequence_length,
        )
        downsampling = downsampling_of(denoiser_of(source))
        sizes = check_sizes(shapes, extra_sizes or [], source.vae_scale_factor, downsampling)
        options = CompilerOptions(
            Precision(auto_cast, auto_cast_type),
            device=device,
            freezing=freezing,
            quantize=quantize or "none",
            fp32_linear=fp32_linear,
            conv_algorithm=conv_algorithm,
            group_norm=group_norm,
            attention=attention,
        )
        return export_pipeline(
            source,
            output_dir,
            shapes,
            options,
            pipeline_class=cls.__name__,
            validate=validate,
            vae_encoder=vae_encoder,
            deep_cache=deep_cache,
            release_weights=True,
            overwrite=overwrite,
            compile_cache=compile_cache,
            extra_sizes=sizes,
        )

    @classmethod
    def load_source(
        cls, model_id: str | Path, *, unet_id: str | None = None, controlnet: list | str | Path | None = None,
        **hub_kwargs: Any,
    ) -> DiffusionPipeline:  # fmt: skip
        """The eager fp32 diffusers pipeline to compile (the safety checker is not compiled: see README)."""
        extra: dict[str, Any] = {}
        init_params = inspect.signature(cls.diffusers_class.__init__).parameters
        ids = [controlnet] if isinstance(controlnet, (str, Path)) else list(controlnet or [])
        if ids and "controlnet" not in init_params:
            raise ValueError(
                f"{cls.__name__} takes no ControlNet; export {ids} with the ControlNet pipeline (aotdiffusion export "
                "--controlnet ID, or AOTStableDiffusionControlNetPipeline.export(..., controlnet=[ID]))."
            )
        if "controlnet" in init_params:
            if not ids:
                raise ValueError(f"{cls.__name__} needs its ControlNet(s): pass controlnet=[ID_OR_DIR] (--controlnet).")
            from diffusers import ControlNetModel

            nets = [ControlNetModel.from_pretrained(str(i), dtype=torch.float32, **hub_kwargs) for i in ids]
            extra["controlnet"] = nets[0] if len(nets) == 1 else nets  # a list: diffusers' MultiControlNetModel
        if unet_id is not None and "unet" not in init_params:
            raise ValueError(f"{cls.__name__} has no UNet to replace (unet_id, --unet): its denoiser is a transformer.")
        if unet_id is not None:
            from diffusers import UNet2DConditionModel

            extra["unet"] = UNet2DConditionModel.from_pretrained(unet_id, dtype=torch.float32, **hub_kwargs)
        if "safety_checker" in init_params:
            extra.update(safety_checker=None, requires_safety_checker=False)
        # Parts the model was saved without ([null, null] in model_index.json: SD3 without its T5 encoder), which
        # diffusers' loader wants named.
        index = cls.diffusers_class.load_config(
            str(model_id), **{k: v for k, v in hub_kwargs.items() if k in ("revision", "token", "cache_dir")}
        )
        for name, entry in index.items():
            if entry in ([None, None], (None, None)) and name in init_params and name not in extra:
                extra[name] = None
        pipe = cls.diffusers_class.from_pretrained(str(model_id), dtype=torch.float32, **extra, **hub_kwargs)
        if unet_id is not None and pipe.unet.config.time_cond_proj_dim is not None:
            from diffusers import LCMScheduler

            if not isinstance(pipe.scheduler, LCMScheduler):
                # A guidance-distilled (LCM) UNet replacing the base model's needs LCM's sampler; the
                # base model's scheduler would produce noise in 4 steps.
                replaced = type(pipe.scheduler).__name__
                print(f"{unet_id} is an LCM UNet: the export uses LCMScheduler instead of {replaced}.", flush=True)
                pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        return pipe

    @classmethod
    def _from_exported(
        cls,
        folder: Path,
        *,
        device: str | None = None,
        verify_checksums: bool = False,
        trust_remote_code: bool = False,
    ):
        index, block = artifact.read_pipeline_index(folder)
        artifact.check_origin(block, folder, trust_remote_code)
        # Every class the index names is checked before anything (compiled code included) is loaded.
        saved_parts = {
            name: trusted.saved_part_class(*entry, where=f"{folder / artifact.MODEL_INDEX_FILE} ({name})")
            for name, entry in index.items()
            if not name.startswith("_")
            and name not in block["components"]
            and isinstance(entry, list)
            and entry[:1] != [None]
            and (folder / name).is_dir()
        }
        compiled = {
            name: CompiledComponent(folder / name, device=device, verify_checksums=verify_checksums)
            for name in block["components"]
        }
        components: dict[str, Any] = {}
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if name in compiled:
                takes_mask = any(spec["name"] == "attention_mask" for spec in compiled[name].inputs)
                components[name] = (AOTT5EncoderModel if takes_mask else AOTTextEncoder)(compiled[name])
        if "transformer" in compiled:
            components["transformer"] = AOTTransformer(compiled["transformer"])
        else:
            components["unet"] = AOTUNet(compiled["unet"], shallow=compiled.get(SHALLOW_COMPONENT))
        components["vae"] = AOTAutoencoderKL(compiled["vae_decoder"], compiled.get("vae_encoder"))
        if "image_encoder" in compiled:
            components["image_encoder"] = AOTImageEncoder(compiled["image_encoder"])
        nets = [AOTControlNet(compiled[name]) for name in block["components"] if name.startswith(CONTROLNET_PREFIX)]
        if nets:
            components["controlnet"] = nets[0] if len(nets) == 1 else AOTMultiControlNet(nets)
        for name, part_class in saved_parts.items():
            components[name] = part_class.from_pretrained(folder / name)
        pipe = cls._assemble(components, index)
        pipe._artifact_dir = folder
        pipe._export_tmpdir = None
        # diffusers' pipelines keep per-call state on themselves and their scheduler (timesteps, guidance
        # scale, step index): concurrent calls from threads would mix it, so calls take turns.
        pipe._call_lock = threading.Lock()
        # LoRA adapters changing the compiled weights in place: made on first use, shared with siblings.
        pipe._lora_state = {}
        pipe.static_shapes = PipelineShapes.from_dict(block["shapes"])
        # Every image size compiled (export --extra-sizes), the main one (static_shapes) first.
        pipe.compiled_sizes = [tuple(size) for size in block.get("sizes", [])] or [
            (pipe.static_shapes.height, pipe.static_shapes.width)
        ]
        pipe._compiled_graphs = list(compiled.values())
        pipe.compiled_device = torch.device(device or block["device"])
        return pipe

    @classmethod
    def _assemble(cls, components: dict[str, Any], config: dict[str, Any]):
        """``cls(...)`` from loaded parts; ``config`` gives the non-module arguments (requires_aesthetics_score...)."""
        kwargs: dict[str, Any] = {}
        params = inspect.signature(cls.__init__).parameters
        for name, param in params.items():
            if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            if name in components:
                kwargs[name] = components[name]
            elif name in config and not isinstance(config[name], list):
                kwargs[name] = config[name]
            elif param.default is inspect.Parameter.empty:  # safety_checker, feature_extractor: None is accepted
                kwargs[name] = None
        if "requires_safety_checker" in params:  # no checker is compiled; diffusers would warn on every load
            kwargs["requires_safety_checker"] = False
        pipe = cls(**kwargs)
        pipe._replicas = None
        return pipe

    def sibling(self, pipeline_cls: type):
        """This pipeline's loaded compiled parts as another class of its family, nothing loaded twice.

        E.g. image-to-image and inpainting from a text-to-image export (it needs the VAE encoder). The two
        share the compiled components, the scheduler and the call lock, so their calls take turns.
        """
        if not issubclass(pipeline_cls, AOTPipelineMixin):
            raise TypeError(f"{pipeline_cls.__name__} is not a compiled aotdiffusion pipeline class.")
        if isinstance(self, pipeline_cls):
            return self
        parts = dict(self.components)
        pipe = pipeline_cls._assemble(parts, parts)
        shared = (
            "_artifact_dir", "_export_tmpdir", "_call_lock", "static_shapes", "compiled_sizes", "_compiled_graphs",
            "compiled_device", "_lora_state",
        )  # fmt: skip
        for name in shared:
            setattr(pipe, name, getattr(self, name))
        pipe.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        return pipe

    # ------------------------------------------------------------------------- saving, sharing
    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """Copies the compiled artifacts and saves the current scheduler/tokenizers over the exported ones.

        A scheduler swapped after loading is what gets saved, as with a diffusers pipeline.
        """
        if "loras" in self._lora_state and self._lora_state["loras"].active:
            raise ValueError(
                "This pipeline's compiled weights carry LoRA adapters changed in place, which save_pretrained would "
                "not save (it copies the export). Write an export with them fused: aotdiffusion export --model "
                f"MODEL --reuse-compiled {self._artifact_dir} --lora LORA[:SCALE] OUT, or unload_lora_weights() first."
            )
        target = Path(save_directory)
        source = Path(self._artifact_dir)
        if target.resolve() != source.resolve():
            shutil.copytree(source, target, dirs_exist_ok=True)
        index = artifact.read_json(target / artifact.MODEL_INDEX_FILE)
        index.update(save_uncompiled_parts(self.components, target))
        artifact.write_json(target / artifact.MODEL_INDEX_FILE, index)

    def push_to_hub(
        self,
        save_directory: str | Path,
        repository_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        use_auth_token: str | bool | None = None,
        commit_message: str = "Upload aotdiffusion compiled pipeline",
    ) -> str:
        """Uploads a saved export (``save_pretrained``'s folder) to a Hub model repository; returns its URL.

        ``use_auth_token`` is accepted for optimum-neuron's call; ``True`` means the stored login token.
        """
        from huggingface_hub import HfApi

        folder = Path(save_directory)
        artifact.read_pipeline_index(folder)  # refuse to upload something that is not an export
        token = token if token is not None else use_auth_token
        api = HfApi(token=None if token is True else token)
        repo = api.create_repo(repository_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repository_id, commit_message=commit_message)
        return str(getattr(repo, "url", repo))

    # ------------------------------------------------------------------------------------ LoRA
    # diffusers' adapter methods, with their names and meanings, changing the compiled weights in place
    # (pipelines/lora.py): no compiling, the kernels unchanged.
    for _method in CHANGING_METHODS:
        locals()[_method] = lora_method(_method)
    del _method

    def _compiled_loras(self) -> CompiledLoras:
        if "loras" not in self._lora_state:
            self._lora_state["loras"] = CompiledLoras(self)
        return self._lora_state["loras"]

    def get_active_adapters(self) -> list[str]:
        return self._compiled_loras().shadow.get_active_adapters()

    def get_list_adapters(self) -> dict[str, list[str]]:
        return self._compiled_loras().shadow.get_list_adapters()

    # ------------------------------------------------------------------------------ IP-Adapter
    # The adapters are compiled into the UNet (export --ip-adapter); set_ip_adapter_scale is diffusers' own, its
    # scales a graph input (runtime/components.py).
    def load_ip_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(
            "An IP-Adapter adds layers to the UNet, so it is compiled in: export with --ip-adapter ID "
            "--ip-adapter-subfolder DIR --ip-adapter-weight-name FILE (export(..., ip_adapter=..., "
            "ip_adapter_subfolder=..., ip_adapter_weight_name=...)); its scale stays settable with "
            "set_ip_adapter_scale."
        )

    def unload_ip_adapter(self) -> None:
        raise ValueError(
            "The IP-Adapter is compiled into this export's UNet and cannot be unloaded: set_ip_adapter_scale(0.0) "
            "turns it off (the plain UNet's images), or load an export made without --ip-adapter."
        )

    def set_lora_device(self, adapter_names: list[str], device: Any) -> None:
        raise ValueError(
            "A compiled pipeline's LoRA adapters are part of its compiled weights, on the device it was compiled for "
            f"({self.compiled_device}); they cannot move."
        )

    # ---------------------------------------------------------------------------- device rules
    @property
    def _denoiser(self) -> Any:
        """The compiled model the denoising loop calls: the UNet, or a transformer (PixArt)."""
        return denoiser_of(self)

    @property
    def device(self) -> torch.device:
        return self.compiled_device

    @property
    def _execution_device(self) -> torch.device:
        return self.compiled_device

    def to(self, *args: Any, **kwargs: Any):
        for part in (getattr(self, n, None) for n in COMPILED_ATTRIBUTES):
            if part is not None:
                part.to(*args, **kwargs)
        return self

    # ---------------------------------------------------------------------------- data parallel
    def enable_data_parallel(self, mode: str = "all", devices: list | None = None):
        """Runs work side by side on several devices; each replica is a process pinned to its device.

        * ``"all"``: a batch of prompts is split into chunks of the compiled batch size, and one whole
          pipeline replica per device runs them.
        * ``"unet"``: two UNet replicas run the negative and positive halves of the guidance batch at
          once; the export must be compiled with ``split_guidance_batch=True``.
        * ``"none"``: everything in this process.

        On CPU a device is a list of core ids (default: this process's cores split in two); on CUDA a
        device string such as ``"cuda:1"`` (default: the first two GPUs).
        """
        if mode not in ("none", "all", "unet"):
            raise ValueError(f"`data_parallel_mode` must be 'none', 'all' or 'unet', got {mode!r}.")
        for pool in (self._replicas, self._denoiser.replicas):
            if pool is not None:
                pool.close()
        self._replicas = self._denoiser.replicas = None
        if mode == "none":
            return self
        from ..runtime.parallel import ReplicaPool, compiled_component, default_cpu_groups
        from .data_parallel import FACTORY

        if devices is None:
            devices = default_cpu_groups(2) if self.compiled_device.type == "cpu" else ["cuda:0", "cuda:1"]
        if mode == "all":
            self._replicas = ReplicaPool(FACTORY, [str(self._artifact_dir), type(self).__name__], devices)
            return self
        if not self.static_shapes.split_guidance_batch:
            raise ValueError(
                "data_parallel_mode='unet' runs the two guidance halves on two UNet replicas, but this UNet was "
                f"compiled for the whole guidance batch ({self._denoiser.batch_size}). Export again with "
                "--split-guidance-batch (split_guidance_batch=True), or use data_parallel_mode='all'."
            )
        if len(devices) != 2:
            raise ValueError(f"data_parallel_mode='unet' runs the two guidance halves on 2 devices, got {devices}.")
        factory = f"{compiled_component.__module__}:{compiled_component.__name__}"
        self.unet.replicas = ReplicaPool(factory, [str(self.unet.compiled.folder)], devices)
        return self

    def _call_replicas(self, call: dict[str, Any], extra: dict[str, Any]):
        from .data_parallel import split_call

        requests, images = split_call(call, extra, self.static_shapes, self.scheduler, self._unsplit())
        return combine_outputs(self._replicas.map(requests), call.get("return_dict", True), images)

    # ----------------------------------------------------------------------------------- calling
    def __call__(self, *args: Any, resize_images: bool = False, cache_interval: int = 1, **kwargs: Any):
        """diffusers' ``__call__``, after checking the call against the compiled shapes.

        Any number of prompts: more or fewer than the compiled batch run as calls of it, the last padded, the
        padding's images dropped (batches.py; a list of generators, one per image, makes each image what its
        prompt alone gives).

        ``resize_images=True`` resizes an ``image``/``mask_image`` of another size to the compiled
        size; without it such an image is an error, never silently resized.
        ``cache_interval=N`` (step caching, exports made with ``deep_cache=True``) runs the full UNet on
        one step of every N and the shallow UNet over its cached deep feature on the others; 1 is off.
        """
        if isinstance(cache_interval, bool) or not isinstance(cache_interval, int) or cache_interval < 1:
            raise ValueError(
                f"`cache_interval` is how many denoising steps share one full UNet pass: an integer >= 1 (1 = no "
                f"caching, 3 is DeepCache's usual setting), got {cache_interval!r}."
            )
        bound = inspect.signature(self.diffusers_class.__call__).bind(self, *args, **kwargs)
        if "max_sequence_length" in bound.signature.parameters and "max_sequence_length" not in bound.arguments:
            # Left out, the prompt length is the compiled one (as height and width are the compiled size).
            bound.arguments["max_sequence_length"] = self.static_shapes.sequence_length
        bound.apply_defaults()
        call = dict(bound.arguments)
        call.pop("self")
        extra = call.pop("kwargs", {})
        with self._call_lock:
            if self._replicas is not None:
                call["resize_images"] = resize_images
                call["cache_interval"] = cache_interval
                return self._call_replicas(call, extra)
            shapes = self._use_size(*self.check_call(call))
            conform_images(call, shapes, self.vae_scale_factor, resize=resize_images)
            chunks = chunk_call(call, shapes.batch_size, shapes.num_images_per_prompt, unsplit=self._unsplit())
            if chunks.whole:
                with self._denoiser.step_cache(cache_interval):
                    return super().__call__(**call, **extra)
            logger.info(
                "Compiled for %d prompt(s) per call: running %d, as %d call(s), the padding's images dropped.",
                shapes.batch_size, prompt_count(call), len(chunks.calls),
            )  # fmt: skip
            outputs = []
            for part in chunks.calls:
                with self._denoiser.step_cache(cache_interval):  # each call starts with a full UNet step
                    outputs.append(super().__call__(**part, **extra))
            return combine_outputs(outputs, call.get("return_dict", True), chunks.images)

    def _use_size(self, height: int, width: int) -> PipelineShapes:
        """Points every compiled component at its graph for ``height`` x ``width`` (checked by check_call); returns
        the shapes calls at that size run with."""
        for graph in self._compiled_graphs:
            graph.use_size(height, width)
        return dataclasses.replace(self.static_shapes, height=height, width=width)

    def _unsplit(self) -> tuple[str, ...]:
        """Call arguments that look per-prompt but are not (a multi-ControlNet's images): never split in chunks."""
        return ()

    def _check_steps(self, call: dict[str, Any]) -> None:
        """A step count the scheduler cannot run is a ValueError before anything runs.

        Some schedulers would first allocate an array of that many steps (10**9: 8 GB); some (PNDM with
        ``steps_offset``) index past their last trained timestep at 1000 steps. A copy of the scheduler
        is set to the count first, and its timesteps checked.
        """
        steps, limit = call.get("num_inference_steps"), getattr(self.scheduler.config, "num_train_timesteps", None)
        if steps is None or not limit or call.get("timesteps") is not None or call.get("sigmas") is not None:
            return
        name = type(self.scheduler).__name__
        if steps > limit:
            raise ValueError(
                f"num_inference_steps={steps} is more than the {limit} timesteps {name} was trained with; use at most "
                f"{limit} (20-50 is usual)."
            )
        probe = copy.deepcopy(self.scheduler)
        probe.set_timesteps(steps)
        timesteps = torch.as_tensor(probe.timesteps)
        if timesteps.is_floating_point():
            # Continuous timesteps (flow matching: sigma x 1000, up to 1000 itself) index no trained table.
            return
        last = int(timesteps.max()) if len(timesteps) else 0
        if last >= limit:
            raise ValueError(
                f"num_inference_steps={steps} makes {name} (steps_offset={probe.config.get('steps_offset', 0)}) step "
                f"from timestep {last}, past the last of its {limit} trained timesteps; use fewer steps, e.g. "
                f"{limit // 2}."
            )

    def check_call(self, call: dict[str, Any]) -> tuple[int, int]:
        """Raises ``ValueError`` for any call the compiled shapes cannot serve; fills in height/width. Returns the
        compiled size (height, width) the call runs at.

        Never resizes or overrides silently: the message names what was compiled, what was asked and
        the export flags that would allow the call.
        """
        _check_arguments(call)
        self._check_steps(call)
        shapes = self.static_shapes
        for name in ("height", "width"):
            if name in call and call[name] is None:
                call[name] = getattr(shapes, name)
        if "height" in call or "width" in call:
            asked = (call.get("height", shapes.height), call.get("width", shapes.width))
        else:  # diffusers' image-to-image takes its size from the image: the compiled size it has, if any
            asked = image_size(call.get("image"))
            asked = asked if asked in self.compiled_sizes else (shapes.height, shapes.width)
        if asked not in self.compiled_sizes:
            compiled = ", ".join(f"{h}x{w}" for h, w in self.compiled_sizes)
            raise ValueError(
                f"This pipeline was compiled for {compiled} images (height x width) but was called with "
                f"height={asked[0]}, width={asked[1]}. Call with one of those sizes (left out: "
                f"{shapes.height}x{shapes.width}), or export again with --height {asked[0]} --width {asked[1]} "
                f"(or add the size to an export: --extra-sizes {asked[0]}x{asked[1]})."
            )
        nipp = call.get("num_images_per_prompt")
        nipp = 1 if nipp is None else nipp
        if nipp != shapes.num_images_per_prompt:
            raise ValueError(
                f"This pipeline was compiled for num_images_per_prompt={shapes.num_images_per_prompt} but was called "
                f"with num_images_per_prompt={nipp}. Call it with num_images_per_prompt="
                f"{shapes.num_images_per_prompt}, or export again with --num-images-per-prompt {nipp}."
            )
        length = call.get("max_sequence_length")
        if length is not None and length != shapes.sequence_length:
            raise ValueError(
                f"This pipeline's text encoder and {type(self._denoiser).__name__} were compiled for prompts of "
                f"{shapes.sequence_length} tokens, but it was called with max_sequence_length={length}. Call with "
                f"max_sequence_length={shapes.sequence_length} (longer prompts are truncated to it, with diffusers' "
                f"warning), or export again with --sequence-length {length}."
            )
        self._check_guidance(call)
        return asked

    def _check_guidance(self, call: dict[str, Any]) -> None:
        shapes = self.static_shapes
        scale = call.get("guidance_scale")
        if scale is None:
            return
        image_scale = call.get("image_guidance_scale")  # InstructPix2Pix: guidance needs it >= 1 too
        wants_guidance = scale > 1 and self._denoiser.config.get("time_cond_proj_dim") is None
        asked = f"guidance_scale={scale}"
        if image_scale is not None:
            wants_guidance = wants_guidance and image_scale >= 1
            asked += f", image_guidance_scale={image_scale}"
        on = "guidance_scale > 1" + (" and image_guidance_scale >= 1" if image_scale is not None else "")
        denoiser = "UNet" if getattr(self, "unet", None) is not None else "transformer"
        if wants_guidance and not shapes.classifier_free_guidance:
            raise ValueError(
                f"{asked} asks for classifier-free guidance, but the {denoiser} was compiled without the guidance "
                f"batch (batch {self._denoiser.batch_size}). Call with guidance_scale=0.0 (or <= 1), or export again "
                "without --no-classifier-free-guidance."
            )
        if not wants_guidance and shapes.classifier_free_guidance:
            raise ValueError(
                f"{asked} turns classifier-free guidance off, but the {denoiser} was compiled for the guidance batch "
                f"(batch {self._denoiser.batch_size}). Call with {on}, or export again with "
                "--no-classifier-free-guidance."
            )


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def _check_arguments(call: dict[str, Any]) -> None:
    """Step counts and scales diffusers would turn into a ZeroDivisionError, an empty loop or NaN images."""
    steps = call.get("num_inference_steps")
    if steps is not None and call.get("timesteps") is None and call.get("sigmas") is None:
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
            raise ValueError(
                f"`num_inference_steps` is how many denoising steps to run: an integer >= 1 (e.g. 20-50), got "
                f"{steps!r}."
            )
    generator = call.get("generator")
    generators = generator if isinstance(generator, list) else [generator]
    if generator is not None and not all(isinstance(g, torch.Generator) for g in generators):
        raise TypeError(
            f"`generator` must be a torch.Generator or a list of them (one per image), got {generator!r}; e.g. "
            "generator=torch.Generator().manual_seed(0)."
        )
    output_type = call.get("output_type")
    if output_type is not None and output_type not in OUTPUT_TYPES:
        # diffusers would warn and return numpy arrays instead: never silently something else than asked.
        raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
    for name in ("guidance_scale", "strength", "eta", "guidance_rescale"):
        value = call.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"`{name}` must be a finite number, got {value!r}.")


def _loader_hub_kwargs(hub_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Of the Hub arguments given for the model, those that also say how to fetch an adapter (not its revision)."""
    shared = ("cache_dir", "force_download", "proxies", "local_files_only", "token")
    return {k: v for k, v in hub_kwargs.items() if k in shared}


def _local_or_download(model: str | Path, hub_kwargs: dict[str, Any], trust_remote_code: bool = False) -> Path:
    path = Path(model)
    if path.is_dir():
        return path
    if path.exists() or str(model).startswith((".", "/")):
        raise FileNotFoundError(f"{model} is not a folder with an exported pipeline.")
    if not trust_remote_code:  # refused before anything is downloaded
        raise artifact.ArtifactError(
            f"{model} is a Hub repository: an export holds compiled native code, and loading it runs that code "
            "with your permissions. If you trust it, pass trust_remote_code=True (CLI: --trust-remote-code)."
        )
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(model), **hub_kwargs))


class ControlNetCalls:
    """What the ControlNet classes share: which call argument holds the conditioning image(s)."""

    # Text-to-image takes the condition as `image`; image-to-image and inpainting take their input image there
    # and the condition as `control_image` (diffusers' names).
    condition_argument = "image"

    def _unsplit(self) -> tuple[str, ...]:
        # Several ControlNets: the condition holds one image per ControlNet, not one per prompt.
        return (self.condition_argument,) if hasattr(self.controlnet, "nets") else ()
