"""The cuBLAS FP8 path's activation quantizer (Triton, CPU interpreter) and scale layouts, against fp32 references.

The GEMM itself is cuBLAS (sm90 only): tests/gpu/test_w8a8_gpu.py checks it at Wan shapes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.ops import fp8_cublas
from engine.ops.int8_linear import FP8_E4M3_MAX, QUANT_BLOCK, Int8Linear, quantize_blockwise_reference

# (rows, cols): rows not a multiple of the 32-row program, cols not of the 128-wide group, one row, exact groups.
SHAPES = [(70, 300), (1, 77), (33, 256), (128, 128)]


def _activations(rows: int, cols: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen) * 2.0
    x[:, torch.randint(0, cols, (3,), generator=gen)] *= 30.0  # outlier channels
    x[0, :7] = 0.0  # a partly zero group, and values deep in e4m3's subnormal range below
    x[-1, -5:] *= 1e-4
    return x.to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_groups_matches_reference_bitwise(shape: tuple[int, int], dtype: torch.dtype) -> None:
    x = _activations(*shape, seed=hash(shape) % 1000, dtype=dtype)
    q, scale = fp8_cublas.quantize_groups(x)
    q_ref, scale_ref = fp8_cublas.quantize_groups_reference(x)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(scale, scale_ref)


@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_groups_scales_are_in_cublas_layout(shape: tuple[int, int]) -> None:
    rows, cols = shape
    _, scale = fp8_cublas.quantize_groups(_activations(rows, cols, seed=1, dtype=torch.bfloat16))
    assert scale.shape == (rows, -(-cols // 128))
    assert scale.stride(0) == 1 and scale.stride(1) % 4 == 0 and scale.stride(1) >= rows  # 16-byte aligned


def test_quantize_groups_error_within_half_e4m3_step() -> None:
    x = _activations(70, 300, seed=2, dtype=torch.float32)
    q, scale = fp8_cublas.quantize_groups(x)
    expanded = scale.repeat_interleave(128, dim=1)[:, :300]
    error = (q.float() * expanded - x).abs()
    # e4m3 keeps 3 mantissa bits: half a step is ≤ 2^-4 of the value; subnormals (< 2^-6) share the step 2^-9.
    bound = torch.maximum(x.abs() * 2.0**-4, expanded * 2.0**-10) * (1 + 1e-6)
    assert (error <= bound).all()
    assert q.float().abs().amax(dim=1).eq(FP8_E4M3_MAX).all()  # every row's largest group value maps to 448


def test_group_scales_are_never_coarser_than_the_tile_scale() -> None:
    x = _activations(200, 300, seed=3, dtype=torch.float32)
    _, group_scale = fp8_cublas.quantize_groups(x)
    _, tile_scale = quantize_blockwise_reference(x, "fp8")
    assert (group_scale <= tile_scale.repeat_interleave(QUANT_BLOCK, dim=0)[:200]).all()


@pytest.mark.parametrize("shape", [(70, 300), (33, 256)])
def test_quantize_groups_gelu_matches_unfused_chain(shape: tuple[int, int]) -> None:
    hidden = _activations(*shape, seed=4, dtype=torch.bfloat16) * 0.2
    q, scale = fp8_cublas.quantize_groups(hidden, gelu=True)
    q_ref, scale_ref = fp8_cublas.quantize_groups_reference(hidden, gelu=True)
    # nn.GELU in bf16 and the kernel's fp32 formula may differ in the last bf16 bit: a group's scale by one bf16
    # step of its amax, a value by one e4m3 step.
    torch.testing.assert_close(scale, scale_ref, rtol=2.0**-7, atol=0.0)
    steps = (q.float() - q_ref.float()).abs() / torch.maximum(q_ref.float().abs() * 2.0**-3, torch.tensor(2.0**-9))
    assert steps.max() <= 1.0 + 1e-6
    assert steps.gt(0).float().mean() < 0.02


def test_block_fp8_mm_reference_is_the_float_product_of_dequantized_operands() -> None:
    gen = torch.Generator().manual_seed(5)
    x, weight = torch.randn(40, 256, generator=gen), torch.randn(96, 256, generator=gen) * 0.02
    bias = torch.randn(96, generator=gen)
    q, scale = fp8_cublas.quantize_groups_reference(x)
    w8, w_scale = quantize_blockwise_reference(weight, "fp8")
    y = fp8_cublas.block_fp8_mm_reference(q, scale, w8, w_scale, bias)
    x_hat = q.float() * scale.repeat_interleave(128, dim=1)
    w_hat = w8.float() * w_scale.repeat_interleave(128, dim=0)[:96].repeat_interleave(128, dim=1)
    torch.testing.assert_close(y, x_hat @ w_hat.T + bias, rtol=1e-6, atol=1e-6)
    assert ((y - F.linear(x, weight, bias)).norm() / F.linear(x, weight, bias).norm()) < 0.06  # e4m3 on both sides


@pytest.mark.parametrize("in_features", [128, 512, 8960, 200])  # 8960: Wan 1.3B's FFN width; 200: K % 128 ≠ 0
def test_pad_weight_keeps_the_product_and_aligns_the_scale_stride(in_features: int) -> None:
    gen = torch.Generator().manual_seed(6)
    weight, weight_scale = quantize_blockwise_reference(torch.randn(130, in_features, generator=gen), "fp8")
    padded, padded_scale = fp8_cublas.pad_weight(weight, weight_scale)
    k_padded = fp8_cublas.padded_in_features(in_features)
    assert k_padded == (-(-in_features // 512) * 512 if in_features % 128 == 0 else in_features)
    assert padded.shape == (130, k_padded) and padded_scale.shape == (2, -(-k_padded // 128))
    assert torch.equal(padded[:, :in_features].view(torch.uint8), weight.view(torch.uint8))
    assert not padded[:, in_features:].float().any() and not padded_scale[:, weight_scale.shape[1]:].any()
    if in_features % 128 == 0:
        assert padded_scale.t().stride() == (1, padded_scale.shape[1]) and padded_scale.shape[1] % 4 == 0
        x = torch.randn(7, in_features, generator=gen)
        q, scale = fp8_cublas.quantize_groups(x, padded_cols=k_padded)
        assert q.shape == (7, k_padded) and not q[:, in_features:].float().any()
        q_ref, scale_ref = fp8_cublas.quantize_groups_reference(x)
        torch.testing.assert_close(fp8_cublas.block_fp8_mm_reference(q, scale, padded, padded_scale),
                                   fp8_cublas.block_fp8_mm_reference(q_ref, scale_ref, weight, weight_scale))


def test_cublas_path_is_off_on_the_cpu_and_for_ragged_k() -> None:
    layer = Int8Linear.from_linear(torch.nn.Linear(256, 128))
    layer.use_fp8()
    assert not layer.runs_cublas_fp8(torch.randn(4, 256, dtype=torch.bfloat16))  # CPU: the FP8 Triton/torch path
    assert not fp8_cublas.usable(torch.randn(4, 200), 200, 128)
