"""W8A8 linears with 128×128 block scales (TurboDiffusion's `-quant` format) and Triton kernels for Hopper.

Format (TurboDiffusion `turbodiffusion/ops/core.py: Int8Linear`, quantizer `ops/quant`, GEMM `ops/gemm`):
- Quantizer, the same for weights (offline) and activations (every call): cut a row-major [R, C] tensor into
  128×128 tiles (edge tiles are partial); per tile amax = max(1e-8, max|x|) in fp32;
  q = round_half_even(x · (128/amax)) saturated to [-128, 127] (divisor 128, not 127: +amax saturates to 127,
  −amax maps to −128); scale = amax/128. Returns q int8 [R, C] and scale fp32 [ceil(R/128), ceil(C/128)].
- GEMM: y[m, n] = Σ_kb sX[m//128, kb]·sW[n//128, kb]·Σ_{k ∈ kb} xq[m, k]·wq[n, k] + bias[n]. The integer
  partial sum of each 128-wide K tile is exact in int32 (|Σ| ≤ 128·128·128 = 2^21), then promoted to fp32 and
  scaled into an fp32 accumulator; the bias add and the cast to the activation dtype are fused in the epilogue
  (TurboDiffusion adds the bias afterwards in PyTorch).
- FP8 variant (same 128×128 blocks, e4m3 operands, max 448): the checkpoint stays INT8; `requantize_int8_to_fp8`
  converts a weight once at load, activations are quantized to e4m3 per call. e4m3 keeps 3 mantissa bits, so it
  is coarser than INT8 on well-spread blocks and finer on blocks dominated by one outlier.

Shapes: x [..., K] → y [..., N]; int8_weight [N, K]; scale [ceil(N/128), ceil(K/128)]; bias [N].
Any M, N, K works: edge tiles are masked, so K % 128 ≠ 0 gives the exact block math on the partial last tile
(TurboDiffusion's launcher returns silently and leaves the output all zeros there, `ops/gemm/launch.hpp`).

Hopper notes: `tl.dot` on int8 / e4m3 operands lowers to `wgmma ... s32.s8.s8` / `... f32.e4m3.e4m3`; both
operands are K-major (x is [M, K], the weight [N, K], both row-major). BLOCK_K is pinned to the 128-wide scale
block, because the scales change every 128 channels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from engine.ops import w8a8_cuda

Backend = Literal["triton", "torch"]
QuantFormat = Literal["int8", "fp8"]
GemmKind = Literal["int8", "fp8"]
GEMMS: tuple[GemmKind, ...] = ("int8", "fp8")

QUANT_BLOCK = 128  # rows × columns per scale, TurboDiffusion `Quantization::BlockSize`
INT8_DIVISOR = 128.0  # TurboDiffusion `int8_max` (the scale is amax/128, not amax/127)
FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn
AMAX_FLOOR = 1e-8  # TurboDiffusion `_reduce_amax` starts from 1e-8, so an all-zero tile gets a finite scale

_QMAX = {"int8": INT8_DIVISOR, "fp8": FP8_E4M3_MAX}
_QDTYPE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


# ---------------------------------------------------------------------------------------------------------------
# References (plain torch, fp32): the definitions the kernels are tested against
# ---------------------------------------------------------------------------------------------------------------


def _expand_block_scale(scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[ceil(R/128), ceil(C/128)] block scales → [R, C], each scale repeated over its tile."""
    full = scale.repeat_interleave(QUANT_BLOCK, dim=0).repeat_interleave(QUANT_BLOCK, dim=1)
    return full[:rows, :cols]


def quantize_blockwise_reference(x: torch.Tensor, fmt: QuantFormat = "int8") -> tuple[torch.Tensor, torch.Tensor]:
    """TurboDiffusion's 128×128 block quantizer in fp32 torch (bit-identical to `quant_cuda` for int8).

    Args:
        x: [R, C] float tensor.
        fmt: "int8" (scale amax/128, the checkpoint format) or "fp8" (e4m3, scale amax/448).

    Returns:
        q [R, C] (int8 or float8_e4m3fn) and scale fp32 [ceil(R/128), ceil(C/128)].
    """
    rows, cols = x.shape
    block_rows, block_cols = triton.cdiv(rows, QUANT_BLOCK), triton.cdiv(cols, QUANT_BLOCK)
    padded = torch.zeros(block_rows * QUANT_BLOCK, block_cols * QUANT_BLOCK, dtype=torch.float32, device=x.device)
    padded[:rows, :cols] = x
    tiles = padded.view(block_rows, QUANT_BLOCK, block_cols, QUANT_BLOCK)  # [Rb, 128, Cb, 128]
    amax = tiles.abs().amax(dim=(1, 3)).clamp_min(AMAX_FLOOR)  # [Rb, Cb]
    qmax = _QMAX[fmt]
    # TurboDiffusion's `int8_max / amax` is an IEEE fp32 division. torch's CPU scalar/tensor division is not
    # correctly rounded; an fp64 quotient rounded to fp32 is (53 ≥ 2·24 + 2 bits, so double rounding is exact).
    multiplier = (qmax / amax.double()).float()
    v = tiles * multiplier[:, None, :, None]
    if fmt == "int8":
        q = v.round().clamp(-128.0, 127.0).to(torch.int8)
    else:
        q = v.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    q = q.view(block_rows * QUANT_BLOCK, block_cols * QUANT_BLOCK)[:rows, :cols].contiguous()
    return q, (amax.double() / qmax).float()


