"""WanVAE against diffusers' independent `AutoencoderKLWan` (same random weights, fp32, renamed by the
engine's own `engine.checkpoint.vae_to_diffusers`), against a copy of its own previous per-chunk code (bit for
bit on the plain path; the fused channels-last encode and decode, Triton kernels under the CPU interpreter, to
fp32 summation-order noise), plus the official key set at full size, the frame arithmetic, streaming decode,
causality across chunks and bf16 drift."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan

import engine.models.vae as vae_module
from engine.checkpoint import vae_from_diffusers, vae_to_diffusers
from engine.configs import VAEConfig, from_name
from engine.models.vae import LATENT_MEAN, LATENT_STD, CausalConv3d, Resample, ResidualBlock, WanVAE

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


class OldChunkedVAE:
    """The engine's encode / decode as they were before the fused decode path, on a WanVAE's own weights:
    every causal conv concatenates its history in front of each chunk, norms are `F.normalize` + `type_as`,
    every conv adds its own bias, NCDHW throughout. A reference copy of the old code, kept only here."""

    def __init__(self, vae: WanVAE) -> None:
        self.vae = vae
        self.history: dict[torch.nn.Module, torch.Tensor] = {}
        self.mean = torch.tensor(LATENT_MEAN).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(LATENT_STD).view(1, -1, 1, 1, 1)

    def causal_conv(self, conv: CausalConv3d, x: torch.Tensor) -> torch.Tensor:
        if conv not in self.history:
            b, c, _, h, w = x.shape
            self.history[conv] = x.new_zeros(b, c, conv.time_padding, h, w)
        x = torch.cat([self.history[conv], x], dim=2)
        self.history[conv].copy_(x[:, :, -conv.time_padding :])
        return F.conv3d(x, conv.weight, conv.bias, padding=conv.padding)

    @staticmethod
    def norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return (F.normalize(x.float(), dim=1) * (norm.gamma.float() * x.shape[1] ** 0.5)).type_as(x)

    def residual_block(self, block: ResidualBlock, x: torch.Tensor) -> torch.Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = block.residual
        h = block.shortcut(x)
        x = self.causal_conv(conv1, F.silu(self.norm(norm1, x)))
        x = self.causal_conv(conv2, F.silu(self.norm(norm2, x)))
        return x + h

    def attention_block(self, block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        identity = x
        b, c, t, h, w = x.shape
        x = x.transpose(1, 2).reshape(b * t, c, h, w)
        qkv = block.to_qkv(self.norm(block.norm, x)).view(b * t, 1, 3 * c, h * w)
        q, k, v = qkv.transpose(2, 3).chunk(3, dim=-1)
        x = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        return block.proj(x).view(b, t, c, h, w).transpose(1, 2) + identity

    def resample(self, block: Resample, x: torch.Tensor) -> torch.Tensor:
        if block.mode == "upsample3d":
            b, c, t, h, w = x.shape
            if block.time_conv not in self.history:
                self.history[block.time_conv] = x.new_zeros(b, c, 2, h, w)  # 'Rep': zero history next chunk
            else:
                x = self.causal_conv(block.time_conv, x)
                x = x.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        b, c, t, h, w = x.shape
        x = block.resample(x.transpose(1, 2).reshape(b * t, c, h, w))
        x = x.view(b, t, *x.shape[1:]).transpose(1, 2)
        if block.mode == "downsample3d":
            if block.time_conv not in self.history:
                self.history[block.time_conv] = x[:, :, -1:].clone()
            else:
                x_in = torch.cat([self.history[block.time_conv], x], dim=2)
                self.history[block.time_conv].copy_(x[:, :, -1:])
                # The old nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) (now a CausalConv3d, same weights).
                x = F.conv3d(x_in, block.time_conv.weight, block.time_conv.bias, stride=(2, 1, 1))
        return x

    def layer(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.resample(layer, x) if isinstance(layer, Resample) else self.residual_block(layer, x)

    def middle_and_head(
        self, coder: torch.nn.Module, x: torch.Tensor, layers: torch.nn.ModuleList
    ) -> torch.Tensor:
        res_in, attn, res_out = coder.middle
        x = self.residual_block(res_out, self.attention_block(attn, self.residual_block(res_in, x)))
        for layer in layers:
            x = self.layer(layer, x)
        norm, _, conv = coder.head
        return self.causal_conv(conv, F.silu(self.norm(norm, x)))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        self.history.clear()
        x = self.vae.conv2((latent * self.std + self.mean).to(self.vae.dtype))
        decoder = self.vae.decoder
        chunks = [self.middle_and_head(decoder, self.causal_conv(decoder.conv1, x[:, :, i : i + 1]),
                                       decoder.upsamples) for i in range(x.shape[2])]
        return torch.cat(chunks, dim=2).float().clamp_(-1.0, 1.0)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        self.history.clear()
        encoder, z = self.vae.encoder, self.vae.z_dim
        chunks = (video[:, :, :1], *video[:, :, 1:].split(4, dim=2))
        encoded = []
        for chunk in chunks:
            x = self.causal_conv(encoder.conv1, chunk)
            for layer in encoder.downsamples:
                x = self.layer(layer, x)
            encoded.append(self.middle_and_head(encoder, x, torch.nn.ModuleList()))
        mu = F.conv3d(torch.cat(encoded, dim=2), self.vae.conv1.weight[:z], self.vae.conv1.bias[:z])
        return (mu.float() - self.mean) / self.std


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


def test_vae_plain_path_is_the_old_code_bit_for_bit(
    models: tuple[WanVAE, torch.nn.Module], video: torch.Tensor, latent: torch.Tensor
) -> None:
    """The CPU default: per-layer conv input buffers (history at the head, the chunk written into the tail)
    instead of torch.cat, the same ops otherwise, so not one bit changes; the encoder shares those layers."""
    ours, _ = models
    old = OldChunkedVAE(ours)
    assert torch.equal(ours.decode(latent), old.decode(latent))
    assert torch.equal(ours.encode(video), old.encode(video))


@pytest.mark.parametrize("padded", [{}, {8: 16, 16: 32}], ids=["unpadded", "padded"])
def test_vae_fused_decode_matches_the_old_code(
    models: tuple[WanVAE, torch.nn.Module],
    latent: torch.Tensor,
    padded: dict[int, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CUDA path, here on the CPU (Triton interpreter): channels_last_3d activations and weights, conv
    biases and residual adds folded into the norm kernel, norms written straight into the conv buffers, the
    upsample fused with the adds before it. "padded": the tiny decoder's 8- and 16-wide convs (3x3x3 and the
    Resample's 2-D) run zero-padded, as the real decoder's 96-wide ones do on the GPU, so every consumer
    reads channel slices with a row stride wider than C."""
    monkeypatch.setattr(vae_module, "PADDED_OUT_CHANNELS", padded)
    padded_widths = []
    zero_padded = vae_module._zero_padded

    def recorded(weight: torch.Tensor, out_channels: int) -> torch.Tensor:
        padded_widths.append(weight.shape[0])
        return zero_padded(weight, out_channels)

    monkeypatch.setattr(vae_module, "_zero_padded", recorded)
    ours, _ = models
    expected = OldChunkedVAE(ours).decode(latent)
    fused = copy.deepcopy(ours)
    chunks = list(fused.decode_frames(latent, fused=True))
    # Once per decode: the last two stages' 3 blocks x 2 convs, the 3 Resamples' (32->16, 32->16, 16->8).
    assert sorted(padded_widths) == ([8] * 7 + [16] * 8 if padded else [])
    assert [c.shape[2] for c in chunks] == [1, 4, 4]
    assert all(c.is_contiguous(memory_format=torch.channels_last_3d) for c in chunks)
    assert fused.decoder.head[2].weight.is_contiguous(memory_format=torch.channels_last_3d)
    # fp32 throughout, other summation orders (bias added after the conv, fp32 sums inside the kernel). The
    # old fp32 code itself lies 5e-6 (relative max) from an fp64 run of it on these deep random weights;
    # measured here: 6e-6 from the old fp32 output, 5e-6 from the fp64 one.
    assert relative_max_diff(torch.cat(chunks, dim=2), expected) <= 1e-5
    # A plain decode on the same module puts the weights back in NCDHW and gives the old bits again.
    assert torch.equal(fused.decode(latent, fused=False), expected)
    assert not fused.decoder.head[2].weight.is_contiguous(memory_format=torch.channels_last_3d)


