"""Stable Diffusion 3 (issue #12): two CLIP encoders, T5, the MMDiT and the VAE compiled, against eager diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import BF16_ATOL, BF16_MIN_PSNR, cli, psnr
from PIL import Image

from aotdiffusion import AOTDiffusionPipeline, AOTStableDiffusion3Pipeline, artifact

PROMPT = "a photo of a cat sitting on a chair"


def _eager_pipe(folder):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def eager_sd3(tiny):
    return _eager_pipe(tiny("sd3"))


def _images(pipe, seeds=(0,), **kwargs) -> np.ndarray:
    kwargs.setdefault("prompt", PROMPT)
    kwargs.setdefault("num_inference_steps", 3)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    return pipe(generator=generators if len(seeds) > 1 else generators[0], output_type="np", **kwargs).images


def test_sd3_matches_eager_diffusers(sd3_export, eager_sd3):
    pipe = AOTDiffusionPipeline.from_pretrained(sd3_export)
    assert isinstance(pipe, AOTStableDiffusion3Pipeline)
    _, block = artifact.read_pipeline_index(sd3_export)
    assert block["components"] == ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder"]
    assert block["shapes"]["sequence_length"] == 256 and pipe.compiled_sizes == [(64, 64)]
    cases = [
        {},
        {"negative_prompt": "blurry, low quality", "guidance_scale": 5.0},
        {"prompt_2": "a red fox in the snow", "prompt_3": "a dog on mars", "num_inference_steps": 4},
        {"prompt": ["a cat", "a red fox in the snow", "a dog"], "seeds": (3, 4, 5)},  # chunks of the compiled one
        {"prompt": " ".join(["a photo of a cat"] * 60)},  # 300 words: T5 truncates at 256 tokens, CLIP at 77
    ]
    for case in cases:
        got, want = _images(pipe, **case), _images(eager_sd3, **case)
        assert got.shape == want.shape and got.shape[1:] == (64, 64, 3), case
        assert np.abs(got - want).max() < 1e-4, case


def test_sd3_bf16_within_bound_and_its_prompt_length(sd3_bf16_export, eager_sd3):
    pipe = AOTStableDiffusion3Pipeline.from_pretrained(sd3_bf16_export)
    assert pipe.static_shapes.sequence_length == 32
    got = _images(pipe)  # max_sequence_length left out: the compiled 32
    want = _images(eager_sd3, max_sequence_length=32)
    assert np.abs(got - want).max() < BF16_ATOL and psnr(got, want) > BF16_MIN_PSNR


def test_sd3_lora_changes_the_compiled_weights_in_place(sd3_export, eager_sd3, tiny, tmp_path):
    """A LoRA on the transformer, fused and unfused on the loaded export (no compiling), against eager diffusers with
    the same LoRA fused."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig, get_peft_model_state_dict

    donor = _eager_pipe(tiny("sd3"))
    torch.manual_seed(5)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    donor.transformer.add_adapter(config)
    StableDiffusion3Pipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=get_peft_model_state_dict(donor.transformer)
    )
    eager = _eager_pipe(tiny("sd3"))
    eager.load_lora_weights(tmp_path)
    eager.fuse_lora(lora_scale=0.7)
    want = _images(eager)
    pipe = AOTStableDiffusion3Pipeline.from_pretrained(sd3_export)
    plain = _images(pipe)
    pipe.load_lora_weights(tmp_path)
    pipe.fuse_lora(lora_scale=0.7)
    got = _images(pipe)
    assert np.abs(got - want).max() < 1e-4 and np.abs(got - plain).max() > 1e-2
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert np.abs(_images(pipe) - plain).max() < 1e-5


def test_sd3_new_weights_without_compiling(sd3_export, tmp_path):
    from aotdiffusion.random_models import tiny_stable_diffusion_3

    tiny_stable_diffusion_3(seed=1).save_pretrained(tmp_path / "other")
    out = tmp_path / "reused"
    AOTStableDiffusion3Pipeline.export(tmp_path / "other", out, reuse_compiled=sd3_export)
    got = _images(AOTStableDiffusion3Pipeline.from_pretrained(out))
    want = _images(_eager_pipe(tmp_path / "other"))
    assert np.abs(got - want).max() < 1e-4


def test_sd3_generate_cli_and_refusals(sd3_export, eager_sd3, tmp_path):
    cli("generate", str(sd3_export), PROMPT, "--steps", "3", "--seed", "2", "--output", str(tmp_path))
    got = np.asarray(Image.open(tmp_path / "seed2-0.png"), dtype=np.float32) / 255
    assert np.abs(got - _images(eager_sd3, seeds=(2,))[0]).max() <= 1 / 255 + 1e-6
    pipe = AOTStableDiffusion3Pipeline.from_pretrained(sd3_export)
    refusals = [
        ({"max_sequence_length": 77}, r"compiled for prompts of 256 tokens.*--sequence-length 77"),
        ({"skip_guidance_layers": [1]}, r"skip-layer guidance.*call without it"),
        ({"joint_attention_kwargs": {"scale": 0.5}}, r"set_adapters or fuse_lora"),
        ({"height": 128, "width": 128}, r"compiled for 64x64"),
        ({"guidance_scale": 1.0}, r"the transformer was compiled for the guidance batch"),
    ]
    for kwargs, message in refusals:
        with pytest.raises(ValueError, match=message):
            pipe(PROMPT, num_inference_steps=2, **kwargs)


def test_sd3_without_t5(sd3_export, tmp_path):
    """SD3 saved without its T5 encoder (diffusers then gives zeros in its place): exported without it, the other
    graphs from the compile cache (the same graphs and weights as ``sd3_export``'s)."""
    from diffusers import StableDiffusion3Pipeline

    from aotdiffusion.random_models import tiny_stable_diffusion_3

    full = tiny_stable_diffusion_3()
    parts = {**full.components, "text_encoder_3": None, "tokenizer_3": None}
    StableDiffusion3Pipeline(**parts).save_pretrained(tmp_path / "no-t5")
    out = tmp_path / "no-t5-export"
    AOTStableDiffusion3Pipeline.export(tmp_path / "no-t5", out, auto_cast="none")
    _, block = artifact.read_pipeline_index(out)
    assert "text_encoder_3" not in block["components"]
    eager = StableDiffusion3Pipeline.from_pretrained(tmp_path / "no-t5", text_encoder_3=None, tokenizer_3=None)
    eager.set_progress_bar_config(disable=True)
    pipe = AOTStableDiffusion3Pipeline.from_pretrained(out)
    assert pipe.text_encoder_3 is None
    assert np.abs(_images(pipe) - _images(eager)).max() < 1e-4
