"""``--auto-cast-type auto``: the compute type of each component, chosen by timing it on this machine.

No CPU flag predicts the fast path (bf16 is 10x faster than fp32 with AMX, 2x slower without it on
AVX-512 Xeons, 2-4x faster on Zen 5 through oneDNN, and 8-10x slower on AVX2-only CPUs, where oneDNN
has no bf16 kernels), so the export measures. A component's time is dominated by a few convolution,
matrix-multiplication and attention shapes; this module records them while the component runs on
fake tensors (no compute, no memory), then times the largest ones (by FLOPs) in every candidate
type with the kernels the compiled graph calls (oneDNN convolutions in channels-last, linears,
scaled-dot-product attention), and ranks the candidates by the FLOP-weighted total. The export
compiles the fastest one and falls back to the next if it fails validation.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from . import measurements
from .components import ComponentSpec

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Who runs fp32 linears: oneDNN's prepacked kernel (what AOTInductor's freezing makes of them) or MKL's
# sgemm on the plain weight (what they run when left unpacked). Neither wins everywhere: MKL's fp32
# GEMM was several times slower on an AMD Zen 5, 9% faster than oneDNN's on an AMD Zen 3.
FP32_LINEAR_KERNELS = ("onednn", "mkl")
# `--quantize int8` (export/quantize.py) adds this candidate for the UNet: convolutions and linears in
# oneDNN's int8 kernels, everything else (attention among it) in fp32.
INT8 = "int8"
# The shapes timed per component: the largest ones until this share of the component's FLOPs (at
# most _MAX_SHAPES of them), which keeps the measurement to seconds on a full-size UNet.
_FLOP_SHARE = 0.6
_MAX_SHAPES = 8
_DROP_RATIO = 3.0
_aten = torch.ops.aten


REMEMBERED = " (measured by an earlier export on this machine; --no-cache measures again)"


@dataclass(frozen=True)
class Op:
    kind: str  # conv | linear | attention
    shapes: tuple  # what re-creates it: see _runner
    flops: int


@dataclass
class Choice:
    """The ranking of one component's candidates, fastest first, with what was measured."""

    ranked: list[str]
    seconds: dict[str, float]  # FLOP-weighted estimate of the timed shapes per candidate
    ops_timed: int
    flop_share: float
    skipped: dict[str, str] = field(default_factory=dict)  # candidate -> why it was not a candidate
    # candidate -> how much slower it was when it stopped being timed (its time extrapolated from its shapes)
    stopped_early: dict[str, str] = field(default_factory=dict)
    remembered: bool = False  # measured by an earlier export on this machine (measurements.py)

    def describe(self) -> str:
        timings = ", ".join(
            f"{c} {self.seconds[c] * 1e3:.1f} ms" + (" (extrapolated)" if c in self.stopped_early else "")
            for c in self.ranked
        )
        skipped = "".join(f"; {c} not tried: {why}" for c, why in self.skipped.items())
        return (
            f"{timings} over its {self.ops_timed} largest operation shapes ({self.flop_share:.0%} of its FLOPs)"
            f"{skipped} -> {self.ranked[0]}" + (REMEMBERED if self.remembered else "")
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "timed the component's largest convolution/linear/attention shapes in each candidate type",
            "seconds": {c: round(s, 9) for c, s in self.seconds.items()},  # ns: a tiny model's shapes take microseconds
            "ranked": self.ranked,
            "ops_timed": self.ops_timed,
            "flop_share": round(self.flop_share, 3),
            "skipped": self.skipped,
            "stopped_early": self.stopped_early,
        }


@dataclass
class LinearChoice:
    """Which library runs a component's fp32 linears, with what was measured (``--fp32-linear auto``)."""

    kernel: str  # onednn | mkl
    seconds: dict[str, float]  # the timed linear shapes, count-weighted, per kernel
    shapes_timed: int
    remembered: bool = False

    def describe(self) -> str:
        timings = ", ".join(f"{name} {self.seconds[name] * 1e3:.1f} ms" for name in FP32_LINEAR_KERNELS)
        return f"fp32 linears: {timings} over its {self.shapes_timed} largest linear shapes -> {self.kernel}" + (
            REMEMBERED if self.remembered else ""
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "seconds": {k: round(v, 9) for k, v in self.seconds.items()},
            "shapes_timed": self.shapes_timed,
            "kernel": self.kernel,
        }


