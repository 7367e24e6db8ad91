"""Data parallel replicas: one whole compiled pipeline per device, each in its own process.

On CPU a "device" is a group of cores: each replica process is pinned to its cores and runs its
compiled kernels with that many OpenMP threads (AOTInductor's kernels take their thread count from
the calling process at run time), so two single-core replicas work side by side without sharing a
core. On CUDA a device is a GPU index. A process per replica keeps the replicas' thread pools and
allocators apart, which threads in one process cannot.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

Device = Sequence[int] | str


def default_cpu_groups(replicas: int = 2) -> list[list[int]]:
    """This process's cores split into ``replicas`` equal groups (2 cores -> [[0], [1]])."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < replicas:
        raise ValueError(f"{replicas} CPU replicas need at least {replicas} cores; this process may use {len(cores)}.")
    size = len(cores) // replicas
    return [cores[i * size : (i + 1) * size] for i in range(replicas)]


def _send(conn: Connection, value: Any) -> None:
    # Plain pickle, not Connection.send: torch registers multiprocessing reducers that share tensors
    # through file descriptors authenticated with a multiprocessing parent's key, which a replica
    # started as its own process does not have.
    conn.send_bytes(pickle.dumps(value))


def _recv(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


def _load(folder: str, class_name: str | None, device: str | None):
    """A callable that serves one request: a whole pipeline, or one compiled component (class_name None)."""
    if class_name is None:
        from .compiled import CompiledComponent

        component = CompiledComponent(folder, device=device)
        return lambda request: component(**request)
    from ..pipelines.auto import PIPELINES

    # The parent process loaded this export first and made the trust decision (trust_remote_code) then.
    pipe = PIPELINES[class_name].from_pretrained(folder, device=device, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    return lambda request: _run(pipe, **request)


def _worker(conn, folder: str, class_name: str | None, device: Device) -> None:
    try:
        if isinstance(device, str):
            load_device = device
        else:
            os.sched_setaffinity(0, list(device))
            torch.set_num_threads(len(device))
            load_device = None
        serve = _load(folder, class_name, load_device)
        _send(conn, ("ready", None))
    except Exception as error:  # the parent re-raises it with the replica's device
        _send(conn, ("error", error))
        return
    while True:
        request = _recv(conn)
        if request is None:
            return
        try:
            _send(conn, ("ok", serve(request)))
        except Exception as error:
            _send(conn, ("error", error))


def _run(pipe, *, scheduler: tuple[str, dict], generator_states: list[torch.Tensor] | None, call: dict[str, Any]):
    import diffusers

    name, config = scheduler
    if type(pipe.scheduler).__name__ != name or dict(pipe.scheduler.config) != config:
        pipe.scheduler = getattr(diffusers, name).from_config(config)
    if generator_states is not None:
        generators = [torch.Generator().set_state(state) for state in generator_states]
        call["generator"] = generators if len(generators) > 1 else generators[0]
    return pipe(**call)


class ReplicaPool:
    """Worker processes, each holding the exported pipeline at ``folder`` on its own device.

    With ``class_name=None``, ``folder`` is one compiled component and each replica holds only that.
    """

    def __init__(self, folder: str | Path, class_name: str | None, devices: Sequence[Device]):
        self.devices = list(devices)
        self._workers = []
        for device in self.devices:
            ours, theirs = socket.socketpair()
            spec = json.dumps([str(folder), class_name, device if isinstance(device, str) else list(device)])
            process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno()), spec], pass_fds=[theirs.fileno()]
            )
            theirs.close()
            self._workers.append((process, Connection(ours.detach())))
        for device, (_, conn) in zip(self.devices, self._workers):
            try:
                status, error = _recv(conn)
            except EOFError:
                status, error = "error", RuntimeError("the replica process exited while loading")
            if status == "error":
                self.close()
                raise RuntimeError(f"The replica on {device} failed to load: {error}") from error

    def __len__(self) -> int:
        return len(self._workers)

    def map(self, requests: list[dict[str, Any]]) -> list[Any]:
        """Runs request i on replica i % len(self), all replicas at once; results in request order."""
        results: list[Any] = [None] * len(requests)
        for start in range(0, len(requests), len(self)):
            batch = list(enumerate(requests))[start : start + len(self)]
            for (_, request), (_, conn) in zip(batch, self._workers):
                _send(conn, request)
            for (i, _), (_, conn), device in zip(batch, self._workers, self.devices):
                try:
                    status, value = _recv(conn)
                except EOFError:
                    status, value = "error", RuntimeError("the replica process died")
                if status == "error":
                    raise RuntimeError(f"The replica on {device} failed: {value}") from value
                results[i] = value
        return results

    def close(self) -> None:
        for process, conn in self._workers:
            try:
                _send(conn, None)
            except (BrokenPipeError, OSError):
                pass
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
            conn.close()
        self._workers = []

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


