"""The VAE's fused encode and decode paths on a CUDA GPU: the Triton norm kernel at the VAE's widths against
its fp32 reference, and the full-size encoder and decoder (random weights) in bf16 channels-last against the
plain fp32 encode and decode. Run: `python -m pytest tests/gpu/test_vae_gpu.py`.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from engine.configs import VAEConfig
from engine.models.vae import WanVAE
from engine.ops.vae_ops import (
    upsample_nearest2x,
    upsample_nearest2x_reference,
    vae_rms_norm,
    vae_rms_norm_reference,
)

pytestmark = pytest.mark.gpu

CL3D = torch.channels_last_3d


def _channels_last(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(shape, generator=gen, device="cuda") + 0.3
    x[:, 1] *= 30.0  # outlier channels
    x[:, -1] *= 0.01
    return x.to(dtype).contiguous(memory_format=CL3D)


def _within_one_rounding(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """actual = expected (fp32) rounded once to actual's dtype, up to fp32 summation order."""
    assert torch.isfinite(actual).all()  # every poisoned element was written
    half_step = 2.0**-8 if actual.dtype == torch.bfloat16 else 0.0  # round to nearest, 8 significant bits
    diff = (actual.float() - expected.float()).abs()
    assert (diff <= expected.float().abs() * (half_step + 1e-5) + 1e-6).all()