def _record_channels_last_convs(monkeypatch: pytest.MonkeyPatch) -> list[torch.nn.Module]:
    """Check every conv input of the fused path (all but to_qkv, which runs as a module, go through
    `vae._conv`) is channels-last, so cuDNN transposes nothing; returns the convs seen, in call order."""
    seen: list[torch.nn.Module] = []
    conv = vae_module._conv

    def checked(
        layer: torch.nn.Module, x: torch.Tensor, cache: vae_module.CausalCache
    ) -> vae_module.Activation:
        layout = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
        assert x.is_contiguous(memory_format=layout), (layer, tuple(x.shape), x.stride())
        seen.append(layer)
        return conv(layer, x, cache)

    monkeypatch.setattr(vae_module, "_conv", checked)
    return seen


def test_vae_fused_encode_matches_the_old_code(
    models: tuple[WanVAE, torch.nn.Module], video: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA encode, here on the CPU (Triton interpreter): channels_last_3d from the first conv's input
    buffer on (the zero pad and stride-2 conv of downsample2d/3d, the stride-2 time conv with its one frame of
    history, the attention block and the head included), biases and residual adds folded into the norms."""
    ours, _ = models
    expected = OldChunkedVAE(ours).encode(video)
    fused = copy.deepcopy(ours)
    convs_seen = _record_channels_last_convs(monkeypatch)
    out = fused.encode(video, fused=True)
    assert out.shape == expected.shape and out.dtype == torch.float32 and out.is_contiguous()
    # Every encoder conv ran channels-last; the time conv of downsample3d too (it runs from the second chunk).
    convs = {m for m in fused.encoder.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))}
    assert set(convs_seen) == convs - {fused.encoder.middle[1].to_qkv}
    time_conv = fused.encoder.downsamples[5].time_conv
    assert time_conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    # fp32 throughout, other summation orders (biases added after the conv, fp32 sums in the kernel). The
    # bound is derived as the decode test's (1e-5 there, where the old fp32 code lies 5e-6 from fp64): the
    # encoder, at a quarter of the pixels a layer and with fewer layers, carries rounding less far. Measured
    # here: the old fp32 encode lies 4.8e-7 (relative max) from an fp64 run of it, the fused one 6.1e-7 from
    # that and 7.0e-7 from the old fp32 one. A lost bias or a wrong history shows as O(0.1).
    assert relative_max_diff(out, expected) <= 2e-6
    monkeypatch.undo()
    # A plain encode on the same module puts the weights back in NCDHW and gives the old bits again.
    assert torch.equal(fused.encode(video, fused=False), expected)
    assert not time_conv.weight.is_contiguous(memory_format=torch.channels_last_3d)


def test_vae_fused_encode_with_padded_convs_matches_the_old_code(
    models: tuple[WanVAE, torch.nn.Module], video: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The encoder shares the decoder's layers, so its 96-wide convs run padded on the GPU too: here the tiny
    encoder's 8-wide ones, whose strided outputs feed norms, a downsample's zero pad and a 1x1 shortcut."""
    monkeypatch.setattr(vae_module, "PADDED_OUT_CHANNELS", {8: 16})
    ours, _ = models
    expected = OldChunkedVAE(ours).encode(video)
    assert relative_max_diff(copy.deepcopy(ours).encode(video, fused=True), expected) <= 2e-6


def test_vae_fused_encode_bf16_close_to_fp32(
    models: tuple[WanVAE, torch.nn.Module], video: torch.Tensor
) -> None:
    """As the decode test below: the fused bf16 encode drifts from fp32 as the plain bf16 one does, within
    the slack of the Triton interpreter's truncating bf16 casts."""
    ours, _ = models
    reference = ours.encode(video)
    encoded = copy.deepcopy(ours).to(torch.bfloat16).encode(video, fused=True)
    # Measured: 1.75 % of the range at worst, mean |diff| 0.0043 (the plain bf16 path: 0.73 % / 0.0020; the
    # fused path with its torch reference ops in place of the interpreted kernel, rounding to nearest:
    # 0.75 % / 0.0021). The bounds leave ~1.7x headroom over the interpreter's drift; a wrong op: O(100 %).
    assert relative_max_diff(encoded, reference) <= 0.03
    assert (encoded - reference).abs().mean() <= 0.0075


def test_vae_fused_bf16_close_to_fp32(models: tuple[WanVAE, torch.nn.Module], latent: torch.Tensor) -> None:
    """The fused path in bf16 drifts from fp32 as the plain bf16 path does (test above), within the slack of
    the Triton interpreter, whose bf16 casts truncate where the GPU rounds to nearest."""
    ours, _ = models
    reference = ours.decode(latent)
    decoded = copy.deepcopy(ours).to(torch.bfloat16).decode(latent, fused=True)
    # Measured: 11.6 % of the range at worst, mean |diff| 0.012 (the plain bf16 path: 6.5 % / 0.006; the
    # fused path with its torch reference ops in place of the interpreted kernel, i.e. rounding to nearest:
    # 7.0 % / 0.006). Truncation is a biased rounding, so it doubles the drift; the bounds leave ~1.7x
    # headroom over it.
    assert relative_max_diff(decoded, reference) <= 0.2
    assert (decoded - reference).abs().mean() <= 0.02


def test_vae_fused_paths_under_inference_mode(
    models: tuple[WanVAE, torch.nn.Module], video: torch.Tensor, latent: torch.Tensor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pipeline encodes and decodes under torch.inference_mode: moving the weights to channels-last there
    must keep normal parameters normal (loadable in place afterwards) and work on a model built inside it,
    zero-padded convs included (their copies are made per call: inference tensors have no version counter)."""
    monkeypatch.setattr(vae_module, "PADDED_OUT_CHANNELS", {8: 16, 16: 32})
    ours = copy.deepcopy(models[0])
    with torch.inference_mode():
        ours.encode(video[:1, :, :5], fused=True)
        ours.decode(latent[:, :, :2], fused=True)
    assert ours.encoder.head[2].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert not any(p.is_inference() for p in ours.parameters())
    ours.load_state_dict(models[0].state_dict())  # copies in place
    with torch.inference_mode():
        built_inside = WanVAE.from_config(TINY).eval()
        assert built_inside.encode(video[:1, :, :5], fused=True).isfinite().all()
        assert built_inside.decode(latent[:, :, :2], fused=True).isfinite().all()
