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
- `conv3d_small_out(x, packed_weight, bias)`: a 3-D conv with a handful of output channels (the decoder head's
  96 -> 3), direct: each program reads a row of pixels once per tap and multiplies it with the tap's
  [C_in, 16] weight on the tensor cores. cuDNN's implicit GEMM runs this shape far from the memory rate: its
  tiles are at least 64 outputs wide, so 3 outputs leave them nearly empty.

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


def conv3d_small_out_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """conv3d in fp32 with zero spatial padding k // 2 and none in time (x holds the causal history):
    x [B, C_in, T + kt - 1, H, W], weight [C_out, C_in, kt, kh, kw] → [B, C_out, T, H, W] fp32."""
    kh, kw = weight.shape[3:]
    bias = None if bias is None else bias.float()
    return F.conv3d(x.float(), weight.float(), bias, padding=(0, kh // 2, kw // 2))


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


@triton.jit
def _conv3d_small_out_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr,
    T, H, W,
    # x [B, C_in, T + KT - 1, H, W] channels-last (channel stride 1), y [B, C_OUT, T, H, W] any strides
    stride_xb, stride_xt, stride_xh, stride_xw,
    stride_yb, stride_yc, stride_yt, stride_yh, stride_yw,
    C_IN: tl.constexpr, C_OUT: tl.constexpr, KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """BLOCK_P output pixels (of H·W, row-major) of frame program_id(1) % T of item program_id(1) // T: per
    tap, the shifted [BLOCK_P, C_in] input pixels times the tap's packed [BLOCK_C, BLOCK_N] weight."""
    b = tl.program_id(1) // T
    t = tl.program_id(1) % T
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = offs_p < H * W
    ph = offs_p // W
    pw = offs_p % W
    offs_c = tl.arange(0, BLOCK_C)
    offs_n = tl.arange(0, BLOCK_N)
    c_ok = offs_c < C_IN
    # int64: one 720P chunk's buffer passes 2^31 elements.
    x_item = x_ptr + b.to(tl.int64) * stride_xb
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for dt in tl.static_range(KT):
        x_frame = x_item + (t + dt).to(tl.int64) * stride_xt
        for dh in tl.static_range(KH):
            hh = ph + (dh - KH // 2)
            for dw in tl.static_range(KW):
                ww = pw + (dw - KW // 2)
                inside = p_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)  # zero padding in space
                pixel = hh.to(tl.int64) * stride_xh + ww.to(tl.int64) * stride_xw
                a = tl.load(x_frame + pixel[:, None] + offs_c[None, :], mask=inside[:, None] & c_ok[None, :],
                            other=0.0)
                tap = (dt * KH + dh) * KW + dw
                w = tl.load(w_ptr + tap * BLOCK_C * BLOCK_N + offs_c[:, None] * BLOCK_N + offs_n[None, :])
                if DOT_FP32:  # exact fp32 products, not TF32 (bf16 ones are exact in fp32 too)
                    acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
                else:
                    acc += tl.dot(a, w)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < C_OUT, other=0.0).to(tl.float32)[None, :]
    pixel = ph.to(tl.int64) * stride_yh + pw.to(tl.int64) * stride_yw
    y = (y_ptr + b.to(tl.int64) * stride_yb + t.to(tl.int64) * stride_yt + pixel[:, None]
         + offs_n[None, :].to(tl.int64) * stride_yc)
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=p_ok[:, None] & (offs_n < C_OUT)[None, :])


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


SMALL_OUT_BLOCK_N = 16  # tl.dot's narrowest N: the packed weight's output columns


def _block_c(c_in: int) -> int:
    return max(16, triton.next_power_of_2(c_in))  # tl.dot's K: a power of two, at least 16


def pack_small_out_conv_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight [C_out <= 16, C_in, kt, kh, kw] → [kt·kh·kw, _block_c(C_in), 16] (tap, input, output), zeros
    past C_in and C_out, in weight's dtype: `conv3d_small_out`'s operand, made once per decode call."""
    c_out, c_in = weight.shape[:2]
    if weight.dim() != 5 or c_out > SMALL_OUT_BLOCK_N:
        raise ValueError(f"weight must be [C_out <= {SMALL_OUT_BLOCK_N}, C_in, kt, kh, kw]; got "
                         f"{tuple(weight.shape)}")
    packed = torch.zeros(weight[0, 0].numel(), _block_c(c_in), SMALL_OUT_BLOCK_N,
                         dtype=weight.dtype, device=weight.device)
    packed[:, :c_in, :c_out] = weight.detach().flatten(2).permute(2, 1, 0)
    return packed


def conv3d_small_out(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    bias: torch.Tensor | None,
    kernel_size: tuple[int, int, int],
    out_channels: int,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """A stride-1 3-D conv with at most 16 outputs, zero spatial padding k // 2, no time padding (the causal
    history is x's first kt - 1 frames), bias added in fp32, one rounding to x's dtype; reference
    `conv3d_small_out_reference`.

    Args:
        x: [B, C_in, T + kt - 1, H, W] channels-last-3d (channel stride 1; any other strides), bf16 or fp32.
        packed_weight: `pack_small_out_conv_weight(weight)`, x's dtype.
        bias: out_channels elements or None (added in fp32).
        kernel_size: (kt, kh, kw).
        out_channels: C_out of the packed weight.
        out: where the result goes ([B, out_channels, T, H, W] in x's dtype, any strides); default a new
            channels-last-3d one, the layout of the fused decode's activations.

    Returns:
        out (or the new tensor).
    """
    kt, kh, kw = kernel_size
    b, c_in, frames, h, w = x.shape
    t = frames - (kt - 1)
    block_c = _block_c(c_in)
    if packed_weight.shape != (kt * kh * kw, block_c, SMALL_OUT_BLOCK_N) or packed_weight.dtype != x.dtype:
        expected = (kt * kh * kw, block_c, SMALL_OUT_BLOCK_N)
        raise ValueError(f"packed_weight must be {x.dtype} {list(expected)}; got {packed_weight.dtype} "
                         f"{tuple(packed_weight.shape)}")
    if t < 1 or x.stride(1) != 1:
        raise ValueError(f"x must be channels-last [B, C, T + {kt - 1}, H, W]; got {tuple(x.shape)} with "
                         f"strides {x.stride()}")
    if bias is not None and bias.numel() != out_channels:
        raise ValueError(f"bias must have {out_channels} elements; got {tuple(bias.shape)}")
    y = out if out is not None else torch.empty((b, out_channels, t, h, w), dtype=x.dtype, device=x.device,
                                                memory_format=torch.channels_last_3d)
    if y.shape != (b, out_channels, t, h, w) or y.dtype != x.dtype:
        raise ValueError(f"out must be {x.dtype} {(b, out_channels, t, h, w)}; got {y.dtype} "
                         f"{tuple(y.shape)}")
    # 128 pixels a program on the GPU (a [128, C_in] operand per tap in registers); the CPU interpreter pays
    # per program, so it takes large blocks.
    block_p = 128 if x.is_cuda else 4096
    grid = (triton.cdiv(h * w, block_p), b * t)
    _conv3d_small_out_kernel[grid](
        x, packed_weight, bias if bias is not None else y, y,
        t, h, w,
        x.stride(0), x.stride(2), x.stride(3), x.stride(4),
        y.stride(0), y.stride(1), y.stride(2), y.stride(3), y.stride(4),
        C_IN=c_in, C_OUT=out_channels, KT=kt, KH=kh, KW=kw, HAS_BIAS=bias is not None,
        # The CPU interpreter multiplies bf16 operands as their raw bits: it gets them in fp32.
        DOT_FP32=x.dtype == torch.float32 or not x.is_cuda,
        BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_N=SMALL_OUT_BLOCK_N, num_warps=4,
    )  # fmt: skip
    return y


__all__ = [
    "NORM_EPS",
    "add_bias_residual",
    "add_bias_residual_reference",
    "conv3d_small_out",
    "conv3d_small_out_reference",
    "pack_small_out_conv_weight",
    "upsample_nearest2x",
    "upsample_nearest2x_reference",
    "vae_rms_norm",
    "vae_rms_norm_reference",
]
