"""Ray Serve: the same HTTP API, with each export's replicas as a Ray Serve deployment (one machine or many).

Two deployments per application, as Ray Serve's own Stable Diffusion example splits them: an
ingress (the FastAPI app of :mod:`.app`, stateless, no CPU reserved) and one model deployment per
export (``num_replicas``, ``num_cpus``/``num_gpus`` each). Ray Serve's ``@serve.batch`` does the
packing here, so there is no second hand-written batcher: each prompt entry is one call to the
model deployment, and a replica runs the entries Ray hands it together, one pipeline call per
group that can share one (same :class:`~.batcher.CallKey`), padded to the compiled batch.
Step progress is not streamed from Ray replicas: ``stream=true`` sends only the finished images.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ray import serve

from .batcher import CallKey, Item, QueueFull, pack
from .metrics import ExportObserver, Metrics
from .registry import Registry, ServedModel, check_specs
from .runner import ExportInfo

# Entries a model replica accepts beyond the batch it runs: one more batch can form while one runs.
# (Ray's default of 5 would silently cap the batch: ray #43288.)
ONGOING_BATCHES = 2


@serve.deployment
class ExportDeployment:
    """One export per replica; Ray Serve's batching hands it up to ``batch_size`` prompt entries at once."""

    def __init__(self, folder: str, trust_remote_code: bool, max_wait_s: float, size: tuple[int, int] | None = None):
        from .runner import Runner

        self.runner = Runner(folder, trust_remote_code=trust_remote_code)
        self.info = self.runner.info
        self.size = size  # one of the export's sizes (each served by a deployment of its own)
        self.run.set_max_batch_size(self.info.batch_size)
        self.run.set_batch_wait_timeout_s(max_wait_s)

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.05)
    async def run(self, requests: list[tuple[CallKey, Item]]) -> list[tuple[list[bytes], dict[str, Any]]]:
        groups: dict[CallKey, list[int]] = {}
        for index, (key, _) in enumerate(requests):
            groups.setdefault(key, []).append(index)
        k, results = self.info.images_per_prompt, [None] * len(requests)
        for key, indices in groups.items():
            items = [requests[i][1] for i in indices]
            start = time.monotonic()
            batch = pack(key, items, self.info.batch_size)
            batch.size = self.size
            images = await asyncio.to_thread(self.runner, batch)
            call = {"id": uuid.uuid4().hex, "seconds": time.monotonic() - start,
                    "wanted": sum(item.wanted for item in items), "slots": self.info.slots}  # fmt: skip
            for j, index in enumerate(indices):
                results[index] = (images[j * k : (j + 1) * k], call)
        return results


class RayExport:
    """The ingress's view of one export deployment: what :class:`~.registry.ServedExport` offers the app."""

    def __init__(self, name: str, info: ExportInfo, handle, observer: ExportObserver, max_queue: int):
        self.model_name, self.info, self.handle, self.observer = name, info, handle, observer
        self.max_queue = max_queue
        self.in_flight = 0
        self._seen_calls: deque[str] = deque(maxlen=1024)

    @property
    def queued_requests(self) -> int:
        return self.in_flight  # queued or running: Ray's router holds the queue

    @property
    def busy_replicas(self) -> int:
        return 0  # not known at the ingress; Ray's own metrics have it

    async def submit(self, key: CallKey, items: list[Item], wanted: int, on_progress=None) -> list[bytes]:
        if self.in_flight >= self.max_queue:
            raise QueueFull(self.max_queue, 1)
        self.in_flight += 1
        self.observer.m.queue_depth.labels(**self.observer.labels).set(self.in_flight)
        responses = [self.handle.run.remote((key, item)) for item in items]
        try:
            results = await asyncio.gather(*responses)
        except asyncio.CancelledError:  # the client went away: Ray drops the entries that have not run
            for response in responses:
                response.cancel()
            raise
        finally:
            self.in_flight -= 1
            self.observer.m.queue_depth.labels(**self.observer.labels).set(self.in_flight)
        for _, call in results:
            if call["id"] not in self._seen_calls:  # one call's stats arrive with each of its entries
                self._seen_calls.append(call["id"])
                self.observer.call(call["seconds"], call["wanted"], call["slots"], None)
        return [png for pngs, _ in results for png in pngs][:wanted]

    async def close(self) -> None:
        return None


@serve.deployment
@serve.ingress()
class Ingress:
    """The FastAPI app over the export deployments (built in the replica, where the handles live)."""

    def __init__(self, exports: list[tuple[str, ExportInfo, Any]], app_options: dict[str, Any]):
        self.metrics = Metrics()
        models: dict[str, ServedModel] = {}
        max_queue = app_options.pop("max_queue")
        for name, info, handle in exports:
            model = models.setdefault(name, ServedModel(name))
            model.exports[info.size] = RayExport(
                name, info, handle, self.metrics.for_export(name, info.size), max_queue
            )
            model.created = model.created or int(time.time())
        self.registry = Registry(models)
        self.app_options = app_options

    def __serve_build_asgi_app__(self):
        from .app import create_app

        return create_app([], registry=self.registry, metrics=self.metrics, **self.app_options)


def build(
    specs: Sequence[str | Path],
    *,
    replicas: int = 1,
    num_cpus: float = 1,
    num_gpus: float = 0,
    max_wait_ms: float = 50.0,
    max_queue: int = 64,
    max_upload_bytes: int | None = None,
    max_steps: int | None = None,
    api_key: str | None = None,
    trust_remote_code: bool = False,
):
    """The bound Ray Serve application (``serve.run(build(...))``): an ingress and a deployment per export."""
    exports = []
    for name, info in check_specs(specs):
        deployment = ExportDeployment.options(
            name=f"{name}-{info.size}",
            num_replicas=replicas,
            ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
            max_ongoing_requests=ONGOING_BATCHES * info.batch_size,
        ).bind(str(info.folder.resolve()), trust_remote_code, max_wait_ms / 1000, (info.height, info.width))
        exports.append((name, info, deployment))
    options: dict[str, Any] = {"api_key": api_key, "max_queue": max_queue}
    if max_upload_bytes is not None:
        options["max_upload_bytes"] = max_upload_bytes
    if max_steps is not None:
        options["max_steps"] = max_steps
    # The ingress only awaits: no CPU reserved, and enough concurrent requests for max_queue of them.
    return Ingress.options(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=max_queue + 16).bind(
        exports, options
    )


def run(specs: Sequence[str | Path], *, host: str = "127.0.0.1", port: int = 8000, name: str = "aotdiffusion",
        blocking: bool = False, **options: Any):  # fmt: skip
    """Starts Ray Serve's HTTP proxy on ``host:port`` and deploys :func:`build`'s application on it."""
    serve.start(http_options={"host": host, "port": port})
    return serve.run(build(specs, **options), name=name, route_prefix="/", blocking=blocking)
