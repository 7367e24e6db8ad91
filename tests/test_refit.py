"""New weights into compiled code without compiling (--reuse-compiled, export/refit.py, export/reuse.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import cli, run_pipe

from aotdiffusion import AOTStableDiffusionPipeline, artifact, checksums
from aotdiffusion.export import refit


@pytest.fixture(scope="module")
def tiny_sd_b(tiny_sd, tmp_path_factory):
    """A fine-tune of the tiny model: every weight moved (same architecture), saved as diffusers does."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for model in (pipe.text_encoder, pipe.unet, pipe.vae):
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    folder = tmp_path_factory.mktemp("models") / "tiny-sd-b"
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def eager_b(tiny_sd_b):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_b)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _blob(folder, component):
    return (folder / component / artifact.weights_file(folder / component)).read_bytes()


def _manifest(folder, component):
    return json.loads((folder / component / artifact.CONFIG_FILE).read_text())[artifact.MANIFEST_KEY]


def test_every_float_export_records_a_verified_refit_program(sd_fp32, sd_winograd, sd_deep_cache, sd_bf16_winograd):
    for folder in (sd_fp32, sd_winograd, sd_deep_cache, sd_bf16_winograd):
        for component in artifact.read_pipeline_index(folder)[1]["components"]:
            record = _manifest(folder, component)["refit"]
            assert record["available"], (folder.name, component, record)
            assert record["constants"] == record.get("computed", 0) + record.get("weight", 0) + record.get("fixed", 0)
            assert record["computed"] > 0  # oneDNN's prepacked weights (and Winograd's) are computed, not copied
    # Winograd's transform matrices are constants the traced code made: kept with the program, not weights.
    program, fixed = refit.read_program(sd_winograd / "unet" / artifact.PACKAGE_DIR)
    assert fixed and all(not name.startswith("module.") for name in fixed)
    assert any(node["target"] == "mkldnn._reorder_convolution_weight" for graph in program["folded"].values()
               for node in graph["nodes"])  # fmt: skip


def test_reusing_the_same_weights_writes_the_same_blob(tiny_sd, sd_deep_cache, tmp_path):
    """Replaying the recorded folding on the export's own weights reproduces every constant byte for byte,
    both UNet graphs of step caching included."""
    out = tmp_path / "same"
    results = AOTStableDiffusionPipeline.export(tiny_sd, out, reuse_compiled=sd_deep_cache, validate=False)
    assert [r.name for r in results] == artifact.read_pipeline_index(sd_deep_cache)[1]["components"]
    for component in ("text_encoder", "unet", "unet_deep_cache", "vae_decoder"):
        assert _blob(out, component) == _blob(sd_deep_cache, component), component
        assert _manifest(out, component)["compile_cache"] == "not compiled: code reused"


def test_new_weights_without_compiling_match_eager(tiny_sd_b, eager_b, sd_fp32, load, tmp_path):
    out = tmp_path / "b"
    results = AOTStableDiffusionPipeline.export(tiny_sd_b, out, reuse_compiled=sd_fp32)
    for result in results:  # validated against eager on the new weights, as an export is
        assert result.validation is not None and result.validation.max_rel_error < 1e-3, result
    images, reference, old = run_pipe(load(out)), run_pipe(eager_b), run_pipe(load(sd_fp32))
    assert np.abs(images - reference).max() < 1e-3
    assert np.abs(old - reference).max() > 0.05  # the new weights, not the old ones, are what ran
    index = artifact.read_pipeline_index(out)[1]
    assert index["source"] == str(tiny_sd_b) and index["code_from"]["export"] == str(sd_fp32.resolve())
    assert index["exported_on"] == artifact.read_pipeline_index(sd_fp32)[1]["exported_on"]
    # The new blob is recorded and checked like any export's files.
    unet = out / "unet"
    blob = unet / artifact.weights_file(unet)
    assert _manifest(out, "unet")["files"][str(artifact.weights_file(unet))]["sha256"] == checksums.sha256_file(blob)


