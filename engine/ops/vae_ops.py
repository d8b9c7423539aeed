"""The Wan VAE's per-pixel passes fused into Triton kernels for channels-last activations, fp32 math.

Ops (x [B, C, *spatial], the channel dim 1 innermost in memory for the Triton backend):
- `vae_rms_norm(x, gamma, bias, residual, silu)`: the VAE's RMS norm (official `RMS_norm`: F.normalize over
  the channels, eps 1e-12, times sqrt(C)·gamma), optionally followed by the SiLU that always comes after it
  in a ResidualBlock and in the decoder head, and optionally preceded by the per-channel bias and the
  residual that the previous layer left to add (s = x + bias + residual). `sum_out` (which may be x itself)
  also receives s, for a caller that still needs the value; `out` (which may be a view, e.g. the tail of a
  causal conv's input buffer) receives the result.
- `add_bias_residual(x, bias, residual, out)`: s alone, in one pass.
- `upsample_nearest2x(x, bias, residual)`: s, then the Resample's nearest x2 upsample, in one pass (4-D
  [N, C, H, W] images).

The Triton kernels read each input once and write each output once (rows of C channels, several rows per
program; the upsample writes each value four times). The "torch" backend is the `*_reference` below: plain
torch on any layout, in fp32 (a no-op cast for fp32 inputs), and in fp32 without bias and residual it
computes exactly the old module's `F.normalize(x.float(), dim=1) * (gamma.float() * C**0.5)` and F.silu, so
the CPU decode keeps its bits.

Rounding: the kernel casts once, after the SiLU. The old module cast the norm to x's dtype, ran the SiLU in
that dtype and cast again (two roundings in bf16), and added the conv bias and the residual in bf16 too; the
fused result differs from it by at most those bf16 roundings.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

Backend = Literal["triton", "torch"]

NORM_EPS = 1e-12  # F.normalize's default, which the official RMS_norm uses


# ------------------------------------------------------------------------------------------------------------
# References (plain torch, fp32)
# ------------------------------------------------------------------------------------------------------------


def _per_channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-channel vector (any shape with C elements) as [C, 1, …] broadcasting against x [B, C, …]."""
    return v.float().reshape(-1, *([1] * (x.dim() - 2)))


