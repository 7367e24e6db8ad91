"""Fast checks of the pieces under the pipeline: shapes, precision policy, numeric guards, CLI flags."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from aotdiffusion.cli import _parser
from aotdiffusion.export.precision import (
    CastMatmuls,
    Precision,
    PrecisionWrapper,
    full_precision_matmuls,
    low_precision_weights,
)
from aotdiffusion.shapes import PipelineShapes


def test_shapes_derive_component_batches():
    shapes = PipelineShapes(batch_size=2, num_images_per_prompt=3)
    assert shapes.images == 6 and shapes.unet_batch == 12
    assert PipelineShapes(classifier_free_guidance=False).unet_batch == 1


def test_height_not_divisible_suggests_valid_sizes():
    with pytest.raises(ValueError, match=r"`height` has to be divisible by 64 .* but is 500\. Use --height 448 or "):
        PipelineShapes(height=500).check_divisible(vae_scale_factor=8, unet_downsampling=8)
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer, got 0"):
        PipelineShapes(batch_size=0)


def test_precision_rejects_unknown_values():
    with pytest.raises(ValueError, match=r"`auto_cast` must be one of \('auto', 'none', 'matmul', 'all'\), got 'fp8'"):
        Precision("fp8")
    with pytest.raises(ValueError, match="`auto_cast_type` must be one of"):
        Precision("matmul", "int8")
    assert Precision("none", "bf16").low_dtype == torch.float32


def test_auto_cast_auto_compiles_all_ops_first_then_matmuls_only():
    assert Precision().auto_cast == "auto"  # the default
    assert Precision("auto", "bf16").compiled_in() == [Precision("all", "bf16"), Precision("matmul", "bf16")]
    assert Precision("auto", "fp32").compiled_in() == [Precision("none", "fp32")]
    assert Precision("all", "fp16").compiled_in() == [Precision("all", "fp16")]  # an explicit scope is obeyed
    assert Precision("matmul", "bf16").compiled_in() == [Precision("matmul", "bf16")]
    with pytest.raises(ValueError, match="has no type until the export has measured one"):
        Precision().compiled_in()
    with pytest.raises(ValueError, match="names two scopes"):
        PrecisionWrapper(torch.nn.Identity(), Precision("auto", "bf16"))


class _ConvNormLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.norm = torch.nn.GroupNorm(2, 8)
        self.linear = torch.nn.Linear(8, 8)
        self.proj = torch.nn.Parameter(torch.ones(8, 8))

    def forward(self, x):
        h = torch.nn.functional.silu(self.norm(self.conv(x)))
        return (self.linear(h.mean((2, 3))) @ self.proj,)


def _dtypes_in_graph(module, x):
    program = torch.export.export(module, (x,), strict=False)
    seen = {}
    for node in program.graph.nodes:
        name = getattr(node.target, "__name__", "").split(".")[0]
        if node.op == "call_function" and node.args and hasattr(node.args[0], "meta") and "val" in node.args[0].meta:
            seen.setdefault(name, set()).add(node.args[0].meta["val"].dtype)
    return program, seen


def test_matmul_policy_casts_matmuls_and_keeps_the_rest_fp32():
    x = torch.randn(2, 4, 8, 8)
    program, seen = _dtypes_in_graph(PrecisionWrapper(_ConvNormLinear(), Precision("matmul", "bf16")).eval(), x)
    assert seen["conv2d"] == {torch.bfloat16} and seen["linear"] == {torch.bfloat16}
    assert seen["matmul"] == {torch.bfloat16}
    assert seen["group_norm"] == {torch.float32} and seen["silu"] == {torch.float32}
    assert full_precision_matmuls(program.graph, torch.bfloat16) == []
    assert program.module()(x)[0].dtype == torch.float32


def test_policy_check_finds_escaped_matmuls():
    program, _ = _dtypes_in_graph(_ConvNormLinear().eval(), torch.randn(2, 4, 8, 8))
    assert len(full_precision_matmuls(program.graph, torch.bfloat16)) == 3


def test_all_policy_keeps_an_fp32_interface_and_restores_weights():
    module = _ConvNormLinear().eval()
    original = module.conv.weight.clone()
    with low_precision_weights(module, Precision("all", "bf16")):
        assert module.conv.weight.dtype == module.norm.weight.dtype == torch.bfloat16
        assert PrecisionWrapper(module, Precision("all", "bf16"))(torch.randn(2, 4, 8, 8))[0].dtype == torch.float32
    assert module.conv.weight.dtype == torch.float32 and torch.equal(module.conv.weight, original)


_OFFLOAD_SCRIPT = """
import torch
from aotdiffusion.export.precision import Precision, low_precision_weights
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024  # MiB
torch.manual_seed(0)
module = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(32)])  # 512 MiB of fp32 weights
originals = {name: t.to(torch.float64) for name, t in module.state_dict().items()}  # 1 GiB, kept throughout
before = rss()
with low_precision_weights(module, Precision("all", "bf16"), offload=True):
    inside = rss()
    dtypes = {t.dtype for t in module.parameters()}
