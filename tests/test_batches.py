"""Calls with more or fewer prompts than the compiled batch: chunks of it, the last padded, the padding dropped."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import PROMPT, cli
from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionImg2ImgPipeline
from PIL import Image
from test_family import picture
from test_pipeline import FP32_ATOL

from aotdiffusion import AOTStableDiffusionImg2ImgPipeline

PROMPTS = ["a cat on a sofa", "a dog in the snow", "a red bicycle", "a lighthouse at night", "a bowl of fruit"]
CALL = {"num_inference_steps": 3, "output_type": "np"}


def seeds(*values: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(v) for v in values]


def test_more_prompts_than_the_batch_match_eager_and_separate_calls(sd_fp32, eager_sd, load):
    pipe = load(sd_fp32)  # compiled for one prompt per call
    prompts = PROMPTS[:3]
    chunked = pipe(prompts, generator=seeds(0, 1, 2), **CALL).images
    assert chunked.shape == (3, 64, 64, 3)
    np.testing.assert_allclose(chunked, eager_sd(prompts, generator=seeds(0, 1, 2), **CALL).images, atol=FP32_ATOL)
    for i, prompt in enumerate(prompts):  # each image is what its prompt alone gives with its generator
        np.testing.assert_array_equal(chunked[i], pipe(prompt, generator=seeds(i)[0], **CALL).images[0])
    # One generator: drawn chunk after chunk, the whole call's latents are eager diffusers' for it.
    single = pipe(prompts, negative_prompt="blurry", generator=torch.Generator().manual_seed(7), **CALL).images
    # (eager SD refuses one negative string beside a list of prompts: a list of copies there)
    expected = eager_sd(
        prompts, negative_prompt=["blurry"] * 3, generator=torch.Generator().manual_seed(7), **CALL
    ).images
    np.testing.assert_allclose(single, expected, atol=FP32_ATOL)


def test_fewer_and_more_prompts_are_padded_and_the_padding_dropped(sd_batch4, eager_sd, load):
    pipe = load(sd_batch4)  # four prompts per call
    one = pipe(PROMPT, generator=seeds(3), **CALL).images
    assert one.shape == (1, 64, 64, 3)
    np.testing.assert_allclose(one, eager_sd(PROMPT, generator=seeds(3), **CALL).images, atol=FP32_ATOL)
    # Five prompts: one full call and one of a prompt plus three copies of it.
    negatives = [f"blurry {i}" for i in range(5)]
    five = pipe(PROMPTS, negative_prompt=negatives, generator=seeds(*range(5)), **CALL).images
    assert five.shape == (5, 64, 64, 3)
    expected = eager_sd(PROMPTS, negative_prompt=negatives, generator=seeds(*range(5)), **CALL).images
    np.testing.assert_allclose(five, expected, atol=FP32_ATOL)
    latents = pipe(PROMPTS[:2], generator=seeds(0, 1), num_inference_steps=2, output_type="latent", return_dict=False)
    assert isinstance(latents, tuple) and latents[0].shape == (2, 4, 32, 32)
    assert len(pipe(PROMPTS[:3], num_inference_steps=1).images) == 3  # PIL, global generator


def test_per_step_noise_follows_each_images_generator(sd_fp32, load):
    # A scheduler that adds noise at every step draws it per generator: chunking changes nothing.
    pipe = load(sd_fp32)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    chunked = pipe(PROMPTS[:2], generator=seeds(4, 5), **CALL).images
    for i, seed in enumerate((4, 5)):
        np.testing.assert_array_equal(chunked[i], pipe(PROMPTS[i], generator=seeds(seed)[0], **CALL).images[0])


def test_images_are_split_with_their_prompts(sd_fp32, tiny):
    pipe = AOTStableDiffusionImg2ImgPipeline.from_pretrained(sd_fp32)
    pipe.set_progress_bar_config(disable=True)
    eager = StableDiffusionImg2ImgPipeline.from_pretrained(tiny("sd"))
    eager.set_progress_bar_config(disable=True)
    images = [picture(seed=1), picture(seed=2)]
    call = {**CALL, "strength": 0.6}
    actual = pipe(PROMPTS[:2], image=images, generator=seeds(0, 1), **call).images
    np.testing.assert_allclose(
        actual, eager(PROMPTS[:2], image=images, generator=seeds(0, 1), **call).images, atol=FP32_ATOL
    )
    # One image for every prompt, as in diffusers.
    shared = pipe(PROMPTS[:2], image=images[0], generator=seeds(0, 1), **call).images
    np.testing.assert_allclose(
        shared, eager(PROMPTS[:2], image=images[0], generator=seeds(0, 1), **call).images, atol=FP32_ATOL
    )


@pytest.mark.parametrize(
    "call, message",
    [
        (
            {"negative_prompt": ["a", "b"]},
            r"`negative_prompt` has 2 entries for 3 prompt\(s\): give one per prompt \(3\)",
        ),
        ({"generator": seeds(0, 1)}, r"list of 2 generators for 3 prompt\(s\) x 1 image\(s\).*one per image \(3\)"),
        ({"latents": torch.zeros(2, 4, 32, 32)}, r"`latents` has 2 rows .* one per image \(3\)"),
        ({"prompt": []}, r"empty list"),
    ],
)
def test_a_bad_per_prompt_argument_fails_before_any_chunk_runs(sd_fp32, load, call, message):
    pipe = load(sd_fp32)
    steps = []
    call = {"prompt": PROMPTS[:3], **call, "callback_on_step_end": lambda *a: steps.append(a[1]) or a[3]}
    with pytest.raises(ValueError, match=message):
        pipe(**call, **CALL)
    assert steps == []


def test_generate_prompts_here_runs_a_file_in_compiled_batches(sd_batch4, load, tmp_path):
    """`generate --prompts FILE` without --ray: one compiled batch after another, the last padded; each image is
    the pipeline's for its prompt and seed."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "images"
    result = cli("generate", str(sd_batch4), "--prompts", str(prompts), "--steps", "3", "--seed", "10",
                 "--output", str(out))  # fmt: skip
    assert "4/5 prompts" in result.stdout and "5 image(s)" in result.stdout
    records = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["seed"]) for r in records] == [(p, 10 + i) for i, p in enumerate(PROMPTS)]
    expected = load(sd_batch4)(PROMPTS, generator=seeds(*range(10, 15)), num_inference_steps=3).images
    for record, image in zip(records, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(record["path"])), np.asarray(image))
    refused = cli("generate", str(sd_batch4), "--prompts", str(prompts), "--replicas", "2", check=False)
    assert refused.returncode != 0 and "--replicas 2 runs pipeline actors on Ray: add --ray" in refused.stderr
