"""torch.export + AOTInductor for one component: trace, compile to a package stored unpacked, write its manifest."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .. import artifact, checksums
from ..runtime.memory import page_out, return_freed_memory
from . import compile_cache, refit
from .attention import ATTENTIONS, chunked_long_attention
from .choose_precision import FP32_LINEAR_KERNELS
from .components import ComponentSpec
from .group_norm import GROUP_NORMS, channel_stats_group_norms
from .precision import Precision, PrecisionWrapper, full_precision_matmuls, low_precision_weights
from .quantize import QUANTIZE_MODES, int8_kernels, quantize_program, quiet_int8_lowering, reduce_range
from .weights_blob import blob_built_in_file
from .winograd import CONV_ALGORITHMS, winograd_convs


@dataclass(frozen=True)
class CompilerOptions:
    """Everything that changes the compiled code. Recorded in each component's manifest.

    Each switch is one optimisation that can be turned off on its own (the gpt-fast habit), so a
    benchmark can say what each one is worth.
    """

    precision: Precision = field(default_factory=Precision)
    device: str = "cpu"
    # Fold weight-only computation (e.g. the bf16 casts of fp32 weights) into constants at compile
    # time instead of repeating it on every call.
    freezing: bool = True
    # "int8": this component's convolutions and linears run in int8 (export/quantize.py).
    quantize: str = "none"
    # Who runs fp32 linears: "onednn" (prepacked at freezing) or "mkl" (left unpacked: aten mm/addmm, MKL's
    # sgemm); "auto" lets the export time both per component (export/choose_precision.py).
    fp32_linear: str = "onednn"
    # 3x3 convolutions: "direct" (oneDNN), "winograd" (every timed shape as Winograd) or "auto" (the faster per
    # shape, timed by the export: export/winograd.py). `winograd` holds the resolved (shape key, tile) pairs.
    conv_algorithm: str = "direct"
    winograd: tuple[tuple[str, int], ...] = ()
    # GroupNorm traced as per-channel statistics and scale/shift ("channel-stats", vectorised by inductor:
    # export/group_norm.py) or as aten's group_norm ("aten").
    group_norm: str = "channel-stats"
    # Long self-attention: "sdpa", "chunked" (matmuls and softmax in chunks: export/attention.py), or "auto" (the
    # faster, timed by the export per component).
    attention: str = "sdpa"

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZE_MODES:
            raise ValueError(f"`quantize` must be one of {QUANTIZE_MODES}, got {self.quantize!r}.")
        if self.quantize == "int8" and not self.freezing:
            # Without freezing the quantize/dequantize pairs are never fused into int8 kernels (pytorch/ao #4566).
            raise ValueError("int8 quantization needs freezing: drop freezing=False or --quantize int8.")
        if self.fp32_linear not in ("auto", *FP32_LINEAR_KERNELS):
            raise ValueError(
                f"`fp32_linear` must be one of {('auto', *FP32_LINEAR_KERNELS)}, got {self.fp32_linear!r}."
            )
        if self.attention not in ATTENTIONS:
            raise ValueError(f"`attention` must be one of {ATTENTIONS}, got {self.attention!r}.")
        if self.group_norm not in GROUP_NORMS:
            raise ValueError(f"`group_norm` must be one of {GROUP_NORMS}, got {self.group_norm!r}.")
        if self.conv_algorithm not in CONV_ALGORITHMS:
            raise ValueError(f"`conv_algorithm` must be one of {CONV_ALGORITHMS}, got {self.conv_algorithm!r}.")
        if self.conv_algorithm == "winograd" and self.device != "cpu":
            raise ValueError(
                f"--conv-algorithm winograd is timed and compiled for CPUs; it cannot compile for {self.device}. "
                "Use --conv-algorithm direct (or auto, which keeps cuDNN's choice on GPUs)."
            )
        if self.quantize == "int8" and self.device != "cpu":
            raise ValueError(f"--quantize int8 runs oneDNN's int8 CPU kernels; it cannot compile for {self.device}.")

    def inductor_configs(self) -> dict[str, Any]:
        # Small weights (a 4-channel bias) are otherwise inlined into the generated code as literals, where new
        # weights could not reach them without compiling (export/refit.py); read from the weights blob instead.
        # The wrapper (the C++ that calls the kernels: 29k lines for the full-size UNet with chunked attention) at
        # -O0 instead of torch's -O1: the SD 1.5 UNet compiled 468 -> 314 s on the AMD EPYC Zen 4, its outputs
        # bit-identical and its call 3.796 -> 3.776 s (alternated, median of 8): the time is in the kernels.
        return {
            "freezing": self.freezing,
            "always_keep_tensor_constants": True,
            "aot_inductor.compile_wrapper_opt_level": "O0",
        }

    def package_configs(self) -> dict[str, Any]:
        """How the package stores weights: outside the shared library, as one blob file AOTInductor reads at
        load (artifact format 2). Packaging only: the generated kernels are the same."""
        return {
            "aot_inductor.package_constants_in_so": False,
            "aot_inductor.package_constants_on_disk_format": "binary_blob",
        }

    def to_dict(self) -> dict[str, Any]:
        quantize = {"quantize": self.quantize} if self.quantize != "none" else {}
        linear = {"fp32_linear": self.fp32_linear} if self.fp32_linear != "onednn" else {}
        winograd = {"winograd": {key: tile for key, tile in self.winograd}} if self.winograd else {}
        return {
            "device": self.device,
            **self.precision.to_dict(),
            **quantize,
            **linear,
            **winograd,
            "group_norm": self.group_norm,
            "attention": self.attention,
            "inductor": self.inductor_configs(),
        }


class ExportError(RuntimeError):
    """A component that could not be traced or compiled, with its name."""


def trace(spec: ComponentSpec, options: CompilerOptions) -> torch.export.ExportedProgram:
    """Exports ``spec``; call inside :func:`low_precision_weights`, which must stay open until compiled."""
    precision = options.precision
    wrapped = PrecisionWrapper(spec.module.to(options.device), precision).eval()
    inputs = tuple(t.to(options.device) for t in spec.example_inputs().values())
    try:
        norms = channel_stats_group_norms(spec.module, options.group_norm == "channel-stats")
        attention = chunked_long_attention(options.attention == "chunked")
        with torch.no_grad(), winograd_convs(spec.module, dict(options.winograd)), norms, attention:
            program = torch.export.export(wrapped, inputs, strict=False)
    except Exception as error:  # torch.export errors are long; say which component first
        raise ExportError(f"torch.export failed for {spec.name}: {error}") from error
    if precision.auto_cast == "matmul":
        missed = full_precision_matmuls(program.graph, precision.low_dtype)
        if missed:
            raise ExportError(
                f"{spec.name}: {len(missed)} matrix multiplications escaped the {precision.auto_cast_type} cast "
                f"policy ({', '.join(missed[:5])}...). Export with --auto-cast all or --auto-cast none."
            )
    return program


def compile_component(
    spec: ComponentSpec, options: CompilerOptions, folder: Path, *, cache: bool = True
) -> dict[str, Any]:
    """Compiles ``spec`` into ``folder`` and writes ``config.json``; returns the manifest block.

    With ``cache``, a package compiled before from the same graph, weights and options is copied from the
    compile cache instead (export/compile_cache.py).
    """
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    package_dir = folder / artifact.PACKAGE_DIR
    quantization = None
    with low_precision_weights(spec.module, options.precision, offload=True):
        program = trace(spec, options)
        if options.quantize == "int8":
            seven_bit = reduce_range()
            program, spec.calibration_outputs = quantize_program(program, spec.calibration, seven_bit=seven_bit)
            quantization = {
                "type": "int8",
                "method": "torchao PT2E X86InductorQuantizer: static u8 activations per tensor, s8 weights per "
                "channel, convolutions and linears",
                "activation_bits": 7 if seven_bit else 8,
                "calibration_calls": len(spec.calibration) - 1,
                "validated_on": "one recorded call held out of calibration",
            }
        traced = time.perf_counter()
        settings = {"compiler": options.to_dict(), "package": options.package_configs()}
        cache_key = compile_cache.key(program, spec.example_inputs(), settings) if cache else None
        # The package's files and their sha256 (relative to the package), from the cache entry when it holds one.
        digests = compile_cache.fetch(cache_key, package_dir) if cache_key is not None else None
        reused = digests is not None
        if not reused:
            with refit.recording() as recorder:
                _compile(spec, options, program, package_dir)
            # Still inside low_precision_weights: the refit program matches the compiled constants to the weights
            # they came from by address, and a bf16/fp16 component's are the low-precision copies made for it.
            blob = artifact.weights_file(folder)
            if quantization is not None:  # int8 repacks are registered by a pass whose constants are not recorded
                refit.write_unavailable(package_dir, "its int8 weights and scales come from calibrating this model's "
                                        "activations: export the new weights with --quantize int8")  # fmt: skip
            else:
                refit.write_program(recorder, program, package_dir, folder / blob if blob else None)
                # Its check read every weight back in; validation compares with outputs computed before compiling.
                page_out(program.state_dict.values())
            del recorder
            digests = {
                str(path.relative_to(artifact.PACKAGE_DIR)): checksums.sha256_file(folder / path)
                for path in artifact.package_files(folder)
            }
            if cache_key is not None:
                compile_cache.store(cache_key, package_dir, digests)
    del program
    # Part of this compile's state is held by reference cycles until the cyclic collector happens to run, which
    # was inside the next component's compile, after this one's validation (full-size SD 1.5's UNet on the AMD
    # EPYC Zen 4: 1.4 GiB freed here).
    gc.collect()
    return_freed_memory()
    compiled = time.perf_counter()
    if quantization is not None:
        kernels = int8_kernels(folder)
        if not kernels:
            raise ExportError(
                f"{spec.name}: the int8 graph compiled to fp32 kernels (no oneDNN qconv/qlinear in its code); "
                "this torch build cannot run it in int8. Export without --quantize."
            )
        quantization["kernels"] = kernels

    files = {
        f"{artifact.PACKAGE_DIR}/{name}": {
            "sha256": digest,
            "bytes": (package_dir / name).stat().st_size,
        }
        for name, digest in sorted(digests.items())
    }
    extra = save_extra_state(spec, folder, files)

    example = spec.example_inputs()
    isa = artifact.cpu_isa()
    manifest = {
        "format_version": artifact.FORMAT_VERSION,
        "role": spec.role,
        "device": options.device,
        "cpu_isa": isa,
        "cpu_flags": artifact.required_cpu_flags(isa) if options.device == "cpu" else [],
        "precision": options.precision.to_dict(),
        "quantization": quantization,
        "compiler": {"backend": "torch.export+aotinductor", **options.to_dict()},
        "versions": artifact.environment_versions(),
        "static": spec.static,
        "graphs": [
            {
                "file": artifact.PACKAGE_DIR,
                "inputs": [_tensor_spec(name, t) for name, t in example.items()],
                "outputs": spec.output_names,
            }
        ],
        "weights": blob_weights(artifact.weights_file(folder)),
        "output_class": spec.output_class,
        "extra_state": extra,
        "files": files,
        "timings": {"trace_s": round(traced - start, 2), "compile_s": round(compiled - traced, 2)},
        "compile_cache": ("hit" if reused else "miss") if cache else "off",
        "refit": refit.summary(package_dir),
        "validation": None,
    }
    write_manifest(folder, spec.config, manifest)
    return manifest


def blob_weights(blob: Path | None) -> dict[str, Any]:
    """The manifest's ``weights`` block of a package whose constants are in its own weights blob."""
    return {
        "storage": "external",
        "file": str(blob),
        "format": "AOTInductor binary blob: the frozen (folded, oneDNN-prepacked) constants",
    }


