"""WanModel against diffusers `WanTransformer3DModel` (an independent implementation) and official formulas.

Parity runs in fp32 on the same random weights: our state dict, renamed by the engine's own official →
diffusers map (`engine.checkpoint.dit_to_diffusers`, after diffusers `scripts/convert_wan_to_diffusers.py`,
reference wan.md §12.1), loads into diffusers with strict=True, and both models see the same batch (B = 2, different timesteps, 512 context rows of which many
are zero, inputs with outliers).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from diffusers import WanTransformer3DModel

from engine.checkpoint import dit_from_diffusers, dit_to_diffusers
from engine.configs import DiTConfig, from_name
from engine.models.dit import WanModel, apply_rope, rope_split, rope_tables

# Latent [F, H, W] of the tiny runs: 3 × 4 × 6 = 72 tokens, a different size on every axis.
LATENT_SIZE = (3, 8, 12)


def build_diffusers(cfg: DiTConfig) -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=cfg.patch_size,
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim,
        out_channels=cfg.out_dim,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=cfg.eps,
    )


@torch.no_grad()
def randomize(model: WanModel) -> WanModel:
    """Re-randomise every parameter (the official init zeroes head.head.weight and all biases)."""
    for name, param in model.named_parameters():
        if name.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight")):
            param.copy_(1 + 0.2 * torch.randn_like(param))  # norm gains: around 1, never a no-op
        elif param.dim() >= 2:
            param.copy_(torch.randn_like(param) / math.sqrt(param[0].numel()))  # unit-variance outputs
        else:
            param.copy_(0.2 * torch.randn_like(param))
    return model


def make_inputs(cfg: DiTConfig, batch: int = 2) -> dict[str, torch.Tensor]:
    """Inputs with outliers; context rows past each sample's prompt length are zero (the umT5 padding)."""
    x = torch.randn(batch, cfg.in_dim, *LATENT_SIZE)
    x.view(-1)[:: 97] *= 8.0  # sparse outliers
    context = torch.randn(batch, cfg.text_len, cfg.text_dim)
    context[0, 0, :4] = 20.0
    for b, prompt_len in enumerate((7, 300, 512, 1)[:batch]):
        context[b, prompt_len:] = 0
    t = torch.tensor([999.0, 12.5, 500.0, 0.0][:batch])
    return {"x": x, "t": t, "context": context}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


TINY_T2V = from_name("tiny-t2v").dit
PARITY_CONFIGS = {
    "t2v-head64": TINY_T2V,
    "t2v-head128": dataclasses.replace(TINY_T2V, num_heads=1),
    "i2v-36ch-head128": from_name("tiny-i2v").dit,
}


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
@torch.no_grad()
def test_dit_matches_diffusers_fp32(name: str) -> None:
    cfg = PARITY_CONFIGS[name]
    ours = randomize(WanModel.from_config(cfg)).eval()
    theirs = build_diffusers(cfg).eval()
    theirs.load_state_dict(dit_to_diffusers(ours.state_dict()), strict=True)

    inputs = make_inputs(cfg)
    x = inputs["x"]
    if cfg.in_dim > 16:  # I2V: ours takes the condition as y, diffusers the concatenated channels
        out = ours(x[:, :16], inputs["t"], inputs["context"], y=x[:, 16:])
    else:
        out = ours(x, inputs["t"], inputs["context"])
    ref = theirs(hidden_states=x, timestep=inputs["t"], encoder_hidden_states=inputs["context"],
                 return_dict=False)[0]

    assert out.shape == ref.shape == (2, cfg.out_dim, *LATENT_SIZE)
    assert out.dtype == torch.float32
    assert ref.abs().max() > 1.0  # a live output, not the head bias of an untrained model
    # Both fp32; the residual differences are fp32 sinusoid (diffusers) vs fp64 (ours, as official) and
    # summation order. The reference (wan.md §0) measured official vs diffusers at ~1e-5 relative.
    assert relative_error(out, ref) <= 1e-4


@pytest.mark.parametrize(
    ("name", "expected_tensors"),
    [("wan2.1-t2v-1.3b", 825), ("wan2.1-t2v-14b", 1095), ("wan2.2-i2v-a14b", 1095)],
)
def test_dit_full_size_keys_match_official_on_meta(name: str, expected_tensors: int) -> None:
    cfg = from_name(name).dit
    ours_state = WanModel.meta(cfg).state_dict()
    ours = {k: tuple(v.shape) for k, v in ours_state.items()}
    with torch.device("meta"):
        theirs_state = build_diffusers(cfg).state_dict()
    theirs = {k: tuple(v.shape) for k, v in theirs_state.items()}

    assert len(ours) == expected_tensors
    assert {k: tuple(v.shape) for k, v in dit_to_diffusers(ours_state).items()} == theirs
    # The loader's inverse map (diffusers `transformer/` folders) gives back exactly the official keys.
    assert {k: tuple(v.shape) for k, v in dit_from_diffusers(theirs_state).items()} == ours
    # Official table (wan.md §2.1), spelled out: a shape wrong in both codebases would pass the comparison.
    d, f = cfg.dim, cfg.ffn_dim
    assert ours["patch_embedding.weight"] == (d, cfg.in_dim, 1, 2, 2)
    assert ours["text_embedding.0.weight"] == (d, 4096)
    assert ours["time_embedding.0.weight"] == (d, 256)
    assert ours["time_projection.1.weight"] == (6 * d, d)
    assert ours["head.modulation"] == (1, 2, d)
    assert ours["head.head.weight"] == (64, d)
    assert ours[f"blocks.{cfg.num_layers - 1}.modulation"] == (1, 6, d)
    assert ours["blocks.0.ffn.0.weight"] == (f, d)
    assert ours["blocks.0.self_attn.norm_q.weight"] == (d,)
    assert ours["blocks.0.norm3.bias"] == (d,)


