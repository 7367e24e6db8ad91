"""The served models: each a name with one export per compiled size, its replicas and its batcher."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import artifact
from ..runtime.parallel import ReplicaError, ReplicaPool, default_cpu_groups
from .batcher import Batcher
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


def parse_spec(spec: str | Path) -> tuple[str, Path]:
    """``NAME=FOLDER`` or ``FOLDER`` (named after the folder) -> (name, folder)."""
    text = str(spec)
    name, sep, folder = text.partition("=")
    if sep and name and "/" not in name:
        return name, Path(folder)
    path = Path(text)
    return path.resolve().name, path


class ServedExport:
    """One export: the replicas that run it and the batcher that feeds them."""

    def __init__(self, name: str, folder: Path, options: ServeOptions, metrics: Metrics):
        self.info = ExportInfo.read(folder)
        _, block = artifact.read_pipeline_index(folder)
        artifact.check_origin(block, folder, options.trust_remote_code)  # before any compiled code is loaded
        self.pool: ReplicaPool | None = None
        self.runner: Runner | None = None
        if options.replicas == 1 and not options.replica_processes:
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
        )

    def _run(self, replica: int, batch: Batch, report) -> list[bytes]:
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
        if self.pool is not None:
            self.pool.close()


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
    """Models by name, loaded from export folders (``NAME=FOLDER`` joins exports of one model at several sizes)."""

    def __init__(self, specs: Sequence[str | Path], options: ServeOptions, metrics: Metrics):
        if not specs:
            raise ValueError("Serve at least one export folder.")
        self.models: dict[str, ServedModel] = {}
        try:
            for spec in specs:
                name, folder = parse_spec(spec)
                if not folder.is_dir():
                    raise FileNotFoundError(f"{folder} is not a folder with an exported pipeline.")
                model = self.models.setdefault(name, ServedModel(name))
                size = ExportInfo.read(folder).size
                if size in model.exports:
                    raise ValueError(
                        f"Two exports of model {name!r} at {size}: serve one, or name them apart (NAME=FOLDER)."
                    )
                model.exports[size] = ServedExport(name, folder, options, metrics)
                model.created = model.created or int(folder.stat().st_mtime)
        except BaseException:
            self.close_pools()
            raise

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

    def close_pools(self) -> None:
        for model in self.models.values():
            for export in model.exports.values():
                if export.pool is not None:
                    export.pool.close()

    async def close(self) -> None:
        for export in self.exports():
            await export.close()
