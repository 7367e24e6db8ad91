"""LoRA adapters fused into the weights before they are compiled (or refitted): diffusers' own loader and fuse.

A compiled graph cannot take a LoRA at run time, so, as optimum-neuron does at compile time, each adapter is
loaded with ``load_lora_weights``, weighted with ``set_adapters`` and merged with ``fuse_lora``; the adapter
layers are then unloaded, leaving plain weights that export (or ``--reuse-compiled``) writes like any other.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

from diffusers import DiffusionPipeline

# Where the pipeline keeps what was fused, for model_index.json.
FUSED_ATTRIBUTE = "_aotdiffusion_loras"


def parse_lora(value: str | Path | tuple[str | Path, float]) -> tuple[str, float]:
    """``PATH_OR_ID[:SCALE]`` (or a ``(source, scale)`` pair) -> (source, scale); the scale defaults to 1."""
    if isinstance(value, tuple):
        source, scale = value
    else:
        source, scale = str(value), 1.0
        head, sep, tail = source.rpartition(":")
        if sep and head:
            try:
                source, scale = head, float(tail)
            except ValueError:
                pass  # a colon that is part of the name
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"A LoRA's scale must be a finite number, got {scale!r} for {source}: e.g. {source}:0.8.")
    return str(source), float(scale)


def load_loras(pipe: DiffusionPipeline, loras: list) -> tuple[list[str], list[tuple[str, float]]]:
    """Loads every LoRA of ``loras`` (see :func:`parse_lora`) into ``pipe`` as the adapters ``lora_0``, ``lora_1``...
    and weights each at its scale (``set_adapters``); returns the adapter names and the (source, scale) pairs."""
    parsed = [parse_lora(lora) for lora in loras]
    if not parsed:
        return [], []
    if not hasattr(pipe, "load_lora_weights"):
        raise ValueError(f"{type(pipe).__name__} takes no LoRA adapters (diffusers has no LoRA loader for it).")
    names = []
    for i, (source, _) in enumerate(parsed):
        name = f"lora_{i}"
        local = Path(source).exists()
        if not local and (source.startswith((".", "/", "~")) or source.endswith((".safetensors", ".bin"))):
            raise ValueError(f"The LoRA {source} does not exist: no such file or folder.")
        try:
            pipe.load_lora_weights(source, adapter_name=name)
        except (OSError, ValueError, *_network_errors()) as error:
            if local:
                raise ValueError(f"Could not load the LoRA {source}: {error}") from error
            raise ValueError(
                f"Could not load the LoRA {source}: it is not a local file or folder, so it was looked up as a Hugging "
                f"Face Hub id, which failed ({type(error).__name__}: {error}). Give a path to a .safetensors file or "
                "folder, or check the id and the network."
            ) from error
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[scale for _, scale in parsed])
    return names, parsed


def _network_errors() -> tuple[type[BaseException], ...]:
    """What the Hub client raises when it cannot be reached (its HTTP library's errors are not OSErrors)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx", "HTTPError"), ("httpx2", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def fuse_loras(pipe: DiffusionPipeline, loras: list) -> None:
    """Fuses every LoRA of ``loras`` (see :func:`parse_lora`) into ``pipe``'s weights, each at its scale."""
    names, parsed = load_loras(pipe, loras)
    if not names:
        return
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()
    setattr(pipe, FUSED_ATTRIBUTE, [{"source": source, "scale": scale} for source, scale in parsed])
