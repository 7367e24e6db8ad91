"""LoRA on a loaded compiled pipeline: diffusers' own adapter methods, the compiled weights changed in place.

A compiled graph has no layers a LoRA could be injected into, so diffusers' loader runs on *hollow* copies of
the adaptable models (the UNet and text encoders: same classes and configs, every tensor a zero-stride zero, so
nothing is allocated). ``load_lora_weights``, ``set_adapters``, ``fuse_lora``, ``unfuse_lora``,
``delete_adapters``, ``disable_lora``... are diffusers' and peft's own there, with their bookkeeping and meanings.
Each adapted layer's base weight is made a real zero tensor, so what diffusers fuses into it, plus the adapters
active and unfused, is exactly the change a LoRA makes to that weight.

Every compiled constant is linear in the weights it was folded from (oneDNN reorders, permutes, Winograd's
G g G^T: checked per constant), so its new value is the export's constant, read back from the weights blob,
plus the export's refit program applied to the change (export/refit.py); the loaded model takes it in place of
the old one (AOTInductor's ``update_constant_buffer``). Nothing is compiled, the kernels stay the same, and
removing every adapter returns the exported constants exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .. import artifact
from ..export import refit
from ..runtime import trusted
from ..runtime.compiled import CompiledComponent
from ..runtime.hollow import meta_unet

# diffusers' LoRA methods that change what the adapted layers compute: each is run on the hollow models, then
# the compiled weights are brought level with them.
CHANGING_METHODS = (
    "load_lora_weights", "fuse_lora", "unfuse_lora", "set_adapters", "delete_adapters", "unload_lora_weights",
    "enable_lora", "disable_lora",
)  # fmt: skip


def _hollow(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter and buffer of ``model`` (built on the meta device) as a zero-stride zero: real tensors of
    the right shapes and types that take no memory."""
    for module in model.modules():
        for name, tensor in module._parameters.items():
            if tensor is not None:
                module._parameters[name] = torch.nn.Parameter(_zeros_like(tensor), requires_grad=False)
        for name, tensor in module._buffers.items():
            if tensor is not None:
                module._buffers[name] = _zeros_like(tensor)
    return model.eval()


def _zeros_like(tensor: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=tensor.dtype).expand(tensor.shape)


