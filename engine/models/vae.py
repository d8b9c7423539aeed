"""The Wan2.1 VAE: a causal 3-D convolutional autoencoder, 4x8x8 compression to 16 latent channels.

Follows the official implementation (Wan-Video/Wan2.1 `wan/modules/vae.py`: `WanVAE_` and the `WanVAE`
wrapper; Wan2.2 `vae2_1.py` is the same file) layer for layer, so `state_dict()` keys equal those of
`Wan2.1_VAE.pth` (194 tensors, 126.9 M parameters at the default size).

Chunked causal processing (reference wan.md §7.3; part of the numerics, not an optimisation):
- encode runs the encoder on frames [0:1], [1:5], [5:9], … (1 + 4k frames → 1 + k latent frames);
- decode runs the decoder on one latent frame at a time (latent frame 0 → 1 frame, every later one → 4).
Every causal layer carries the last frames of its input from one chunk to the next in a `CausalCache`
(the official `feat_cache`), in place of the zero front padding it would see on a lone chunk. Two layers
treat the first chunk specially, as the official code does: the temporal `downsample3d` keeps frame 0 as it
is (1 frame → 1 latent frame), and the temporal `upsample3d` leaves latent frame 0 un-doubled (the 'Rep'
marker) and starts its time conv from zero history on the second chunk.

Latent normalisation is inside this module, as in the official wrapper (diffusers leaves it to its
pipelines): `encode` returns (mu − mean) / std, `decode` takes z and computes z·std + mean first.

dtype: the module runs in its parameter dtype (fp32 or bf16; inputs are cast to it). RMS norms compute in
fp32. `encode` and `decode` return fp32, as the official wrapper (`.float()`) does.

Two ways to run the same layers, chosen per call by `CausalCache(fused=...)`:
- plain (the CPU default): NCDHW, plain torch ops, each conv with its bias; the very arithmetic of the
  official code.
- fused (the CUDA default, for `encode` and `decode` alike): activations and the encoder's or decoder's
  conv weights in channels_last_3d, so cuDNN needs no layout transposes (and `cudnn.benchmark` is on while
  the chunks run); each norm (with the SiLU after it) is one Triton pass (`engine.ops.vae_ops`) that also
  applies the bias the conv before it left out and the residual add before it, and writes straight into the
  input buffer of the conv after it; a Resample's nearest upsample is one Triton pass with those adds; 96-wide
  convs run with zero-padded 128-wide weights (`PADDED_OUT_CHANNELS`). Same math up to bf16 rounding.
Either way a causal conv keeps one input buffer [B, C, time_padding + F, H, W] per layer: the history at its
head, this chunk at its tail, so it never concatenates (the downsample3d time conv too, with its one frame of
history).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.configs import VAEConfig
from engine.ops.vae_ops import Backend, add_bias_residual, upsample_nearest2x, vae_rms_norm

# Per-channel latent statistics of the Wan2.1 VAE (official `WanVAE.__init__`; the same numbers are
# diffusers' `AutoencoderKLWan` `latents_mean` / `latents_std` defaults).
LATENT_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENT_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


# Output widths the fused path computes zero-padded: cuDNN's implicit-GEMM tiles are 64, 128 or 256 output
# channels wide and 96 fits none of them. On the H100 the decoder's 96 -> 96 3x3x3 conv ran at 374 TFLOP/s,
# and 1.52x faster with its weight zero-padded to 128 outputs (docs/PERFORMANCE.md, VAE decode). The padded
# channels are never read: the conv's result is a view of its first out_channels channels.
PADDED_OUT_CHANNELS: dict[int, int] = {96: 128}


class CausalCache:
    """The time history each causal layer carries from one chunk to the next (the official `feat_cache`), how
    this call runs its layers (plain or fused, see the module docstring), and the fused path's padded weights.

    Keyed by the layer itself, so a layer always finds its own history without a running slot counter. A
    causal conv stores its input buffer [B, C, time_padding + F, H, W], whose first time_padding frames are
    the history, and updates it in place every chunk. One cache serves one encode or one decode call.
    """

    def __init__(self, fused: bool = False) -> None:
        self.fused = fused
        self.backend: Backend = "triton" if fused else "torch"
        self.memory_format = torch.channels_last_3d if fused else torch.contiguous_format
        self._history: dict[nn.Module, torch.Tensor] = {}
        self._padded_weights: dict[nn.Module, torch.Tensor] = {}

    def get(self, layer: nn.Module) -> torch.Tensor | None:
        """The layer's history (buffer), or None before its first chunk."""
        return self._history.get(layer)

    def set(self, layer: nn.Module, history: torch.Tensor) -> torch.Tensor:
        """Store the layer's history buffer (when it starts or changes size; otherwise updated in place)."""
        self._history[layer] = history
        return history

    def weight(self, conv: nn.Conv2d | nn.Conv3d) -> torch.Tensor:
        """The weight the fused path convolves with: conv.weight, or its zero-padded copy
        (`PADDED_OUT_CHANNELS`), made once per call from the weight as it is now."""
        padded_out = PADDED_OUT_CHANNELS.get(conv.out_channels)
        if padded_out is None:
            return conv.weight
        padded = self._padded_weights.get(conv)
        if padded is None:
            padded = self._padded_weights[conv] = _zero_padded(conv.weight, padded_out)
        return padded


