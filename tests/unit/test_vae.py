"""WanVAE against diffusers' independent `AutoencoderKLWan` (same random weights, fp32, renamed by the engine's
own `engine.checkpoint.vae_to_diffusers`), plus the official key set at full size, the frame arithmetic,
streaming decode, causality across chunks and bf16 drift."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers import AutoencoderKLWan

from engine.checkpoint import vae_from_diffusers, vae_to_diffusers
from engine.configs import VAEConfig, from_name
from engine.models.vae import LATENT_MEAN, LATENT_STD, WanVAE

TINY = from_name("tiny-t2v").vae
FRAMES, HEIGHT, WIDTH = 9, 32, 48


def diffusers_vae(cfg: VAEConfig) -> torch.nn.Module:
    return AutoencoderKLWan(
        base_dim=cfg.dim,
        z_dim=cfg.z_dim,
        dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks,
        temperal_downsample=list(cfg.temperal_downsample),
    )


def randomize_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Overwrite every parameter (default init zeroes the attention `proj` weights, hiding that path).

    Weights get std 1/sqrt(fan_in) so activations stay O(1) through the deep random stack; gammas and biases
    vary per channel so a swapped or ignored one shows.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.5 * noise)
            elif p.dim() == 1:
                p.copy_(0.2 * noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))


def relative_max_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module")
def models() -> tuple[WanVAE, torch.nn.Module]:
    ours = WanVAE.from_config(TINY).eval()
    randomize_(ours, torch.Generator().manual_seed(1))
    ref = diffusers_vae(TINY).eval()
    ref.load_state_dict(vae_to_diffusers(ours.state_dict()), strict=True)
    return ours, ref


@pytest.fixture(scope="module")
def video() -> torch.Tensor:
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, FRAMES, HEIGHT, WIDTH, generator=gen) * 2 - 1
    x[:, :, :, :4, :4] = 1.0  # saturated corners: the range limits a real video reaches
    x[:, :, :, -4:, -4:] = -1.0
    return x


@pytest.fixture(scope="module")
def latent() -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(2, 16, (FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8, generator=gen)
    z[:, :, :, 0, 0] *= 4.0  # outliers
    return z


def _stats(ref: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(ref.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(ref.config.latents_std).view(1, -1, 1, 1, 1)
    return mean, std


def test_vae_latent_constants_match_diffusers(models: tuple[WanVAE, torch.nn.Module]) -> None:
    _, ref = models
    assert LATENT_MEAN == tuple(ref.config.latents_mean)
    assert LATENT_STD == tuple(ref.config.latents_std)


def test_vae_encode_matches_diffusers(models: tuple[WanVAE, torch.nn.Module], video: torch.Tensor) -> None:
    ours, ref = models
    mean, std = _stats(ref)
    with torch.no_grad():
        expected = (ref.encode(video).latent_dist.mode() - mean) / std
    out = ours.encode(video)
    assert out.shape == (2, 16, 3, HEIGHT // 8, WIDTH // 8) and out.dtype == torch.float32
    # Same fp32 math in the same chunk order; only conv algorithm / summation order differs.
    assert relative_max_diff(out, expected) <= 1e-4


def test_vae_decode_matches_diffusers(models: tuple[WanVAE, torch.nn.Module], latent: torch.Tensor) -> None:
    ours, ref = models
    mean, std = _stats(ref)
    with torch.no_grad():
        expected = ref.decode(latent * std + mean).sample
    out = ours.decode(latent)
    assert out.shape == expected.shape == (2, 3, FRAMES, HEIGHT, WIDTH)
    # The clamp must not hide the comparison: most values lie strictly inside (-1, 1).
    assert (expected.abs() < 1).float().mean() > 0.5
    assert relative_max_diff(out, expected) <= 1e-4  # fp32 vs fp32, as in the encode test


def test_vae_full_size_keys_match_official_and_diffusers() -> None:
    ours = WanVAE.meta(VAEConfig())
    sd = ours.state_dict()
    assert len(sd) == 194  # Wan2.1_VAE.pth
    assert sum(t.numel() for t in sd.values()) == 126_892_531  # 126.9 M parameters (reference §7)
    expected_shapes = {  # examples from reference §7.2
        "encoder.conv1.weight": (96, 3, 3, 3, 3),
        "encoder.downsamples.3.shortcut.weight": (192, 96, 1, 1, 1),
        "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),
        "encoder.middle.1.norm.gamma": (384, 1, 1),
        "encoder.head.2.weight": (32, 384, 3, 3, 3),
        "conv1.weight": (32, 32, 1, 1, 1),
        "conv2.weight": (16, 16, 1, 1, 1),
        "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),
        "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
        "decoder.upsamples.4.shortcut.weight": (384, 192, 1, 1, 1),
        "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
        "decoder.head.2.weight": (3, 96, 3, 3, 3),
    }
    for key, shape in expected_shapes.items():
        assert tuple(sd[key].shape) == shape, key
    with torch.device("meta"):
        ref_sd = diffusers_vae(VAEConfig()).state_dict()
    renamed = {k: tuple(v.shape) for k, v in vae_to_diffusers(sd).items()}
    assert renamed == {k: tuple(v.shape) for k, v in ref_sd.items()}
    # The loader's inverse map (diffusers `vae/` folders) gives back exactly the official keys.
    restored = {k: tuple(v.shape) for k, v in vae_from_diffusers(ref_sd).items()}
    assert restored == {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize("num_frames", [1, 5, 9, 13])
def test_vae_shapes_follow_frame_rule(models: tuple[WanVAE, torch.nn.Module], num_frames: int) -> None:
    ours, _ = models
    video = torch.rand(1, 3, num_frames, 16, 24) * 2 - 1
    latent = ours.encode(video)
    latent_frames = (num_frames - 1) // 4 + 1
    assert latent.shape == (1, 16, latent_frames, 2, 3)
    decoded = ours.decode(latent)
    assert decoded.shape == (1, 3, 1 + 4 * (latent_frames - 1), 16, 24)
    assert decoded.abs().max() <= 1.0 and not decoded.isnan().any()


def test_vae_decode_frames_streams_decode(
    models: tuple[WanVAE, torch.nn.Module], latent: torch.Tensor
) -> None:
    ours, _ = models
    chunks = list(ours.decode_frames(latent))
    assert [c.shape[2] for c in chunks] == [1, 4, 4]
    # Same kernels on the same chunks: decode only copies the chunks into its output.
    torch.testing.assert_close(torch.cat(chunks, dim=2), ours.decode(latent), rtol=0, atol=0)


def test_vae_is_causal_across_chunks(
    models: tuple[WanVAE, torch.nn.Module], video: torch.Tensor, latent: torch.Tensor
) -> None:
    """A prefix of the input gives the same prefix of the output: later chunks never reach back."""
    ours, _ = models
    # Tolerance: identical chunk computations; only the final kernel-1 conv / normalisation run over a
    # different number of frames, which may change their blocking by a rounding step.
    encoded, decoded = ours.encode(video), ours.decode(latent)
    tight = {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(ours.encode(video[:, :, :1]), encoded[:, :, :1], **tight)
    torch.testing.assert_close(ours.encode(video[:, :, :5]), encoded[:, :, :2], **tight)
    torch.testing.assert_close(ours.decode(latent[:, :, :1]), decoded[:, :, :1], **tight)
    torch.testing.assert_close(ours.decode(latent[:, :, :2]), decoded[:, :, :5], **tight)


def test_vae_bf16_close_to_fp32(
    models: tuple[WanVAE, torch.nn.Module], video: torch.Tensor, latent: torch.Tensor
) -> None:
    ours, _ = models
    ours_bf16 = copy.deepcopy(ours).to(torch.bfloat16)
    assert ours_bf16.dtype == torch.bfloat16
    encoded = ours_bf16.encode(video)
    decoded = ours_bf16.decode(latent)
    assert encoded.dtype == decoded.dtype == torch.float32
    # bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4 %); ~30 conv layers compound it. Measured on these
    # weights: encode 0.9 % / decode 7.0 % of the output range at worst (mean |diff| 0.002 / 0.007), and
    # diffusers' AutoencoderKLWan cast to bf16 drifts as far (1.0 % / 7.6 %, mean 0.002 / 0.007). The bounds
    # leave ~2x headroom; a wrong op would be off by O(100 %).
    reference_encoded, reference_decoded = ours.encode(video), ours.decode(latent)
    assert relative_max_diff(encoded, reference_encoded) <= 0.02
    assert (encoded - reference_encoded).abs().mean() <= 0.005
    assert relative_max_diff(decoded, reference_decoded) <= 0.12
    assert (decoded - reference_decoded).abs().mean() <= 0.015


def test_vae_rejects_bad_shapes(models: tuple[WanVAE, torch.nn.Module]) -> None:
    ours, _ = models
    with pytest.raises(ValueError, match="4k\\+1"):
        ours.encode(torch.zeros(1, 3, 4, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        ours.encode(torch.zeros(1, 3, 5, 12, 16))
    with pytest.raises(ValueError, match="B, 3, F, H, W"):
        ours.encode(torch.zeros(1, 4, 5, 16, 16))
    with pytest.raises(ValueError, match="latent"):
        ours.decode(torch.zeros(1, 8, 2, 2, 2))