class _RecordOps(TorchDispatchMode):
    """Collects (kind, shapes) -> count of the heavy operations a forward pass dispatches."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[tuple[str, tuple], int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet is _aten.convolution and not args[6]:  # not transposed
            x, w = args[0], args[1]
            stride, padding, dilation, groups = (tuple(args[3]), tuple(args[4]), tuple(args[5]), args[8])
            self.ops[("conv", (tuple(x.shape), tuple(w.shape), stride, padding, dilation, groups))] += 1
        elif packet in (_aten.addmm, _aten.mm):
            a, b = (args[1], args[2]) if packet is _aten.addmm else (args[0], args[1])
            self.ops[("linear", (tuple(a.shape), tuple(b.shape)))] += 1
        elif packet is _aten.bmm:
            self.ops[("bmm", (tuple(args[0].shape), tuple(args[1].shape)))] += 1
        elif packet in (_aten._scaled_dot_product_flash_attention_for_cpu, _aten._scaled_dot_product_flash_attention):
            self.ops[("attention", (tuple(args[0].shape), tuple(args[1].shape)))] += 1
        return func(*args, **kwargs)


def _flops(kind: str, shapes: tuple) -> int:
    if kind == "conv":
        (n, _, h, w), (cout, cin_g, kh, kw), stride, padding, dilation, _ = shapes
        ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        return 2 * n * cout * ho * wo * cin_g * kh * kw
    if kind == "linear":
        (m, k), (_, n) = shapes
        return 2 * m * k * n
    if kind == "bmm":
        (b, m, k), (_, _, n) = shapes
        return 2 * b * m * k * n
    (b, h, lq, e), (_, _, lk, _) = shapes  # attention: QK^T and PV
    return 4 * b * h * lq * lk * e


def dominant_ops(spec: ComponentSpec) -> tuple[list[tuple[Op, int]], int]:
    """The component's heavy operation shapes with their call counts, and its total FLOPs in them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    inputs = spec.example_inputs()
    recorder = _RecordOps()
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as fake:
        fake_inputs = [fake.from_tensor(t) for t in inputs.values()]
        with recorder:
            spec.module(*fake_inputs)
    ops = [(Op(kind, shapes, _flops(kind, shapes)), count) for (kind, shapes), count in recorder.ops.items()]
    ops.sort(key=lambda item: item[0].flops * item[1], reverse=True)
    return ops, sum(op.flops * count for op, count in ops)


def largest(ops: list[tuple[Op, int]], total: int, share: float, most: int) -> list[tuple[Op, int]]:
    """The first of ``ops`` (sorted largest first) until they make up ``share`` of ``total`` FLOPs, at most
    ``most`` of them (and at least one): the shapes worth timing."""
    selected, covered = [], 0
    for op, count in ops:
        if selected and (covered >= share * total or len(selected) >= most):
            break
        selected.append((op, count))
        covered += op.flops * count
    return selected


def _int8_runner(op: Op) -> Callable[[], Any] | None:
    """A call of ``op`` through the oneDNN int8 kernel the quantized graph calls (u8 activations, s8
    weights prepacked, fp32 out); None for operations that stay fp32 in an int8 graph."""
    gen = torch.Generator().manual_seed(0)
    if op.kind == "conv":
        x_shape, w_shape, stride, padding, dilation, groups = op.shapes
        x = torch.randint(0, 256, x_shape, generator=gen, dtype=torch.uint8).contiguous(
            memory_format=torch.channels_last
        )
        w = torch.randint(-128, 128, w_shape, generator=gen, dtype=torch.int8).contiguous(
            memory_format=torch.channels_last
        )
        scales, zeros = torch.full((w_shape[0],), 0.01), torch.zeros(w_shape[0], dtype=torch.int64)
        conv = (list(stride), list(padding), list(dilation), groups)
        packed = torch.ops.onednn.qconv_prepack(w, scales, 0.02, 128, *conv, list(x_shape))
        return lambda: torch.ops.onednn.qconv_pointwise(
            x, 0.02, 128, packed, scales, zeros, None, *conv, 1.0, 0, torch.float32, "none", [], ""
        )
    if op.kind == "linear":
        (m, k), (_, n) = op.shapes
        x = torch.randint(0, 256, (m, k), generator=gen, dtype=torch.uint8)
        w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
        scales, zeros = torch.full((n,), 0.01), torch.zeros(n, dtype=torch.int64)
        packed = torch.ops.onednn.qlinear_prepack(w, [m, k])
        return lambda: torch.ops.onednn.qlinear_pointwise(
            x, 0.02, 128, packed, scales, zeros, None, 1.0, 0, torch.float32, "none", [], ""
        )
    return None