@dataclass
class Activation:
    """raw + bias (per channel) + residual: the fused path leaves the two adds to the next kernel that reads
    the value (cuDNN would add a conv bias in a pass of its own). On the plain path bias is always None."""

    raw: torch.Tensor
    bias: torch.Tensor | None = None
    residual: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.raw.shape

    @property
    def pending(self) -> bool:
        return self.bias is not None or self.residual is not None

    def value(self, backend: Backend) -> torch.Tensor:
        """The value itself: the pending adds written into raw in place first."""
        if self.pending:
            add_bias_residual(self.raw, bias=self.bias, residual=self.residual, out=self.raw, backend=backend)
            self.bias = self.residual = None
        return self.raw

    def write_to(self, out: torch.Tensor, backend: Backend) -> None:
        """out = the value, in one pass (raw is left as it is)."""
        if self.pending:
            add_bias_residual(self.raw, bias=self.bias, residual=self.residual, out=out, backend=backend)
        else:
            out.copy_(self.raw)


def _activation(x: torch.Tensor | Activation) -> Activation:
    return x if isinstance(x, Activation) else Activation(x)


def _zero_padded(weight: torch.Tensor, out_channels: int) -> torch.Tensor:
    """weight [C_out, C_in, *k] with zero filters appended up to out_channels, in weight's layout."""
    layout = torch.channels_last_3d if weight.dim() == 5 else torch.channels_last
    padded = torch.zeros((out_channels, *weight.shape[1:]), dtype=weight.dtype, device=weight.device)
    padded = padded.contiguous(memory_format=layout)
    padded[: weight.shape[0]].copy_(weight.detach())
    return padded


