"""The VAE's fused norm / SiLU / bias / residual kernel (CPU interpreter) against its fp32 torch reference,
and the reference against the old module's own formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.ops.vae_ops import (
    add_bias_residual,
    upsample_nearest2x,
    upsample_nearest2x_reference,
    vae_rms_norm,
    vae_rms_norm_reference,
)

CL3D = torch.channels_last_3d
# The decoder's widths (96 / 192 / 384: not powers of two, masked lanes) and a small odd one (vector tails).
CHANNELS = [96, 192, 384, 13]


def _channels_last(shape: tuple[int, ...], dtype: torch.dtype, *, scale: float = 1.0) -> torch.Tensor:
    """Random [B, C, F, H, W] in channels_last_3d with a non-zero mean and two outlier channels (x30, x0.01),
    so a norm over the wrong axis, a padded lane in the sum or a wrong per-channel index shows."""
    x = (torch.randn(shape) + 0.3) * scale
    x[:, 1] *= 30.0
    x[:, -1] *= 0.01
    return x.to(dtype).contiguous(memory_format=CL3D)


def _poisoned_like(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.full_like(x, float("nan"), dtype=dtype or x.dtype, memory_format=torch.preserve_format)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.isfinite(actual).all()  # every poisoned element was written
    expected = expected.to(actual.dtype).float()
    if actual.dtype == torch.float32:
        # fp32 with another summation order (and s / norm · g vs the reference's two products): ~1e-7.
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    else:
        # One bf16 step (2^-7 relative): the interpreter truncates the final cast where the GPU rounds to
        # nearest (half a step).
        assert ((actual.float() - expected).abs() <= expected.abs() * 2.0**-7 + 1e-6).all()


@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("silu", [True, False])
def test_norm_matches_reference(channels: int, dtype: torch.dtype, silu: bool) -> None:
    x = _channels_last((2, channels, 3, 5, 7), dtype)
    gamma = (1.0 + 0.5 * torch.randn(channels, 1, 1, 1)).to(dtype)
    out = _poisoned_like(x)
    result = vae_rms_norm(x, gamma, silu=silu, out=out)
    assert result is out
    _assert_close(out, vae_rms_norm_reference(x, gamma, silu=silu))


@pytest.mark.parametrize("channels", [96, 13])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_place", [False, True])
def test_norm_with_bias_and_residual_into_a_buffer_tail(
    channels: int, dtype: torch.dtype, in_place: bool
) -> None:
    """The decoder's use: conv output + its bias + the residual, the sum kept (in x or elsewhere), the
    normalised SiLU written into the tail of a causal conv's [B, C, 2 + F, H, W] buffer (strided per batch
    item)."""
    b, f, h, w = 2, 4, 3, 5
    x = _channels_last((b, channels, f, h, w), dtype)
    residual = _channels_last((b, channels, f, h, w), dtype, scale=3.0)
    bias = torch.randn(channels).to(dtype)
    gamma = (1.0 + 0.5 * torch.randn(channels, 1, 1, 1)).to(dtype)
    buffer = torch.full((b, channels, 2 + f, h, w), float("nan"), dtype=dtype).contiguous(memory_format=CL3D)
    head = torch.randn(b, channels, 2, h, w).to(dtype)
    buffer[:, :, :2] = head
    x_before = x.clone()
    sum_out = x if in_place else _poisoned_like(x)

    vae_rms_norm(x, gamma, bias=bias, residual=residual, silu=True, out=buffer[:, :, 2:], sum_out=sum_out)

    expected_sum = x_before.float() + bias.float().view(-1, 1, 1, 1) + residual.float()
    _assert_close(sum_out, expected_sum)
    _assert_close(buffer[:, :, 2:], vae_rms_norm_reference(x_before, gamma, bias, residual, silu=True))
    assert torch.equal(buffer[:, :, :2], head)  # the history at the head is not touched
    if not in_place:
        assert torch.equal(x, x_before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_on_a_channels_last_image_batch(dtype: torch.dtype) -> None:
    """4-D [B*F, C, H, W] channels_last works too, and the default output keeps x's layout."""
    x = _channels_last((2, 192, 1, 6, 10), dtype)[:, :, 0].contiguous(memory_format=torch.channels_last)
    gamma = (1.0 + 0.5 * torch.randn(192, 1, 1)).to(dtype)
    y = vae_rms_norm(x, gamma)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.dtype == dtype
    _assert_close(y, vae_rms_norm_reference(x, gamma))