def _runner(op: Op, dtype: torch.dtype | str, device: str) -> Callable[[], Any]:
    """A call of ``op`` in ``dtype`` (or ``int8``) on random data, laid out as the compiled graph runs it."""
    if dtype == INT8:
        int8 = _int8_runner(op)
        if int8 is not None:
            return int8
        dtype = torch.float32
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

    if op.kind == "conv":
        x_shape, w_shape, stride, padding, dilation, groups = op.shapes
        # The compiled convolutions run channels-last (oneDNN's `acdb`), so that is what is timed.
        x = rand(*x_shape).to(memory_format=torch.channels_last)
        w = rand(*w_shape).to(memory_format=torch.channels_last)
        if device == "cpu" and torch.backends.mkldnn.is_available():
            # Frozen, their weights are prepacked once; eager F.conv2d reorders them on every call (+30%
            # on a 1280-channel 3x3 convolution at 16x16 on an AVX2 CPU), which would flatter int8.
            # oneDNN's float convolution ops take padding before stride (its int8 ones stride first).
            conv = (list(padding), list(stride), list(dilation), groups)
            try:
                packed = torch.ops.mkldnn._reorder_convolution_weight(w, *conv, list(x_shape))
                torch.ops.mkldnn._convolution_pointwise(x, packed, None, *conv, "none", [], "")
                return lambda: torch.ops.mkldnn._convolution_pointwise(x, packed, None, *conv, "none", [], "")
            except RuntimeError:  # a type this oneDNN build has no convolution for: what eager runs instead
                pass
        return lambda: F.conv2d(x, w, None, stride, padding, dilation, groups)
    if op.kind == "linear":
        (m, k), (_, n) = op.shapes
        x, w = rand(m, k), rand(n, k)
        if device == "cpu" and torch.backends.mkldnn.is_available():
            # AOTInductor's frozen linears are oneDNN's prepacked `_linear_pointwise` in every type, fp32
            # included (eager fp32 goes through MKL instead, which is several times slower on some AMD CPUs).
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(w, m)
                torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
                return lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
            except RuntimeError:  # a type this oneDNN build has no linear for: what eager runs instead
                pass
        return lambda: F.linear(x, w)
    if op.kind == "bmm":
        a_shape, b_shape = op.shapes
        a, b = rand(*a_shape), rand(*b_shape)
        return lambda: torch.bmm(a, b)
    (b, h, lq, e), (_, _, lk, _) = op.shapes
    q, k, v = rand(b, h, lq, e), rand(b, h, lk, e), rand(b, h, lk, e)
    return lambda: F.scaled_dot_product_attention(q, k, v)


