"""Named model specs: the one table every entry point (pipeline, CLI, service, tests) looks models up in.

Written like gpt-fast's `transformer_configs`: one dataclass per component with derived sizes in
`__post_init__`, and `MODEL_CONFIGS` mapping each public name to its spec. Sizes follow the official Wan
configs (Wan-Video/Wan2.1 `wan/configs/*.py`, Wan2.2 `wan_*_A14B.py`) and TurboDiffusion's inference defaults
(`turbodiffusion/inference/wan2.{1,2}_*_infer.py`). The tiny specs are the same architectures scaled down to a
few MB, so tests and the CPU demo run the production code path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["t2v", "i2v"]


@dataclass(frozen=True)
class DiTConfig:
    """Constructor kwargs of `engine.models.dit.WanModel` (= the official `WanModel` kwargs)."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16  # 36 for I2V: noise 16 | mask 4 | image latent 16
    out_dim: int = 16
    freq_dim: int = 256
    text_dim: int = 4096  # = the text encoder's width
    text_len: int = 512  # context rows are always zero-padded to this many (no text mask in the DiT)
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    head_dim: int = field(init=False)

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        object.__setattr__(self, "head_dim", self.dim // self.num_heads)

    def kwargs(self) -> dict[str, object]:
        """The WanModel constructor kwargs (everything but the derived head_dim)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "head_dim"}


@dataclass(frozen=True)
class VAEConfig:
    """Wan2.1 VAE (`_video_vae` in wan/modules/vae.py): 4x8x8 compression, z_dim latent channels."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # official name (sic)
    temporal_stride: int = field(init=False)
    spatial_stride: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "temporal_stride", 2 ** sum(self.temperal_downsample))
        object.__setattr__(self, "spatial_stride", 2 ** (len(self.dim_mult) - 1))


@dataclass(frozen=True)
class T5Config:
    """umT5 encoder (official `T5Encoder` kwargs; umT5-XXL = 256384, 4096, 4096, 10240, 64, 24)."""

    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    text_len: int = 512
    # "umt5-xxl": tokenizer.json from google/umt5-xxl in the checkpoint folder; "bytes": the built-in
    # byte-level tokenizer of the tiny specs (no file needed, ids = byte + 3, pad 0, eos 1, unk 2).
    tokenizer: Literal["umt5-xxl", "bytes"] = "umt5-xxl"


# (width, height) presets, TurboDiffusion `rcm/datasets/utils.py: VIDEO_RES_SIZE_INFO`.
WAN_RESOLUTIONS: dict[str, dict[str, tuple[int, int]]] = {
    "480p": {"16:9": (832, 480), "9:16": (480, 832), "1:1": (640, 640), "4:3": (640, 480)},
    "720p": {"16:9": (1280, 720), "9:16": (720, 1280), "1:1": (960, 960), "4:3": (960, 720)},
}
# Tiny specs keep the aspect ratios at a CPU-friendly size (all multiples of 16).
TINY_RESOLUTIONS: dict[str, dict[str, tuple[int, int]]] = {
    "480p": {"16:9": (160, 96), "9:16": (96, 160), "1:1": (128, 128), "4:3": (128, 96)},
    "720p": {"16:9": (256, 144), "9:16": (144, 256), "1:1": (192, 192), "4:3": (192, 144)},
}

EXPERT_NAMES: tuple[str, str] = ("high_noise_model", "low_noise_model")


