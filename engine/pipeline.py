"""Pipeline: prompt (+ first frame) → uint8 video frames, with the models resident between requests.

Stages (each timed, each reported through `on_progress`):
    text_encode  umT5 → [1, 512, 4096] context (LRU cache of prompt embeddings)
    image_encode I2V only: the VAE encode of the first frame + black frames (LRU cache per image and size)
    denoise      rCM sampling over the DiT (1–4 steps, no CFG), Wan2.2-A14B high/low-noise expert switch
    vae_decode   Wan2.1 VAE, one latent frame at a time → uint8 frames

The "original" baseline (flow UniPC, 50 steps, CFG with the official negative prompt) runs through the same
object with `GenerationRequest(sampler="unipc")`; the benchmark uses it for same-run speed ratios.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from engine import checkpoint
from engine.configs import ModelSpec, from_name
from engine.models.dit import WanModel
from engine.models.t5 import TextEncoder
from engine.models.vae import WanVAE
from engine.ops.attention import BACKENDS, DEFAULT_TOPK
from engine.ops.int8_linear import GEMMS, Int8Linear
from engine.quantize import W8A8QuantHandler, is_quantized_state_dict, quantize_state_dict
from engine.sampling import (
    SamplingCanceled,
    cfg_velocity,
    expert_schedule,
    flow_unipc_sigmas,
    rcm_sample,
    rcm_timesteps,
    unipc_expert_schedule,
    unipc_sample,
)
from engine.video import frames_from_video, uint8_frames

STAGES: tuple[str, ...] = ("text_encode", "denoise", "vae_decode")

# Official default negative prompt (wan/configs/shared_config.py), used only by the CFG baseline sampler.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)

ProgressFn = Callable[[str, int, int], None]
CancelFn = Callable[[], bool]


class GenerationCanceled(Exception):
    """`should_cancel()` returned True; the pipeline stopped at the next step boundary."""


@dataclass
class GenerationRequest:
    """One video to generate; None fields take the model spec's defaults (see `Pipeline.validate`)."""

    prompt: str
    image: object | None = None  # PIL.Image.Image: the I2V first frame
    width: int | None = None
    height: int | None = None
    size: str | None = None  # "480p" | "720p"
    aspect_ratio: str | None = None  # "16:9" | "9:16" | "1:1" | "4:3"
    num_frames: int | None = None  # 4k + 1
    steps: int | None = None
    seed: int | None = None  # None → random; the seed used is reported in the result
    sigma_max: float | None = None
    ode: bool = False
    attention: str | None = None  # self-attention backend override
    topk: float | None = None
    sampler: Literal["rcm", "unipc"] = "rcm"
    guide_scale: float | None = None  # unipc baseline only
    shift: float | None = None  # unipc baseline only
    negative_prompt: str | None = None  # unipc baseline only; None → the official default


@dataclass
class GenerationResult:
    frames: np.ndarray  # [F, H, W, 3] uint8
    fps: int
    seed: int
    width: int
    height: int
    num_frames: int
    steps: int
    timings: dict[str, float]  # seconds per stage


