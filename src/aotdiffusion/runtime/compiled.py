"""Loads one compiled component and runs it, checking every input against its static shape.

Nothing here compiles: the component's unpacked AOTInductor package holds the generated shared
library, which is loaded as is, and its weights blob, which AOTInductor reads from where it lies
(nothing is extracted to a temporary folder; its CPU loader does copy the constants into memory it
allocates, model_base.h's load_constants: about 0.8 GB/s here).

A component exported at several image sizes has one graph per size (export/sizes.py): each extra size is a
component folder of its own under ``sizes/``, loaded here with the main graph's constant tensors where they are
the same, and :meth:`CompiledComponent.use_size` picks the graph that calls run.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import FrozenDict
from safetensors.torch import load_file

from .. import artifact
from ..export import refit, sizes
from . import blob_constants, trusted
from .memory import keep_freed_memory

_DTYPES = {"float32": torch.float32, "int64": torch.int64, "int32": torch.int32}


class CompiledComponent:
    """A compiled graph plus the config and manifest it was exported with (and its other image sizes' graphs)."""

    def __init__(
        self,
        folder: str | Path,
        *,
        device: str | None = None,
        verify_checksums: bool = False,
        main: CompiledComponent | None = None,
    ):
        """``main``: the main graph of the component whose extra image size ``folder`` is."""
        self.folder = Path(folder)
        self.name = self.folder.name if main is None else f"{main.name} at {self.folder.name}"
        config, self.manifest = artifact.read_component(self.folder, verify_checksums=verify_checksums)
        self.config = FrozenDict(config)
        self.device = torch.device(device or self.manifest["device"])
        graph = self.manifest["graphs"][0]
        self._inputs: list[dict[str, Any]] = graph["inputs"]
        self.output_names: list[str] = graph["outputs"]
        if self.device.type == "cpu":
            keep_freed_memory()
        weights = self.manifest.get("weights", {})
        self._runner = _Runner(self.folder / graph["file"], self.device)
        # A weak reference: the main graph owns its sizes' graphs (no cycle, so they are freed when it is).
        self.main = weakref.proxy(main) if main is not None else None
        # This graph's constants that are the main graph's (by its name -> the main graph's name for it).
        self.shared: dict[str, str] = weights.get("shared", {}) if weights.get("storage") == "shared" else {}
        if weights.get("storage") == "shared":
            if main is None:
                raise artifact.ArtifactError(
                    f"{self.folder} is an extra image size of a component and shares its weights: load the "
                    "component's folder, not this one."
                )
            # Kept here: the compiled code reads them where they lie (the main graph keeps its own alive).
            self._owned_constants: dict[str, torch.Tensor] = self._shared_constants(main, weights)
            self._runner.set_constants(self._owned_constants)
        else:
            self._runner.load_blob(self.folder / weights["file"] if weights.get("file") else None)
            self._owned_constants = {}
        self._reader = None
        # Image size (height, width) -> the graph for it, but this one's own (kept apart: no reference cycle).
        self._own_size: tuple[int, int] | None = None
        self._others: dict[tuple[int, int], CompiledComponent] = {}
        for record in self.manifest.get("sizes", []):
            size = (record["height"], record["width"])
            if record["folder"] == ".":
                self._own_size = size
            else:
                self._others[size] = CompiledComponent(
                    self.folder / record["folder"], device=device, verify_checksums=verify_checksums, main=self
                )
        self._active_size: tuple[int, int] | None = None  # None: this graph

    @property
    def graphs(self) -> dict[tuple[int, int], CompiledComponent]:
        """Image size (height, width) -> the graph for it, this one first; empty for a component with one graph."""
        if self._own_size is None:
            return {}
        return {self._own_size: self, **self._others}

    @property
    def _active(self) -> CompiledComponent:
        return self._others.get(self._active_size, self)

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """The image sizes (height, width in pixels) this component has a graph for; empty when it does not depend
        on the image size (a text encoder) or was compiled for one size."""
        return list(self.graphs)

    def use_size(self, height: int, width: int) -> None:
        """Makes calls run the graph compiled for ``height`` x ``width`` images (a component with one graph, or
        none that depends on the size, keeps it)."""
        if not self.graphs:
            return
        if (height, width) not in self.graphs:
            compiled = ", ".join(f"{h}x{w}" for h, w in self.graphs)
            raise ValueError(
                f"{self.name} was compiled for {compiled} images (height x width), not {height}x{width}: call with "
                f"one of those, or export again with --extra-sizes {height}x{width}."
            )
        self._active_size = (height, width)

    @property
    def inputs(self) -> list[dict[str, Any]]:
        return self._active._inputs

    @property
    def static(self) -> dict[str, Any]:
        return self._active.manifest["static"]

    def input_shape(self, name: str) -> tuple[int, ...]:
        return next(tuple(spec["shape"]) for spec in self.inputs if spec["name"] == name)

    def __call__(self, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
        graph = self._active
        args = []
        for spec in graph._inputs:
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
        return dict(zip(graph.output_names, graph._runner(args)))

    def constants(self) -> dict[str, torch.Tensor]:
        """The loaded constants by their names in the package (the tensors the compiled code reads)."""
        return self._runner.constants()

    def update_constants(self, constants: dict[str, torch.Tensor]) -> None:
        """Replaces compiled constants (by their names in the package) with ``constants``, laid out as the compiled
        code reads them; the tensors are kept here, since the loaded model reads them where they lie."""
        self._runner.set_constants(constants, partial=True)
        self._owned_constants.update(constants)
        for graph in self._others.values():  # the other sizes read the same tensors where they share a constant
            theirs = {name: constants[source] for name, source in graph.shared.items() if source in constants}
            if theirs:
                graph._runner.set_constants(theirs, partial=True)

    def read_constant(self, entry: dict[str, Any]) -> bytes:
        """The bytes the export stored for the constant of this graph's refit program ``entry``."""
        if self._reader is None:
            self._reader = sizes.constant_reader(self.folder, self.manifest["weights"])
        return self._reader(entry)

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

    def _shared_constants(self, main: CompiledComponent, weights: dict[str, Any]) -> dict[str, torch.Tensor]:
        """This graph's constants: the main graph's tensors themselves where the export found them equal, the
        others rebuilt from the bytes kept for them."""
        theirs = main.constants()
        constants = {name: theirs[source] for name, source in weights["shared"].items()}
        own = load_file(self.folder / weights["file"])
        if own:
            program, fixed = refit.read_program(self.folder / artifact.PACKAGE_DIR)
            constants.update(refit.constants_from_bytes(program, fixed, own))
        return constants


class _Runner:
    """The loaded library of one graph. On CPU, AOTInductor's container runner opened on the library itself (it
    lists and hands over the loaded constants: several image sizes share them), its constants loaded by
    runtime/blob_constants.py; elsewhere its package loader, which opens the unpacked folder in place
    (``aoti_load_package`` only takes a ``.pt2`` zip, which it extracts to a fresh temporary folder on every
    load)."""

    def __init__(self, package: Path, device: torch.device):
        self.cpu = device.type == "cpu"
        self._blob: blob_constants.BlobConstants | None = None  # owns the memory of the constants it loaded
        if self.cpu:
            library = next((p for p in sorted(package.rglob("*.wrapper.so"))), None)
            if library is None:
                raise artifact.ArtifactError(f"{package} holds no compiled library (*.wrapper.so): export it again.")
            self._library = library
            self._container = torch._C._aoti.AOTIModelContainerRunnerCpu(str(library), 1)
            # Every constant handed to the container (by internal name) once all of them were: what constants()
            # gives. The container's own listing is keyed by original names, which int8 graphs repeat.
            self._handed: dict[str, torch.Tensor] | None = None
        else:
            from torch._inductor.package.package import AOTICompiledModel

            index = device.index if device.index is not None else -1
            self._loader = torch._C._aoti.AOTIModelPackageLoader(str(package), "model", False, 1, index)
            self._model = AOTICompiledModel(self._loader)

    def load_blob(self, blob: Path | None) -> None:
        """The constants from the package's weights blob (the package loader reads it itself)."""
        if not self.cpu or blob is None:
            return
        if not blob_constants.available():
            self._container.update_constant_buffer_from_blob(str(blob))
            return
        self._blob = blob_constants.BlobConstants(self._library, blob)
        self.set_constants(self._blob.tensors)

    def set_constants(self, constants: dict[str, torch.Tensor], *, partial: bool = False) -> None:
        """Hands ``constants`` (by internal name) to the compiled code without copying them: it reads them where
        they lie, so the caller keeps them alive. All of them unless ``partial``."""
        target = self._container if self.cpu else self._loader
        target.update_constant_buffer(constants, False, not partial, True)
        if self.cpu and not partial:
            self._handed = dict(constants)
        elif self.cpu and self._handed is not None:
            self._handed.update(constants)

    def constants(self) -> dict[str, torch.Tensor]:
        if not self.cpu:
            raise NotImplementedError("Sharing loaded constants between graphs is implemented on CPU only.")
        if self._handed is not None:
            return dict(self._handed)
        # Loaded by AOTInductor itself (no blob_constants here): its listing, keyed by original names.
        fqns = self._container.get_constant_names_to_original_fqns()
        names = {fqn: name for name, fqn in fqns.items()}
        if len(names) < len(fqns):
            raise NotImplementedError("This graph's constants repeat original names (int8): they cannot be shared.")
        return {names.get(k, k): v for k, v in self._container.extract_constants_map(False).items()}

    def __del__(self) -> None:
        # The container reads constants in the memory ``_blob`` owns: it goes first.
        self.__dict__.pop("_container", None)
        self.__dict__.pop("_blob", None)

    def __call__(self, args: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.cpu:
            return self._container.run(args)
        outputs = self._model(*args)
        return [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