after = rss()  # the fp32 weights are back, mapped from the file: not read until used
try:
    with low_precision_weights(module, Precision("all", "bf16"), offload=True):
        raise KeyError("compile failed")
except KeyError:
    pass
state = module.state_dict()
same = all(t.dtype == torch.float32 and torch.equal(t.to(torch.float64), originals[n]) for n, t in state.items())
print(before - inside, before - after, dtypes == {torch.bfloat16}, same)
"""


def test_offloaded_fp32_weights_leave_memory_while_compiling_and_come_back_exactly():
    # compile_component holds the fp32 weights in a file while it compiles from the bf16 copies (full-size SD 1.5
    # UNet: 3.4 GB less at the export's peak); they must come back bit for bit, after a failed compile too.
    out = subprocess.run([sys.executable, "-c", _OFFLOAD_SCRIPT], capture_output=True, text=True, check=True)
    freed, still_freed, bf16_inside, restored = out.stdout.split()
    assert int(freed) > 200, out.stdout  # 512 MiB fp32 out, 256 MiB of bf16 copies in
    # Back as a mapping, not read: an export that validates and then releases the UNet never reads them again.
    assert int(still_freed) > 400, out.stdout
    assert bf16_inside == "True" and restored == "True", out.stdout


def test_matmul_policy_stores_only_matmul_weights_in_bf16():
    module = _ConvNormLinear().eval()
    with low_precision_weights(module, Precision("matmul", "bf16")):
        assert module.conv.weight.dtype == module.linear.bias.dtype == torch.bfloat16
        assert module.norm.weight.dtype == torch.float32
        program, _ = _dtypes_in_graph(
            PrecisionWrapper(module, Precision("matmul", "bf16")).eval(), torch.randn(1, 4, 8, 8)
        )
        # The exported program shares the module's parameters: compile before leaving the block.
        weights = {name: t.dtype for name, t in program.state_dict.items()}
        assert weights["module.conv.weight"] == torch.bfloat16 and weights["module.norm.weight"] == torch.float32
    assert module.conv.weight.dtype == torch.float32


def test_cast_mode_matches_eager_closely():
    torch.manual_seed(0)
    module, x = _ConvNormLinear().eval(), torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ref = module(x)[0]
        with CastMatmuls(torch.bfloat16):
            low = module(x)[0]
    assert 0 < (low - ref).abs().max() / ref.abs().max() < Precision("matmul", "bf16").tolerance


def test_nan_from_the_vae_is_an_error_not_a_black_image():
    from aotdiffusion.runtime.components import AOTAutoencoderKL

    class NaNDecoder:
        config = {"scaling_factor": 0.18215}
        manifest = {"precision": {"auto_cast": "all", "auto_cast_type": "fp16"}}

        def __call__(self, latent_sample):
            return {"sample": torch.full((1, 3, 8, 8), float("nan"))}

    with pytest.raises(FloatingPointError, match="NaN or infinite values.*black images.*bf16"):
        AOTAutoencoderKL(NaNDecoder()).decode(torch.zeros(1, 4, 4, 4))


def test_cli_accepts_both_flag_spellings():
    common = ["export", "--model", "m", "out"]
    dashed = _parser().parse_args(common + ["--batch-size", "2", "--num-images-per-prompt", "4", "--auto-cast", "all"])
    under = _parser().parse_args(common + ["--batch_size", "2", "--num_images_per_prompt", "4", "--auto_cast", "all"])
    assert vars(dashed) == vars(under)
    assert dashed.batch_size == 2 and dashed.num_images_per_prompt == 4 and dashed.auto_cast == "all"
    assert _parser().parse_args(common + ["--no-classifier-free-guidance"]).classifier_free_guidance is False


def test_tiny_offers_every_model_it_can_write():
    from aotdiffusion.random_models import FULL_SIZE_MODELS, TINY_MODELS

    tiny = next(a for a in _parser()._subparsers._group_actions[0].choices["tiny"]._actions if a.dest == "kind")
    assert set(tiny.choices) == set(TINY_MODELS) | set(FULL_SIZE_MODELS)


def test_export_offers_every_family():
    from aotdiffusion.cli import TASKS
    from aotdiffusion.pipelines.auto import FAMILIES, WITH_CONTROLNET

    # The ControlNet families are reached with --controlnet, not --task.
    assert set(TASKS) == {"auto", *FAMILIES} - set(WITH_CONTROLNET.values())


_FAULTS_SCRIPT = """
import resource, torch
from aotdiffusion.runtime.memory import keep_freed_memory
applied = keep_freed_memory()
x, w = torch.randn(8192, 320), torch.randn(2560, 320)
def call():  # the shape of SD 1.5's first GEGLU: an 84 MiB projection, its activation, their product
    a, b = torch.nn.functional.linear(x, w).chunk(2, dim=-1)
    return (a * torch.nn.functional.gelu(b)).sum()
