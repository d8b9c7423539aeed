"""The CUDA C++ SageSLA attention kernel for Hopper (csrc/sagesla_attn.cu), built on demand, called through ctypes.

It replaces only the attention kernel of the "sagesla" backend: the Triton pre-pass in sla.py still computes the
statistics, the INT8 Q and K, the FP8 Vᵀ (with `permute_v`: the token order the kernel's FP8 A operand needs) and
the block LUT, and writes the linear branch into the output, to which the kernel adds the attention. It runs for
head dim 128 with 64×128 blocks and FP8 P·V on a compute-capability-9.0 GPU where nvcc could build it; every
other case, and `TDSERVE_CUDA_ATTENTION=0`, takes the Triton kernel.
"""

from __future__ import annotations

import ctypes
import functools
import os

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
    library = cuda_build.load(SOURCE)
    if library is None:
        return None
    i64, i32, ptr = ctypes.c_longlong, ctypes.c_int, ctypes.c_void_p
    library.sagesla_attention.restype = i32
    library.sagesla_attention.argtypes = [
        ptr, ptr, ptr, ptr, ptr, ptr, ptr,  # q8, q_scale, k8, k_scale, v8t, v_scale, lut
        i32, i32, i32, i32, i32, i32,  # batch·heads, heads, seq, block_q, n_sel, dense
        ptr, i64, i64, i64, i32,  # out + strides (batch, token, head), add_out
        i32, ptr,  # num_sms, stream
    ]
    return library


@functools.cache
def _device_ok(index: int) -> bool:
    return torch.cuda.get_device_capability(index) == (9, 0)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def usable(q: torch.Tensor, *, block_q: int, block_k: int, fp8_pv: bool) -> bool:
    """True when the CUDA kernel can run this call (q [B, L, H, D] bf16); else the caller takes Triton."""
    if not (ENABLED and q.is_cuda and fp8_pv and q.dtype == torch.bfloat16 and _device_ok(q.device.index or 0)):
        return False
    if q.shape[-1] != HEAD_DIM or block_q not in BLOCK_QS or block_k != BLOCK_K:
        return False
    return _library() is not None


def sagesla_attention_cuda(q8: torch.Tensor, q_scale: torch.Tensor, k8: torch.Tensor, k_scale: torch.Tensor,
                           v8t: torch.Tensor, v_scale: torch.Tensor, lut: torch.Tensor, *, block_q: int, n_sel: int,
                           dense: bool,
                           out: torch.Tensor, add_out: bool) -> torch.Tensor:
    """Run the kernel into out ([B, L, H, D] bf16, head dim contiguous); callers check `usable` first.

    Inputs as sla.py's pre-pass makes them for query blocks of block_q (64 or 128) and key blocks of 128: q8 int8
    [B·H, Mq·block_q, D], q_scale [B·H, Mq·block_q], k8 int8 [B·H, L_pad, D],
    k_scale [B·H, Nk], v8t e4m3 [B·H, D, L_pad] in `fp8_operand_key_order`, v_scale [B·H, D], lut int64
    [B·H, Mq, n_sel] (ignored when dense). add_out: out already holds the linear branch.
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
    status = library.sagesla_attention(
        q8.data_ptr(), q_scale.data_ptr(), k8.data_ptr(), k_scale.data_ptr(), v8t.data_ptr(), v_scale.data_ptr(),
        lut.data_ptr(), batch * heads, heads, seq, block_q, n_sel, int(dense),
        out.data_ptr(), out.stride(0), out.stride(1), out.stride(2), int(add_out),
        _sm_count(out.device.index or 0), torch.cuda.current_stream(out.device).cuda_stream,
    )
    if status != 0:
        raise RuntimeError(f"sagesla_attention failed: CUDA error {status}")
    return out
