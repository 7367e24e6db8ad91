"""Long self-attention as chunked matrix multiplications and softmax (``--attention auto``).

``scaled_dot_product_attention`` on a CPU runs PyTorch's flash-attention kernel, which computes the scores in
blocks of 32-512 queries and keys with one small GEMM call per block: with SD 1.5's 40-wide heads the GEMMs are
too small to reach the matrix units, and the kernel runs far below them. Measured on an AMD EPYC Zen 5 (2 cores,
bf16, torch 2.13): the UNet's 4096-token self-attention (2 x 8 heads x 40) 290 ms per call, 1.7 s of a 3.5 s
UNet step, while the same attention written as ``bmm(q, k^T)``, an fp32 softmax and ``bmm(p, v)`` over chunks of
2 heads x 256 queries (scores of 8 MB, which stay in cache; 16 MB chunks now: ``_SCORE_BYTES``) runs in
146 ms once inductor has fused the scaling and softmax between the matmuls (the softmax now normalised after
the value product, with exp2: see :func:`chunked_attention`). Whether it pays depends on the CPU's GEMM kernels
(the flash kernel uses AMX where there is one), so ``auto`` times both on the component's long attention shapes,
in its type, and keeps the faster; the choice is printed and stored in its manifest (``attention_choice``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from . import measurements
from .choose_precision import REMEMBERED, Op

ATTENTIONS = ("auto", "sdpa", "chunked")
# Shorter attention (the 256-token blocks and below, cross-attention over 77 text tokens) stays SDPA: its
# scores are small, and the flash kernel is not what limits it. SD 1.5's 1024-token self-attention
# ([2,8,1024,80], bf16, Zen 4) runs in 21 ms chunked against SDPA's 33.
MIN_SCORES = 1024 * 1024
# Each chunk: 2 heads and as many queries as keep its fp32 scores within 16 MiB (512 queries of 4096 keys; a
# 1024-token attention in one chunk per head pair). Inductor lowers every chunk on its own, so their number is
# the export's cost: 8 MiB chunks (256 queries) made SD 1.5's UNet 800 chunks, and its 4096-token attention
# compiled in 30.4 s against 12.2 s for 16 MiB, which runs as fast (272.6 against 266.7 ms, [2,8,4096,40] bf16,
# median of 9 alternated calls; 1024 tokens 23.3 against 20.9 ms; AMD EPYC Zen 4, 2 cores).
_HEADS, _SCORE_BYTES, _MIN_QUERIES = 2, 16 << 20, 256
_LOG2_E = 1.4426950408889634


def eligible(q_shape: tuple, k_shape: tuple) -> bool:
    return q_shape[-2] * k_shape[-2] >= MIN_SCORES


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v)`` (no mask, no dropout) in chunks of heads and queries, the
    softmax in fp32, the result in ``q``'s type."""
    *batch, length, width = q.shape
    scale = width**-0.5 if scale is None else scale
    heads = 1
    for size in batch:
        heads *= size
    q, k, v = q.reshape(heads, length, width), k.reshape(heads, k.shape[-2], width), v.reshape(heads, v.shape[-2], -1)
    queries = max(_MIN_QUERIES, _SCORE_BYTES // (_HEADS * k.shape[1] * 4))
    rows = []
    for h in range(0, heads, _HEADS):
        keys, values = k[h : h + _HEADS].transpose(1, 2), v[h : h + _HEADS]
        parts = []
        for i in range(0, length, queries):
            scores = torch.bmm(q[h : h + _HEADS, i : i + queries], keys).float()
            # The softmax left unnormalised, its sum divided out of the small output instead: inductor then
            # computes each exponential once, in the pass that sums them, where torch.softmax computes it twice.
            # exp2 with log2(e) folded into the scale is the cheaper of the two in PyTorch's vector code.
            # Measured on an AMD EPYC Zen 4, bf16, [2,8,4096,40]: 244 -> 221 (unnormalised) -> 200 ms (exp2).
            weights = torch.exp2((scores - scores.amax(-1, keepdim=True)) * (scale * _LOG2_E))
            total = weights.sum(-1, keepdim=True)
            # (v^T p^T)^T rather than p v: the GEMM then has the long key axis as its inner dimension and the
            # 40-80 wide head as its rows, which oneDNN runs about 2x faster in bf16 (Zen 4: 231 -> 120 ms of PV
            # per 4096-token attention); the transpose back is a copy of the small output.
            out = torch.bmm(values.transpose(1, 2), weights.to(values.dtype).transpose(1, 2)).transpose(1, 2)
            parts.append((out.float() / total).to(values.dtype))
        rows.append(torch.cat(parts, 1))
    return torch.cat(rows).reshape(*batch, length, v.shape[-1])


@contextmanager
def chunked_long_attention(enabled: bool) -> Iterator[None]:
    """While open (and ``enabled``), every long self-attention traced runs :func:`chunked_attention`."""
    if not enabled:
        yield
        return
    sdpa = F.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is None and not dropout_p and not is_causal and not kwargs and eligible(query.shape, key.shape):
            return chunked_attention(query, key, value, scale)
        return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                    **kwargs)  # fmt: skip

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


@dataclass
class AttentionChoice:
    """The long attention shapes of a component, the milliseconds of each way per call, and the one kept."""

    shapes: list[dict[str, Any]]
    chosen: str
    remembered: bool = False

    def describe(self) -> str:
        timed = ", ".join(
            f"{s['query']}: sdpa {s['sdpa_ms']:.1f} ms, chunked {s['chunked_ms']:.1f} ms (x{s['calls']})"
            for s in self.shapes
        )
        return f"long attention {timed} -> {self.chosen}" + (REMEMBERED if self.remembered else "")

    def to_dict(self) -> dict[str, Any]:
        return {"shapes": self.shapes, "chosen": self.chosen}


def choose(ops: list[tuple[Op, int]], dtype: torch.dtype, device: str, *, reuse: bool = True) -> AttentionChoice | None:
    """Times SDPA against :func:`chunked_attention` (compiled by inductor, as the export compiles it) on each long
    attention shape of ``ops`` in ``dtype``; None when the component has none (or runs on a GPU)."""
    long = [(op, count) for op, count in ops if op.kind == "attention" and eligible(*op.shapes)]
    if not long or device != "cpu":
        return None
    key = measurements.key("attention", [op for op, _ in long], [str(dtype)], {}, device)
    known = measurements.recall(key) if reuse else None
    if known is not None:
        return AttentionChoice(known["shapes"], known["chosen"], remembered=True)
    shapes, totals = [], {"sdpa": 0.0, "chunked": 0.0}
    compiled = torch.compile(chunked_attention, dynamic=False)
    for op, count in long:
        (b, h, lq, e), (_, _, lk, _) = op.shapes
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(s, generator=gen).to(dtype) for s in ((b, h, lq, e), (b, h, lk, e), (b, h, lk, e)))
        with torch.no_grad():
            ms = {
                "sdpa": _ms(partial(F.scaled_dot_product_attention, q, k, v)),
                "chunked": _ms(partial(compiled, q, k, v)),
            }
        shapes.append({"query": list(op.shapes[0]), "key": list(op.shapes[1]), "calls": count,
                       "sdpa_ms": round(ms["sdpa"], 2), "chunked_ms": round(ms["chunked"], 2)})  # fmt: skip
        for name in totals:
            totals[name] += ms[name] * count
    torch._dynamo.reset()
    choice = AttentionChoice(shapes, min(totals, key=totals.get))
    measurements.remember(key, choice.to_dict())
    return choice


def _ms(fn) -> float:
    fn()
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3