def save_extra_state(spec: ComponentSpec, folder: Path, files: dict[str, Any]) -> dict[str, Any]:
    """Saves the small eager modules kept beside the graph (recording each file in ``files``); returns the
    manifest's ``extra_state`` block."""
    extra = {}
    for name, module in spec.extra_state.items():
        path = folder / f"{name}.safetensors"
        save_file({k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}, path)
        files[path.name] = checksums.file_record(path)
        extra[name] = {
            "file": path.name,
            "class": f"{type(module).__module__}.{type(module).__qualname__}",
            "args": _module_args(module),
        }
    return extra


def _forget_last_trace() -> None:
    """Drops torch's module-level map from the last make_fx trace's fake tensors to its graph nodes.

    torch.export fills it for its non-strict leak check, every make_fx trace refills it, and only the next trace
    clears it: after a compile it holds the nodes of AOTAutograd's graph, and through them the frozen graph module
    with every folded constant and intermediate (full-size SD 1.5's fp32 UNet on the AMD EPYC Zen 3: 10.3 GiB of
    Winograd transforms and 1.4 GiB of frozen parameters), alive through the refit check and validation until the
    next component's trace. Nothing reads it after the trace that filled it (torch.export's check runs right after
    its own trace).
    """
    from torch.fx.experimental import proxy_tensor

    proxy_tensor._FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT.clear()
    gc.collect()  # the nodes and their graph refer to each other


