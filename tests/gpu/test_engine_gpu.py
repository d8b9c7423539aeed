"""The engine at real sizes on the GPU: bf16 + fused norms + SageSLA against fp32 references, random weights."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from engine.configs import from_name
from engine.models.dit import WanModel
from engine.models.vae import WanVAE
from engine.pipeline import GenerationRequest, Pipeline
from engine.quantize import W8A8QuantHandler

pytestmark = pytest.mark.gpu


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _randomized(model: torch.nn.Module) -> torch.nn.Module:
    for param in model.parameters():  # official init zeroes the head / VAE projections: re-randomise all
        if param.dim() >= 2:
            torch.nn.init.normal_(param, std=param[0].numel() ** -0.5)
        else:
            torch.nn.init.normal_(param, mean=1.0 if param.abs().max() == 1 else 0.0, std=0.1)
    return model


@torch.inference_mode()
def test_tiny_pipeline_on_cuda_generates_finite_frames() -> None:
    pipe = Pipeline.load("tiny-t2v", device="cuda")
    assert pipe.attention == "sagesla" and pipe.experts[0].blocks[0].norm1.fused
    result = pipe.generate(GenerationRequest(prompt="a fox", seed=0, steps=4))
    assert result.frames.shape == (81, 96, 160, 3) and result.frames.std() > 1


def test_tiny_i2v_on_cuda_reuses_the_image_condition(monkeypatch: pytest.MonkeyPatch) -> None:
    """A repeated image skips the VAE encode: the cached condition (a CUDA inference tensor from the first
    request) serves the second, which gives the same frames."""
    pipe = Pipeline.load("tiny-i2v", device="cuda")
    encodes = []
    encode = pipe.vae.encode
    monkeypatch.setattr(pipe.vae, "encode", lambda video, **kw: encodes.append(1) or encode(video, **kw))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 160, 3), dtype=np.uint8))
    request = GenerationRequest(prompt="a fox", image=image, seed=0, steps=2, num_frames=9)
    first, second = pipe.generate(request), pipe.generate(request)
    assert len(encodes) == 1 and "image_encode" in second.timings
    assert np.array_equal(first.frames, second.frames) and first.frames.std() > 1


@torch.inference_mode()
def test_dit_1_3b_bf16_fused_sagesla_tracks_fp32_sdpa() -> None:
    """1.3B blocks (2 of 30 for time) at a 480p token grid of 5 latent frames: the serving path (bf16, fused
    norms, dense SageSLA at topk 1.0) against the fp32 SDPA model on the same weights."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(from_name("wan2.1-t2v-1.3b").dit, num_layers=2)
    ref = _randomized(WanModel.from_config(cfg).cuda()).to_inference_dtype(torch.float32)
    fast = WanModel.from_config(cfg, attention="sagesla", topk=1.0).cuda()
    fast.load_state_dict(ref.state_dict())
    fast.to_inference_dtype(torch.bfloat16).use_fused_norms(True)
    x = torch.randn(1, 16, 5, 60, 104, device="cuda")
    t = torch.tensor([900.0], device="cuda")
    context = torch.randn(1, 512, 4096, device="cuda")
    context[:, 40:] = 0
    expected = ref(x, t, context)
    got = fast(x, t, context)
    assert torch.isfinite(got).all()
    # bf16 matmuls + INT8/FP8 attention over 2 blocks: cosine ≥ 0.999 and relative L2 ≤ 5e-2.
    assert _cosine(got, expected) > 0.999, _cosine(got, expected)
    assert _rel(got, expected) < 5e-2, _rel(got, expected)


@torch.inference_mode()
def test_vae_full_size_bf16_decode_tracks_fp32() -> None:
    torch.manual_seed(0)
    ref = _randomized(WanVAE()).cuda().float()
    fast = WanVAE().cuda()
    fast.load_state_dict(ref.state_dict())
    fast.to(torch.bfloat16)
    latent = torch.randn(1, 16, 3, 60, 104, device="cuda")
    expected = ref.decode(latent)
    got = fast.decode(latent.bfloat16())
    assert got.shape == expected.shape == (1, 3, 9, 480, 832)
    assert _rel(got, expected) < 5e-2, _rel(got, expected)  # bf16 weights and activations through 30 convs


@torch.inference_mode()
def test_dit_1_3b_w8a8_fused_block_path_equals_unfused() -> None:
    """The GPU block path (fused norms with the residual updates, fused q/k RMSNorm+RoPE, one q/k/v quantization,
    FFN residual in the GEMM epilogue) against the same W8A8 model run op by op, 2 blocks at a 480p grid."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(from_name("wan2.1-t2v-1.3b").dit, num_layers=2)
    model = _randomized(WanModel.from_config(cfg, attention="sdpa").cuda()).to_inference_dtype(torch.bfloat16)
    W8A8QuantHandler(model).convert_for_runtime()
    x = torch.randn(1, 16, 5, 60, 104, device="cuda")
    t = torch.tensor([700.0], device="cuda")
    context = torch.randn(1, 512, 4096, device="cuda")
    unfused = model.use_fused_norms(False)(x, t, context)
    fused = model.use_fused_norms(True)(x, t, context)
    assert torch.isfinite(fused).all()
    # Same math; bf16 roundings may flip where sums run in another order, and an activation block's int8 value
    # may then move one step: far below the W8A8 error itself (~1e-2).
    assert _rel(fused, unfused) < 5e-3, _rel(fused, unfused)
