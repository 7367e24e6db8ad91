"""Measures one variant in its own fresh process (``python -m aotdiffusion.bench.measure``).

A fresh process per variant makes cold start real (imports, loading, compiling all count) and gives
each variant its own peak RSS. Order: build, first image (cold), then warm component timings, then
warm end-to-end runs.
"""

from __future__ import annotations

import contextlib
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

PROMPT = "a photo of an astronaut riding a horse on mars"


def timings(fn, runs: int, warmup: int = 1) -> dict[str, float]:
    """Median, min and max seconds of ``runs`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return {"median": statistics.median(seconds), "min": min(seconds), "max": max(seconds), "runs": runs}


def component_inputs(pipe: Any, height: int, width: int, seed: int) -> dict[str, Any]:
    """The tensors diffusers hands each component in a guided txt2img step, in the pipeline's dtype."""
    gen = torch.Generator().manual_seed(seed)
    unet_config, dtype = pipe.unet.config, pipe.unet.dtype
    factor = pipe.vae_scale_factor
    latents = (2, unet_config.in_channels, height // factor, width // factor)  # guidance batch of one prompt
    inputs: dict[str, Any] = {
        "input_ids": torch.randint(0, pipe.tokenizer.vocab_size, (1, pipe.tokenizer.model_max_length), generator=gen),
        "sample": torch.randn(latents, generator=gen).to(dtype),
        "timestep": torch.tensor(999),
        "encoder_hidden_states": torch.randn(
            2, pipe.tokenizer.model_max_length, unet_config.cross_attention_dim, generator=gen
        ).to(dtype),
        "latents": torch.randn(1, *latents[1:], generator=gen).to(dtype),
        "added_cond_kwargs": None,
    }
    if unet_config.addition_embed_type == "text_time":
        time_ids = 6
        text_dim = unet_config.projection_class_embeddings_input_dim - time_ids * unet_config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, text_dim, generator=gen).to(dtype),
            "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * 2).to(dtype),
        }
    return inputs


@torch.no_grad()
def measure(config: dict[str, Any]) -> dict[str, Any]:
    from .variants import BuildOptions, build, cache_interval

    spawned = config["spawned_at"]
    options = BuildOptions(
        config["model"], config["aot_dir"], config["height"], config["width"], config.get("compile_mode")
    )
    pipe, precision = build(config["variant"], options)
    interval = cache_interval(config["variant"])
    pipe.set_progress_bar_config(disable=True)
    ready = time.time() - spawned
    height, width, steps = config["height"], config["width"], config["steps"]
    latents_shape = (1, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    # Latents drawn in fp32 and cast, so every variant starts from the same noise whatever its dtype.
    latents = torch.randn(latents_shape, generator=torch.Generator().manual_seed(config["seed"]))

    def image() -> np.ndarray:
        out = pipe(
            PROMPT,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=config["guidance_scale"],
            latents=latents.to(pipe.unet.dtype),
            output_type="np",
            **({"cache_interval": interval} if interval > 1 else {}),
        )
        return out.images[0]

    first = image()
    first_image = time.time() - spawned

    x = component_inputs(pipe, height, width, config["seed"])
    result: dict[str, Any] = {
        "variant": config["variant"],
        "precision": precision,
        "ready_s": ready,
        "cold_start_s": first_image,
    }
    runs = config["runs"]
    if getattr(pipe, "tokenizer", None) is not None and pipe.text_encoder is not None:
        result["text_encoder"] = timings(lambda: pipe.text_encoder(x["input_ids"]), runs)
    unet_kwargs = {"encoder_hidden_states": x["encoder_hidden_states"], "added_cond_kwargs": x["added_cond_kwargs"]}

    def unet_steps() -> None:
        # With step caching a UNet step costs one full pass and interval-1 shallow ones over interval steps.
        with pipe.unet.step_cache(interval) if interval > 1 else contextlib.nullcontext():
            for _ in range(interval):
                pipe.unet(x["sample"], x["timestep"], **unet_kwargs, return_dict=False)

    per_interval = timings(unet_steps, runs)
    result["unet_step"] = {k: v / interval if k != "runs" else v for k, v in per_interval.items()}
    result["vae_decode"] = timings(lambda: pipe.vae.decode(x["latents"], return_dict=False), runs)
    images = []
    result["end_to_end"] = timings(lambda: images.append(image()), config["e2e_runs"], warmup=0)
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    output = Path(config["output"])
    np.save(output.with_suffix(".npy"), images[-1] if images else first)
    result["deterministic"] = bool(np.array_equal(images[-1], first)) if images else None
    return result


def main() -> None:
    config = json.loads(sys.argv[1])
    torch.manual_seed(0)
    result = measure(config)
    Path(config["output"]).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
