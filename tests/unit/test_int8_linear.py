"""W8A8 block-128 quantizer and GEMM: Triton kernels (CPU interpreter) against the fp32/fp64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from engine.ops.int8_linear import (
    FP8_E4M3_MAX,
    QUANT_BLOCK,
    Int8FeedForward,
    Int8Linear,
    block_scaled_mm,
    block_scaled_mm_gelu_quant,
    block_scaled_mm_gelu_quant_reference,
    block_scaled_mm_reference,
    block_scaled_mm_residual,
    dequantize_blockwise,
    fp8_linear,
    int8_linear,
    int8_linear_reference,
    quantize_blockwise,
    quantize_blockwise_reference,
    requantize_int8_to_fp8,
    shared_input_linears,
)

# (rows, cols): one exact tile, ragged rows and columns, a single row, a ragged 2×2-tile grid.
QUANT_SHAPES = [(128, 128), (200, 300), (1, 77), (257, 129)]
# (M, K, N): M not a multiple of any tile, K % 128 ≠ 0 (TurboDiffusion's kernel writes zeros there), ragged N,
# exact tiles, tiny M.
GEMM_SHAPES = [(200, 300, 260), (128, 256, 128), (130, 200, 70), (5, 64, 200)]


def _with_outlier_channels(x: torch.Tensor, channels: tuple[int, ...] = (3, 141), gain: float = 30.0) -> torch.Tensor:
    """Activation outliers live in a few channels (the LLM.int8 observation); scale those columns up."""
    x = x.clone()
    for c in channels:
        if c < x.shape[-1]:
            x[..., c] *= gain
    return x


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _numpy_turbodiffusion_quant(tile: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """TurboDiffusion `Quantization` (ops/quant) written independently in numpy for one tile: amax floored at
    1e-8, fp32 multiplier 128/amax, round half to even (cvt.rni), saturate to [-128, 127], scale amax/128."""
    amax = np.float32(max(np.float32(1e-8), np.abs(tile).max()))
    multiplier = np.float32(128.0) / amax
    q = np.clip(np.rint(tile * multiplier), -128, 127).astype(np.int8)
    return q, amax / np.float32(128.0)


@pytest.mark.parametrize("shape", QUANT_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantize_blockwise_triton_matches_reference_bitwise(
    shape: tuple[int, int], dtype: torch.dtype, fmt: str
) -> None:
    x = _with_outlier_channels(torch.randn(*shape) * 3).to(dtype)
    q = torch.full(shape, 77, dtype=torch.int8).view(torch.float8_e4m3fn if fmt == "fp8" else torch.int8)
    scale = torch.full((math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)), float("nan"))
    quantize_blockwise(x, fmt, out=(q, scale))  # poisoned outputs: every element must be overwritten
    q_ref, scale_ref = quantize_blockwise_reference(x, fmt)
    # Same fp32 operations in the same order, so the kernel must agree to the bit.
    assert torch.equal(q.view(torch.int8), q_ref.view(torch.int8))
    assert torch.equal(scale, scale_ref)


def test_quantize_blockwise_reference_matches_turbodiffusion_formula() -> None:
    x = torch.randn(130, 260) * 2
    x[5, 7] = 1000.0  # one huge value: its tile's other entries collapse towards 0
    x[:128, 128:256] = 0.0  # an all-zero tile: scale is the 1e-8 floor / 128, q is 0
    q, scale = quantize_blockwise_reference(x)
    xn = x.numpy()
    for rb in range(scale.shape[0]):
        for cb in range(scale.shape[1]):
            tile = xn[rb * 128:(rb + 1) * 128, cb * 128:(cb + 1) * 128]
            q_np, s_np = _numpy_turbodiffusion_quant(tile)
            assert np.array_equal(q[rb * 128:(rb + 1) * 128, cb * 128:(cb + 1) * 128].numpy(), q_np)
            assert scale[rb, cb].item() == s_np


def test_quantize_blockwise_rounds_half_to_even_and_saturates() -> None:
    # amax = 1 makes the multiplier exactly 128, so v = 128·x lands on the chosen half-integers.
    row = torch.tensor([1.0, -1.0, 2.5 / 128, 3.5 / 128, -2.5 / 128, 0.0] + [0.0] * 122)
    q, scale = quantize_blockwise(row[None, :])
    assert q[0, :6].tolist() == [127, -128, 2, 4, -2, 0]  # +amax saturates to 127, −amax maps to −128
    assert scale.item() == 1.0 / 128


@pytest.mark.parametrize("shape", QUANT_SHAPES)
def test_quantize_blockwise_int8_error_within_half_step(shape: tuple[int, int]) -> None:
    x = _with_outlier_channels(torch.randn(*shape) * 3)
    q, scale = quantize_blockwise(x)
    step = dequantize_blockwise(torch.ones_like(q), scale)  # the tile's scale at every element
    error = (dequantize_blockwise(q, scale) - x).abs()
    # Round to nearest: at most half a step, plus fp32 rounding of x·(128/amax) (≤ 2^-24 relative of 128 steps).
    # The one exception is +amax itself, saturated from 128 to 127: one whole step.
    saturated = q == 127
    assert (error[~saturated] <= step[~saturated] * (0.5 + 1e-5)).all()
    assert (error[saturated] <= step[saturated] * (1.0 + 1e-5)).all()


def test_quantize_blockwise_fp8_relative_error_within_half_ulp() -> None:
    x = _with_outlier_channels(torch.randn(190, 260))
    q, scale = quantize_blockwise(x, "fp8")
    error = (dequantize_blockwise(q, scale) - x).abs()
    scaled = (x / dequantize_blockwise(torch.ones_like(q, dtype=torch.float32), scale)).abs()
    normal = scaled >= 2.0**-6  # e4m3 normals: 3 mantissa bits, relative half-ulp ≤ 2^-4
    assert (error[normal] <= x.abs()[normal] * 2.0**-4 * (1 + 1e-5)).all()
    # Subnormals share the absolute spacing 2^-9 (in scaled units): error ≤ half of it.
    sub_step = dequantize_blockwise(torch.full_like(q, 2.0**-9, dtype=torch.float32), scale)
    assert (error[~normal] <= sub_step[~normal] * 0.5 * (1 + 1e-5)).all()
    assert q.float().abs().max() <= FP8_E4M3_MAX


@pytest.mark.parametrize("shape", GEMM_SHAPES)
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_block_scaled_mm_matches_reference(shape: tuple[int, int, int], fmt: str) -> None:
    m, k, n = shape
    a, a_scale = quantize_blockwise(_with_outlier_channels(torch.randn(m, k)), fmt)
    b, b_scale = quantize_blockwise(torch.randn(n, k) * 0.05, fmt)
    bias = torch.randn(n)
    out = torch.full((m, n), float("nan"))  # poisoned: a tile the kernel skips stays NaN and fails
    block_scaled_mm(a, a_scale, b, b_scale, bias, out_dtype=torch.float32, out=out)
    expected = block_scaled_mm_reference(a.double(), a_scale.double(), b.double(), b_scale.double(), bias.double(),
                                         torch.float64)
    # Same quantized math; the kernel's int32 partials are exact, only the fp32 per-tile sums round (~1e-7).
    assert torch.isfinite(out).all()
    assert _rel(out, expected) <= 1e-6
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("config", [
    {"BLOCK_M": 128, "BLOCK_N": 64, "SPLIT_N": 1},
    {"BLOCK_M": 32, "BLOCK_N": 256, "SPLIT_N": 2},
])
def test_block_scaled_mm_tile_configs_agree(config: dict[str, int]) -> None:
    # Tiles that straddle the edges differently (a 256-wide tile holds two column scale blocks).
    m, k, n = 150, 384, 300
    a, a_scale = quantize_blockwise(torch.randn(m, k))
    b, b_scale = quantize_blockwise(torch.randn(n, k))
    out = block_scaled_mm(a, a_scale, b, b_scale, out_dtype=torch.float32, config=config)
    expected = block_scaled_mm_reference(a, a_scale, b, b_scale)
    assert _rel(out, expected) <= 1e-6  # fp32 accumulation order only


def test_int8_linear_ragged_k_is_not_zero() -> None:
    # K = 200: TurboDiffusion's can_implement(K % 128 == 0) fails and its output stays all zeros.
    x = torch.randn(3, 40, 200)
    linear = nn.Linear(200, 96)
    module = Int8Linear.from_linear(linear)
    module.backend = "triton"
    y = module(x)
    assert y.shape == (3, 40, 96)
    expected = int8_linear_reference(x, module.int8_weight, module.scale, module.bias)
    assert _rel(y, expected) <= 1e-6
    assert _rel(y, linear(x)) <= 0.03  # quantization error bound, see the test below


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_matches_same_quantized_math(dtype: torch.dtype) -> None:
    x = _with_outlier_channels(torch.randn(2, 75, 320)).to(dtype)
    weight, bias = torch.randn(200, 320) * 0.05, torch.randn(200).to(dtype)
    int8_weight, scale = quantize_blockwise(weight)
    y = int8_linear(x, int8_weight, scale, bias)
    expected = int8_linear_reference(x, int8_weight, scale, bias)
    assert y.dtype == dtype and y.shape == (2, 75, 200)
    if dtype == torch.float32:
        assert _rel(y, expected) <= 1e-3  # the bound; the fp32 sums land near 1e-7
    else:
        # One bf16 step (2^-7 relative): Triton's CPU interpreter truncates fp32 → bf16 instead of rounding to
        # nearest (the GPU's cvt.rn, checked in tests/gpu), so allow a whole step rather than half.
        assert ((y.float() - expected).abs() <= expected.abs() * 2.0**-7 + 1e-6).all()


@pytest.mark.parametrize("outliers", [False, True])
def test_int8_linear_error_vs_float_linear_within_quantization_bound(outliers: bool) -> None:
    m, k, n = 150, 384, 160
    x = torch.randn(m, k)
    if outliers:
        x = _with_outlier_channels(x)
    weight = torch.randn(n, k) * 0.05
    int8_weight, scale = quantize_blockwise(weight)
    y = int8_linear(x, int8_weight, scale)
    y_float = x @ weight.T

    # Guaranteed bound, element by element: |Δy| ≤ Σ_k (|e_x|·|w| + |x̂|·|e_w|) with |e| ≤ half a step (+1 step
    # where a value saturated at +amax); the fp32 accumulation adds ~1e-6 relative.
    xq, xs = quantize_blockwise(x)
    x_step = dequantize_blockwise(torch.ones_like(xq), xs) * torch.where(xq == 127, 1.0, 0.5)
    w_step = dequantize_blockwise(torch.ones_like(int8_weight), scale) * torch.where(int8_weight == 127, 1.0, 0.5)
    bound = x_step @ weight.abs().T + dequantize_blockwise(xq, xs).abs() @ w_step.T
    assert ((y - y_float).abs() <= bound * (1 + 1e-4) + 1e-5).all()

    # Statistically: rounding errors are uniform with variance step²/12 and independent, so the expected error
    # power is Σ_k (step_x²/12·w² + x²·step_w²/12); the check allows 1.5× its square root. Gaussian tiles have
    # amax ≈ 4σ, so each operand carries ~4/128/√12 ≈ 0.9 % and the product ~1.3 %: below 2 % without outliers
    # (the 1e-2 sits under what 128×128 blocks give on Gaussian data). With 30× outlier channels the 127
    # ordinary channels sharing their tile get a 30× coarser step, and the error grows to ~5 %.
    x_var = dequantize_blockwise(torch.ones_like(xq), xs).pow(2) / 12
    w_var = dequantize_blockwise(torch.ones_like(int8_weight), scale).pow(2) / 12
    predicted = ((x_var @ weight.pow(2).T + x.pow(2) @ w_var.T).sum().sqrt() / y_float.norm()).item()
    assert _rel(y, y_float) <= 1.5 * predicted
    if not outliers:
        assert _rel(y, y_float) <= 0.02


def test_fp8_linear_matches_reference_after_requantization() -> None:
    x = torch.randn(2, 70, 256)
    weight = torch.randn(200, 256) * 0.05
    int8_weight, scale = quantize_blockwise(weight)
    fp8_weight, fp8_scale = requantize_int8_to_fp8(int8_weight, scale)
    # e4m3 keeps 3 mantissa bits: each weight moves by ≤ 2^-4 relative from the INT8 value it re-encodes.
    w_int8, w_fp8 = dequantize_blockwise(int8_weight, scale), dequantize_blockwise(fp8_weight, fp8_scale)
    assert ((w_fp8 - w_int8).abs() <= w_int8.abs() * 2.0**-4 * (1 + 1e-5) + 1e-12).all()
    y = fp8_linear(x, fp8_weight, fp8_scale)
    xq, xs = quantize_blockwise_reference(x.reshape(-1, 256), "fp8")
    expected = block_scaled_mm_reference(xq, xs, fp8_weight, fp8_scale).reshape(2, 70, 200)
    assert _rel(y, expected) <= 1e-6  # same quantized math, fp32 accumulation order only


def test_int8_linear_module_from_linear_state_dict_matches_turbodiffusion() -> None:
    linear = nn.Linear(300, 260).to(torch.bfloat16)
    module = Int8Linear.from_linear(linear)
    state = module.state_dict()
    assert list(state) == ["int8_weight", "scale", "bias"]
    assert state["int8_weight"].dtype == torch.int8 and state["int8_weight"].shape == (260, 300)
    assert state["scale"].dtype == torch.float32 and state["scale"].shape == (3, 3)
    assert state["bias"].dtype == torch.bfloat16 and torch.equal(state["bias"], linear.bias.detach())
    q, s = quantize_blockwise_reference(linear.weight.detach())
    assert torch.equal(state["int8_weight"], q) and torch.equal(state["scale"], s)

    on_meta = Int8Linear.from_linear(nn.Linear(300, 260, device="meta", dtype=torch.bfloat16))
    assert on_meta.int8_weight.is_meta
    on_meta.load_state_dict(state, strict=True, assign=True)
    x = torch.randn(4, 300, dtype=torch.bfloat16)
    torch.testing.assert_close(on_meta(x), module(x), rtol=0, atol=0)  # same buffers, same math


def test_int8_linear_module_triton_and_torch_backends_agree() -> None:
    module = Int8Linear.from_linear(nn.Linear(256, 130, bias=False))
    x = _with_outlier_channels(torch.randn(3, 50, 256))
    module.backend = "torch"
    reference = module(x)
    module.backend = "triton"
    assert _rel(module(x), reference) <= 1e-6  # same quantizer bits, fp32 sums in a different order


def test_int8_linear_module_fp8_mode_refuses_to_save() -> None:
    module = Int8Linear.from_linear(nn.Linear(128, 128))
    x = torch.randn(10, 128)
    y_int8 = module(x)
    module.use_fp8()
    assert module.int8_weight.numel() == 0  # the INT8 copy is released
    assert _rel(module(x), y_int8) <= 0.06  # e4m3 re-encoding: ≤ 2^-4 per weight and per activation
    with pytest.raises(RuntimeError, match="use_fp8"):
        module.state_dict()


def test_block_scaled_mm_rejects_bad_inputs() -> None:
    a, a_scale = quantize_blockwise(torch.randn(10, 256))
    b, b_scale = quantize_blockwise(torch.randn(20, 256))
    with pytest.raises(ValueError, match="b_scale"):
        block_scaled_mm(a, a_scale, b, b_scale[:, :1])
    with pytest.raises(ValueError, match="int8 or float8"):
        block_scaled_mm(a.float(), a_scale, b, b_scale)
    with pytest.raises(ValueError, match="BLOCK_M"):
        block_scaled_mm(a, a_scale, b, b_scale, config={"BLOCK_M": 256, "BLOCK_N": 64})
    assert QUANT_BLOCK == 128


@pytest.mark.parametrize("shape", [(200, 256, 300), (128, 130, 128)])
def test_block_scaled_mm_gelu_quant_matches_unfused_chain(shape: tuple[int, int, int]) -> None:
    m, k, n = shape
    a, a_scale = quantize_blockwise(_with_outlier_channels(torch.randn(m, k)))
    b, b_scale = quantize_blockwise(torch.randn(n, k) * 0.05)
    bias = torch.randn(n).bfloat16()
    q = torch.full((m, n), 77, dtype=torch.int8)
    scale = torch.full((math.ceil(m / 128), math.ceil(n / 128)), float("nan"))
    block_scaled_mm_gelu_quant(a, a_scale, b, b_scale, bias, out=(q, scale))  # poisoned outputs
    q_ref, scale_ref = block_scaled_mm_gelu_quant_reference(a, a_scale, b, b_scale, bias)
    # The fused epilogue rounds to bf16 where the unfused chain stores bf16, so the blocks agree except where
    # GELU's last fp32 bit (sigmoid form vs torch's tanh) or the fp32 summation order flips a bf16 rounding:
    # a block's amax moves by at most one bf16 step (2^-8 relative) and a few values by one int8 step.
    torch.testing.assert_close(scale, scale_ref, rtol=2.0**-7, atol=0)
    assert (q.int() - q_ref.int()).abs().max() <= 1
    assert (q == q_ref).float().mean() >= 0.99


def test_int8_feed_forward_fused_matches_sequential() -> None:
    fc1, fc2 = nn.Linear(192, 320).bfloat16(), nn.Linear(320, 192).bfloat16()
    ffn = Int8FeedForward(Int8Linear.from_linear(fc1), Int8Linear.from_linear(fc2))
    x = torch.randn(2, 90, 192).bfloat16()
    sequential = nn.Sequential.forward(ffn, x)  # Int8Linear, GELU, Int8Linear: three separate steps
    for module in (ffn[0], ffn[2]):
        module.backend = "triton"
    fused = ffn(x)
    assert fused.shape == x.shape
    # Same int8 blocks up to one step in rare elements (see above), then one bf16 step of output rounding
    # (the interpreter truncates, 2^-7): far below the quantization error itself (~1e-2).
    assert _rel(fused, sequential) <= 5e-3


def test_shared_input_linears_quantize_once_and_match_each_layer() -> None:
    layers = [Int8Linear.from_linear(nn.Linear(192, n)) for n in (192, 192, 70)]
    x = _with_outlier_channels(torch.randn(2, 40, 192))
    expected = [layer(x) for layer in layers]  # CPU default: each layer's own torch-backend quantization
    for layer in layers:
        layer.backend = "triton"  # the Triton path (interpreted here) is the one that shares the quantizer
    outputs = shared_input_linears(x, layers)
    assert [tuple(o.shape) for o in outputs] == [(2, 40, 192), (2, 40, 192), (2, 40, 70)]
    for out, ref in zip(outputs, expected, strict=True):
        assert _rel(out, ref) <= 1e-6
    # A float layer in the group: every layer runs on its own.
    mixed = shared_input_linears(x, [layers[0], nn.Linear(192, 8)])
    assert _rel(mixed[0], expected[0]) <= 1e-6 and mixed[1].shape == (2, 40, 8)


@pytest.mark.parametrize(("m", "k", "n", "groups"), [(200, 300, 260, 2), (128, 256, 128, 1)])
def test_block_scaled_mm_residual_matches_unfused_chain(m: int, k: int, n: int, groups: int) -> None:
    """residual += gate · bf16(GEMM) in the epilogue equals the Linear's bf16 output added the official way."""
    aq, a_s = quantize_blockwise_reference(_with_outlier_channels(torch.randn(m, k)), "int8")
    bq, b_s = quantize_blockwise_reference(torch.randn(n, k), "int8")
    bias = torch.randn(n).bfloat16()
    gate = torch.randn(groups, n)
    residual = torch.randn(m, n) * 4
    update = block_scaled_mm_reference(aq, a_s, bq, b_s, bias, torch.bfloat16).float() * \
        gate.repeat_interleave(m // groups, dim=0)
    expected = residual + update
    for backend in ("torch", "triton"):
        out = residual.clone()
        assert block_scaled_mm_residual(aq, a_s, bq, b_s, bias, out, gate, backend=backend) is out
        _assert_within_one_bf16_step(out, expected, update)
    with pytest.raises(ValueError, match="gate must be"):
        block_scaled_mm_residual(aq, a_s, bq, b_s, bias, residual.clone(), torch.randn(3, n))


def test_int8_feed_forward_add_to_residual_matches_plain_update() -> None:
    ffn = Int8FeedForward(Int8Linear.from_linear(nn.Linear(128, 256)), Int8Linear.from_linear(nn.Linear(256, 128)))
    x = _with_outlier_channels(torch.randn(2, 70, 128)).bfloat16()
    gate = torch.randn(2, 1, 128)
    residual = torch.randn(2, 70, 128)
    for layer in (ffn[0], ffn[2]):
        layer.backend = "triton"
    update = ffn(x).float() * gate
    out = residual.clone()
    ffn.add_to_residual(x, out, gate)
    _assert_within_one_bf16_step(out, residual + update, update)


def _assert_within_one_bf16_step(out: torch.Tensor, expected: torch.Tensor, update: torch.Tensor) -> None:
    """The fused epilogue rounds the GEMM output to bf16 as the unfused chain stores it: equal up to one bf16 step
    of the update where fp32 sums in another order (or the interpreter's truncating cast) round the other way."""
    assert ((out - expected).abs() <= update.abs() * 2.0**-7 + 1e-6 * expected.abs() + 1e-6).all()
