"""Sparse-linear attention (SLA) and its quantized form SageSLA, as Triton kernels with a torch reference.

Algorithm (TurboDiffusion's `turbodiffusion/SLA`, identical to thu-ml/SLA `main`; arXiv 2509.24006), for
q, k, v of shape [B, L, H, D] (self-attention, one L), D in {64, 128}, softmax scale 1/sqrt(D):

1. Block map (`utils.py: get_block_map`). K is smoothed by its token mean km[b, h, :]; q is mean-pooled over
   blocks of `block_q` tokens and the smoothed k over blocks of `block_k` tokens (a ragged last block is
   averaged over its real tokens); score = pooled_q @ pooled_kᵀ (no scale, no softmax: the ranking is all that
   matters). Every query block keeps its `max(1, int(topk · Nk))` best key blocks (Nk = ceil(L / block_k));
   the original has no lower clamp and gives 0/0 = NaN when the count rounds to 0.
2. Sparse branch: softmax attention of each query block over the keys of its kept blocks only. Keys past L are
   never counted (masked to -inf; sageattention 1.0.6 on PyPI forgot this, see docs/notes/attention.md).
3. Linear branch over all keys, φ = softmax over the head dim applied to raw q and raw k:
   o_l = φ(Q) (φ(K)ᵀ V) / (φ(Q) · Σ_t φ(K_t) + 1e-5).
4. out = o_s + proj_l(o_l), proj_l = Linear(D, D) with fp32 weights from the checkpoint, shared by the heads.
   proj_l is zero-initialised in training, so an absent proj_l skips the linear branch exactly.

Backends of `sparse_linear_attention`:
- "torch": `sparse_linear_attention_reference`, fp32, the definition the kernels are tested against.
- "sla": Triton, q·k and p·v in the input's 16-bit dtype with fp32 accumulation; forward and backward
  (`torch.autograd.Function`), so it can be fine-tuned. The linear branch stays in torch (autograd).
- "sagesla" (forward only, SageAttention2 + SpargeAttn's recipe, arXiv 2411.10958): K smoothed, Q and K
  quantized to INT8 with one scale per block (Q's scale folds in the softmax scale · log2(e), so the kernel
  uses exp2 on the dequantized score), P·V in FP8 e4m3 (P shifted by log2(448) into [0, 448], V scaled per
  channel by absmax/448, two-level accumulation: one fresh accumulator per key block added into fp32) or in
  the 16-bit input dtype (`fp8_pv=False`; GPUs without FP8). The linear branch and proj_l run in the kernel
  epilogue; its key-side sums φ(K)ᵀV and Σφ(K) come out of the same pass that takes the K mean and V absmax.

Pipeline of the Triton backends (tensor layouts):
  _kv_stats_kernel         k, v [B, L, H, D] -> per-chunk partial Σk, max|v|, φ(K)ᵀV, Σφ(K)   (one read of k, v)
  _kv_stats_finish_kernel  partials -> k mean, v scale, Σφ(K) [B·H, D], φ(K)ᵀV or (φ(K)ᵀV)·proj_lᵀ [B·H, D, D]
  _kv_proj_normalize_kernel  (with proj_l) (φ(K)ᵀV)·proj_lᵀ -> fp16 over its absmax [B·H]
  _prepare_kernel          one launch, one program per query block and per key block:
                           q -> pooled q [B·H, Mq, D] fp32 (+ int8 q [B·H, Mq·block_q, D], scale [B·H, Mq·block_q])
                           k, v -> pooled smoothed k [B·H, Nk, D] (+ int8 k, scale [B·H, Nk], fp8 vᵀ [B·H, D, L_pad])
  _block_topk_kernel       pooled q · pooled kᵀ and the exact top-k -> LUT [B·H, Mq, n_sel], ascending key-block ids
  _sagesla_fwd_kernel / _sla_fwd_kernel   one program per (query block, b·h), loops over its LUT entries
On an sm90 GPU (head dim 128, FP8 P·V, key blocks of 128) sagesla's attention runs in the CUDA kernel
csrc/sagesla_attn.cu instead (engine/ops/sagesla_cuda.py; `TDSERVE_CUDA_ATTENTION=0` keeps Triton): the pre-pass
then stores Vᵀ in that kernel's token order, and the kernel computes the linear branch in its epilogue.
"""

from __future__ import annotations

import math
import os
from typing import Literal

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from engine.ops import sagesla_cuda

Backend = Literal["torch", "sla", "sagesla"]
BACKENDS: tuple[str, ...] = ("torch", "sla", "sagesla")
HEAD_DIMS: tuple[int, ...] = (64, 128)
LOG2E = 1.4426950408889634  # exp(x) = exp2(x · log2 e): the kernels use exp2 (Triton tutorial 06)
FP8_E4M3_MAX = 448.0  # largest finite float8 e4m3fn
_FP8_E4M3_MAX = tl.constexpr(FP8_E4M3_MAX)  # the same, readable inside @triton.jit code
# p = exp2(s - m + log2 448) puts the row maximum of P at 448, the top of e4m3 (SageAttention2
# `update_mdo(..., exp_offset)` uses 8.807, slightly under log2 448 = 8.8074, so exp2 never exceeds 448).
FP8_P_SHIFT = 8.807
LINEAR_EPS = 1e-5  # denominator guard of the linear branch (SLA `calc_linear`)
_LINEAR_EPS = tl.constexpr(LINEAR_EPS)  # the same, readable inside @triton.jit code


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel fills goes through here (tests swap it for a poisoning allocator)."""
    return torch.empty(shape, dtype=dtype, device=device)


def kept_blocks(topk: float, n_key_blocks: int) -> int:
    """Key blocks kept per query block: int(topk · Nk) as in SLA, clamped to [1, Nk] (0 would give NaN)."""
    return max(1, min(n_key_blocks, int(topk * n_key_blocks)))


def default_block_sizes(device: torch.device, backend: Backend = "sagesla") -> tuple[int, int]:
    """(block_q, block_k) of the map. Elsewhere than sm90: 128×64, SLA's inference shape.

    sm90: SageSLA's wgmma CTA is 64×128 there, and "sla" keeps that; "sagesla" takes 128×128, where the CUDA
    kernel's two warpgroups share one K/V stream: on the H100 its kernel time at Wan 1.3B, topk 0.1, fell from
    0.93 to 0.83 ms (docs/notes/attention.md). The query side stays TurboDiffusion's 128 of other GPUs.
    """
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        return (128, 128) if backend == "sagesla" else (64, 128)
    return 128, 64


# ----------------------------------------------------------------------------------------------------------
# Reference (fp32 torch): the definition.
# ----------------------------------------------------------------------------------------------------------


def _mean_pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, H, L, D] -> [B, H, ceil(L / block), D]: mean over each block's real tokens."""
    batch, heads, seq, dim = x.shape
    n_blocks = triton.cdiv(seq, block)
    padded = F.pad(x, (0, 0, 0, n_blocks * block - seq))
    sums = padded.view(batch, heads, n_blocks, block, dim).sum(3)  # [B, H, N, D]
    counts = torch.full((n_blocks,), float(block), device=x.device)
    counts[-1] = seq - (n_blocks - 1) * block
    return sums / counts[:, None]


def block_map_reference(q: torch.Tensor, k: torch.Tensor, *, topk: float, block_q: int,
                        block_k: int) -> torch.Tensor:
    """SLA's block selection. q, k [B, L, H, D] -> bool [B, H, Mq, Nk], True = key block kept."""
    q32 = q.float().transpose(1, 2)  # [B, H, L, D]
    k32 = k.float().transpose(1, 2)
    k_smooth = k32 - k32.mean(dim=2, keepdim=True)
    score = _mean_pool(q32, block_q) @ _mean_pool(k_smooth, block_k).transpose(-1, -2)  # [B, H, Mq, Nk]
    n_sel = kept_blocks(topk, score.shape[-1])
    kept = torch.zeros_like(score, dtype=torch.bool)
    return kept.scatter_(-1, score.topk(n_sel, dim=-1).indices, True)


def _feature_map(x: torch.Tensor) -> torch.Tensor:
    """φ of SLA's linear branch: softmax over the head dim."""
    return torch.softmax(x, dim=-1)


def linear_branch_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """φ(Q)(φ(K)ᵀV) / (φ(Q)·Σφ(K) + 1e-5) over all keys, fp32. [B, L, H, D] in, [B, L, H, D] fp32 out."""
    phi_q, phi_k = _feature_map(q.float()), _feature_map(k.float())
    kv = torch.einsum("blhd,blhe->bhde", phi_k, v.float())  # [B, H, D, D]
    k_sum = phi_k.sum(dim=1)  # [B, H, D]
    numerator = torch.einsum("blhd,bhde->blhe", phi_q, kv)
    denominator = torch.einsum("blhd,bhd->blh", phi_q, k_sum)[..., None] + LINEAR_EPS
    return numerator / denominator


def sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kept: torch.Tensor,
                               *, block_q: int, block_k: int) -> torch.Tensor:
    """Softmax attention restricted to the kept blocks of `kept` [B, H, Mq, Nk]; fp32 [B, L, H, D] out.

    Runs over chunks of query blocks so full Wan shapes fit in memory (no L × L matrix at once).
    """
    q32, k32, v32 = (t.float().transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    seq, dim = q32.shape[2], q32.shape[3]
    key_block_of_token = torch.arange(seq, device=q.device) // block_k
    out = torch.empty_like(q32)
    blocks_per_chunk = max(1, 2048 // block_q)
    for first_block in range(0, kept.shape[2], blocks_per_chunk):
        rows = slice(first_block * block_q, min(seq, (first_block + blocks_per_chunk) * block_q))
        scores = q32[:, :, rows] @ k32.transpose(-1, -2) / math.sqrt(dim)  # [B, H, rows, L]
        query_block_of_row = torch.arange(rows.start, rows.stop, device=q.device) // block_q
        token_kept = kept[:, :, query_block_of_row][..., key_block_of_token]  # [B, H, rows, L]
        scores = scores.masked_fill(~token_kept, float("-inf"))
        out[:, :, rows] = torch.softmax(scores, dim=-1) @ v32
    return out.transpose(1, 2)


def sparse_linear_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, topk: float,
                                      block_q: int, block_k: int,
                                      proj_l: torch.nn.Linear | None = None) -> torch.Tensor:
    """SLA forward in fp32: block map, sparse softmax branch, linear branch through proj_l. [B, L, H, D]."""
    kept = block_map_reference(q, k, topk=topk, block_q=block_q, block_k=block_k)
    out = sparse_attention_reference(q, k, v, kept, block_q=block_q, block_k=block_k)
    if proj_l is not None:
        out = out + F.linear(linear_branch_reference(q, k, v), proj_l.weight.float(), proj_l.bias.float())
    return out


# ----------------------------------------------------------------------------------------------------------
# Triton kernels: the pre-pass (statistics, pooling, quantization, block top-k).
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _kv_stats_kernel(
    # pointers: inputs [B, L, H, D]; partial outputs per (b·h, chunk)
    K, V, KSumPart, VMaxPart, KVPart, KZPart,
    # sizes
    L, H, BLOCKS_PER_CHUNK,
    # strides of k and v in elements (batch, token, head; the head dim is contiguous)
    stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
    # meta-parameters
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, V_ABSMAX: tl.constexpr, LINEAR: tl.constexpr,
):
    """Partial Σk, max|v|, φ(K)ᵀV, Σφ(K) of one chunk of BLOCKS_PER_CHUNK key blocks, one (b, h).

    Partials (not atomics) keep the sums deterministic, so the block map does not change between runs.
    """
    pid_chunk = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    n_chunks = tl.num_programs(0)
    batch, head = pid_bh // H, pid_bh % H
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_base = K + batch * stride_kb + head * stride_kh
    v_base = V + batch * stride_vb + head * stride_vh
    k_sum = tl.zeros([HEAD_DIM], dtype=tl.float32)
    v_max = tl.zeros([HEAD_DIM], dtype=tl.float32)
    kv = tl.zeros([HEAD_DIM, HEAD_DIM], dtype=tl.float32)
    k_feature_sum = tl.zeros([HEAD_DIM], dtype=tl.float32)
    first_block = pid_chunk * BLOCKS_PER_CHUNK
    for block in range(first_block, first_block + BLOCKS_PER_CHUNK):
        rows = block * BLOCK_N + offs_n
        valid = rows < L
        rows64 = rows.to(tl.int64)
        # kᵀ [D, BLOCK_N]: φ(K)ᵀ is then the left operand of φ(K)ᵀV with no transpose in registers
        k_t = tl.load(k_base + rows64[None, :] * stride_kl + offs_d[:, None], mask=valid[None, :], other=0.0)
        k_t = k_t.to(tl.float32)
        k_sum += tl.sum(k_t, axis=1)
        if V_ABSMAX or LINEAR:
            v_raw = tl.load(v_base + rows64[:, None] * stride_vl + offs_d[None, :], mask=valid[:, None],
                            other=0.0)
            if V_ABSMAX:
                v_max = tl.maximum(v_max, tl.max(tl.abs(v_raw.to(tl.float32)), axis=0))
            if LINEAR:
                k_exp = tl.exp(k_t - tl.max(k_t, axis=0)[None, :])
                # one reciprocal per token instead of D divisions
                phi_k_t = k_exp * (1.0 / tl.sum(k_exp, axis=0))[None, :]
                phi_k_t = tl.where(valid[None, :], phi_k_t, 0.0)  # padded tokens are no keys
                k_feature_sum += tl.sum(phi_k_t, axis=1)
                kv = tl.dot(phi_k_t.to(v_raw.dtype), v_raw, kv)  # [D, D] += φ(K)ᵀ V
    part = pid_bh * n_chunks + pid_chunk
    tl.store(KSumPart + part * HEAD_DIM + offs_d, k_sum)
    if V_ABSMAX:
        tl.store(VMaxPart + part * HEAD_DIM + offs_d, v_max)
    if LINEAR:
        tl.store(KZPart + part * HEAD_DIM + offs_d, k_feature_sum)
        tl.store(KVPart + part * HEAD_DIM * HEAD_DIM + offs_d[:, None] * HEAD_DIM + offs_d[None, :], kv)


@triton.jit
def _kv_stats_finish_kernel(
    # pointers: partials of _kv_stats_kernel [B·H, N_CHUNKS, D] (φ(K)ᵀV: [B·H, N_CHUNKS, D, D]); outputs k mean,
    # v scale (absmax / 448), Σφ(K) [B·H, D]; φ(K)ᵀV [B·H, D, D] fp32 (LINEAR, not FOLD); proj_l weight W [D, D]
    # fp32, (φ(K)ᵀV)·Wᵀ [B·H, D, D] fp32 and its absmax per tile of ROWS rows [B·H, D / ROWS] (FOLD)
    KSumPart, VMaxPart, KVPart, KZPart, KMean, VScale, KZ, KV, ProjWeight, KVProj, KVProjTileMax,
    # sizes
    L, N_CHUNKS,
    # meta-parameters
    ROWS: tl.constexpr, CHUNK_STEP: tl.constexpr, HEAD_DIM: tl.constexpr, V_ABSMAX: tl.constexpr,
    LINEAR: tl.constexpr, FOLD: tl.constexpr,
):
    """Sum the partials of ROWS head-dim channels of one (b, h), and fold proj_l into those rows of φ(K)ᵀV.

    One launch instead of a torch reduction per statistic; the order of the sums is fixed, so they stay
    deterministic. CHUNK_STEP partials per load keep several loads in flight without relying on the pipeliner.
    Rows of (φ(K)ᵀV)·Wᵀ need only the same rows of φ(K)ᵀV; _kv_proj_normalize_kernel finishes its absmax.
    """
    pid_tile = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    n_tiles = tl.num_programs(0)
    rows = pid_tile * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    k_sum = tl.zeros([ROWS], dtype=tl.float32)
    v_max = tl.zeros([ROWS], dtype=tl.float32)
    k_feature_sum = tl.zeros([ROWS], dtype=tl.float32)
    kv = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
    for first_chunk in range(0, N_CHUNKS, CHUNK_STEP):
        chunks = first_chunk + tl.arange(0, CHUNK_STEP)
        chunk_valid = (chunks < N_CHUNKS)[:, None]
        vector_offs = (pid_bh * N_CHUNKS + chunks)[:, None] * HEAD_DIM + rows[None, :]  # [CHUNK_STEP, ROWS]
        k_sum += tl.sum(tl.load(KSumPart + vector_offs, mask=chunk_valid, other=0.0), axis=0)
        if V_ABSMAX:
            v_max = tl.maximum(v_max, tl.max(tl.load(VMaxPart + vector_offs, mask=chunk_valid, other=0.0), axis=0))
        if LINEAR:
            k_feature_sum += tl.sum(tl.load(KZPart + vector_offs, mask=chunk_valid, other=0.0), axis=0)
            kv_part = tl.load(KVPart + vector_offs[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                              mask=chunk_valid[:, :, None], other=0.0)  # [CHUNK_STEP, ROWS, D]
            kv += tl.sum(kv_part, axis=0)
    out_rows = pid_bh * HEAD_DIM + rows
    tl.store(KMean + out_rows, k_sum / L)
    if V_ABSMAX:
        tl.store(VScale + out_rows, v_max / _FP8_E4M3_MAX)
    if LINEAR:
        tl.store(KZ + out_rows, k_feature_sum)
        if FOLD:
            w_t = tl.load(ProjWeight + offs_d[None, :] * HEAD_DIM + offs_d[:, None])  # Wᵀ [D_in, D_out]
            # plain fp32 FMAs like torch.matmul in fp32: ROWS·D² is too small for TF32 to pay for its error
            kv_proj = tl.dot(kv, w_t, input_precision="ieee")
            tl.store(KVProj + out_rows[:, None] * HEAD_DIM + offs_d[None, :], kv_proj)
            tl.store(KVProjTileMax + pid_bh * n_tiles + pid_tile, tl.max(tl.max(tl.abs(kv_proj), axis=1), axis=0))
        else:
            tl.store(KV + out_rows[:, None] * HEAD_DIM + offs_d[None, :], kv)


@triton.jit
def _kv_proj_normalize_kernel(
    # pointers: (φ(K)ᵀV)·Wᵀ [B·H, D, D] fp32 and its absmax per row tile [B·H, N_TILES]; outputs: the same
    # divided by its absmax in fp16 [B·H, D, D], the absmax [B·H]
    KVProj, KVProjTileMax, KVProj16, KVProjScale,
    # meta-parameters
    ROWS: tl.constexpr, N_TILES: tl.constexpr, HEAD_DIM: tl.constexpr, TRANSPOSED: tl.constexpr,
):
    """ROWS rows of (φ(K)ᵀV)·Wᵀ to fp16 over the per-(b, h) absmax: the product grows with L, fp16 would overflow.

    TRANSPOSED stores ((φ(K)ᵀV)·Wᵀ)ᵀ instead, the layout the CUDA kernel's epilogue stages.
    """
    pid_tile = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    tile_max = tl.load(KVProjTileMax + pid_bh * N_TILES + tl.arange(0, N_TILES))
    scale = tl.maximum(tl.max(tile_max, axis=0), 1e-30)  # an all-zero product stays 0
    rows = pid_tile * ROWS + tl.arange(0, ROWS)
    offs_d = tl.arange(0, HEAD_DIM)
    offs = (pid_bh * HEAD_DIM + rows)[:, None] * HEAD_DIM + offs_d[None, :]
    if TRANSPOSED:
        out_offs = (pid_bh * HEAD_DIM + offs_d)[None, :] * HEAD_DIM + rows[:, None]
    else:
        out_offs = offs
    tl.store(KVProj16 + out_offs, (tl.load(KVProj + offs) / scale).to(tl.float16))
    if pid_tile == 0:
        tl.store(KVProjScale + pid_bh, scale)


@triton.jit
def _quantize_int8(x, valid_rows, PER_ROW: tl.constexpr):
    """Symmetric INT8 of a [rows, D] fp32 tile: (int8 tile, scale = absmax / 127 per row or per tile).

    Rounds half away from zero like SageAttention's `quant_per_block_int8_kernel`; invalid rows become 0.
    """
    row_amax = tl.max(tl.abs(x), axis=1)
    if PER_ROW:
        amax = row_amax[:, None]
        scale = row_amax / 127.0
    else:
        amax = tl.max(row_amax, axis=0)
        scale = amax / 127.0
    inv_scale = 127.0 / tl.maximum(amax, 1e-30)  # an all-zero tile stays 0
    scaled = x * inv_scale
    x8 = tl.where(scaled >= 0, scaled + 0.5, scaled - 0.5).to(tl.int8)  # the cast truncates toward zero
    x8 = tl.where(valid_rows[:, None], x8, 0).to(tl.int8)
    return x8, scale


@triton.jit
def _permuted_v_source_token(column):
    """The token whose V lands in column `column` of the permuted Vᵀ (`permute_v`): κ⁻¹ in each group of 32.

    κ(j) = (j & 0b10001) | ((j & 0b00110) << 1) | ((j & 0b01000) >> 2) sends token 32c + j to column 32c + κ(j);
    the inverse undoes the three bit moves. κ keeps bits 0 and 4, so a token stays in its aligned group of 16.
    """
    return (column & -32) | (column & 0b10001) | ((column & 0b00010) << 2) | ((column & 0b01100) >> 1)


@triton.jit
def _prepare_q_block(
    Q, QPool, Q8, QScale,
    pid_m, pid_bh, batch, head, L, N_QBLOCKS, qk_scale_log2,
    stride_qb, stride_ql, stride_qh,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, QUANT: tl.constexpr,
):
    """Mean-pool one query block and quantize it to INT8 (sm_scale·log2 e folded in).

    Q gets one scale per token, not per block: the score is multiplied by a per-row vector instead of a
    scalar (same cost), and Q outlier channels then only coarsen their own token (measured on CPU in
    docs/notes/attention.md: rel-L1 0.027 -> 0.016 with two ×4 channels).
    """
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    valid = rows < L
    rows64 = rows.to(tl.int64)
    q_ptrs = Q + batch * stride_qb + head * stride_qh + rows64[:, None] * stride_ql + offs_d[None, :]
    q = tl.load(q_ptrs, mask=valid[:, None], other=0.0).to(tl.float32)
    count = tl.minimum(L - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
    tl.store(QPool + (pid_bh * N_QBLOCKS + pid_m) * HEAD_DIM + offs_d, tl.sum(q, axis=0) / count)
    if QUANT:
        q8, scale = _quantize_int8(q * qk_scale_log2, valid, True)
        padded_rows = N_QBLOCKS * BLOCK_M
        tl.store(Q8 + (pid_bh * padded_rows + rows)[:, None] * HEAD_DIM + offs_d[None, :], q8)
        tl.store(QScale + pid_bh * padded_rows + rows, scale)


@triton.jit
def _prepare_kv_block(
    K, V, KMean, VScale, KPool, K8, KScale, V8T,
    pid_n, pid_bh, batch, head, L, L_PAD,
    stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, QUANT: tl.constexpr, V_FP8: tl.constexpr,
    PERMUTE_V: tl.constexpr,
):
    """Pool one smoothed key block; optionally quantize it to INT8 and its V block to FP8 (transposed)."""
    n_kblocks = L_PAD // BLOCK_N
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    valid = rows < L
    rows64 = rows.to(tl.int64)
    k_ptrs = K + batch * stride_kb + head * stride_kh + rows64[:, None] * stride_kl + offs_d[None, :]
    k = tl.load(k_ptrs, mask=valid[:, None], other=0.0).to(tl.float32)
    k_mean = tl.load(KMean + pid_bh * HEAD_DIM + offs_d)
    k_smooth = tl.where(valid[:, None], k - k_mean[None, :], 0.0)
    count = tl.minimum(L - pid_n * BLOCK_N, BLOCK_N).to(tl.float32)
    tl.store(KPool + (pid_bh * n_kblocks + pid_n) * HEAD_DIM + offs_d, tl.sum(k_smooth, axis=0) / count)
    if QUANT:
        k8, scale = _quantize_int8(k_smooth, valid, False)
        tl.store(K8 + (pid_bh * L_PAD + rows64)[:, None] * HEAD_DIM + offs_d[None, :], k8)
        tl.store(KScale + pid_bh * n_kblocks + pid_n, scale)
    if V_FP8:
        # row i of the tile is stored to column rows[i]; permuting which token is loaded into it (instead of
        # where it is stored) keeps both the load (along D) and the transposed store contiguous
        if PERMUTE_V:
            tokens = _permuted_v_source_token(rows)
        else:
            tokens = rows
        v_ptrs = V + batch * stride_vb + head * stride_vh + tokens.to(tl.int64)[:, None] * stride_vl + offs_d[None, :]
        v = tl.load(v_ptrs, mask=(tokens < L)[:, None], other=0.0).to(tl.float32)
        v_scale = tl.load(VScale + pid_bh * HEAD_DIM + offs_d)
        v8 = (v / tl.maximum(v_scale, 1e-30)[None, :]).to(tl.float8e4nv)  # an all-zero channel stays 0
        # stored transposed [D, L_PAD]: FP8 wgmma wants both operands K-major, and P·V reduces over tokens
        tl.store(V8T + (pid_bh * HEAD_DIM + offs_d)[None, :] * L_PAD + rows64[:, None], v8)


@triton.jit
def _prepare_kernel(
    # pointers: q, k, v [B, L, H, D]; k mean, v scale [B·H, D]; pooled q [B·H, Mq, D] fp32, int8 q
    # [B·H, Mq·BLOCK_M, D] + per-token scales [B·H, Mq·BLOCK_M]; pooled smoothed k [B·H, Nk, D] fp32, int8 smoothed
    # k [B·H, L_PAD, D] + per-block scales [B·H, Nk], fp8 vᵀ [B·H, D, L_PAD]
    Q, K, V, KMean, VScale, QPool, Q8, QScale, KPool, K8, KScale, V8T,
    # sizes (L_PAD = Nk · BLOCK_N) and the score scale folded into q before quantization (1/sqrt(D) · log2 e)
    L, H, N_QBLOCKS, L_PAD, qk_scale_log2,
    # strides in elements (batch, token, head) of q, k, v
    stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, QUANT: tl.constexpr,
    V_FP8: tl.constexpr, PERMUTE_V: tl.constexpr,
):
    """One query block (program ids below N_QBLOCKS) or one key block (the rest): one launch for both."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    batch, head = pid_bh // H, pid_bh % H
    if pid < N_QBLOCKS:
        _prepare_q_block(Q, QPool, Q8, QScale, pid, pid_bh, batch, head, L, N_QBLOCKS, qk_scale_log2,
                         stride_qb, stride_ql, stride_qh, BLOCK_M, HEAD_DIM, QUANT)
    else:
        _prepare_kv_block(K, V, KMean, VScale, KPool, K8, KScale, V8T,
                          pid - N_QBLOCKS, pid_bh, batch, head, L, L_PAD,
                          stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
                          BLOCK_N, HEAD_DIM, QUANT, V_FP8, PERMUTE_V)


@triton.jit
def _block_topk_kernel(
    # pointers: pooled q [B·H, Mq, D] and pooled smoothed k [B·H, Nk, D] fp32; LUT [B·H, Mq, N_SEL] int64
    QPool, KPool, LUT,
    # sizes
    N_QBLOCKS, N_KBLOCKS, N_SEL,
    # meta-parameters: ROWS query blocks per program, NK_PAD = Nk rounded up to a power of two
    ROWS: tl.constexpr, NK_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_CHUNK: tl.constexpr,
    TWO_BITS: tl.constexpr,
):
    """The N_SEL best key blocks of ROWS query blocks by score = pooled q · pooled kᵀ, in ascending block order.

    An exact selection without a sort: the scores become unsigned integers of the same order, a radix select
    over their bits finds each row's N_SEL-th largest (32 steps of one compare and count, or with TWO_BITS 16
    steps of three), and a prefix sum gives each kept block its LUT slot. Equal scores at the threshold go to
    the lower block ids.
    """
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, NK_PAD)
    row_valid = rows < N_QBLOCKS
    col_valid = cols < N_KBLOCKS
    q_base = QPool + (pid_bh * N_QBLOCKS + rows)[:, None] * HEAD_DIM
    k_base = KPool + (pid_bh * N_KBLOCKS + cols)[:, None] * HEAD_DIM
    score = tl.zeros([ROWS, NK_PAD], dtype=tl.float32)
    for d0 in range(0, HEAD_DIM, D_CHUNK):
        offs_d = d0 + tl.arange(0, D_CHUNK)
        q = tl.load(q_base + offs_d[None, :], mask=row_valid[:, None], other=0.0)
        # loaded as stored ([NK_PAD, D_CHUNK], channels contiguous) and transposed for the product: a
        # [D_CHUNK, NK_PAD] load puts consecutive lanes a whole pooled row apart
        k = tl.load(k_base + offs_d[None, :], mask=col_valid[:, None], other=0.0)
        # three TF32 products (big·big + big·small + small·big) keep about fp32 accuracy, so the ranking agrees
        # with the fp32 reference; plain TF32 (10-bit mantissa) would reorder close scores
        score = tl.dot(q, tl.trans(k), score, input_precision="tf32x3")
    bits = score.to(tl.uint32, bitcast=True)
    # unsigned order = float order: flip every bit of a negative float, only the sign bit of the others
    key = bits ^ tl.where((bits >> 31) == 1, 0xFFFFFFFF, 0x80000000)
    key = tl.where(col_valid[None, :], key, 0)  # padded key blocks sort below every real score
    threshold = tl.zeros([ROWS], dtype=tl.uint32)  # from the top bits: the largest t with N_SEL keys ≥ t
    if TWO_BITS:
        # two bits per step (half the serial steps): the counts of keys ≥ each of the three candidates share
        # one sum, in 10-bit fields (the caller guarantees fewer than 1024 key blocks)
        for i in tl.static_range(16):
            c1 = threshold | (1 << (30 - 2 * i))
            c2 = threshold | (2 << (30 - 2 * i))
            c3 = threshold | (3 << (30 - 2 * i))
            packed = ((key >= c1[:, None]).to(tl.int32) + ((key >= c2[:, None]).to(tl.int32) << 10)
                      + ((key >= c3[:, None]).to(tl.int32) << 20))
            counts = tl.sum(packed, axis=1)
            digit = ((counts & 0x3FF) >= N_SEL).to(tl.uint32)
            digit += (((counts >> 10) & 0x3FF) >= N_SEL).to(tl.uint32)
            digit += ((counts >> 20) >= N_SEL).to(tl.uint32)
            threshold = threshold | (digit << (30 - 2 * i))
    else:
        for i in tl.static_range(32):
            candidate = threshold | (1 << (31 - i))
            n_at_least = tl.sum((key >= candidate[:, None]).to(tl.int32), axis=1)
            threshold = tl.where(n_at_least >= N_SEL, candidate, threshold)
    above = key > threshold[:, None]
    tied = (key == threshold[:, None]) & col_valid[None, :]
    ties_kept = N_SEL - tl.sum(above.to(tl.int32), axis=1)
    tie_rank = tl.cumsum(tied.to(tl.int32), axis=1) - tied.to(tl.int32)
    kept = above | (tied & (tie_rank < ties_kept[:, None]))
    slot = tl.cumsum(kept.to(tl.int32), axis=1) - 1
    lut_ptrs = LUT + (pid_bh * N_QBLOCKS + rows)[:, None] * N_SEL + slot
    tl.store(lut_ptrs, tl.broadcast_to(cols[None, :], [ROWS, NK_PAD]), mask=kept & row_valid[:, None])


# ----------------------------------------------------------------------------------------------------------
# Triton kernels: attention.
# ----------------------------------------------------------------------------------------------------------


def _attention_configs() -> list[triton.Config]:
    """Warps × pipeline depth for the attention kernels; one config under the CPU interpreter."""
    if _interpreting():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=warps, num_stages=stages) for warps, stages in ((4, 2), (4, 3), (8, 2))]


def _fits_shared_memory(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """Keep configs whose software pipeline fits the 227 KB of shared memory of an H100 block.

    The pipeliner keeps num_stages - 1 K and V tiles in flight (BLOCK_N × D elements each, KV_BYTES bytes per
    element of K and V together) beside the 16-bit-or-less Q tile; 200 KB leaves room for layout conversions.
    """
    args = {**named_args, **kwargs}
    head_dim, block_m, block_n = args["HEAD_DIM"], args["BLOCK_M"], args["BLOCK_N"]
    tile_bytes = block_n * head_dim * args["KV_BYTES"]
    kept = [c for c in configs if (c.num_stages - 1) * tile_bytes + 2 * block_m * head_dim <= 200 * 1024]
    return kept or configs[:1]


@triton.jit
def _int32_to_float(x):
    """Exact int32 -> fp32 for |x| < 2^22 with an integer add and a float subtract.

    Adding the bits of 1.5·2^23 puts x in the mantissa of 12582912.0 + x. The plain conversion (I2F) runs on the
    same quarter-rate unit as exp2 (16 per clock per SM on sm90), which bounds the INT8 kernel; |q8·k8| is at
    most D·127² = 2,064,512 < 2^22 for D = 128.
    """
    return (x + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def _online_softmax_step(s, m_i, l_i, acc, P_SHIFT: tl.constexpr):
    """Base-2 online softmax update for one key tile: returns (p, new max, new row sum, rescaled acc).

    P_SHIFT moves the row maximum of p to 2**P_SHIFT (FP8: 448); l uses the same shifted p so it cancels.
    """
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.math.exp2(s - (m_new - P_SHIFT)[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    return p, m_new, l_i, acc


@triton.autotune(configs=_attention_configs(), key=["HEAD_DIM", "BLOCK_M", "BLOCK_N", "PV_FP8", "DENSE", "LINEAR"],
                 prune_configs_by={"early_config_prune": _fits_shared_memory})
@triton.jit
def _sagesla_fwd_kernel(
    # pointers: int8 q [B·H, Mq·BLOCK_M, D] + scales [B·H, Mq·BLOCK_M]; int8 smoothed k [B·H, L_PAD, D] + scales
    # [B·H, Nk]; v: fp8 vᵀ [B·H, D, L_PAD] (PV_FP8) or the input v [B, L, H, D]; v scales [B·H, D];
    # LUT [B·H, Mq, N_SEL] of key-block ids; raw q [B, L, H, D], (φ(K)ᵀV)·proj_lᵀ [B·H, D, D] fp16 over its
    # absmax [B·H], Σφ(K) [B·H, D], proj_l bias [D] (LINEAR); output [B, L, H, D]
    Q8, QScale, K8, KScale, V, VScale, LUT, Q, KVProj, KVProjScale, KZ, ProjBias, Out,
    # sizes
    L, H, L_PAD, N_SEL,
    # strides in elements (batch, token, head) of the input v, the raw q and the output
    stride_vb, stride_vl, stride_vh, stride_qb, stride_ql, stride_qh, stride_ob, stride_ol, stride_oh,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, KV_BYTES: tl.constexpr,
    PV_FP8: tl.constexpr, P_SHIFT: tl.constexpr, DENSE: tl.constexpr, LINEAR: tl.constexpr,
):
    """One query block of SageSLA: INT8 Q·Kᵀ over the LUT's key blocks, FP8 (or 16-bit) P·V, linear branch."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    n_qblocks = tl.num_programs(0)
    n_kblocks = L_PAD // BLOCK_N
    batch, head = pid_bh // H, pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q8 = tl.load(Q8 + (pid_bh * n_qblocks * BLOCK_M + offs_m)[:, None] * HEAD_DIM + offs_d[None, :])
    q_scale = tl.load(QScale + pid_bh * n_qblocks * BLOCK_M + offs_m)  # [BLOCK_M]
    k_base = K8 + pid_bh * L_PAD * HEAD_DIM
    lut_base = LUT + (pid_bh * n_qblocks + pid_m) * N_SEL
    if PV_FP8:
        v_base = V + pid_bh * HEAD_DIM * L_PAD
    else:
        v_base = V + batch * stride_vb + head * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for i in range(N_SEL):
        if DENSE:
            key_block = i
        else:
            key_block = tl.load(lut_base + i)
        keys = key_block * BLOCK_N + offs_n
        k8 = tl.load(k_base + keys[None, :] * HEAD_DIM + offs_d[:, None])  # [D, BLOCK_N]
        k_scale = tl.load(KScale + pid_bh * n_kblocks + key_block)
        # dequantized score, already in log2 units (q's scale holds 1/sqrt(D) · log2 e); keys past L -> -inf
        score_scale = q_scale * k_scale
        s = _int32_to_float(tl.dot(q8, k8)) * score_scale[:, None] + tl.where(keys < L, 0.0, float("-inf"))[None, :]
        p, m_i, l_i, acc = _online_softmax_step(s, m_i, l_i, acc, P_SHIFT)
        if PV_FP8:
            v8 = tl.load(v_base + offs_d[None, :] * L_PAD + keys[:, None])  # [BLOCK_N, D], token-contiguous
            # `acc += dot` (not dot(..., acc)): Triton keeps the fp8 wgmma result in its own register tile and
            # adds it in fp32, the two-level accumulation of SageAttention2 (no 22-bit accumulation across tiles)
            acc += tl.dot(p.to(tl.float8e4nv), v8)
        else:
            v = tl.load(v_base + keys.to(tl.int64)[:, None] * stride_vl + offs_d[None, :], mask=(keys < L)[:, None],
                        other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc)
    out = acc / l_i[:, None]
    if PV_FP8:
        out = out * tl.load(VScale + pid_bh * HEAD_DIM + offs_d)[None, :]

    row_valid = offs_m < L
    rows64 = offs_m.to(tl.int64)
    if LINEAR:
        q_ptrs = Q + batch * stride_qb + head * stride_qh + rows64[:, None] * stride_ql + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_valid[:, None], other=0.0).to(tl.float32)
        q_exp = tl.exp(q - tl.max(q, axis=1)[:, None])
        phi_q = q_exp / tl.sum(q_exp, axis=1)[:, None]
        # proj_l(o_l) = (φ(Q)·(φ(K)ᵀV)·Wᵀ) / (φ(Q)·Σφ(K) + eps) + b: one [BLOCK_M, D] × [D, D] product
        kv_proj = tl.load(KVProj + pid_bh * HEAD_DIM * HEAD_DIM + offs_d[:, None] * HEAD_DIM + offs_d[None, :])
        k_feature_sum = tl.load(KZ + pid_bh * HEAD_DIM + offs_d)
        denominator = tl.sum(phi_q * k_feature_sum[None, :], axis=1) + _LINEAR_EPS
        linear_scale = tl.load(KVProjScale + pid_bh) / denominator
        out += tl.dot(phi_q.to(kv_proj.dtype), kv_proj) * linear_scale[:, None] + tl.load(ProjBias + offs_d)[None, :]
    o_ptrs = Out + batch * stride_ob + head * stride_oh + rows64[:, None] * stride_ol + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_valid[:, None])