@dataclass(frozen=True)
class ModelSpec:
    """Everything the pipeline and the service need to know about one public model name."""

    name: str
    mode: Mode
    dit: DiTConfig
    vae: VAEConfig = VAEConfig()
    t5: T5Config = T5Config()
    # Wan2.2-A14B: two experts; the high-noise one runs while the RF time s >= boundary.
    experts: tuple[str, ...] = ()
    boundary: float | None = None
    # rCM sampler defaults (TurboDiffusion: sigma_max 80 for T2V, 200 for I2V; 4 steps).
    sigma_max: float = 80.0
    default_steps: int = 4
    max_steps: int = 4
    # Baseline ("original") sampler: flow UniPC + CFG, official defaults.
    baseline_steps: int = 50
    baseline_shift: float = 5.0
    baseline_guide_scale: float = 5.0
    fps: int = 16
    num_frames: int = 81
    max_frames: int = 161
    default_size: str = "480p"
    default_aspect_ratio: str = "16:9"
    resolutions: dict[str, dict[str, tuple[int, int]]] = field(default_factory=lambda: WAN_RESOLUTIONS)
    # The multiple width/height must be: VAE spatial stride x DiT patch size.
    size_multiple: int = 16
    is_tiny: bool = False

    def resolution(self, size: str | None = None, aspect_ratio: str | None = None) -> tuple[int, int]:
        """(width, height) for a preset; raises ValueError naming the valid choices."""
        size = size or self.default_size
        aspect_ratio = aspect_ratio or self.default_aspect_ratio
        if size not in self.resolutions:
            raise ValueError(f"size {size!r} is not one of {sorted(self.resolutions)}")
        table = self.resolutions[size]
        if aspect_ratio not in table:
            raise ValueError(f"aspect_ratio {aspect_ratio!r} is not one of {sorted(table)}")
        return table[aspect_ratio]

    def check_num_frames(self, num_frames: int) -> None:
        """Frames must be 4k+1 (the VAE's causal 1 + 4k chunking) and within the spec's limit."""
        if num_frames < 1 or (num_frames - 1) % self.vae.temporal_stride:
            raise ValueError(f"num_frames {num_frames} must be 4k+1 (1, 5, 9, …, 81)")
        if num_frames > self.max_frames:
            raise ValueError(f"num_frames {num_frames} exceeds the limit {self.max_frames}")

    def check_size(self, width: int, height: int) -> None:
        for axis, value in (("width", width), ("height", height)):
            if value <= 0 or value % self.size_multiple:
                raise ValueError(f"{axis} {value} must be a positive multiple of {self.size_multiple}")

    def latent_shape(self, num_frames: int, width: int, height: int) -> tuple[int, int, int, int]:
        """[C, F', H', W'] of the VAE latent for a video of this size."""
        self.check_num_frames(num_frames)
        self.check_size(width, height)
        s = self.vae.spatial_stride
        return (self.vae.z_dim, (num_frames - 1) // self.vae.temporal_stride + 1, height // s, width // s)


def _wan_14b(in_dim: int = 16) -> DiTConfig:
    return DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=in_dim)


# Tiny architectures: head_dim 64 (t2v) and 128 (i2v) so both kernel head sizes run through the pipeline.
_TINY_T5 = T5Config(vocab=259, dim=64, dim_attn=64, dim_ffn=128, num_heads=4, num_layers=2, tokenizer="bytes")
_TINY_VAE = VAEConfig(dim=8, z_dim=16)

MODEL_CONFIGS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="wan2.1-t2v-1.3b",
            mode="t2v",
            dit=DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
            baseline_guide_scale=6.0,  # README: 1.3B uses guide scale 6 and shift 8 at 480p
            baseline_shift=8.0,
        ),
        ModelSpec(name="wan2.1-t2v-14b", mode="t2v", dit=_wan_14b(), default_size="720p"),
        ModelSpec(
            name="wan2.2-t2v-a14b",
            mode="t2v",
            dit=_wan_14b(),
            experts=EXPERT_NAMES,
            boundary=0.875,
            default_size="720p",
            baseline_steps=40,
            baseline_shift=12.0,
            baseline_guide_scale=4.0,
        ),
        ModelSpec(
            name="wan2.2-i2v-a14b",
            mode="i2v",
            dit=_wan_14b(in_dim=36),
            experts=EXPERT_NAMES,
            boundary=0.9,
            sigma_max=200.0,
            default_size="720p",
            baseline_steps=40,
            baseline_shift=5.0,
            baseline_guide_scale=3.5,
        ),
        ModelSpec(
            name="tiny-t2v",
            mode="t2v",
            dit=DiTConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=2, text_dim=64),
            vae=_TINY_VAE,
            t5=_TINY_T5,
            resolutions=TINY_RESOLUTIONS,
            is_tiny=True,
        ),
        ModelSpec(
            name="tiny-i2v",
            mode="i2v",
            dit=DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=36, text_dim=64),
            vae=_TINY_VAE,
            t5=_TINY_T5,
            experts=EXPERT_NAMES,
            boundary=0.9,
            sigma_max=200.0,
            resolutions=TINY_RESOLUTIONS,
            is_tiny=True,
        ),
    )
}


def from_name(name: str) -> ModelSpec:
    """Exact lookup; the KeyError lists the valid names."""
    try:
        return MODEL_CONFIGS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(MODEL_CONFIGS)}") from None


__all__ = ["DiTConfig", "VAEConfig", "T5Config", "ModelSpec", "MODEL_CONFIGS", "EXPERT_NAMES", "from_name"]
