"""``--fp32-linear``: fp32 linears through oneDNN's prepacked kernel or MKL's sgemm, measured per component."""

from __future__ import annotations

import pytest
import torch

from aotdiffusion import artifact
from aotdiffusion.export.choose_precision import choose_fp32_linear
from aotdiffusion.export.compile import CompilerOptions, compile_component
from aotdiffusion.export.precision import Precision
from aotdiffusion.export.validate import validate_component
from aotdiffusion.runtime.compiled import CompiledComponent


@pytest.fixture(scope="module")
def text_encoder(eager_sd):
    from aotdiffusion.export.pipeline import component_specs, default_shapes

    specs = component_specs(eager_sd, default_shapes(eager_sd, height=64, width=64), Precision("none"))
    return next(spec for spec in specs if spec.role == "text_encoder")


@pytest.mark.parametrize("kernel", ["onednn", "mkl"])
def test_fp32_linears_run_the_kernel_asked_for_and_match_eager(text_encoder, kernel, tmp_path):
    options = CompilerOptions(Precision("none"), fp32_linear=kernel)
    manifest = compile_component(text_encoder, options, tmp_path)
    code = artifact.generated_code(tmp_path)
    packed = code.count("aoti_torch_cpu__linear_pointwise")  # oneDNN, prepacked
    if kernel == "onednn":
        assert packed > 0
    else:  # left unpacked: aten mm/addmm, which is MKL's sgemm in torch's x86 CPU build
        assert packed == 0 and ("aoti_torch_cpu_addmm_out" in code or "aoti_torch_cpu_mm_out" in code)
        assert manifest["compiler"]["fp32_linear"] == "mkl"
    assert torch._C.has_mkl  # the switch is undone after the compile
    report = validate_component(text_encoder, CompiledComponent(tmp_path), options.precision)
    assert report.passed and report.max_rel_error < 1e-4


def test_auto_times_both_kernels_on_the_component_linears(text_encoder):
    choice = choose_fp32_linear(text_encoder, "cpu")
    assert choice is not None and choice.kernel in ("onednn", "mkl")
    assert choice.seconds["onednn"] > 0 and choice.seconds["mkl"] > 0 and choice.shapes_timed >= 1
    assert choice.kernel == min(choice.seconds, key=choice.seconds.get)
    assert "fp32 linears: onednn" in choice.describe()


def test_fp32_linear_must_be_a_known_kernel():
    with pytest.raises(ValueError, match="`fp32_linear` must be one of"):
        CompilerOptions(fp32_linear="openblas")
