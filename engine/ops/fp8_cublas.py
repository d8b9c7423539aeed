"""FP8 block-scaled linears on cuBLAS (Hopper): the fast runtime path for W8A8 checkpoints.

Format: the weight is the INT8 checkpoint requantized once at load to e4m3 with the same 128×128 blocks
(`int8_linear.requantize_int8_to_fp8`); the activation is quantized per call to e4m3 with one scale per row and
group of 128 channels (1×128 groups, scale amax/448). A 1×128 group sits inside one of the INT8 path's 128×128
tiles, so its scale is never coarser; being row-local, the quantizer can also run inside a row-wise producer.
The GEMM is cuBLASLt's block-scaled FP8 matmul (CUDA ≥ 12.9, sm90: A scaled per 1×128, B per 128×128, partial
sums promoted to fp32 per 128-wide K block) through `torch._scaled_mm`, which picks the scaling mode from the
scale tensors' shapes: A's scales [M, K/128] with the row index fastest, B's a [K/128, N/128] view with the
K-block index fastest. That view's column stride must be 16-byte aligned and torch 2.11 checks it is exactly
K/128, so the weight is stored with K zero-padded to a multiple of 512 (`pad_weight`): at K = 8960 an unaligned
stride gave wrong numbers without an error (docs/notes/linear.md, session 9).

On the H100 it ran at 1000–1180 TOPS at the Wan shapes, against 800–960 for our Triton INT8 kernel; error vs the
float Linear 3.9 % against INT8's 2.1–3.7 % (e4m3 keeps 3 mantissa bits), and a whole DiT call's output 4.5×
INT8's error, which is why it is opt-in (`Int8Linear.use_fp8`, the pipeline's gemm="fp8"). Shapes cuBLAS does
not take (K % 128 ≠ 0, N % 16 ≠ 0) and other GPUs run the Triton FP8 kernel instead.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from engine.ops.int8_linear import (
    AMAX_FLOOR,
    FP8_E4M3_MAX,
    _round_to_bf16,
    _round_to_e4m3_grid,
    dequantize_blockwise,
)

GROUP = 128  # channels per activation scale; also the weight's 128×128 block
_ROWS_PER_PROGRAM = 32


# ---------------------------------------------------------------------------------------------------------------
# References (plain torch, fp32)
# ---------------------------------------------------------------------------------------------------------------


def quantize_groups_reference(x: torch.Tensor, *, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] → e4m3 q [M, K] and fp32 scale [M, ceil(K/128)] (amax/448 per row and 128 channels).

    gelu: quantize nn.GELU(tanh)(x) computed in x's dtype (the unfused `ffn.1` before `ffn.2`'s quantizer).
    """
    if gelu:
        x = F.gelu(x, approximate="tanh")
    rows, cols = x.shape
    groups = triton.cdiv(cols, GROUP)
    padded = torch.zeros(rows, groups * GROUP, dtype=torch.float32, device=x.device)
    padded[:, :cols] = x
    blocks = padded.view(rows, groups, GROUP)
    amax = blocks.abs().amax(dim=2).clamp_min(AMAX_FLOOR)  # [M, G]
    multiplier = (FP8_E4M3_MAX / amax.double()).float()  # an IEEE fp32 division, as the kernel's div_rn
    q = (blocks * multiplier[:, :, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(rows, groups * GROUP)[:, :cols].contiguous(), (amax.double() / FP8_E4M3_MAX).float()


def block_fp8_mm_reference(q: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                           bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(q ⊙ 1×128 scale) @ (weight ⊙ 128×128 weight_scale)ᵀ + bias in fp32; weight_scale [ceil(N/128), ceil(K/128)]."""
    x = q.float() * scale.float().repeat_interleave(GROUP, dim=1)[:, :q.shape[1]]
    y = x @ dequantize_blockwise(weight, weight_scale).T
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


# ---------------------------------------------------------------------------------------------------------------
# Activation quantizer (Triton)
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _quantize_groups_kernel(
    x_ptr, q_ptr, scale_ptr,
    M, K, K_OUT,
    stride_xm, stride_qm, stride_sm, stride_sg,
    ROWS: tl.constexpr, GROUP_SIZE: tl.constexpr, GELU: tl.constexpr,
):
    """One program: ROWS rows × one group of GROUP_SIZE channels → e4m3 values and one scale per row; columns
    from K to K_OUT (padding) get zeros."""
    offs_m = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs_k = tl.program_id(1) * GROUP_SIZE + tl.arange(0, GROUP_SIZE)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    if GELU:
        # nn.GELU(approximate="tanh") in bf16: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), tanh(z) = 2σ(2z) − 1,
        # rounded to bf16 where the unfused chain stores it. Clamping keeps σ's exp finite (the factor is
        # < 1e-34 there, 0 after quantization anyway).
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = _round_to_bf16(x * tl.sigmoid(tl.maximum(2.0 * inner, -80.0)))  # GELU(0) = 0 keeps the padding 0
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-8)  # AMAX_FLOOR
    multiplier = tl.math.div_rn(448.0, amax)  # correctly rounded, as the reference's fp32 division
    v = x * multiplier[:, None]  # launched with fp fusion off: the product is rounded before the e4m3 rounding
    q = _round_to_e4m3_grid(tl.minimum(tl.maximum(v, -448.0), 448.0)).to(tl.float8e4nv)
    tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :], q,
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K_OUT))
    tl.store(scale_ptr + offs_m * stride_sm + tl.program_id(1) * stride_sg, tl.math.div_rn(amax, 448.0),
             mask=offs_m < M)


def empty_group_scales(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """An fp32 [rows, ceil(cols/128)] scale tensor in cuBLAS's layout: row index fastest, the column stride padded
    to a multiple of 4 elements (16 bytes; the cuBLAS path runs only where that is `rows` itself, see `usable`)."""
    padded_rows = triton.cdiv(rows, 4) * 4
    return torch.empty(triton.cdiv(cols, GROUP), padded_rows, dtype=torch.float32, device=device)[:, :rows].t()


def quantize_groups(x: torch.Tensor, *, gelu: bool = False,
                    padded_cols: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton version of `quantize_groups_reference` (bit-identical without gelu); x [M, K] with unit column
    stride. Returns q e4m3 [M, K'] and the scales in cuBLAS's layout (`empty_group_scales`), K' = padded_cols
    (default K; the columns past K are zeros with scale 1e-8/448)."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"quantize_groups expects a 2-D tensor with unit column stride, got {tuple(x.shape)}")
    rows, cols = x.shape
    out_cols = padded_cols or cols
    if out_cols < cols:
        raise ValueError(f"padded_cols {out_cols} < the {cols} columns of x")
    q = torch.empty(rows, out_cols, dtype=torch.float8_e4m3fn, device=x.device)
    scale = empty_group_scales(rows, out_cols, x.device)
    grid = (triton.cdiv(rows, _ROWS_PER_PROGRAM), scale.shape[1])
    _quantize_groups_kernel[grid](
        x, q, scale, rows, cols, out_cols, x.stride(0), q.stride(0), scale.stride(0), scale.stride(1),
        ROWS=_ROWS_PER_PROGRAM, GROUP_SIZE=GROUP, GELU=gelu, num_warps=4, enable_fp_fusion=False,
    )
    return q, scale


# ---------------------------------------------------------------------------------------------------------------
# GEMM (cuBLAS through torch._scaled_mm)
# ---------------------------------------------------------------------------------------------------------------


def padded_in_features(in_features: int) -> int:
    """K as the cuBLAS path stores it: a multiple of 512 (its B scales' column stride, K/128, must be 16-byte
    aligned, and torch checks that stride unpadded), zero-padded; K % 128 ≠ 0 stays as is (Triton runs it)."""
    return triton.cdiv(in_features, 4 * GROUP) * 4 * GROUP if in_features % GROUP == 0 else in_features


def pad_weight(weight: torch.Tensor, weight_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 weight [N, K] and its 128×128 scales [N/128, K/128] → zero-padded to `padded_in_features(K)` columns
    (zero weights add nothing; the padded blocks' scale is 0)."""
    (n, k), k_padded = weight.shape, padded_in_features(weight.shape[1])
    padded = torch.zeros(n, k_padded, dtype=weight.dtype, device=weight.device)
    padded[:, :k] = weight
    scale = torch.zeros(weight_scale.shape[0], triton.cdiv(k_padded, GROUP), dtype=torch.float32,
                        device=weight.device)
    scale[:, :weight_scale.shape[1]] = weight_scale
    return padded, scale


@functools.cache
def _block_scaling_runs(device_index: int) -> bool:
    """Whether this GPU and torch build run the block-scaled FP8 `_scaled_mm` (tried once: one tiny problem with
    distinct per-block weight scales, checked)."""
    if torch.cuda.get_device_capability(device_index) != (9, 0):
        return False  # cuBLAS implements this 1×128 / 128×128 recipe for sm90 only
    device = torch.device("cuda", device_index)
    q = torch.ones(128, 4 * GROUP, device=device).to(torch.float8_e4m3fn)
    scale = empty_group_scales(128, 4 * GROUP, device)
    scale.fill_(1.0)
    weight_scale = torch.arange(1.0, 5.0, device=device)[None]  # [1, 4]
    try:
        y = torch._scaled_mm(q, q.t(), scale, weight_scale.t(), out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return bool((y == GROUP * weight_scale.sum()).all())


def usable(x: torch.Tensor, in_features: int, out_features: int) -> bool:
    """Whether `block_fp8_mm` runs this layer on x [..., K]: a bf16 / fp16 CUDA input on an sm90 GPU with
    block-scaled `_scaled_mm`, K a multiple of 128, N of 16 (cuBLAS's FP8 alignment) and M = x's row count of 4:
    torch's source (ScaledBlas.cpp) checks that A's scale column stride is exactly M, and cuBLAS needs it 16-byte
    aligned; other M take the Triton FP8 kernel."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and in_features % GROUP == 0
            and out_features % 16 == 0 and rows % 4 == 0
            and _block_scaling_runs(x.device.index if x.device.index is not None else torch.cuda.current_device()))


def block_fp8_mm(q: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """y [M, N] = (q ⊙ scale) @ (weight ⊙ weight_scale)ᵀ + bias on cuBLAS.

    Args:
        q, scale: from `quantize_groups(x, padded_cols=K)`.
        weight, weight_scale: e4m3 [N, K] (nn.Linear layout) and its 128×128 scales [N/128, K/128], from
            `pad_weight` (K = `padded_in_features` of the layer's input features).
        bias: [N] or None (added in the epilogue, in out_dtype).
    """
    if bias is not None and bias.dtype != out_dtype:
        bias = bias.to(out_dtype)
    # B = weightᵀ [K, N] column-major; its scales as a [K/128, N/128] view with the K-block index fastest
    return torch._scaled_mm(q, weight.t(), scale, weight_scale.t(), bias=bias, out_dtype=out_dtype)
