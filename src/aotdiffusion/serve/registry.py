"""The served models: each a name with one export per compiled size, its replicas and its batcher."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import artifact
from ..runtime.parallel import ReplicaError, ReplicaPool, default_cpu_groups
from .batcher import Batcher, CallKey, Item
from .errors import APIError
from .metrics import Metrics
from .runner import FACTORY, Batch, ExportInfo, Runner


@dataclass(frozen=True)
class ServeOptions:
    replicas: int = 1
    max_wait_ms: float = 50.0
    max_queue: int = 64
    trust_remote_code: bool = False
    # Replicas as processes even when there is one (as Ray and a replica-kill test need); with one
    # replica the default runs it in the server's process.
    replica_processes: bool = False
    # False runs each request in a pipeline call of its own (padded): the load benchmark's baseline.
    batching: bool = True


def parse_spec(spec: str | Path) -> tuple[str, Path]:
    """``NAME=FOLDER`` or ``FOLDER`` (named after the folder) -> (name, folder)."""
    text = str(spec)
    name, sep, folder = text.partition("=")
    if sep and name and "/" not in name:
        return name, Path(folder)
    path = Path(text)
    return path.resolve().name, path


class ServedExport:
    """One export: the replicas that run it and the batcher that feeds them.

    What the HTTP front uses of it (``info``, ``model_name``, ``submit``, ``queued_requests``,
    ``busy_replicas``, ``close``) is also what the Ray Serve front provides.
    """

    def __init__(self, name: str, info: ExportInfo, options: ServeOptions, metrics: Metrics,
                 loaded: ServedExport | None = None):  # fmt: skip
        """``loaded``: the same export at another of its sizes, whose pipeline (replicas) this one shares."""
        self.model_name, self.info = name, info
        folder = info.folder
        _, block = artifact.read_pipeline_index(folder)
        artifact.check_origin(block, folder, options.trust_remote_code)  # before any compiled code is loaded
        self.pool: ReplicaPool | None = None
        self.runner: Runner | None = None
        self.owner = loaded is None  # closes the replicas
        if loaded is not None:
            self.pool, self.runner = loaded.pool, loaded.runner
        elif options.replicas == 1 and not options.replica_processes:
            self.runner = Runner(folder, trust_remote_code=options.trust_remote_code)
        else:
            devices = _devices(block["device"], options.replicas)
            self.pool = ReplicaPool(FACTORY, [str(folder), options.trust_remote_code], devices)
        self.batcher = Batcher(
            self._run,
            replicas=options.replicas,
            batch_size=self.info.batch_size,
            images_per_prompt=self.info.images_per_prompt,
            max_wait_s=options.max_wait_ms / 1000,
            max_queue=options.max_queue,
            observer=metrics.for_export(name, self.info.size),
            batching=options.batching,
        )

    async def submit(self, key: CallKey, items: list[Item], wanted: int, on_progress=None) -> list[bytes]:
        return await self.batcher.submit(key, items, wanted, on_progress)

    @property
    def queued_requests(self) -> int:
        return self.batcher.queued_requests

    @property
    def busy_replicas(self) -> int:
        return self.batcher.busy_replicas

    def _run(self, replica: int, batch: Batch, report) -> list[bytes]:
        batch.size = (self.info.height, self.info.width)
        if self.runner is not None:
            return self.runner(batch, report)
        try:
            return self.pool.call(replica, batch, report)
        except ReplicaError as error:
            if self.pool.alive(replica):
                raise
            # The replica died mid-call: the pool starts a new one, and the call runs once more on it.
            print(f"aotdiffusion serve: {error} Restarting it and running the call again.", flush=True)
            return self.pool.call(replica, batch, report)

    async def close(self) -> None:
        await self.batcher.close()
        if self.pool is not None and self.owner:
            self.pool.close()


def check_specs(specs: Sequence[str | Path]) -> list[tuple[str, ExportInfo]]:
    """(name, what its manifest says) per served export, refused before anything loads when a folder or size clashes."""
    if not specs:
        raise ValueError("Serve at least one export folder.")
    seen: dict[tuple[str, str], Path] = {}
    parsed = []
    for spec in specs:
        name, folder = parse_spec(spec)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder with an exported pipeline.")
        for info in ExportInfo.read(folder).at_sizes():
            size = info.size
            if (name, size) in seen:
                raise ValueError(
                    f"{seen[name, size]} and {folder} are both model {name!r} at {size}: serve one, or name them "
                    "apart (NAME=FOLDER)."
                )
            seen[name, size] = folder
            parsed.append((name, info))
    return parsed


def _devices(device: str, replicas: int) -> list[Any]:
    if device.startswith("cuda"):
        return [f"cuda:{i}" for i in range(replicas)]
    return default_cpu_groups(replicas)


class ServedModel:
    def __init__(self, name: str):
        self.name = name
        self.exports: dict[str, ServedExport] = {}
        self.created = 0

    @property
    def sizes(self) -> list[str]:
        return list(self.exports)

    @property
    def first(self) -> ServedExport:
        return next(iter(self.exports.values()))

    def export_for(self, size: str | None) -> ServedExport:
        if size in (None, "auto"):
            return self.first
        if size not in self.exports:
            served = ", ".join(self.sizes)
            raise APIError(
                400, f"Model {self.name!r} was compiled for size {served} (WIDTHxHEIGHT), not {size!r}. Ask for "
                f"{served}, or export it at {size} and serve that export too.", param="size", code="unsupported_size",
            )  # fmt: skip
        return self.exports[size]


class Registry:
    """Models by name; :meth:`load` reads export folders (``NAME=FOLDER``: one model at several sizes)."""

    def __init__(self, models: dict[str, ServedModel]):
        self.models = models

    @classmethod
    def load(cls, specs: Sequence[str | Path], options: ServeOptions, metrics: Metrics) -> Registry:
        models: dict[str, ServedModel] = {}
        try:
            loaded: dict[Path, ServedExport] = {}  # one pipeline per folder, whatever sizes it serves
            for name, info in check_specs(specs):
                model = models.setdefault(name, ServedModel(name))
                export = ServedExport(name, info, options, metrics, loaded.get(info.folder))
                loaded.setdefault(info.folder, export)
                model.exports[info.size] = export
                model.created = model.created or int(info.folder.stat().st_mtime)
        except BaseException:
            for model in models.values():
                for export in model.exports.values():
                    if export.pool is not None and export.owner:
                        export.pool.close()
            raise
        return cls(models)

    def model(self, name: str | None) -> ServedModel:
        if name is None:
            return next(iter(self.models.values()))
        if name not in self.models:
            raise APIError(
                404, f"The model {name!r} is not served here; served: {', '.join(self.models)}.", param="model",
                code="model_not_found",
            )  # fmt: skip
        return self.models[name]

    def exports(self) -> list[ServedExport]:
        return [export for model in self.models.values() for export in model.exports.values()]

    async def close(self) -> None:
        for export in self.exports():
            await export.close()
