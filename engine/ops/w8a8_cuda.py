"""The CUDA C++ W8A8 GEMM for Hopper (csrc/w8a8_gemm.cu), built on demand and called through ctypes. Opt-in.

Same math and epilogues as the Triton `_block_scaled_mm_kernel` in int8_linear.py, INT8 or FP8 e4m3 operands: a
warp-specialized kernel (one TMA producer thread, two consumer warpgroups taking turns on the tensor cores,
persistent grid, 128×256 tiles). On the H100 its INT8 path ran at 0.80–1.01× the Triton kernel at the Wan shapes
(docs/notes/linear.md, session 3), so the Triton kernel stays the default and this one runs only with
`TDSERVE_CUDA_GEMM=1` (`ENABLED`), on a compute-capability-9.0 GPU with TMA-compatible layouts (row-major,
16-byte aligned rows, K a multiple of 16, even N) and only where `nvcc` could build it. `bench/linear.py` times
it beside Triton every run.

The library is a plain shared object built on demand by `engine.ops.cuda_build` (no torch headers, seconds to
build).
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path
from typing import Literal

import torch

from engine.ops import cuda_build

SOURCE = cuda_build.CSRC / "w8a8_gemm.cu"
Epilogue = Literal["store", "residual", "gelu_quant"]
_EPILOGUE = {"store": 0, "residual": 1, "gelu_quant": 2}
_BIAS_KIND = {torch.bfloat16: 1, torch.float32: 2}
_OPERAND = {torch.int8: 0, torch.float8_e4m3fn: 2}  # variant bit 1: e4m3 operands
OUT_DTYPE: dict[Epilogue, torch.dtype] = {"store": torch.bfloat16, "residual": torch.float32, "gelu_quant": torch.int8}
# Kernel variant (csrc/w8a8_gemm.cu `w8a8_gemm`), bit 0: 1 = the consumers take turns on the tensor cores
# (ping-pong), 0 = they issue freely; 1 was the faster on the H100 (docs/notes/linear.md). Bit 1 (e4m3 operands)
# follows the operands' dtype.
DEFAULT_VARIANT = 1
GROUP_M = 8
ENABLED = os.environ.get("TDSERVE_CUDA_GEMM", "0") == "1"  # slower than Triton on the H100: opt-in


def build(cache_dir: Path | None = None) -> Path:
    """Compile csrc/w8a8_gemm.cu for sm_90a unless the cache holds this source's build; returns the .so path."""
    return cuda_build.build(SOURCE, cache_dir)


@functools.cache
def _library() -> ctypes.CDLL | None:
    i64, i32, ptr = ctypes.c_longlong, ctypes.c_int, ctypes.c_void_p
    return cuda_build.load(SOURCE, "w8a8_gemm", [
        ptr, i64, ptr, i64, i32, i32, i32,  # a, lda, b, ldb, M, N, K
        ptr, i64, i64, ptr, i64, i64,  # a_scale + strides, b_scale + strides
        ptr, i32, ptr, i64, i32,  # bias, bias kind, out, ld_out, epilogue
        ptr, i64, i32,  # gate, ld_gate, rows_per_gate
        ptr, i64, i64,  # q_scale + strides
        i32, i32, i32, ptr,  # num_sms, group_m, variant, stream
    ])


def _row_major_aligned(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0


def usable(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> bool:
    """True when the CUDA kernel can run this GEMM (else the caller takes the Triton kernel)."""
    if not (ENABLED and a.is_cuda and a.dtype in _OPERAND and b.dtype == a.dtype and cuda_build.sm90(a.device.index or 0)):
        return False
    if not (_row_major_aligned(a) and _row_major_aligned(b) and a.shape[1] % 16 == 0):
        return False
    if out.stride(1) != 1 or out.stride(0) % 2 or b.shape[0] % 2 or out.data_ptr() % 16:
        return False
    if bias is not None and (bias.dtype not in _BIAS_KIND or not bias.is_contiguous()):
        return False
    return _library() is not None


def block_scaled_mm_cuda(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    *,
    epilogue: Epilogue = "store",
    gate: torch.Tensor | None = None,
    q_scale: torch.Tensor | None = None,
    variant: int = DEFAULT_VARIANT,
) -> torch.Tensor:
    """Run the CUDA kernel into out (callers check `usable` first; shapes are checked by int8_linear.py).

    epilogue "store": out bf16 [M, N] = y + bias. "residual": out fp32 [M, N] += gate[m // (M / G)] · bf16(y + bias).
    "gelu_quant": out int8 [M, N] and q_scale fp32 [ceil(M/128), ceil(N/128)] = the 128×128 quantization of
    bf16(GELU_tanh(bf16(y + bias))).
    """
    library = _library()
    if library is None:
        raise RuntimeError("the CUDA W8A8 GEMM is not available")
    (M, K), N = a.shape, b.shape[0]
    expected_out = OUT_DTYPE[epilogue]
    if out.dtype != expected_out or out.shape != (M, N):
        raise ValueError(f"epilogue {epilogue!r} writes {expected_out} [{M}, {N}]; got {out.dtype} {tuple(out.shape)}")
    rows_per_gate = M // gate.shape[0] if gate is not None else 1
    scale_out = q_scale if q_scale is not None else a_scale  # unused unless gelu_quant
    status = library.w8a8_gemm(
        a.data_ptr(), a.stride(0), b.data_ptr(), b.stride(0), M, N, K,
        a_scale.data_ptr(), a_scale.stride(0), a_scale.stride(1),
        b_scale.data_ptr(), b_scale.stride(0), b_scale.stride(1),
        bias.data_ptr() if bias is not None else None, _BIAS_KIND[bias.dtype] if bias is not None else 0,
        out.data_ptr(), out.stride(0), _EPILOGUE[epilogue],
        gate.data_ptr() if gate is not None else None, gate.stride(0) if gate is not None else 0, rows_per_gate,
        scale_out.data_ptr(), scale_out.stride(0), scale_out.stride(1),
        cuda_build.sm_count(a.device.index or 0), GROUP_M, (variant & 1) | _OPERAND[a.dtype],
        torch.cuda.current_stream(a.device).cuda_stream,
    )
    if status != 0:
        raise RuntimeError(f"w8a8_gemm failed: CUDA error {status}")
    return out