call(), call()
faults = []
for _ in range(5):  # the fewest faults of a call: one-off lazy allocations (a BLAS scratch buffer) are not per call
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    call()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, min(faults))
"""


@pytest.mark.parametrize("setting", ["1", "0"])
def test_freed_buffers_stay_mapped_unless_switched_off(setting):
    # The same buffers allocated and freed on every call: glibc's default unmaps those over 32 MiB,
    # so each call page-faults on ~41k fresh pages again; with the switch on they stay mapped.
    env = {**os.environ, "AOTDIFFUSION_KEEP_FREED_MEMORY": setting}
    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], capture_output=True, text=True, env=env, check=True)
    applied, faults = out.stdout.split()
    if setting == "1":
        assert applied == "True" and int(faults) < 1000, out.stdout
    else:
        assert applied == "False" and int(faults) > 10000, out.stdout


_RETURNED_SCRIPT = """
import torch
from aotdiffusion.runtime.memory import freed_memory_returned, keep_freed_memory
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024  # MiB
pins = []
def churn():  # 1 GiB in 8 MiB tensors, written, then freed: what a compile's transient tensors do
    tensors = [torch.ones(2 * 2**20) for _ in range(128)]
    pins.append(bytearray(64 * 1024))  # a small live block above them: glibc alone gives none of them back
    del tensors
assert keep_freed_memory()
base = rss()
churn()
kept = rss()
with freed_memory_returned():
    trimmed = rss()
    churn()
