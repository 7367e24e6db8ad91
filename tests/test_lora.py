"""LoRA adapters fused before compiling or refitting (export --lora, export/lora.py), against eager diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import PROMPT, STEPS, cli, run_pipe

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
    # The attention's linears, and the resnets' 3x3 convolutions (LoCon): in every block, the step-caching
    # graph's shallow ones too, and Winograd-transformed in Winograd exports.
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"]))  # fmt: skip
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
        assert changed and all("attn" in name or "conv1" in name for name in changed), (model, changed[:3])
    index = artifact.read_pipeline_index(out)[1]
    assert index["loras"] == [{"source": str(style), "scale": 0.7}, {"source": str(subject), "scale": 0.4}]


def test_the_cli_fuses_a_lora(tiny_sd, sd_fp32, loras, load, tmp_path):
    from PIL import Image

    style, subject = loras
    out = tmp_path / "cli-lora"
    cli("export", "--model", str(tiny_sd), "--reuse-compiled", str(sd_fp32), "--lora", f"{style}:0.5",
        "--disable-validation", str(out))  # fmt: skip
    expected = run_pipe(_eager_with(tiny_sd, [(style, 0.5)]))
    assert np.abs(run_pipe(load(out)) - expected).max() < 1e-3
    # generate --lora: the same adapter applied to the loaded base export, in place.
    cli("generate", str(sd_fp32), PROMPT, "--steps", str(STEPS), "--lora", f"{style}:0.5", "--output",
        str(tmp_path / "images"))  # fmt: skip
    png = np.asarray(Image.open(tmp_path / "images" / "seed0-0.png"), dtype=np.int16)
    assert np.abs(png - np.round(expected[0] * 255)).max() <= 1  # 8-bit rounding
    refused = cli("generate", str(sd_fp32), "--prompts", "p.txt", "--ray", "--lora", str(subject), check=False)
    assert refused.returncode == 2 and "--reuse-compiled" in refused.stderr


def test_lora_arguments_are_checked(tiny_sd, sd_fp32, tmp_path):
    assert parse_lora("some/lora") == ("some/lora", 1.0)
    assert parse_lora("some/lora:0.25") == ("some/lora", 0.25)
    assert parse_lora("C:odd-name") == ("C:odd-name", 1.0)
    with pytest.raises(ValueError, match="finite number"):
        parse_lora("some/lora:nan")
    with pytest.raises(ValueError, match="The LoRA .*no does not exist: no such file or folder"):
        AOTStableDiffusionPipeline.export(tiny_sd, tmp_path / "x", reuse_compiled=sd_fp32, lora=[str(tmp_path / "no")])
    # Not a path: a Hub id, which cannot be fetched here (offline, or no network): said so, not a client traceback.
    with pytest.raises(ValueError, match="someone/no-such-lora: it is not a local file or folder, so it was looked up"):
        AOTStableDiffusionPipeline.export(
            tiny_sd, tmp_path / "x", reuse_compiled=sd_fp32, lora=["someone/no-such-lora"]
        )
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------- on a loaded pipeline
@pytest.fixture
def no_compiling(monkeypatch):
    """In-place LoRA must never compile: any AOTInductor compile inside the test is a failure."""

    def refuse(*args, **kwargs):
        raise AssertionError("an AOTInductor compile ran")

    monkeypatch.setattr(torch._inductor, "aot_compile", refuse)


def _both(compiled, eager, method, *args, **kwargs):
    getattr(compiled, method)(*args, **kwargs)
    getattr(eager, method)(*args, **kwargs)


def test_lora_methods_on_a_loaded_pipeline_change_its_compiled_weights_as_diffusers_does(
    tiny_sd, sd_winograd, loras, load, no_compiling
):
    from diffusers import StableDiffusionPipeline

    style, subject = loras
    # Winograd: the UNet's 3x3 convolutions hold G g G^T of their weights, the attention oneDNN-packed linears.
    pipe = load(sd_winograd)
    eager = StableDiffusionPipeline.from_pretrained(tiny_sd)
    eager.set_progress_bar_config(disable=True)
    base = run_pipe(pipe)

    def same_as_eager(state):
        images = run_pipe(pipe)
        assert np.abs(images - run_pipe(eager)).max() < 1e-3, state
        return images

    _both(pipe, eager, "load_lora_weights", style, adapter_name="style")
    assert np.abs(same_as_eager("one adapter loaded") - base).max() > 0.02  # the LoRA changed the images
    _both(pipe, eager, "load_lora_weights", subject, adapter_name="subject")
    _both(pipe, eager, "set_adapters", ["style", "subject"], adapter_weights=[0.7, 0.4])
    same_as_eager("two adapters at 0.7 and 0.4")
    assert pipe.get_active_adapters() == ["style", "subject"]
    assert pipe.get_list_adapters() == {"unet": ["style", "subject"], "text_encoder": ["style", "subject"]}
    _both(pipe, eager, "fuse_lora", lora_scale=0.5)
    same_as_eager("fused at lora_scale 0.5")
    _both(pipe, eager, "unfuse_lora")
    same_as_eager("unfused")
    _both(pipe, eager, "set_adapters", "subject")
    same_as_eager("switched to one adapter")
    _both(pipe, eager, "disable_lora")
    same_as_eager("disabled")
    _both(pipe, eager, "enable_lora")
    _both(pipe, eager, "delete_adapters", "subject")
    same_as_eager("deleted")
    _both(pipe, eager, "fuse_lora")
    _both(pipe, eager, "unload_lora_weights")  # what was fused stays, as in diffusers
    same_as_eager("fused then unloaded")
    with pytest.raises(ValueError, match="--reuse-compiled"):
        pipe.save_pretrained("unused")  # it would copy the export without the LoRA
    # A fresh load has the export's weights: nothing was written to disk.
    np.testing.assert_array_equal(run_pipe(load(sd_winograd)), base)


def test_in_place_lora_reaches_the_step_caching_graph_and_sibling_pipelines(
    tiny_sd, sd_deep_cache, loras, load, tmp_path
):
    from aotdiffusion import AOTStableDiffusionImg2ImgPipeline

    style, _ = loras
    fused = tmp_path / "fused"  # the export path (validated in its own tests) as the reference
    AOTStableDiffusionPipeline.export(tiny_sd, fused, reuse_compiled=sd_deep_cache, lora=[f"{style}:0.6"],
                                      validate=False)  # fmt: skip
    reference = load(fused)
    pipe = load(sd_deep_cache)
    sibling = pipe.sibling(AOTStableDiffusionImg2ImgPipeline)
    pipe.load_lora_weights(style, adapter_name="style")
    pipe.set_adapters("style", 0.6)  # what export --lora does (export/lora.py)
    pipe.fuse_lora()
    for interval in (1, 2):  # 2: every other step runs the shallow graph
        np.testing.assert_allclose(
            run_pipe(pipe, cache_interval=interval), run_pipe(reference, cache_interval=interval), atol=1e-4
        )
    # A sibling shares the compiled parts, so it runs (and reports) the same adapters.
    assert sibling.unet is pipe.unet and sibling.get_list_adapters() == {"unet": ["style"], "text_encoder": ["style"]}


def test_in_place_lora_errors_say_what_to_do_instead(tiny_sd, sd_int8, sd_fp32, loras, load, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    style, _ = loras
    with pytest.raises(ValueError, match="int8.*no refit program.*export --model MODEL .*--lora"):
        load(sd_int8).load_lora_weights(style)  # int8 scales come from calibration: no in-place change
    pipe = load(sd_fp32)
    with pytest.raises(ValueError, match="cannot move"):
        pipe.set_lora_device(["style"], "cuda")
    # A DoRA needs the base weights' norms: refused, and taken out again (the pipeline is as before).
    eager = StableDiffusionPipeline.from_pretrained(tiny_sd)
    eager.unet.add_adapter(LoraConfig(r=4, use_dora=True, init_lora_weights=False, target_modules=["to_q"]))
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "dora", unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(eager.unet))
    )
    base = run_pipe(pipe)
    with pytest.raises(ValueError, match="DoRA.*--lora"):
        pipe.load_lora_weights(tmp_path / "dora", adapter_name="dora")
    assert not any(pipe.get_list_adapters().values())  # no adapter left behind
    np.testing.assert_array_equal(run_pipe(pipe), base)