def add_bias_residual_reference(
    x: torch.Tensor, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """(x + bias[c]) + residual in fp32."""
    s = x.float()
    if bias is not None:
        s = s + _per_channel(bias, x)
    if residual is not None:
        s = s + residual.float()
    return s


def vae_rms_norm_reference(
    x: torch.Tensor,
    gamma: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    silu: bool = False,
    eps: float = NORM_EPS,
) -> torch.Tensor:
    """[silu](F.normalize(x + bias + residual, dim=1) · sqrt(C)·gamma) in fp32."""
    s = add_bias_residual_reference(x, bias, residual)
    y = F.normalize(s, dim=1, eps=eps) * (_per_channel(gamma, x) * x.shape[1] ** 0.5)
    return F.silu(y) if silu else y


def upsample_nearest2x_reference(
    x: torch.Tensor, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """Nearest x2 upsample of (x + bias[c]) + residual over the last two dims, in x's dtype (the sum rounded
    once, then copied: what the add followed by `nn.Upsample(mode="nearest-exact")` gives at scale 2)."""
    s = add_bias_residual_reference(x, bias, residual).to(x.dtype)
    return F.interpolate(s, scale_factor=2.0, mode="nearest-exact")


# ------------------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_sum(
    x_ptr, bias_ptr, residual_ptr, R, stride_xb, stride_xr, stride_rb, stride_rr,
    C: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """This program's BLOCK_R rows of batch item program_id(1): batch, rows, cols, mask and
    s = x + bias + residual in fp32 (masked lanes 0)."""
    batch = tl.program_id(1).to(tl.int64)
    # int64 offsets: a batch of 720P chunks passes 2^31 elements.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mask = (rows < R)[:, None] & col_ok[None, :]
    s = tl.load(x_ptr + batch * stride_xb + rows[:, None] * stride_xr + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    if HAS_BIAS:
        s += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        s += tl.load(residual_ptr + batch * stride_rb + rows[:, None] * stride_rr + cols[None, :], mask=mask,
                     other=0.0).to(tl.float32)
    return batch, rows, cols, mask, s


@triton.jit
def _vae_norm_kernel(
    # pointers
    x_ptr, bias_ptr, residual_ptr, sum_ptr, gamma_ptr, y_ptr,
    # sizes and constants
    R, scale, eps,
    # strides of the [B, R, C] views (channel stride 1): per batch item, per row
    stride_xb, stride_xr, stride_rb, stride_rr, stride_sb, stride_sr, stride_yb, stride_yr,
    # meta-parameters
    C: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, STORE_SUM: tl.constexpr,
    NORM: tl.constexpr, SILU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """BLOCK_R rows (pixels) of batch item program_id(1), each row's C channels whole in registers."""
    batch, rows, cols, mask, s = _load_sum(x_ptr, bias_ptr, residual_ptr, R, stride_xb, stride_xr, stride_rb,
                                           stride_rr, C, HAS_BIAS, HAS_RESIDUAL, BLOCK_R, BLOCK_C)
    col_ok = cols < C
    if STORE_SUM:
        tl.store(sum_ptr + batch * stride_sb + rows[:, None] * stride_sr + cols[None, :],
                 s.to(sum_ptr.dtype.element_ty), mask=mask)
    if NORM:
        # F.normalize: s / max(||s||, eps); masked lanes hold 0 and add nothing to the sum of squares.
        denom = tl.maximum(tl.sqrt(tl.sum(s * s, axis=1)), eps)
        gamma = tl.load(gamma_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) * scale
        y = s / denom[:, None] * gamma[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + batch * stride_yb + rows[:, None] * stride_yr + cols[None, :],
                 y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _upsample2x_kernel(
    x_ptr, bias_ptr, residual_ptr, y_ptr,
    R, W,
    # strides of the [N, R, C] input views and of the [N, 4R, C] output (channel stride 1)
    stride_xb, stride_xr, stride_rb, stride_rr, stride_yb, stride_yr,
    C: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """BLOCK_R input pixels (of R = H·W, row-major) of image program_id(1): each pixel's C channels, summed
    once in fp32, stored at output pixels (2h + dy, 2w + dx) of the [2H, 2W] image."""
    batch, rows, cols, mask, s = _load_sum(x_ptr, bias_ptr, residual_ptr, R, stride_xb, stride_xr, stride_rb,
                                           stride_rr, C, HAS_BIAS, HAS_RESIDUAL, BLOCK_R, BLOCK_C)
    value = s.to(y_ptr.dtype.element_ty)
    # Output pixel index of (2h, 2w) in the [2H, 2W] image; its right neighbour is +1, the row below +2W.
    top_left = (rows // W) * (4 * W) + (rows % W) * 2
    y = y_ptr + batch * stride_yb + cols[None, :]
    for corner in tl.static_range(4):
        out_rows = top_left + (corner // 2) * (2 * W) + corner % 2
        tl.store(y + out_rows[:, None] * stride_yr, value, mask=mask)


# ------------------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------------------


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """t [B, C, *spatial] as a [B, R, C] view with channel stride 1 (channels-last), no copy."""
    batch, channels = t.shape[0], t.shape[1]
    try:
        view = t.movedim(1, -1).view(batch, -1, channels)
    except RuntimeError:
        view = None
    if view is None or (channels > 1 and view.stride(2) != 1):
        raise ValueError(f"{name} {tuple(t.shape)} with strides {t.stride()} is not channels-last; the "
                         "Triton backend needs the channels innermost (channels_last / channels_last_3d)")
    return view


def _launch(
    x: torch.Tensor,
    gamma: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    sum_out: torch.Tensor | None,
    out: torch.Tensor | None,
    silu: bool,
    eps: float,
) -> None:
    b, c = x.shape[0], x.shape[1]
    for name, t in (("residual", residual), ("sum_out", sum_out), ("out", out)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"{name} must have x's shape {tuple(x.shape)}; got {tuple(t.shape)}")
    for name, t in (("bias", bias), ("gamma", gamma)):
        if t is not None and t.numel() != c:
            raise ValueError(f"{name} must have {c} elements; got {tuple(t.shape)}")
    x_rows = _rows(x, "x")
    dummy = x_rows  # never read: its constexpr flag is off
    residual_rows = _rows(residual, "residual") if residual is not None else dummy
    sum_rows = _rows(sum_out, "sum_out") if sum_out is not None else dummy
    out_rows = _rows(out, "out") if out is not None else dummy
    num_rows = x_rows.shape[1]
    block_c = triton.next_power_of_2(c)
    block_r = max(1, 4096 // block_c)  # ~4096 values a program: 32 a thread on 4 warps
    grid = (triton.cdiv(num_rows, block_r), b)
    _vae_norm_kernel[grid](
        x_rows,
        bias.reshape(-1) if bias is not None else dummy,
        residual_rows,
        sum_rows,
        gamma.reshape(-1) if gamma is not None else dummy,
        out_rows,
        num_rows, c**0.5, eps,
        x_rows.stride(0), x_rows.stride(1), residual_rows.stride(0), residual_rows.stride(1),
        sum_rows.stride(0), sum_rows.stride(1), out_rows.stride(0), out_rows.stride(1),
        C=c, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, STORE_SUM=sum_out is not None,
        NORM=out is not None, SILU=silu, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip


def _check_backend(backend: str) -> None:
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend {backend!r} is not 'triton' or 'torch'")


def vae_rms_norm(
    x: torch.Tensor,
    gamma: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    silu: bool = False,
    out: torch.Tensor | None = None,
    sum_out: torch.Tensor | None = None,
    eps: float = NORM_EPS,
    backend: Backend = "triton",
) -> torch.Tensor:
    """[silu](RMS-normalise s = x + bias[c] + residual over the channels (dim 1), times sqrt(C)·gamma).

    Args:
        x: [B, C, *spatial]; for the Triton backend channels-last (channel stride 1, dense rows).
        gamma: C elements (the module's [C, 1, 1, 1] or [C, 1, 1] parameter).
        bias: C elements or None, a per-channel term the producing conv left out.
        residual: x's shape or None.
        silu: apply SiLU to the normalised value (ResidualBlock, decoder head) or not (AttentionBlock).
        out: where the result goes (x's shape, any dtype, a strided view is fine); default a new tensor like
            x.
        sum_out: if given (x's shape; may be x itself), also receives s in its dtype.
        eps: floor of the L2 norm (F.normalize's default 1e-12).
        backend: "triton" (one read, one write) or "torch" (the fp32 reference, any layout and device).

    Returns:
        out (or the new tensor), x's shape.
    """
    _check_backend(backend)
    if out is None:
        out = torch.empty_like(x)  # keeps x's memory format
    if backend == "torch":
        if sum_out is not None:
            s = add_bias_residual_reference(x, bias, residual)
            sum_out.copy_(s)
            out.copy_(vae_rms_norm_reference(s, gamma, silu=silu, eps=eps))
        else:
            out.copy_(vae_rms_norm_reference(x, gamma, bias, residual, silu, eps))
        return out
    _launch(x, gamma, bias, residual, sum_out, out, silu, eps)
    return out


def add_bias_residual(
    x: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    backend: Backend = "triton",
) -> torch.Tensor:
    """out = x + bias[c] + residual in one pass, fp32 math (out may be x itself, or a strided view).

    Args:
        x: [B, C, *spatial]; for the Triton backend channels-last.
        bias: C elements or None.
        residual: x's shape or None.
        out: destination (x's shape), default a new tensor like x.
        backend: "triton" or "torch" (the fp32 reference).

    Returns:
        out (or the new tensor).
    """
    _check_backend(backend)
    if out is None:
        out = torch.empty_like(x)
    if backend == "torch":
        return out.copy_(add_bias_residual_reference(x, bias, residual))
    _launch(x, None, bias, residual, out, None, False, NORM_EPS)
    return out


def upsample_nearest2x(
    x: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Nearest x2 upsample of s = x + bias[c] + residual (the Resample's `nearest-exact`, exact at scale 2),
    s computed once in fp32 and rounded to x's dtype: one read of each input, four writes of each value. The
    fused path's op only (the plain path keeps the module's add and `nn.Upsample`); its reference is
    `upsample_nearest2x_reference`.

    Args:
        x: [N, C, H, W] channels-last (rows of C channels, any row stride).
        bias: C elements or None.
        residual: x's shape or None.

    Returns:
        [N, C, 2H, 2W] in x's dtype, channels_last.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be [N, C, H, W]; got {tuple(x.shape)}")
    n, c, h, w = x.shape
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}; got {tuple(residual.shape)}")
    if bias is not None and bias.numel() != c:
        raise ValueError(f"bias must have {c} elements; got {tuple(bias.shape)}")
    out = torch.empty(n, c, 2 * h, 2 * w, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    x_rows = _rows(x, "x")
    residual_rows = _rows(residual, "residual") if residual is not None else x_rows
    out_rows = _rows(out, "out")
    block_c = triton.next_power_of_2(c)
    block_r = max(1, 4096 // block_c)
    grid = (triton.cdiv(h * w, block_r), n)
    _upsample2x_kernel[grid](
        x_rows, bias.reshape(-1) if bias is not None else x_rows, residual_rows, out_rows,
        h * w, w,
        x_rows.stride(0), x_rows.stride(1), residual_rows.stride(0), residual_rows.stride(1),
        out_rows.stride(0), out_rows.stride(1),
        C=c, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=4,
    )  # fmt: skip
    return out


__all__ = [
    "NORM_EPS",
    "add_bias_residual",
    "add_bias_residual_reference",
    "upsample_nearest2x",
    "upsample_nearest2x_reference",
    "vae_rms_norm",
    "vae_rms_norm_reference",
]
