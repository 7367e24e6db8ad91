"""IP-Adapter exports (SD, SDXL) against eager diffusers with the same adapters loaded: image prompts, scales set per
adapter and per block, precomputed embeddings, no image at all, and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import IP_ADAPTER_FLAGS, cli, eager, run_pipe
from diffusers import StableDiffusionImg2ImgPipeline
from test_family import close, load, picture, png_close, refused

from aotdiffusion import (
    AOTDiffusionPipeline,
    AOTStableDiffusionImg2ImgPipeline,
    AOTStableDiffusionPipeline,
    AOTStableDiffusionXLPipeline,
)

WEIGHTS = {"subfolder": "models", "weight_name": "ip-adapter.safetensors"}
# InstantStyle's "style only" (its SDXL dict, for the tiny UNets' two transformers per up block): the adapter in one
# transformer of the first up block, off everywhere else.
STYLE_ONLY = {"up": {"block_0": [0.0, 1.0]}}


def eager_with_adapters(tiny, model: str, *adapters: str, cls=None):
    pipe = eager(model, tiny, cls)
    pipe.load_ip_adapter([str(tiny(a)) for a in adapters], **{k: [v] * len(adapters) for k, v in WEIGHTS.items()})
    return pipe


def test_ip_adapter_matches_eager(sd_ip_adapter_export, tiny):
    pipe = load(AOTDiffusionPipeline, sd_ip_adapter_export)
    assert isinstance(pipe, AOTStableDiffusionPipeline)
    reference = eager_with_adapters(tiny, "sd", "ip-adapter")
    image = picture(size=48, seed=5)  # the feature extractor resizes it to the encoder's 32x32, as in diffusers
    plain = run_pipe(pipe)
    with_image = run_pipe(pipe, ip_adapter_image=image)
    close(with_image, run_pipe(reference, ip_adapter_image=image))
    assert np.abs(with_image - plain).max() > 0.05  # the adapter steers the image
    # Scales are a graph input: set as diffusers sets them, per adapter or per block (InstantStyle).
    for scale in (0.4, STYLE_ONLY, 0.0):
        pipe.set_ip_adapter_scale(scale)
        reference.set_ip_adapter_scale(scale)
        close(run_pipe(pipe, ip_adapter_image=image), run_pipe(reference, ip_adapter_image=image))
    pipe.set_ip_adapter_scale(0.0)
    close(run_pipe(pipe, ip_adapter_image=image), plain)  # off: the plain UNet's image
    pipe.set_ip_adapter_scale(0.7)
    reference.set_ip_adapter_scale(0.7)
    # Precomputed embeddings (diffusers' ip_adapter_image_embeds), made by the eager pipeline.
    embeds = reference.prepare_ip_adapter_image_embeds(image, None, torch.device("cpu"), 1, True)
    close(run_pipe(pipe, ip_adapter_image_embeds=embeds), run_pipe(reference, ip_adapter_image=image))
    # No image: the adapter adds nothing (eager diffusers with the adapter loaded refuses such a call).
    close(plain, run_pipe(eager("sd", tiny)))
    # Image-to-image over the same export, with its image prompt.
    img2img = pipe.sibling(AOTStableDiffusionImg2ImgPipeline)
    eager_img2img = eager_with_adapters(tiny, "sd", "ip-adapter", cls=StableDiffusionImg2ImgPipeline)
    eager_img2img.set_ip_adapter_scale(0.7)
    close(
        run_pipe(img2img, image=picture(), strength=0.6, ip_adapter_image=image),
        run_pipe(eager_img2img, image=picture(), strength=0.6, ip_adapter_image=image),
    )


def test_ip_adapter_misuse_is_a_clear_error(sd_ip_adapter_export, sd_fp32, tiny):
    pipe = load(AOTStableDiffusionPipeline, sd_ip_adapter_export)
    with pytest.raises(ValueError, match="compiled in: export with --ip-adapter"):
        pipe.load_ip_adapter(str(tiny("ip-adapter")), **WEIGHTS)
    with pytest.raises(ValueError, match=r"cannot be unloaded: set_ip_adapter_scale\(0.0\)"):
        pipe.unload_ip_adapter()
    with pytest.raises(ValueError, match=r"compiled for 1 IP-Adapter image\(s\) per adapter; got 2"):
        run_pipe(pipe, ip_adapter_image=[[picture(size=32), picture(size=32, seed=1)]])
    plain = load(AOTStableDiffusionPipeline, sd_fp32)
    with pytest.raises(ValueError, match="compiled without an IP-Adapter: export with --ip-adapter"):
        plain.set_ip_adapter_scale(0.5)
    with pytest.raises(ValueError, match="one prompt per call, not 2: export with --batch-size 1"):
        AOTStableDiffusionPipeline.export(
            tiny("sd"), sd_fp32.parent / "refused", batch_size=2, height=64, width=64,
            ip_adapter=str(tiny("ip-adapter")), ip_adapter_subfolder="models",
            ip_adapter_weight_name="ip-adapter.safetensors",
        )  # fmt: skip
    with pytest.raises(ValueError, match="name it with ip_adapter_weight_name"):
        AOTStableDiffusionPipeline.export(tiny("sd"), sd_fp32.parent / "refused", ip_adapter=str(tiny("ip-adapter")))


def test_generate_with_an_ip_adapter_image(sd_ip_adapter_export, tiny, tmp_path):
    picture(size=48, seed=5).save(tmp_path / "style.png")
    out = tmp_path / "out"
    cli("generate", str(sd_ip_adapter_export), "a red house", "--ip-adapter-image", str(tmp_path / "style.png"),
        "--ip-adapter-scale", "0.6", "--steps", "4", "--output", str(out))  # fmt: skip
    reference = eager_with_adapters(tiny, "sd", "ip-adapter")
    reference.set_ip_adapter_scale(0.6)
    expected = reference(
        "a red house", ip_adapter_image=picture(size=48, seed=5), num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
    ).images[0]  # fmt: skip
    png_close(out / "seed0-0.png", expected)
    style = str(tmp_path / "style.png")
    refusals = [
        (["--ip-adapter-image", style, "--ip-adapter-image", style], r"has 1 IP-Adapter\(s\): pass --ip-adapter-image "
                                                                     r"once per adapter, got it 2 time"),
        (["--ip-adapter-scale", "0.5", "--ip-adapter-scale", "0.2"], r"pass --ip-adapter-scale once for all or once "
                                                                     r"per adapter, got it 2 time"),
    ]  # fmt: skip
    refused(sd_ip_adapter_export, "a red house", refusals)


def test_generate_refuses_ip_adapter_flags_without_an_adapter(sd_fp32, tmp_path):
    picture().save(tmp_path / "style.png")
    refusals = [(["--ip-adapter-image", str(tmp_path / "style.png")], "for IP-Adapter exports .* this export has none")]
    refused(sd_fp32, "a red house", refusals)


def test_export_flags_with_reuse_compiled_are_refused(sd_fp32, tiny, tmp_path):
    result = cli("export", "--model", str(tiny("sd")), "--reuse-compiled", str(sd_fp32), "--ip-adapter",
                 str(tiny("ip-adapter")), *IP_ADAPTER_FLAGS, str(tmp_path / "out"), check=False)  # fmt: skip
    assert result.returncode != 0 and "--ip-adapter" in result.stderr and "cannot be set with it" in result.stderr


def test_sdxl_two_ip_adapters_match_eager(sdxl_ip_adapter_export, tiny):
    """A plain adapter and a Full Face one (the image encoder's penultimate hidden state, as the plus adapters)."""
    pipe = load(AOTStableDiffusionXLPipeline, sdxl_ip_adapter_export)
    reference = eager_with_adapters(tiny, "sdxl", "ip-adapter-sdxl", "ip-adapter-full-sdxl")
    images = [picture(size=32, seed=7), picture(size=32, seed=8)]
    close(run_pipe(pipe, ip_adapter_image=images), run_pipe(reference, ip_adapter_image=images))
    # Each adapter its own scale (and per-block dicts): the images are not interchangeable.
    for scales in ([0.9, 0.2], [STYLE_ONLY, 0.5]):
        pipe.set_ip_adapter_scale(scales)
        reference.set_ip_adapter_scale(scales)
        close(run_pipe(pipe, ip_adapter_image=images), run_pipe(reference, ip_adapter_image=images))
    swapped = run_pipe(pipe, ip_adapter_image=images[::-1])
    assert np.abs(swapped - run_pipe(pipe, ip_adapter_image=images)).max() > 1e-2
    with pytest.raises(ValueError, match=r"must have same length as the number of IP Adapters"):
        run_pipe(pipe, ip_adapter_image=images[:1])