def _seconds(fn: Callable[[], Any], device: str, budget: float = 0.5) -> float:
    """Median of up to 3 timed calls after one warm-up, fewer when a call is slower than ``budget``."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn()
    sync()
    samples: list[float] = []
    while len(samples) < 3 and sum(samples) < budget:
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def candidates(spec: ComponentSpec, *, int8: bool = False, only: str | None = None) -> tuple[list[str], dict[str, str]]:
    """The types worth timing for ``spec`` and, for each left out, why.

    ``int8`` adds the int8 candidate; ``only`` is the one float type the user asked for (else all).
    """
    skipped = {}
    names = [only] if only else list(_DTYPES)
    if "fp16" in names and spec.role in ("vae_encoder", "vae_decoder") and spec.config.get("force_upcast"):
        # The SDXL VAE overflows in fp16 (NaN images): never a candidate however fast.
        skipped["fp16"] = "its config sets force_upcast (diffusers runs it in fp32: fp16 overflows)"
        names.remove("fp16")
    if int8:
        names.append(INT8)
    return names, skipped


def choose(
    spec: ComponentSpec,
    device: str,
    *,
    int8: bool = False,
    only: str | None = None,
    ops: tuple[list[tuple[Op, int]], int] | None = None,
    reuse: bool = False,
) -> Choice:
    """Ranks the candidate types of ``spec`` on this machine, fastest first (see :func:`candidates`).

    ``ops``: :func:`dominant_ops` of ``spec`` when the caller already has them. ``reuse``: take the ranking
    an earlier export measured for the same shapes and candidates on this machine (measurements.py), so that
    an identical export makes the same choice (and hits the compile cache) instead of one timing noise flips.
    """
    names, skipped = candidates(spec, int8=int8, only=only)
    ops, total = ops or dominant_ops(spec)
    selected = largest(ops, total, _FLOP_SHARE, _MAX_SHAPES)
    covered = sum(op.flops * count for op, count in selected)
    key = measurements.key("types", selected, names, skipped, device)
    if reuse and (known := measurements.recall(key)) is not None:
        return Choice(**{**known, "remembered": True})
    # Shape by shape, every candidate still in the race; one that is already _DROP_RATIO x slower than the
    # best after two shapes stops being timed (bf16 without bf16 instructions is 6-10x slower: timing all of
    # its shapes would add minutes to a full-size export) and its total is extrapolated by FLOPs.
    spent = dict.fromkeys(names, 0.0)
    flops_timed = dict.fromkeys(names, 0)
    racing = list(names)
    with torch.no_grad():
        for position, (op, count) in enumerate(selected):
            for name in racing:
                spent[name] += count * _seconds(_runner(op, _DTYPES.get(name, name), device), device)
                flops_timed[name] += op.flops * count
            best = min(spent[name] for name in racing)
            if 1 <= position < len(selected) - 1:
                racing = [name for name in racing if spent[name] <= _DROP_RATIO * best]
    seconds = {name: spent[name] * covered / flops_timed[name] for name in names}
    early = {name: f"{seconds[name] / min(seconds.values()):.1f}x slower" for name in names if name not in racing}
    ranked = sorted(names, key=seconds.__getitem__)
    choice = Choice(ranked, seconds, len(selected), covered / total if total else 1.0, skipped, early)
    measurements.remember(key, asdict(choice))
    return choice


def choose_fp32_linear(
    spec: ComponentSpec, device: str, *, ops: tuple[list[tuple[Op, int]], int] | None = None, reuse: bool = False
) -> LinearChoice | None:
    """Times the component's largest fp32 linear shapes through oneDNN and through MKL.

    None where there is nothing to choose: not a CPU, a torch without MKL, or no linear at all. ``ops`` as
    and ``reuse`` as for :func:`choose`.
    """
    if device != "cpu" or not torch._C.has_mkl or not torch.backends.mkldnn.is_available():
        return None
    ops, _ = ops or dominant_ops(spec)
    linears = [(op, count) for op, count in ops if op.kind == "linear"][:_MAX_SHAPES]
    if not linears:
        return None
    key = measurements.key("fp32 linear", linears, list(FP32_LINEAR_KERNELS), {}, device)
    if reuse and (known := measurements.recall(key)) is not None:
        return LinearChoice(**{**known, "remembered": True})
    spent = dict.fromkeys(FP32_LINEAR_KERNELS, 0.0)
    with torch.no_grad():
        for op, count in linears:
            spent["onednn"] += count * _seconds(_runner(op, torch.float32, device), device)
            spent["mkl"] += count * _seconds(_mkl_linear(op), device)
    choice = LinearChoice(min(spent, key=spent.__getitem__), spent, len(linears))
    measurements.remember(key, asdict(choice))
    return choice


def _mkl_linear(op: Op) -> Callable[[], Any]:
    """An unpacked fp32 linear as the compiled graph calls it: ``mm`` on the frozen, transposed weight (MKL)."""
    gen = torch.Generator().manual_seed(0)
    (m, k), (_, n) = op.shapes
    x, weight_t = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    return lambda: torch.mm(x, weight_t)
