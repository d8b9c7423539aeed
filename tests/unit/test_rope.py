"""Fused q/k RMSNorm + RoPE kernel (CPU interpreter) against the fp32 torch chain it replaces."""

from __future__ import annotations

import pytest
import torch

from engine.models.dit import apply_rope, rope_tables
from engine.ops.rope import rms_norm_rope, rms_norm_rope_reference


def _input(batch: int, length: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(batch, length, dim) * 3 + 0.5
    x[..., 5] *= 40  # an outlier channel: a norm over the wrong lanes shows
    return x.to(dtype)


@pytest.mark.parametrize(("heads", "head_dim", "grid"), [(2, 64, (2, 3, 5)), (3, 128, (3, 2, 3)), (5, 12, (1, 4, 3))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference_and_the_unfused_model_chain(heads: int, head_dim: int, grid: tuple[int, int, int],
                                                              dtype: torch.dtype) -> None:
    length, dim = grid[0] * grid[1] * grid[2], heads * head_dim
    # q as the first third of a fused q|k|v projection: strided rows, as the model passes it.
    qkv = _input(2, length, 3 * dim, dtype)
    x = qkv[..., :dim]
    weight = torch.rand(dim) * 2
    cos, sin = rope_tables(grid, head_dim)
    out = torch.full((2, length, heads, head_dim), float("nan"), dtype=dtype)
    rms_norm_rope(x, weight, cos, sin, heads, 1e-6, out=out)
    assert torch.isfinite(out).all()
    expected = rms_norm_rope_reference(x, weight, cos, sin, heads, 1e-6, out_dtype=torch.float32)
    # The model's unfused fp32 chain (fused RMSNorm then apply_rope) is the same function.
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    torch.testing.assert_close(apply_rope(normed.unflatten(2, (heads, -1)), cos, sin), expected)
    if dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    else:  # one bf16 step (the interpreter truncates where the GPU rounds)
        assert ((out.float() - expected).abs() <= expected.abs() * 2.0**-7 + 1e-6).all()


def test_rejects_bad_tables_and_odd_heads() -> None:
    x = torch.randn(1, 6, 32)
    cos, sin = rope_tables((1, 2, 3), 16)
    with pytest.raises(ValueError, match="cos/sin"):
        rms_norm_rope(x, torch.ones(32), cos[:5], sin[:5], heads=2)
    with pytest.raises(ValueError, match="even size"):
        rms_norm_rope(torch.randn(1, 6, 30), torch.ones(30), cos, sin, heads=2)