def _compile(spec: ComponentSpec, options: CompilerOptions, program: torch.export.ExportedProgram, target: Path):
    """AOTInductor's compile, its files laid out in ``target`` as an unpacked package (a load opens the library
    and reads the weights where they lie).

    What ``aoti_compile_and_package`` does, less its ``.pt2`` zip: that read the whole weights blob into memory
    to write it into the zip, which the export then unpacked again (full-size SD 1.5's UNet: 2.4 GB written
    three times, and the export's peak memory, on the AMD EPYC Zen 4).
    """
    configs = {**options.inductor_configs(), **options.package_configs(), "aot_inductor.package": True}
    # Inductor only freezes (folds constants, prepacks conv/linear weights for oneDNN) when
    # grad mode is off; with grad on it silently skips all of it.
    try:
        with (
            torch.no_grad(),
            quiet_int8_lowering(),
            _fp32_linears_unpacked(options.fp32_linear == "mkl"),
            _wrapper_built_beside_kernels(),
            blob_built_in_file(),
            _weights_paged_out_after_freezing(program),
        ):
            args, kwargs = program.example_inputs
            files = torch._inductor.aot_compile(program.module(check_guards=False), args, kwargs, options=configs)
    except Exception as error:
        raise ExportError(f"AOTInductor failed to compile {spec.name}: {error}") from error
    finally:
        _forget_last_trace()
    artifact.place_package(files, target)


