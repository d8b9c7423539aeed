"""Attention backend dispatch for the DiT.

Every attention in `WanModel` goes through `attention(q, k, v, ...)` with tokens laid out `[B, L, H, D]`
(the official `flash_attention` layout), so a backend swap never touches the model code.

Backends:
- "sdpa": dense `torch.nn.functional.scaled_dot_product_attention` in the dtype it is given (bf16 on GPU as
  the official code, fp32 in parity tests). The reference every other backend is measured against.
- "sla": sparse-linear attention (TurboDiffusion's SLA), Triton, 16-bit, differentiable.
- "sagesla": the same semantics with INT8 Q·K and FP8 (or 16-bit) P·V, Triton, forward only; the serving path.
  Both sparse backends are self-attention only (one L) and take `topk` (fraction of key blocks kept per query
  block) and the layer's `proj_l` (None skips the linear branch); see `engine.ops.sla`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from engine.ops.sla import sparse_linear_attention

Backend = Literal["sdpa", "sla", "sagesla"]
BACKENDS: tuple[str, ...] = ("sdpa", "sla", "sagesla")
DEFAULT_TOPK = 0.1  # TurboDiffusion's `--sla_topk` default (its README suggests 0.15 for quality)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: Backend = "sdpa",
              topk: float = DEFAULT_TOPK, proj_l: torch.nn.Linear | None = None) -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(D), no mask; sparse-linear for "sla" / "sagesla".

    Args:
        q: [B, Lq, H, D] queries.
        k, v: [B, Lk, H, D] keys and values (Lk == Lq for the sparse backends).
        backend: one of BACKENDS.
        topk: sparse backends: fraction of key blocks each query block keeps (1.0 = dense).
        proj_l: sparse backends: the layer's SLA `proj_l` Linear(D, D), or None to skip the linear branch.

    Returns:
        [B, Lq, H, D] in q's dtype.

    Raises:
        ValueError: for an unknown backend, mismatched shapes, or cross-attention on a sparse backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"expected q [B, Lq, H, D] and k, v [B, Lk, H, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if backend != "sdpa":
        if q.shape[1] != k.shape[1]:
            raise ValueError(f"backend {backend!r} is self-attention only; got Lq {q.shape[1]} != Lk {k.shape[1]}")
        return sparse_linear_attention(q, k, v, topk=topk, proj_l=proj_l, backend=backend)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [B, H, L, D]
    return out.transpose(1, 2)