@pytest.mark.parametrize(
    "shape",
    # The decoder's widths, one to four frames, a batch of two.
    [(1, 96, 4, 96, 160), (1, 192, 4, 48, 80), (1, 384, 2, 24, 40), (2, 384, 1, 30, 52)],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_norm_kernel_matches_reference_on_cuda(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, c, f, h, w = shape
    x = _channels_last(shape, dtype, gen)
    residual = _channels_last(shape, dtype, gen)
    bias = torch.randn(c, generator=gen, device="cuda").to(dtype)
    gamma = (1.0 + 0.5 * torch.randn(c, 1, 1, 1, generator=gen, device="cuda")).to(dtype)
    for with_adds in (False, True):
        for silu in (True, False):
            buffer = torch.full((b, c, 2 + f, h, w), float("nan"), dtype=dtype, device="cuda")
            buffer = buffer.contiguous(memory_format=CL3D)
            sum_out = torch.full_like(x, float("nan"))
            adds = {"bias": bias, "residual": residual} if with_adds else {}
            kept = sum_out if with_adds else None
            vae_rms_norm(x, gamma, silu=silu, out=buffer[:, :, 2:], sum_out=kept, **adds)
            _within_one_rounding(buffer[:, :, 2:], vae_rms_norm_reference(x, gamma, silu=silu, **adds))
            if with_adds:
                _within_one_rounding(sum_out, x.float() + bias.float().view(-1, 1, 1, 1) + residual.float())
            assert buffer[:, :, :2].isnan().all()  # the head (a conv's history) is left alone


@pytest.mark.parametrize("shape", [(4, 384, 30, 52), (4, 192, 60, 104)])  # the Resamples' inputs
def test_upsample_kernel_is_the_reference_bit_for_bit(shape: tuple[int, ...]) -> None:
    """The sum rounded once to bf16 (round to nearest on the GPU, as torch) and copied: the same bits as the
    add followed by the nearest upsample. The input is a channel slice of a padded conv's wider output."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    n, c, h, w = shape
    wide = torch.randn(n, c + 32, h, w, generator=gen, device="cuda").bfloat16()
    x = wide.contiguous(memory_format=torch.channels_last)[:, :c]
    residual = torch.randn(shape, generator=gen, device="cuda").bfloat16().contiguous(
        memory_format=torch.channels_last)
    bias = torch.randn(c, generator=gen, device="cuda").bfloat16()
    assert torch.equal(upsample_nearest2x(x, bias=bias, residual=residual),
                       upsample_nearest2x_reference(x, bias, residual))
    assert torch.equal(upsample_nearest2x(x), upsample_nearest2x_reference(x))


def _full_size_vae() -> WanVAE:
    """The real decoder widths (96 / 192 / 384) with random weights of std 1/sqrt(fan_in) (activations O(1));
    gammas and biases vary per channel so a swapped one shows."""
    vae = WanVAE.from_config(VAEConfig()).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    for name, p in vae.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("gamma"):
            p.copy_(1.0 + 0.5 * noise)
        else:
            p.copy_(0.2 * noise if p.dim() == 1 else noise / math.sqrt(p[0].numel()))
    return vae.cuda()


def _relative_max(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def test_fused_decode_matches_plain_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 fused (the CUDA default) vs the plain fp32 decode at 9 frames of 64x64, bounded by the plain bf16
    path's own drift; and fp32 fused vs fp32 plain, which differ in conv algorithms and summation order."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # a true fp32 reference
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    vae = _full_size_vae()
    gen = torch.Generator(device="cuda").manual_seed(2)
    latent = torch.randn(1, 16, 3, 8, 8, generator=gen, device="cuda")
    latent[:, :, :, 0, 0] *= 4.0

    reference = vae.decode(latent, fused=False)
    assert (reference.abs() < 1).float().mean() > 0.5  # the clamp does not hide the comparison
    fused_fp32 = vae.decode(latent)  # fused by default on CUDA
    assert torch.backends.cudnn.benchmark is False  # turned on for the decode only
    assert vae.decoder.head[2].weight.is_contiguous(memory_format=CL3D)
    # fp32 vs fp32: 6e-6 on the CPU (tests/unit/test_vae.py); here cudnn.benchmark (on for the fused decode)
    # may pick Winograd / FFT algorithms, whose rounding the ~100x amplification of these deep random weights
    # carries further. A lost bias or a wrong norm shows as O(0.1) or more.
    assert _relative_max(fused_fp32, reference) <= 1e-3

    vae_bf16 = copy.deepcopy(vae).to(torch.bfloat16)
    plain_bf16 = vae_bf16.decode(latent, fused=False)
    chunks = list(vae_bf16.decode_frames(latent.bfloat16()))
    assert [c.shape[2] for c in chunks] == [1, 4, 4]
    assert all(c.dtype == torch.float32 and c.is_contiguous(memory_format=CL3D) for c in chunks)
    fused_bf16 = torch.cat(chunks, dim=2)
    # Both bf16 paths round the same conv operands and outputs to bf16; the fused one rounds the norm + SiLU
    # once instead of twice and adds biases and residuals in fp32, so its drift from fp32 is that of the plain
    # bf16 path. Measured on the CPU for this model and latent, the kernel's torch reference (rounding to
    # nearest as the GPU does) in its place: 4.5 % vs 3.5 % of the range at worst, mean |diff| 0.0052 vs
    # 0.0050. The max of a hundred thousand rounding walks varies by tens of percent from one run to another,
    # their mean hardly.
    plain_error = (plain_bf16 - reference).abs()
    fused_error = (fused_bf16 - reference).abs()
    assert fused_error.mean() <= 1.25 * plain_error.mean()
    assert fused_error.max() <= 2.0 * plain_error.max()
    assert _relative_max(fused_bf16, reference) <= 0.2  # bf16 over ~30 convs, as on the CPU; a wrong op: O(1)


@pytest.mark.parametrize("clip", ["random", "image_then_black"])
def test_fused_encode_matches_plain_encode(monkeypatch: pytest.MonkeyPatch, clip: str) -> None:
    """bf16 fused (the CUDA default) vs the plain fp32 encode at 9 frames of 128x128, bounded by the plain
    bf16 path's own drift; and fp32 fused vs fp32 plain. Both on random frames and on I2V's conditioning clip
    (one image, then black frames)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # a true fp32 reference
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    vae = _full_size_vae()
    gen = torch.Generator(device="cuda").manual_seed(3)
    video = torch.rand(1, 3, 9, 128, 128, generator=gen, device="cuda") * 2 - 1
    video[:, :, :, :4, :4] = 1.0  # saturated corners
    video[:, :, :, -4:, -4:] = -1.0
    if clip == "image_then_black":
        video[:, :, 1:] = 0.0

    reference = vae.encode(video, fused=False)
    fused_fp32 = vae.encode(video)  # fused by default on CUDA
    assert fused_fp32.shape == (1, 16, 3, 16, 16) and fused_fp32.is_contiguous()
    assert torch.backends.cudnn.benchmark is False  # turned on for the encode only
    assert vae.encoder.downsamples[5].time_conv.weight.is_contiguous(memory_format=CL3D)
    # fp32 vs fp32: 1.4e-6 on the CPU at 64x64; cudnn.benchmark may pick Winograd / FFT algorithms here, as in
    # the decode test above. A lost bias or a wrong history shows as O(0.1) or more.
    assert _relative_max(fused_fp32, reference) <= 1e-3

    vae_bf16 = copy.deepcopy(vae).to(torch.bfloat16)
    plain_bf16 = vae_bf16.encode(video.bfloat16(), fused=False)
    fused_bf16 = vae_bf16.encode(video.bfloat16())
    assert fused_bf16.dtype == torch.float32
    # Measured on the CPU for this model and shape, the kernel's torch reference (rounding to nearest as the
    # GPU does) in its place: mean |diff| 1.05x the plain bf16 path's for both clips, the max 1.56x / 1.21x
    # (random / image_then_black; 1.7x / 1.55x at 64x64). The extra rounding is where a conv's raw output
    # meets its deferred bias (downsample, head); on the CPU the plain path's bias is inside the conv, while
    # on CUDA torch adds it in a bf16 pass of its own too, so the GPU ratio should be no larger. Only 12288
    # outputs: their max varies from run to run far more than their mean.
    plain_error = (plain_bf16 - reference).abs()
    fused_error = (fused_bf16 - reference).abs()
    assert fused_error.mean() <= 1.25 * plain_error.mean()
    assert fused_error.max() <= 2.0 * plain_error.max()
    # bf16 over ~20 convs: 1.05 % / 0.85 % of the range on the CPU (plain bf16: 0.67 % / 0.70 %); a wrong op:
    # O(1).
    assert _relative_max(fused_bf16, reference) <= 0.03
