"""Numeric precision of a compiled component: the ``--auto-cast`` / ``--auto-cast-type`` policy.

* ``none``   everything in fp32 (``auto_cast_type`` is ignored).
* ``matmul`` every matrix multiplication, convolution and attention (``linear``, ``conv*``,
  ``matmul``/``mm``/``bmm``/``addmm``/``baddbmm``, ``einsum``, ``scaled_dot_product_attention``)
  takes its inputs and weights in ``auto_cast_type`` and returns fp32; normalisations, activations,
  residual additions, softmax outside SDPA and the timestep embedding stay in fp32. This is where
  AMX and tensor cores earn their speed while accumulation-sensitive work keeps fp32 range.
* ``all``    the weights and every operation run in ``auto_cast_type``.
* ``auto``   (the default) ``all`` where the component passes validation in it, else ``matmul``. ``all`` runs
  the same matmul kernels in the same type and moves half the bytes through normalizations, activations
  and residuals, with no casts between them: measured on an "Intel(R) Xeon(R) Processor" with AMX
  (family 6 model 167; full-size SD 1.5, bf16), the VAE decoder 1.6x faster than under ``matmul`` at the
  same error, the UNet level (2%). So it is compiled first, and ``matmul`` only for a component whose
  ``all`` graph fails validation.

In every mode a compiled component takes fp32 inputs and returns fp32 outputs, so diffusers'
scheduler arithmetic, guidance and image post-processing always run in fp32.

``torch.autocast`` is not used for ``matmul``: under autocast the bf16 result of a convolution
flows on into GroupNorm and SiLU in bf16, which is not "the rest in fp32".
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..runtime.memory import return_freed_memory

AUTO_CAST_MODES = ("auto", "none", "matmul", "all")
AUTO_CAST_TYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Tolerances of validation, as the largest absolute error over the largest absolute reference value
# of each output. fp32 only differs from eager by reassociation inside fused kernels; bf16 keeps 8
# bits of mantissa (relative rounding 2^-9 = 0.2% per op), and errors compound over the depth of a
# UNet, so a few percent of the output's range is what an intact bf16 graph gives (measured: 0.5-2%
# on random-weight SD components). A broken graph is off by 100%.
RELATIVE_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 6e-2, torch.float16: 2e-2}

_LOW_PRECISION_FUNCTIONS = {
    F.linear,
    F.conv1d,
    F.conv2d,
    F.conv3d,
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
    F.scaled_dot_product_attention,
    torch.matmul,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.mm,
    torch.bmm,
    torch.addmm,
    torch.baddbmm,
    torch.einsum,
}
# The ATen names the functions above become in an exported graph, to prove the policy held.
_LOW_PRECISION_ATEN = {
    "linear",
    "conv1d",
    "conv2d",
    "conv3d",
    "convolution",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "scaled_dot_product_attention",
    "matmul",
    "mm",
    "bmm",
    "addmm",
    "baddbmm",
    "einsum",
}


# `auto` type: each component's type is chosen at export by timing the candidates (export/choose_precision.py).
# `auto` scope: all, else matmul (above).
AUTO = "auto"
_SCOPE = {"matmul": "matmul/conv/attention", "all": "all ops", AUTO: "all ops, else matmul/conv/attention"}


@dataclass(frozen=True)
class Precision:
    auto_cast: str = AUTO
    auto_cast_type: str = AUTO

    def __post_init__(self) -> None:
        if self.auto_cast not in AUTO_CAST_MODES:
            raise ValueError(f"`auto_cast` must be one of {AUTO_CAST_MODES}, got {self.auto_cast!r}.")
        if self.auto_cast_type not in (AUTO, *AUTO_CAST_TYPES):
            raise ValueError(
                f"`auto_cast_type` must be one of {(AUTO, *AUTO_CAST_TYPES)}, got {self.auto_cast_type!r}."
            )

    @property
    def is_auto(self) -> bool:
        """Whether the type is still to be measured (with --auto-cast none there is nothing to choose)."""
        return self.auto_cast != "none" and self.auto_cast_type == AUTO

    def resolved(self, auto_cast_type: str) -> Precision:
        return Precision(self.auto_cast, auto_cast_type)

    def compiled_in(self) -> list[Precision]:
        """What a component of this precision is compiled in, in the order to try: ``auto`` is ``all`` then
        ``matmul`` (the second where the first fails validation); fp32 is fp32 whatever the scope. Raises, as
        :attr:`low_dtype` does, while the type is still ``auto``."""
        if self.low_dtype == torch.float32:
            return [self if self.auto_cast != AUTO else Precision("none", "fp32")]
        if self.auto_cast == AUTO:
            return [Precision("all", self.auto_cast_type), Precision("matmul", self.auto_cast_type)]
        return [self]

    @property
    def low_dtype(self) -> torch.dtype:
        """The narrowest type any operation runs in."""
        if self.auto_cast == "none":
            return torch.float32
        if self.is_auto:
            raise ValueError("auto_cast_type 'auto' has no type until the export has measured one (resolved()).")
        return AUTO_CAST_TYPES[self.auto_cast_type]

    @property
    def tolerance(self) -> float:
        return RELATIVE_TOLERANCE[self.low_dtype]

    def describe(self) -> str:
        if self.is_auto:
            return f"type chosen per component by timing fp32/bf16/fp16 on this machine ({_SCOPE[self.auto_cast]})"
        if self.low_dtype == torch.float32:
            return "fp32"
        return f"{self.auto_cast_type} ({_SCOPE[self.auto_cast]})"

    def to_dict(self) -> dict[str, str]:
        return {"auto_cast": self.auto_cast, "auto_cast_type": self.auto_cast_type}


class CastMatmuls(TorchFunctionMode):
    """Runs matmuls, convolutions and attention in ``dtype`` and hands fp32 back to everything else."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _LOW_PRECISION_FUNCTIONS:
            return func(*args, **kwargs)
        out = func(*(self._cast(a) for a in args), **{k: self._cast(v) for k, v in kwargs.items()})
        return out.float() if isinstance(out, torch.Tensor) and out.is_floating_point() else out

    def _cast(self, value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(self.dtype)
        if isinstance(value, (list, tuple)):
            return type(value)(self._cast(v) for v in value)
        return value


_MATMUL_MODULES = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)


