"""The CUDA SageSLA kernel (csrc/sagesla_attn.cu) against an fp32 reference of the same quantized inputs.

Inputs are built in torch here (INT8 Q per token, smoothed INT8 K per block, FP8 V per channel, a random LUT that
sometimes keeps the ragged last block), so the kernel is checked apart from the Triton pre-pass. The error left
is the kernel's own: FP8 rounding of P and approximate exp2. Run: `python -m pytest tests/gpu/test_sagesla_cuda_gpu.py`.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.ops import sagesla_cuda, sla

pytestmark = pytest.mark.gpu

LOG2E = 1.4426950408889634


@pytest.fixture(autouse=True)
def _needs_the_kernel() -> None:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("needs a compute-capability-9.0 GPU")
    if sagesla_cuda._library() is None:
        pytest.fail("csrc/sagesla_attn.cu did not build")


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _inputs(seed: int, batch: int, seq: int, heads: int, n_sel: int | None, bq: int = 64) -> dict:
    """Quantized kernel inputs from bf16 q, k, v with a K channel bias, K and Q outlier channels."""
    dim, bk = 128, 128
    gen = torch.Generator(device="cuda").manual_seed(seed)
    bh, mq, nk = batch * heads, math.ceil(seq / bq), math.ceil(seq / bk)
    q = torch.randn(bh, seq, dim, generator=gen, device="cuda")
    q[..., :2] *= 4.0
    k_bias = 4.0 * torch.randn(dim, generator=gen, device="cuda")
    k_bias[5], k_bias[9] = 25.0, -25.0
    k = torch.randn(bh, seq, dim, generator=gen, device="cuda") + k_bias
    v = torch.randn(bh, seq, dim, generator=gen, device="cuda")
    v[..., 3] *= 8.0

    q_pad = F.pad(q * (LOG2E / math.sqrt(dim)), (0, 0, 0, mq * bq - seq))
    q_scale = q_pad.abs().amax(-1) / 127.0
    q8 = _round_half_away(q_pad / q_scale.clamp_min(1e-30)[..., None]).to(torch.int8)
    k_pad = F.pad(k - k.mean(1, keepdim=True), (0, 0, 0, nk * bk - seq)).view(bh, nk, bk, dim)
    k_scale = k_pad.abs().amax((-1, -2)) / 127.0
    k8 = _round_half_away(k_pad / k_scale[..., None, None]).to(torch.int8).view(bh, nk * bk, dim)
    v_scale = v.abs().amax(1) / 448.0  # [bh, D]
    v8 = F.pad(v / v_scale[:, None, :], (0, 0, 0, nk * bk - seq)).to(torch.float8_e4m3fn)  # [bh, L_pad, D]
    order = sagesla_cuda.fp8_operand_key_order().cuda()
    v8t = v8.view(bh, nk * bk // 32, 32, dim)[:, :, order].reshape(bh, nk * bk, dim).transpose(1, 2).contiguous()
    dense = n_sel is None
    n_sel = nk if dense else n_sel
    if dense:
        lut = torch.arange(nk, device="cuda").expand(bh, mq, nk)
    else:
        lut = torch.rand(bh, mq, nk, generator=gen, device="cuda").argsort(-1)[..., :n_sel].contiguous()
    return {"q8": q8.contiguous(), "q_scale": q_scale.contiguous(), "k8": k8.contiguous(),
            "k_scale": k_scale.contiguous(), "v8t": v8t, "v_scale": v_scale.contiguous(), "lut": lut, "n_sel": n_sel,
            "dense": dense, "v_deq": v8.float() * v_scale[:, None, :], "shape": (batch, seq, heads, dim), "bq": bq}


def _reference(x: dict) -> torch.Tensor:
    """fp32 softmax attention over the kept blocks on the dequantized inputs, [B, L, H, D]."""
    batch, seq, heads, dim = x["shape"]
    bh, nk = x["k_scale"].shape
    keys = torch.arange(nk * 128, device="cuda")
    out = torch.empty(bh, seq, dim, device="cuda")
    for i in range(bh):
        kept = torch.zeros(x["lut"].shape[1], nk, dtype=torch.bool, device="cuda")
        kept.scatter_(-1, x["lut"][i], True)
        k_deq = x["k8"][i].float() * x["k_scale"][i].repeat_interleave(128)[:, None]
        for start in range(0, seq, 4096):
            rows = torch.arange(start, min(seq, start + 4096), device="cuda")
            s = (x["q8"][i, rows].float() * x["q_scale"][i, rows, None]) @ k_deq.T  # log2 units
            allowed = kept[rows // x["bq"]].repeat_interleave(128, dim=1) & (keys < seq)[None, :]
            s = s.masked_fill(~allowed, float("-inf"))
            p = torch.exp2(s - s.amax(-1, keepdim=True))
            out[i, rows] = (p / p.sum(-1, keepdim=True)) @ x["v_deq"][i]
    return out.view(batch, heads, seq, dim).transpose(1, 2)


def _run(x: dict, out: torch.Tensor) -> torch.Tensor:
    return sagesla_cuda.sagesla_attention_cuda(
        x["q8"], x["q_scale"], x["k8"], x["k_scale"], x["v8t"], x["v_scale"], x["lut"], block_q=x["bq"],
        n_sel=x["n_sel"], dense=x["dense"], out=out)


def _cosine(x: torch.Tensor, ref: torch.Tensor) -> float:
    return F.cosine_similarity(x.double().flatten(), ref.double().flatten(), dim=0).item()


def _relative_l1(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return ((x - ref).abs().sum() / ref.abs().sum()).item()


@pytest.mark.parametrize("block_q", [64, 128])
@pytest.mark.parametrize(("batch", "seq", "heads", "n_sel"), [
    (2, 4000, 3, 5),    # ragged: L % 128 = 32, L % 64 = 32; 378 query blocks: several rounds per consumer
    (1, 4000, 3, 1),    # one kept block: Q is released right after the first Q·Kᵀ
    (1, 2000, 2, None),  # dense: the blocks in order, the ragged one last
    (1, 4096, 2, 7),    # no ragged block: the last step of every item runs unmasked
    (1, 32760, 12, 25),  # Wan 1.3B-480P at topk 0.1
])
def test_matches_fp32_reference_of_the_quantized_inputs(batch: int, seq: int, heads: int, n_sel: int | None,
                                                        block_q: int) -> None:
    x = _inputs(seq + heads, batch, seq, heads, n_sel, block_q)
    out = torch.full((batch, seq, heads, 128), float("nan"), dtype=torch.bfloat16, device="cuda")
    got = _run(x, out).float()
    ref = _reference(x)
    assert torch.isfinite(got).all()
    cos, rel = _cosine(got, ref), _relative_l1(got, ref)
    print(f"block_q {block_q} B{batch} L{seq} H{heads} n_sel {n_sel}: cos {cos:.6f} rel-L1 {rel:.4f}")
    assert cos >= 0.9995 and rel <= 0.03  # FP8 rounding of P alone gives rel-L1 0.023 at B2 L4000


@pytest.mark.parametrize("q_layout", ["fused_qkv", "unaligned_rows"])
@pytest.mark.parametrize("block_q", [64, 128])
def test_linear_branch_in_the_epilogue_and_output_strides(block_q: int, q_layout: str) -> None:
    batch, seq, heads, dim = 2, 1000, 2, 128
    x = _inputs(7, batch, seq, heads, 3, block_q)
    gen = torch.Generator(device="cuda").manual_seed(8)
    # the linear branch's own raw q, k, v (the kernel takes them apart from the quantized inputs), as strided
    # [B, L, H, D] views like the model's fused qkv layout, or with a token stride TMA cannot stream (4 elements
    # past a multiple of 8: the wrapper copies q)
    qkv = torch.randn(batch, seq, 3, heads, dim, generator=gen, device="cuda").bfloat16()
    q, k, v = qkv.unbind(2)
    if q_layout == "unaligned_rows":
        wide = torch.randn(batch, seq, heads * dim + 4, generator=gen, device="cuda").bfloat16()
        q = wide[..., :heads * dim].unflatten(-1, (heads, dim))
        assert q.stride(1) % 8 == 4
    weight = torch.randn(dim, dim, generator=gen, device="cuda") * 0.5 / math.sqrt(dim)
    bias = torch.randn(dim, generator=gen, device="cuda") * 0.1
    phi_q, phi_k = (torch.softmax(t.float(), dim=-1).transpose(1, 2).reshape(batch * heads, seq, dim) for t in (q, k))
    kv = phi_k.transpose(1, 2) @ v.float().transpose(1, 2).reshape(batch * heads, seq, dim)  # [B·H, D, D]
    kv_proj = kv @ weight.T
    scale = kv_proj.abs().amax((1, 2))
    kz = phi_k.sum(1)
    kv_proj_t = (kv_proj / scale[:, None, None]).half().transpose(1, 2).contiguous()
    branch = sagesla_cuda.LinearBranch(q, kv_proj_t, scale, kz, bias)
    # out as a [B, L, H, D] view of a wider buffer; its neighbours must stay untouched
    storage = torch.full((batch, seq, 3 * heads, dim), float("nan"), dtype=torch.bfloat16, device="cuda")
    out = storage[:, :, heads:2 * heads]
    got = sagesla_cuda.sagesla_attention_cuda(
        x["q8"], x["q_scale"], x["k8"], x["k_scale"], x["v8t"], x["v_scale"], x["lut"], block_q=block_q,
        n_sel=x["n_sel"], dense=x["dense"], out=out, linear=branch).float()
    linear = (phi_q @ kv_proj) / (phi_q @ kz[:, :, None] + 1e-5) + bias  # [B·H, L, D] fp32
    linear = linear.view(batch, heads, seq, dim).transpose(1, 2)
    ref = _reference(x) + linear
    assert torch.isfinite(got).all()
    assert _cosine(got, ref) >= 0.9995 and _relative_l1(got, ref) <= 0.03
    assert storage[:, :, :heads].isnan().all() and storage[:, :, 2 * heads:].isnan().all()
    # the branch alone, which is small beside the softmax part: the kernel's output minus its own output without
    # the branch (the softmax part is deterministic), within the bf16 rounding of the two outputs
    plain = sagesla_cuda.sagesla_attention_cuda(
        x["q8"], x["q_scale"], x["k8"], x["k_scale"], x["v8t"], x["v_scale"], x["lut"], block_q=block_q,
        n_sel=x["n_sel"], dense=x["dense"], out=torch.empty_like(out)).float()
    assert _cosine(got - plain, linear) >= 0.999


@pytest.mark.parametrize("block_q", [64, 128])
@pytest.mark.parametrize("shape", [(1, 32760, 12, 128), (2, 4000, 3, 128)])
def test_sagesla_backend_runs_the_kernel_and_matches_its_triton_path(shape: tuple[int, ...], block_q: int,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole sagesla call (pre-pass with permuted Vᵀ and the linear branch in out, then this kernel)."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    q, k, v = (torch.randn(shape, generator=gen, device="cuda") for _ in range(3))
    k = k + 4.0 * torch.randn(shape[-1], generator=gen, device="cuda")
    q, k, v = (t.bfloat16() for t in (q, k, v))
    torch.manual_seed(11)
    proj_l = torch.nn.Linear(128, 128).cuda()
    torch.nn.init.normal_(proj_l.weight, std=0.5 / math.sqrt(128))
    launches = []
    kernel = sagesla_cuda.sagesla_attention_cuda

    def counted_kernel(*args: object, **kwargs: object) -> torch.Tensor:
        launches.append(1)
        return kernel(*args, **kwargs)

    def call() -> torch.Tensor:
        return sla.sparse_linear_attention(q, k, v, topk=0.1, block_q=block_q, block_k=128, proj_l=proj_l,
                                           backend="sagesla")

    monkeypatch.setattr(sagesla_cuda, "sagesla_attention_cuda", counted_kernel)
    got = call()
    assert launches, "the CUDA kernel did not run"
    monkeypatch.setattr(sagesla_cuda, "ENABLED", False)
    triton_out = call()
    assert len(launches) == 1
    assert _cosine(got.float(), triton_out.float()) >= 0.9999
    assert _relative_l1(got.float(), triton_out.float()) <= 0.01
    if shape[1] <= 4000:
        ref = sla.sparse_linear_attention_reference(q, k, v, topk=0.1, block_q=block_q, block_k=128, proj_l=proj_l)
        assert _cosine(got.float(), ref) >= 0.999  # the sparse bar


def _statistics_reference(k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """fp32 key statistics of [B, L, H, D] k and v, each [B·H, ...]; kv_proj_t unnormalized."""
    batch, seq, heads, dim = k.shape
    k32, v32 = (t.float().transpose(1, 2).reshape(batch * heads, seq, dim) for t in (k, v))
    phi_k = torch.softmax(k32, dim=-1)
    kv_proj = (phi_k.transpose(1, 2) @ v32) @ weight.T  # [B·H, D_in, D_out]
    return {"k_mean": k32.mean(1), "v_scale": v32.abs().amax(1) / 448.0, "kz": phi_k.sum(1),
            "kv_proj_t": kv_proj.transpose(1, 2)}


def _key_statistics(k: torch.Tensor, v: torch.Tensor, proj_l: torch.nn.Linear | None) -> dict[str, torch.Tensor]:
    """`sagesla_cuda.key_statistics`, joined: its φ(K)ᵀV reduction runs on a second stream."""
    stats, ready = sagesla_cuda.key_statistics(k, v, proj_l)
    assert (ready is None) == (proj_l is None)
    if ready is not None:
        torch.cuda.current_stream().wait_event(ready)
    return stats


@pytest.mark.parametrize(("batch", "seq", "heads"), [(2, 1000, 3), (1, 64, 1), (1, 32760, 12)])
def test_key_statistics_match_fp32_reference(batch: int, seq: int, heads: int) -> None:
    """csrc/sagesla_stats.cu against fp32 torch: ragged tiles, B > 1, strided k/v views, a large K channel bias."""
    dim = 128
    gen = torch.Generator(device="cuda").manual_seed(seq)
    qkv = torch.randn(batch, seq, 3, heads, dim, generator=gen, device="cuda")
    qkv[:, :, 1] += 4.0 * torch.randn(dim, generator=gen, device="cuda")  # the bias smoothing removes
    qkv[:, :, 1, :, 7] += 20.0  # one dominant key channel: φ(k) is nearly one-hot there
    qkv[:, :, 2, :, 3] *= 8.0
    _, k, v = qkv.bfloat16().unbind(2)
    proj_l = torch.nn.Linear(dim, dim).cuda()
    assert sagesla_cuda.statistics_usable(k, v)
    ref = _statistics_reference(k, v, proj_l.weight.float())
    got = _key_statistics(k, v, proj_l)
    for name in ("k_mean", "v_scale", "kz"):
        torch.testing.assert_close(got[name], ref[name], rtol=2e-3, atol=1e-3 * ref[name].abs().max().item())
    kv_proj_t = got["kv_proj_t"].float() * got["kv_proj_scale"][:, None, None]
    scale = ref["kv_proj_t"].abs().amax((1, 2))
    torch.testing.assert_close(got["kv_proj_scale"], scale, rtol=1e-2, atol=0.0)
    # φ(K) goes to bf16 for the tensor cores (as in the Triton pass): about 2^-9 relative per term
    err = (kv_proj_t - ref["kv_proj_t"]).abs().amax((1, 2)) / scale
    assert err.max().item() <= 5e-3, err
    torch.testing.assert_close(got["proj_bias"], proj_l.bias.float())
    again = _key_statistics(k, v, proj_l)
    assert all(torch.equal(again[name], got[name]) for name in got), "the partial sums must be deterministic"
    without_linear = _key_statistics(k, v, None)
    assert sorted(without_linear) == ["k_mean", "v_scale"]
    assert all(torch.equal(without_linear[name], got[name]) for name in ("k_mean", "v_scale"))
