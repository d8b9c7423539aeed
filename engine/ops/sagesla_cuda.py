"""The CUDA C++ SageSLA attention kernel for Hopper (csrc/sagesla_attn.cu), built on demand, called through ctypes.

It replaces only the attention kernel of the "sagesla" backend: the Triton pre-pass in sla.py still computes the
statistics, the INT8 Q and K, the FP8 Vᵀ (with `permute_v`: the token order the kernel's FP8 A operand needs) and
the block LUT; the kernel adds the linear branch in its epilogue. It runs for head dim 128, query blocks of 64 or
128, key blocks of 128 and FP8 P·V on a compute-capability-9.0 GPU where nvcc could build it (or a prebuilt cache
holds it); every other case, and `TDSERVE_CUDA_ATTENTION=0`, takes the Triton kernel.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import NamedTuple

import torch

from engine.ops import cuda_build

SOURCE = cuda_build.CSRC / "sagesla_attn.cu"
HEAD_DIM, BLOCK_K = 128, 128
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


def usable(q: torch.Tensor, *, block_q: int, block_k: int, fp8_pv: bool) -> bool:
    """True when the CUDA kernel can run this call (q [B, L, H, D] bf16); else the caller takes Triton."""
    if not (ENABLED and q.is_cuda and fp8_pv and q.dtype == torch.bfloat16 and cuda_build.sm90(q.device.index or 0)):
        return False
    if q.shape[-1] != HEAD_DIM or block_q not in BLOCK_QS or block_k != BLOCK_K:
        return False
    return _library() is not None


class LinearBranch(NamedTuple):
    """What the kernel's epilogue needs for proj_l(linear attention), all on the GPU.

    q: the raw queries [B, L, H, D] bf16 (head dim contiguous); kv_proj: (φ(K)ᵀV)·Wᵀ in fp16 over its absmax
    [B·H, D, D] (sla.py's pre-pass "kv_proj"); kv_proj_scale: that absmax [B·H]; kz: Σφ(K) [B·H, D]; bias: proj_l's
    bias [D] fp32.
    """

    q: torch.Tensor
    kv_proj: torch.Tensor
    kv_proj_scale: torch.Tensor
    kz: torch.Tensor
    bias: torch.Tensor


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
    if not dense and (lut.dtype != torch.int64 or not lut.is_contiguous() or lut.shape[-1] != n_sel):
        raise ValueError(f"lut must be contiguous int64 [B·H, Mq, {n_sel}]")
    if linear is None:
        linear_args = (None, None, 0, 0, 0, None, None, None)
    else:
        if linear.q.shape != out.shape or linear.q.dtype != torch.bfloat16 or linear.q.stride(-1) != 1:
            raise ValueError("linear.q must be bf16 [B, L, H, D] with a contiguous head dim")
        # the kernel stages ((φ(K)ᵀV)·Wᵀ)ᵀ: output channels as rows, the K-major B operand of its product
        kv_proj_t = linear.kv_proj.to(torch.float16).transpose(1, 2).contiguous()
        kz, scale, bias = (t.float().contiguous() for t in (linear.kz, linear.kv_proj_scale, linear.bias))
        linear_args = (kv_proj_t.data_ptr(), linear.q.data_ptr(), *linear.q.stride()[:3], kz.data_ptr(),
                       scale.data_ptr(), bias.data_ptr())
    status = library.sagesla_attention(
        q8.data_ptr(), q_scale.data_ptr(), k8.data_ptr(), k_scale.data_ptr(), v8t.data_ptr(), v_scale.data_ptr(),
        lut.data_ptr(), batch * heads, heads, seq, block_q, n_sel, int(dense),
        out.data_ptr(), out.stride(0), out.stride(1), out.stride(2), *linear_args,
        cuda_build.sm_count(out.device.index or 0), torch.cuda.current_stream(out.device).cuda_stream,
    )
    if status != 0:
        raise RuntimeError(f"sagesla_attention failed: CUDA error {status}")
    return out
