"""--conv-algorithm: 3x3 convolutions as Winograd F(2x2,3x3) / F(4x4,3x3), timed against oneDNN per shape."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import BF16_ATOL, BF16_MIN_PSNR, every_conv_timed, psnr, run_pipe

from aotdiffusion import artifact
from aotdiffusion.export import winograd

# Largest error over the output's range, in fp32: F(2x2,3x3)'s transforms are exact in binary (0, +-1, 1/2), as
# good as a direct convolution (about 2e-6 at 320 channels); F(4x4,3x3)'s coefficients (up to 8, down to 1/24)
# cost about one decimal digit (measured 3e-6 to 1.2e-5 on SD's shapes). fp32 validation allows 1e-3.
ROUNDING = {2: 2e-6, 4: 3e-5}


@pytest.mark.parametrize("tile", winograd.TILES)
@pytest.mark.parametrize(
    ("n", "c", "k", "h", "w", "bias"),
    [(2, 8, 5, 16, 16, True), (1, 3, 7, 7, 10, False), (1, 16, 16, 1, 1, True), (3, 4, 4, 9, 5, True)],
)
def test_conv3x3_is_the_convolution(tile, n, c, k, h, w, bias):
    """Any size (not a multiple of the tile included), with and without bias, channels-last or not: the same
    function as F.conv2d up to fp32 rounding."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=gen)
    weight = torch.randn(k, c, 3, 3, generator=gen)
    b = torch.randn(k, generator=gen) if bias else None
    reference = F.conv2d(x.double(), weight.double(), None if b is None else b.double(), padding=1)
    for layout in (torch.contiguous_format, torch.channels_last):
        y = winograd.conv3x3(x.contiguous(memory_format=layout), weight, b, tile)
        assert y.shape == reference.shape and y.dtype == torch.float32
        error = (y.double() - reference).abs().max() / reference.abs().max()
        assert error < ROUNDING[tile], (tile, layout, float(error))


@pytest.mark.parametrize(("n", "c", "k", "h", "w"), [(2, 64, 48, 16, 16), (1, 32, 40, 9, 14)])
def test_conv3x3_in_bf16_rounds_about_as_a_direct_bf16_convolution(n, c, k, h, w):
    """bf16 runs F(2x2,3x3) only: its error over the output's range stays within 3x a direct bf16 convolution's
    on the same bf16 inputs (measured 2x on SD 1.5's shapes), and the output keeps the input's type."""
    assert winograd.TILES_BY_DTYPE[torch.bfloat16] == (2,)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=gen).bfloat16().contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(k, c, 3, 3, generator=gen) / (c * 9) ** 0.5).bfloat16()
    bias = torch.randn(k, generator=gen).bfloat16()
    reference = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    scale = reference.abs().max()
    direct = (F.conv2d(x, weight, bias, padding=1).double() - reference).abs().max() / scale
    y = winograd.conv3x3(x, weight, bias, 2)
    assert y.dtype == torch.bfloat16 and y.shape == reference.shape
    error = (y.double() - reference).abs().max() / scale
    assert error < 3 * direct, (float(error), float(direct))


def test_only_dense_same_padded_3x3_convolutions_are_eligible():
    assert winograd.eligible((8, 4, 3, 3), (1, 1), (1, 1), (1, 1), 1)
    assert not winograd.eligible((8, 4, 3, 3), (2, 2), (1, 1), (1, 1), 1)  # a downsampler
    assert not winograd.eligible((8, 4, 1, 1), (1, 1), (0, 0), (1, 1), 1)  # 1x1 shortcut
    assert not winograd.eligible((8, 4, 3, 3), (1, 1), (0, 0), (1, 1), 1)
    assert not winograd.eligible((8, 4, 3, 3), (1, 1), (2, 2), (2, 2), 1)
    assert not winograd.eligible((8, 2, 3, 3), (1, 1), (1, 1), (1, 1), 2)


def _manifest(folder, component):
    return json.loads((folder / component / artifact.CONFIG_FILE).read_text())[artifact.MANIFEST_KEY]


def _generated_code(folder, component) -> str:
    return "".join(p.read_text() for p in (folder / component / "compiled").rglob("*.cpp"))


def _direct_convolutions(code: str) -> int:
    """Direct convolution calls in generated code: oneDNN's fused kernel, or aten's where freezing left the
    convolution unfused (bf16 on a CPU without bf16 instructions, e.g. an AVX2-only AMD EPYC Zen 3)."""
    return code.count("mkldnn__convolution_pointwise") + code.count("aoti_torch_cpu_convolution(")


def test_winograd_export_runs_winograd_and_matches_eager(sd_winograd, sd_fp32, eager_sd, load):
    unet = _manifest(sd_winograd, "unet")
    choice = unet["conv_algorithm_choice"]
    assert choice["used"] == "winograd"
    timed = {s["key"]: s for s in choice["shapes"]}
    assert timed and all(s["chosen"] in ("winograd2", "winograd4") for s in timed.values())
    assert all(set(s["ms"]) == {"direct", "winograd2", "winograd4"} for s in timed.values())
    # The forced choice is the faster tile of each shape (F(2x2) where they tie), and what the compiler options record.
    for s in timed.values():
        f2, f4 = s["ms"]["winograd2"], s["ms"]["winograd4"]
        assert s["chosen"] == ("winograd2" if f2 <= min(f2, f4) * (1 + winograd.TIE) else "winograd4"), s
    assert unet["compiler"]["winograd"] == {k: int(s["chosen"][-1]) for k, s in timed.items()}
    assert unet["validation"]["max_rel_error"] < 1e-3
    # The products are batched matrix multiplications; fewer direct convolutions are left than in the direct export.
    code, direct_code = _generated_code(sd_winograd, "unet"), _generated_code(sd_fp32, "unet")
    assert "bmm" in code and "bmm" not in direct_code
    assert _direct_convolutions(code) < _direct_convolutions(direct_code)
    # The pipeline's images: the same as eager fp32 up to Winograd's rounding.
    images, reference = run_pipe(load(sd_winograd)), run_pipe(eager_sd)
    assert abs(images - reference).max() < 1e-3