exited = rss()
churn()
print(base, kept, trimmed, exited, rss())
"""


def test_freed_memory_is_returned_by_a_compile():
    # An export applies keep_freed_memory when it loads a component to validate it; compiling the next one must
    # still hand its transient gigabytes back (export/pipeline.py compiles inside freed_memory_returned), even the
    # blocks freed below a live one, which glibc's own trimming never reaches.
    out = subprocess.run([sys.executable, "-c", _RETURNED_SCRIPT], capture_output=True, text=True, check=True)
    base, kept, trimmed, exited, after = map(int, out.stdout.split())
    assert kept - base > 900, out.stdout  # kept by the heap
    assert trimmed - base < 100 and exited - base < 100, out.stdout  # trimmed on entry, returned on exit
    assert after - base > 900, out.stdout  # kept again after


class _Heavy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.proj = torch.nn.Linear(8, 16)

    def forward(self, x):
        h = self.conv(x).flatten(2).transpose(1, 2)  # (2, 64, 8)
        q = self.proj(h).view(2, 64, 2, 8).transpose(1, 2)  # (2, 2 heads, 64, 8)
        return (torch.nn.functional.scaled_dot_product_attention(q, q, q),)


def _heavy_spec():
    from aotdiffusion.export.components import ComponentSpec

    return ComponentSpec(
        name="heavy", role="unet", module=_Heavy().eval(), output_names=["out"], config={},
        make_inputs=lambda gen: {"x": torch.randn(2, 4, 8, 8, generator=gen)},
    )  # fmt: skip


def test_dominant_ops_are_recorded_with_their_flops_and_no_compute():
    from aotdiffusion.export.choose_precision import dominant_ops

    ops, total = dominant_ops(_heavy_spec())
    found = {op.kind: (op.shapes, op.flops, count) for op, count in ops}
    assert found["conv"] == (((2, 4, 8, 8), (8, 4, 3, 3), (1, 1), (1, 1), (1, 1), 1), 2 * 2 * 8 * 64 * 4 * 9, 1)
    assert found["linear"] == (((128, 8), (8, 16)), 2 * 128 * 8 * 16, 1)
    assert found["attention"][1] == 4 * 2 * 2 * 64 * 64 * 8
    assert total == sum(op.flops * count for op, count in ops)


def test_choice_ranks_every_candidate_by_measured_time():
    from aotdiffusion.export.choose_precision import choose

    choice = choose(_heavy_spec(), "cpu")
    assert sorted(choice.ranked) == ["bf16", "fp16", "fp32"] and choice.ranked == sorted(
        choice.seconds, key=choice.seconds.get
    )
    assert all(seconds > 0 for seconds in choice.seconds.values()) and 0 < choice.flop_share <= 1
    assert choice.describe().endswith(f"-> {choice.ranked[0]}")


def test_an_identical_export_reuses_the_measured_choice(tmp_path, monkeypatch):
    """Timing noise must not flip the choice of a repeated export (that would compile other code and miss
    the compile cache): the ranking measured for the same shapes on this machine is reused on request."""
    from aotdiffusion.export import choose_precision, measurements

    monkeypatch.setenv("AOTDIFFUSION_CACHE_DIR", str(tmp_path))
    spec = _heavy_spec()
    first = choose_precision.choose(spec, "cpu", reuse=True)
    assert not first.remembered and (tmp_path / measurements.FILE).is_file()
    timed = []
    monkeypatch.setattr(choose_precision, "_seconds", lambda *a: timed.append(1) or 1.0)
    again = choose_precision.choose(spec, "cpu", reuse=True)
    assert again.remembered and timed == [] and (again.ranked, again.seconds) == (first.ranked, first.seconds)
    assert again.describe().endswith("(measured by an earlier export on this machine; --no-cache measures again)")
    fresh = choose_precision.choose(spec, "cpu")  # reuse off (--no-cache): measured again
    assert not fresh.remembered and timed


def test_auto_type_is_the_default_and_needs_resolving():
    assert Precision().auto_cast_type == "auto" and Precision().is_auto and not Precision("none").is_auto
    with pytest.raises(ValueError, match="has no type until the export has measured one"):
        _ = Precision().low_dtype
    assert Precision().resolved("bf16").low_dtype == torch.bfloat16
    assert Precision("none").low_dtype == torch.float32


class _Doubles(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor):
        self.calls += 1
        return (x * 2,)


class _Compiled:
    """Stands for a loaded compiled component: what validation calls on it."""

    device = torch.device("cpu")
    folder = "compiled"

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": x * self.scale}


def test_validation_compares_with_the_eager_reference_computed_before_compiling():
    # The export runs eager before compiling, so validation holds the compiled component alone (full-size SD 1.5:
    # the fp32 UNet need not be in memory beside it); the eager module is not called again.
    from aotdiffusion.export.components import ComponentSpec
    from aotdiffusion.export.validate import ValidationError, eager_reference, validate_component

    module = _Doubles()
    spec = ComponentSpec("toy", "unet", module, lambda gen: {"x": torch.randn(3, generator=gen)}, ["out"], {})
    reference = eager_reference(spec)
    assert module.calls == 1 and torch.equal(reference.outputs[0], 2 * spec.example_inputs(1)["x"])
    precision = Precision("none", "fp32")
    assert validate_component(spec, _Compiled(2.0), precision, reference=reference).max_rel_error == 0.0
    with pytest.raises(ValidationError, match="toy does not match eager PyTorch"):
        validate_component(spec, _Compiled(2.5), precision, reference=reference)
    assert module.calls == 1


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def test_weights_blob_is_built_in_its_file_without_staying_in_memory(tmp_path):
    # codecache's own sequence (torch 2.13 AotCodeCompiler.compile): bytearray(size), a ctypes view memmoved into,
    # the view deleted, len() before g++, then open(<...>_weights.blob, "wb").write(buffer) after it.
    # codecache calls ctypes.memmove through the module, as this test does.
    import ctypes

    from torch._inductor import codecache

    from aotdiffusion.export.weights_blob import blob_built_in_file

    size = 256 * 2**20
    source = torch.arange(size // 4, dtype=torch.int32)
    target = tmp_path / "model_weights.blob"
    with blob_built_in_file():
        start = _rss_mib()
        buffer = codecache.bytearray(size)
        view = (ctypes.c_ubyte * size).from_buffer(buffer)
        ctypes.memmove(ctypes.addressof(view), source.data_ptr(), size)
        del view
        assert _rss_mib() - start < 64  # copied through the page cache: never resident in this process
        assert len(buffer) == size and buffer.closed  # unmapped before the builds
        with codecache.open(target, "wb") as blob:
            blob.write(buffer)
        # Everything else still reaches the builtins.
        assert isinstance(codecache.bytearray(b"ab"), bytearray)
        with codecache.open(tmp_path / "other_weights.blob", "wb") as other:
            other.write(b"small")
        assert (tmp_path / "other_weights.blob").read_bytes() == b"small"
    assert torch.equal(torch.frombuffer(bytearray(target.read_bytes()), dtype=torch.int32), source)
    assert "bytearray" not in vars(codecache) and "open" not in vars(codecache)
    assert not os.path.exists(buffer.path)  # moved, not copied


_COMPILE_LEFTOVERS_SCRIPT = """
import gc, sys
import torch
from aotdiffusion.export.compile import CompilerOptions, compile_component
from aotdiffusion.export.components import ComponentSpec
from aotdiffusion.export.precision import Precision
from aotdiffusion.export.winograd import shape_key

