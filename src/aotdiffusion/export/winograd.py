"""``--conv-algorithm``: 3x3 convolutions as Winograd's minimal filtering, chosen per shape by timing.

At fp32 every peer runs the same oneDNN direct convolutions at this CPU's FMA peak (AMD Zen 3: 0.19 TFLOP/s
for OpenVINO and for us), so a faster convolution needs fewer multiplications, not a faster kernel. Winograd's
F(m x m, 3 x 3) (Lavin & Gray 2015) computes each m x m output tile from an (m+2) x (m+2) input tile with
(m+2)^2 multiplications per channel pair instead of 9 m^2: 2.25x fewer for F(2x2, 3x3), 4x fewer for F(4x4, 3x3).
Algebraically it is the same convolution; only the rounding differs (about 1e-5 of the output's range for
F(4x4, 3x3) in fp32, against the export's fp32 validation tolerance of 1e-3).

Written in plain tensor operations, so AOTInductor compiles it like the rest of the graph: the weight transform
G g G^T depends on the weights only, so freezing folds it into a constant at compile time; the input and output
transforms are sums of tile slices with small integer coefficients (unrolled, so inductor fuses them into
vectorised loops over the channels), and the (m+2)^2 products per tile are one batched matrix multiplication.
Whether that beats oneDNN's direct kernel depends on the shape (the transforms move memory; at 8x8 or at the
VAE's 512x512 they cost more than they save), so the export times both per convolution shape and keeps the
faster one; where they tie (within 5%), the one with the smaller weights (F(4x4, 3x3) stores 36 values a
channel pair, F(2x2, 3x3) 16, direct 9).

In bf16 only F(2x2, 3x3) is tried: the transformed tiles are rounded to bf16 before the products, and F(4x4,
3x3)'s larger coefficients then cost about a tenth of the output's range (measured 9e-2 to 1.1e-1 on SD 1.5's
shapes), where F(2x2, 3x3) costs about twice a direct bf16 convolution's rounding (6e-3 to 8e-3 against
3e-3 to 4e-3). The weight transform is computed in fp32 and rounded once. On an AMD EPYC Zen 4 (family 25
model 17, AVX512-BF16, 2 cores), F(2x2, 3x3) in bf16 ran SD 1.5's UNet convolutions 1.2-1.6x faster than
oneDNN's prepacked direct bf16 kernels (64x64 to 16x16; slower at 8x8).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from ..runtime.memory import return_freed_memory
from . import measurements
from .choose_precision import Op, _runner, _seconds, largest
from .precision import AUTO_CAST_TYPES

CONV_ALGORITHMS = ("auto", "direct", "winograd")
# Output tile sizes m of F(m x m, 3 x 3) that are tried. Larger tiles save more multiplications but need
# larger transform coefficients (F(6x6, 3x3) loses about 3 more decimal digits in fp32) and more memory.
TILES = (2, 4)
# The tiles tried in each type (module docstring: F(4x4,3x3) is too coarse in bf16).
TILES_BY_DTYPE: dict[torch.dtype, tuple[int, ...]] = {torch.float32: TILES, torch.bfloat16: (2,)}

# B^T, G, A^T of F(2, 3) and F(4, 3) (Lavin & Gray 2015, interpolation points 0, +-1 / 0, +-1, +-2, inf).
_MATRICES: dict[int, tuple[list[list[float]], list[list[float]], list[list[float]]]] = {
    2: (
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]],
    ),
    4: (
        [
            [4, 0, -5, 0, 1, 0],
            [0, -4, -4, 1, 1, 0],
            [0, 4, -4, -1, 1, 0],
            [0, -2, -1, 2, 1, 0],
            [0, 2, -1, -2, 1, 0],
            [0, 4, 0, -5, 0, 1],
        ],
        [
            [1 / 4, 0, 0],
            [-1 / 6, -1 / 6, -1 / 6],
            [-1 / 6, 1 / 6, -1 / 6],
            [1 / 24, 1 / 12, 1 / 6],
            [1 / 24, -1 / 12, 1 / 6],
            [0, 0, 1],
        ],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    ),
}


# The names the export uses for each type ("fp32", "bf16"), in measurement keys, manifests and its log.
DTYPE_NAMES = {dtype: name for name, dtype in AUTO_CAST_TYPES.items()}


def eligible(weight_shape: tuple, stride: tuple, padding: tuple, dilation: tuple, groups: int) -> bool:
    """A dense 3x3 convolution with stride 1 and "same" padding: what the Winograd path computes."""
    return (
        len(weight_shape) == 4
        and tuple(weight_shape[2:]) == (3, 3)
        and tuple(stride) == (1, 1)
        and tuple(padding) == (1, 1)
        and tuple(dilation) == (1, 1)
        and groups == 1
    )


def _combine(terms: list[torch.Tensor], coefficients: list[float]) -> torch.Tensor:
    """sum_j coefficients[j] * terms[j], skipping zeros: unrolled so inductor fuses it into one loop."""
    out = None
    for c, term in zip(coefficients, terms):
        if c == 0:
            continue
        scaled = term if c == 1 else -term if c == -1 else term * c
        out = scaled if out is None else out + scaled
    assert out is not None
    return out


def transform_weight(weight: torch.Tensor, tile: int) -> torch.Tensor:
    """G g G^T for every (output, input) channel pair, laid out [(m+2)^2, C_in, C_out] for the batched product,
    in ``weight``'s type (computed in fp32: a bf16 weight is rounded once, after the transform).

    Depends on the weights only: with freezing, AOTInductor computes it once at compile time.
    """
    _, g, _ = _MATRICES[tile]
    g = torch.tensor(g, dtype=torch.float32, device=weight.device)
    alpha = tile + 2
    u = _cast(torch.einsum("ai,kcij,bj->abck", g, _cast(weight, torch.float32), g), weight.dtype)
    return u.reshape(alpha * alpha, weight.shape[1], weight.shape[0])


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)`` without the type check torch.export records for ``.to``: freezing folds the cast, but
    the check on its input kept that input (a weight, or the fp32 transform before rounding) alive through the
    compile as a constant of the frozen graph."""
    return tensor if tensor.dtype == dtype else torch.ops.aten._to_copy.default(tensor, dtype=dtype)


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile: int) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 ``weight``, by Winograd's F(tile x tile, 3 x 3)."""
    return _transformed_conv3x3(x, transform_weight(weight, tile), bias, tile)


