"""LoRA adapters fused before compiling or refitting (export --lora, export/lora.py), against eager diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import cli, run_pipe

from aotdiffusion import AOTStableDiffusionPipeline, artifact
from aotdiffusion.export.lora import parse_lora


def _tiny_lora(tiny_sd, folder, seed):
    """A random LoRA on the tiny UNet's attention and the text encoder's, saved as diffusers saves one."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    torch.manual_seed(seed)
    # init_lora_weights=False: random A and B (peft's default B = 0 would be a no-op adapter).
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))  # fmt: skip
    # peft directly: transformers 5's own add_adapter wants a newer peft than the registry has.
    text_config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                             target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])  # fmt: skip
    inject_adapter_in_model(text_config, pipe.text_encoder)
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder)),
    )
    return folder


@pytest.fixture(scope="module")
def loras(tiny_sd, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return _tiny_lora(tiny_sd, root / "style", seed=1), _tiny_lora(tiny_sd, root / "subject", seed=2)


def _eager_with(tiny_sd, fused):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.set_progress_bar_config(disable=True)
    names = [f"a{i}" for i in range(len(fused))]
    for name, (source, _) in zip(names, fused):
        pipe.load_lora_weights(source, adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[scale for _, scale in fused])
    pipe.fuse_lora(adapter_names=names)
    return pipe


def test_two_loras_fused_at_their_scales_match_eager_diffusers(tiny_sd, sd_fp32, loras, load, eager_sd, tmp_path):
    style, subject = loras
    out = tmp_path / "with-loras"
    AOTStableDiffusionPipeline.export(
        tiny_sd, out, reuse_compiled=sd_fp32, lora=[f"{style}:0.7", (subject, 0.4)], validate=False
    )
    images = run_pipe(load(out))
    reference = run_pipe(_eager_with(tiny_sd, [(style, 0.7), (subject, 0.4)]))
    assert np.abs(images - reference).max() < 1e-3
    assert np.abs(images - run_pipe(eager_sd)).max() > 0.02  # the adapters changed the images
    # ... through both models they adapt (the text encoder's attention too, not only the UNet's).
    for model in ("text_encoder", "unet"):
        pipe = _eager_with(tiny_sd, [(style, 0.7)])
        pipe.unload_lora_weights()  # fused weights stay, under the base layers' names
        fused = dict(getattr(pipe, model).named_parameters())
        base = dict(getattr(eager_sd, model).named_parameters())
        changed = [name for name in base if not torch.equal(base[name], fused[name])]
        assert changed and all("attn" in name for name in changed), (model, changed[:3])
    index = artifact.read_pipeline_index(out)[1]
    assert index["loras"] == [{"source": str(style), "scale": 0.7}, {"source": str(subject), "scale": 0.4}]


def test_the_cli_fuses_a_lora(tiny_sd, sd_fp32, loras, load, tmp_path):
    style, _ = loras
    out = tmp_path / "cli-lora"
    cli("export", "--model", str(tiny_sd), "--reuse-compiled", str(sd_fp32), "--lora", f"{style}:0.5",
        "--disable-validation", str(out))  # fmt: skip
    assert np.abs(run_pipe(load(out)) - run_pipe(_eager_with(tiny_sd, [(style, 0.5)]))).max() < 1e-3


def test_lora_arguments_are_checked(tiny_sd, sd_fp32, tmp_path):
    assert parse_lora("some/lora") == ("some/lora", 1.0)
    assert parse_lora("some/lora:0.25") == ("some/lora", 0.25)
    assert parse_lora("C:odd-name") == ("C:odd-name", 1.0)
    with pytest.raises(ValueError, match="finite number"):
        parse_lora("some/lora:nan")
    with pytest.raises(ValueError, match="Could not load the LoRA"):
        AOTStableDiffusionPipeline.export(tiny_sd, tmp_path / "x", reuse_compiled=sd_fp32, lora=[str(tmp_path / "no")])
    assert not (tmp_path / "x").exists()