def _conv(conv: nn.Conv2d | nn.Conv3d, x: torch.Tensor, cache: CausalCache) -> Activation:
    """conv(x) (zero padding, as every conv here), its bias left to the next kernel on the fused path, where
    the result may be a channel slice of a wider tensor (`PADDED_OUT_CHANNELS`; the Triton kernels take the
    row stride)."""
    conv_fn = F.conv3d if isinstance(conv, nn.Conv3d) else F.conv2d
    if not cache.fused:
        out = conv_fn(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return Activation(out)
    out = conv_fn(x, cache.weight(conv), None, conv.stride, conv.padding, conv.dilation, conv.groups)
    # cuDNN answers channels-last inputs and weights in kind; a CPU 1x1 kernel may answer NCHW (one copy).
    layout = torch.channels_last_3d if out.dim() == 5 else torch.channels_last
    return Activation(out.contiguous(memory_format=layout)[:, : conv.out_channels], conv.bias)


@contextmanager
def _cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """cudnn.benchmark on around the enclosed convs and restored after, so the rest of the process keeps its
    own setting. The conv shapes repeat every chunk, so each is tuned once per process."""
    if not enabled:
        yield
        return
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


class WanVAE(nn.Module):
    """Wan2.1 VAE: video [B, 3, F, H, W] in [−1, 1] ↔ normalised latent [B, 16, (F−1)/4 + 1, H/8, W/8]."""

    def __init__(
        self,
        dim: int = 96,
        z_dim: int = 16,
        dim_mult: tuple[int, ...] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        temperal_downsample: tuple[bool, ...] = (False, True, True),
    ) -> None:
        super().__init__()
        if z_dim != len(LATENT_MEAN):
            raise ValueError(f"z_dim {z_dim}: the Wan2.1 latent mean/std have {len(LATENT_MEAN)} channels")
        if len(temperal_downsample) != len(dim_mult) - 1:
            raise ValueError(f"temperal_downsample {temperal_downsample} needs {len(dim_mult) - 1} entries")
        self.z_dim = z_dim
        self.temporal_stride = 2 ** sum(temperal_downsample)
        self.spatial_stride = 2 ** (len(dim_mult) - 1)

        self.encoder = Encoder3d(dim, 2 * z_dim, dim_mult, num_res_blocks, tuple(temperal_downsample))
        # Kernel-1 convs need no time history: plain Conv3d (official CausalConv3d; same keys and math).
        self.conv1 = nn.Conv3d(2 * z_dim, 2 * z_dim, 1)  # encoder output → (mu, log_var)
        self.conv2 = nn.Conv3d(z_dim, z_dim, 1)  # z → decoder input
        self.decoder = Decoder3d(dim, z_dim, dim_mult, num_res_blocks, tuple(reversed(temperal_downsample)))
        # (mean, std) as [1, z, 1, 1, 1] fp32 tensors per device, built on first use: non-persistent buffers
        # would stay on the meta device after a meta build + `load_state_dict(assign=True)`, and persistent
        # ones would add keys that `Wan2.1_VAE.pth` does not have.
        self._latent_stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_config(cls, cfg: VAEConfig) -> WanVAE:
        return cls(
            dim=cfg.dim,
            z_dim=cfg.z_dim,
            dim_mult=cfg.dim_mult,
            num_res_blocks=cfg.num_res_blocks,
            temperal_downsample=cfg.temperal_downsample,
        )

    @classmethod
    def meta(cls, cfg: VAEConfig) -> WanVAE:
        """Build on the meta device (no memory): the skeleton to load a checkpoint into with `assign=True`."""
        with torch.device("meta"):
            return cls.from_config(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @torch.no_grad()
    def encode(self, video: torch.Tensor, *, fused: bool | None = None) -> torch.Tensor:
        """Encode a video to its normalised latent (the posterior mean; official `WanVAE.encode`).

        Args:
            video: [B, 3, F, H, W] in [−1, 1], F = 4k + 1, H and W multiples of 8.
            fused: run the fused path (channels-last, Triton norms; see the module docstring). Default: on
                CUDA. The Triton kernels run on CPU tensors only under TRITON_INTERPRET=1.

        Returns:
            [B, 16, (F − 1)/4 + 1, H/8, W/8] fp32, (mu − mean) / std, contiguous.

        Raises:
            ValueError: on a shape the causal chunking cannot take.
        """
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"expected a video [B, 3, F, H, W], got {tuple(video.shape)}")
        _, _, num_frames, height, width = video.shape
        if (num_frames - 1) % self.temporal_stride:
            raise ValueError(f"num_frames {num_frames} must be {self.temporal_stride}k+1")
        if height % self.spatial_stride or width % self.spatial_stride:
            raise ValueError(f"height {height} and width {width} must be multiples of {self.spatial_stride}")
        fused = video.is_cuda if fused is None else fused
        self._set_layout((self.conv1, *self.encoder.modules()), channels_last=fused)
        cache = CausalCache(fused=fused)
        video = video.to(self.dtype)  # the first conv's input buffer takes its dtype from the chunks
        # Chunks [0:1], [1:5], [5:9], …: each gives one latent frame.
        later_chunks = video[:, :, 1:].split(self.temporal_stride, dim=2) if num_frames > 1 else ()
        chunks = (video[:, :, :1], *later_chunks)
        batch = video.shape[0]
        encoded = torch.empty(
            batch, 2 * self.z_dim, len(chunks), height // self.spatial_stride, width // self.spatial_stride,
            dtype=self.dtype, device=video.device, memory_format=cache.memory_format,
        )  # fmt: skip
        with _cudnn_benchmark(fused and video.is_cuda):
            for i, chunk in enumerate(chunks):
                # The head conv's bias (fused path) joins the copy into the output.
                self.encoder(chunk, cache).write_to(encoded[:, :, i : i + 1], cache.backend)
            # Only the mu half of conv1: encode returns the posterior mode, log_var is never used.
            mu = F.conv3d(encoded, self.conv1.weight[: self.z_dim], self.conv1.bias[: self.z_dim])
        mean, std = self._stats(mu.device)
        # Contiguous whatever the path: the latent goes on to the DiT, not to another channels-last conv.
        return ((mu.float() - mean) / std).contiguous()

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, *, fused: bool | None = None) -> torch.Tensor:
        """Decode a normalised latent to a video (official `WanVAE.decode`, clamped to [−1, 1]).

        Args:
            latent: [B, 16, F', H', W'] as `encode` returns it.
            fused: as in `decode_frames`.

        Returns:
            [B, 3, 1 + 4(F' − 1), 8H', 8W'] fp32 in [−1, 1].
        """
        batch, _, latent_frames, height, width = self._check_latent(latent).shape
        video = torch.empty(
            batch, 3, 1 + self.temporal_stride * (latent_frames - 1), height * self.spatial_stride,
            width * self.spatial_stride, dtype=torch.float32, device=latent.device,
        )  # fmt: skip
        start = 0
        for frames in self.decode_frames(latent, fused=fused):
            video[:, :, start : start + frames.shape[2]] = frames
            start += frames.shape[2]
        return video

    @torch.no_grad()
    def decode_frames(self, latent: torch.Tensor, *, fused: bool | None = None) -> Iterator[torch.Tensor]:
        """Decode one latent frame at a time, yielding each chunk's frames as soon as they exist.

        Lets the caller stream frames to a video encoder while decoding goes on; `decode` is built on it.

        Args:
            latent: [B, 16, F', H', W'] as `encode` returns it.
            fused: run the fused path (channels-last, Triton norms; see the module docstring). Default: on
                CUDA. The Triton kernels run on CPU tensors only under TRITON_INTERPRET=1.

        Yields:
            [B, 3, f, 8H', 8W'] fp32 in [−1, 1]: f = 1 for latent frame 0, then 4 per latent frame
            (channels-last on the fused path).
        """
        fused = latent.is_cuda if fused is None else fused
        self._set_layout((self.conv2, *self.decoder.modules()), channels_last=fused)
        cache = CausalCache(fused=fused)
        autotune = fused and latent.is_cuda
        mean, std = self._stats(latent.device)
        z = (self._check_latent(latent).float() * std + mean).to(self.dtype)
        with _cudnn_benchmark(autotune):  # conv2 is pointwise in time: all frames at once, as official
            x = self.conv2(z.contiguous(memory_format=cache.memory_format))
        for i in range(x.shape[2]):
            with _cudnn_benchmark(autotune):
                out = self.decoder(x[:, :, i : i + 1], cache)
                frames = out.raw.float()
                if out.bias is not None:
                    frames = frames.add_(out.bias.float().view(1, -1, 1, 1, 1))
            yield frames.clamp_(-1.0, 1.0)

    @staticmethod
    def _set_layout(modules: Iterable[nn.Module], channels_last: bool) -> None:
        """Put one path's conv weights (encode's or decode's) in its activations' layout (once; later calls
        find them there).

        cuDNN would otherwise transpose a weight that does not match its input on every call. The strides are
        set exactly, 1x1 kernels included (where `is_contiguous` cannot tell the layouts apart): torch picks a
        conv's output layout from its weight when the input's strides are ambiguous (a one-frame chunk).
        """
        for module in modules:
            if not isinstance(module, (nn.Conv2d, nn.Conv3d)):
                continue
            weight = module.weight.data
            if not channels_last:
                layout = torch.contiguous_format
            else:
                layout = torch.channels_last_3d if weight.dim() == 5 else torch.channels_last
            if weight.stride() != torch.empty(weight.shape, device="meta", memory_format=layout).stride():
                # The same kind of tensor as before: a decode under inference_mode must not turn normal
                # parameters into inference tensors (no in-place load outside it), nor the other way round.
                with torch.inference_mode(weight.is_inference()):
                    module.weight.data = torch.empty_like(weight, memory_format=layout).copy_(weight)

    def _check_latent(self, latent: torch.Tensor) -> torch.Tensor:
        if latent.dim() != 5 or latent.shape[1] != self.z_dim or latent.shape[2] < 1:
            raise ValueError(f"expected a latent [B, {self.z_dim}, F', H', W'], got {tuple(latent.shape)}")
        return latent

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        stats = self._latent_stats.get(device)
        if stats is None:
            mean = torch.tensor(LATENT_MEAN, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
            std = torch.tensor(LATENT_STD, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
            stats = self._latent_stats[device] = (mean, std)
        return stats


class Encoder3d(nn.Module):
    """conv1 → downsamples (ResidualBlocks, Resamples) → middle (Res, Attn, Res) → head (norm, SiLU, conv)."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        dim_mult: tuple[int, ...],
        num_res_blocks: int,
        temperal_downsample: tuple[bool, ...],
    ) -> None:
        super().__init__()
        dims = [dim * m for m in (1, *dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)

        downsamples: list[nn.Module] = []
        for i, (in_dim, stage_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                downsamples.append(ResidualBlock(in_dim, stage_dim))
                in_dim = stage_dim
            if i != len(dim_mult) - 1:
                mode = "downsample3d" if temperal_downsample[i] else "downsample2d"
                downsamples.append(Resample(stage_dim, mode))
        self.downsamples = nn.ModuleList(downsamples)

        self.middle = nn.ModuleList([ResidualBlock(dims[-1], dims[-1]), AttentionBlock(dims[-1]),
                                     ResidualBlock(dims[-1], dims[-1])])
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], out_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> Activation:
        """One chunk; the result's bias (fused path) is still to be added."""
        h = self.conv1(x, cache)
        for layer in self.downsamples:
            h = layer(h, cache)
        res_in, attn, res_out = self.middle
        h = res_out(attn(res_in(h, cache), cache), cache)
        norm, _, conv = self.head
        return conv.forward_normed(norm, h, cache, keep_input=False)


class Decoder3d(nn.Module):
    """conv1 → middle (Res, Attn, Res) → upsamples (ResidualBlocks, Resamples) → head (norm, SiLU, conv)."""

    def __init__(
        self,
        dim: int,
        z_dim: int,
        dim_mult: tuple[int, ...],
        num_res_blocks: int,
        temperal_upsample: tuple[bool, ...],
    ) -> None:
        super().__init__()
        dims = [dim * m for m in (dim_mult[-1], *reversed(dim_mult))]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.ModuleList([ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                     ResidualBlock(dims[0], dims[0])])

        upsamples: list[nn.Module] = []
        for i, (in_dim, stage_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous stage's Resample halved the channels (Conv2d(dim, dim // 2))
            for _ in range(num_res_blocks + 1):
                upsamples.append(ResidualBlock(in_dim, stage_dim))
                in_dim = stage_dim
            if i != len(dim_mult) - 1:
                mode = "upsample3d" if temperal_upsample[i] else "upsample2d"
                upsamples.append(Resample(stage_dim, mode))
        self.upsamples = nn.ModuleList(upsamples)
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> Activation:
        """One chunk; the result's bias (fused path) is still to be added."""
        h = self.conv1(x, cache)
        res_in, attn, res_out = self.middle
        h = res_out(attn(res_in(h, cache), cache), cache)
        for layer in self.upsamples:
            h = layer(h, cache)
        norm, _, conv = self.head
        return conv.forward_normed(norm, h, cache, keep_input=False)


class ResidualBlock(nn.Module):
    """(RMSNorm, SiLU, CausalConv3d) x 2 plus a kernel-1 conv shortcut when the width changes."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        # The official Sequential: indices 0 (norm), 2 (conv), 3 (norm), 6 (conv) carry the weights; slot 5 is
        # its nn.Dropout(0.0), an Identity here, kept so the second conv's key stays `residual.6`.
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim, 3, padding=1),
        )  # fmt: skip
        self.shortcut: nn.Module = nn.Conv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor | Activation, cache: CausalCache) -> Activation:
        """x + residual(x); the add (and conv2's bias on the fused path) is left to the next kernel."""
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        x = _activation(x)
        # norm1 also writes x's pending adds into x.raw: the shortcut reads x's value from there.
        h = conv1.forward_normed(norm1, x, cache, keep_input=True)
        if isinstance(self.shortcut, nn.Conv3d):
            shortcut = _conv(self.shortcut, x.raw, cache).value(cache.backend)
        else:
            shortcut = x.raw
        h = conv2.forward_normed(norm2, h, cache, keep_input=False)
        return Activation(h.raw, h.bias, residual=shortcut)


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention within each frame (scale 1/sqrt(C)), with a residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        nn.init.zeros_(self.proj.weight)  # official init: the block starts as the identity

    def forward(self, x: torch.Tensor | Activation, cache: CausalCache) -> Activation:
        """x + attention(x); the add (and proj's bias on the fused path) is left to the next kernel."""
        x = _activation(x)
        b, c, t, h, w = x.shape
        normed = self.norm(x, keep_input=True, backend=cache.backend)  # also leaves x's value in x.raw
        identity = x.raw
        normed = normed.transpose(1, 2).reshape(b * t, c, h, w)  # [B*F, C, H, W] (a view when channels-last)
        qkv = self.to_qkv(normed).view(b * t, 1, 3 * c, h * w)  # [B*F, 1, 3C, H*W]
        q, k, v = qkv.transpose(2, 3).chunk(3, dim=-1)  # each [B*F, 1, H*W, C]
        out = F.scaled_dot_product_attention(q, k, v)  # [B*F, 1, H*W, C]
        out = out.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)  # [B*F, C, H, W]
        projected = _conv(self.proj, out, cache)
        projected.raw = projected.raw.view(b, t, c, h, w).transpose(1, 2)  # [B, C, F, H, W]
        projected.residual = identity
        return projected


class Resample(nn.Module):
    """Spatial x2 up/down sampling per frame, plus x2 in time for the '3d' modes (official `Resample`).

    upsample: nearest-exact x2 then Conv2d(dim, dim // 2, 3); upsample3d first doubles the frames with a
    causal time conv to 2·dim channels whose halves become consecutive frames. downsample: pad right/bottom
    by one then Conv2d(dim, dim, 3, stride 2); downsample3d then halves the frames with a stride-2 time conv
    over (last frame of the previous chunk, this chunk's frames).

    Channels-last (fused path): the [B, C, F, H, W] ↔ [B·F, C, H, W] reshapes are views, and the zero pad and
    nearest-exact upsample keep their input's layout.
    """

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.time_conv: CausalConv3d
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                nn.Conv2d(dim, dim // 2, 3, padding=1),
            )
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                # No zero padding in time (official padding 0): one frame of history instead, which
                # `_downsample_time` puts at the head of the conv's input buffer on the first chunk.
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), 0, stride=(2, 1, 1), time_padding=1)
        else:
            raise ValueError(f"Resample mode {mode!r} is not one of upsample2d/3d, downsample2d/3d")

    def forward(self, x: torch.Tensor | Activation, cache: CausalCache) -> Activation:
        """[B, C, F, H, W] → [B, C', F', H', W']; the last conv's bias (fused path) is left to the next
        kernel."""
        x = _activation(x)
        if self.mode == "upsample3d":
            x = Activation(self._upsample_time(x, cache))
        b, c, t, h, w = x.shape

        def images(v: torch.Tensor) -> torch.Tensor:  # [B*F, C, H, W] (a view when channels-last)
            return v.transpose(1, 2).reshape(b * t, c, h, w)

        pad_or_upsample, conv = self.resample
        # nearest-exact copies values, so it runs in the input dtype (the official fp32 detour was a
        # workaround for old bf16 kernels and gives the same bits); at x2 it is plain nearest.
        if self.mode in ("upsample2d", "upsample3d") and cache.backend == "triton":
            # x's pending adds and the upsample in one pass (ATen's channels-last upsample ran at 0.4 TB/s).
            residual = images(x.residual) if x.residual is not None else None
            frames = upsample_nearest2x(images(x.raw), bias=x.bias, residual=residual)
        else:
            frames = pad_or_upsample(images(x.value(cache.backend)))
        out = _conv(conv, frames, cache)  # [B*F, C', H', W']
        out.raw = out.raw.view(b, t, *out.raw.shape[1:]).transpose(1, 2)  # [B, C', F, H', W']
        if self.mode == "downsample3d":
            return self._downsample_time(out, cache)
        return out

    def _upsample_time(self, x: Activation, cache: CausalCache) -> torch.Tensor:
        if cache.get(self.time_conv) is None:
            # First chunk: official stores 'Rep' and keeps latent frame 0 as one frame. On the next chunk its
            # time conv sees zero padding (not frame 0), i.e. a zero history.
            value = x.value(cache.backend)
            b, c, _, h, w = value.shape
            cache.set(self.time_conv, value.new_zeros(b, c, self.time_conv.time_padding, h, w))
            return value
        doubled = self.time_conv(x, cache)  # [B, 2C, F, H, W]
        b, c2, t, h, w = doubled.shape
        c = c2 // 2
        # Channel halves are consecutive frames: [B, 2, C, F, H, W] → [B, C, F, 2, H, W] → [B, C, 2F, H, W].
        halves = doubled.raw.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5)
        out = torch.empty(b, c, 2 * t, h, w, dtype=doubled.raw.dtype, device=doubled.raw.device,
                          memory_format=cache.memory_format)
        interleaved = out.unflatten(2, (t, 2))  # a view of out as [B, C, F, 2, H, W]
        if doubled.bias is None:
            interleaved.copy_(halves)
        else:  # the time conv's bias joins the one copy the interleave needs anyway
            torch.add(halves, doubled.bias.view(2, c).t().reshape(1, c, 1, 2, 1, 1), out=interleaved)
        return out

    def _downsample_time(self, x: Activation, cache: CausalCache) -> Activation:
        if cache.get(self.time_conv) is None:
            # First chunk (one frame): official only caches it, so frame 0 becomes latent frame 0 on its own.
            # The cached frame is the time conv's history: a buffer of time_padding = 1 frames and no chunk.
            value = x.value(cache.backend)
            cache.set(self.time_conv, value[:, :, -1:].clone())
            return Activation(value)
        return self.time_conv(x, cache)  # over [last frame of the previous chunk, this chunk's F frames]


