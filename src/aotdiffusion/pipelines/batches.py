"""Calls of any number of prompts on a pipeline compiled for a fixed batch: chunks of the compiled batch.

A call with more prompts than the compiled ``batch_size`` runs as several calls of that batch; the last one,
and a call with fewer prompts, is padded with copies of its last prompt (and image), and the images of the
padding are dropped. Generators decide what each image is:

* a list, one per image, is split with the prompts and the padding gets generators of its own, so every
  image is exactly what a call of its prompt alone gives with its generator (schedulers that add noise
  at each step included: diffusers draws that noise per generator too);
* one generator is drawn from chunk after chunk, in order: the starting latents are those eager diffusers
  draws for the whole call at once (so deterministic schedulers give its images), but a scheduler that
  adds noise at every step draws it chunk by chunk, unlike one eager call;
* none: torch's global generator, as in diffusers.

Data-parallel replicas (data_parallel.py) run the same chunks side by side.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

# Call arguments with one entry per prompt (or per image): split with the prompts, padded like them.
PER_PROMPT = (
    "prompt",
    "prompt_2",
    "negative_prompt",
    "negative_prompt_2",
    "prompt_embeds",
    "negative_prompt_embeds",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
    "image",
    "mask_image",
    "masked_image_latents",
    "control_image",
    "latents",
)
# Of those, the texts that may be one string for all prompts.
TEXT_FOR_ALL = ("prompt_2", "negative_prompt", "negative_prompt_2")
# Of those, the ones where a single entry (or a list of one) is used for every prompt, as in diffusers.
BROADCAST = ("image", "mask_image", "masked_image_latents", "control_image")


def prompt_count(call: dict[str, Any]) -> int | None:
    """How many prompts a call holds (``prompt`` or ``prompt_embeds``); None when it holds neither."""
    prompt = call.get("prompt")
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list):
        return len(prompt)
    embeds = call.get("prompt_embeds")
    return embeds.shape[0] if embeds is not None else None


@dataclasses.dataclass
class Chunks:
    """A call as calls of the compiled batch; ``images`` is how many images the whole call returns."""

    calls: list[dict[str, Any]]
    images: int
    whole: bool  # the call is one compiled batch as it is: nothing split or padded


def chunk_call(call: dict[str, Any], batch_size: int, images_per_prompt: int, *, unsplit: tuple = ()) -> Chunks:
    """``call`` as chunks of ``batch_size`` prompts (``images_per_prompt`` images each), the last padded.

    Every per-prompt argument is checked first, so a bad one is a ValueError before any chunk runs; ``unsplit``
    names arguments passed whole to every chunk.
    """
    count = prompt_count(call)
    if count is None:
        return Chunks([call], images=batch_size * images_per_prompt, whole=True)
    if count == 0:
        raise ValueError("`prompt` is an empty list: give at least one prompt.")
    per_prompt = {}
    for name in PER_PROMPT:
        if name in unsplit:
            continue
        value = call.get(name)
        if isinstance(value, str) and name == "prompt":
            value = [value]
        if isinstance(value, (list, tuple, torch.Tensor, np.ndarray)) and not _single_image(name, value):
            per_prompt[name] = (value, _stride(name, value, count, images_per_prompt))
    generator = call.get("generator")
    if isinstance(generator, list) and len(generator) != count * images_per_prompt:
        raise ValueError(
            f"`generator` is a list of {len(generator)} generators for {count} prompt(s) x {images_per_prompt} "
            f"image(s) each: pass one per image ({count * images_per_prompt}), or a single generator."
        )
    chunks = -(-count // batch_size)
    calls = []
    for i in range(chunks):
        start, real = i * batch_size, min(batch_size, count - i * batch_size)
        part = dict(call)
        for name in TEXT_FOR_ALL:
            # One string for every prompt: a list here, since the chunk's prompts are a list (diffusers' SD
            # pipelines refuse a string beside a list of prompts).
            if isinstance(call.get(name), str):
                part[name] = [call[name]] * batch_size
        for name, (value, stride) in per_prompt.items():
            part[name] = _pad(value[start * stride : (start + real) * stride], batch_size * stride)
        if isinstance(generator, list):
            rows = generator[start * images_per_prompt : (start + real) * images_per_prompt]
            # The padding's images are dropped: generators of their own keep the caller's from being drawn twice.
            spare = [
                torch.Generator(rows[-1].device).manual_seed(0) for _ in range((batch_size - real) * images_per_prompt)
            ]
            part["generator"] = rows + spare
        calls.append(part)
    return Chunks(calls, images=count * images_per_prompt, whole=count == batch_size)


def _single_image(name: str, value: Any) -> bool:
    """An image (or a list of one) that diffusers applies to every prompt: not split."""
    if name not in BROADCAST:
        return False
    if isinstance(value, (list, tuple)):
        return len(value) == 1
    return value.ndim == 3 or value.shape[0] == 1


def _stride(name: str, value: Any, count: int, images_per_prompt: int) -> int:
    """Entries per prompt: 1, or ``images_per_prompt`` for per-image ones (latents, a refiner's latents)."""
    rows, images = len(value), count * images_per_prompt
    if name == "latents":
        if rows == images:
            return images_per_prompt
        raise ValueError(
            f"`latents` has {rows} rows for {count} prompt(s) x {images_per_prompt} image(s) each: give one per "
            f"image ({images})."
        )
    if rows == count:
        return 1
    if name in BROADCAST and rows == images:
        return images_per_prompt
    if name in BROADCAST:
        ways = (
            f"one per prompt ({count})"
            + (f", one per image ({images})" if images != count else "")
            + ", or one for all"
        )
    elif name in TEXT_FOR_ALL:
        ways = f"one per prompt ({count}), or one string for all"
    else:
        ways = f"one per prompt ({count})"
    raise ValueError(f"`{name}` has {rows} entries for {count} prompt(s): give {ways}.")


def _pad(rows: Any, size: int) -> Any:
    """``rows`` filled up to ``size`` with copies of its last entry."""
    missing = size - len(rows)
    if missing == 0:
        return rows
    if isinstance(rows, torch.Tensor):
        return torch.cat([rows, rows[-1:].expand(missing, *rows.shape[1:])])
    if isinstance(rows, np.ndarray):
        return np.concatenate([rows, np.repeat(rows[-1:], missing, axis=0)])
    return [*rows, *[rows[-1]] * missing]


def combine_outputs(outputs: list[Any], return_dict: bool, images: int | None = None):
    """Concatenates the chunks' outputs field by field (images as lists, arrays or tensors), padding dropped.

    ``images`` is how many images to keep (all when None).
    """
    first = outputs[0]
    # BaseOutput.keys() leaves out None fields (e.g. nsfw_content_detected): list the dataclass fields.
    names = [f.name for f in dataclasses.fields(first)] if dataclasses.is_dataclass(first) else range(len(first))
    fields = {}
    for name in names:
        values = [getattr(out, name) if isinstance(name, str) else out[name] for out in outputs]
        if values[0] is None:
            fields[name] = None
            continue
        if isinstance(values[0], list):
            combined = [v for value in values for v in value]
        elif isinstance(values[0], np.ndarray):
            combined = np.concatenate(values)
        else:
            combined = torch.cat(values)
        fields[name] = combined if images is None else combined[:images]
    if not dataclasses.is_dataclass(first):
        return tuple(fields.values())
    result = type(first)(**fields)
    return result if return_dict else result.to_tuple()