def dequantize_blockwise(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q [R, C] (int8 or e4m3) with block scales [ceil(R/128), ceil(C/128)] → fp32 [R, C]."""
    return q.float() * _expand_block_scale(scale.float(), *q.shape)


def block_scaled_mm_reference(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(a ⊙ a_scale) @ (b ⊙ b_scale)^T + bias in fp32: a [M, K], b [N, K] (int8 or e4m3), block scales."""
    y = dequantize_blockwise(a, a_scale) @ dequantize_blockwise(b, b_scale).T  # [M, N]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def int8_linear_reference(
    x: torch.Tensor, int8_weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The W8A8 linear in fp32: x [..., K] quantized per 128×128 block, block-scaled product, + bias → fp32."""
    x2d = x.reshape(-1, x.shape[-1])  # [M, K]
    xq, xs = quantize_blockwise_reference(x2d, "int8")
    y = block_scaled_mm_reference(xq, xs, int8_weight, scale, bias)
    return y.reshape(*x.shape[:-1], int8_weight.shape[0])


def requantize_int8_to_fp8(int8_weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 block weights → e4m3 with the same 128×128 blocks (done once at load for the FP8 GEMM).

    Per tile the largest |q| maps to 448: w8 = e4m3(q · 448/max|q|), scale8 = scale · max|q|/448, so
    w8 · scale8 ≈ q · scale with e4m3's 3-bit mantissa (integers above 16 are rounded).
    """
    rows, cols = int8_weight.shape
    q_amax = dequantize_blockwise(int8_weight.abs(), torch.ones_like(scale, dtype=torch.float32))
    block_rows, block_cols = scale.shape
    padded = torch.zeros(block_rows * QUANT_BLOCK, block_cols * QUANT_BLOCK, device=int8_weight.device)
    padded[:rows, :cols] = q_amax
    tile_max = padded.view(block_rows, QUANT_BLOCK, block_cols, QUANT_BLOCK).amax(dim=(1, 3)).clamp_min(1.0)
    multiplier = _expand_block_scale(FP8_E4M3_MAX / tile_max, rows, cols)
    fp8_weight = (int8_weight.float() * multiplier).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return fp8_weight, scale.float() * tile_max / FP8_E4M3_MAX


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _round_to_e4m3_grid(v):
    """Round fp32 v (|v| ≤ 448) to the nearest e4m3 value, ties to even, in fp32 arithmetic.

    The following cast to e4m3 is then exact, on the GPU (cvt.rn.satfinite) and in Triton's CPU interpreter,
    whose fp8 downcast does not carry a mantissa round-up into the exponent.
    """
    bits = v.to(tl.int32, bitcast=True)
    # e4m3 keeps 3 mantissa bits; its subnormals (|v| < 2^-6) share the spacing 2^-9.
    exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    ulp = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inv_ulp = ((127 - exponent + 3) << 23).to(tl.float32, bitcast=True)
    steps = (tl.abs(v) * inv_ulp + 12582912.0) - 12582912.0  # exact scaling by 2^k, then round half to even
    # Put the sign bit back, so values that round to zero keep it (-0.0) as the hardware cast does.
    magnitude = (steps * ulp).to(tl.int32, bitcast=True)
    return (magnitude | (bits & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def _quantize_blockwise_kernel(
    # pointers
    x_ptr, q_ptr, scale_ptr,
    # sizes
    R, C,
    # strides (elements per row / per column step; scale strides count tiles)
    stride_xr, stride_xc, stride_qr, stride_qc, stride_sr, stride_sc,
    # meta-parameters
    QMAX: tl.constexpr, IS_INT8: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program quantizes one BLOCK×BLOCK tile of x [R, C]: amax, multiply, round, saturate, store."""
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_r = pid_r * BLOCK + tl.arange(0, BLOCK)
    offs_c = pid_c * BLOCK + tl.arange(0, BLOCK)
    mask = (offs_r[:, None] < R) & (offs_c[None, :] < C)
    # Padding with 0 leaves the amax of a partial tile unchanged and quantizes to 0.
    x = tl.load(x_ptr + offs_r[:, None] * stride_xr + offs_c[None, :] * stride_xc, mask=mask, other=0.0)
    x = x.to(tl.float32)
    amax = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0), 1e-8)
    # Correctly rounded division as in the torch reference (Triton's `/` is the approximate div.full.f32).
    multiplier = tl.math.div_rn(QMAX, amax)
    v = x * multiplier  # launched with fp fusion off: the product is rounded before the integer rounding
    if IS_INT8:
        # Adding then subtracting 1.5·2^23 rounds an fp32 |v| < 2^22 to the nearest integer, ties to even (the
        # cvt.rni of TurboDiffusion's converter), with plain adds that also run in Triton's CPU interpreter.
        v = (v + 12582912.0) - 12582912.0
        q = tl.minimum(tl.maximum(v, -128.0), 127.0).to(tl.int8)
    else:
        q = _round_to_e4m3_grid(tl.minimum(tl.maximum(v, -QMAX), QMAX)).to(tl.float8e4nv)
    tl.store(q_ptr + offs_r[:, None] * stride_qr + offs_c[None, :] * stride_qc, q, mask=mask)
    tl.store(scale_ptr + pid_r * stride_sr + pid_c * stride_sc, tl.math.div_rn(amax, QMAX))


@triton.jit
def _load_k_tile(ptrs, k_left, offs_k, K_AXIS: tl.constexpr, EVEN_K: tl.constexpr):
    """Load one K tile; past K (ragged last tile) the zero padding adds nothing to the exact partial sum."""
    if EVEN_K:
        tile = tl.load(ptrs)
    elif K_AXIS == 1:
        tile = tl.load(ptrs, mask=offs_k[None, :] < k_left, other=0.0)
    else:
        tile = tl.load(ptrs, mask=offs_k[:, None] < k_left, other=0.0)
    return tile


@triton.jit
def _scaled_partial(a, b, scale, IS_INT8: tl.constexpr):
    """scale · (a @ b) for one 128-wide K tile; the int8 product is exact in int32 (|Σ| ≤ 2^21)."""
    if IS_INT8:
        return tl.dot(a, b, out_dtype=tl.int32).to(tl.float32) * scale
    return tl.dot(a, b) * scale


@triton.jit
def _block_scaled_mm_kernel(
    # pointers
    a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, bias_ptr, c_ptr, c_scale_ptr, gate_ptr,
    # sizes
    M, N, K, rows_per_gate, stride_gate,
    # strides (elements to step one row / one column; scale strides count 128-blocks)
    stride_am, stride_ak, stride_asm, stride_ask,
    stride_bn, stride_bk, stride_bsn, stride_bsk,
    stride_cm, stride_cn, stride_csm, stride_csn,
    # meta-parameters
    HAS_BIAS: tl.constexpr, IS_INT8: tl.constexpr, EVEN_K: tl.constexpr, SCALE_BLOCK: tl.constexpr,
    GELU_QUANT: tl.constexpr, RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_N: tl.constexpr,
):
    """c[M, N] = Σ_kb a_scale[m//128, kb]·b_scale[n//128, kb]·(a[:, kb] @ b[:, kb]^T) (+ bias), a [M, K], b [N, K].

    GELU_QUANT: c = int8 blocks of GELU_tanh(c) with their scales in c_scale (BLOCK_M == SUB_N == 128: each
    sub-tile is exactly one quantization block), the next Linear's input, never stored in bf16.
    RESIDUAL: c is an fp32 residual stream updated in place, c += gate[m // rows_per_gate, n] · bf16(result).

    BLOCK_K == SCALE_BLOCK, so each K tile has one scale per 128 rows / columns. BLOCK_M and BLOCK_N / SPLIT_N
    divide SCALE_BLOCK, so a row tile and each of the SPLIT_N (1 or 2) column sub-tiles has one scale per K
    tile: the promotion is one convert and one FMA per accumulator element. Splitting the columns keeps only one
    sub-tile's int32 partial live at a time, which lets a 128×256 tile fit in the register file.
    """
    SUB_N: tl.constexpr = BLOCK_N // SPLIT_N
    # Program id → output tile, grouped so GROUP_M row-tiles share B tiles in L2 (Triton tutorial 03).
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    # Rows and columns past the edge wrap onto valid ones: every load stays in bounds without a mask, and
    # the masked store drops them.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = pid_n * BLOCK_N + tl.arange(0, SUB_N)
    offs_n1 = offs_n0 + SUB_N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (offs_m % M)[:, None] * stride_am + offs_k[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    b0_ptrs = b_ptr + offs_k[:, None] * stride_bk + (offs_n0 % N)[None, :] * stride_bn  # [BLOCK_K, SUB_N]
    b1_ptrs = b_ptr + offs_k[:, None] * stride_bk + (offs_n1 % N)[None, :] * stride_bn
    a_scale_ptr += (pid_m * BLOCK_M // SCALE_BLOCK) * stride_asm
    # A sub-tile wholly past N (its columns are never stored) reads the last scale block instead.
    last_scale_n = (N - 1) // SCALE_BLOCK
    b0_scale_ptr = b_scale_ptr + tl.minimum(pid_n * BLOCK_N // SCALE_BLOCK, last_scale_n) * stride_bsn
    b1_scale_ptr = b_scale_ptr + tl.minimum((pid_n * BLOCK_N + SUB_N) // SCALE_BLOCK, last_scale_n) * stride_bsn

    acc0 = tl.zeros((BLOCK_M, SUB_N), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, SUB_N), dtype=tl.float32)
    for kb in range(tl.cdiv(K, BLOCK_K)):
        k_left = K - kb * BLOCK_K
        a = _load_k_tile(a_ptrs, k_left, offs_k, 1, EVEN_K)
        a_s = tl.load(a_scale_ptr + kb * stride_ask)
        b0 = _load_k_tile(b0_ptrs, k_left, offs_k, 0, EVEN_K)
        acc0 += _scaled_partial(a, b0, a_s * tl.load(b0_scale_ptr + kb * stride_bsk), IS_INT8)
        if SPLIT_N == 2:
            b1 = _load_k_tile(b1_ptrs, k_left, offs_k, 0, EVEN_K)
            acc1 += _scaled_partial(a, b1, a_s * tl.load(b1_scale_ptr + kb * stride_bsk), IS_INT8)
        a_ptrs += BLOCK_K * stride_ak
        b0_ptrs += BLOCK_K * stride_bk
        b1_ptrs += BLOCK_K * stride_bk

    if GELU_QUANT:
        c_scale_ptr += pid_m * stride_csm
        _store_tile_gelu_quant(acc0, bias_ptr, c_ptr, c_scale_ptr + (pid_n * SPLIT_N) * stride_csn, offs_m, offs_n0,
                               pid_n * BLOCK_N, M, N, stride_cm, stride_cn, HAS_BIAS)
        if SPLIT_N == 2:
            _store_tile_gelu_quant(acc1, bias_ptr, c_ptr, c_scale_ptr + (pid_n * SPLIT_N + 1) * stride_csn, offs_m,
                                   offs_n1, pid_n * BLOCK_N + SUB_N, M, N, stride_cm, stride_cn, HAS_BIAS)
    else:
        _store_tile(acc0, bias_ptr, c_ptr, gate_ptr, offs_m, offs_n0, M, N, stride_cm, stride_cn, rows_per_gate,
                    stride_gate, HAS_BIAS, RESIDUAL)
        if SPLIT_N == 2:
            _store_tile(acc1, bias_ptr, c_ptr, gate_ptr, offs_m, offs_n1, M, N, stride_cm, stride_cn, rows_per_gate,
                        stride_gate, HAS_BIAS, RESIDUAL)


@triton.jit
def _store_tile(acc, bias_ptr, c_ptr, gate_ptr, offs_m, offs_n, M, N, stride_cm, stride_cn, rows_per_gate,
                stride_gate, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr):
    """Epilogue: + bias in fp32, then a cast to c's dtype and a masked store, or (RESIDUAL) c += gate · bf16(acc)."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n % N).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    if RESIDUAL:
        # The unfused chain stores the Linear's output in bf16 before `x + y * gate`: round where it does.
        gate = tl.load(gate_ptr + ((offs_m % M) // rows_per_gate)[:, None] * stride_gate + (offs_n % N)[None, :])
        update = _round_to_bf16(acc) * gate
        tl.store(c_ptrs, tl.load(c_ptrs, mask=mask, other=0.0) + update, mask=mask)
    else:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _round_to_bf16(v):
    """fp32 → the nearest bf16 value (ties to even), kept in fp32: torch's rounding, in integer ops (Triton's CPU
    interpreter truncates its own bf16 casts)."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536 == 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _store_tile_gelu_quant(acc, bias_ptr, q_ptr, q_scale_ptr, offs_m, offs_n, first_n, M, N, stride_qm, stride_qn,
                           HAS_BIAS: tl.constexpr):
    """Epilogue for Wan's `ffn.0`: + bias, GELU (tanh), then the 128×128 quantizer on this one-block tile.

    Values are rounded to bf16 where the unfused chain (bf16 GEMM output → nn.GELU in bf16 → quantizer) stores
    them, so the int8 blocks match it up to GELU's last-bit differences.
    """
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n % N).to(tl.float32)[None, :]
    h = _round_to_bf16(acc)
    # nn.GELU(approximate="tanh"): 0.5·h·(1 + tanh(√(2/π)·(h + 0.044715·h³))), with tanh(z) = 2·sigmoid(2z) − 1.
    inner = 0.7978845608028654 * (h + 0.044715 * h * h * h)
    # Clamping keeps sigmoid's exp finite; below −80 the factor is < 1e-34, i.e. 0 after quantization anyway.
    g = _round_to_bf16(h * tl.sigmoid(tl.maximum(2.0 * inner, -80.0)))
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    amax = tl.maximum(tl.max(tl.max(tl.where(mask, tl.abs(g), 0.0), axis=1), axis=0), 1e-8)
    v = g * tl.math.div_rn(128.0, amax)
    # The select keeps the product rounded to fp32 (no FMA contraction into the rounding add), as the quantizer.
    v = tl.where(v == v, v, 0.0)  # noqa: PLR0124
    v = (v + 12582912.0) - 12582912.0
    q = tl.minimum(tl.maximum(v, -128.0), 127.0).to(tl.int8)
    tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_n[None, :] * stride_qn, q, mask=mask)
    tl.store(q_scale_ptr, tl.math.div_rn(amax, 128.0), mask=first_n < N)  # a sub-tile wholly past N has no block


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------


def quantize_blockwise(
    x: torch.Tensor,
    fmt: QuantFormat = "int8",
    *,
    backend: Backend = "triton",
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x [R, C] in 128×128 blocks (one fused pass per tile); bit-identical across backends.

    Args:
        x: [R, C] fp32 / bf16 / fp16.
        fmt: "int8" (TurboDiffusion's format) or "fp8" (e4m3).
        backend: "triton" (the kernel; on CPU through TRITON_INTERPRET=1) or "torch" (the reference).
        out: preallocated (q, scale) for the Triton kernel to write into.

    Returns:
        q [R, C] int8 / float8_e4m3fn and scale fp32 [ceil(R/128), ceil(C/128)].
    """
    if x.dim() != 2:
        raise ValueError(f"quantize_blockwise expects a 2-D tensor, got shape {tuple(x.shape)}")
    if fmt not in _QMAX:
        raise ValueError(f"fmt {fmt!r} is not one of {tuple(_QMAX)}")
    if backend == "torch":
        return quantize_blockwise_reference(x, fmt)
    if backend != "triton":
        raise ValueError(f"backend {backend!r} is not 'triton' or 'torch'")
    rows, cols = x.shape
    scale_shape = (triton.cdiv(rows, QUANT_BLOCK), triton.cdiv(cols, QUANT_BLOCK))
    if out is None:
        q = torch.empty(rows, cols, dtype=_QDTYPE[fmt], device=x.device)
        scale = torch.empty(scale_shape, dtype=torch.float32, device=x.device)
    else:
        q, scale = out
        if q.shape != x.shape or q.dtype != _QDTYPE[fmt] or scale.shape != scale_shape or scale.dtype != torch.float32:
            raise ValueError(f"out must be ({_QDTYPE[fmt]} {tuple(x.shape)}, float32 {scale_shape}); got "
                             f"({q.dtype} {tuple(q.shape)}, {scale.dtype} {tuple(scale.shape)})")
    grid = (scale.shape[1], scale.shape[0])
    _quantize_blockwise_kernel[grid](
        x, q, scale, rows, cols,
        x.stride(0), x.stride(1), q.stride(0), q.stride(1), scale.stride(0), scale.stride(1),
        QMAX=_QMAX[fmt], IS_INT8=fmt == "int8", BLOCK=QUANT_BLOCK,
        num_warps=8, enable_fp_fusion=False,
    )
    return q, scale


def _block_scaled_mm_configs() -> list[triton.Config]:
    """Hopper candidates. The fp32 accumulator and one sub-tile's int32 partial live in registers (sm_90a cubin,
    Triton 3.6): 128×128 on 8 warps takes 164 registers, 128×256 split into two 128-column halves 253, 64×128
    on one warpgroup 164 (several programs per SM). On the H100 the autotuner picked 128×256 for every Wan shape
    (docs/notes/linear.md); 64×256 on 4 warps was dropped (it spills)."""
    shapes = [
        # BLOCK_M, BLOCK_N, SPLIT_N, warps, stages
        (128, 256, 2, 8, 3),
        (128, 256, 2, 8, 4),
        (128, 128, 1, 8, 3),
        (128, 128, 1, 8, 4),
        (64, 128, 1, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "SPLIT_N": split, "BLOCK_K": QUANT_BLOCK, "GROUP_M": 8},
                      num_warps=w, num_stages=s)
        for bm, bn, split, w, s in shapes
    ]


def _keep_config(config: triton.Config) -> bool:
    """The kernel loads one scale per row tile and per column sub-tile: both must sit inside one 128-block."""
    meta = config.kwargs
    return (meta["BLOCK_K"] == QUANT_BLOCK and QUANT_BLOCK % meta["BLOCK_M"] == 0 and meta["SPLIT_N"] in (1, 2)
            and QUANT_BLOCK % (meta["BLOCK_N"] // meta["SPLIT_N"]) == 0)


def _prune_configs(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    return [config for config in configs if _keep_config(config)]


_block_scaled_mm_autotuned = triton.autotune(
    configs=_block_scaled_mm_configs(),
    key=["M", "N", "K", "IS_INT8"],
    prune_configs_by={"early_config_prune": _prune_configs},
    restore_value=["c_ptr"],  # RESIDUAL adds into c: every timed config run must start from the same c
)(_block_scaled_mm_kernel)


def _is_one_block_tile(config: triton.Config) -> bool:
    """The GELU+quantize epilogue needs each (row tile, column sub-tile) to be exactly one 128×128 block."""
    meta = config.kwargs
    return meta["BLOCK_M"] == QUANT_BLOCK and meta["BLOCK_N"] // meta["SPLIT_N"] == QUANT_BLOCK


_block_scaled_mm_gelu_quant_autotuned = triton.autotune(
    configs=[config for config in _block_scaled_mm_configs() if _is_one_block_tile(config)],
    key=["M", "N", "K", "IS_INT8"],
)(_block_scaled_mm_kernel)

# The CPU interpreter runs one small fixed tile: autotuning there would only time numpy.
_INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 128, "SPLIT_N": 2, "BLOCK_K": QUANT_BLOCK, "GROUP_M": 2}
_INTERPRETER_GELU_QUANT_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 256, "SPLIT_N": 2, "BLOCK_K": QUANT_BLOCK, "GROUP_M": 2}


def _check_gemm_operands(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, bias: torch.Tensor | None
) -> tuple[int, int, int]:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"expected a [M, K] and b [N, K]; got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype or a.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"a and b must both be int8 or float8_e4m3fn; got {a.dtype} and {b.dtype}")
    (M, K), N = a.shape, b.shape[0]
    if M == 0 or K == 0:
        raise ValueError(f"empty operand: a {tuple(a.shape)}")
    for name, s, rows in (("a_scale", a_scale, M), ("b_scale", b_scale, N)):
        expected = (triton.cdiv(rows, QUANT_BLOCK), triton.cdiv(K, QUANT_BLOCK))
        if tuple(s.shape) != expected or s.dtype != torch.float32:
            raise ValueError(f"{name} must be fp32 {expected}; got {s.dtype} {tuple(s.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must be [{N}]; got {tuple(bias.shape)}")
    return M, N, K


def _launch_block_scaled_mm(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, bias: torch.Tensor | None,
    c: torch.Tensor, c_scale: torch.Tensor | None, config: dict[str, int] | None, gate: torch.Tensor | None = None,
) -> None:
    """Launch the GEMM into c (and c_scale when fusing GELU + quantization): the opt-in CUDA C++ kernel where it
    runs (`TDSERVE_CUDA_GEMM=1` on Hopper, `w8a8_cuda.usable`), else the Triton kernel, autotuned on CUDA unless a
    config is pinned."""
    (M, K), N = a.shape, b.shape[0]
    gelu_quant = c_scale is not None
    if config is None and w8a8_cuda.usable(a, b, bias, c):
        epilogue: w8a8_cuda.Epilogue = "gelu_quant" if gelu_quant else "residual" if gate is not None else "store"
        if c.dtype == w8a8_cuda.OUT_DTYPE[epilogue]:
            w8a8_cuda.block_scaled_mm_cuda(a, a_scale, b, b_scale, bias, c, epilogue=epilogue, gate=gate,
                                           q_scale=c_scale)
            return
    scale_out = c_scale if c_scale is not None else a_scale  # unused without GELU_QUANT
    rows_per_gate = M // gate.shape[0] if gate is not None else 1
    args = (
        a, a_scale, b, b_scale, bias if bias is not None else c, c, scale_out, gate if gate is not None else c,
        M, N, K, rows_per_gate, gate.stride(0) if gate is not None else 0,
        a.stride(0), a.stride(1), a_scale.stride(0), a_scale.stride(1),
        b.stride(0), b.stride(1), b_scale.stride(0), b_scale.stride(1),
        c.stride(0), c.stride(1), scale_out.stride(0), scale_out.stride(1),
    )
    flags = {"HAS_BIAS": bias is not None, "IS_INT8": a.dtype == torch.int8, "EVEN_K": K % QUANT_BLOCK == 0,
             "SCALE_BLOCK": QUANT_BLOCK, "GELU_QUANT": gelu_quant, "RESIDUAL": gate is not None}
    if config is None and a.is_cuda:
        def grid(meta: dict[str, int]) -> tuple[int]:
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

        autotuned = _block_scaled_mm_gelu_quant_autotuned if gelu_quant else _block_scaled_mm_autotuned
        autotuned[grid](*args, **flags, enable_fp_fusion=True)
        return
    if config is None:
        config = _INTERPRETER_GELU_QUANT_CONFIG if gelu_quant else _INTERPRETER_CONFIG
    meta = dict(config)
    meta.setdefault("BLOCK_K", QUANT_BLOCK)
    meta.setdefault("GROUP_M", 8)
    meta.setdefault("SPLIT_N", 1)
    launch = {key: meta.pop(key) for key in ("num_warps", "num_stages") if key in meta}
    if not _keep_config(triton.Config(meta)):
        raise ValueError(f"config {meta} needs BLOCK_K == {QUANT_BLOCK} and BLOCK_M, BLOCK_N / SPLIT_N "
                         f"dividing {QUANT_BLOCK}")
    if gelu_quant and not _is_one_block_tile(triton.Config(meta)):
        raise ValueError(f"config {meta}: the GELU+quantize epilogue needs BLOCK_M == BLOCK_N / SPLIT_N == "
                         f"{QUANT_BLOCK}")
    grid_size = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
    _block_scaled_mm_kernel[(grid_size,)](*args, **flags, **meta, **launch, enable_fp_fusion=True)


def block_scaled_mm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
    backend: Backend = "triton",
    config: dict[str, int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(a ⊙ a_scale) @ (b ⊙ b_scale)^T + bias with 128×128 block scales, promoted to fp32 per K tile.

    Args:
        a: [M, K] int8 or float8_e4m3fn (quantized activations).
        a_scale: fp32 [ceil(M/128), ceil(K/128)].
        b: [N, K], a's dtype (quantized weight, row-major as nn.Linear).
        b_scale: fp32 [ceil(N/128), ceil(K/128)].
        bias: [N] or None, any float dtype (added in fp32).
        out_dtype: dtype of the result.
        backend: "triton" or "torch" (the fp32 reference).
        config: pins BLOCK_M / BLOCK_N / SPLIT_N / GROUP_M (+ num_warps, num_stages) instead of autotuning.
        out: preallocated [M, N] result for the Triton kernel to write into (dtype out_dtype).

    Returns:
        [M, N] in out_dtype.
    """
    M, N, _ = _check_gemm_operands(a, a_scale, b, b_scale, bias)
    if backend == "torch":
        return block_scaled_mm_reference(a, a_scale, b, b_scale, bias, out_dtype)
    if backend != "triton":
        raise ValueError(f"backend {backend!r} is not 'triton' or 'torch'")
    if out is None:
        out = torch.empty(M, N, dtype=out_dtype, device=a.device)
    elif out.shape != (M, N) or out.dtype != out_dtype or out.stride(1) != 1:
        raise ValueError(f"out must be a row-major {out_dtype} [{M}, {N}]; got {out.dtype} {tuple(out.shape)}")
    _launch_block_scaled_mm(a, a_scale, b, b_scale, bias, out, None, config)
    return out


def block_scaled_mm_residual_reference(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, bias: torch.Tensor | None,
    residual: torch.Tensor, gate: torch.Tensor,
) -> torch.Tensor:
    """The unfused chain: bf16 GEMM output, then `residual += output · gate` per row group, in fp32."""
    y = block_scaled_mm_reference(a, a_scale, b, b_scale, bias, torch.bfloat16).float()
    return residual.add_(y * gate.repeat_interleave(residual.shape[0] // gate.shape[0], dim=0))


def block_scaled_mm_residual(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    gate: torch.Tensor,
    *,
    backend: Backend = "triton",
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """residual += gate · bf16((a ⊙ a_scale) @ (b ⊙ b_scale)^T + bias), in place, in the GEMM's epilogue.

    A Wan block's last step (`x + ffn(h) · gate`) without the bf16 output ever leaving the kernel.

    Args:
        a, a_scale, b, b_scale, bias: as `block_scaled_mm`.
        residual: fp32 [M, N], row-major; updated in place.
        gate: fp32 [G, N]; row m uses gate row m // (M / G) (one gate per sample of a batch of G).

    Returns:
        residual.
    """
    M, N, _ = _check_gemm_operands(a, a_scale, b, b_scale, bias)
    if residual.shape != (M, N) or residual.dtype != torch.float32 or residual.stride(1) != 1:
        raise ValueError(f"residual must be a row-major fp32 [{M}, {N}]; got {residual.dtype} {tuple(residual.shape)}")
    if gate.dim() != 2 or gate.shape[1] != N or M % gate.shape[0] or gate.dtype != torch.float32 or gate.stride(1) != 1:
        raise ValueError(f"gate must be fp32 [G, {N}] with G dividing {M}; got {gate.dtype} {tuple(gate.shape)}")
    if backend == "torch":
        return block_scaled_mm_residual_reference(a, a_scale, b, b_scale, bias, residual, gate)
    if backend != "triton":
        raise ValueError(f"backend {backend!r} is not 'triton' or 'torch'")
    _launch_block_scaled_mm(a, a_scale, b, b_scale, bias, residual, None, config, gate)
    return residual


def block_scaled_mm_gelu_quant_reference(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused chain the fused epilogue replaces: bf16 GEMM output → nn.GELU(tanh) in bf16 → int8 blocks."""
    h = block_scaled_mm_reference(a, a_scale, b, b_scale, bias, torch.bfloat16)
    return quantize_blockwise_reference(F.gelu(h, approximate="tanh"), "int8")


def block_scaled_mm_gelu_quant(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: Backend = "triton",
    config: dict[str, int] | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's `ffn.0` + GELU(tanh) + the `ffn.2` input quantizer in one kernel: the [M, N] hidden activation
    leaves the GEMM as int8 128×128 blocks (1 byte per value instead of a bf16 write, GELU pass and quantizer pass).

    Args: as `block_scaled_mm` (out: preallocated (q, scale)).

    Returns:
        q int8 [M, N] and scale fp32 [ceil(M/128), ceil(N/128)], the same format as `quantize_blockwise`.
    """
    M, N, _ = _check_gemm_operands(a, a_scale, b, b_scale, bias)
    if backend == "torch":
        return block_scaled_mm_gelu_quant_reference(a, a_scale, b, b_scale, bias)
    if backend != "triton":
        raise ValueError(f"backend {backend!r} is not 'triton' or 'torch'")
    scale_shape = (triton.cdiv(M, QUANT_BLOCK), triton.cdiv(N, QUANT_BLOCK))
    if out is None:
        q = torch.empty(M, N, dtype=torch.int8, device=a.device)
        scale = torch.empty(scale_shape, dtype=torch.float32, device=a.device)
    else:
        q, scale = out
        if q.shape != (M, N) or q.dtype != torch.int8 or scale.shape != scale_shape or scale.dtype != torch.float32:
            raise ValueError(f"out must be (int8 [{M}, {N}], float32 {scale_shape}); got ({q.dtype} "
                             f"{tuple(q.shape)}, {scale.dtype} {tuple(scale.shape)})")
    _launch_block_scaled_mm(a, a_scale, b, b_scale, bias, q, scale, config)
    return q, scale


def int8_linear(
    x: torch.Tensor,
    int8_weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: Backend = "triton",
) -> torch.Tensor:
    """W8A8 linear: quantize x per 128×128 block, INT8 GEMM with per-K-tile promotion, bias, cast to x.dtype.

    Args:
        x: [..., K] activations (bf16 / fp16 / fp32).
        int8_weight: int8 [N, K]; scale: fp32 [ceil(N/128), ceil(K/128)]; bias: [N] or None.
        backend: "triton" or "torch" (the reference math, for CPU).

    Returns:
        [..., N] in x.dtype.
    """
    if x.shape[-1] != int8_weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {int8_weight.shape[1]}")
    x2d = x.reshape(-1, x.shape[-1])  # [M, K]
    xq, xs = quantize_blockwise(x2d, "int8", backend=backend)
    y = block_scaled_mm(xq, xs, int8_weight, scale, bias, out_dtype=x.dtype, backend=backend)
    return y.reshape(*x.shape[:-1], int8_weight.shape[0])


def fp8_linear(
    x: torch.Tensor,
    fp8_weight: torch.Tensor,
    fp8_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: Backend = "triton",
) -> torch.Tensor:
    """As `int8_linear` with e4m3 operands: x quantized to e4m3 per 128×128 block, weight from
    `requantize_int8_to_fp8`. Returns [..., N] in x.dtype."""
    if x.shape[-1] != fp8_weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {fp8_weight.shape[1]}")
    x2d = x.reshape(-1, x.shape[-1])  # [M, K]
    xq, xs = quantize_blockwise(x2d, "fp8", backend=backend)
    y = block_scaled_mm(xq, xs, fp8_weight, fp8_scale, bias, out_dtype=x.dtype, backend=backend)
    return y.reshape(*x.shape[:-1], fp8_weight.shape[0])


# ---------------------------------------------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------------------------------------------


class Int8Linear(nn.Module):
    """A Linear stored in TurboDiffusion's W8A8 format: buffers `int8_weight`, `scale`, `bias`.

    The state dict is exactly TurboDiffusion's (`-quant` files load with strict=True). `gemm` picks the runtime
    kernel: "int8" (default: TurboDiffusion's numerics, our Triton kernel) or "fp8" (after `use_fp8()`, which
    requantizes the weight once at load): cuBLAS's block-scaled FP8 GEMM with 1×128 activation scales where it
    runs (`fp8_cublas`), else the Triton FP8 kernel with 128×128 activation tiles. `backend` None means Triton on
    CUDA, torch on CPU.
    """

    int8_weight: torch.Tensor
    scale: torch.Tensor
    fp8_weight_padded: torch.Tensor
    fp8_scale: torch.Tensor
    fp8_scale_padded: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        scale_shape = (triton.cdiv(out_features, QUANT_BLOCK), triton.cdiv(in_features, QUANT_BLOCK))
        self.register_buffer("int8_weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(scale_shape, dtype=torch.float32, device=device))
        self.bias: torch.Tensor | None
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self.gemm: GemmKind = "int8"
        self.backend: Backend | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Quantize an nn.Linear's weight (128×128 blocks) into a new Int8Linear on the same device.

        A Linear on the meta device gives empty meta buffers, to be filled by `load_state_dict(assign=True)`.
        """
        weight = linear.weight
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, dtype=weight.dtype,
                     device=weight.device)
        if weight.device.type == "meta":
            return module
        backend: Backend = "triton" if weight.is_cuda else "torch"
        with torch.no_grad():
            int8_weight, scale = quantize_blockwise(weight.detach(), "int8", backend=backend)
            module.int8_weight.copy_(int8_weight)
            module.scale.copy_(scale)
            if linear.bias is not None:
                module.bias.copy_(linear.bias.detach())  # type: ignore[union-attr]
        return module

    def use_fp8(self) -> None:
        """Requantize the INT8 weight to e4m3 (same blocks) and run the FP8 GEMM from now on.

        The INT8 copy is released so the resident size stays one byte per weight; the module then refuses to be
        saved (the e4m3 weight is a lossy runtime copy, not the checkpoint).
        """
        fp8_weight, fp8_scale = requantize_int8_to_fp8(self.int8_weight, self.scale)
        # one copy of the weight, K zero-padded for cuBLAS (`fp8_cublas.pad_weight`); the Triton kernel reads the
        # unpadded view `fp8_weight`
        padded_weight, padded_scale = fp8_cublas.pad_weight(fp8_weight, fp8_scale)
        self.register_buffer("fp8_weight_padded", padded_weight, persistent=False)
        self.register_buffer("fp8_scale", fp8_scale, persistent=False)
        self.register_buffer("fp8_scale_padded", padded_scale, persistent=False)
        self.int8_weight = torch.empty(0, self.in_features, dtype=torch.int8, device=fp8_weight.device)
        self.gemm = "fp8"

    @property
    def fp8_weight(self) -> torch.Tensor:
        """The e4m3 weight [N, K] (after `use_fp8`)."""
        return self.fp8_weight_padded[:, :self.in_features]

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        if self.gemm == "fp8":
            raise RuntimeError(f"{prefix or 'Int8Linear'} runs the FP8 copy of its weight (use_fp8) and no longer "
                               "holds the INT8 checkpoint; save the model before calling use_fp8")
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def runs_cublas_fp8(self, x: torch.Tensor) -> bool:
        """Whether this layer's GEMM on x goes to cuBLAS (FP8 mode, Triton backend, `fp8_cublas.usable`)."""
        return (self.gemm == "fp8" and (self.backend or ("triton" if x.is_cuda else "torch")) == "triton"
                and fp8_cublas.usable(x, self.in_features, self.out_features))

    def cublas_fp8_quantize(self, x: torch.Tensor, *, gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's input [..., K] as the cuBLAS GEMM reads it (`fp8_cublas.quantize_groups`, K padded)."""
        return fp8_cublas.quantize_groups(x.reshape(-1, x.shape[-1]).contiguous(), gelu=gelu,
                                          padded_cols=self.fp8_weight_padded.shape[1])

    def cublas_fp8_matmul(self, q: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """[M, N] from activations quantized by `cublas_fp8_quantize` (see `runs_cublas_fp8`)."""
        return fp8_cublas.block_fp8_mm(q, scale, self.fp8_weight_padded, self.fp8_scale_padded, self.bias, out_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = self.backend or ("triton" if x.is_cuda else "torch")
        if self.runs_cublas_fp8(x):
            q, scale = self.cublas_fp8_quantize(x)
            return self.cublas_fp8_matmul(q, scale, x.dtype).reshape(*x.shape[:-1], self.out_features)
        if self.gemm == "fp8":
            return fp8_linear(x, self.fp8_weight, self.fp8_scale, self.bias, backend=backend)
        return int8_linear(x, self.int8_weight, self.scale, self.bias, backend=backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, gemm={self.gemm}")


class Int8FeedForward(nn.Sequential):
    """Wan's `ffn` (Linear, GELU(tanh), Linear) with both Linears in W8A8 and the middle fused.

    A Sequential with the same children (0, 1, 2), so the state-dict keys stay `ffn.0.*` / `ffn.2.*`. On the
    Triton INT8 path with bf16 activations the first GEMM's epilogue applies bias + GELU and quantizes the hidden
    activation straight into the second GEMM's int8 blocks (`block_scaled_mm_gelu_quant`); on the cuBLAS FP8 path
    one Triton pass applies GELU and quantizes the hidden activation; otherwise it runs as the plain Sequential.
    """

    def __init__(self, fc1: Int8Linear, fc2: Int8Linear) -> None:
        super().__init__(fc1, nn.GELU(approximate="tanh"), fc2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1, fc2 = cast(Int8Linear, self[0]), cast(Int8Linear, self[2])
        backend = fc1.backend or ("triton" if x.is_cuda else "torch")
        if x.dtype == torch.bfloat16 and fc1.runs_cublas_fp8(x) and fc2.runs_cublas_fp8(x):
            return self._cublas_fp8(x)
        # The epilogue rounds the hidden activation to bf16 where the unfused chain stores it: bf16 inputs only.
        if backend != "triton" or x.dtype != torch.bfloat16 or fc1.gemm != "int8" or fc2.gemm != "int8":
            return super().forward(x)
        x2d = x.reshape(-1, x.shape[-1])  # [M, K]
        xq, xs = quantize_blockwise(x2d, "int8")
        hq, hs = block_scaled_mm_gelu_quant(xq, xs, fc1.int8_weight, fc1.scale, fc1.bias)
        y = block_scaled_mm(hq, hs, fc2.int8_weight, fc2.scale, fc2.bias, out_dtype=x.dtype)
        return y.reshape(*x.shape[:-1], fc2.out_features)

    def _cublas_fp8(self, x: torch.Tensor) -> torch.Tensor:
        fc1, fc2 = cast(Int8Linear, self[0]), cast(Int8Linear, self[2])
        q, scale = fc1.cublas_fp8_quantize(x)
        hidden = fc1.cublas_fp8_matmul(q, scale, x.dtype)  # bf16, where the unfused chain stores it
        q, scale = fc2.cublas_fp8_quantize(hidden, gelu=True)
        return fc2.cublas_fp8_matmul(q, scale, x.dtype).reshape(*x.shape[:-1], fc2.out_features)

    def add_to_residual(self, x: torch.Tensor, residual: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """residual += self(x) · gate in place: x [B, L, D] bf16, residual [B, L, D] fp32, gate [B, 1, D] fp32.

        On the fused Triton path the update happens in the second GEMM's epilogue (`block_scaled_mm_residual`);
        otherwise it is the plain `addcmul_`. Returns residual.
        """
        fc1, fc2 = cast(Int8Linear, self[0]), cast(Int8Linear, self[2])
        backend = fc1.backend or ("triton" if x.is_cuda else "torch")
        fusable = (backend == "triton" and x.dtype == torch.bfloat16 and fc1.gemm == "int8" and fc2.gemm == "int8"
                   and residual.is_contiguous() and gate.shape == (x.shape[0], 1, fc2.out_features))
        if not fusable:
            return residual.addcmul_(self(x), gate)
        xq, xs = quantize_blockwise(x.reshape(-1, x.shape[-1]), "int8")
        hq, hs = block_scaled_mm_gelu_quant(xq, xs, fc1.int8_weight, fc1.scale, fc1.bias)
        block_scaled_mm_residual(hq, hs, fc2.int8_weight, fc2.scale, fc2.bias, residual.view(-1, fc2.out_features),
                                 gate.reshape(gate.shape[0], -1).float())
        return residual


def shared_input_linears(x: torch.Tensor, layers: Sequence[nn.Module]) -> list[torch.Tensor]:
    """`[layer(x) for layer in layers]`, with x quantized once when every layer is an INT8 Int8Linear on the
    Triton path or every one runs the cuBLAS FP8 GEMM (q, k and v of an attention read the same activation: one
    quantizer pass instead of three)."""
    if len(layers) >= 2 and all(isinstance(layer, Int8Linear) and layer.runs_cublas_fp8(x)
                                and layer.in_features == x.shape[-1] for layer in layers):
        q, scale = cast(Int8Linear, layers[0]).cublas_fp8_quantize(x)  # same K, same padding: q, k, v
        return [cast(Int8Linear, layer).cublas_fp8_matmul(q, scale, x.dtype).reshape(*x.shape[:-1], -1)
                for layer in layers]
    int8_layers = [layer for layer in layers if isinstance(layer, Int8Linear) and layer.gemm == "int8"
                   and (layer.backend or ("triton" if x.is_cuda else "torch")) == "triton"]
    if len(int8_layers) != len(layers) or len(layers) < 2:
        return [layer(x) for layer in layers]
    x2d = x.reshape(-1, x.shape[-1])  # [M, K]
    xq, xs = quantize_blockwise(x2d, "int8")
    return [block_scaled_mm(xq, xs, layer.int8_weight, layer.scale, layer.bias, out_dtype=x.dtype)
            .reshape(*x.shape[:-1], layer.out_features) for layer in int8_layers]


# Imported last: the cuBLAS FP8 path builds on this module's quantizer helpers, and Int8Linear dispatches to it.
from engine.ops import fp8_cublas
