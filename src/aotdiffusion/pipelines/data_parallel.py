"""Data parallel pipeline calls: a call split into chunks of the compiled batch, run by whole-pipeline replicas.

The replicas are :class:`~aotdiffusion.runtime.parallel.ReplicaPool` processes; :func:`replica` is the
factory each of them calls to load its copy of the pipeline.
"""

from __future__ import annotations

from typing import Any

import torch

FACTORY = f"{__name__}:replica"


def replica(folder: str, class_name: str, *, device: str | None = None):
    """Replica factory: the exported pipeline at ``folder``; a request is one :func:`split_call` chunk."""
    from .auto import PIPELINES

    # The parent process loaded this export first and made the trust decision (trust_remote_code) then.
    pipe = PIPELINES[class_name].from_pretrained(folder, device=device, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    return lambda request, report: _run(pipe, **request)


def _run(pipe, *, scheduler: tuple[str, dict], generator_states: list[torch.Tensor] | None, call: dict[str, Any]):
    import diffusers

    name, config = scheduler
    if type(pipe.scheduler).__name__ != name or dict(pipe.scheduler.config) != config:
        pipe.scheduler = getattr(diffusers, name).from_config(config)
    if generator_states is not None:
        generators = [torch.Generator().set_state(state) for state in generator_states]
        call["generator"] = generators if len(generators) > 1 else generators[0]
    return pipe(**call)


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