def _transformed_conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, tile: int) -> torch.Tensor:
    """:func:`conv3x3` on the transformed weight ``u`` (:func:`transform_weight`)."""
    bt, _, at = _MATRICES[tile]
    alpha = tile + 2
    n, c, h, w = x.shape
    k = u.shape[2]
    th, tw = -(-h // tile), -(-w // tile)
    # Pad to whole tiles (1 on the top/left, the rest on the bottom/right), then view the overlapping
    # (m+2)-wide input tiles with the channels innermost: every transform below is vectorised over them.
    padded = F.pad(x, (1, tw * tile + 1 - w, 1, th * tile + 1 - h))
    d = padded.permute(0, 2, 3, 1).unfold(1, alpha, tile).unfold(2, alpha, tile)  # n th tw c a a
    d = d.permute(0, 1, 2, 4, 5, 3)  # n th tw a a c
    # Input transform B^T d B, one axis at a time (each stack is one realised buffer).
    rows = torch.stack([_combine([d[:, :, :, i] for i in range(alpha)], bt[r]) for r in range(alpha)], 0)
    v = torch.stack([_combine([rows[..., j, :] for j in range(alpha)], bt[s]) for s in range(alpha)], 1)
    products = torch.bmm(v.reshape(alpha * alpha, n * th * tw, c), u)
    products = products.view(alpha, alpha, n, th, tw, k)
    # Output transform A^T M A, then the tiles back into an image (channels-last), cropped to h x w.
    rows = torch.stack([_combine([products[i] for i in range(alpha)], at[r]) for r in range(tile)], 0)
    y = torch.stack([_combine([rows[:, j] for j in range(alpha)], at[s]) for s in range(tile)], 1)
    y = y.permute(2, 3, 0, 4, 1, 5).reshape(n, th * tile, tw * tile, k)[:, :h, :w].permute(0, 3, 1, 2)
    return y if bias is None else y + bias[None, :, None, None]


def shape_key(x_shape: tuple, weight_shape: tuple) -> str:
    return f"{'x'.join(map(str, x_shape))}/{'x'.join(map(str, weight_shape))}"


@contextmanager
def winograd_convs(module: torch.nn.Module, tiles: dict[str, int]) -> Iterator[int]:
    """While open, each eligible ``nn.Conv2d`` of ``module`` whose (input, weight) shape is in ``tiles`` runs
    as Winograd with that tile (the module keeps its parameters, so its state dict is unchanged).

    Yields the number of convolution modules patched (a module called at several shapes counts once).
    """
    patched = []
    for conv in module.modules():
        if not isinstance(conv, torch.nn.Conv2d) or conv.padding_mode != "zeros":
            continue
        if not eligible(tuple(conv.weight.shape), conv.stride, conv.padding, conv.dilation, conv.groups):
            continue
        if not any(key.endswith("/" + "x".join(map(str, conv.weight.shape))) for key in tiles):
            continue
        conv.forward = _winograd_forward(conv, tiles)
        patched.append(conv)
    try:
        yield len(patched)
    finally:
        for conv in patched:
            del conv.forward  # back to the class's forward


def _winograd_forward(conv: torch.nn.Conv2d, tiles: dict[str, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    direct = type(conv).forward.__get__(conv)

    def forward(x: torch.Tensor) -> torch.Tensor:
        tile = tiles.get(shape_key(tuple(x.shape), tuple(conv.weight.shape)))
        if tile is None or tile not in TILES_BY_DTYPE.get(x.dtype, ()) or conv.weight.dtype != x.dtype:
            return direct(x)
        return conv3x3(x, conv.weight, conv.bias, tile)

    return forward


@dataclass
class ConvChoice:
    """Per eligible 3x3 convolution shape: the measured milliseconds of each algorithm and the one kept."""

    shapes: list[dict[str, Any]]  # {"key", "count", "ms": {"direct", "winograd2", "winograd4"}, "chosen"}
    remembered: bool = False
    dtype: str = "fp32"  # the type the convolutions were timed (and are compiled) in

    def tiles(self) -> dict[str, int]:
        return {s["key"]: int(s["chosen"].removeprefix("winograd")) for s in self.shapes if s["chosen"] != "direct"}

    def seconds(self, which: str) -> float:
        """Count-weighted time of the timed shapes: ``direct`` everywhere, or the ``chosen`` algorithms."""
        return sum(s["count"] * s["ms"][s[which] if which == "chosen" else which] for s in self.shapes) / 1e3

    def describe(self) -> str:
        won = sum(s["count"] for s in self.shapes if s["chosen"] != "direct")
        total = sum(s["count"] for s in self.shapes)
        tail = " (measured by an earlier export on this machine; --no-cache measures again)" if self.remembered else ""
        return (
            f"3x3 convolutions: Winograd for {won} of {total} calls ({len(self.tiles())} of {len(self.shapes)} "
            f"shapes): {self.seconds('direct') * 1e3:.0f} ms direct -> {self.seconds('chosen') * 1e3:.0f} ms{tail}"
        )

    def _tiles_tried(self) -> str:
        names = {name for shape in self.shapes for name in shape["ms"] if name != "direct"}
        tiles = sorted(int(name.removeprefix("winograd")) for name in names)
        return " and ".join(f"F({t}x{t},3x3)" for t in tiles)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": f"timed oneDNN's prepacked direct convolution against Winograd {self._tiles_tried()} compiled "
            f"by inductor, per {self.dtype} 3x3 convolution shape; kept the one with the smallest weights among "
            f"those within {TIE:.0%} of the fastest",
            "dtype": self.dtype,
            "shapes": self.shapes,
            "seconds": {"direct": round(self.seconds("direct"), 6), "chosen": round(self.seconds("chosen"), 6)},
        }


# Timing a Winograd shape compiles it (4-10 s on 2 cores), so only the largest shapes are timed: those that
# make up this share of the eligible convolutions' FLOPs, at most _MAX_SHAPES; the rest stay direct. Thin
# convolutions (a UNet's conv_in/conv_out, 4 channels) have too few channel pairs to amortise the transforms.
_FLOP_SHARE = 0.9
_MAX_SHAPES = 12
_MIN_CHANNELS = 32
# A convolution this small (a tiny test model's) cannot repay seconds of compiling to time it.
_MIN_FLOPS = 10**9


def eligible_ops(ops: list[tuple[Op, int]]) -> list[tuple[Op, int]]:
    """The eligible convolutions worth timing, largest first (``ops`` comes sorted from ``dominant_ops``)."""
    convs = [
        (op, count)
        for op, count in ops
        if op.kind == "conv"
        and eligible(*op.shapes[1:])
        and min(op.shapes[1][:2]) >= _MIN_CHANNELS
        and op.flops >= _MIN_FLOPS
    ]
    return largest(convs, sum(op.flops * count for op, count in convs), _FLOP_SHARE, _MAX_SHAPES)


def choose(
    ops: list[tuple[Op, int]],
    device: str,
    *,
    dtype: torch.dtype = torch.float32,
    force: bool = False,
    reuse: bool = False,
) -> ConvChoice | None:
    """Times each eligible 3x3 convolution shape (from ``dominant_ops``) in ``dtype`` (fp32 or bf16) direct and
    as Winograd with each of :data:`TILES_BY_DTYPE`'s tiles.

    ``force`` (``--conv-algorithm winograd``): every timed shape runs as Winograd, with the faster tile.
    ``reuse``: a shape this machine timed before (for another export, or the UNet's step-caching graph) is not
    timed again (measurements.py). None where there is nothing to choose (not a CPU, no convolution worth it).
    """
    convs = eligible_ops(ops)
    if device != "cpu" or not convs or dtype not in TILES_BY_DTYPE:
        return None
    tiles, dtype_name = TILES_BY_DTYPE[dtype], DTYPE_NAMES[dtype]
    shapes, remembered = [], True
    with torch.no_grad():
        for op, count in convs:
            x_shape, w_shape = op.shapes[0], op.shapes[1]
            algorithms = ["direct", *(f"winograd{t}" for t in tiles)]
            # fp32's key is as before this took a type, so that earlier exports' timings are still found.
            key = measurements.key("conv algorithm", [op], algorithms if dtype == torch.float32 else
                                   [dtype_name, *algorithms], {}, device)  # fmt: skip
            ms = (measurements.recall(key) or {}).get("ms") if reuse else None
            if ms is None:
                remembered = False
                ms = {"direct": _seconds(_runner(op, dtype, device), device) * 1e3}
                for tile in tiles:
                    ms[f"winograd{tile}"] = _seconds(_compiled_winograd(x_shape, w_shape, tile, dtype), device) * 1e3
                measurements.remember(key, {"ms": ms})
                # The heap keeps what a timing freed (runtime/memory.py, applied by the first validation) and each
                # shape's buffers differ in size: the VAE decoder's 512x512 shapes piled up to 9.9 GiB unreturned.
                return_freed_memory()
            chosen = lightest_of_the_fastest(ms, force=force)
            shapes.append({"key": shape_key(x_shape, w_shape), "count": count, "ms": ms, "chosen": chosen})
    return ConvChoice(shapes, remembered=remembered, dtype=dtype_name)


# Values stored per channel pair by each algorithm: F(m x m, 3 x 3) keeps the (m+2)^2 transformed weights.
WEIGHT_VALUES = {"direct": 9, **{f"winograd{t}": (t + 2) ** 2 for t in TILES}}
# Timings within this share of the fastest are a tie, which the algorithm with the smaller weights wins: a
# near-tie flips from one export to the next, and the heavier tile costs memory and disk for nothing. On the AMD
# EPYC Zen 3, SD 1.5's 640-channel 64x64 convolution timed F(2x2) 183.9 ms, F(4x4) 183.3 (F(4x4): 56 MiB of
# weights, F(2x2): 25). On the Zen 2 two exports of the same model made UNets of 6714 and 8089 MiB (export peaks
# 14.09 and 10.56 GiB, the first before the load stopped holding the blob twice): most likely the eleven
# 1280-channel 8x8 convolutions' tile flipping (11 x 131 MiB; the timings were not kept).
TIE = 0.05


def lightest_of_the_fastest(ms: dict[str, float], *, force: bool = False) -> str:
    """Of the algorithms timed ``ms`` (``force``: but direct), the one with the smallest weights among those
    within :data:`TIE` of the fastest."""
    names = [name for name in ms if not (force and name == "direct")]
    fastest = min(ms[name] for name in names)
    return min((name for name in names if ms[name] <= fastest * (1 + TIE)), key=WEIGHT_VALUES.__getitem__)


def _compiled_winograd(x_shape: tuple, w_shape: tuple, tile: int, dtype: torch.dtype) -> Callable[[], Any]:
    """The Winograd convolution of these shapes as the export compiles it: the weight transform done once
    (freezing folds it into a constant there), the rest compiled by inductor."""
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(w_shape, generator=gen) / math.sqrt(w_shape[1] * 9)).to(dtype)
    u, bias = transform_weight(weight, tile).contiguous(), torch.zeros(w_shape[0], dtype=dtype)
    x = torch.randn(x_shape, generator=gen).to(dtype=dtype, memory_format=torch.channels_last)
    # A fresh compile per shape: dynamo stops recompiling one function after a few shapes and runs it eagerly.
    torch._dynamo.reset()
    compiled = torch.compile(partial(_transformed_conv3x3, tile=tile))
    compiled(x, u, bias)
    return lambda: compiled(x, u, bias)
