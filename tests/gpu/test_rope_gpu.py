"""Fused q/k RMSNorm + RoPE on the GPU at the Wan shapes, against the fp32 torch reference."""

from __future__ import annotations

import pytest
import torch

from engine.models.dit import rope_tables
from engine.ops.rope import rms_norm_rope, rms_norm_rope_reference

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(("heads", "grid"), [(12, (21, 30, 52)), (40, (21, 45, 80))])
def test_rms_norm_rope_gpu_matches_reference(heads: int, grid: tuple[int, int, int]) -> None:
    length, dim = grid[0] * grid[1] * grid[2], heads * 128
    qkv = (torch.randn(1, length, 3 * dim, device="cuda") * 3 + 0.5).bfloat16()
    qkv[..., 7] *= 40
    x = qkv[..., dim : 2 * dim]  # k: a strided column slice
    weight = torch.rand(dim, device="cuda") * 2
    cos, sin = (t.cuda() for t in rope_tables(grid, 128))
    out = torch.full((1, length, heads, 128), float("nan"), dtype=torch.bfloat16, device="cuda")
    rms_norm_rope(x, weight, cos, sin, heads, 1e-6, out=out)
    expected = rms_norm_rope_reference(x, weight, cos, sin, heads, 1e-6, out_dtype=torch.float32)
    # one bf16 rounding of the fp32 result (half a step: 2^-8 relative), fp32 sums in another order
    assert ((out.float() - expected).abs() <= expected.abs() * 2.0**-8 + 1e-5).all()
