"""Wan's q/k preparation in one pass: RMSNorm over the full dim, times its weight, 3-D RoPE, one cast.

The unfused chain (`WanRMSNorm` → `apply_rope` → `.to(bf16)`) reads and writes the [B, L, H·Dh] q and k in fp32
about ten times per block (the RoPE alone is a float cast, four products, two sums and a stack); on the H100 that
glue cost more than the attention it feeds. Here each token row is read once (any dtype, any row stride, so q
and k can be column slices of one fused projection) and written once as [B, L, H, Dh] in `out_dtype`.

Math (fp32 throughout, one rounding at the end, as TurboDiffusion's FastRMSNorm followed by an fp32 RoPE):
    y = x · rsqrt(mean(x²) + eps) · weight                     over all H·Dh channels of a token
    (y_2j, y_2j+1) → (y_2j·cos − y_2j+1·sin, y_2j·sin + y_2j+1·cos)   angle of pair j mod Dh/2 of that token
`rms_norm_rope_reference` is the plain-torch definition the kernel is tested against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def rms_norm_rope_reference(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                            heads: int, eps: float = 1e-6, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [B, L, H·Dh] → [B, L, H, Dh]: fp32 RMSNorm · weight, RoPE by the [L, 1, Dh/2] tables, one cast."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
    pairs = y.unflatten(-1, (heads, -1, 2))  # [B, L, H, Dh/2, 2]
    even, odd = pairs.unbind(-1)
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).to(out_dtype or x.dtype)


@triton.jit
def _rms_norm_rope_kernel(
    x_ptr, weight_ptr, cos_ptr, sin_ptr, out_ptr,
    R, L, D, HALF_DH, eps,
    stride_xb, stride_xl,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """BLOCK_R token rows per program; a row's D channels are held as BLOCK_P (≥ D/2) (even, odd) pairs."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    pairs = tl.arange(0, BLOCK_P)
    row_ok = rows < R
    pair_ok = pairs < D // 2
    mask = row_ok[:, None] & pair_ok[None, :]
    batch = rows // L
    token = rows % L
    cols = tl.arange(0, 2 * BLOCK_P)
    col_mask = row_ok[:, None] & (cols < D)[None, :]
    x_row = x_ptr + batch * stride_xb + token * stride_xl
    # One contiguous load per row, split into the (even, odd) halves of each pair in registers.
    x = tl.load(x_row[:, None] + cols[None, :], mask=col_mask, other=0.0).to(tl.float32)
    even, odd = tl.split(tl.reshape(x, (BLOCK_R, BLOCK_P, 2)))
    rstd = tl.math.rsqrt((tl.sum(even * even, axis=1) + tl.sum(odd * odd, axis=1)) / D + eps)
    even = even * rstd[:, None] * tl.load(weight_ptr + 2 * pairs, mask=pair_ok, other=0.0).to(tl.float32)[None, :]
    odd = odd * rstd[:, None] * tl.load(weight_ptr + 2 * pairs + 1, mask=pair_ok, other=0.0).to(tl.float32)[None, :]
    # Every head rotates its pair j by the token's angle j (tables [L, Dh/2], shared by the heads).
    angle = token[:, None] * HALF_DH + (pairs % HALF_DH)[None, :]
    cos = tl.load(cos_ptr + angle, mask=mask, other=0.0)
    sin = tl.load(sin_ptr + angle, mask=mask, other=0.0)
    out = tl.interleave(even * cos - odd * sin, even * sin + odd * cos)  # [BLOCK_R, 2·BLOCK_P], pairs adjacent
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=col_mask)


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                  eps: float = 1e-6, *, out_dtype: torch.dtype | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused RMSNorm (full dim) + 3-D RoPE of q or k.

    Args:
        x: [B, L, H·Dh], channels contiguous; rows may be strided (a column slice of a fused q|k|v output).
        weight: [H·Dh] the RMSNorm weight.
        cos, sin: [L, 1, Dh/2] fp32 tables of `engine.models.dit.rope_tables` (contiguous).
        heads: H.
        eps: RMSNorm epsilon.
        out_dtype: result dtype, default x.dtype.
        out: preallocated contiguous [B, L, H, Dh] result.

    Returns:
        [B, L, H, Dh] contiguous.
    """
    batch, length, dim = x.shape
    if dim % heads or (dim // heads) % 2:
        raise ValueError(f"dim {dim} must split into {heads} heads of an even size")
    half = dim // heads // 2
    if x.stride(2) != 1:
        raise ValueError("x needs contiguous channels")
    if cos.shape != (length, 1, half) or sin.shape != cos.shape or not (cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError(f"cos/sin must be contiguous [{length}, 1, {half}]; got {tuple(cos.shape)}")
    if weight.shape != (dim,):
        raise ValueError(f"weight must be [{dim}]; got {tuple(weight.shape)}")
    shape = (batch, length, heads, dim // heads)
    dtype = out_dtype or x.dtype
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=x.device)
    elif out.shape != shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} {shape}")
    rows = batch * length
    block_p = triton.next_power_of_2(dim // 2)
    block_r = max(1, min(8, 2048 // block_p))
    _rms_norm_rope_kernel[(triton.cdiv(rows, block_r),)](
        x, weight, cos, sin, out,
        rows, length, dim, half, eps,
        x.stride(0), x.stride(1),
        BLOCK_R=block_r, BLOCK_P=block_p, num_warps=max(1, min(16, block_r * block_p // 256)),
    )
    return out
