"""The traced rewrites of GroupNorm (export/group_norm.py) and long attention (export/attention.py): the same
function as PyTorch's, and what the traced graph then holds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aotdiffusion.export import attention
from aotdiffusion.export.group_norm import channel_stats_group_norms, group_norm
from aotdiffusion.export.precision import RELATIVE_TOLERANCE


@pytest.mark.parametrize(
    ("shape", "groups", "mean"),
    [((2, 64, 8, 8), 32, 0.0), ((2, 64, 8, 8), 32, 1000.0), ((1, 128, 16, 12), 32, 3.0), ((2, 32, 77), 8, 0.0)],
)
def test_group_norm_is_aten_group_norm(shape, groups, mean):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + mean
    weight, bias = torch.randn(shape[1], generator=generator), torch.randn(shape[1], generator=generator)
    exact = F.group_norm(x, groups, weight.double(), bias.double(), 1e-5)
    ours = group_norm(x.float(), groups, weight, bias, 1e-5).double()
    aten = F.group_norm(x.float(), groups, weight, bias, 1e-5).double()
    # As close to the float64 result as aten's own fp32 kernel, within a small factor (a large mean included:
    # the shifted sums keep the variance from cancelling).
    assert (ours - exact).abs().max() <= 4 * (aten - exact).abs().max() + 1e-6
    unaffine = group_norm(x.float(), groups, None, None, 1e-5).double()
    torch.testing.assert_close(unaffine, F.group_norm(x, groups, None, None, 1e-5), atol=1e-4, rtol=0)
    assert ours.dtype == torch.float64 and group_norm(x.bfloat16(), groups, weight, bias, 1e-5).dtype == torch.bfloat16


def test_group_norms_are_traced_rewritten_and_restored():
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 32, 3, padding=1), torch.nn.GroupNorm(8, 32), torch.nn.SiLU())
    x = torch.randn(1, 4, 8, 8)
    expected = model(x)
    with channel_stats_group_norms(model) as patched:
        assert patched == 1
        program = torch.export.export(model, (x,), strict=False)
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("group_norm" in op for op in ops), ops
    torch.testing.assert_close(program.module()(x), expected, atol=1e-5, rtol=0)
    assert "forward" not in vars(model[1])  # the module's own forward again


def test_chunked_attention_is_sdpa():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 600, 40, generator=generator) for _ in range(3))  # chunks do not divide 600
    torch.testing.assert_close(attention.chunked_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(
        attention.chunked_attention(q, k[:, :, :77], v[:, :, :77], scale=0.3),
        F.scaled_dot_product_attention(q, k[:, :, :77], v[:, :, :77], scale=0.3),
    )


def test_chunked_attention_in_bf16_is_within_the_bf16_tolerance():
    """The softmax normalised after the value product and exp2 for exp, in the type the export compiles it in.
    Large scores (x30) must not overflow: the row maximum is subtracted before exp2. Their error is not bounded
    here: the bf16 GEMM rounds the scores themselves, which the export's validation against eager measures."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 600, 40, generator=generator).bfloat16() for _ in range(3))
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    ours = attention.chunked_attention(q, k, v)
    assert ours.dtype == torch.bfloat16
    assert (ours.float() - exact).abs().max() / exact.abs().max() <= RELATIVE_TOLERANCE[torch.bfloat16]
    assert torch.isfinite(attention.chunked_attention(q * 30, k, v)).all()


def test_only_long_unmasked_attention_is_chunked(monkeypatch):
    monkeypatch.setattr(attention, "MIN_SCORES", 64 * 64)

    class Attend(torch.nn.Module):
        def forward(self, q, k, short):
            return F.scaled_dot_product_attention(q, k, k) + F.scaled_dot_product_attention(q, short, short).sum()

    q, k, short = torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8), torch.randn(1, 2, 8, 8)
    sdpa = F.scaled_dot_product_attention
    with attention.chunked_long_attention(True):
        program = torch.export.export(Attend(), (q, k, short), strict=False)
    assert F.scaled_dot_product_attention is sdpa  # restored
    ops = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert sum("scaled_dot_product" in op for op in ops) == 1, ops  # the short one stays SDPA
    assert any("bmm" in op for op in ops)
    torch.testing.assert_close(program.module()(q, k, short), Attend()(q, k, short))
