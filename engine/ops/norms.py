"""Fused LayerNorm / RMSNorm / LayerNorm + modulation over the full feature dim, fp32 math, Triton kernels.

Ops (x [..., D], statistics per row over D, computed in fp32 whatever x's dtype):
- `layer_norm(x, weight=None, bias=None, eps)`: (x − mean)·rstd (·weight + bias). Wan's `WanLayerNorm`
  (norm1 / norm2 without affine, norm3 with affine), official `wan/modules/model.py`.
- `rms_norm(x, weight, eps)`: x·rsqrt(mean(x²) + eps)·weight. Wan's `WanRMSNorm` (norm_q / norm_k over the
  full dim = heads·head_dim). The weight multiplies the fp32 value before the one cast to the output dtype, as
  TurboDiffusion's `FastRMSNorm` (`turbodiffusion/ops/core.py`); the official code casts first, then multiplies
  (two roundings instead of one).
- `layer_norm_modulate(x, shift, scale, eps)`: layer_norm(x)·(1 + scale) + shift, the adaLN modulation before
  self-attention and the FFN (`self.norm1(x).float() * (1 + e[1]) + e[0]` in the official block). shift / scale
  broadcast against x ([B, 1, D] per sample for Wan2.1 / A14B, [B, L, D] per token for Wan2.2-5B). The official
  block casts norm(x) to x's dtype before modulating; here it stays fp32, which is identical when x is fp32.

`layer_norm` and `layer_norm_modulate` can also take the residual update that precedes them in a Wan block:
with `residual=y` (and optionally `gate`), x + y·gate (fp32, rounded as the official `x + y * gate`) is written
to `residual_out` (default: x itself, in place) and that sum is what gets normalised: one read of x and y instead
of a separate add pass, whose mixed-dtype TensorIterator kernel ran at under half the copy rate on the H100.

Outputs are in x's dtype unless `out_dtype` says otherwise. Each op has `backend="triton" | "torch"`; "torch" is
the `<op>_reference` below (plain fp32 torch, the definition the kernels are tested against). The kernel reads
each row once and writes it once (one program per row, or several short rows per program), so its floor is
the copy rate.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

Backend = Literal["triton", "torch"]


# ---------------------------------------------------------------------------------------------------------------
# References (plain torch, fp32)
# ---------------------------------------------------------------------------------------------------------------


def residual_add_reference(x: torch.Tensor, residual: torch.Tensor | None, gate: torch.Tensor | None,
                           residual_out: torch.Tensor | None) -> torch.Tensor:
    """x + residual·gate written to residual_out (default x, in place); x unchanged without a residual."""
    if residual is None:
        return x
    update = residual.float() * gate.float() if gate is not None else residual.float()
    target = x if residual_out is None else residual_out
    return torch.add(x, update, out=target)


def layer_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """LayerNorm over the last dim in fp32, optional affine, cast to out_dtype (default x.dtype)."""
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps).to(out_dtype or x.dtype)


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """RMSNorm over the last dim in fp32, times the weight, one cast to out_dtype (default x.dtype)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
    return y.to(out_dtype or x.dtype)


