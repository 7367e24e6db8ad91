"""``--quantize int8``: the UNet graphs in oneDNN's int8 kernels, kept only where timing says they pay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import psnr, run_pipe

from aotdiffusion import AOTStableDiffusionPipeline
from aotdiffusion.export import pipeline as export_pipeline_module
from aotdiffusion.export.choose_precision import INT8, Op, _flops, _runner, _seconds, choose
from aotdiffusion.export.compile import CompilerOptions
from aotdiffusion.export.deep_cache import FEATURE
from aotdiffusion.export.precision import Precision
from aotdiffusion.export.quantize import INT8_TOLERANCE, int8_kernels
from aotdiffusion.runtime.compiled import _DTYPES, CompiledComponent, _Runner


def _manifest(folder: Path, name: str) -> dict:
    return json.loads((folder / name / "config.json").read_text())["aotdiffusion"]


def test_int8_export_calls_int8_kernels_in_both_unet_graphs(sd_int8):
    for name in ("unet", "unet_deep_cache"):
        manifest = _manifest(sd_int8, name)
        quantization = manifest["quantization"]
        # The generated code calls oneDNN's int8 convolutions and linears: no silent fp32 fallback (ao #4566).
        kernels = int8_kernels(sd_int8 / name)
        assert quantization["kernels"] == kernels
        assert any(k.startswith("qconv") for k in kernels) and any(k.startswith("qlinear") for k in kernels)
        assert quantization["activation_bits"] in (7, 8) and quantization["calibration_calls"] >= 2
        assert manifest["precision_choice"]["chosen"] == INT8 and INT8 in manifest["precision_choice"]["seconds"]
        validation = manifest["validation"]
        assert validation["passed"] and validation["tolerance"] == INT8_TOLERANCE
        assert 0 < validation["max_rel_error"] <= INT8_TOLERANCE
    for name in ("text_encoder", "vae_decoder"):  # only the UNet is quantized
        assert _manifest(sd_int8, name)["quantization"] is None
    index = json.loads((sd_int8 / "model_index.json").read_text())["aotdiffusion"]
    assert index["quantize"] == "int8" and index["precision"]["chosen"]["unet"] == INT8


def test_int8_pipeline_stays_near_eager_fp32_with_and_without_step_caching(sd_int8, eager_sd):
    pipe = AOTStableDiffusionPipeline.from_pretrained(sd_int8)
    reference = run_pipe(eager_sd)
    image = run_pipe(pipe)
    assert image.shape == reference.shape and float(image.std()) > 0.01
    # int8 changes the numbers, not the image: measured 35-40 dB on the tiny model (bf16 gives 25-40 dB).
    assert psnr(image, reference) > 25, psnr(image, reference)
    assert (run_pipe(pipe) == image).all()  # deterministic for a seed
    cached = run_pipe(pipe, cache_interval=2)
    assert cached.shape == image.shape and psnr(cached, image) > 10


def test_an_int8_graphs_constants_are_handed_on_by_their_internal_names(sd_int8):
    """Extra image sizes read the main graph's constants as it hands them on. An int8 graph has several constants
    under one original name (a quantized weight and what oneDNN packed from it), so a listing by original names,
    AOTInductor's own, loses some of them."""
    component = CompiledComponent(sd_int8 / "unet")
    fqns = component._runner._container.get_constant_names_to_original_fqns()
    assert len(set(fqns.values())) < len(fqns)  # the case in point: original names repeat
    constants = component.constants()
    assert set(constants) == set(fqns)
    other = _Runner(component.folder / component.manifest["graphs"][0]["file"], torch.device("cpu"))
    other.set_constants(constants)  # AOTInductor checks that a full update names every constant
    generator = torch.Generator().manual_seed(0)
    args = [torch.randn(spec["shape"], generator=generator).to(_DTYPES[spec["dtype"]]) for spec in component.inputs]
    for expected, actual in zip(component._runner(args), other(args), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_int8_candidate_is_timed_with_the_int8_kernels():
    conv = ((1, 64, 32, 32), (64, 64, 3, 3), (1, 1), (1, 1), (1, 1), 1)
    for kind, shapes in (("conv", conv), ("linear", ((256, 64), (64, 128)))):
        op = Op(kind, shapes, _flops(kind, shapes))
        with torch.no_grad():
            out = _runner(op, INT8, "cpu")()
            assert out.dtype == torch.float32  # int8 in, fp32 out: what the compiled graph's kernels return
            assert _seconds(_runner(op, INT8, "cpu"), "cpu") > 0
    attention = Op("attention", ((1, 2, 16, 8), (1, 2, 16, 8)), 0)
    assert _runner(attention, INT8, "cpu")().dtype == torch.float32  # attention stays fp32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, INT8])
def test_strided_and_unpadded_convolutions_are_timed_as_they_are(dtype):
    """A ViT's patch embedding (kernel = stride, no padding) and a strided downsampling convolution: the kernels timed
    compute the convolution asked for (oneDNN's float ops take padding before stride; swapped, stride 0 crashed the
    process with SIGFPE)."""
    for shapes in (((1, 3, 32, 32), (32, 3, 8, 8), (8, 8), (0, 0), (1, 1), 1),
                   ((1, 16, 16, 16), (16, 16, 3, 3), (2, 2), (1, 1), (1, 1), 1)):  # fmt: skip
        x_shape, w_shape, stride, padding, _, _ = shapes
        expected = F.conv2d(torch.zeros(x_shape), torch.zeros(w_shape), stride=stride, padding=padding).shape
        with torch.no_grad():
            assert _runner(Op("conv", shapes, _flops("conv", shapes)), dtype, "cpu")().shape == expected


def test_choose_times_int8_against_the_float_type_asked_for(eager_sd):
    from aotdiffusion.export.pipeline import component_specs, default_shapes

    shapes = default_shapes(eager_sd, height=64, width=64)
    unet = next(s for s in component_specs(eager_sd, shapes, Precision("none")) if s.role == "unet")
    choice = choose(unet, "cpu", int8=True, only="fp32")
    assert sorted(choice.ranked) == ["fp32", INT8] and all(choice.seconds[c] > 0 for c in choice.ranked)
    assert INT8 in choice.describe()


def _dry_export(eager_sd, tmp_path, ranking: list[str]) -> tuple[dict, list[str]]:
    """export_pipeline with a compile_fn that records each component's options instead of compiling."""
    from aotdiffusion.export.pipeline import default_shapes, export_pipeline

    compiled: dict[str, CompilerOptions] = {}
    calibration: dict[str, list] = {}

    def record(spec, options, folder):
        compiled[spec.name] = options
        calibration[spec.name] = list(spec.calibration)
        if options.quantize == INT8:  # what quantize_program returns: one output tuple per observed call
            spec.calibration_outputs = [(inputs["sample"], torch.zeros(1)) for inputs in spec.calibration[:-1]]
        folder.mkdir(parents=True)
        return {"files": {}, "timings": {"trace_s": 0.0, "compile_s": 0.0}}

    measured = export_pipeline_module.choose

    def ranked(spec, device, **kwargs):
        choice = measured(spec, device, **kwargs)
        choice.ranked = [c for c in ranking if c in choice.ranked]
        return choice

    lines: list[str] = []
    export_pipeline_module.choose = ranked
    try:
        export_pipeline(
            eager_sd, tmp_path / "out", default_shapes(eager_sd, height=64, width=64),
            CompilerOptions(Precision("none"), quantize="int8"), pipeline_class="AOTStableDiffusionPipeline",
            validate=False, deep_cache=True, log=lines.append, compile_fn=record,
        )  # fmt: skip
    finally:
        export_pipeline_module.choose = measured
    return {name: (options.quantize, calibration[name]) for name, options in compiled.items()}, lines


def test_int8_is_left_out_where_timing_says_it_does_not_pay(eager_sd, tmp_path):
    compiled, lines = _dry_export(eager_sd, tmp_path, ["fp32", INT8])
    assert {name: q for name, (q, _) in compiled.items()} == dict.fromkeys(compiled, "none")
    said = [line for line in lines if "int8 is not faster than fp32" in line]
    assert said and "unet: int8 is not faster than fp32 on this cpu: not quantized" in said[0]


def test_int8_quantizes_only_the_unet_graphs_calibrated_on_real_calls(eager_sd, tmp_path):
    compiled, lines = _dry_export(eager_sd, tmp_path, [INT8, "fp32"])
    quantized = {name for name, (q, _) in compiled.items() if q == INT8}
    assert quantized == {"unet", "unet_deep_cache"}
    calls = compiled["unet"][1]
    # The eager pipeline's own calls at the compiled shapes: guidance batch 2, one timestep per image.
    latent = 64 // eager_sd.vae_scale_factor
    assert len(calls) >= 4
    assert all(c["sample"].shape == (2, 4, latent, latent) and c["timestep"].shape == (2,) for c in calls)
    assert len({float(c["timestep"][0]) for c in calls}) > 1  # several points of the schedule
    shallow = compiled["unet_deep_cache"][1]
    assert len(shallow) == len(calls) - 1 and all(FEATURE in c for c in shallow)


def test_int8_is_refused_for_a_gpu_and_without_freezing():
    with pytest.raises(ValueError, match="int8 CPU kernels; it cannot compile for cuda"):
        CompilerOptions(Precision("none"), device="cuda", quantize="int8")
    with pytest.raises(ValueError, match="needs freezing"):
        CompilerOptions(quantize="int8", freezing=False)
    with pytest.raises(ValueError, match="must be one of"):
        CompilerOptions(quantize="int4")