@pytest.mark.parametrize("channels", [192, 13])
def test_add_bias_residual_in_place_and_into_a_view(channels: int) -> None:
    x = _channels_last((2, channels, 2, 3, 4), torch.bfloat16)
    residual = _channels_last((2, channels, 2, 3, 4), torch.bfloat16)
    bias = torch.randn(channels)
    expected = x.float() + bias.view(-1, 1, 1, 1) + residual.float()
    tail = torch.full((2, channels, 3, 3, 4), float("nan"), dtype=torch.bfloat16)
    tail = tail.contiguous(memory_format=CL3D)
    add_bias_residual(x, bias=bias, residual=residual, out=tail[:, :, 1:])
    _assert_close(tail[:, :, 1:], expected)
    add_bias_residual(x, bias=bias, residual=residual, out=x)
    _assert_close(x, expected)
    torch.testing.assert_close(add_bias_residual(x, bias=bias, backend="torch"),
                               (x.float() + bias.view(-1, 1, 1, 1)).bfloat16(), rtol=0, atol=0)


@pytest.mark.parametrize("channels", [384, 13])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pending", [False, True])
def test_upsample_matches_reference(channels: int, dtype: torch.dtype, pending: bool) -> None:
    """The Resample's input: [B*F, C, H, W] channels-last, here a channel slice of a wider tensor (a padded
    conv's output, row stride > C), with or without the bias and residual the previous block left to add."""
    wide = _channels_last((1, channels + 32, 3, 5, 7), dtype).transpose(1, 2).reshape(3, -1, 5, 7)
    x = wide[:, :channels]
    assert x.stride(1) == 1 and x.stride(3) == channels + 32
    bias = torch.randn(channels).to(dtype) if pending else None
    residual = _channels_last((1, channels, 3, 5, 7), dtype, scale=3.0).transpose(1, 2).reshape(3, -1, 5, 7)
    residual = residual if pending else None

    out = upsample_nearest2x(x, bias=bias, residual=residual)

    assert out.shape == (3, channels, 10, 14) and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    expected = upsample_nearest2x_reference(x, bias, residual)
    if dtype == torch.float32:
        assert torch.equal(out, expected)  # the same fp32 sum, copied: bit for bit
    else:
        summed = x.float() + (bias.float().view(-1, 1, 1) + residual.float() if pending else 0.0)
        _assert_close(out, F.interpolate(summed, scale_factor=2.0, mode="nearest"))
    # Each 2x2 output block holds its input pixel: the x2 nearest of official's nearest-exact.
    assert torch.equal(out[:, :, 1::2, 0::2], out[:, :, 0::2, 0::2])
    assert torch.equal(out[:, :, 0::2, 1::2], out[:, :, 0::2, 0::2])


def test_upsample_rejects_bad_inputs() -> None:
    x = torch.randn(2, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="x must be"):
        upsample_nearest2x(x[None])
    with pytest.raises(ValueError, match="residual"):
        upsample_nearest2x(x, residual=x[:1])
    with pytest.raises(ValueError, match="bias"):
        upsample_nearest2x(x, bias=torch.ones(3))
    with pytest.raises(ValueError, match="channels-last"):
        upsample_nearest2x(x.contiguous())


def test_reference_is_the_old_module_formula() -> None:
    """In fp32 without bias / residual the reference is bit for bit the old `RMSNorm` + `F.silu`, which keeps
    the plain CPU decode identical to what it was."""
    x = _channels_last((2, 96, 3, 4, 5), torch.float32).contiguous()
    gamma = 1.0 + 0.5 * torch.randn(96, 1, 1, 1)
    old = F.silu(F.normalize(x.float(), dim=1) * (gamma.float() * 96**0.5), inplace=True)
    assert torch.equal(vae_rms_norm(x, gamma, silu=True, backend="torch"), old)
    # The norm is a per-pixel function: zero pixels stay zero (eps floor), scaling a pixel does not change it.
    x[0, :, 0, 0, 0] = 0.0
    y = vae_rms_norm_reference(x, gamma)
    assert torch.equal(y[0, :, 0, 0, 0], torch.zeros(96))
    torch.testing.assert_close(vae_rms_norm_reference(x * 7.0, gamma), y, rtol=1e-6, atol=1e-6)


def test_bad_inputs_are_rejected() -> None:
    x = _channels_last((1, 8, 2, 3, 3), torch.float32)
    with pytest.raises(ValueError, match="channels-last"):
        vae_rms_norm(x.contiguous(), torch.ones(8))
    with pytest.raises(ValueError, match="gamma"):
        vae_rms_norm(x, torch.ones(4))
    with pytest.raises(ValueError, match="residual"):
        vae_rms_norm(x, torch.ones(8), residual=x[:, :, :1])
    with pytest.raises(ValueError, match="backend"):
        vae_rms_norm(x, torch.ones(8), backend="cuda")  # type: ignore[arg-type]
