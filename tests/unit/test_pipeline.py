"""Pipeline on the tiny specs: T2V and I2V end to end, expert switching, progress, cancel, validation."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from engine.ops.int8_linear import Int8Linear
from engine.pipeline import GenerationCanceled, GenerationRequest, Pipeline, adaptive_resolution


@pytest.fixture(scope="module")
def t2v() -> Pipeline:
    return Pipeline.load("tiny-t2v")


@pytest.fixture(scope="module")
def i2v() -> Pipeline:
    return Pipeline.load("tiny-i2v")


def _image(width: int = 200, height: int = 120) -> Image.Image:
    rng = np.random.default_rng(3)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_t2v_generates_frames_with_stage_timings(t2v: Pipeline) -> None:
    events: list[tuple[str, int, int]] = []
    result = t2v.generate(GenerationRequest(prompt="a red fox in the snow", num_frames=9, steps=2, seed=7),
                          on_progress=lambda stage, step, total: events.append((stage, step, total)))
    assert result.frames.shape == (9, 96, 160, 3) and result.frames.dtype == np.uint8
    assert result.frames.std() > 1.0, "random weights must still give a non-constant video"
    assert (result.seed, result.steps, result.fps) == (7, 2, 16)
    assert set(result.timings) == {"text_encode", "denoise", "vae_decode"}
    assert events == [("text_encode", 0, 2), ("denoise", 0, 2), ("denoise", 1, 2), ("denoise", 2, 2),
                      ("vae_decode", 2, 2)]


def test_same_seed_same_video_and_random_seed_reported(t2v: Pipeline) -> None:
    request = GenerationRequest(prompt="waves", num_frames=5, steps=1, seed=11)
    first, second = t2v.generate(request), t2v.generate(request)
    assert np.array_equal(first.frames, second.frames)
    other = t2v.generate(GenerationRequest(prompt="waves", num_frames=5, steps=1, seed=12))
    assert not np.array_equal(first.frames, other.frames)
    unseeded = t2v.generate(GenerationRequest(prompt="waves", num_frames=5, steps=1))
    assert isinstance(unseeded.seed, int) and 0 <= unseeded.seed < 2**31


@pytest.mark.parametrize("steps, expected", [(1, [0]), (2, [0, 0]), (3, [0, 0, 1]), (4, [0, 0, 1, 1])])
def test_i2v_switches_expert_once_below_boundary(i2v: Pipeline, steps: int, expected: list[int]) -> None:
    """TurboDiffusion rule at sigma_max 200, boundary 0.9: s = 0.995, 0.934 (high), 0.853, 0.609 (low)."""
    calls: list[int] = []
    hooks = [expert.register_forward_hook(lambda module, args, out, i=i: calls.append(i))
             for i, expert in enumerate(i2v.experts)]
    try:
        i2v.generate(GenerationRequest(prompt="a cat", image=_image(), width=64, height=48, num_frames=5,
                                       steps=steps, seed=0))
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == expected


def test_i2v_condition_is_mask_then_image_latent(i2v: Pipeline) -> None:
    request = i2v.validate(GenerationRequest(prompt="x", image=_image(), width=64, height=48, num_frames=9))
    y = i2v._image_condition(request)
    assert y.shape == (1, 20, 3, 6, 8)  # mask 4 + latent 16, F' = 3, 48/8 × 64/8
    assert torch.equal(y[:, :4, 0], torch.ones_like(y[:, :4, 0]))
    assert not y[:, :4, 1:].any()
    # Latent frames 1.. encode black frames: identical to each other only through the causal cache, but
    # different from the image frame.
    assert not torch.allclose(y[:, 4:, 0], y[:, 4:, 1])


def test_i2v_condition_is_cached_per_image_size_and_frames(
    i2v: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    encodes: list[tuple[int, ...]] = []
    encode = i2v.vae.encode
    monkeypatch.setattr(i2v.vae, "encode",
                        lambda video, **kw: encodes.append(tuple(video.shape)) or encode(video, **kw))
    i2v.clear_image_cache()
    # At its own size the image is not resampled, so a one-step change of one value reaches the key.
    image = _image(64, 48)
    request = i2v.validate(GenerationRequest(prompt="x", image=image, width=64, height=48, num_frames=9))
    first = i2v._image_condition(request)
    assert len(encodes) == 1
    again = i2v._image_condition(replace(request, image=image.copy()))  # equal pixels, another object
    assert len(encodes) == 1 and torch.equal(again, first)
    pixels = np.asarray(_image(64, 48)).copy()
    pixels[0, 0, 0] ^= 1
    i2v._image_condition(replace(request, image=Image.fromarray(pixels)))
    i2v._image_condition(replace(request, num_frames=5))
    i2v._image_condition(replace(request, width=48, height=64))
    assert len(encodes) == 4
    # Uncached, the same pixels give the same condition: the cache returns what an encode would.
    i2v.clear_image_cache()
    assert torch.equal(i2v._image_condition(request), first) and len(encodes) == 5


def test_i2v_condition_cache_is_bounded_lru(monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = Pipeline.load("tiny-i2v", image_cache_size=2)
    encodes: list[int] = []
    encode = pipe.vae.encode
    monkeypatch.setattr(pipe.vae, "encode", lambda video, **kw: encodes.append(1) or encode(video, **kw))
    base = GenerationRequest(prompt="x", image=_image(), width=64, height=48)
    requests = [pipe.validate(replace(base, num_frames=n)) for n in (1, 5, 9)]
    for request in (requests[0], requests[1], requests[0], requests[2], requests[0], requests[1]):
        pipe._image_condition(request)
    # 0 and 1 encoded; 0 hit; 2 encoded, evicting 1 (least recent); 0 hit; 1 encoded again.
    assert len(encodes) == 4
    pipe.image_cache_size = 0  # off: every request encodes, nothing is kept
    pipe.clear_image_cache()
    pipe._image_condition(requests[0])
    pipe._image_condition(requests[0])
    assert len(encodes) == 6 and not pipe._image_conditions
    with pytest.raises(ValueError, match="image_cache_size must be >= 0"):
        Pipeline.load("tiny-i2v", image_cache_size=-1)


def test_i2v_adapts_resolution_to_the_image(i2v: Pipeline) -> None:
    request = i2v.validate(GenerationRequest(prompt="x", image=_image(300, 100)))
    assert request.width * request.height == pytest.approx(160 * 96, rel=0.2)
    assert request.width > 2 * request.height
    assert adaptive_resolution(1280, 720, 1000, 1000, 16) == (960, 960)


def test_cancel_stops_between_steps(t2v: Pipeline) -> None:
    steps_seen: list[int] = []

    def cancel_after_first_step() -> bool:
        return len(steps_seen) >= 1

    with pytest.raises(GenerationCanceled):
        t2v.generate(GenerationRequest(prompt="x", num_frames=5, steps=4, seed=0),
                     on_progress=lambda stage, step, total: steps_seen.append(step) if stage == "denoise" and step else None,
                     should_cancel=cancel_after_first_step)
    assert steps_seen == [1]


def test_cancel_stops_during_vae_decode(t2v: Pipeline) -> None:
    """A cancel (or a deadline, which the worker turns into one) that arrives while the VAE decodes stops the
    decode at the next chunk instead of after the whole video."""
    stages: list[str] = []
    with pytest.raises(GenerationCanceled):
        t2v.generate(GenerationRequest(prompt="x", num_frames=17, steps=1, seed=0),
                     on_progress=lambda stage, step, total: stages.append(stage),
                     should_cancel=lambda: stages[-1:] == ["vae_decode"])
    assert stages[-1] == "vae_decode"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"prompt": " "}, "prompt must be a non-empty string"),
        ({"num_frames": 10}, "num_frames 10 must be 4k\\+1"),
        ({"num_frames": 165}, "num_frames 165 exceeds the limit 161"),
        ({"steps": 5}, "steps 5 must be between 1 and 4"),
        ({"width": 100, "height": 96}, "width 100 must be a positive multiple of 16"),
        ({"width": 160}, "width and height must be given together"),
        ({"size": "1080p"}, "size '1080p' is not one of"),
        ({"aspect_ratio": "2:1"}, "aspect_ratio '2:1' is not one of"),
        ({"sigma_max": -1.0}, "sigma_max -1.0 must be a positive finite number"),
        ({"topk": 0.0}, "topk 0.0 must be in \\(0, 1\\]"),
        ({"image": _image()}, "image is not accepted: tiny-t2v is a text-to-video model"),
    ],
)
def test_validate_names_field_and_rule(t2v: Pipeline, fields: dict, message: str) -> None:
    request = GenerationRequest(prompt=fields.pop("prompt", "ok"), **fields)
    with pytest.raises(ValueError, match=message):
        t2v.validate(request)


def test_i2v_requires_image(i2v: Pipeline) -> None:
    with pytest.raises(ValueError, match="image is required"):
        i2v.validate(GenerationRequest(prompt="x"))


def test_real_models_need_a_checkpoint() -> None:
    with pytest.raises(ValueError, match="needs checkpoint_dir"):
        Pipeline.load("wan2.1-t2v-1.3b")
    with pytest.raises(KeyError, match="unknown model 'nope'; known models: wan2.1-t2v-1.3b"):
        Pipeline.load("nope")


def test_unipc_baseline_runs_with_cfg(t2v: Pipeline) -> None:
    result = t2v.generate(GenerationRequest(prompt="x", num_frames=5, steps=3, seed=0, sampler="unipc"))
    assert result.frames.shape == (5, 96, 160, 3) and result.steps == 3


def test_pipeline_runs_sparse_attention_backends_on_cpu() -> None:
    """The SLA backends (Triton kernels through the interpreter on CPU) plug into the whole pipeline: with proj_l
    zeroed and topk 1.0 they are dense attention, so the video equals SDPA's up to fp16 rounding; a nonzero
    proj_l (the linear branch) changes it."""
    pipe = Pipeline.load("tiny-t2v")
    request = GenerationRequest(prompt="x", width=64, height=48, num_frames=5, steps=1, seed=3)
    dense = pipe.generate(request).frames.astype(np.int16)
    projections = [block.self_attn.attn_op.local_attn.proj_l for block in pipe.experts[0].blocks]
    with torch.no_grad():
        for proj_l in projections:
            proj_l.weight.zero_()
            proj_l.bias.zero_()
    for backend in ("sla", "sagesla"):
        sparse = pipe.generate(replace(request, attention=backend, topk=1.0)).frames.astype(np.int16)
        # fp16 rounding (sla) or INT8 Q·K (sagesla) through 2 blocks and the VAE: measured 0.0003 / 0.004 levels.
        assert np.abs(sparse - dense).mean() < 0.05, backend
    with torch.no_grad():
        for proj_l in projections:
            proj_l.weight.copy_(torch.eye(proj_l.in_features))  # a strong linear branch
    with_linear = pipe.generate(replace(request, attention="sla", topk=1.0)).frames.astype(np.int16)
    assert np.abs(with_linear - dense).mean() > 0.2  # measured 0.46: 100× the kernels' own deviation
    with pytest.raises(ValueError, match="attention 'flash' is not one of"):
        pipe.validate(GenerationRequest(prompt="x", attention="flash"))


def test_pipeline_loads_a_turbowan_folder_with_proj_l(tmp_path, t2v: Pipeline) -> None:
    """Weights saved in TurboDiffusion's layout (net. prefix, 2-D patch weight, proj_l) load strictly and
    generate exactly what the same weights do in memory."""
    dit = {"net." + k: v for k, v in t2v.experts[0].state_dict().items()}
    dit["net.patch_embedding.weight"] = dit["net.patch_embedding.weight"].flatten(1)
    assert any(".self_attn.attn_op.local_attn.proj_l.weight" in k for k in dit)
    torch.save(dit, tmp_path / "TurboWan-tiny.pth")
    torch.save(t2v.vae.state_dict(), tmp_path / "Wan2.1_VAE.pth")
    torch.save(t2v.text_encoder.model.state_dict(), tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    loaded = Pipeline.load("tiny-t2v", tmp_path)
    assert loaded.experts[0].blocks[0].self_attn.attn_op is not None
    request = GenerationRequest(prompt="x", width=64, height=48, num_frames=5, steps=2, seed=5, attention="sla")
    assert np.array_equal(loaded.generate(request).frames, t2v.generate(request).frames)


def test_w8a8_pipeline_tracks_the_float_one(t2v: Pipeline) -> None:
    """W8A8 block-128 linears (torch path on CPU) swap in at load and stay close to the float model."""
    quantized = Pipeline.load("tiny-t2v", quant="w8a8")
    assert quantized.quant == "w8a8" and t2v.quant is None
    request = GenerationRequest(prompt="x", width=64, height=48, num_frames=5, steps=2, seed=5)
    a = quantized.generate(request).frames.astype(np.int16)
    b = t2v.generate(request).frames.astype(np.int16)
    # Same random weights, ~1 % weight/activation quantization error per linear through 2 blocks and 2 steps:
    # the uint8 videos stay within a few levels on average.
    assert np.abs(a - b).mean() < 6


def test_fp8_gemm_pipeline_tracks_the_float_one(t2v: Pipeline) -> None:
    """gemm='fp8' requantizes every W8A8 linear to e4m3 at load (on the CPU the torch FP8 reference runs)."""
    fp8 = Pipeline.load("tiny-t2v", quant="w8a8", gemm="fp8")
    assert fp8.gemm == "fp8" and all(m.gemm == "fp8" for m in fp8.experts[0].modules() if isinstance(m, Int8Linear))
    request = GenerationRequest(prompt="x", width=64, height=48, num_frames=5, steps=2, seed=5)
    a = fp8.generate(request).frames.astype(np.int16)
    b = t2v.generate(request).frames.astype(np.int16)
    assert np.abs(a - b).mean() < 1  # measured 0.08 levels (INT8: 0.02); e4m3 keeps 3 mantissa bits
    with pytest.raises(ValueError, match="runs the W8A8 linears"):
        Pipeline.load("tiny-t2v", quant=None, gemm="fp8")
    with pytest.raises(ValueError, match="gemm 'int4'"):
        Pipeline.load("tiny-t2v", quant="w8a8", gemm="int4")


def test_pipeline_loads_a_turbowan_quant_file(tmp_path, t2v: Pipeline) -> None:
    """A `-quant` file written by our quantizer loads with quant='auto' into Int8Linear modules and gives the
    video of the same weights quantized in memory."""
    from engine.quantize import QuantizationMetadata, quantize_state_dict, save_quantized_state_dict

    state = {"net." + k: v for k, v in quantize_state_dict(t2v.experts[0].state_dict()).items()}
    save_quantized_state_dict(state, tmp_path / "TurboWan-tiny-quant.pth", QuantizationMetadata())
    torch.save(t2v.vae.state_dict(), tmp_path / "Wan2.1_VAE.pth")
    torch.save(t2v.text_encoder.model.state_dict(), tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    loaded = Pipeline.load("tiny-t2v", tmp_path)
    assert loaded.quant == "w8a8"
    in_memory = Pipeline.load("tiny-t2v", quant="w8a8")
    request = GenerationRequest(prompt="x", width=64, height=48, num_frames=5, steps=2, seed=5)
    assert np.array_equal(loaded.generate(request).frames, in_memory.generate(request).frames)
    with pytest.raises(ValueError, match="holds W8A8 weights"):
        Pipeline.load("tiny-t2v", tmp_path, quant=None)
