"""Attention backend dispatch for the DiT.

Every attention in `WanModel` goes through `attention(q, k, v, ...)` with tokens laid out `[B, L, H, D]`
(the official `flash_attention` layout), so a backend swap never touches the model code.

Backends:
- "sdpa": dense `torch.nn.functional.scaled_dot_product_attention` in the dtype it is given (bf16 on GPU as
  the official code, fp32 in parity tests). The reference every other backend is measured against.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Backend = Literal["sdpa"]
BACKENDS: tuple[str, ...] = ("sdpa",)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: Backend = "sdpa") -> torch.Tensor:
    """Softmax attention with scale 1/sqrt(D), no mask.

    Args:
        q: [B, Lq, H, D] queries.
        k, v: [B, Lk, H, D] keys and values.
        backend: one of BACKENDS.

    Returns:
        [B, Lq, H, D] in q's dtype.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"expected q [B, Lq, H, D] and k, v [B, Lk, H, D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [B, H, L, D]
    return out.transpose(1, 2)