# Call arguments that hold one entry per prompt (or per image) and are split with the prompts.
_PER_PROMPT = (
    "prompt",
    "prompt_2",
    "negative_prompt",
    "negative_prompt_2",
    "image",
    "mask_image",
    "prompt_embeds",
    "negative_prompt_embeds",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
    "latents",
)
_NOT_PICKLABLE = ("callback_on_step_end", "callback")


def split_call(call: dict[str, Any], extra: dict[str, Any], shapes, scheduler) -> list[dict[str, Any]]:
    """One request per chunk of ``shapes.batch_size`` prompts, with its generators and the current scheduler."""
    for name in _NOT_PICKLABLE:
        if call.get(name) is not None or extra.get(name) is not None:
            raise ValueError(f"`{name}` cannot run in data-parallel replicas (other processes); load without it.")
    prompts = call.get("prompt")
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(prompts, list):
        raise ValueError("Data parallel splits a list of prompts across replicas: pass `prompt` as a list.")
    step = shapes.batch_size
    if len(prompts) % step:
        raise ValueError(
            f"Data parallel runs chunks of the compiled batch_size={step}; {len(prompts)} prompts is not a multiple. "
            f"Pass a multiple of {step} prompts."
        )
    chunks = len(prompts) // step
    images_per_chunk = step * (call.get("num_images_per_prompt") or 1)
    generator = call.pop("generator", None)
    if isinstance(generator, list):
        if len(generator) != chunks * images_per_chunk:
            raise ValueError(f"Pass one generator per image ({chunks * images_per_chunk}), got {len(generator)}.")
        states = [[g.get_state() for g in generator[i * images_per_chunk : (i + 1) * images_per_chunk]]
                  for i in range(chunks)]  # fmt: skip
    elif generator is not None:
        # One generator for several replicas: chunk i draws from a generator seeded initial_seed + i,
        # so a data-parallel call is reproducible from the one seed.
        states = [[torch.Generator().manual_seed(generator.initial_seed() + i).get_state()] for i in range(chunks)]
    else:
        states = [None] * chunks
    requests = []
    for i in range(chunks):
        part = dict(call)
        part["prompt"] = prompts[i * step : (i + 1) * step]
        for name in _PER_PROMPT[1:]:
            value = call.get(name)
            if isinstance(value, (list, torch.Tensor)) and len(value) == len(prompts):
                part[name] = value[i * step : (i + 1) * step]
        part.update(extra)
        requests.append(
            {
                "scheduler": (type(scheduler).__name__, dict(scheduler.config)),
                "generator_states": states[i],
                "call": part,
            }
        )
    return requests


def combine_outputs(outputs: list[Any], return_dict: bool):
    """Concatenates the replicas' outputs field by field (images as lists, arrays or tensors)."""
    import dataclasses

    import numpy as np

    first = outputs[0]
    # BaseOutput.keys() leaves out None fields (e.g. nsfw_content_detected): list the dataclass fields.
    names = [f.name for f in dataclasses.fields(first)] if dataclasses.is_dataclass(first) else range(len(first))
    fields = {}
    for name in names:
        values = [getattr(out, name) if isinstance(name, str) else out[name] for out in outputs]
        if values[0] is None:
            fields[name] = None
        elif isinstance(values[0], list):
            fields[name] = [v for value in values for v in value]
        elif isinstance(values[0], np.ndarray):
            fields[name] = np.concatenate(values)
        else:
            fields[name] = torch.cat(values)
    if not dataclasses.is_dataclass(first):
        return tuple(fields.values())
    combined = type(first)(**fields)
    return combined if return_dict else combined.to_tuple()


if __name__ == "__main__":  # a replica process, started by ReplicaPool
    folder, class_name, device = json.loads(sys.argv[2])
    _worker(Connection(int(sys.argv[1])), folder, class_name, device)