def layer_norm_modulate_reference(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """LayerNorm (no affine) · (1 + scale) + shift, all in fp32, cast to out_dtype (default x.dtype)."""
    y = F.layer_norm(x.float(), (x.shape[-1],), eps=eps) * (1 + scale.float()) + shift.float()
    return y.to(out_dtype or x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _norm_kernel(
    # pointers
    x_ptr, y_ptr, weight_ptr, bias_ptr, shift_ptr, scale_ptr, res_ptr, gate_ptr, xo_ptr,
    # sizes
    R, L, D, eps,
    # strides (x, y, res and xo are [R, D] row-major with row strides; modulation and gate are [B, L, D] views)
    stride_xr, stride_yr, stride_mb, stride_ml, stride_md, stride_sb, stride_sl, stride_sd,
    stride_rr, stride_gb, stride_gl, stride_gd, stride_or,
    # meta-parameters
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, MODULATE: tl.constexpr,
    RESIDUAL: tl.constexpr, GATED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """BLOCK_R rows of x [R, D] per program, each row whole in registers (BLOCK_D ≥ D), fp32 statistics."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < R
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    # Row r of x is token (r // L, r % L) of the [B, L, D] modulation / gate views (stride 0 where broadcast).
    batch = rows // L
    token = rows % L
    x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if RESIDUAL:
        update = tl.load(res_ptr + rows[:, None] * stride_rr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if GATED:
            update = update * tl.load(gate_ptr + (batch * stride_gb + token * stride_gl)[:, None]
                                      + cols[None, :] * stride_gd, mask=mask, other=0.0).to(tl.float32)
        x = x + update
        tl.store(xo_ptr + rows[:, None] * stride_or + cols[None, :], x.to(xo_ptr.dtype.element_ty), mask=mask)
    if IS_RMS:
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        y = x * rstd[:, None]
    else:
        mean = tl.sum(x, axis=1) / D
        centered = tl.where(mask, x - mean[:, None], 0.0)  # padding must not enter the variance
        rstd = tl.math.rsqrt(tl.sum(centered * centered, axis=1) / D + eps)
        y = centered * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if MODULATE:
        shift = tl.load(shift_ptr + (batch * stride_mb + token * stride_ml)[:, None] + cols[None, :] * stride_md,
                        mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + (batch * stride_sb + token * stride_sl)[:, None] + cols[None, :] * stride_sd,
                        mask=mask, other=0.0).to(tl.float32)
        y = y * (1.0 + scale) + shift
    tl.store(y_ptr + rows[:, None] * stride_yr + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------


def _launch_params(d: int) -> dict[str, int]:
    """Whole rows in registers: ~16 fp32 values per thread for long rows (5120 → 8192 lanes on 16 warps);
    short rows are packed several per program so every program still moves a few KiB."""
    block_d = triton.next_power_of_2(d)
    block_r = max(1, min(16, 2048 // block_d))
    num_warps = max(1, min(16, block_r * block_d // 512))
    return {"BLOCK_R": block_r, "BLOCK_D": block_d, "num_warps": num_warps}


def _as_batch_token_view(t: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """Broadcast a modulation tensor to x's [B, L, D] (x 3-D) or [1, L, D] (x 2-D) without copying."""
    target = x.shape if x.dim() == 3 else (1, *x.shape)
    try:
        return t.expand(x.shape).reshape(target) if t.dim() <= x.dim() else t.expand(target)
    except RuntimeError as error:
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to x {tuple(x.shape)}") from error


def _norm(
    x: torch.Tensor,
    *,
    is_rms: bool,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype | None,
    out: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> torch.Tensor:
    d = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (d,):
            raise ValueError(f"{name} must be [{d}]; got {tuple(t.shape)}")
    x2d = x.reshape(-1, d)  # [R, D]
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    if out is None:
        y = torch.empty(x2d.shape, dtype=out_dtype or x.dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != (out_dtype or x.dtype) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {out_dtype or x.dtype} {tuple(x.shape)}; got {out.dtype} "
                         f"{tuple(out.shape)}")
    else:
        y = out.view(x2d.shape)
    rows = x2d.shape[0]
    modulate = shift is not None and scale is not None
    if shift is not None and scale is not None:
        if x.dim() not in (2, 3):
            raise ValueError(f"layer_norm_modulate expects x [B, L, D] or [L, D]; got {tuple(x.shape)}")
        shift_v = _as_batch_token_view(shift, x, "shift")  # [B, L, D]
        scale_v = _as_batch_token_view(scale, x, "scale")
        tokens = shift_v.shape[1]
    else:
        shift_v = scale_v = x2d.new_empty(1, 1, 1)
        tokens = 1
    res2d, gate_v, x_out = _residual_operands(x, x2d, residual, gate, residual_out)
    if gate is not None:
        tokens = gate_v.shape[1]  # the same x-shaped [B, L, D] indexing as the modulation views
    params = _launch_params(d)
    dummy = y
    _norm_kernel[(triton.cdiv(rows, params["BLOCK_R"]),)](
        x2d, y,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        shift_v, scale_v, res2d, gate_v, x_out,
        rows, tokens, d, eps,
        x2d.stride(0), y.stride(0), *shift_v.stride(), *scale_v.stride(),
        res2d.stride(0), *gate_v.stride(), x_out.stride(0),
        IS_RMS=is_rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, MODULATE=modulate,
        RESIDUAL=residual is not None, GATED=gate is not None,
        BLOCK_R=params["BLOCK_R"], BLOCK_D=params["BLOCK_D"], num_warps=params["num_warps"],
    )
    return y.reshape(x.shape)


def _residual_operands(x: torch.Tensor, x2d: torch.Tensor, residual: torch.Tensor | None, gate: torch.Tensor | None,
                       residual_out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(residual [R, D], gate as an x-shaped [B, L, D] view, [R, D] target of x + residual·gate) for the kernel;
    x's own tensors stand in when there is no residual (the kernel never reads them then)."""
    if residual is None:
        if gate is not None or residual_out is not None:
            raise ValueError("gate and residual_out need a residual")
        return x2d, x2d.new_empty(1, 1, 1), x2d
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}; got {tuple(residual.shape)}")
    if x.dim() not in (2, 3) and gate is not None:
        raise ValueError(f"a gated residual expects x [B, L, D] or [L, D]; got {tuple(x.shape)}")
    target = x if residual_out is None else residual_out
    if target.dtype != torch.float32 or target.shape != x.shape or not target.is_contiguous():
        raise ValueError("the residual sum goes to an fp32 contiguous tensor of x's shape (x itself by default)")
    if residual_out is None and x2d.data_ptr() != x.data_ptr():
        raise ValueError("an in-place residual update needs x contiguous")
    res2d = residual.reshape(x2d.shape)
    if res2d.stride(1) != 1:
        res2d = res2d.contiguous()
    gate_v = _as_batch_token_view(gate, x, "gate") if gate is not None else x2d.new_empty(1, 1, 1)
    return res2d, gate_v, target.view(x2d.shape)


def _check_backend(backend: str) -> None:
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend {backend!r} is not 'triton' or 'torch'")


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    out_dtype: torch.dtype | None = None,
    backend: Backend = "triton",
    out: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm over the last dim with fp32 statistics, optional affine.

    Args:
        x: [..., D].
        weight, bias: [D] or None (Wan's norm1 / norm2 have neither, norm3 both).
        eps: added to the variance (Wan uses 1e-6).
        out_dtype: result dtype, default x.dtype.
        backend: "triton" or "torch" (the fp32 reference).
        out: preallocated result for the Triton kernel (contiguous, x's shape, out_dtype).
        residual, gate, residual_out: normalise x + residual·gate instead of x, the sum (fp32) written to
            residual_out or, by default, into x in place (module docstring).

    Returns:
        [..., D].
    """
    _check_backend(backend)
    if backend == "torch":
        x = residual_add_reference(x, residual, gate, residual_out)
        return layer_norm_reference(x, weight, bias, eps, out_dtype)
    return _norm(x, is_rms=False, weight=weight, bias=bias, shift=None, scale=None, eps=eps, out_dtype=out_dtype,
                 out=out, residual=residual, gate=gate, residual_out=residual_out)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    out_dtype: torch.dtype | None = None,
    backend: Backend = "triton",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """RMSNorm over the last dim with fp32 statistics, times weight [D], one cast (out: preallocated result).

    Returns [..., D].
    """
    _check_backend(backend)
    if backend == "torch":
        return rms_norm_reference(x, weight, eps, out_dtype)
    return _norm(x, is_rms=True, weight=weight, bias=None, shift=None, scale=None, eps=eps, out_dtype=out_dtype,
                 out=out)


def layer_norm_modulate(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    *,
    out_dtype: torch.dtype | None = None,
    backend: Backend = "triton",
    out: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """layer_norm(x)·(1 + scale) + shift in one pass, fp32 math.

    Args:
        x: [B, L, D] or [L, D].
        shift, scale: broadcastable to x, e.g. [B, 1, D] (one modulation per sample) or [B, L, D].
        eps: LayerNorm epsilon.
        out_dtype: result dtype, default x.dtype (pass bf16 to feed the next Linear directly).
        backend: "triton" or "torch" (the fp32 reference).
        out: preallocated result for the Triton kernel (contiguous, x's shape, out_dtype).
        residual, gate, residual_out: as `layer_norm`.

    Returns:
        x's shape, in out_dtype.
    """
    _check_backend(backend)
    if backend == "torch":
        x = residual_add_reference(x, residual, gate, residual_out)
        return layer_norm_modulate_reference(x, shift, scale, eps, out_dtype)
    return _norm(x, is_rms=False, weight=None, bias=None, shift=shift, scale=scale, eps=eps, out_dtype=out_dtype,
                 out=out, residual=residual, gate=gate, residual_out=residual_out)