torch.manual_seed(0)
class ConvLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(128, 128, 3, padding=1)
        self.linear = torch.nn.Linear(128, 2**19)  # 256 MiB: its load is measured (test_load_holds_...)
    def forward(self, x):
        return (self.linear(self.conv(x).mean((2, 3))),)
module = ConvLinear().eval()
own = {t.untyped_storage().data_ptr() for t in module.state_dict().values()}
# Bytes of the constants folded by freezing (not the module's weights) that the code does not read, at code generation.
from torch._inductor.graph import GraphLowering
codegen, unread = GraphLowering.codegen_with_cpp_wrapper, []
def storage(t):
    try:
        return t.untyped_storage()
    except (AttributeError, NotImplementedError):  # not a tensor (a frozen_param count), or opaque
        return None
def counting_codegen(graph, *args, **kwargs):
    read = {s.data_ptr() for s in map(storage, graph.constants.values()) if s is not None}
    held = [getattr(graph.module, name) for name in dir(graph.module) if name.startswith("_frozen_param")]
    held = [s for s in map(storage, held) if s is not None]
    unread.append(sum(s.nbytes() for s in held if s.data_ptr() not in read | own))
    return codegen(graph, *args, **kwargs)
GraphLowering.codegen_with_cpp_wrapper = counting_codegen
spec = ComponentSpec("toy", "unet", module, lambda gen: {"x": torch.randn(1, 128, 32, 32, generator=gen)}, ["out"], {})
tiles = ((shape_key((1, 128, 32, 32), (128, 128, 3, 3)), 4),)  # Winograd: its weight transform is folded
options = CompilerOptions(Precision("none", "fp32"), conv_algorithm="winograd", winograd=tiles)
manifest = compile_component(spec, options, __import__("pathlib").Path(sys.argv[1]), cache=False)
gc.collect()
alive = [o for o in gc.get_objects() if type(o) is torch.Tensor and not o.is_mkldnn
         and o.untyped_storage().nbytes() >= 2**19 and o.untyped_storage().data_ptr() not in own]
