"""Several image sizes in one export (--extra-sizes, export/sizes.py): one graph per size, one copy of the weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import built_once, cli, run_pipe
from PIL import Image
from test_lora import _tiny_lora
from test_refit import eager_b, tiny_sd_b  # noqa: F401 - fixtures

from aotdiffusion import AOTStableDiffusionPipeline, artifact
from aotdiffusion.export import refit
from aotdiffusion.export.sizes import check_sizes, parse_sizes
from aotdiffusion.runtime.compiled import CompiledComponent
from aotdiffusion.shapes import PipelineShapes

FP32_ATOL = 1e-4  # as test_pipeline's: the compiled fp32 graph only reassociates sums
EXTRA = (96, 64)
SIZED = ("unet", "vae_encoder", "vae_decoder")


@pytest.fixture(scope="session")
@built_once
def sd_sizes(tiny_sd, sd_fp32, tmp_path_factory):
    """fp32 at 64x64 (the compile cache holds sd_fp32's graphs of it) and 96x64."""
    out = tmp_path_factory.mktemp("exports") / "sd-sizes"
    AOTStableDiffusionPipeline.export(tiny_sd, out, height=64, width=64, extra_sizes="96x64", auto_cast="none")
    return out


def _eager(tiny_sd):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_each_size_matches_eager_and_the_main_size_is_the_single_size_export(
    sd_sizes, sd_fp32, tiny_sd, eager_sd, load
):
    pipe = load(sd_sizes)
    assert pipe.compiled_sizes == [(64, 64), EXTRA]
    np.testing.assert_array_equal(run_pipe(pipe), run_pipe(load(sd_fp32)))
    actual, expected = run_pipe(pipe, height=96, width=64), run_pipe(eager_sd, height=96, width=64)
    assert actual.shape == expected.shape == (1, 96, 64, 3)
    np.testing.assert_allclose(actual, expected, atol=FP32_ATOL, rtol=0)
    # Back to the main size after a call at the other: each call picks its graph.
    np.testing.assert_array_equal(run_pipe(pipe, height=64, width=64), run_pipe(load(sd_fp32)))
    # img2img at the extra size runs the extra VAE encoder too.
    from diffusers import StableDiffusionImg2ImgPipeline

    from aotdiffusion import AOTStableDiffusionImg2ImgPipeline

    image = Image.fromarray((np.random.default_rng(0).random((96, 64, 3)) * 255).astype(np.uint8))
    edit = pipe.sibling(AOTStableDiffusionImg2ImgPipeline)
    eager_edit = StableDiffusionImg2ImgPipeline(**eager_sd.components)
    eager_edit.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(run_pipe(edit, image=image), run_pipe(eager_edit, image=image), atol=FP32_ATOL, rtol=0)


def test_a_size_not_compiled_is_refused_listing_every_compiled_size(sd_sizes, load):
    pipe = load(sd_sizes)
    with pytest.raises(ValueError, match=r"compiled for 64x64, 96x64 images .* height=128, width=64.*--extra-sizes"):
        pipe("a cat", num_inference_steps=2, height=128, width=64)
    with pytest.raises(ValueError, match=r"compiled for 64x64, 96x64 images"):
        pipe("a cat", num_inference_steps=2, width=96)  # 64 high, 96 wide is not 96 high, 64 wide


def test_the_weights_are_stored_once_on_disk_and_in_memory(sd_sizes, sd_fp32):
    for name in SIZED:
        main, extra = sd_sizes / name, sd_sizes / name / "sizes" / "96x64"
        weights = artifact.read_component(extra)[1]["weights"]
        assert weights["storage"] == "shared" and weights["shared"], name
        assert artifact.weights_file(extra) is None, name  # no second blob
        blob = (main / artifact.weights_file(main)).stat().st_size
        assert weights["shared_bytes"] > 0.9 * blob and weights["own_bytes"] < 0.1 * blob, (name, weights)
        component = CompiledComponent(main)
        graph = component.graphs[EXTRA]
        theirs, mine = component.constants(), graph.constants()
        for own, source in weights["shared"].items():  # the very tensors: one copy in memory
            assert _address(mine[own]) == _address(theirs[source]), (name, own)
    # The text encoder does not depend on the image size: one graph.
    assert CompiledComponent(sd_sizes / "text_encoder").sizes == []
    index = artifact.read_pipeline_index(sd_sizes)[1]
    assert index["sizes"] == [[64, 64], [96, 64]] and index["shapes"]["height"] == 64


def _address(tensor: torch.Tensor) -> int:
    return torch.ops.mkldnn.data_ptr(tensor) if tensor.is_mkldnn else tensor.data_ptr()


def test_constants_rebuilt_from_their_bytes_run_as_the_compiled_ones(sd_fp32):
    """An extra size's constants that differ from the main size's are kept as bytes and rebuilt at load (oneDNN
    ones by their folding on zeros, then their bytes copied in): rebuilt for every UNet constant here."""
    unet = CompiledComponent(sd_fp32 / "unet")
    inputs = {name: torch.randn(spec["shape"], generator=torch.Generator().manual_seed(3)) for name, spec in
              [(s["name"], s) for s in unet.inputs]}  # fmt: skip
    inputs["timestep"] = torch.full(unet.input_shape("timestep"), 500.0)
    expected = unet(**dict(inputs))["sample"]
    program, fixed = refit.read_program(sd_fp32 / "unet" / artifact.PACKAGE_DIR)
    stored = {e["name"]: torch.frombuffer(bytearray(unet.read_constant(e)), dtype=torch.uint8) if e["nbytes"] else
              torch.empty(0, dtype=torch.uint8) for e in program["constants"]}  # fmt: skip
    rebuilt = refit.constants_from_bytes(program, fixed, stored)
    assert any(t.is_mkldnn for t in rebuilt.values())  # the oneDNN path is what this covers
    unet.update_constants({name: t.clone() if not t.is_mkldnn else t for name, t in rebuilt.items()})
    torch.testing.assert_close(unet(**dict(inputs))["sample"], expected, rtol=0, atol=0)


def test_lora_on_a_loaded_pipeline_changes_every_size(sd_sizes, tiny_sd, load, tmp_path):
    lora = _tiny_lora(tiny_sd, tmp_path / "style", seed=1)
    pipe, eager = load(sd_sizes), _eager(tiny_sd)
    for p in (pipe, eager):
        p.load_lora_weights(lora, adapter_name="style")
    for size in ((64, 64), EXTRA):
        images = run_pipe(pipe, height=size[0], width=size[1])
        assert np.abs(images - run_pipe(eager, height=size[0], width=size[1])).max() < 1e-3, size


def test_new_weights_reuse_every_size(sd_sizes, tiny_sd_b, eager_b, load, tmp_path):  # noqa: F811
    out = tmp_path / "b"
    AOTStableDiffusionPipeline.export(tiny_sd_b, out, reuse_compiled=sd_sizes)
    pipe = load(out)
    for size in ((64, 64), EXTRA):
        images = run_pipe(pipe, height=size[0], width=size[1])
        assert np.abs(images - run_pipe(eager_b, height=size[0], width=size[1])).max() < 1e-3, size
    weights = artifact.read_component(out / "unet" / "sizes" / "96x64")[1]["weights"]
    assert weights["storage"] == "shared" and artifact.weights_file(out / "unet" / "sizes" / "96x64") is None


def test_generate_takes_height_and_width(sd_sizes, tmp_path):
    result = cli("generate", str(sd_sizes), "a cat", "--steps", "2", "--height", "96", "--width", "64",
                 "--output", str(tmp_path))  # fmt: skip
    images = sorted(tmp_path.glob("*.png"))
    assert len(images) == 1 and Image.open(images[0]).size == (64, 96), result.stdout


def test_extra_sizes_are_checked_before_anything_compiles():
    assert parse_sizes("768x512, 512X768") == [(768, 512), (512, 768)]
    with pytest.raises(ValueError, match=r"HEIGHTxWIDTH.*'768'"):
        parse_sizes("768")
    shapes = PipelineShapes(height=512, width=512)
    with pytest.raises(ValueError, match=r"`height` has to be divisible by 64.*--height 704 or --height 768"):
        check_sizes(shapes, "740x512", 8, 8)
    with pytest.raises(ValueError, match=r"512x512 is given twice"):
        check_sizes(shapes, [(512, 512)], 8, 8)
    with pytest.raises(ValueError, match=r"768x512 is given twice"):
        check_sizes(shapes, "768x512,768x512", 8, 8)
    assert check_sizes(shapes, "768x512", 8, 8) == [(768, 512)]


def test_the_server_serves_every_size_from_one_pipeline(sd_sizes):
    import httpx
    from serving import LiveServer, decode

    from aotdiffusion.serve import create_app

    app = create_app([f"sd={sd_sizes}"], max_wait_ms=50)
    with LiveServer(app) as url, httpx.Client(base_url=url, timeout=120) as api:
        card = api.get("/v1/models").json()["data"][0]
        assert card["sizes"] == ["64x64", "64x96"]  # WIDTHxHEIGHT, as the OpenAI API writes sizes
        for size, shape in (("64x96", (96, 64, 3)), ("64x64", (64, 64, 3))):
            body = {"model": "sd", "prompt": "a red fox", "num_inference_steps": 2, "size": size}
            response = api.post("/v1/images/generations", json=body)
            assert response.status_code == 200, response.text
            assert decode(response.json()["data"][0]["b64_json"]).shape == shape
        exports = app.state.registry.models["sd"].exports
        assert exports["64x96"].runner is exports["64x64"].runner  # one pipeline loaded, not one per size
