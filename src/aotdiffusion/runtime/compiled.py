"""Loads one compiled component and runs it, checking every input against its static shape.

Nothing here compiles: the component's unpacked AOTInductor package holds the generated shared
library, which is loaded as is, and its weights blob, which AOTInductor reads from where it lies
(nothing is extracted to a temporary folder; its CPU loader does copy the constants into memory it
allocates, model_base.h's load_constants: about 0.8 GB/s here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import FrozenDict
from safetensors.torch import load_file

from .. import artifact
from . import trusted
from .memory import keep_freed_memory

_DTYPES = {"float32": torch.float32, "int64": torch.int64, "int32": torch.int32}


class CompiledComponent:
    """A compiled graph plus the config and manifest it was exported with."""

    def __init__(self, folder: str | Path, *, device: str | None = None, verify_checksums: bool = False):
        self.folder = Path(folder)
        self.name = self.folder.name
        config, self.manifest = artifact.read_component(self.folder, verify_checksums=verify_checksums)
        self.config = FrozenDict(config)
        self.device = torch.device(device or self.manifest["device"])
        graph = self.manifest["graphs"][0]
        self.inputs: list[dict[str, Any]] = graph["inputs"]
        self.output_names: list[str] = graph["outputs"]
        if self.device.type == "cpu":
            keep_freed_memory()
        device_index = self.device.index if self.device.index is not None else -1
        self._runner = _load_unpacked(self.folder / graph["file"], device_index)
        self._owned_constants: dict[str, torch.Tensor] = {}

    @property
    def static(self) -> dict[str, Any]:
        return self.manifest["static"]

    def input_shape(self, name: str) -> tuple[int, ...]:
        return next(tuple(spec["shape"]) for spec in self.inputs if spec["name"] == name)

    def __call__(self, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
        args = []
        for spec in self.inputs:
            name = spec["name"]
            if name not in tensors or tensors[name] is None:
                raise ValueError(f"{self.name} needs the input `{name}`, which was not given.")
            tensor = tensors.pop(name)
            if tuple(tensor.shape) != tuple(spec["shape"]):
                raise ValueError(
                    f"{self.name} was compiled for `{name}` of shape {tuple(spec['shape'])} but got "
                    f"{tuple(tensor.shape)}. Static shapes are fixed at export: export again with the shape you need."
                )
            args.append(tensor.to(device=self.device, dtype=_DTYPES[spec["dtype"]]).contiguous())
        unexpected = [k for k, v in tensors.items() if v is not None]
        if unexpected:
            raise ValueError(
                f"{self.name} was compiled without the inputs {unexpected}; export again from a model that takes them."
            )
        outputs = self._runner(*args)
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        return dict(zip(self.output_names, outputs))

    def update_constants(self, constants: dict[str, torch.Tensor]) -> None:
        """Replaces compiled constants (by their names in the package) with ``constants``, laid out as the compiled
        code reads them; the tensors are kept here, since the loaded model reads them where they lie."""
        self._runner.loader.update_constant_buffer(constants, False, False, True)  # user-managed: no copy
        self._owned_constants.update(constants)

    def load_extra_state(self, name: str) -> torch.nn.Module | None:
        """Rebuilds a small eager module saved beside the graph (e.g. CLIP's final LayerNorm)."""
        record = self.manifest.get("extra_state", {}).get(name)
        if record is None:
            return None
        where = f"{self.folder / artifact.CONFIG_FILE} (extra_state.{name})"
        module = trusted.extra_state_module(record["class"], record["args"], where)
        module.load_state_dict(load_file(self.folder / record["file"]))
        return module.eval().to(self.device)

    def output_class(self) -> type | None:
        qualified = self.manifest.get("output_class")
        return trusted.output_class(qualified, str(self.folder / artifact.CONFIG_FILE)) if qualified else None


def _load_unpacked(package: Path, device_index: int) -> Any:
    """Opens an unpacked package in place. ``aoti_load_package`` only takes a ``.pt2`` zip (which it extracts
    to a fresh temporary folder on every load); its C++ loader also takes the unpacked folder."""
    from torch._inductor.package.package import AOTICompiledModel

    loader = torch._C._aoti.AOTIModelPackageLoader(str(package), "model", False, 1, device_index)
    return AOTICompiledModel(loader)