@triton.autotune(configs=_attention_configs(), key=["HEAD_DIM", "BLOCK_M", "BLOCK_N", "DENSE"],
                 prune_configs_by={"early_config_prune": _fits_shared_memory})
@triton.jit
def _sla_fwd_kernel(
    # pointers: q, k, v [B, L, H, D] (16-bit); LUT [B·H, Mq, N_SEL]; output [B, L, H, D];
    # base-2 log-sum-exp [B·H, Mq·BLOCK_M] fp32 for the backward
    Q, K, V, LUT, Out, LSE,
    # sizes and the score scale 1/sqrt(D) · log2 e
    L, H, N_SEL, qk_scale_log2,
    # strides in elements (batch, token, head); q, k, v and the output share one layout
    stride_b, stride_l, stride_h,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, KV_BYTES: tl.constexpr,
    DENSE: tl.constexpr,
):
    """One query block of SLA's sparse branch in 16-bit with fp32 accumulation (thu-ml/SLA `_attn_fwd`)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    n_qblocks = tl.num_programs(0)
    batch, head = pid_bh // H, pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    base = batch * stride_b + head * stride_h
    row_valid = offs_m < L
    q = tl.load(Q + base + offs_m.to(tl.int64)[:, None] * stride_l + offs_d[None, :], mask=row_valid[:, None],
                other=0.0)
    lut_base = LUT + (pid_bh * n_qblocks + pid_m) * N_SEL

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for i in range(N_SEL):
        if DENSE:
            key_block = i
        else:
            key_block = tl.load(lut_base + i)
        keys = key_block * BLOCK_N + offs_n
        key_valid = keys < L
        kv_offs = base + keys.to(tl.int64)[:, None] * stride_l + offs_d[None, :]
        k = tl.load(K + kv_offs, mask=key_valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale_log2 + tl.where(key_valid, 0.0, float("-inf"))[None, :]
        p, m_i, l_i, acc = _online_softmax_step(s, m_i, l_i, acc, 0.0)
        v = tl.load(V + kv_offs, mask=key_valid[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc)
    tl.store(LSE + pid_bh * n_qblocks * BLOCK_M + offs_m, m_i + tl.math.log2(l_i))
    o_ptrs = Out + base + offs_m.to(tl.int64)[:, None] * stride_l + offs_d[None, :]
    tl.store(o_ptrs, (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=row_valid[:, None])


@triton.jit
def _sla_bwd_dq_kernel(
    # pointers: q, k, v, dO, dQ [B, L, H, D]; LSE, Delta [B·H, Mq·BLOCK_M] fp32; LUT [B·H, Mq, N_SEL]
    Q, K, V, DO, DQ, LSE, Delta, LUT,
    # sizes, scales
    L, H, N_SEL, qk_scale_log2, sm_scale,
    # strides in elements (batch, token, head), shared by all [B, L, H, D] tensors
    stride_b, stride_l, stride_h,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """dQ of one query block: dS = P ∘ (dO Vᵀ − δ), dQ = sm_scale · dS K over the kept key blocks."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    n_qblocks = tl.num_programs(0)
    batch, head = pid_bh // H, pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    base = batch * stride_b + head * stride_h
    row_valid = offs_m < L
    row_offs = base + offs_m.to(tl.int64)[:, None] * stride_l + offs_d[None, :]
    q = tl.load(Q + row_offs, mask=row_valid[:, None], other=0.0)
    do = tl.load(DO + row_offs, mask=row_valid[:, None], other=0.0)
    lse = tl.load(LSE + pid_bh * n_qblocks * BLOCK_M + offs_m)
    delta = tl.load(Delta + pid_bh * n_qblocks * BLOCK_M + offs_m)
    lut_base = LUT + (pid_bh * n_qblocks + pid_m) * N_SEL
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for i in range(N_SEL):
        keys = tl.load(lut_base + i) * BLOCK_N + offs_n
        key_valid = keys < L
        kv_offs = base + keys.to(tl.int64)[:, None] * stride_l + offs_d[None, :]
        k = tl.load(K + kv_offs, mask=key_valid[:, None], other=0.0)
        v = tl.load(V + kv_offs, mask=key_valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale_log2 + tl.where(key_valid, 0.0, float("-inf"))[None, :]
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    tl.store(DQ + row_offs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_valid[:, None])


@triton.jit
def _sla_bwd_dkdv_kernel(
    # pointers: q, k, v, dO, dK, dV [B, L, H, D]; LSE, Delta [B·H, Mq·BLOCK_M] fp32;
    # reverse LUT [B·H, Nk, Mq] (query blocks that kept each key block, first RevCount entries valid)
    Q, K, V, DO, DK, DV, LSE, Delta, RevLUT, RevCount,
    # sizes, scales
    L, H, N_QBLOCKS, qk_scale_log2, sm_scale,
    # strides in elements (batch, token, head), shared by all [B, L, H, D] tensors
    stride_b, stride_l, stride_h,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """dK, dV of one key block, over only the query blocks that kept it (SLA scans every mask bit instead)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    n_kblocks = tl.num_programs(0)
    batch, head = pid_bh // H, pid_bh % H
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    base = batch * stride_b + head * stride_h
    key_valid = keys < L
    key_offs = base + keys.to(tl.int64)[:, None] * stride_l + offs_d[None, :]
    k = tl.load(K + key_offs, mask=key_valid[:, None], other=0.0)
    v = tl.load(V + key_offs, mask=key_valid[:, None], other=0.0)
    key_bias = tl.where(key_valid, 0.0, float("-inf"))
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    rev_base = RevLUT + (pid_bh * n_kblocks + pid_n) * N_QBLOCKS
    n_queries = tl.load(RevCount + pid_bh * n_kblocks + pid_n)
    for j in range(n_queries):
        rows = tl.load(rev_base + j) * BLOCK_M + offs_m
        row_valid = rows < L
        row_offs = base + rows.to(tl.int64)[:, None] * stride_l + offs_d[None, :]
        q = tl.load(Q + row_offs, mask=row_valid[:, None], other=0.0)
        do = tl.load(DO + row_offs, mask=row_valid[:, None], other=0.0)
        lse = tl.load(LSE + pid_bh * N_QBLOCKS * BLOCK_M + rows)
        delta = tl.load(Delta + pid_bh * N_QBLOCKS * BLOCK_M + rows)
        s_t = tl.dot(k, tl.trans(q)) * qk_scale_log2 + key_bias[:, None]  # [BLOCK_N, BLOCK_M]
        # rows past L need no mask: their dO and δ load as 0, so they add nothing to dV or dK
        p_t = tl.math.exp2(s_t - lse[None, :])
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
    tl.store(DK + key_offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=key_valid[:, None])
    tl.store(DV + key_offs, dv.to(DV.dtype.element_ty), mask=key_valid[:, None])


# ----------------------------------------------------------------------------------------------------------
# Launchers.
# ----------------------------------------------------------------------------------------------------------


def _heads_first_strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, token, head) strides of a [B, L, H, D] tensor whose head dim is contiguous."""
    return x.stride(0), x.stride(1), x.stride(2)


# Launch constants of the pre-pass, from a sweep on the H100 (docs/results/attention-prepass-sweep-session4.json;
# about ±0.05 ms of noise at Wan 1.3B): the pooling pass runs 8 warps (at 14B 4–10 % faster than 4; at 1.3B within
# the noise); 2 and 4 statistics programs per SM and 4 or 8 partials per load in the finish kernel were within the
# noise of each other (the 8 statistics warps are session 2's measurement); the finish kernel works on ROWS = 16
# head-dim channels, tl.dot's smallest M.
_STATS_PROGRAMS_PER_SM = 2
_STATS_WARPS = 8
_STATS_TILE = 128  # tokens per step of the statistics pass (64 measured 7 % slower in the whole call)
_FINISH_ROWS = 16
_FINISH_CHUNK_STEP = 8
_PREPARE_WARPS = 8
# block top-k (docs/results/topk-session7.json, profiler device time on an H200; every variant, the same LUT):
# fp32 scores per program (16 query rows at Wan 1.3B: 23.6 µs, 32 rows: 29.2) and per warp (32 a thread);
# pooled-k elements per pipeline stage (at least 16 channels); the two-bit select from 512 key blocks on
# (Wan 14B, 591 blocks: 600 µs against 704 with one bit; at Wan 1.3B's 256 it was slower: 25.4 against 23.6)
_TOPK_SCORES_PER_PROGRAM = 4096
_TOPK_SCORES_PER_WARP = 1024
_TOPK_CHUNK_ELEMENTS = 8192
_TOPK_TWO_BITS_FROM = 512


def _n_chunks(n_tiles: int, batch_heads: int, device: torch.device) -> int:
    """Chunks per (b, h) for the statistics pass: _STATS_PROGRAMS_PER_SM programs per SM, ≤ one per tile."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return max(1, min(n_tiles, triton.cdiv(_STATS_PROGRAMS_PER_SM * sms, batch_heads)))


class _Prepared:
    """What the block-selection pass produces for one call (all [B·H, ...], b·h = b·H + h)."""

    def __init__(self, lut: torch.Tensor, n_sel: int, dense: bool, k_mean: torch.Tensor,
                 linear_ready: torch.cuda.Event | None = None, **extra: torch.Tensor):
        # [B·H, Mq, n_sel] int64 key-block ids, ascending in each row, so a ragged last block comes last
        # (contiguous unless dense)
        self.lut = lut
        self.n_sel = n_sel
        self.dense = dense  # every block kept: the kernels walk the blocks in order, the LUT is unused
        self.k_mean = k_mean  # [B·H, D]
        self.linear_ready = linear_ready  # marks "kv_proj_t" ready where the CUDA statistics wrote it on a 2nd stream
        self.extra = extra


def _key_statistics(k: torch.Tensor, v: torch.Tensor, *, fp8_pv: bool, linear: bool,
                    proj_l: torch.nn.Linear | None, transposed: bool = False) -> dict[str, torch.Tensor]:
    """The whole-sequence statistics of k and v, all [B·H, ...] fp32 unless said otherwise.

    Always "k_mean" [D]. fp8_pv: "v_scale" = max|v| / 448 [D]. linear: "kz" = Σφ(K) [D], and "kv" = φ(K)ᵀV [D, D],
    or with proj_l "kv_proj" = (φ(K)ᵀV)·Wᵀ in fp16 divided by "kv_proj_scale" (its absmax, [B·H]) and
    "proj_bias" [D]: what the linear-branch epilogue reads. transposed: "kv_proj_t" = "kv_proj"ᵀ instead (the CUDA
    kernel's layout).
    """
    batch, seq, heads, dim = k.shape
    bh, device, f32 = batch * heads, k.device, torch.float32
    n_tiles = triton.cdiv(seq, _STATS_TILE)
    chunks = _n_chunks(n_tiles, bh, device)
    blocks_per_chunk = triton.cdiv(n_tiles, chunks)
    chunks = triton.cdiv(n_tiles, blocks_per_chunk)
    k_sum_part = _empty((bh, chunks, dim), f32, device)
    v_max_part = _empty((bh, chunks, dim), f32, device) if fp8_pv else None
    kv_part = _empty((bh, chunks, dim, dim), f32, device) if linear else None
    kz_part = _empty((bh, chunks, dim), f32, device) if linear else None
    _kv_stats_kernel[(chunks, bh)](
        k, v, k_sum_part, v_max_part, kv_part, kz_part,
        seq, heads, blocks_per_chunk,
        *_heads_first_strides(k), *_heads_first_strides(v),
        BLOCK_N=_STATS_TILE, HEAD_DIM=dim, V_ABSMAX=fp8_pv, LINEAR=linear, num_warps=_STATS_WARPS,
    )

    fold = proj_l is not None
    n_tiles = dim // _FINISH_ROWS
    stats = {"k_mean": _empty((bh, dim), f32, device)}
    if fp8_pv:
        stats["v_scale"] = _empty((bh, dim), f32, device)
    if linear:
        stats["kz"] = _empty((bh, dim), f32, device)
    if linear and not fold:
        stats["kv"] = _empty((bh, dim, dim), f32, device)
    weight = proj_l.weight.detach().float().contiguous() if fold else None
    kv_proj = _empty((bh, dim, dim), f32, device) if fold else None
    kv_proj_tile_max = _empty((bh, n_tiles), f32, device) if fold else None
    _kv_stats_finish_kernel[(n_tiles, bh)](
        k_sum_part, v_max_part, kv_part, kz_part, stats["k_mean"], stats.get("v_scale"), stats.get("kz"),
        stats.get("kv"), weight, kv_proj, kv_proj_tile_max,
        seq, chunks,
        ROWS=_FINISH_ROWS, CHUNK_STEP=_FINISH_CHUNK_STEP, HEAD_DIM=dim, V_ABSMAX=fp8_pv, LINEAR=linear, FOLD=fold,
        num_warps=4,
    )
    if fold:
        name = "kv_proj_t" if transposed else "kv_proj"
        stats[name] = _empty((bh, dim, dim), torch.float16, device)
        stats["kv_proj_scale"] = _empty((bh,), f32, device)
        stats["proj_bias"] = proj_l.bias.detach().float().contiguous()
        _kv_proj_normalize_kernel[(n_tiles, bh)](
            kv_proj, kv_proj_tile_max, stats[name], stats["kv_proj_scale"],
            ROWS=_FINISH_ROWS, N_TILES=n_tiles, HEAD_DIM=dim, TRANSPOSED=transposed, num_warps=4,
        )
    return stats


def _block_topk(q_pool: torch.Tensor, k_pool: torch.Tensor, n_sel: int) -> torch.Tensor:
    """LUT [B·H, Mq, n_sel] int64 of the n_sel best key blocks per query block, ascending; pools [B·H, *, D] fp32.

    Selects the same blocks as `torch.topk(q_pool @ k_poolᵀ, n_sel)` in one launch (torch needs a bmm, and at
    Wan 14B's 591 key blocks its multi-block top-k took 1.2 ms on the H100). Ties go to the lower block id.
    """
    bh, n_qblocks, dim = q_pool.shape
    n_kblocks = k_pool.shape[1]
    nk_pad = max(16, triton.next_power_of_2(n_kblocks))  # tl.dot needs every dim ≥ 16
    rows = max(16, min(64, _TOPK_SCORES_PER_PROGRAM // nk_pad))
    d_chunk = min(dim, max(16, _TOPK_CHUNK_ELEMENTS // nk_pad))
    warps = max(4, min(16, rows * nk_pad // _TOPK_SCORES_PER_WARP))
    lut = _empty((bh, n_qblocks, n_sel), torch.int64, q_pool.device)
    _block_topk_kernel[(triton.cdiv(n_qblocks, rows), bh)](
        q_pool, k_pool, lut, n_qblocks, n_kblocks, n_sel,
        ROWS=rows, NK_PAD=nk_pad, HEAD_DIM=dim, D_CHUNK=d_chunk,
        TWO_BITS=_TOPK_TWO_BITS_FROM <= n_kblocks < 1024, num_warps=warps, num_stages=2,
    )
    return lut


def _prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, topk: float, block_q: int, block_k: int,
             quantize: bool, fp8_pv: bool, linear: bool, proj_l: torch.nn.Linear | None = None,
             permute_v: bool = False) -> _Prepared:
    """Statistics, pooling (+ INT8/FP8 quantization) and the top-k block selection, for both Triton backends.

    Four launches (five with proj_l), no host sync; where the CUDA statistics run, four, and with proj_l one more
    on a second stream, which `linear_ready` marks done (the attention kernel waits for it). `extra` holds, all
    [B·H, ...]: with quantize "q8" [Mq·block_q, D] int8, "q_scale" [Mq·block_q], "k8" [L_pad, D] int8 (smoothed K),
    "k_scale" [Nk]; with fp8_pv "v8t" [D, L_pad] float8_e4m3fn (V over "v_scale", transposed); and the statistics of
    `_key_statistics` (or `sagesla_cuda.key_statistics`).

    Args:
        linear: compute the linear branch's key-side sums (Σφ(K), φ(K)ᵀV).
        proj_l: fold this Linear(D, D) into φ(K)ᵀV ("kv_proj", "kv_proj_scale", "proj_bias"); needs linear.
        permute_v: prepare for the CUDA kernel (csrc/sagesla_attn.cu). Store "v8t" with the tokens of each aligned
            group of 32 permuted: token 32c + j goes to column 32c + κ(j), κ(j) = (j & 0b10001) | ((j & 0b00110) << 1)
            | ((j & 0b01000) >> 2). This is the k order of an FP8 wgmma A operand taken from accumulator registers
            (the CUDA kernel's P), so P·V stays exact. The Triton sagesla kernel reads the unpermuted layout. With
            proj_l the statistics hold "kv_proj_t" instead of "kv_proj", from the CUDA statistics kernel where it
            can run. Needs fp8_pv.

    Raises:
        ValueError: for an option without the one it needs.
    """
    if proj_l is not None and not linear:
        raise ValueError("proj_l is folded into the linear branch's sums: it needs linear=True")
    if permute_v and not fp8_pv:
        raise ValueError("permute_v permutes the FP8 Vᵀ: it needs fp8_pv=True")
    batch, seq, heads, dim = q.shape
    bh, device, f32 = batch * heads, q.device, torch.float32
    n_qblocks, n_kblocks = triton.cdiv(seq, block_q), triton.cdiv(seq, block_k)
    padded_keys = n_kblocks * block_k

    linear_ready = None
    if permute_v and linear == (proj_l is not None) and sagesla_cuda.statistics_usable(k, v):
        extra, linear_ready = sagesla_cuda.key_statistics(k, v, proj_l)
    else:
        extra = _key_statistics(k, v, fp8_pv=fp8_pv, linear=linear, proj_l=proj_l, transposed=permute_v)
    k_mean = extra.pop("k_mean")
    q_pool = _empty((bh, n_qblocks, dim), f32, device)
    k_pool = _empty((bh, n_kblocks, dim), f32, device)
    if quantize:
        extra["q8"] = _empty((bh, n_qblocks * block_q, dim), torch.int8, device)
        extra["q_scale"] = _empty((bh, n_qblocks * block_q), f32, device)
        extra["k8"] = _empty((bh, padded_keys, dim), torch.int8, device)
        extra["k_scale"] = _empty((bh, n_kblocks), f32, device)
    if fp8_pv:
        extra["v8t"] = _empty((bh, dim, padded_keys), torch.float8_e4m3fn, device)
    _prepare_kernel[(n_qblocks + n_kblocks, bh)](
        q, k, v, k_mean, extra.get("v_scale"), q_pool, extra.get("q8"), extra.get("q_scale"), k_pool,
        extra.get("k8"), extra.get("k_scale"), extra.get("v8t"),
        seq, heads, n_qblocks, padded_keys, LOG2E / math.sqrt(dim),
        *_heads_first_strides(q), *_heads_first_strides(k), *_heads_first_strides(v),
        BLOCK_M=block_q, BLOCK_N=block_k, HEAD_DIM=dim, QUANT=quantize, V_FP8=fp8_pv, PERMUTE_V=permute_v,
        num_warps=_PREPARE_WARPS,
    )
    n_sel = kept_blocks(topk, n_kblocks)
    dense = n_sel == n_kblocks
    if dense:
        # a stride-0 view: the dense kernels walk the blocks in order and never read it
        lut = torch.arange(n_kblocks, device=device).expand(bh, n_qblocks, n_kblocks)
    else:
        lut = _block_topk(q_pool, k_pool, n_sel)
    return _Prepared(lut, n_sel, dense, k_mean, linear_ready, **extra)


def sparse_block_map(q: torch.Tensor, k: torch.Tensor, *, topk: float, block_q: int, block_k: int) -> torch.Tensor:
    """The block map the Triton backends use (Triton pooling + top-k), as bool [B, H, Mq, Nk]."""
    batch, _, heads, _ = q.shape
    q, k = _as_kernel_input(q), _as_kernel_input(k)
    prepared = _prepare(q, k, k, topk=topk, block_q=block_q, block_k=block_k, quantize=False, fp8_pv=False,
                        linear=False)
    n_kblocks = triton.cdiv(q.shape[1], block_k)
    kept = torch.zeros((*prepared.lut.shape[:2], n_kblocks), dtype=torch.bool, device=q.device)
    kept.scatter_(-1, prepared.lut, True)
    return kept.view(batch, heads, -1, n_kblocks)


def _as_kernel_input(x: torch.Tensor) -> torch.Tensor:
    """16-bit with a contiguous head dim: the kernels' input contract (fp32 goes to bf16, as SageSLA does).

    Under TRITON_INTERPRET=1 (CPU tests) everything goes to fp16 instead: the Triton 3.9 interpreter multiplies
    bf16 tiles as their raw bits (docs/notes/attention.md), which would make every CPU run of a bf16 path garbage.
    """
    target = torch.float16 if _interpreting() else torch.bfloat16
    if x.dtype not in (torch.bfloat16, torch.float16) or (_interpreting() and x.dtype != target):
        x = x.to(target)
    return x if x.stride(-1) == 1 else x.contiguous()


def _sagesla_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, topk: float, block_q: int,
                     block_k: int, proj_l: torch.nn.Linear | None, fp8_pv: bool) -> torch.Tensor:
    batch, seq, heads, dim = q.shape
    linear = proj_l is not None
    out = _empty((batch, seq, heads, dim), q.dtype, q.device)
    if sagesla_cuda.usable(q, block_q=block_q, block_k=block_k, fp8_pv=fp8_pv):
        # csrc/sagesla_attn.cu: V in the token order of its FP8 operand; the linear branch in its epilogue
        prepared = _prepare(q, k, v, topk=topk, block_q=block_q, block_k=block_k, quantize=True, fp8_pv=True,
                            linear=linear, proj_l=proj_l, permute_v=True)
        extra = prepared.extra
        branch = sagesla_cuda.LinearBranch(q, extra["kv_proj_t"], extra["kv_proj_scale"], extra["kz"],
                                           extra["proj_bias"], prepared.linear_ready) if linear else None
        return sagesla_cuda.sagesla_attention_cuda(
            extra["q8"], extra["q_scale"], extra["k8"], extra["k_scale"], extra["v8t"], extra["v_scale"],
            prepared.lut, block_q=block_q, n_sel=prepared.n_sel, dense=prepared.dense, out=out, linear=branch)
    prepared = _prepare(q, k, v, topk=topk, block_q=block_q, block_k=block_k, quantize=True, fp8_pv=fp8_pv,
                        linear=linear, proj_l=proj_l)
    extra = prepared.extra
    n_qblocks = triton.cdiv(seq, block_q)
    padded_keys = triton.cdiv(seq, block_k) * block_k
    _sagesla_fwd_kernel[(n_qblocks, batch * heads)](
        extra["q8"], extra["q_scale"], extra["k8"], extra["k_scale"], extra["v8t"] if fp8_pv else v,
        extra.get("v_scale"), prepared.lut, q, extra.get("kv_proj"), extra.get("kv_proj_scale"), extra.get("kz"),
        extra.get("proj_bias"), out,
        seq, heads, padded_keys, prepared.n_sel,
        *_heads_first_strides(v), *_heads_first_strides(q), *_heads_first_strides(out),
        BLOCK_M=block_q, BLOCK_N=block_k, HEAD_DIM=dim, KV_BYTES=2 if fp8_pv else 3,
        PV_FP8=fp8_pv, P_SHIFT=FP8_P_SHIFT if fp8_pv else 0.0, DENSE=prepared.dense, LINEAR=linear,
    )
    return out


def _reverse_lut(lut: torch.Tensor, n_kblocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each key block, the query blocks that kept it: ([B·H, Nk, Mq] int64, counts [B·H, Nk] int32)."""
    kept = torch.zeros((*lut.shape[:2], n_kblocks), dtype=torch.int8, device=lut.device)
    kept.scatter_(-1, lut, 1)  # [B·H, Mq, Nk]
    kept_t = kept.transpose(1, 2)  # [B·H, Nk, Mq]
    order = torch.sort(kept_t, dim=-1, descending=True, stable=True).indices  # kept query blocks first
    return order.contiguous(), kept_t.sum(dim=-1, dtype=torch.int32).contiguous()


class _SparseAttention(torch.autograd.Function):
    """SLA's sparse branch with the Triton forward and backward; the LUT is a fixed input (no gradient)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lut: torch.Tensor, n_sel: int,
                dense: bool, block_q: int, block_k: int) -> torch.Tensor:
        batch, seq, heads, dim = q.shape
        n_qblocks = triton.cdiv(seq, block_q)
        out = _empty(q.shape, q.dtype, q.device)
        lse = _empty((batch * heads, n_qblocks * block_q), torch.float32, q.device)
        _sla_fwd_kernel[(n_qblocks, batch * heads)](
            q, k, v, lut, out, lse, seq, heads, n_sel, LOG2E / math.sqrt(dim), *_heads_first_strides(q),
            BLOCK_M=block_q, BLOCK_N=block_k, HEAD_DIM=dim, KV_BYTES=4, DENSE=dense,
        )
        ctx.save_for_backward(q, k, v, out, lse, lut)
        ctx.block_sizes = (block_q, block_k)
        ctx.n_sel = n_sel
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, out, lse, lut = ctx.saved_tensors
        block_q, block_k = ctx.block_sizes
        batch, seq, heads, dim = q.shape
        n_qblocks, n_kblocks = triton.cdiv(seq, block_q), triton.cdiv(seq, block_k)
        grad_out = grad_out.to(q.dtype).contiguous().as_strided(q.shape, q.stride())
        # δ_i = rowsum(dO ∘ O) (FlashAttention-2 backward preprocessing), padded to whole query blocks
        delta = torch.zeros((batch * heads, n_qblocks * block_q), dtype=torch.float32, device=q.device)
        delta[:, :seq] = (grad_out.float() * out.float()).sum(-1).transpose(1, 2).reshape(batch * heads, seq)
        dq, dk, dv = (_empty(t.shape, t.dtype, t.device).as_strided(t.shape, t.stride()) for t in (q, k, v))
        scale_log2, sm_scale = LOG2E / math.sqrt(dim), 1.0 / math.sqrt(dim)
        warps = 4 if dim == 64 else 8
        _sla_bwd_dq_kernel[(n_qblocks, batch * heads)](
            q, k, v, grad_out, dq, lse, delta, lut.contiguous(), seq, heads, ctx.n_sel, scale_log2, sm_scale,
            *_heads_first_strides(q), BLOCK_M=block_q, BLOCK_N=block_k, HEAD_DIM=dim, num_warps=warps,
        )
        rev_lut, rev_count = _reverse_lut(lut, n_kblocks)
        _sla_bwd_dkdv_kernel[(n_kblocks, batch * heads)](
            q, k, v, grad_out, dk, dv, lse, delta, rev_lut, rev_count, seq, heads, n_qblocks, scale_log2,
            sm_scale, *_heads_first_strides(q), BLOCK_M=block_q, BLOCK_N=block_k, HEAD_DIM=dim, num_warps=warps,
        )
        return dq, dk, dv, None, None, None, None, None


def _sla_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, topk: float, block_q: int, block_k: int,
                 proj_l: torch.nn.Linear | None) -> torch.Tensor:
    with torch.no_grad():
        prepared = _prepare(q, k, v, topk=topk, block_q=block_q, block_k=block_k, quantize=False, fp8_pv=False,
                            linear=False)
    # one layout for q, k, v so the kernels take one set of strides
    q, k, v = (t.contiguous() for t in (q, k, v))
    out = _SparseAttention.apply(q, k, v, prepared.lut, prepared.n_sel, prepared.dense, block_q, block_k)
    if proj_l is None:
        return out
    linear = F.linear(linear_branch_reference(q, k, v), proj_l.weight.float(), proj_l.bias.float())
    return (out.float() + linear).to(q.dtype)


def sparse_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, topk: float,
                            block_q: int | None = None, block_k: int | None = None,
                            proj_l: torch.nn.Linear | None = None, backend: Backend = "sagesla",
                            fp8_pv: bool | None = None) -> torch.Tensor:
    """SLA / SageSLA self-attention: top-k block-sparse softmax attention plus proj_l(linear attention).

    Args:
        q, k, v: [B, L, H, D] with D in (64, 128); one L (self-attention).
        topk: fraction of key blocks kept per query block (SLA's `topk`; 1.0 = dense).
        block_q, block_k: block sizes of the map (powers of two ≥ 16); default `default_block_sizes`.
        proj_l: the layer's `Linear(D, D)` (checkpoint key `…attn_op.local_attn.proj_l`), or None to skip the
            linear branch.
        backend: "torch" (fp32 reference), "sla" (Triton 16-bit, differentiable), "sagesla" (Triton INT8/FP8,
            forward only).
        fp8_pv: sagesla only: FP8 P·V (default on GPUs with FP8, compute capability ≥ 8.9) or 16-bit P·V.

    Returns:
        [B, L, H, D] in q's dtype.

    Raises:
        ValueError: for an unknown backend, mismatched shapes, an unsupported head dim or block size, or a
            Triton backend on a CPU tensor without TRITON_INTERPRET=1.
    """
    if backend not in BACKENDS:
        raise ValueError(f"sparse_linear_attention backend {backend!r} is not one of {BACKENDS}")
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"expected q, k, v all [B, L, H, D] of one shape; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"head dim {q.shape[-1]} is not one of {HEAD_DIMS}")
    if not 0.0 < topk <= 1.0:
        raise ValueError(f"topk {topk} is not in (0, 1]")
    default_q, default_k = default_block_sizes(q.device, backend)
    block_q, block_k = block_q or default_q, block_k or default_k
    for name, size in (("block_q", block_q), ("block_k", block_k)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name} {size} is not a power of two ≥ 16")
    if backend == "torch":
        out = sparse_linear_attention_reference(q, k, v, topk=topk, block_q=block_q, block_k=block_k,
                                                proj_l=proj_l)
        return out.to(q.dtype)
    if not q.is_cuda and not _interpreting():
        raise ValueError(f"backend {backend!r} runs Triton kernels: it needs a CUDA tensor (or TRITON_INTERPRET=1 "
                         "on the CPU); use 'torch' or dense 'sdpa' there")
    in_dtype = q.dtype
    q, k, v = (_as_kernel_input(t) for t in (q, k, v))
    if backend == "sla":
        out = _sla_forward(q, k, v, topk=topk, block_q=block_q, block_k=block_k, proj_l=proj_l)
    else:
        if fp8_pv is None:
            fp8_pv = q.is_cuda and torch.cuda.get_device_capability(q.device) >= (8, 9)
        with torch.no_grad():
            out = _sagesla_forward(q, k, v, topk=topk, block_q=block_q, block_k=block_k, proj_l=proj_l,
                                   fp8_pv=fp8_pv)
    return out.to(in_dtype)