def test_bf16_winograd_export_runs_f2_and_matches_eager(sd_bf16_winograd, sd_bf16_cli, eager_sd, load):
    """With every op in bf16 the convolutions are timed (and compiled) in bf16, as F(2x2,3x3) only; the export
    validates and its images stay within the bf16 tolerance of eager fp32."""
    unet = _manifest(sd_bf16_winograd, "unet")
    choice = unet["conv_algorithm_choice"]
    assert choice["used"] == "winograd" and choice["dtype"] == "bf16"
    timed = {s["key"]: s for s in choice["shapes"]}
    assert timed and all(set(s["ms"]) == {"direct", "winograd2"} and s["chosen"] == "winograd2" for s in timed.values())
    assert unet["compiler"]["winograd"] == dict.fromkeys(timed, 2)
    assert unet["compiler"]["auto_cast"] == "all" and unet["validation"]["max_rel_error"] < 6e-2
    code, direct_code = _generated_code(sd_bf16_winograd, "unet"), _generated_code(sd_bf16_cli[0], "unet")
    assert "bmm" in code
    assert _direct_convolutions(code) < _direct_convolutions(direct_code)
    images, reference = run_pipe(load(sd_bf16_winograd)), run_pipe(eager_sd)
    assert abs(images - reference).max() < BF16_ATOL and psnr(images, reference) > BF16_MIN_PSNR


def test_auto_keeps_the_faster_algorithm_per_shape(tiny_sd, sd_winograd):
    """auto compiles, per shape, what this machine timed fastest (the timings sd_winograd measured are reused:
    the same shapes on the same machine), and direct records no choice at all."""
    from diffusers import StableDiffusionPipeline

    from aotdiffusion.export.choose_precision import dominant_ops
    from aotdiffusion.export.pipeline import component_specs, default_shapes
    from aotdiffusion.export.precision import Precision

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    specs = component_specs(pipe, default_shapes(pipe, height=64, width=64), Precision("none"), vae_encoder=False)
    unet = next(s for s in specs if s.role == "unet")
    with every_conv_timed():
        auto = winograd.choose(dominant_ops(unet)[0], "cpu", reuse=True)
    assert auto.remembered
    for shape in auto.shapes:  # the fastest, or the lightest of those that tie with it
        ms = shape["ms"]
        assert ms[shape["chosen"]] <= min(ms.values()) * (1 + winograd.TIE)
        lighter = [name for name in ms if winograd.WEIGHT_VALUES[name] < winograd.WEIGHT_VALUES[shape["chosen"]]]
        assert all(ms[name] > min(ms.values()) * (1 + winograd.TIE) for name in lighter)
    assert auto.tiles() == {s["key"]: int(s["chosen"][-1]) for s in auto.shapes if s["chosen"] != "direct"}
    forced = _manifest(sd_winograd, "unet")["conv_algorithm_choice"]["shapes"]
    assert [s["ms"] for s in auto.shapes] == [s["ms"] for s in forced]


def test_a_tie_goes_to_the_smaller_weights():
    # Measured on the AMD EPYC Zen 3 for SD 1.5's 640-channel 64x64 convolution: F(4x4) stores 2.25x F(2x2)'s
    # weights for 0.3% of time, a gap that can flip from one export to the next.
    assert winograd.lightest_of_the_fastest({"direct": 320.5, "winograd2": 183.9, "winograd4": 183.3}) == "winograd2"
    assert winograd.lightest_of_the_fastest({"direct": 100.0, "winograd2": 97.0, "winograd4": 60.0}) == "winograd4"
    assert winograd.lightest_of_the_fastest({"direct": 100.0, "winograd2": 96.0, "winograd4": 99.0}) == "direct"
    assert winograd.lightest_of_the_fastest({"direct": 100.0, "winograd2": 94.0, "winograd4": 99.0}) == "winograd2"
    # --conv-algorithm winograd never keeps direct, and a tie between the tiles still goes to the smaller one.
    ms = {"direct": 50.0, "winograd2": 96.0, "winograd4": 92.0}
    assert winograd.lightest_of_the_fastest(ms, force=True) == "winograd2"


def test_direct_and_non_fp32_compile_no_winograd(sd_fp32, sd_bf16_cli):
    for folder in (sd_fp32, sd_bf16_cli[0]):
        manifest = _manifest(folder, "unet")
        assert "conv_algorithm_choice" not in manifest  # the tiny convolutions are below what is worth timing
        assert "winograd" not in manifest["compiler"]


def test_bad_conv_algorithm_is_a_clear_error():
    from aotdiffusion.export.compile import CompilerOptions

    with pytest.raises(ValueError, match=r"`conv_algorithm` must be one of .*'winograd'.*got 'fft'"):
        CompilerOptions(conv_algorithm="fft")
    with pytest.raises(ValueError, match="cannot compile for cuda"):
        CompilerOptions(conv_algorithm="winograd", device="cuda")
