"""The whole family against eager diffusers: same seeds, same inputs, fp32 exports, tight tolerance."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import PROMPT, cli, eager, run_pipe
from diffusers import (
    LCMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLInstructPix2PixPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image

from aotdiffusion import (
    AOTDiffusionPipeline,
    AOTLatentConsistencyModelPipeline,
    AOTStableDiffusionImg2ImgPipeline,
    AOTStableDiffusionInpaintPipeline,
    AOTStableDiffusionInstructPix2PixPipeline,
    AOTStableDiffusionXLImg2ImgPipeline,
    AOTStableDiffusionXLInpaintPipeline,
    AOTStableDiffusionXLInstructPix2PixPipeline,
    AOTStableDiffusionXLPipeline,
)

# fp32 exports only reassociate sums inside fused kernels (measured ~1e-6 on [0, 1] images).
ATOL = 1e-4


def picture(mode: str = "RGB", size: int = 64, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def mask(size: int = 64) -> Image.Image:
    array = np.zeros((size, size), dtype=np.uint8)
    array[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return Image.fromarray(array)


def load(cls, folder, **kwargs):
    pipe = cls.from_pretrained(folder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def close(actual, expected, atol=ATOL):
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=0)


def png_close(path, expected: Image.Image) -> None:
    """The CLI's PNG equals the eager pipeline's image within one 8-bit level (the rounding of fp32 sums)."""
    png = np.asarray(Image.open(path), dtype=np.int16)
    assert np.abs(png - np.asarray(expected, dtype=np.int16)).max() <= 1


def refused(export, prompt: str, refusals: list[tuple[list[str], str]]) -> None:
    """Each ``generate`` call with these flags fails with a message matching the pattern."""
    for flags, message in refusals:
        result = cli("generate", str(export), prompt, *flags, check=False)
        assert result.returncode != 0 and re.search(message, result.stderr), result.stderr


@pytest.mark.parametrize("strength", [0.3, 0.6, 0.9])
def test_img2img(sd_fp32, tiny, strength):
    reference = eager("sd", tiny, StableDiffusionImg2ImgPipeline)
    pipe = load(AOTStableDiffusionImg2ImgPipeline, sd_fp32)
    # RGBA in: the compiled pipeline converts any PIL mode; eager diffusers needs RGB.
    actual = run_pipe(pipe, image=picture("RGBA"), strength=strength, num_inference_steps=5)
    close(actual, run_pipe(reference, image=picture("RGB"), strength=strength, num_inference_steps=5))


def test_inpaint_with_a_regular_unet(sd_fp32, tiny):
    reference = eager("sd", tiny, StableDiffusionInpaintPipeline)
    pipe = load(AOTStableDiffusionInpaintPipeline, sd_fp32)
    close(run_pipe(pipe, image=picture(), mask_image=mask()), run_pipe(reference, image=picture(), mask_image=mask()))


def test_inpaint_with_the_inpainting_unet(sd_inpaint_export, tiny):
    pipe = AOTDiffusionPipeline.from_pretrained(sd_inpaint_export)  # auto-detected at export and load
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, AOTStableDiffusionInpaintPipeline) and pipe.unet.config.in_channels == 9
    # An "L" picture as image and an RGB mask: both converted.
    call = {"image": picture("L"), "mask_image": mask().convert("RGB")}
    expected = run_pipe(eager("sd-inpaint", tiny), image=picture("L").convert("RGB"), mask_image=mask())
    close(run_pipe(pipe, **call), expected)


def test_sdxl_base(sdxl_export, tiny):
    pipe = load(AOTDiffusionPipeline, sdxl_export)
    assert isinstance(pipe, AOTStableDiffusionXLPipeline)
    close(run_pipe(pipe, negative_prompt="blurry"), run_pipe(eager("sdxl", tiny), negative_prompt="blurry"))


def test_sdxl_img2img_and_inpaint_with_the_base_model(sdxl_export, tiny):
    img2img = load(AOTStableDiffusionXLImg2ImgPipeline, sdxl_export)
    expected = run_pipe(eager("sdxl", tiny, StableDiffusionXLImg2ImgPipeline), image=picture(), strength=0.6)
    close(run_pipe(img2img, image=picture(), strength=0.6), expected)
    inpaint = load(AOTStableDiffusionXLInpaintPipeline, sdxl_export)
    expected = run_pipe(eager("sdxl", tiny, StableDiffusionXLInpaintPipeline), image=picture(), mask_image=mask())
    close(run_pipe(inpaint, image=picture(), mask_image=mask()), expected)


def _base_then_refiner(base, refiner, handoff: str):
    if handoff == "denoising_end":  # ensemble of experts: the base stops at 80%, the refiner finishes
        latents = run_pipe(base, num_inference_steps=10, denoising_end=0.8, output_type="latent")
        return run_pipe(refiner, image=latents, num_inference_steps=10, denoising_start=0.8)
    latents = run_pipe(base, num_inference_steps=5, output_type="latent")  # base finished, refiner on top
    return run_pipe(refiner, image=latents[0][None, :], num_inference_steps=5)


@pytest.mark.parametrize("handoff", ["denoising_end", "whole_latent"])
def test_sdxl_base_and_refiner(sdxl_export, sdxl_refiner_export, tiny, handoff):
    refiner = load(AOTDiffusionPipeline, sdxl_refiner_export)
    assert isinstance(refiner, AOTStableDiffusionXLImg2ImgPipeline) and refiner.text_encoder is None
    assert refiner.config.requires_aesthetics_score
    actual = _base_then_refiner(load(AOTStableDiffusionXLPipeline, sdxl_export), refiner, handoff)
    expected = _base_then_refiner(eager("sdxl", tiny), eager("sdxl-refiner", tiny), handoff)
    close(actual, expected)


def test_lcm_four_steps(lcm_export, tiny):
    pipe = load(AOTDiffusionPipeline, lcm_export)
    assert isinstance(pipe, AOTLatentConsistencyModelPipeline) and isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.unet.batch_size == 1  # guidance is an embedding: no guidance batch
    call = {"num_inference_steps": 4, "guidance_scale": 8.0}
    close(run_pipe(pipe, **call), run_pipe(eager("lcm", tiny), **call))


def test_lcm_sdxl_from_a_replaced_unet(lcm_sdxl_export, tiny):
    pipe = load(AOTStableDiffusionXLPipeline, lcm_sdxl_export)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.unet.config.time_cond_proj_dim == 32
    reference = eager("sdxl", tiny)
    reference = StableDiffusionXLPipeline(
        **{**reference.components, "unet": UNet2DConditionModel.from_pretrained(tiny("lcm-sdxl"))}
    )
    reference.scheduler = LCMScheduler.from_config(reference.scheduler.config)
    reference.set_progress_bar_config(disable=True)
    call = {"prompt": [PROMPT], "num_inference_steps": 4, "guidance_scale": 8.0}
    close(run_pipe(pipe, **call), run_pipe(reference, **call))


def test_sdxl_turbo_one_step(sdxl_turbo_export, tiny):
    pipe = load(AOTStableDiffusionXLPipeline, sdxl_turbo_export)
    call = {"guidance_scale": 0.0, "num_inference_steps": 1}
    close(run_pipe(pipe, **call), run_pipe(eager("sdxl", tiny), **call))


def test_data_parallel_all_matches_separate_calls(sdxl_turbo_export):
    # The tutorial's call: a batch-1 Turbo export, two prompts, data_parallel_mode="all" (two
    # single-core replicas here).
    prompts = ["Self-portrait oil painting, a beautiful cyborg with golden hair, 8k", "a dog running by the river"]
    call = {"guidance_scale": 0.0, "num_inference_steps": 1, "output_type": "np"}
    single = load(AOTStableDiffusionXLPipeline, sdxl_turbo_export)
    separate = [single(p, generator=torch.Generator().manual_seed(s), **call).images for p, s in zip(prompts, [1, 2])]
    parallel = AOTStableDiffusionXLPipeline.from_pretrained(sdxl_turbo_export, data_parallel_mode="all")
    try:
        assert len(parallel._replicas) == 2
        start = time.perf_counter()
        images = parallel(prompts, generator=[torch.Generator().manual_seed(s) for s in (1, 2)], **call).images
        assert time.perf_counter() - start < 120
        pil = parallel(prompts, generator=torch.Generator().manual_seed(0), guidance_scale=0.0, num_inference_steps=1)
    finally:
        parallel.enable_data_parallel("none")
    assert images.shape == (2, 64, 64, 3) and len(pil.images) == 2
    # Each replica runs one thread, the single pipeline two: fp32 sums may round differently.
    close(images, np.concatenate(separate), atol=1e-5)


def test_data_parallel_from_a_script_without_a_main_guard(sdxl_turbo_export, tmp_path):
    # The tutorial's code is a plain script: replicas must not re-run the caller's main module.
    script = tmp_path / "turbo.py"
    script.write_text(
        "from aotdiffusion import AOTStableDiffusionXLPipeline\n"
        "print('script body ran', flush=True)\n"
        f"pipe = AOTStableDiffusionXLPipeline.from_pretrained({str(sdxl_turbo_export)!r}, data_parallel_mode='all')\n"
        "images = pipe(['a cyborg'] * 2, guidance_scale=0.0, num_inference_steps=1).images\n"
        "print('images', len(images), images[0].size)\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("script body ran") == 1 and "images 2 (64, 64)" in result.stdout


def test_image_size_rules(sd_fp32):
    pipe = load(AOTStableDiffusionImg2ImgPipeline, sd_fp32)
    with pytest.raises(
        ValueError, match=r"`image` is 128x96 \(width x height\) but this pipeline was compiled for 64x64"
    ):
        run_pipe(pipe, image=picture(size=128).crop((0, 0, 128, 96)))
    resized = run_pipe(pipe, image=picture(size=128), resize_images=True, strength=0.5)
    assert resized.shape == (1, 64, 64, 3)
    inpaint = load(AOTStableDiffusionInpaintPipeline, sd_fp32)
    with pytest.raises(ValueError, match=r"`mask_image` is 32x32 but `image` is 64x64 .*a mask must have the size"):
        run_pipe(inpaint, image=picture(), mask_image=mask(32), resize_images=True)


def test_img2img_on_a_text_to_image_export_says_how_to_export(sd_no_guidance):
    pipe = load(AOTStableDiffusionImg2ImgPipeline, sd_no_guidance)
    with pytest.raises(ValueError, match="exported without a VAE encoder"):
        run_pipe(pipe, image=picture(), guidance_scale=0.0)


def test_fp16_sdxl_vae_is_refused(tiny):
    from aotdiffusion.export.pipeline import component_specs, default_shapes
    from aotdiffusion.export.precision import Precision

    pipe = eager("sdxl", tiny)
    with pytest.raises(ValueError, match=r"SDXL VAE overflows in fp16 .*--auto-cast-type bf16"):
        component_specs(pipe, default_shapes(pipe, height=64, width=64), Precision("matmul", "fp16"))


def test_cli_generates_each_task(sdxl_export, sdxl_turbo_export, lcm_export, sd_inpaint_export, tmp_path):
    picture().save(tmp_path / "in.png")
    mask().save(tmp_path / "mask.png")
    runs = {
        "sdxl": (sdxl_export, []),
        "sdxl-img2img": (sdxl_export, ["--image", str(tmp_path / "in.png"), "--strength", "0.5"]),
        "turbo": (sdxl_turbo_export, ["--steps", "1"]),  # guidance 0.0 picked for a no-guidance export
        "lcm": (lcm_export, ["--steps", "4", "--guidance-scale", "8.0"]),
        "inpaint": (sd_inpaint_export, ["--image", str(tmp_path / "in.png"),
                                        "--mask-image", str(tmp_path / "mask.png")]),
    }  # fmt: skip
    for name, (folder, extra) in runs.items():
        out = tmp_path / name
        result = cli("generate", str(folder), "a cat", "--steps", "3", *extra, "--output", str(out))
        assert (out / "seed0-0.png").is_file(), result.stdout
    failed = cli("generate", str(lcm_export), "a cat", "--image", str(tmp_path / "in.png"), check=False)
    assert failed.returncode == 2 and "do not take an input image" in failed.stderr


def test_split_guidance_batch_runs_the_halves_and_matches_eager(sd_split_guidance, eager_sd):
    pipe = load(AOTDiffusionPipeline, sd_split_guidance)
    assert pipe.unet.batch_size == 1 and pipe.static_shapes.classifier_free_guidance
    expected = run_pipe(eager_sd, negative_prompt="blurry")
    close(run_pipe(pipe, negative_prompt="blurry"), expected)  # halves one after the other
    parallel = load(AOTDiffusionPipeline, sd_split_guidance, data_parallel_mode="unet")
    try:
        assert len(parallel.unet.replicas) == 2
        close(run_pipe(parallel, negative_prompt="blurry"), expected, atol=1e-5)  # halves side by side
    finally:
        parallel.enable_data_parallel("none")


def test_unet_data_parallel_needs_a_split_export(sd_fp32):
    with pytest.raises(ValueError, match=r"compiled for the whole guidance batch \(2\).*--split-guidance-batch"):
        load(AOTDiffusionPipeline, sd_fp32, data_parallel_mode="unet")


def test_instruct_pix2pix_matches_eager(sd_pix2pix_export, tiny, tmp_path):
    pipe = AOTDiffusionPipeline.from_pretrained(sd_pix2pix_export)  # the class found at export and at load
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, AOTStableDiffusionInstructPix2PixPipeline)
    assert pipe.unet.batch_size == 3  # text and image guidance, image guidance only, neither
    reference = eager("sd-instruct-pix2pix", tiny)
    assert isinstance(reference, StableDiffusionInstructPix2PixPipeline)
    for call in ({}, {"image_guidance_scale": 1.2, "guidance_scale": 5.0, "negative_prompt": "blurry"}):
        close(run_pipe(pipe, image=picture(), **call), run_pipe(reference, image=picture(), **call))
    # Two prompts, two images: chunks of the compiled batch, each image with its prompt.
    two = {"prompt": ["make it winter", "make it night"], "image": [picture(seed=1), picture(seed=2)]}
    gens = lambda: [torch.Generator().manual_seed(s) for s in (0, 1)]  # noqa: E731
    close(
        pipe(**two, generator=gens(), num_inference_steps=3, output_type="np").images,
        reference(**two, generator=gens(), num_inference_steps=3, output_type="np").images,
    )
    with pytest.raises(ValueError, match=r"image_guidance_scale=0.5 turns classifier-free guidance off.*>= 1"):
        run_pipe(pipe, image=picture(), image_guidance_scale=0.5)
    picture().save(tmp_path / "in.png")
    out = tmp_path / "out"
    cli("generate", str(sd_pix2pix_export), "make it winter", "--image", str(tmp_path / "in.png"), "--steps", "4",
        "--image-guidance-scale", "1.2", "--output", str(out))  # fmt: skip
    expected = reference(
        "make it winter", image=picture(), num_inference_steps=4, image_guidance_scale=1.2,
        generator=torch.Generator().manual_seed(0),
    ).images[0]  # fmt: skip
    png_close(out / "seed0-0.png", expected)
    refusals = [
        ([], "edits an input image as the prompt says.*pass --image"),
        (["--image", str(tmp_path / "in.png"), "--strength", "0.5"], "has no --strength"),
    ]
    refused(sd_pix2pix_export, "make it winter", refusals)


def test_sdxl_instruct_pix2pix_matches_eager(sdxl_pix2pix_export, tiny):
    pipe = load(AOTStableDiffusionXLInstructPix2PixPipeline, sdxl_pix2pix_export)
    assert pipe.unet.batch_size == 3
    reference = eager("sdxl-instruct-pix2pix", tiny)
    assert isinstance(reference, StableDiffusionXLInstructPix2PixPipeline)
    call = {"image": picture(), "image_guidance_scale": 1.3}
    close(run_pipe(pipe, **call), run_pipe(reference, **call))