def test_dit_state_dict_excludes_rope_cache() -> None:
    model = WanModel.from_config(TINY_T2V)
    keys = set(model.state_dict())
    with torch.no_grad():
        model(**make_inputs(TINY_T2V))
    assert len(model._rope_cache) == 1
    assert set(model.state_dict()) == keys
    assert not any("rope" in k or "freqs" in k for k in keys)


@pytest.mark.parametrize(("head_dim", "split"), [(128, (44, 42, 42)), (64, (24, 20, 20)), (12, (4, 4, 4))])
def test_rope_split_sizes(head_dim: int, split: tuple[int, int, int]) -> None:
    assert rope_split(head_dim) == split


def official_rope_freqs(head_dim: int) -> torch.Tensor:
    """Official `rope_params` (complex128 polar table, 1024 positions) for the three axes, concatenated."""
    def rope_params(n: int) -> torch.Tensor:
        omega = 1.0 / torch.pow(10000, torch.arange(0, n, 2).to(torch.float64).div(n))
        angles = torch.outer(torch.arange(1024), omega)
        return torch.polar(torch.ones_like(angles), angles)

    return torch.cat([rope_params(n) for n in rope_split(head_dim)], dim=1)  # [1024, head_dim / 2]


def official_rope_apply(x: torch.Tensor, grid: tuple[int, int, int], freqs: torch.Tensor) -> torch.Tensor:
    """Official `rope_apply` for one sample without padding: complex128 math, fp32 result."""
    f, h, w = grid
    c = x.shape[-1] // 2
    parts = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    table = torch.cat([
        parts[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
        parts[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
        parts[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
    ], dim=-1).reshape(f * h * w, 1, -1)
    x_complex = torch.view_as_complex(x.to(torch.float64).unflatten(-1, (-1, 2)))
    return torch.view_as_real(x_complex * table).flatten(-2).float()


# Grids that reach position 1023 on each axis: an angle of ~1000 rad computed in fp32 would be off by ~6e-5,
# so these catch fp32 angle math.
@pytest.mark.parametrize("grid", [(1024, 2, 3), (3, 1024, 2), (2, 3, 1024), (3, 4, 5)])
@pytest.mark.parametrize("head_dim", [128, 64])
def test_rope_tables_match_official_fp64(grid: tuple[int, int, int], head_dim: int) -> None:
    freqs = official_rope_freqs(head_dim)
    cos, sin = rope_tables(grid, head_dim)
    assert cos.dtype == sin.dtype == torch.float32
    assert cos.shape == (math.prod(grid), 1, head_dim // 2)

    ones = torch.zeros(math.prod(grid), 1, head_dim)
    ones[..., 0::2] = 1  # the pair (1, 0) rotates to (cos, sin): read back the official table per token
    official = official_rope_apply(ones, grid, freqs).double()
    # fp32 rounding of values in [-1, 1] is ≤ 6e-8; 1e-6 leaves room but fails for fp32 angles (≥ 1e-5).
    torch.testing.assert_close(cos.double(), official[..., 0::2], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin.double(), official[..., 1::2], rtol=0, atol=1e-6)

    x = torch.randn(1, math.prod(grid), 2, head_dim) * 3
    ours = apply_rope(x, cos, sin)
    official_x = torch.stack(
        [official_rope_apply(x[0, :, h : h + 1], grid, freqs)[:, 0] for h in range(2)], dim=1
    )  # [L, H, Dh]
    # fp32 products of |x| ~ 10 values: a few ulp of 10 ≈ 1e-6.
    torch.testing.assert_close(ours[0], official_x, rtol=0, atol=5e-6)


def test_rope_tables_cached_per_grid_and_device() -> None:
    model = WanModel.from_config(TINY_T2V)
    first = model._rope((3, 4, 6), torch.device("cpu"))
    assert model._rope((3, 4, 6), torch.device("cpu")) is first  # built once, reused on every call
    assert model._rope((3, 4, 5), torch.device("cpu")) is not first
    for width in range(20):
        model._rope((1, 1, width + 1), torch.device("cpu"))
    assert len(model._rope_cache) <= 8  # bounded


@torch.no_grad()
def test_dit_batch_matches_single_samples() -> None:
    cfg = PARITY_CONFIGS["i2v-36ch-head128"]
    model = randomize(WanModel.from_config(cfg)).eval()
    inputs = make_inputs(cfg)
    x, t, context = inputs["x"], inputs["t"], inputs["context"]
    batched = model(x[:, :16], t, context, y=x[:, 16:])
    singles = torch.cat([model(x[b : b + 1, :16], t[b : b + 1], context[b : b + 1], y=x[b : b + 1, 16:])
                         for b in range(2)])
    # Same fp32 math per sample; only GEMM blocking may differ with the batch size.
    assert relative_error(batched, singles) <= 1e-5
    assert relative_error(batched[0], batched[1]) > 0.1  # the samples really differ (own t, own context)


@torch.no_grad()
def test_dit_bf16_inference_dtype_close_to_fp32() -> None:
    cfg = TINY_T2V
    reference = randomize(WanModel.from_config(cfg)).eval()
    model = copy.deepcopy(reference).to_inference_dtype(torch.bfloat16)

    matmul_params = {id(p) for m in model.matmul_modules() for p in m.parameters()}
    for name, param in model.named_parameters():
        expected = torch.bfloat16 if id(param) in matmul_params else torch.float32
        assert param.dtype == expected, name
    assert model.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert model.head.head.weight.dtype == torch.float32
    assert model.time_projection[1].weight.dtype == torch.float32
    assert model.blocks[0].norm3.weight.dtype == torch.float32
    assert model.blocks[0].modulation.dtype == torch.float32

    residual_dtypes = []
    for block in model.blocks:
        block.register_forward_hook(lambda _m, _i, out: residual_dtypes.append(out.dtype))
    inputs = make_inputs(cfg)
    out = model(**inputs)
    ref = reference(**inputs)

    assert out.dtype == torch.float32
    assert residual_dtypes == [torch.float32] * cfg.num_layers
    # bf16 matmuls (8-bit mantissa, ~4e-3 relative per rounding) through 2 blocks: ~1e-2 at most.
    assert relative_error(out, ref) <= 2e-2
    # The scheme is idempotent and reversible: back to fp32 the matmul weights are the bf16-rounded ones.
    assert model.to_inference_dtype(torch.float32).blocks[0].ffn[0].weight.dtype == torch.float32


def test_dit_rejects_bad_inputs() -> None:
    model = WanModel.from_config(TINY_T2V)
    inputs = make_inputs(TINY_T2V)
    with pytest.raises(ValueError, match="text_len"):
        model(inputs["x"], inputs["t"], inputs["context"][:, :100])
    with pytest.raises(ValueError, match=r"\[B\]"):
        model(inputs["x"], inputs["t"][:1], inputs["context"])
    with pytest.raises(ValueError, match="patch"):
        model(inputs["x"][..., :7], inputs["t"], inputs["context"])
    with pytest.raises(ValueError, match="attention backend"):
        WanModel.from_config(TINY_T2V, attention="flash")


@torch.no_grad()
def test_dit_fused_norms_match_plain_modules() -> None:
    """The Triton norm kernels (interpreted on CPU) inside the blocks give the plain modules' output; fp32
    throughout, so the only difference is summation order (≤ 1e-5 relative)."""
    torch.manual_seed(4)
    model = randomize(WanModel.from_config(TINY_T2V))
    inputs = make_inputs(TINY_T2V)
    plain = model(**inputs)
    fused = model.use_fused_norms(True)(**inputs)
    assert all(block.norm1.fused and block.self_attn.norm_q.fused for block in model.blocks)
    assert not model.head.norm.fused
    assert relative_error(fused, plain) < 1e-5


@torch.no_grad()
def test_dit_w8a8_fused_block_path_matches_op_by_op_for_a_batch() -> None:
    """Batch 2 with different timesteps (per-sample gates): the fused block path (residual updates inside the
    norm kernels, q/k RMSNorm+RoPE kernel, one q/k/v quantization, FFN residual in the GEMM epilogue), all
    Triton through the interpreter, against the same W8A8 bf16 model run op by op in torch."""
    from engine.ops.int8_linear import Int8Linear
    from engine.quantize import W8A8QuantHandler

    torch.manual_seed(5)
    model = randomize(WanModel.from_config(TINY_T2V)).to_inference_dtype(torch.bfloat16)
    W8A8QuantHandler(model).convert_for_runtime()
    inputs = make_inputs(TINY_T2V)
    int8_layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    plain = model(**inputs)  # CPU default: torch backend, plain norms
    for layer in int8_layers:
        layer.backend = "triton"
    fused = model.use_fused_norms(True)(**inputs)
    assert torch.isfinite(fused).all()
    # Rounding differences only: here the interpreter truncates bf16 casts where torch rounds (the Triton and torch
    # linears alone differ by 7e-3 on this model), so bf16 results drift apart by ~1e-2; a structural error (a
    # sample given another's gate, a dropped residual) is O(1). The GPU test bounds the real rounding at 5e-3.
    assert relative_error(fused, plain) < 2e-2, relative_error(fused, plain)