print(len(alive), manifest["refit"]["available"], manifest["refit"].get("computed", 0), unread)
"""


@pytest.fixture(scope="module")
def toy_compile(tmp_path_factory):
    """A Winograd convolution and a 256 MiB linear compiled in a fresh process: its folder and what it printed."""
    folder = tmp_path_factory.mktemp("toy") / "toy"
    out = subprocess.run([sys.executable, "-c", _COMPILE_LEFTOVERS_SCRIPT, str(folder)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return folder, out


def test_compile_leaves_no_folded_constant_behind_and_its_blob_reproduces(toy_compile):
    # After a compile, torch held its last trace's graph (and through it the frozen module with every folded
    # constant) until the next component's trace: full-size SD 1.5's fp32 UNet, 10.3 GiB alive through its
    # validation. The weights blob is built in its file (export/weights_blob.py); the refit program is written only
    # when replaying the folding reproduces every constant of that blob byte for byte.
    _, out = toy_compile
    alive, refit_available, computed, unread = out.stdout.split(maxsplit=3)
    assert alive == "0", out.stdout
    # Winograd's transform kept its einsum output (as large as the transform) as a second constant through the
    # lowering, held by a type check torch.export records for ``.to`` (export/winograd.py ``_cast``).
    assert unread.strip() == "[0]", out.stdout
    assert refit_available == "True" and int(computed) >= 2, out.stdout  # the Winograd transform and a prepack


_LOAD_SCRIPT = """
import sys, torch
from pathlib import Path
from aotdiffusion import artifact
from aotdiffusion.runtime import blob_constants, compiled
folder = Path(sys.argv[1])
blob = artifact.weights_file(folder)
blob = (folder / blob).stat().st_size if blob else 0
# This process's own peak (VmHWM): getrusage's ru_maxrss keeps the peak of the process that started it (under
# pytest-xdist, a worker's gigabyte).
status = lambda key: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
before = status("VmRSS")
if sys.argv[2] == "torch's loader":
    blob_constants.available = lambda: False
component = compiled.CompiledComponent(folder)
grew = status("VmHWM") - before
x = torch.randn(1, 128, 32, 32, generator=torch.Generator().manual_seed(0))
torch.save(component(x=x)["out"], sys.argv[3])
print(grew * 1024 / blob)
"""


def test_load_holds_the_blob_once_and_runs_as_torchs_loader(toy_compile, tmp_path):
    # AOTInductor's own CPU loader maps the weights blob and copies it, holding the GIL: twice the blob at the end
    # (full-size SD 1.5's fp32 UNet: 13.5 GiB; the export's peak). runtime/blob_constants.py drops the mapped pages
    # as the copy goes. Each load in a fresh process: its peak RSS growth, in blobs, and its output.
    folder, _ = toy_compile
    grew = {}
    for loader in ("ours", "torch's loader"):
        out = subprocess.run(
            [sys.executable, "-c", _LOAD_SCRIPT, str(folder), loader, str(tmp_path / loader)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        grew[loader] = float(out.stdout.split()[-1])
    assert grew["ours"] < 1.4 < 1.8 < grew["torch's loader"], grew
    assert torch.equal(torch.load(tmp_path / "ours"), torch.load(tmp_path / "torch's loader"))


def test_page_out_reclaims_mapped_weights_and_never_loses_data(tmp_path):
    # After freezing, the export pages the weights out (export/compile.py): mapped ones leave memory and read back
    # equal; anonymous ones (no swap to go to) stay as they were.
    from aotdiffusion.runtime.memory import page_out

    torch.manual_seed(0)
    anonymous = torch.randn(64 * 2**20 // 4)
    torch.save({"w": anonymous}, tmp_path / "w.pt")
    mapped = torch.load(tmp_path / "w.pt", mmap=True)["w"]
    assert torch.equal(mapped, anonymous)  # every page read in
    before = _rss_mib()
    page_out([mapped, anonymous])
    assert before - _rss_mib() > 48
    assert torch.equal(mapped, anonymous) and torch.equal(anonymous, torch.load(tmp_path / "w.pt")["w"])
