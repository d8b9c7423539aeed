"""The CUDA C++ SageSLA attention kernel for Hopper (csrc/sagesla_attn.cu), built on demand, called through ctypes.

It replaces the attention kernel of the "sagesla" backend and the key statistics of its pre-pass
(csrc/sagesla_stats.cu: K mean, V scale, and the linear branch's Σφ(K) and ((φ(K)ᵀV)·Wᵀ)ᵀ; the last reduced on a
second stream beside the pooling pass, joined by the attention call); the
Triton pre-pass in sla.py still computes the INT8 Q and K, the FP8 Vᵀ (with `permute_v`: the token order the
kernel's FP8 A operand needs) and the block LUT; the kernel adds the linear branch in its epilogue. It runs for
head dim 128, query blocks of 64 or 128, key blocks of 128 and FP8 P·V on a compute-capability-9.0 GPU where nvcc
could build it (or a prebuilt cache holds it); every other case, and `TDSERVE_CUDA_ATTENTION=0`, takes Triton.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
from typing import NamedTuple

import torch

from engine.ops import cuda_build

SOURCE = cuda_build.CSRC / "sagesla_attn.cu"
STATS_SOURCE = cuda_build.CSRC / "sagesla_stats.cu"
HEAD_DIM, BLOCK_K = 128, 128
STATS_TILE = 64  # tokens per ring stage of the statistics kernel
STATS_CTAS_PER_SM = 2  # its launch bounds: 128 registers and 102 KB of shared memory per CTA
BLOCK_QS = (64, 128)  # 64: one stream per consumer warpgroup; 128: both share one (half the L2 traffic)
ENABLED = os.environ.get("TDSERVE_CUDA_ATTENTION", "1") == "1"


def fp8_operand_key_order() -> torch.Tensor:
    """Column κ of a 32-token slab of the permuted Vᵀ holds token `order[κ]` (csrc/sagesla_attn.cu, top comment).

    The kernel hands P from the Q·Kᵀ accumulator registers to the FP8 wgmma A operand unshuffled: A's k index
    16h + 4q + 2u + v then carries key 16h + 8u + 2q + v.
    """
    kappa = torch.arange(32)
    h, q, u, v = kappa >> 4, (kappa >> 2) & 3, (kappa >> 1) & 1, kappa & 1
    return 16 * h + 8 * u + 2 * q + v


@functools.cache
def _library() -> ctypes.CDLL | None:
    i64, i32, ptr = ctypes.c_longlong, ctypes.c_int, ctypes.c_void_p
    return cuda_build.load(SOURCE, "sagesla_attention", [
        ptr, ptr, ptr, ptr, ptr, ptr, ptr,  # q8, q_scale, k8, k_scale, v8t, v_scale, lut
        i32, i32, i32, i32, i32, i32,  # batch·heads, heads, seq, block_q, n_sel, dense
        ptr, i64, i64, i64,  # out + strides (batch, token, head)
        ptr, ptr, i64, i64, i64, ptr, ptr, ptr,  # linear branch: kv_proj_t, q + strides, kz, kv_proj_scale, bias
        i32, ptr,  # num_sms, stream
    ])


@functools.cache
def _stats_library() -> ctypes.CDLL | None:
    i64, i32, ptr = ctypes.c_longlong, ctypes.c_int, ctypes.c_void_p
    return cuda_build.load(STATS_SOURCE, "sagesla_key_statistics", [
        ptr, ptr, i64, i64, i64, i64, i64, i64,  # k, v + strides (batch, token, head)
        i32, i32, i32, i32, i32, i32,  # batch·heads, heads, seq, tiles per chunk, chunks, chunks per group
        ptr, ptr, ptr,  # partials, tickets, proj_l weight
        ptr, ptr, ptr, ptr, ptr,  # k_mean, v_scale, kz, kv_proj_t, kv_proj_scale
        ptr, ptr,  # stream, the stream of the φ(K)ᵀV reduction
    ])


@functools.cache
def _reduce_stream(device_index: int) -> torch.cuda.Stream:
    """The stream the φ(K)ᵀV reduction runs on, one per device: only the attention epilogue needs its result, so it
    runs beside the pooling pass and the top-k instead of before them (46 µs of a Wan 1.3B call)."""
    return torch.cuda.Stream(device=device_index)


def usable(q: torch.Tensor, *, block_q: int, block_k: int, fp8_pv: bool) -> bool:
    """True when the CUDA kernel can run this call (q [B, L, H, D] bf16); else the caller takes Triton."""
    if not (ENABLED and q.is_cuda and fp8_pv and q.dtype == torch.bfloat16 and cuda_build.sm90(q.device.index or 0)):
        return False
    if q.shape[-1] != HEAD_DIM or block_q not in BLOCK_QS or block_k != BLOCK_K:
        return False
    return _library() is not None


def statistics_usable(k: torch.Tensor, v: torch.Tensor) -> bool:
    """True when the CUDA statistics kernel can read k and v ([B, L, H, 128] bf16, 16-byte aligned rows)."""
    if k.shape[0] * k.shape[2] > 65535:  # B·H is the grid's y dimension
        return False
    for x in (k, v):
        if not (ENABLED and x.is_cuda and x.dtype == torch.bfloat16 and x.shape[-1] == HEAD_DIM and x.stride(-1) == 1):
            return False
        if x.data_ptr() % 16 or any(stride % 8 for stride in x.stride()[:3]):
            return False
    return cuda_build.sm90(k.device.index or 0) and _stats_library() is not None


def statistics_grid(seq: int, batch_heads: int, sms: int) -> tuple[int, int, int, int]:
    """(tiles per chunk, chunks per (b, h), chunks per group, groups) of the statistics kernel's launch."""
    n_tiles = -(-seq // STATS_TILE)
    # at most one wave: a few CTAs of a second wave would double the time (Wan 14B: 280 CTAs for 264 slots)
    chunks = max(1, min(n_tiles, STATS_CTAS_PER_SM * sms // batch_heads))
    tiles_per_chunk = -(-n_tiles // chunks)
    chunks = -(-n_tiles // tiles_per_chunk)  # every chunk gets at least one tile
    # the partials are summed in a two-level tree: about √chunks groups of about √chunks
    group_size = math.isqrt(chunks - 1) + 1
    return tiles_per_chunk, chunks, group_size, -(-chunks // group_size)


def key_statistics(k: torch.Tensor, v: torch.Tensor,
                   proj_l: torch.nn.Linear | None) -> tuple[dict[str, torch.Tensor], torch.cuda.Event | None]:
    """What sla.py's `_key_statistics` computes for the CUDA route; callers check `statistics_usable`.

    Returns the statistics, all [B·H, ...] fp32 unless said otherwise: "k_mean" [D], "v_scale" = max|v| / 448 [D];
    with proj_l also "kz" = Σφ(K) [D], "kv_proj_t" = ((φ(K)ᵀV)·Wᵀ)ᵀ in fp16 over "kv_proj_scale" (its absmax,
    [B·H]) and "proj_bias" [D]: what `LinearBranch` takes. With proj_l, "kv_proj_t" and "kv_proj_scale" are
    written on a second stream: the returned event marks them ready (None without proj_l), and a reader's stream
    must wait for it (`LinearBranch.ready` does).
    """
    library = _stats_library()
    if library is None:
        raise RuntimeError("the CUDA SageSLA statistics kernel is not available")
    batch, seq, heads, dim = k.shape
    bh, device, f32 = batch * heads, k.device, torch.float32
    tiles_per_chunk, chunks, group_size, groups = statistics_grid(seq, bh, cuda_build.sm_count(device.index or 0))
    partials = torch.empty((bh, chunks + groups, dim * dim + 3 * dim), dtype=f32, device=device)
    tickets = torch.zeros(bh, dtype=torch.int32, device=device)
    stats = {"k_mean": torch.empty((bh, dim), dtype=f32, device=device),
             "v_scale": torch.empty((bh, dim), dtype=f32, device=device)}
    weight = None
    if proj_l is not None:
        weight = proj_l.weight.detach().float().contiguous()
        stats["kz"] = torch.empty((bh, dim), dtype=f32, device=device)
        stats["kv_proj_t"] = torch.empty((bh, dim, dim), dtype=torch.float16, device=device)
        stats["kv_proj_scale"] = torch.empty(bh, dtype=f32, device=device)
        stats["proj_bias"] = proj_l.bias.detach().float().contiguous()
    stream = torch.cuda.current_stream(device)
    reduce_stream = _reduce_stream(device.index or 0) if weight is not None else stream
    status = library.sagesla_key_statistics(
        k.data_ptr(), v.data_ptr(), *k.stride()[:3], *v.stride()[:3], bh, heads, seq, tiles_per_chunk, chunks,
        group_size,
        partials.data_ptr(), tickets.data_ptr(), weight.data_ptr() if weight is not None else None,
        *(stats[name].data_ptr() if name in stats else None
          for name in ("k_mean", "v_scale", "kz", "kv_proj_t", "kv_proj_scale")),
        stream.cuda_stream, reduce_stream.cuda_stream,
    )
    if status != 0:
        raise RuntimeError(f"sagesla_key_statistics failed: CUDA error {status}")
    if weight is None:
        return stats, None
    # the reduction reads and writes these on its stream: the allocator must not hand them out before it is done
    for t in (partials, tickets, weight, stats["kv_proj_t"], stats["kv_proj_scale"]):
        t.record_stream(reduce_stream)
    ready = torch.cuda.Event()
    ready.record(reduce_stream)
    return stats, ready


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """x, or a copy of it where its storage is not 16-byte aligned (the kernel bulk-copies its per-head vectors)."""
    return x if x.data_ptr() % 16 == 0 else x.clone()


class LinearBranch(NamedTuple):
    """What the kernel's epilogue needs for proj_l(linear attention), all on the GPU.

    q: the raw queries [B, L, H, D] bf16 (head dim contiguous); kv_proj_t: ((φ(K)ᵀV)·Wᵀ)ᵀ in fp16 over its absmax
    [B·H, D_out, D_in], contiguous (the pre-pass's "kv_proj_t": output channels as rows, the K-major B operand of
    the epilogue's product); kv_proj_scale: that absmax [B·H]; kz: Σφ(K) [B·H, D]; bias: proj_l's
    bias [D] fp32; ready: an event to wait for before reading kv_proj_t and kv_proj_scale (`key_statistics`).
    """

    q: torch.Tensor
    kv_proj_t: torch.Tensor
    kv_proj_scale: torch.Tensor
    kz: torch.Tensor
    bias: torch.Tensor
    ready: torch.cuda.Event | None = None


def sagesla_attention_cuda(q8: torch.Tensor, q_scale: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor,
                           v8t: torch.Tensor, v_scale: torch.Tensor, lut: torch.Tensor, *, block_q: int, n_sel: int,
                           dense: bool, out: torch.Tensor, linear: LinearBranch | None = None) -> torch.Tensor:
    """Run the kernel into out ([B, L, H, D] bf16, head dim contiguous); callers check `usable` first.

    Inputs as sla.py's pre-pass makes them for query blocks of block_q (64 or 128) and key blocks of 128: q8 int8
    [B·H, Mq·block_q, D], q_scale [B·H, Mq·block_q], k8 int8 [B·H, L_pad, D], k_scale [B·H, Nk], v8t e4m3
    [B·H, D, L_pad] in `fp8_operand_key_order`, v_scale [B·H, D], lut int64 [B·H, Mq, n_sel] (ignored when dense).
    linear: add proj_l(linear attention) in the epilogue.
    """
    library = _library()
    if library is None:
        raise RuntimeError("the CUDA SageSLA kernel is not available")
    batch, seq, heads, _ = out.shape
    if out.dtype != torch.bfloat16 or out.stride(-1) != 1 or any(s % 2 for s in out.stride()[:3]):
        raise ValueError("out must be bf16 [B, L, H, D] with a contiguous head dim and even strides")
    for name, t in (("q8", q8), ("q_scale", q_scale), ("k8", k8), ("k_scale", k_scale), ("v8t", v8t),
                    ("v_scale", v_scale)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    q_scale, v_scale = _aligned(q_scale), _aligned(v_scale)  # bulk-copied per work item
    if not dense and (lut.dtype != torch.int64 or not lut.is_contiguous() or lut.shape[-1] != n_sel):
        raise ValueError(f"lut must be contiguous int64 [B·H, Mq, {n_sel}]")
    if linear is None:
        linear_args = (None, None, 0, 0, 0, None, None, None)
    else:
        if linear.ready is not None:  # before anything touches kv_proj_t or kv_proj_scale
            torch.cuda.current_stream(out.device).wait_event(linear.ready)
        if linear.q.shape != out.shape or linear.q.dtype != torch.bfloat16 or linear.q.stride(-1) != 1:
            raise ValueError("linear.q must be bf16 [B, L, H, D] with a contiguous head dim")
        kv_proj_t = linear.kv_proj_t
        if kv_proj_t.dtype != torch.float16 or not kv_proj_t.is_contiguous():
            raise ValueError("linear.kv_proj_t must be contiguous fp16 [B·H, D, D]")
        kz, bias = (_aligned(t.float().contiguous()) for t in (linear.kz, linear.bias))  # bulk-copied, as q_scale
        scale = linear.kv_proj_scale.float().contiguous()
        q = linear.q
        if q.data_ptr() % 16 or any(stride % 8 for stride in q.stride()[:3]):
            q = q.clone(memory_format=torch.contiguous_format)  # the kernel streams q with TMA: 16-byte aligned rows
        linear_args = (kv_proj_t.data_ptr(), q.data_ptr(), *q.stride()[:3], kz.data_ptr(), scale.data_ptr(),
                       bias.data_ptr())
    status = library.sagesla_attention(
        q8.data_ptr(), q_scale.data_ptr(), k8.data_ptr(), k_scale.data_ptr(), v8t.data_ptr(), v_scale.data_ptr(),
        lut.data_ptr(), batch * heads, heads, seq, block_q, n_sel, int(dense),
        out.data_ptr(), out.stride(0), out.stride(1), out.stride(2), *linear_args,
        cuda_build.sm_count(out.device.index or 0), torch.cuda.current_stream(out.device).cuda_stream,
    )
    if status != 0:
        raise RuntimeError(f"sagesla_attention failed: CUDA error {status}")
    return out