class CausalConv3d(nn.Conv3d):
    """Conv3d causal in time (front padding 2·pad_t, taken from the previous chunk) and symmetric in space.

    Official `CausalConv3d` prepends `feat_cache` frames to the input and zero-pads the rest of the front.
    Here one input buffer per layer [B, C, time_padding + F, H, W] gives the same input without a
    concatenation: its head starts as zeros (unless the owner sets a history first) and always holds the last
    time_padding input frames, and each chunk is written into its tail by whoever produces it (`forward`: a
    copy, with the producer's pending adds; `forward_normed`: the norm itself).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        padding: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        time_padding: int | None = None,
    ) -> None:
        """time_padding: history frames in front of each chunk; default 2·pad_t (official's causal padding).
        The downsample3d time conv has padding 0 and takes 1: the frame official's Resample concatenates."""
        pad_t, pad_h, pad_w = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=(0, pad_h, pad_w))
        self.time_padding = 2 * pad_t if time_padding is None else time_padding

    def forward(  # type: ignore[override]
        self, x: torch.Tensor | Activation, cache: CausalCache
    ) -> Activation:
        x = _activation(x)
        buffer = self._input_buffer(x.raw, cache)
        x.write_to(buffer[:, :, self.time_padding :], cache.backend)
        return self._convolve(buffer, cache)

    def forward_normed(
        self, norm: RMSNorm, x: torch.Tensor | Activation, cache: CausalCache, *, keep_input: bool
    ) -> Activation:
        """conv(silu(norm(x))), the norm writing straight into this conv's input buffer.

        keep_input: also write x's pending adds into x.raw, for a caller that still needs x's value.
        """
        x = _activation(x)
        buffer = self._input_buffer(x.raw, cache)
        tail = buffer[:, :, self.time_padding :]
        norm(x, silu=True, out=tail, keep_input=keep_input, backend=cache.backend)
        return self._convolve(buffer, cache)

    def _input_buffer(self, chunk: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """This layer's buffer [B, C, time_padding + F, H, W] for a chunk like `chunk`, the history at its
        head (zeros before the first chunk); a new one, history copied, when F changes (after chunk 0)."""
        b, _, frames, h, w = chunk.shape
        shape = (b, self.in_channels, self.time_padding + frames, h, w)
        buffer = cache.get(self)
        if buffer is None or buffer.shape != shape:
            fresh = torch.empty(shape, dtype=chunk.dtype, device=chunk.device,
                                memory_format=cache.memory_format)
            head = fresh[:, :, : self.time_padding]
            if buffer is None:
                head.zero_()
            else:
                head.copy_(buffer[:, :, : self.time_padding])
            buffer = cache.set(self, fresh)
        return buffer

    def _convolve(self, buffer: torch.Tensor, cache: CausalCache) -> Activation:
        out = _conv(self, buffer, cache)
        # The last time_padding input frames become the next chunk's history.
        history, frames = self.time_padding, buffer.shape[2] - self.time_padding
        if frames >= history:
            buffer[:, :, :history].copy_(buffer[:, :, frames:])
        else:  # old and new history overlap: frame by frame, front first, so no source is overwritten early
            for i in range(history):
                buffer[:, :, i].copy_(buffer[:, :, i + frames])
        return out


class RMSNorm(nn.Module):
    """Official `RMS_norm`: L2-normalise over channels (eps 1e-12), times sqrt(C)·gamma; no mean, no bias.

    gamma is [C, 1, 1, 1] for video tensors and [C, 1, 1] (`images=True`, the attention block's; the official
    code normalises per frame, the same numbers).
    """

    def __init__(self, dim: int, images: bool = False) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(
        self,
        x: torch.Tensor | Activation,
        *,
        silu: bool = False,
        out: torch.Tensor | None = None,
        keep_input: bool = False,
        backend: Backend = "torch",
    ) -> torch.Tensor:
        """[silu](norm(x)) in fp32 math, cast to x's dtype (or written into `out`).

        x's pending adds (an Activation) are applied first; keep_input also writes them into x.raw. The math
        is fp32 for bf16 inputs too: a sum of squares over hundreds of channels loses too much in bf16
        (diffusers' `WanRMS_norm` upcasts likewise).
        """
        x = _activation(x)
        keep = keep_input and x.pending
        y = vae_rms_norm(x.raw, self.gamma, bias=x.bias, residual=x.residual, silu=silu, out=out,
                         sum_out=x.raw if keep else None, backend=backend)
        if keep:
            x.bias = x.residual = None
        return y


__all__ = ["LATENT_MEAN", "LATENT_STD", "CausalCache", "WanVAE"]
