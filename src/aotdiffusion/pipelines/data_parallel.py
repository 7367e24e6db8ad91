"""Data parallel pipeline calls: a call split into chunks of the compiled batch, run by whole-pipeline replicas.

The replicas are :class:`~aotdiffusion.runtime.parallel.ReplicaPool` processes; :func:`replica` is the
factory each of them calls to load its copy of the pipeline.
"""

from __future__ import annotations

from typing import Any

import torch

from .batches import chunk_call, prompt_count

FACTORY = f"{__name__}:replica"


def replica(folder: str, class_name: str, *, device: str | None = None):
    """Replica factory: the exported pipeline at ``folder``; a request is one :func:`split_call` chunk."""
    from .auto import PIPELINES

    # The parent process loaded this export first and made the trust decision (trust_remote_code) then.
    pipe = PIPELINES[class_name].from_pretrained(folder, device=device, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    return lambda request, report: _run(pipe, report, **request)


def _run(
    pipe, report, *, scheduler: tuple[str, dict], generator_states: list[torch.Tensor] | None, call: dict[str, Any]
):
    import diffusers

    name, config = scheduler
    if type(pipe.scheduler).__name__ != name or dict(pipe.scheduler.config) != config:
        pipe.scheduler = getattr(diffusers, name).from_config(config)
    if generator_states is not None:
        generators = [torch.Generator().set_state(state) for state in generator_states]
        call["generator"] = generators if len(generators) > 1 else generators[0]

    def on_step(pipe, step: int, timestep, tensors: dict) -> dict:
        # Each step reports back, which is where the pool's cancel (a sibling replica failed) stops this call.
        report({"step": step + 1, "total": pipe.num_timesteps})
        return tensors

    call["callback_on_step_end"] = on_step  # split_call refuses a caller's own callback
    return pipe(**call)


_NOT_PICKLABLE = ("callback_on_step_end", "callback")


def split_call(
    call: dict[str, Any], extra: dict[str, Any], shapes, scheduler, unsplit: tuple = ()
) -> tuple[list[dict[str, Any]], int]:
    """One request per chunk of ``shapes.batch_size`` prompts (batches.py: the last padded), with its
    generators and the current scheduler; and how many images the call returns."""
    for name in _NOT_PICKLABLE:
        if call.get(name) is not None or extra.get(name) is not None:
            raise ValueError(f"`{name}` cannot run in data-parallel replicas (other processes); load without it.")
    if prompt_count(call) is None:
        raise ValueError("Data parallel splits a list of prompts across replicas: pass `prompt` as a list.")
    chunks = chunk_call(call, shapes.batch_size, call.get("num_images_per_prompt") or 1, unsplit=unsplit)
    requests = []
    for i, part in enumerate(chunks.calls):
        generator = part.pop("generator", None)
        if isinstance(generator, list):
            states = [g.get_state() for g in generator]
        elif generator is not None:
            # One generator for several replicas: chunk i draws from a generator seeded initial_seed + i,
            # so a data-parallel call is reproducible from the one seed.
            states = [torch.Generator().manual_seed(generator.initial_seed() + i).get_state()]
        else:
            states = None
        part.update(extra)
        requests.append(
            {"scheduler": (type(scheduler).__name__, dict(scheduler.config)), "generator_states": states, "call": part}
        )
    return requests, chunks.images