@contextmanager
def _weights_paged_out_after_freezing(program: torch.export.ExportedProgram) -> Iterator[None]:
    """Keeps the program's weights out of memory while they are not read: before the compile (the eager reference
    read them), each right after constant folding read it, and all of them after freezing. Once freezing has
    computed every constant the compiled code reads (Winograd transforms, oneDNN-prepacked and cast weights),
    inductor's lowering, code generation and C++ builds, minutes, read the program's own weights only where a
    constant is one of them unchanged (norms, biases: small). Where the weights are mapped from a file
    (safetensors as diffusers loads them; the export's fp32 offload), their pages leave memory, and are read from
    the file again by whatever uses them later (the refit check). Full-size SD 1.5's fp32 UNet: 3.2 GiB of file
    pages during its lowering on the AMD EPYC Zen 3."""
    from torch._inductor import constant_folding, freezing

    freeze, run_node = freezing.freeze, constant_folding.ConstantFolder.run_node
    weights = _storages(program.state_dict.values())

    def freeze_then_page_out(*args: Any, **kwargs: Any) -> Any:
        frozen = freeze(*args, **kwargs)
        page_out(program.state_dict.values())
        return frozen

    def run_node_then_page_out(folder: Any, node: torch.fx.Node) -> Any:
        # Constant folding reads each weight to compute what it folds into (a Winograd transform, a prepacked or
        # cast copy), and those results pile up: a weight read is paged out at once, not at freezing's end (the
        # fp32 UNet's 3.2 GiB of weights were resident at freezing's peak). One used again is read from its file.
        out = run_node(folder, node)
        used = [folder.env.get(n) for n in node.all_input_nodes]
        page_out([t for t in used if isinstance(t, torch.Tensor) and _storage_address(t) in weights])
        return out

    page_out(program.state_dict.values())  # read by the eager reference; tracing reads no weight
    freezing.freeze = freeze_then_page_out
    constant_folding.ConstantFolder.run_node = run_node_then_page_out
    try:
        yield
    finally:
        freezing.freeze = freeze
        constant_folding.ConstantFolder.run_node = run_node


