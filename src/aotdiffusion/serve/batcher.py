"""Dynamic batching: requests packed into the compiled batch, one pipeline call per packed batch.

The compiled UNet has one batch size, so a pipeline call always makes ``batch_size`` prompts x
``images_per_prompt`` images. Requests that can share a call (same :class:`CallKey`) are packed into
it: a request for ``n`` images takes ``ceil(n / images_per_prompt)`` prompt entries. A call runs as
soon as its entries are full, or when its oldest entry has waited ``max_wait_s``; the empty entries
of a partial call are padded with a copy of its first entry, whose images are thrown away and counted
as padding. Every image has its own seed, so an image does not depend on what it was batched with.

Calls run on replicas through ``run(replica, batch, report)`` in worker threads, never on the event
loop; one call per replica at a time.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .runner import Batch


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests already; ``retry_after`` is a guess in whole seconds."""

    def __init__(self, max_queue: int, retry_after: int):
        super().__init__(f"The queue is full ({max_queue} requests waiting); retry in about {retry_after} s.")
        self.max_queue, self.retry_after = max_queue, retry_after


@dataclass(frozen=True)
class CallKey:
    """What requests must have in common to share one pipeline call."""

    task: str
    steps: int
    guidance_scale: float
    strength: float | None


@dataclass(frozen=True)
class Item:
    """One prompt entry of a request: its prompt, negative prompt, input images and one seed per image."""

    prompt: str
    negative_prompt: str | None
    seeds: tuple[int, ...]
    wanted: int  # how many of its images the request asked for (the rest of the entry is padding)
    image: Any = None
    mask: Any = None


def pack(key: CallKey, items: list[Item], batch_size: int) -> Batch:
    """One pipeline call for ``items`` (at most ``batch_size``), padded with copies of the first."""
    items = items + [items[0]] * (batch_size - len(items))
    negatives = [item.negative_prompt for item in items]
    return Batch(
        task=key.task,
        prompts=[item.prompt for item in items],
        negative_prompts=None if all(n is None for n in negatives) else [n or "" for n in negatives],
        seeds=[seed for item in items for seed in item.seeds],
        steps=key.steps,
        guidance_scale=key.guidance_scale,
        strength=key.strength,
        images=None if items[0].image is None else [item.image for item in items],
        masks=None if items[0].mask is None else [item.mask for item in items],
    )


@dataclass(eq=False)
class _Job:
    key: CallKey
    items: list[Item]
    wanted: int
    future: asyncio.Future
    on_progress: Callable[[dict], None] | None
    arrived: float = field(default_factory=time.monotonic)
    images: list[bytes | None] = field(default_factory=list)
    entries_left: int = 0


@dataclass(eq=False)
class _Entry:
    job: _Job
    index: int

    @property
    def item(self) -> Item:
        return self.job.items[self.index]


