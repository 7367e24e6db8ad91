"""PixArt-Σ (issue #12): the T5 encoder, the DiT and the VAE compiled, against eager diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import BF16_ATOL, BF16_MIN_PSNR, cli, psnr
from PIL import Image

from aotdiffusion import AOTDiffusionPipeline, AOTPixArtSigmaPipeline, artifact

PROMPT = "a photo of a cat sitting on a chair"


@pytest.fixture(scope="module")
def eager_pixart(tiny):
    from diffusers import PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline.from_pretrained(tiny("pixart-sigma"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, seeds=(0,), **kwargs) -> np.ndarray:
    kwargs.setdefault("prompt", PROMPT)
    kwargs.setdefault("num_inference_steps", 3)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    return pipe(generator=generators if len(seeds) > 1 else generators[0], output_type="np", **kwargs).images


def _eager(eager, **kwargs) -> np.ndarray:
    # clean_caption needs beautifulsoup4 and ftfy; without them diffusers warns and goes on without it.
    return _images(eager, clean_caption=False, **kwargs)


def test_pixart_sigma_matches_eager_diffusers(pixart_export, eager_pixart):
    pipe = AOTDiffusionPipeline.from_pretrained(pixart_export)
    assert isinstance(pipe, AOTPixArtSigmaPipeline)
    _, block = artifact.read_pipeline_index(pixart_export)
    # PixArt only generates: no VAE encoder is compiled.
    assert block["components"] == ["text_encoder", "transformer", "vae_decoder"]
    assert block["shapes"]["sequence_length"] == 300 and pipe.compiled_sizes == [(256, 256)]
    cases = [
        {},  # resolution binning on (256x256 is its own bin), guidance 4.5
        {"negative_prompt": "blurry, low quality", "guidance_scale": 7.0},
        {"use_resolution_binning": False, "max_sequence_length": 300},
        {"prompt": ["a cat", "a red fox in the snow", "a dog"], "seeds": (3, 4, 5)},  # chunks of the compiled one
    ]
    for case in cases:
        got, want = _images(pipe, **case), _eager(eager_pixart, **case)
        assert got.shape == want.shape and got.shape[1:] == (256, 256, 3), case
        assert np.abs(got - want).max() < 1e-4, case
    # Each of the three prompts' images is what it gives alone.
    alone = _images(pipe, prompt="a red fox in the snow", seeds=(4,))
    assert (
        np.abs(_images(pipe, prompt=["a cat", "a red fox in the snow", "a dog"], seeds=(3, 4, 5))[1] - alone[0]).max()
        < 1e-5
    )


def test_pixart_truncates_long_prompts_as_diffusers(pixart_export, eager_pixart, caplog):
    pipe = AOTPixArtSigmaPipeline.from_pretrained(pixart_export)
    long = " ".join(["a photo of a cat"] * 70)  # 350 words, one token each
    got = _images(pipe, prompt=long)
    assert "truncated because T5 can only handle sequences up to 300 tokens" in caplog.text
    assert np.abs(got - _eager(eager_pixart, prompt=long)).max() < 1e-4


def test_pixart_bf16_within_bound_and_its_prompt_length(pixart_bf16_export, eager_pixart):
    pipe = AOTPixArtSigmaPipeline.from_pretrained(pixart_bf16_export)
    assert pipe.static_shapes.sequence_length == 64
    got = _images(pipe)  # max_sequence_length left out: the compiled 64
    want = _eager(eager_pixart, max_sequence_length=64)
    assert np.abs(got - want).max() < BF16_ATOL and psnr(got, want) > BF16_MIN_PSNR
    with pytest.raises(
        ValueError, match=r"compiled for prompts of 64 tokens.*max_sequence_length=300.*--sequence-length 300"
    ):
        _images(pipe, max_sequence_length=300)


def test_pixart_generate_cli(pixart_export, eager_pixart, tmp_path):
    cli("generate", str(pixart_export), PROMPT, "--steps", "3", "--seed", "2", "--output", str(tmp_path))
    got = np.asarray(Image.open(tmp_path / "seed2-0.png"), dtype=np.float32) / 255
    want = _eager(eager_pixart, seeds=(2,))[0]
    assert np.abs(got - want).max() <= 1 / 255 + 1e-6


def test_pixart_refuses_what_it_cannot_run(pixart_export, tiny, tmp_path):
    pipe = AOTPixArtSigmaPipeline.from_pretrained(pixart_export)
    refusals = [
        ({"max_sequence_length": 120}, r"compiled for prompts of 300 tokens.*--sequence-length 120"),
        # binned to 352x176 (the aspect ratio 2.0 bin), which is not compiled
        ({"height": 400, "width": 200}, r"generated at 352x176 and resized back.*compiled for 256x256.*352x176"),
        ({"height": 192, "width": 384, "use_resolution_binning": False}, r"for 256x256.*height=192, width=384"),
        ({"guidance_scale": 1.0}, r"the transformer was compiled for the guidance batch"),
        ({"cache_interval": 2}, r"a transformer model has no such blocks: call with cache_interval=1"),
    ]  # fmt: skip
    for kwargs, message in refusals:
        with pytest.raises(ValueError, match=message):
            pipe(PROMPT, num_inference_steps=1, **kwargs)
    with pytest.raises(ValueError, match="takes no LoRA adapters"):
        pipe.load_lora_weights("lora.safetensors")
    model = tiny("pixart-sigma")
    for kwargs, message in [
        ({"quantize": "int8"}, "--quantize int8 calibrates and quantizes a UNet"),
        ({"deep_cache": True}, "a transformer \\(PixArt, SD3\\) has"),
        ({"split_guidance_batch": True}, "--split-guidance-batch is for UNet models"),
    ]:
        with pytest.raises(ValueError, match=message):
            AOTPixArtSigmaPipeline.export(model, tmp_path / "never", **kwargs)
    with pytest.raises(ValueError, match=r"encodes every prompt as 77 CLIP tokens.*--sequence-length 100"):
        cli_free_sd_shapes(tiny("sd"), sequence_length=100)


def cli_free_sd_shapes(model, **requested):
    from diffusers import StableDiffusionPipeline

    from aotdiffusion.export.pipeline import default_shapes

    return default_shapes(StableDiffusionPipeline.from_pretrained(model), **requested)


def test_pixart_new_weights_without_compiling(pixart_export, tmp_path):
    """--reuse-compiled: another PixArt-Σ of the same architecture runs the compiled code (its position embedding, a
    non-persistent buffer the compile copies, is placed by name)."""
    from diffusers import PixArtSigmaPipeline

    from aotdiffusion.random_models import tiny_pixart_sigma

    other = tiny_pixart_sigma(seed=1)
    other.save_pretrained(tmp_path / "other")
    out = tmp_path / "reused"
    result = cli("export", "--model", str(tmp_path / "other"), "--reuse-compiled", str(pixart_export), str(out))
    assert "no compiling" in result.stdout
    pipe = AOTPixArtSigmaPipeline.from_pretrained(out)
    eager = PixArtSigmaPipeline.from_pretrained(tmp_path / "other")
    eager.set_progress_bar_config(disable=True)
    got, want = _images(pipe), _eager(eager)
    assert np.abs(got - want).max() < 1e-4
    assert np.abs(got - _images(AOTPixArtSigmaPipeline.from_pretrained(pixart_export))).max() > 1e-2  # new weights