def test_a_bf16_export_takes_new_weights_too(tiny_sd, tiny_sd_b, eager_b, sd_bf16_cli, load, tmp_path):
    """bf16 matmuls (AMX's fast type, so auto's pick there): the compile read bf16 copies of the weights, and the
    refit program casts new weights the same way: the export's own weights give its blob byte for byte, new
    ones pass validation at bf16's tolerance and are what runs."""
    from aotdiffusion.export.precision import RELATIVE_TOLERANCE

    bf16 = sd_bf16_cli[0]
    for component in artifact.read_pipeline_index(bf16)[1]["components"]:
        record = _manifest(bf16, component)["refit"]
        assert record["available"] and record["weight"] > 0, (component, record)  # bf16 weights read as they are
    same = tmp_path / "same"
    AOTStableDiffusionPipeline.export(tiny_sd, same, reuse_compiled=bf16, validate=False)
    for component in ("text_encoder", "unet", "vae_decoder"):
        assert _blob(same, component) == _blob(bf16, component), component
    out = tmp_path / "b"
    for result in AOTStableDiffusionPipeline.export(tiny_sd_b, out, reuse_compiled=bf16):
        assert result.validation.max_rel_error < RELATIVE_TOLERANCE[torch.bfloat16], result
    images, reference, old = run_pipe(load(out)), run_pipe(eager_b), run_pipe(load(bf16))
    assert np.abs(images - reference).max() < np.abs(old - reference).max()


def test_reuse_through_the_cli_with_winograd(tiny_sd_b, eager_b, sd_winograd, load, tmp_path):
    out = tmp_path / "b-winograd"
    result = cli("export", "--model", str(tiny_sd_b), "--reuse-compiled", str(sd_winograd), "--disable-validation",
                 str(out))  # fmt: skip
    assert "no compiling" in result.stdout and "compiling (" not in result.stdout
    assert np.abs(run_pipe(load(out)) - run_pipe(eager_b)).max() < 1e-3
    assert _manifest(out, "unet")["compiler"]["winograd"] == _manifest(sd_winograd, "unet")["compiler"]["winograd"]


def test_another_architecture_is_refused_naming_the_first_tensor(tiny_sd, sd_fp32, tmp_path):
    from diffusers import UNet2DConditionModel

    other = tmp_path / "wider"
    shutil.copytree(tiny_sd, other)
    config = json.loads((other / "unet" / "config.json").read_text())
    config["block_out_channels"] = [64, 64]
    UNet2DConditionModel.from_config(config).save_pretrained(other / "unet")
    with pytest.raises(refit.RefitError, match=r"`module\.unet\.conv_in\.weight`: shape \(64, 4, 3, 3\), float32, "
                       r"compiled with shape \(32, 4, 3, 3\)"):  # fmt: skip
        AOTStableDiffusionPipeline.export(other, tmp_path / "out", reuse_compiled=sd_fp32, validate=False)
    assert not (tmp_path / "out").exists()


def test_what_reuse_cannot_do_is_a_clear_error(tiny_sd_b, sd_fp32, sd_int8, tmp_path):
    with pytest.raises(ValueError, match=r"\['height'\] cannot be set with it"):
        AOTStableDiffusionPipeline.export(tiny_sd_b, tmp_path / "x", reuse_compiled=sd_fp32, height=128)
    result = cli("export", "--model", str(tiny_sd_b), "--reuse-compiled", str(sd_fp32), "--height", "128",
                 str(tmp_path / "y"), check=False)  # fmt: skip
    assert result.returncode == 2 and "--height cannot be set with it" in result.stderr
    with pytest.raises(refit.RefitError, match="int8 weights and scales come from calibrating"):
        AOTStableDiffusionPipeline.export(tiny_sd_b, tmp_path / "z", reuse_compiled=sd_int8)
    assert not any(tmp_path.iterdir())


def test_a_refit_program_can_only_name_torch_operators():
    assert refit._operator("aten.permute.default") is torch.ops.aten.permute.default
    for name in ("os.system", "builtins.eval", "torch.load"):
        with pytest.raises(refit.RefitError, match="outside torch.ops"):
            refit._operator(name)
    with pytest.raises(refit.RefitError, match="which torch does not have"):
        refit._decode({"dtype": "load"}, {})