class CompiledLoras:
    """The LoRA state of one compiled pipeline (shared by its siblings)."""

    def __init__(self, pipe: Any):
        from diffusers.loaders.lora_base import LoraBaseMixin

        mixin = next(
            (c for c in type(pipe).__mro__ if issubclass(c, LoraBaseMixin) and "_lora_loadable_modules" in vars(c)),
            None,
        )
        if mixin is None:
            raise ValueError(f"{type(pipe).__name__} takes no LoRA adapters (diffusers has no LoRA loader for it).")
        folder = Path(pipe._artifact_dir)
        index = artifact.read_json(folder / artifact.MODEL_INDEX_FILE)
        models: dict[str, torch.nn.Module] = {}
        # Which compiled graphs hold each adaptable model's weights (the UNet's step-caching graph too).
        self.graphs: dict[str, list[CompiledComponent]] = {}
        for name in mixin._lora_loadable_modules:
            part = getattr(pipe, name, None)
            if part is None:
                continue
            models[name] = _hollow_model(name, part.compiled.config, index.get(name), folder)
            # Each image size's graph too (export --extra-sizes); the main one first.
            self.graphs[name] = [
                size for graph in (part.compiled, getattr(part, "shallow", None)) if graph
                for size in [graph, *(g for g in graph.graphs.values() if g is not graph)]
            ]  # fmt: skip
        shadow_class = type(f"Hollow{mixin.__name__}", (mixin,), {"hf_device_map": None, "components": models})
        self.shadow = shadow_class()
        for name, model in models.items():
            setattr(self.shadow, name, model)
        # Per compiled graph: its refit program (read first: an export without one is refused before any change),
        # and the weights whose compiled constants now differ from the export's (written back when no adapter
        # changes them any more).
        self._programs = {str(graph.folder): _program(graph) for graphs in self.graphs.values() for graph in graphs}
        self._changed: dict[str, set[str]] = {}
        # Per adaptable model: the paths of the layers an adapter was ever loaded into (their base weights are real).
        self._adapted: dict[str, set[str]] = {name: set() for name in self.graphs}

    def run(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Runs diffusers' ``method`` on the hollow models, then updates the compiled weights to match. An adapter
        whose change cannot be applied (a DoRA, a constant not linear in its weight) is taken out again: the
        compiled weights and the adapters diffusers lists stay as they were."""
        before = {name for names in self.shadow.get_list_adapters().values() for name in names}
        with _no_transformers_progress_bar():
            result = getattr(self.shadow, method)(*args, **kwargs)
        try:
            if method == "load_lora_weights":
                self._materialize_adapted()
            self.sync()
        except Exception:
            added = {name for names in self.shadow.get_list_adapters().values() for name in names} - before
            if added:
                self.shadow.delete_adapters(sorted(added))
            raise
        return result

    @property
    def active(self) -> bool:
        """Whether any compiled weight differs from the export's."""
        return any(self._changed.values())

    def sync(self) -> None:
        """Brings every compiled graph's constants level with the hollow models' adapted layers: all new constants
        are computed first, so an error leaves the compiled weights as they were."""
        updates = []
        for name, graphs in self.graphs.items():
            model = getattr(self.shadow, name)
            # An unloaded adapter leaves its layer plain, with what was fused in it: still a change (as in diffusers).
            deltas = {f"{path}.weight": _change(model.get_submodule(path)) for path in self._adapted[name]}
            updates.extend(self._changed_constants(graph, deltas, main=graph is graphs[0]) for graph in graphs)
        for graph, constants, changed in updates:
            if constants:
                graph.update_constants(constants)
            self._changed[str(graph.folder)] = changed

    def _changed_constants(self, graph: CompiledComponent, deltas: dict[str, torch.Tensor], *, main: bool):
        """``graph``'s constants computed from the weights ``deltas`` change (by the model's own names; those
        changed before go back to the export's), with the names of the weights that now differ from the export's."""
        key = str(graph.folder)
        program, fixed = self._programs[key]
        inputs = program["inputs"]
        changes = {}
        for name, delta in deltas.items():
            found = _graph_name(name, inputs)
            if found is not None:
                changes[found] = delta
            elif main:
                raise refit.RefitError(f"{graph.folder} was compiled without a weight `{name}` for the LoRA to change.")
            # else: a weight the step-caching graph does not read (it skips the deep blocks)
        for name in self._changed.get(key, set()) - changes.keys():  # no adapter changes it now: the export's
            changes[name] = torch.zeros(inputs[name]["shape"])
        changed = {name for name, delta in changes.items() if bool(delta.any())}
        if not changes:
            return graph, {}, changed
        # An extra size's constants that are the main graph's follow the main graph's update (runtime/compiled.py).
        constants = refit.changed_constants(program, fixed, graph.read_constant, changes, skip=graph.shared)
        return graph, constants, changed

    def _materialize_adapted(self) -> None:
        """Gives every adapted layer a real zero base weight for diffusers to fuse into (peft merges in place)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for name in self.graphs:
            for path, module in getattr(self.shadow, name).named_modules():
                if not isinstance(module, BaseTunerLayer):
                    continue
                _check_supported(module)
                base = module.get_base_layer()
                if base.weight.stride() == (0,) * base.weight.dim():
                    base.weight = torch.nn.Parameter(torch.zeros(base.weight.shape), requires_grad=False)
                self._adapted[name].add(path)


def _program(graph: CompiledComponent) -> tuple[dict, dict]:
    package = graph.folder / artifact.PACKAGE_DIR
    record = graph.manifest.get("refit") or refit.summary(package)  # as --reuse-compiled reads it
    if not record.get("available"):
        raise refit.RefitError(
            f"{graph.folder} has no refit program ({record.get('reason')}), so a "
            "LoRA cannot change its weights in place. Fuse it at export instead: aotdiffusion export --model MODEL "
            "--lora LORA[:SCALE] OUT, with this export's options."
        )
    return refit.read_program(package)


@contextmanager
def _no_transformers_progress_bar() -> Iterator[None]:
    """transformers draws a "Loading weights" bar for each adapter it loads into a text encoder (a few KiB, no
    time): off while diffusers loads, as before."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def _graph_name(name: str, inputs: dict[str, Any]) -> str | None:
    """The compiled graph's name for the model's weight ``name``: the export wraps each model in graph modules
    (export/components.py, deep_cache.py), which prefix its names (``module.unet.``, ``module.graph.unet.``)."""
    found = [graph_name for graph_name in inputs if graph_name == name or graph_name.endswith(f".{name}")]
    return found[0] if len(found) == 1 else None


def _change(module: Any) -> torch.Tensor:
    """What a layer adds to its base weight, as peft's forward computes it: the fused adapters (in the zero base
    weight) plus, unless disabled, the active unfused ones. A layer whose adapters were unloaded keeps what was
    fused into it."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not isinstance(module, BaseTunerLayer):
        return module.weight.detach().clone()
    if module.disable_adapters and module.merged:
        module.unmerge()  # what peft's forward does on the first call with the adapters disabled
    change = module.get_base_layer().weight.detach().clone()
    if not module.disable_adapters and not module.merged:
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                change += module.get_delta_weight(adapter)
    return change


def _check_supported(module: Any) -> None:
    for adapter in module.lora_A:
        if module.use_dora.get(adapter):
            raise ValueError(
                f"The adapter {adapter!r} is a DoRA, which scales each weight by its norm: the compiled export "
                "does not keep the base weights that needs. Fuse it at export: aotdiffusion export --lora."
            )
        if getattr(module, "lora_bias", {}).get(adapter):
            raise ValueError(
                f"The adapter {adapter!r} changes biases (lora_bias), which in-place LoRA does not apply. Fuse it "
                "at export: aotdiffusion export --lora."
            )


def _hollow_model(name: str, config: Any, entry: Any, folder: Path) -> torch.nn.Module:
    """A hollow model of the compiled component ``name``, its class checked as the index's other parts are."""
    where = f"{folder / artifact.MODEL_INDEX_FILE} ({name})"
    if name == "unet":
        model = meta_unet(config)
    else:
        model_class = trusted.adaptable_model_class(*(entry or [None, None]), where=where)
        with torch.device("meta"):
            if hasattr(model_class, "config_class"):  # transformers
                model = model_class(model_class.config_class.from_dict(dict(config)))
            else:  # diffusers (SD3's transformer)
                model = model_class.from_config(dict(config))
    return _hollow(model)


def lora_method(method: str):
    """A pipeline method running diffusers' ``method`` of the same name through the pipeline's CompiledLoras."""

    def call(self, *args: Any, **kwargs: Any) -> Any:
        with self._call_lock:
            if self._replicas is not None or self._denoiser.replicas is not None:
                raise ValueError(
                    f"{method} changes the weights of this process's compiled models, not of its data-parallel "
                    "replicas: call enable_data_parallel('none') first, or fuse the LoRA at export (--lora)."
                )
            return self._compiled_loras().run(method, *args, **kwargs)

    call.__name__ = call.__qualname__ = method
    call.__doc__ = f"diffusers' ``{method}``, applied to the compiled weights in place (no compiling)."
    return call