class Batcher:
    """Packs requests for one export into its static batch and runs them on its replicas."""

    def __init__(
        self,
        run: Callable[[int, Batch, Callable[[dict], None]], list[bytes]],
        *,
        replicas: int,
        batch_size: int,
        images_per_prompt: int,
        max_wait_s: float,
        max_queue: int,
        observer: Any = None,
        batching: bool = True,
    ):
        self.run = run
        self.batch_size, self.images_per_prompt = batch_size, images_per_prompt
        self.max_wait_s, self.max_queue = max_wait_s, max_queue
        # False: one request per pipeline call, at once (the baseline the load benchmark compares with).
        self.batching = batching
        self.observer = observer
        self._free = list(range(replicas))
        self._replicas = replicas
        self._pending: list[_Entry] = []
        self._executor = ThreadPoolExecutor(replicas, thread_name_prefix="aotdiffusion-replica")
        self._wake: asyncio.Event | None = None
        self._dispatcher: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        self._call_seconds = 0.0  # last pipeline call's duration, for Retry-After

    # ------------------------------------------------------------------------------ the queue
    @property
    def queued_requests(self) -> int:
        return len({id(entry.job) for entry in self._pending})

    @property
    def queued_images(self) -> int:
        return len(self._pending) * self.images_per_prompt

    @property
    def busy_replicas(self) -> int:
        return self._replicas - len(self._free)

    def retry_after(self) -> int:
        calls_ahead = math.ceil(len(self._pending) / self.batch_size) + self.busy_replicas
        return max(1, math.ceil(self._call_seconds * calls_ahead / self._replicas))

    async def submit(
        self, key: CallKey, items: list[Item], wanted: int, on_progress: Callable[[dict], None] | None = None
    ) -> list[bytes]:
        """Queues one request and returns its ``wanted`` PNGs once its entries have run.

        Raises :class:`QueueFull` at once when ``max_queue`` requests wait. Cancelling the caller
        (a client that went away) takes its entries that have not started off the queue.
        """
        loop = asyncio.get_running_loop()
        if self._dispatcher is None or self._dispatcher.done():
            self._wake = asyncio.Event()
            self._dispatcher = loop.create_task(self._dispatch())
        if self.queued_requests >= self.max_queue:
            raise QueueFull(self.max_queue, self.retry_after())
        job = _Job(key, items, wanted, loop.create_future(), on_progress)
        job.images = [None] * (len(items) * self.images_per_prompt)
        job.entries_left = len(items)
        self._pending.extend(_Entry(job, i) for i in range(len(items)))
        self._observe("queue", self)
        self._wake.set()
        try:
            return await job.future
        except asyncio.CancelledError:  # the caller went away: its entries that have not started leave the queue
            self._pending = [entry for entry in self._pending if entry.job is not job]
            self._observe("queue", self)
            raise

    # ---------------------------------------------------------------------------- dispatching
    def _ready(self) -> tuple[list[_Entry] | None, float | None]:
        """Entries of the first call that should run now, else how long until one should."""
        if not self.batching:
            job = self._pending[0].job
            return [entry for entry in self._pending if entry.job is job][: self.batch_size], None
        groups: dict[CallKey, list[_Entry]] = {}
        for entry in self._pending:
            groups.setdefault(entry.job.key, []).append(entry)
        now, wait = time.monotonic(), None
        for entries in groups.values():  # oldest first: dicts keep insertion order
            chosen = entries[: self.batch_size]
            due = chosen[0].job.arrived + self.max_wait_s
            if len(chosen) == self.batch_size or now >= due:
                return chosen, None
            wait = due - now if wait is None else min(wait, due - now)
        return None, wait

    async def _dispatch(self) -> None:
        while True:
            self._wake.clear()
            wait = None
            if self._pending and self._free:
                entries, wait = self._ready()
                if entries is not None:
                    self._launch(entries)
                    continue
            try:
                await asyncio.wait_for(self._wake.wait(), wait)
            except TimeoutError:
                pass

    def _launch(self, entries: list[_Entry]) -> None:
        chosen = set(map(id, entries))
        self._pending = [entry for entry in self._pending if id(entry) not in chosen]
        replica = self._free.pop(0)
        task = asyncio.get_running_loop().create_task(self._run(replica, entries))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        self._observe("queue", self)

    async def _run(self, replica: int, entries: list[_Entry]) -> None:
        loop = asyncio.get_running_loop()
        jobs = list({id(entry.job): entry.job for entry in entries}.values())

        def report(message: dict) -> None:  # called from the worker thread
            loop.call_soon_threadsafe(self._progress, jobs, message)

        k = self.images_per_prompt
        wanted = sum(entry.item.wanted for entry in entries)
        start = time.monotonic()
        try:
            batch = pack(entries[0].job.key, [entry.item for entry in entries], self.batch_size)
            images = await loop.run_in_executor(self._executor, self.run, replica, batch, report)
            error = None
        except Exception as failure:  # reaches every request in the call, as a server error
            images, error = None, failure
        finally:
            self._free.append(replica)
            self._wake.set()
        self._call_seconds = time.monotonic() - start
        self._observe("queue", self)
        self._observe("call", self._call_seconds, wanted, self.batch_size * k, error)
        for i, entry in enumerate(entries):
            job = entry.job
            if job.future.done():
                continue
            if error is not None:
                job.future.set_exception(error)
                continue
            job.images[entry.index * k : (entry.index + 1) * k] = images[i * k : (i + 1) * k]
            job.entries_left -= 1
            if job.entries_left == 0:
                job.future.set_result(job.images[: job.wanted])

    def _progress(self, jobs: list[_Job], message: dict) -> None:
        for job in jobs:
            if job.on_progress is not None and not job.future.done():
                job.on_progress(message)

    def _observe(self, event: str, *args: Any) -> None:
        if self.observer is not None:
            getattr(self.observer, event)(*args)

    async def close(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        for entry in self._pending:
            if not entry.job.future.done():
                entry.job.future.set_exception(RuntimeError("The server is shutting down."))
        self._pending = []
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        self._executor.shutdown(wait=False)