def _storages(tensors: Any) -> set[int]:
    return {address for address in map(_storage_address, tensors) if address is not None}


def _storage_address(tensor: torch.Tensor) -> int | None:
    try:
        return tensor.untyped_storage().data_ptr()
    except (NotImplementedError, RuntimeError):  # oneDNN-prepacked and other opaque tensors
        return None


@contextmanager
def _wrapper_built_beside_kernels() -> Iterator[None]:
    """Compiles the wrapper's C++ in a second g++ while the kernels' compiles, instead of one after the other.

    torch 2.13's ``AotCodeCompiler.compile`` builds the wrapper object, then the kernels' object, then links
    them; each g++ runs on one core. Full-size SD 1.5's UNet on the AMD EPYC Zen 4: wrapper 15.7 s (at -O0),
    kernels 21.2 s. The wrapper's build is started in a thread (g++ runs outside the GIL) and joined once the
    kernels' build is done, before the link, which re-raises its error if it failed.
    """
    from torch._inductor.cpp_builder import CppBuilder  # here: importing inductor costs every CLI command a second

    original = CppBuilder.build
    pending: list[Future] = []

    def build(builder: CppBuilder) -> None:
        if builder.get_target_file_path().endswith(".wrapper.o") and not pending:
            pending.append(pool.submit(original, builder))
            return
        try:
            original(builder)
        finally:
            while pending:
                pending.pop().result()

    with ThreadPoolExecutor(1, thread_name_prefix="aotdiffusion-g++") as pool:
        CppBuilder.build = build  # type: ignore[method-assign]
        try:
            yield
        finally:
            CppBuilder.build = original  # type: ignore[method-assign]
            while pending:  # a compile that failed between the two builds: let the wrapper's finish
                pending.pop().exception()


@contextmanager
def _fp32_linears_unpacked(enabled: bool) -> Iterator[None]:
    """Leaves fp32 linears unpacked, so the compiled code calls aten ``mm``/``addmm`` (MKL's sgemm).

    In AOT mode freezing packs every fp32 linear for oneDNN (MKL's packed format cannot be saved). torch
    2.13's packing check (``_is_packable_linear`` in ``fx_passes/mkldnn_fusion.py``) declines fp32 linears
    when torch reports no MKL, and that flag is read nowhere else in an AOT compile; it is restored after.
    Convolutions and low-precision linears are packed as before.
    """
    if not enabled:
        yield
        return
    has_mkl = torch._C.has_mkl
    torch._C.has_mkl = False
    try:
        yield
    finally:
        torch._C.has_mkl = has_mkl


def write_manifest(folder: Path, config: dict[str, Any], manifest: dict[str, Any]) -> None:
    artifact.write_json(folder / artifact.CONFIG_FILE, {**config, artifact.MANIFEST_KEY: manifest})


def _tensor_spec(name: str, tensor: torch.Tensor) -> dict[str, Any]:
    return {"name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}


def _module_args(module: torch.nn.Module) -> dict[str, Any]:
    if isinstance(module, torch.nn.LayerNorm):
        return {"normalized_shape": list(module.normalized_shape), "eps": module.eps}
    raise ExportError(f"No recipe to rebuild {type(module).__name__} at load time.")
