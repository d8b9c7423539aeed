"""Fused LayerNorm / RMSNorm / LayerNorm+modulate: Triton kernels (CPU interpreter) against fp32 torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.ops.norms import layer_norm, layer_norm_modulate, rms_norm

# x shapes: 2-D and 3-D, D a power of two, not one (masked lanes), short rows packed several per program,
# a long row (one program per row).
SHAPES = [(37, 96), (2, 19, 300), (3, 5, 64), (4, 1536)]


def _input(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    # A non-zero mean and a few large channels, so a wrong mean or a variance over padded lanes shows.
    x = torch.randn(*shape) * 2 + 0.7
    x[..., 1] *= 20
    return x.to(dtype)


def _poisoned(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.full(like.shape, float("nan"), dtype=dtype)


def _check(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.isfinite(actual).all()  # the NaN poison was overwritten everywhere
    if actual.dtype == torch.float32:
        # The bound: fp32 statistics in a different summation order (rsqrt vs 1/sqrt): ~1e-7.
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    else:
        # bf16 output: one bf16 step (2^-7 relative); Triton's CPU interpreter truncates the final cast where
        # the GPU rounds to nearest.
        diff = (actual.float() - expected.float()).abs()
        assert (diff <= expected.float().abs() * 2.0**-7 + 1e-6).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", [False, True])
def test_layer_norm_matches_torch(shape: tuple[int, ...], dtype: torch.dtype, affine: bool) -> None:
    x = _input(shape, dtype)
    d = shape[-1]
    weight, bias = (torch.randn(d), torch.randn(d)) if affine else (None, None)
    out = _poisoned(x, dtype)
    layer_norm(x, weight, bias, eps=1e-6, out=out)
    expected = F.layer_norm(x.float(), (d,), weight, bias, eps=1e-6).to(dtype)
    _check(out, expected)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_torch(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = _input(shape, dtype)
    weight = torch.randn(shape[-1])
    out = _poisoned(x, dtype)
    rms_norm(x, weight, eps=1e-6, out=out)
    xf = x.float()
    expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * weight).to(dtype)
    _check(out, expected)


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_modulate_matches_official_block_math(per_token: bool, dtype: torch.dtype) -> None:
    b, length, d = 2, 23, 160
    x = _input((b, length, d), dtype)
    # Wan2.1 / A14B: one modulation per sample [B, 1, D]; Wan2.2-5B: one per token [B, L, D].
    shift = torch.randn(b, length if per_token else 1, d)
    scale = torch.randn(b, length if per_token else 1, d) * 0.5
    out = _poisoned(x, dtype)
    layer_norm_modulate(x, shift, scale, eps=1e-6, out=out)
    # The official block: norm1(x).float() * (1 + e[1]) + e[0], LayerNorm without affine.
    expected = (F.layer_norm(x.float(), (d,), eps=1e-6) * (1 + scale) + shift).to(dtype)
    _check(out, expected)


def test_layer_norm_modulate_2d_input_and_out_dtype() -> None:
    x = _input((50, 128), torch.float32)
    shift, scale = torch.randn(128), torch.randn(1, 128)
    y = layer_norm_modulate(x, shift, scale, out_dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    expected = layer_norm_modulate(x, shift, scale, out_dtype=torch.bfloat16, backend="torch")
    diff = (y.float() - expected.float()).abs()
    assert (diff <= expected.float().abs() * 2.0**-7 + 1e-6).all()  # one bf16 step, as in _check


def test_norms_reject_bad_inputs() -> None:
    x = torch.randn(4, 8, 32)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(16))
    with pytest.raises(ValueError, match="broadcast"):
        layer_norm_modulate(x, torch.randn(3, 1, 32), torch.randn(4, 1, 32))
    with pytest.raises(ValueError, match="backend"):
        layer_norm(x, backend="cuda")  # type: ignore[arg-type]


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("modulated", [False, True])
def test_residual_update_fused_into_the_norm(in_place: bool, gated: bool, modulated: bool) -> None:
    """x + residual·gate is stored (in x or residual_out) and normalised, as the Wan block's separate steps."""
    b, length, d = 2, 19, 300
    x = _input((b, length, d), torch.float32)
    residual = _input((b, length, d), torch.bfloat16)  # the attention / FFN output, matmul dtype
    gate = torch.randn(b, 1, d) if gated else None
    shift, scale = torch.randn(b, 1, d), torch.randn(b, 1, d) * 0.5
    weight, bias = torch.randn(d), torch.randn(d)
    expected_x = x + (residual.float() * gate if gated else residual.float())
    expected = (F.layer_norm(expected_x, (d,), eps=1e-6) * (1 + scale) + shift if modulated
                else F.layer_norm(expected_x, (d,), weight, bias, eps=1e-6)).to(torch.bfloat16)
    x_before = x.clone()
    for backend in ("torch", "triton"):
        x_run = x_before.clone()
        kwargs = dict(residual=residual, gate=gate, residual_out=None if in_place else _poisoned(x, torch.float32),
                      out_dtype=torch.bfloat16, backend=backend)
        if modulated:
            result = layer_norm_modulate(x_run, shift, scale, 1e-6, **kwargs)
        else:
            result = layer_norm(x_run, weight, bias, 1e-6, **kwargs)
        summed = x_run if in_place else kwargs["residual_out"]
        torch.testing.assert_close(summed, expected_x, rtol=1e-6, atol=1e-5)  # FMA vs mul-then-add: an ulp
        if not in_place:
            assert torch.equal(x_run, x_before)  # x itself untouched
        _check(result, expected)


def test_residual_update_rejects_bad_targets() -> None:
    x = _input((2, 5, 64), torch.float32)
    with pytest.raises(ValueError, match="need a residual"):
        layer_norm(x, gate=torch.ones(2, 1, 64))
    with pytest.raises(ValueError, match="fp32 contiguous"):
        layer_norm(x.bfloat16(), residual=torch.ones(2, 5, 64))
    with pytest.raises(ValueError, match="x's shape"):
        layer_norm(x, residual=torch.ones(2, 4, 64))