def adaptive_resolution(width: int, height: int, image_width: int, image_height: int, multiple: int) -> tuple[int, int]:
    """Keep the preset's area, follow the image's aspect (TurboDiffusion `--adaptive_resolution`)."""
    area = width * height
    aspect = image_height / image_width
    w = max(multiple, round(math.sqrt(area / aspect) / multiple) * multiple)
    h = max(multiple, round(math.sqrt(area * aspect) / multiple) * multiple)
    return w, h


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Pipeline:
    """The resident models of one spec and the generation loop over them."""

    def __init__(self, spec: ModelSpec, text_encoder: TextEncoder, experts: list[WanModel], vae: WanVAE,
                 device: torch.device, *, attention: str, topk: float, offload_idle_expert: bool = False,
                 image_cache_size: int = 8) -> None:
        if image_cache_size < 0:
            raise ValueError(f"image_cache_size must be >= 0, got {image_cache_size}")
        self.spec = spec
        self.text_encoder = text_encoder
        self.experts = experts
        self.vae = vae
        self.device = device
        self.dtype = next(experts[0].parameters()).dtype
        self.attention = attention
        self.topk = topk
        self.offload_idle_expert = offload_idle_expert
        linears = [m for m in experts[0].modules() if isinstance(m, Int8Linear)]
        self.quant = "w8a8" if linears else None
        self.gemm = linears[0].gemm if linears else None  # "int8" | "fp8" for W8A8 linears
        # I2V conditions y per (resized pixels, frames): a repeated image skips the VAE encode of the whole
        # clip (about 1 s at 720p), as a repeated prompt skips umT5. 12 MB each at 720p.
        self.image_cache_size = image_cache_size
        self._image_conditions: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()

    # -----------------------------------------------------------------------------------------------------
    # Construction
    # -----------------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, model: str, checkpoint_dir: str | Path | None = None, *, device: str | None = None,
             attention: str | None = None, topk: float | None = None, quant: str | None = "auto",
             gemm: str = "int8", offload_idle_expert: bool = False, random_weights: bool = False,
             dtype: torch.dtype | None = None, image_cache_size: int = 8) -> Pipeline:
        """Build the models of `model` on `device`, weights from `checkpoint_dir`.

        Args:
            checkpoint_dir: a folder in one of the layouts of `engine.checkpoint`. None → random weights,
                allowed for the tiny specs (tests, CPU demo) or with `random_weights=True` (benchmarks).
            attention: self-attention backend; default "sagesla" on CUDA, "sdpa" on the CPU.
            quant: "w8a8" (W8A8 INT8 block linears; float checkpoints are quantized at load), None (float
                linears), or "auto": "w8a8" exactly when the checkpoint is a `-quant` file.
            gemm: the W8A8 linears' GEMM: "int8" (TurboDiffusion's numerics, Triton) or "fp8" (the INT8 weights
                requantized to e4m3 at load, cuBLAS's block-scaled FP8 GEMM on sm90; faster, coarser:
                docs/notes/linear.md).
            offload_idle_expert: keep only the active A14B expert on the GPU, the other parked on the CPU.
            dtype: matmul dtype; default bf16 on CUDA, fp32 on CPU.
            image_cache_size: I2V image conditions kept for repeated images (0 disables the cache).
        """
        spec = from_name(model)
        dev = torch.device(device) if device else default_device()
        dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
        # TurboDiffusion serves with SageSLA at topk 0.1; the CPU (no FP8/INT8 tensor cores) runs dense SDPA.
        attention = attention or ("sagesla" if dev.type == "cuda" else "sdpa")
        topk = DEFAULT_TOPK if topk is None else topk
        if attention not in BACKENDS:
            raise ValueError(f"attention {attention!r} is not one of {BACKENDS}")
        if quant not in (None, "w8a8", "auto"):
            raise ValueError(f"quant {quant!r} is not one of None, 'w8a8', 'auto'")
        if gemm not in GEMMS:
            raise ValueError(f"gemm {gemm!r} is not one of {GEMMS}")
        n_experts = len(spec.experts) or 1
        if checkpoint_dir is None:
            if not (spec.is_tiny or random_weights):
                raise ValueError(f"model {model!r} needs checkpoint_dir (random weights only for tiny specs "
                                 "or with random_weights=True)")
            text_encoder, experts, vae = _random_models(spec, n_experts, dev, dtype, attention, topk,
                                                        quantize=quant == "w8a8")
        else:
            text_encoder, experts, vae = _checkpoint_models(spec, Path(checkpoint_dir), dev, dtype, attention, topk,
                                                            quant)
        for expert in experts:  # fused Triton norms on the GPU (TurboDiffusion's default); plain modules on CPU
            expert.use_fused_norms(dev.type == "cuda")
            if gemm == "fp8":
                _use_fp8_gemm(expert)
        if offload_idle_expert and n_experts > 1:
            experts[1].to("cpu")
        return cls(spec, text_encoder, experts, vae, dev, attention=attention, topk=topk,
                   offload_idle_expert=offload_idle_expert, image_cache_size=image_cache_size)

    # -----------------------------------------------------------------------------------------------------
    # Requests
    # -----------------------------------------------------------------------------------------------------

    def validate(self, request: GenerationRequest) -> GenerationRequest:
        """Fill defaults and check every field; ValueError messages name the field and the rule."""
        spec = self.spec
        if not isinstance(request.prompt, str) or not request.prompt.strip():
            raise ValueError("prompt must be a non-empty string")
        if spec.mode == "i2v" and request.image is None:
            raise ValueError(f"image is required: {spec.name} is an image-to-video model")
        if spec.mode == "t2v" and request.image is not None:
            raise ValueError(f"image is not accepted: {spec.name} is a text-to-video model")
        if (request.width is None) != (request.height is None):
            raise ValueError("width and height must be given together")
        if request.width is not None and request.height is not None:
            width, height = request.width, request.height
        else:
            width, height = spec.resolution(request.size, request.aspect_ratio)
            if request.image is not None and request.aspect_ratio is None:
                width, height = adaptive_resolution(width, height, *request.image.size, spec.size_multiple)
        spec.check_size(width, height)
        num_frames = spec.num_frames if request.num_frames is None else request.num_frames
        spec.check_num_frames(num_frames)
        if request.sampler == "rcm":
            steps = spec.default_steps if request.steps is None else request.steps
            if not 1 <= steps <= spec.max_steps:
                raise ValueError(f"steps {steps} must be between 1 and {spec.max_steps}")
        elif request.sampler == "unipc":
            steps = spec.baseline_steps if request.steps is None else request.steps
            if steps < 1:
                raise ValueError(f"steps {steps} must be at least 1")
        else:
            raise ValueError(f"sampler {request.sampler!r} is not one of 'rcm', 'unipc'")
        sigma_max = spec.sigma_max if request.sigma_max is None else request.sigma_max
        if not (math.isfinite(sigma_max) and sigma_max > 0):
            raise ValueError(f"sigma_max {sigma_max} must be a positive finite number")
        seed = secrets.randbelow(2**31) if request.seed is None else request.seed
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed {seed} must be in [0, 2^63)")
        topk = self.topk if request.topk is None else request.topk
        if not 0 < topk <= 1:
            raise ValueError(f"topk {topk} must be in (0, 1]")
        attention = request.attention or self.attention
        if attention not in BACKENDS:
            raise ValueError(f"attention {attention!r} is not one of {BACKENDS}")
        return replace(request, width=width, height=height, num_frames=num_frames, steps=steps,
                       sigma_max=sigma_max, seed=seed, topk=topk, attention=attention)

    def generate(self, request: GenerationRequest, *, on_progress: ProgressFn | None = None,
                 should_cancel: CancelFn | None = None,
                 on_frames: Callable[[np.ndarray], None] | None = None) -> GenerationResult:
        """Run one request through every stage; raises GenerationCanceled when `should_cancel()` says so
        (polled before every denoising step, between stages and between VAE decode chunks). `on_frames` gets
        each decoded uint8 chunk [f, H, W, 3] as soon as it exists (e.g. an `Mp4Stream.put`)."""
        req = self.validate(request)
        assert req.width and req.height and req.num_frames and req.steps and req.seed is not None
        progress = on_progress or (lambda stage, step, total: None)
        cancel = should_cancel or (lambda: False)
        timings: dict[str, float] = {}
        for expert in self.experts:
            expert.attention_backend = req.attention
            expert.attention_topk = req.topk

        def check_cancel() -> None:
            if cancel():
                raise GenerationCanceled("canceled")

        with torch.inference_mode():
            check_cancel()
            progress("text_encode", 0, req.steps)
            with self._timed(timings, "text_encode"):
                context = self._encode_text([req.prompt])
                negative = (self._encode_text([req.negative_prompt or WAN_NEGATIVE_PROMPT])
                            if req.sampler == "unipc" else None)
            y = None
            if self.spec.mode == "i2v":  # a VAE encode of the whole clip (first frame + zeros): timed apart
                with self._timed(timings, "image_encode"):
                    y = self._image_condition(req)

            check_cancel()
            progress("denoise", 0, req.steps)
            with self._timed(timings, "denoise"):
                latent_shape = (1, *self.spec.latent_shape(req.num_frames, req.width, req.height))
                try:
                    latent = self._denoise(req, context, negative, y, latent_shape,
                                           on_step=lambda i: progress("denoise", i, req.steps),
                                           should_cancel=cancel)
                except SamplingCanceled as e:
                    raise GenerationCanceled("canceled") from e

            check_cancel()
            progress("vae_decode", req.steps, req.steps)
            with self._timed(timings, "vae_decode"):
                chunks = []
                for chunk in self.decode_frames(latent):  # cancel (and deadlines) also act between decode chunks
                    chunks.append(chunk)
                    if on_frames is not None:
                        on_frames(chunk)
                    check_cancel()
                frames = np.concatenate(chunks, axis=0)
        return GenerationResult(frames=frames, fps=self.spec.fps, seed=req.seed, width=req.width,
                                height=req.height, num_frames=req.num_frames, steps=req.steps, timings=timings)

    def warmup(self) -> None:
        """One short generation at the smallest valid size so the first job pays no one-time costs."""
        image = None
        if self.spec.mode == "i2v":
            from PIL import Image

            image = Image.new("RGB", (64, 64), (128, 96, 64))
        self.generate(GenerationRequest(prompt="warm-up", image=image, width=self.spec.size_multiple * 2,
                                        height=self.spec.size_multiple * 2, num_frames=5, steps=1, seed=0))

    # -----------------------------------------------------------------------------------------------------
    # Stages
    # -----------------------------------------------------------------------------------------------------

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder.encode(prompts).to(self.device, self.dtype)

    def _image_condition(self, req: GenerationRequest) -> torch.Tensor:
        """y = cat(mask 4, VAE(image + F−1 black frames) 16) → [1, 20, F', H', W'] (wan.md §11), from the LRU
        cache when the same resized pixels and frame count came before."""
        from PIL import Image

        assert req.image is not None and req.width and req.height and req.num_frames
        image = req.image.convert("RGB").resize((req.width, req.height), Image.Resampling.BILINEAR)
        rgb = np.asarray(image)  # [H, W, 3] uint8
        if self.image_cache_size == 0:
            return self._encode_image_condition(rgb, req.num_frames)
        digest = hashlib.blake2b(rgb.tobytes(), digest_size=16)
        digest.update(np.asarray(rgb.shape, dtype=np.int64).tobytes())
        key = (digest.hexdigest(), req.num_frames)
        if key in self._image_conditions:
            self._image_conditions.move_to_end(key)
            return self._image_conditions[key]
        y = self._image_conditions[key] = self._encode_image_condition(rgb, req.num_frames)
        while len(self._image_conditions) > self.image_cache_size:
            self._image_conditions.popitem(last=False)
        return y

    def clear_image_cache(self) -> None:
        self._image_conditions.clear()

    def _encode_image_condition(self, rgb: np.ndarray, num_frames: int) -> torch.Tensor:
        height, width = rgb.shape[:2]
        pixels = torch.from_numpy(rgb.astype(np.float32)).to(self.device)  # [H, W, 3]
        first = (pixels / 127.5 - 1.0).permute(2, 0, 1)[None, :, None]  # [1, 3, 1, H, W] in [-1, 1]
        video = torch.zeros(1, 3, num_frames, height, width, device=self.device)
        video[:, :, :1] = first
        vae_dtype = next(self.vae.parameters()).dtype
        latent = self.vae.encode(video.to(vae_dtype)).float()  # [1, 16, F', H', W']
        mask = torch.zeros(1, 4, *latent.shape[2:], device=self.device)
        mask[:, :, 0] = 1.0  # latent frame 0 carries the given image
        return torch.cat([mask, latent], dim=1).to(self.dtype)

    def _expert(self, index: int) -> WanModel:
        """The expert for a step; with offloading, park the other one on the CPU (one move per request)."""
        model = self.experts[index]
        if self.offload_idle_expert and len(self.experts) > 1:
            for i, other in enumerate(self.experts):
                if i != index:
                    other.to("cpu")
            model.to(self.device)
        return model

    def _denoise(self, req: GenerationRequest, context: torch.Tensor, negative: torch.Tensor | None,
                 y: torch.Tensor | None, latent_shape: tuple[int, ...], *, on_step: Callable[[int], None],
                 should_cancel: CancelFn) -> torch.Tensor:
        generator = torch.Generator(device=self.device).manual_seed(req.seed)
        assert req.steps is not None and req.sigma_max is not None
        if req.sampler == "rcm":
            timesteps = rcm_timesteps(req.steps, req.sigma_max)
            schedule = expert_schedule(timesteps, self.spec.boundary)

            def velocity(x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
                return self._expert(schedule[step])(x, t, context, y)

            return rcm_sample(velocity, latent_shape, timesteps=timesteps, generator=generator, device=self.device,
                              ode=req.ode, model_dtype=self.dtype, on_step=on_step, should_cancel=should_cancel)
        # Baseline: flow UniPC with CFG (two passes per step on the active expert).
        shift = self.spec.baseline_shift if req.shift is None else req.shift
        guide = self.spec.baseline_guide_scale if req.guide_scale is None else req.guide_scale
        sigmas = flow_unipc_sigmas(req.steps, shift)
        schedule = unipc_expert_schedule(sigmas, self.spec.boundary)
        assert negative is not None

        def guided(x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
            model = self._expert(schedule[step])
            x_in = x.to(self.dtype)
            return cfg_velocity(model(x_in, t, context, y), model(x_in, t, negative, y), guide)

        noise = torch.randn(latent_shape, generator=generator, device=self.device, dtype=torch.float32)
        return unipc_sample(guided, noise, sigmas=sigmas, on_step=on_step, should_cancel=should_cancel)

    def decode(self, latent: torch.Tensor) -> np.ndarray:
        """Latent [1, 16, F', H', W'] → uint8 frames [F, H, W, 3]."""
        return np.concatenate(list(self.decode_frames(latent)), axis=0)

    def decode_frames(self, latent: torch.Tensor) -> Iterator[np.ndarray]:
        """Decoded uint8 frames chunk by chunk (1, then 4 per latent frame), for streaming to the encoder.

        On CUDA a chunk's copy to the host is asynchronous (pinned memory) and the chunk is handed out once the
        next one has been queued, so the GPU does not idle while the host takes the frames.
        """
        vae_dtype = next(self.vae.parameters()).dtype
        pending: tuple[torch.Tensor, torch.cuda.Event] | None = None
        for chunk in self.vae.decode_frames(latent.to(vae_dtype)):
            if not chunk.is_cuda:
                yield frames_from_video(chunk[0])
                continue
            pixels = uint8_frames(chunk[0])
            host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(pixels, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
            if pending is not None:
                pending[1].synchronize()
                yield pending[0].numpy()
            pending = (host, copied)
        if pending is not None:
            pending[1].synchronize()
            yield pending[0].numpy()

    @contextmanager
    def _timed(self, timings: dict[str, float], stage: str) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        timings[stage] = time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------
# Model construction helpers
# ---------------------------------------------------------------------------------------------------------


def _use_fp8_gemm(model: WanModel) -> None:
    layers = [module for module in model.modules() if isinstance(module, Int8Linear)]
    if not layers:
        raise ValueError("gemm='fp8' runs the W8A8 linears: load with quant='w8a8' or a -quant checkpoint")
    for layer in layers:
        layer.use_fp8()


def _random_models(spec: ModelSpec, n_experts: int, device: torch.device, dtype: torch.dtype,
                   attention: str, topk: float, *, quantize: bool) -> tuple[TextEncoder, list[WanModel], WanVAE]:
    """Deterministic random weights (seeded per spec), for the tiny specs and the benchmarks.

    Built directly in the matmul dtype on the target device: a 14B DiT built in fp32 first would need 57 GB.
    """
    with _fork_rng(seed=0):
        with torch.device(device), _default_dtype(dtype):
            # Random weights come without a tokenizer.json: the byte-level tokenizer feeds the same umT5 shapes.
            text_encoder = TextEncoder.from_spec(dataclasses.replace(spec.t5, tokenizer="bytes"), device=device,
                                                 dtype=dtype)
            # With SLA's proj_l, so the sparse backends run (and time) their linear branch too.
            experts = [WanModel.from_config(spec.dit, attention=attention, topk=topk, sla_proj=True)
                       for _ in range(n_experts)]
            vae = WanVAE.from_config(spec.vae)
        for expert in experts:
            _randomize_zero_init(expert)
            expert.to_inference_dtype(dtype)  # before the swap: Int8Linear keeps int8 weights + fp32 scales
            if quantize:
                W8A8QuantHandler(expert).convert_for_runtime()
            expert.eval().requires_grad_(False)
        _randomize_zero_init(text_encoder.model)
        text_encoder.model.requires_grad_(False)
        _randomize_zero_init(vae)
        vae.to(dtype).eval().requires_grad_(False)
    return text_encoder, experts, vae


def _randomize_zero_init(module: torch.nn.Module) -> None:
    """The official init zeroes the DiT head and the VAE attention projections, which would make random
    models output constants; give those tensors small random values instead."""
    for param in module.parameters():
        if param.dim() > 1 and not param.detach().abs().sum().bool():
            torch.nn.init.normal_(param, std=0.02)


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@contextmanager
def _fork_rng(seed: int) -> Iterator[None]:
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _checkpoint_models(spec: ModelSpec, root: Path, device: torch.device, dtype: torch.dtype,
                       attention: str, topk: float, quant: str | None) -> tuple[TextEncoder, list[WanModel], WanVAE]:
    files = checkpoint.find_model_files(spec, root, quantized=None if quant == "auto" else quant == "w8a8")
    experts = []
    for path in files.dit:
        state = checkpoint.normalize_dit_state_dict(checkpoint.read_state_dict(path), spec.dit.in_dim)
        quantized_file = is_quantized_state_dict(state)
        if quant is None and quantized_file:
            raise checkpoint.CheckpointError(f"{path} holds W8A8 weights; load it with quant='w8a8' or 'auto'")
        if quant == "w8a8" and not quantized_file:  # a float checkpoint, quantized once at load
            state = quantize_state_dict(state, device=device)
        sla_proj = any(checkpoint.SLA_PROJ_SUFFIX in key for key in state)  # TurboWan files carry proj_l
        with torch.device("meta"):
            model = WanModel.from_config(spec.dit, attention=attention, topk=topk, sla_proj=sla_proj)
        model.to_inference_dtype(dtype)  # before the swap: Int8Linear keeps int8 weights + fp32 scales
        if quant == "w8a8" or quantized_file:
            W8A8QuantHandler(model).convert_for_runtime()
        experts.append(checkpoint.load_into(model, state, device=device, source=str(path)))
    with torch.device("meta"):
        vae = WanVAE.from_config(spec.vae).to(dtype)
    vae_state = checkpoint.normalize_vae_state_dict(checkpoint.read_state_dict(files.vae))
    checkpoint.load_into(vae, vae_state, device=device, source=str(files.vae))
    text_encoder = TextEncoder.from_spec(spec.t5, tokenizer_path=files.tokenizer, device="meta", dtype=dtype)
    t5_state = checkpoint.normalize_t5_state_dict(checkpoint.read_state_dict(files.t5))
    checkpoint.load_into(text_encoder.model, t5_state, device=device, source=str(files.t5))
    return text_encoder, experts, vae