@contextmanager
def low_precision_weights(module: torch.nn.Module, precision: Precision, *, offload: bool = False):
    """Stores the weights that run in the low type in that type while the block runs (tracing, compiling).

    Casting inside the graph instead would convert every weight on every call (AOTInductor does not
    fold it: measured 3.4 GB of casts per SD 1.5 UNet step) and store fp32 weights twice as large.
    The fp32 tensors come back afterwards, so the caller's module stays the eager fp32 reference
    without a second copy of the model in memory.

    ``offload``: the fp32 tensors wait in a temporary file meanwhile, not in memory, and come back mapped from
    it. A compile needs only the low-type copies, and freezing then holds gigabytes of folded constants beside
    them: the full-size SD 1.5 UNet's fp32 weights are 3.4 GB of a bf16 export's peak.
    """
    _compilable(precision)
    if precision.low_dtype == torch.float32:
        yield module
        return
    swapped = []
    # Buffers are swapped in their module: a buffer can be a view (PixArt's position embedding is an unsqueezed
    # tensor), and a view whose .data changes type no longer matches its base, which torch.export refuses.
    buffers: list[tuple[dict, str, torch.Tensor]] = []
    for sub in module.modules():
        if precision.auto_cast == "all" or isinstance(sub, _MATMUL_MODULES):
            for tensor in sub.parameters(recurse=False):
                if tensor.is_floating_point() and tensor.dtype != precision.low_dtype:
                    swapped.append((tensor, tensor.data))
                    tensor.data = tensor.data.to(precision.low_dtype)
            for name, tensor in sub._buffers.items():
                if tensor is not None and tensor.is_floating_point() and tensor.dtype != precision.low_dtype:
                    buffers.append((sub._buffers, name, tensor))
    for owner, name, tensor in buffers:
        owner[name] = tensor.to(precision.low_dtype)
    weights, originals = [tensor for tensor, _ in swapped], [data for _, data in swapped]
    del swapped
    with _offloaded(originals) if offload and originals else nullcontext() as file:
        if file is not None:
            return_freed_memory()
        try:
            yield module
        finally:
            # Mapped, not read: pages come into memory only where the fp32 weights are used again (a later compile
            # or eager call), not when a full-size UNet is validated and then released (export/pipeline.py).
            restored = torch.load(file, weights_only=True, mmap=True) if file is not None else originals
            for tensor, data in zip(weights, restored):
                tensor.data = data
            for owner, name, tensor in buffers:
                owner[name] = tensor


@contextmanager
def _offloaded(tensors: list[torch.Tensor]) -> Iterator[Path]:
    """``tensors`` written to a temporary file (deleted on exit) and the list emptied, so that nothing keeps
    them in memory."""
    with tempfile.TemporaryDirectory(prefix="aotdiffusion-fp32-") as folder:
        path = Path(folder) / "weights.pt"
        torch.save(tensors, path)
        tensors.clear()
        yield path


def _compilable(precision: Precision) -> Precision:
    if precision.auto_cast == AUTO and precision.low_dtype != torch.float32:
        raise ValueError(f"{precision} names two scopes: compile each of precision.compiled_in() in turn.")
    return precision


class PrecisionWrapper(torch.nn.Module):
    """Applies a :class:`Precision` around a traceable component, keeping its fp32 signature.

    Use it inside :func:`low_precision_weights` for "all", whose weights must already be in the low type.
    """

    def __init__(self, module: torch.nn.Module, precision: Precision):
        super().__init__()
        self.precision = _compilable(precision)
        self.module = module

    def forward(self, *args: torch.Tensor):
        if self.precision.low_dtype == torch.float32:
            return self.module(*args)
        if self.precision.auto_cast == "all":
            low = self.precision.low_dtype
            outputs = self.module(*(a.to(low) if a.is_floating_point() else a for a in args))
            return tuple(o.float() for o in outputs)
        with CastMatmuls(self.precision.low_dtype):
            return self.module(*args)


def full_precision_matmuls(graph: torch.fx.Graph, dtype: torch.dtype) -> list[str]:
    """Names of matmul-like nodes in an exported graph whose inputs are not ``dtype``.

    Empty when the cast policy covered every matrix multiplication in the model.
    """
    missed = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", "").split(".")[0]
        if name not in _LOW_PRECISION_ATEN:
            continue
        first = node.args[0].meta.get("val") if node.args and hasattr(node.args[0], "meta") else None
        if first is not None and first.dtype != dtype:
            missed.append(node.name)
    return missed
