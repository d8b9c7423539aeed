"""SLA / SageSLA Triton kernels against the fp32 torch reference (CPU: TRITON_INTERPRET=1, set by conftest).

Inputs are fp16: the Triton 3.9 interpreter multiplies bf16 tiles as their raw uint16 bits (`create_dot`), so
bf16 is covered by tests/gpu. The interpreter's float→fp8 cast also rounds wrongly at power-of-two carries,
so the CPU runs of "sagesla" use 16-bit P·V; its FP8 P·V is tested on the H100 (tests/gpu/test_sla_gpu.py).
Every buffer the kernels fill is poisoned first (NaN, or the largest integer) so an unwritten element shows.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.ops import sagesla_cuda, sla
from engine.ops.attention import attention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _poison_kernel_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    def poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        # NaN, or the largest integer (an unwritten LUT entry then indexes far out of range)
        fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).max
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(sla, "_empty", poisoned)


def _make_qkv(seed: int, batch: int, seq: int, heads: int, dim: int) -> tuple[torch.Tensor, ...]:
    """Random q, k, v [B, L, H, D] fp16 with the structure that breaks naive INT8 attention.

    K has a large channel bias shared by all tokens (what K smoothing removes) with two outlier channels;
    Q has two outlier channels (×4), which per-token Q scales confine to their own tokens.
    """
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, heads, dim, generator=gen)
    q[..., :2] *= 4.0
    k_bias = 4.0 * torch.randn(dim, generator=gen)
    k_bias[5], k_bias[9] = 25.0, -25.0
    k = torch.randn(batch, seq, heads, dim, generator=gen) + k_bias
    v = torch.randn(batch, seq, heads, dim, generator=gen)
    return tuple(t.half().to(DEVICE) for t in (q, k, v))


def _random_proj_l(seed: int, dim: int) -> torch.nn.Linear:
    """A trained-looking proj_l (the checkpoint's is nonzero; zero-init would hide the linear branch)."""
    torch.manual_seed(seed)
    proj = torch.nn.Linear(dim, dim)
    torch.nn.init.normal_(proj.weight, std=0.5 / math.sqrt(dim))
    return proj.to(DEVICE)


def _cosine(x: torch.Tensor, ref: torch.Tensor) -> float:
    return F.cosine_similarity(x.detach().double().flatten(), ref.detach().double().flatten(), dim=0).item()


def _relative_l1(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    return ((x - ref).abs().sum() / ref.abs().sum()).item()


# (seed, B, L, H, D, block_q, block_k): L never a multiple of a block; both head dims; both block geometries
SHAPES = [
    (1, 2, 250, 2, 64, 32, 32),
    (2, 2, 300, 1, 128, 64, 128),
    (3, 1, 231, 2, 128, 32, 64),
]


@pytest.mark.parametrize("seed,batch,seq,heads,dim,block_q,block_k", SHAPES)
@pytest.mark.parametrize("topk", [0.3, 0.6])
def test_sparse_block_map_equals_reference(seed: int, batch: int, seq: int, heads: int, dim: int, block_q: int,
                                           block_k: int, topk: float) -> None:
    q, k, _ = _make_qkv(seed, batch, seq, heads, dim)
    kept = sla.sparse_block_map(q, k, topk=topk, block_q=block_q, block_k=block_k)
    kept_ref = sla.block_map_reference(q, k, topk=topk, block_q=block_q, block_k=block_k)
    assert torch.equal(kept, kept_ref)
    n_kblocks = math.ceil(seq / block_k)
    assert (kept.sum(-1) == sla.kept_blocks(topk, n_kblocks)).all()


def test_kept_blocks_never_zero() -> None:
    # int(0.05 · 16) = 0: SLA would run zero blocks and return 0/0 = NaN
    assert sla.kept_blocks(0.05, 16) == 1
    assert sla.kept_blocks(1.0, 16) == 16
    q, k, v = _make_qkv(4, 1, 200, 1, 64)
    out = sla.sparse_linear_attention(q, k, v, topk=0.01, block_q=32, block_k=32, backend="sagesla", fp8_pv=False)
    assert not out.isnan().any()


@pytest.mark.parametrize("seed,batch,seq,heads,dim,block_q,block_k", SHAPES)
def test_sagesla_dense_matches_exact_attention(seed: int, batch: int, seq: int, heads: int, dim: int,
                                                block_q: int, block_k: int) -> None:
    q, k, v = _make_qkv(seed + 10, batch, seq, heads, dim)
    out = sla.sparse_linear_attention(q, k, v, topk=1.0, block_q=block_q, block_k=block_k, backend="sagesla",
                                      fp8_pv=False)
    exact = F.scaled_dot_product_attention(*(t.double().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    # issue bars for dense SageAttention (INT8 Q·K): what per-block INT8 with smoothed K reaches on such data
    assert _cosine(out, exact) >= 0.9995
    assert _relative_l1(out, exact) <= 0.02


@pytest.mark.parametrize("seed,batch,seq,heads,dim,block_q,block_k", SHAPES)
def test_sagesla_sparse_matches_reference(seed: int, batch: int, seq: int, heads: int, dim: int, block_q: int,
                                          block_k: int) -> None:
    q, k, v = _make_qkv(seed + 20, batch, seq, heads, dim)
    proj_l = _random_proj_l(seed, dim)
    out = sla.sparse_linear_attention(q, k, v, topk=0.3, block_q=block_q, block_k=block_k, proj_l=proj_l,
                                      backend="sagesla", fp8_pv=False)
    ref = sla.sparse_linear_attention_reference(q, k, v, topk=0.3, block_q=block_q, block_k=block_k, proj_l=proj_l)
    assert out.dtype == q.dtype
    # issue bar: sparse sagesla vs the fp32 reference of the same sparse semantics (INT8 Q·K error)
    assert _cosine(out, ref) >= 0.999


@pytest.mark.parametrize("seed,batch,seq,heads,dim,block_q,block_k", SHAPES)
def test_sla_forward_matches_reference(seed: int, batch: int, seq: int, heads: int, dim: int, block_q: int,
                                       block_k: int) -> None:
    q, k, v = _make_qkv(seed + 30, batch, seq, heads, dim)
    proj_l = _random_proj_l(seed, dim)
    out = sla.sparse_linear_attention(q, k, v, topk=0.3, block_q=block_q, block_k=block_k, proj_l=proj_l,
                                      backend="sla")
    ref = sla.sparse_linear_attention_reference(q, k, v, topk=0.3, block_q=block_q, block_k=block_k, proj_l=proj_l)
    # issue bar: 16-bit operands with fp32 accumulation, output rounded to fp16
    assert _relative_l1(out, ref) <= 0.01


@pytest.mark.parametrize("seed,batch,seq,heads,dim,block_q,block_k", SHAPES[:2])
def test_sla_backward_matches_reference_autograd(seed: int, batch: int, seq: int, heads: int, dim: int,
                                                 block_q: int, block_k: int) -> None:
    q, k, v = (t.requires_grad_() for t in _make_qkv(seed + 40, batch, seq, heads, dim))
    proj_l = _random_proj_l(seed, dim)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed)).half().to(DEVICE)
    out = sla.sparse_linear_attention(q, k, v, topk=0.3, block_q=block_q, block_k=block_k, proj_l=proj_l,
                                      backend="sla")
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = sla.sparse_linear_attention_reference(*leaves, topk=0.3, block_q=block_q, block_k=block_k,
                                                proj_l=proj_l)
    grads_ref = torch.autograd.grad(ref, leaves, grad_out.float())
    for name, grad, grad_ref in zip("qkv", grads, grads_ref):
        assert not grad.isnan().any(), name
        # issue bar: 16-bit recomputation of P and dS against fp32 autograd, as a norm ratio
        relative = ((grad.double() - grad_ref.double()).norm() / grad_ref.double().norm()).item()
        assert relative <= 2e-2, (name, relative)


@pytest.mark.parametrize("backend", ["sla", "sagesla"])
def test_attention_dispatches_sparse_backends(backend: str) -> None:
    q, k, v = _make_qkv(50, 1, 200, 2, 64)
    proj_l = _random_proj_l(5, 64)
    block_q, block_k = sla.default_block_sizes(q.device)
    out = attention(q, k, v, backend=backend, topk=0.5, proj_l=proj_l)
    ref = sla.sparse_linear_attention_reference(q, k, v, topk=0.5, block_q=block_q, block_k=block_k, proj_l=proj_l)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _cosine(out, ref) >= 0.999  # same bar as the sparse kernel tests: the dispatch adds no error


def test_attention_rejects_cross_attention_on_sparse_backend() -> None:
    q, _, _ = _make_qkv(51, 1, 64, 2, 64)
    k, _, v = _make_qkv(52, 1, 96, 2, 64)
    with pytest.raises(ValueError, match="self-attention"):
        attention(q, k, v, backend="sagesla")
    with pytest.raises(ValueError, match="not one of"):
        attention(q, q, q, backend="flash")


def test_sparse_linear_attention_rejects_bad_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = _make_qkv(53, 1, 64, 1, 64)
    with pytest.raises(ValueError, match="head dim"):
        sla.sparse_linear_attention(q[..., :32], k[..., :32], v[..., :32], topk=0.5)
    with pytest.raises(ValueError, match="topk"):
        sla.sparse_linear_attention(q, k, v, topk=0.0)
    with pytest.raises(ValueError, match="power of two"):
        sla.sparse_linear_attention(q, k, v, topk=0.5, block_q=48)
    if not q.is_cuda:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ValueError, match="CUDA"):
            sla.sparse_linear_attention(q, k, v, topk=0.5, backend="sla")


def _permuted_v_source_tokens(padded_keys: int) -> torch.Tensor:
    """The token each column of the permute_v layout holds, in the order the CUDA kernel's FP8 operand reads."""
    column = torch.arange(padded_keys)
    return column - column % 32 + sagesla_cuda.fp8_operand_key_order()[column % 32]


# the Wan-like geometries plus block_k 16, where L_pad (208) is not a multiple of 32
@pytest.mark.parametrize("seed,batch,seq,heads,dim,block_q,block_k", [*SHAPES, (4, 1, 200, 2, 64, 16, 16)])
def test_prepare_permute_v_permutes_tokens_in_groups_of_32(seed: int, batch: int, seq: int, heads: int, dim: int,
                                                           block_q: int, block_k: int) -> None:
    q, k, v = _make_qkv(seed + 60, batch, seq, heads, dim)
    args = {"topk": 0.3, "block_q": block_q, "block_k": block_k, "quantize": True, "fp8_pv": True, "linear": False}
    # against the same kernel's unpermuted output, not a torch fp8 cast: the interpreter's cast drops carries
    plain = sla._prepare(q, k, v, **args).extra["v8t"].view(torch.uint8)  # [B·H, D, L_pad]
    permuted = sla._prepare(q, k, v, permute_v=True, **args).extra["v8t"].view(torch.uint8)
    assert not torch.equal(permuted, plain)
    assert torch.equal(permuted, plain[..., _permuted_v_source_tokens(plain.shape[-1]).to(plain.device)])


# 600, 1023: the two-bit select (1023: the largest count its 10-bit fields hold); 1100: one bit again
@pytest.mark.parametrize("n_kblocks,n_sel",
                         [(7, 2), (16, 5), (37, 4), (300, 30), (600, 60), (1023, 1000), (1100, 110)])
def test_block_topk_selects_torch_topk_in_ascending_order(n_kblocks: int, n_sel: int) -> None:
    gen = torch.Generator().manual_seed(n_kblocks)
    q_pool = torch.randn(3, 21, 64, generator=gen).to(DEVICE)
    k_pool = torch.randn(3, n_kblocks, 64, generator=gen).to(DEVICE)
    lut = sla._block_topk(q_pool, k_pool, n_sel)
    expected = torch.bmm(q_pool, k_pool.transpose(1, 2)).topk(n_sel, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(lut, expected)


def test_block_topk_breaks_ties_by_lower_block_id() -> None:
    gen = torch.Generator().manual_seed(80)
    # every score 0: the first n_sel blocks
    lut = sla._block_topk(torch.zeros(1, 4, 64, device=DEVICE), torch.randn(1, 10, 64, generator=gen).to(DEVICE), 3)
    assert torch.equal(lut, torch.arange(3, device=DEVICE).expand(1, 4, 3))
    # key blocks in equal pairs (2g, 2g + 1): keeping 3 takes the best pair and the lower block of the second best
    q_pool = torch.randn(1, 5, 64, generator=gen).to(DEVICE)
    k_groups = torch.randn(1, 6, 64, generator=gen).to(DEVICE)
    lut = sla._block_topk(q_pool, k_groups.repeat_interleave(2, dim=1), 3)
    best, second = (q_pool @ k_groups.transpose(1, 2)).topk(2, dim=-1).indices.unbind(-1)  # [1, 5] each
    expected = torch.stack([2 * best, 2 * best + 1, 2 * second], dim=-1).sort(dim=-1).values
    assert torch.equal(lut, expected)


def test_key_statistics_transposed_is_the_cuda_kernels_layout() -> None:
    """The Triton statistics' fallback for the CUDA route stores ((φ(K)ᵀV)·Wᵀ)ᵀ: the same numbers, transposed."""
    _, k, v = _make_qkv(82, 2, 100, 2, 128)
    proj_l = _random_proj_l(9, 128)
    plain = sla._key_statistics(k, v, fp8_pv=True, linear=True, proj_l=proj_l)
    transposed = sla._key_statistics(k, v, fp8_pv=True, linear=True, proj_l=proj_l, transposed=True)
    assert "kv_proj" not in transposed and "kv_proj_t" not in plain
    assert torch.equal(transposed["kv_proj_t"], plain["kv_proj"].transpose(1, 2))
    assert torch.equal(transposed["kv_proj_scale"], plain["kv_proj_scale"])


def test_prepare_rejects_inconsistent_options() -> None:
    q, k, v = _make_qkv(81, 1, 64, 1, 64)
    proj_l = _random_proj_l(8, 64)
    args = {"topk": 0.5, "block_q": 32, "block_k": 32, "quantize": True}
    with pytest.raises(ValueError, match="fp8_pv=True"):
        sla._prepare(q, k, v, fp8_pv=False, linear=False, permute_v=True, **args)
    with pytest.raises(ValueError, match="linear=True"):
        sla._prepare(q, k, v, fp8_pv=False, linear=False, proj_l=proj_l, **args)


@pytest.mark.parametrize("sms", [1, 132])
@pytest.mark.parametrize("batch_heads", [1, 3, 12, 40, 300])
@pytest.mark.parametrize("seq", [1, 63, 64, 1000, 32760, 75600])
def test_statistics_grid_meets_the_kernel_contract(seq: int, batch_heads: int, sms: int) -> None:
    """csrc/sagesla_stats.cu's launch: every chunk has a tile, the tiles are covered, one wave, a balanced tree."""
    tiles_per_chunk, chunks, group_size, groups = sagesla_cuda.statistics_grid(seq, batch_heads, sms)
    n_tiles = math.ceil(seq / sagesla_cuda.STATS_TILE)
    assert (chunks - 1) * tiles_per_chunk < n_tiles <= chunks * tiles_per_chunk
    assert chunks * batch_heads <= max(batch_heads, sagesla_cuda.STATS_CTAS_PER_SM * sms)
    assert (groups - 1) * group_size < chunks <= groups * group_size
    assert group_size <= math.isqrt(chunks) + 1 and groups <= math.isqrt(chunks) + 1


def test_statistics_grid_at_wan_shapes() -> None:
    """1.3B: 22 chunks of 24 tiles per head in 5 groups; 14B: 6 chunks per head (240 CTAs on 132 SMs, not 280)."""
    assert sagesla_cuda.statistics_grid(32760, 12, 132) == (24, 22, 5, 5)
    assert sagesla_cuda.statistics_grid(75600, 40, 132) == (197, 6, 3, 2)
