"""The Wan2.1 / Wan2.2 diffusion transformer (`WanModel`), the whole model in this one file.

Follows the official implementation (Wan-Video/Wan2.1 and Wan2.2 `wan/modules/model.py`): the same module tree
and `state_dict()` keys (so official checkpoints load strictly), the same constructor kwargs, and the same
numerics. Differences are in layout only: batched tensors instead of per-sample lists (all samples of a batch
share one size, so there are no padding tokens and no key masks), real cos/sin RoPE tables built once per
token grid instead of complex128 math per call, and no CLIP image branch (Wan2.2 I2V has none; its image
conditioning is the 20 extra input channels).

dtype scheme (official §3.1 of the reference: parameters as loaded, the forward under bf16 autocast):
- fp32 islands: the fp64 → fp32 sinusoid, `time_embedding`, `time_projection`, every `modulation` add, all
  LayerNorms and RMSNorms, RoPE, the residual updates `x + y·gate`, the whole `head` (its Linear included).
- matmul dtype (`compute_dtype`, bf16 for inference): `patch_embedding`, `text_embedding`, every block's
  q/k/v/o and FFN Linears, and attention. Activations are cast into it right before those layers, so no
  autocast is needed. `WanModel.to_inference_dtype(dtype)` puts the parameters into this scheme; a plain
  `model.to(torch.bfloat16)` would also round the fp32 islands and is not supported.
- The residual stream is fp32 from the first residual add on: the patch tokens enter block 0 in the matmul
  dtype and `x + y·gate` (gate fp32) promotes them, exactly as in the official code.

Build without memory on the meta device (then load with `assign=True`): `WanModel.meta(cfg)`, which is
`with torch.device("meta"): WanModel.from_config(cfg)`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from engine.configs import DiTConfig
from engine.ops import norms
from engine.ops.attention import BACKENDS, DEFAULT_TOPK, attention
from engine.ops.int8_linear import Int8FeedForward, shared_input_linears
from engine.ops.rope import rms_norm_rope

# RoPE tables of this many token grids (F', H', W', device) stay cached per model: the presets of one
# deployment use a handful of grids, and an unbounded dict would grow with every new video size.
_ROPE_CACHE_SIZE = 8
# Official `rope_params(1024, …)`: positions 0 … 1023 on every axis, no interpolation beyond.
_ROPE_MAX_POSITIONS = 1024
_ROPE_THETA = 10000.0

Grid = tuple[int, int, int]  # tokens per axis (F', H', W')


class WanModel(nn.Module):
    """Wan DiT: (noisy latent [+ I2V condition], timestep, text embedding) → flow-matching velocity."""

    def __init__(
        self,
        *,
        dim: int,
        ffn_dim: int,
        num_heads: int,
        num_layers: int,
        freq_dim: int = 256,
        text_dim: int = 4096,
        text_len: int = 512,
        in_dim: int = 16,
        out_dim: int = 16,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        eps: float = 1e-6,
        attention: str = "sdpa",
        topk: float = DEFAULT_TOPK,
        sla_proj: bool = False,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        if (dim // num_heads) % 2:
            raise ValueError(f"head_dim {dim // num_heads} must be even (RoPE rotates pairs)")
        if attention not in BACKENDS:
            raise ValueError(f"attention backend {attention!r} is not one of {BACKENDS}")
        self.dim = dim
        self.ffn_dim = ffn_dim
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.head_dim = dim // num_heads
        self.freq_dim = freq_dim
        self.text_dim = text_dim
        self.text_len = text_len
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.patch_size = tuple(patch_size)
        self.eps = eps
        # Backend of the self-attention (cross-attention is always dense SDPA) and the fraction of key blocks
        # the sparse backends keep; both may be changed at any time.
        self.attention_backend = attention
        self.attention_topk = topk
        self.compute_dtype = torch.float32  # the matmul dtype, set by to_inference_dtype
        # (cos, sin) RoPE tables keyed by (token grid, device); a plain dict, so never in the state dict.
        self._rope_cache: dict[tuple[Grid, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        # Shared by all blocks; each block adds its own learned `modulation` bias.
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(
            [WanAttentionBlock(dim, ffn_dim, num_heads, eps, sla_proj) for _ in range(num_layers)]
        )
        self.head = Head(dim, out_dim, self.patch_size, eps)
        self.init_weights()

    @classmethod
    def from_config(cls, cfg: DiTConfig, **kwargs: object) -> WanModel:
        """Build from a `DiTConfig`; `kwargs` (e.g. `attention="sla"`) are passed on."""
        return cls(**cfg.kwargs(), **kwargs)  # type: ignore[arg-type]

    @classmethod
    def meta(cls, cfg: DiTConfig, **kwargs: object) -> WanModel:
        """Build on the meta device (no memory), the skeleton a checkpoint is loaded into with assign=True."""
        with torch.device("meta"):
            return cls.from_config(cfg, **kwargs)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Official `WanModel.init_weights`: xavier Linears with zero bias, N(0, 0.02) embeddings, zero head.

        The zeroed `head.head.weight` makes a freshly built model output its head bias; random-weight tests
        must re-randomise every parameter.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))  # a view: initialises in place
        for embedding in (self.text_embedding, self.time_embedding):
            for module in embedding.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)
        for block in self.blocks:  # SLA's proj_l starts at zero: the linear branch is learned in fine-tuning
            if block.self_attn.attn_op is not None:
                nn.init.zeros_(block.self_attn.attn_op.local_attn.proj_l.weight)

    def matmul_modules(self) -> list[nn.Module]:
        """The layers that run in `compute_dtype`: patch/text embedding and every block's Linears."""
        modules: list[nn.Module] = [self.patch_embedding, self.text_embedding]
        for block in self.blocks:
            for attn in (block.self_attn, block.cross_attn):
                modules += [attn.q, attn.k, attn.v, attn.o]
            modules.append(block.ffn)
        return modules

    def to_inference_dtype(self, dtype: torch.dtype) -> WanModel:
        """Put the parameters into the dtype scheme: matmul layers in `dtype`, everything else fp32.

        Idempotent, and also correct after a checkpoint was loaded with `assign=True` in any dtype.

        Args:
            dtype: the matmul dtype, torch.bfloat16 for inference or torch.float32 (tests, CPU reference).

        Returns:
            self.
        """
        # Parameter by parameter: a whole-model `self.float()` first would materialise a 14B model in fp32
        # (57 GB) on its way to bf16.
        matmul_params = {id(p) for module in self.matmul_modules() for p in module.parameters()}
        for param in self.parameters():
            target = dtype if id(param) in matmul_params else torch.float32
            if param.dtype != target:
                param.data = param.data.to(target)
        self.compute_dtype = dtype
        for block in self.blocks:
            block.compute_dtype = dtype
        return self

    def use_fused_norms(self, enabled: bool = True) -> WanModel:
        """Run the norms inside the blocks (norm1/2/3, q/k RMSNorm) as fused Triton kernels (GPU), as
        TurboDiffusion's FastLayerNorm / FastRMSNorm; `head.norm` stays the plain module as there."""
        for block in self.blocks:
            for module in block.modules():
                if isinstance(module, (WanLayerNorm, WanRMSNorm)):
                    module.fused = enabled
        return self

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict the flow-matching velocity.

        Args:
            x: [B, C, F, H, W] noisy latent: C = in_dim for T2V, 16 when `y` is given.
            t: [B] model timestep in [0, 1000] (float), one per sample.
            context: [B, text_len, text_dim] text embedding, zero-padded to text_len rows (no mask: the padded
                rows are attended to, as in the official model).
            y: [B, in_dim - 16, F, H, W] I2V condition (mask 4 | image latent 16), concatenated after `x`.

        Returns:
            [B, out_dim, F, H, W] fp32 velocity.

        Raises:
            ValueError: on inputs whose shapes do not fit the model.
        """
        if y is not None:
            x = torch.cat([x, y], dim=1)  # [B, in_dim, F, H, W]: noise | mask | image latent
        self._check_inputs(x, t, context)
        batch = x.shape[0]
        pt, ph, pw = self.patch_size
        grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)  # (F', H', W') tokens per axis

        tokens = self.patch_embedding(x.to(self.compute_dtype))  # [B, D, F', H', W']
        tokens = tokens.flatten(2).transpose(1, 2)  # [B, L, D], L in (frame, row, column) row-major order

        # Time embedding in fp32 (official: autocast(float32) around it).
        e = self.time_embedding(sinusoidal_embedding(t, self.freq_dim))  # [B, D]
        e0 = self.time_projection(e).unflatten(1, (6, self.dim))  # [B, 6, D]

        context = self.text_embedding(context.to(self.compute_dtype))  # [B, text_len, D]
        rope = self._rope(grid, x.device)
        for block in self.blocks:
            tokens = block(tokens, e0, context, rope, self.attention_backend, self.attention_topk)

        out = self.head(tokens, e)  # [B, L, pt·ph·pw·out_dim] fp32
        # Unpatchify as the official einsum "fhwpqrc->cfphqwr"; head features are (pt, ph, pw, C), C fastest.
        out = out.view(batch, *grid, pt, ph, pw, self.out_dim)  # [B, F', H', W', pt, ph, pw, C]
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, F', pt, H', ph, W', pw]
        return out.reshape(batch, self.out_dim, grid[0] * pt, grid[1] * ph, grid[2] * pw).float()

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> None:
        """Shape checks only (host-side ints, no device sync)."""
        if x.dim() != 5 or x.shape[1] != self.in_dim:
            raise ValueError(f"expected x (with y concatenated) as [B, {self.in_dim}, F, H, W]; got "
                             f"{tuple(x.shape)}")
        if any(size % patch for size, patch in zip(x.shape[2:], self.patch_size, strict=True)):
            raise ValueError(f"latent size {tuple(x.shape[2:])} is not a multiple of the patch "
                             f"{self.patch_size}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"expected t as [B] = [{x.shape[0]}]; got {tuple(t.shape)}")
        if context.shape != (x.shape[0], self.text_len, self.text_dim):
            raise ValueError(f"expected context as [B, text_len, text_dim] = [{x.shape[0]}, {self.text_len}, "
                             f"{self.text_dim}] (zero-padded to text_len rows); got {tuple(context.shape)}")

    def _rope(self, grid: Grid, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) RoPE tables for a token grid, built on the first call and cached on the module."""
        key = (grid, device)
        tables = self._rope_cache.get(key)
        if tables is None:
            cos, sin = rope_tables(grid, self.head_dim)
            tables = (cos.to(device), sin.to(device))
            if len(self._rope_cache) >= _ROPE_CACHE_SIZE:
                self._rope_cache.pop(next(iter(self._rope_cache)))  # the oldest grid
            self._rope_cache[key] = tables
        return tables


class WanAttentionBlock(nn.Module):
    """Self-attention (modulated, gated, RoPE), plain cross-attention to the text, FFN (modulated, gated)."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, eps: float, sla_proj: bool = False) -> None:
        super().__init__()
        self.compute_dtype = torch.float32  # set by WanModel.to_inference_dtype
        # Official names: norm1 before self-attention, norm3 (affine) before cross-attention, norm2 before
        # the FFN (diffusers swaps norm2 and norm3).
        self.norm1 = WanLayerNorm(dim, eps)
        self.self_attn = WanSelfAttention(dim, num_heads, eps, sla_proj)
        self.norm3 = WanLayerNorm(dim, eps, elementwise_affine=True)
        self.cross_attn = WanCrossAttention(dim, num_heads, eps)
        self.norm2 = WanLayerNorm(dim, eps)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        context: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attention_backend: str,
        topk: float,
    ) -> torch.Tensor:
        """x [B, L, D] → [B, L, D] fp32; e0 [B, 6, D] fp32; context [B, text_len, D] in compute_dtype."""
        # Six [B, 1, D] fp32 vectors (official order: shift, scale, gate for attention, then for the FFN).
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation + e0).chunk(6, dim=1)

        h = self.norm1.modulate(x, shift1, scale1, self.compute_dtype)
        y = self.self_attn(h, rope, attention_backend, topk)
        if self.norm3.fused and not x.requires_grad:
            # GPU inference: each residual update rides in the next norm's kernel (engine.ops.norms); the first
            # writes the block's own fp32 x, the second updates it in place.
            x_new = torch.empty(x.shape, dtype=torch.float32, device=x.device)
            h = self.norm3(x, self.compute_dtype, residual=y, gate=gate1, residual_out=x_new)
            x = x_new
            y = self.cross_attn(h, context)
            h = self.norm2.modulate(x, shift2, scale2, self.compute_dtype, residual=y)
            if isinstance(self.ffn, Int8FeedForward):  # W8A8: the update rides in the second GEMM's epilogue
                return self.ffn.add_to_residual(h, x, gate2)
        else:
            x = torch.addcmul(x, y, gate1)  # one kernel, fp32 by promotion as the official `x + y * gate`
            x = _residual_add_(x, self.cross_attn(self.norm3(x, self.compute_dtype), context))
            h = self.norm2.modulate(x, shift2, scale2, self.compute_dtype)
        return _residual_add_(x, self.ffn(h), gate2)


class WanAttention(nn.Module):
    """The projections both attentions share (official names): q, k, v, o and the full-dim q/k RMSNorms."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = WanRMSNorm(dim, eps)
        self.norm_k = WanRMSNorm(dim, eps)


class WanSelfAttention(WanAttention):
    """Self-attention over the video tokens: q/k RMSNorm over the full dim, 3-D RoPE, pluggable backend."""

    def __init__(self, dim: int, num_heads: int, eps: float, sla_proj: bool = False) -> None:
        super().__init__(dim, num_heads, eps)
        # TurboWan checkpoints carry SLA's linear-branch projection under TurboDiffusion's module path.
        self.attn_op = SLAProjection(dim // num_heads) if sla_proj else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], backend: str,
                topk: float) -> torch.Tensor:
        """x [B, L, D] in the matmul dtype → [B, L, D] in the matmul dtype."""
        q, k, v = shared_input_linears(x, (self.q, self.k, self.v))  # [B, L, D] each
        v = v.unflatten(2, (self.num_heads, -1))  # [B, L, H, Dh]
        if self.norm_q.fused:  # RMSNorm + RoPE + the cast in one pass per tensor (engine.ops.rope)
            q = rms_norm_rope(q, self.norm_q.weight, *rope, self.num_heads, self.norm_q.eps, out_dtype=v.dtype)
            k = rms_norm_rope(k, self.norm_k.weight, *rope, self.num_heads, self.norm_k.eps, out_dtype=v.dtype)
        else:
            q = apply_rope(self.norm_q(q).unflatten(2, (self.num_heads, -1)), *rope).to(v.dtype)  # [B, L, H, Dh]
            k = apply_rope(self.norm_k(k).unflatten(2, (self.num_heads, -1)), *rope).to(v.dtype)
        proj_l = self.attn_op.local_attn.proj_l if self.attn_op is not None else None
        out = attention(q, k, v, backend=backend, topk=topk, proj_l=proj_l)  # [B, L, H, Dh]
        return self.o(out.flatten(2))


class SLAProjection(nn.Module):
    """Holder of SLA's `proj_l` at TurboDiffusion's key path `self_attn.attn_op.local_attn.proj_l`.

    proj_l is Linear(head_dim, head_dim), fp32, shared by the heads, zero-initialised before SLA fine-tuning
    (so a zero proj_l is exactly "no linear branch"); only the sparse backends use it, dense SDPA ignores it.
    """

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.local_attn = nn.Module()
        self.local_attn.proj_l = nn.Linear(head_dim, head_dim)
        nn.init.zeros_(self.local_attn.proj_l.weight)
        nn.init.zeros_(self.local_attn.proj_l.bias)


class WanCrossAttention(WanAttention):
    """Cross-attention of the video tokens to all text_len text rows: no mask, no RoPE, always dense SDPA."""

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [B, L, D], context [B, Lc, D], both in the matmul dtype → [B, L, D] in the matmul dtype."""
        v = self.v(context).unflatten(2, (self.num_heads, -1))  # [B, Lc, H, Dh]
        q = self.norm_q(self.q(x), v.dtype).unflatten(2, (self.num_heads, -1))  # [B, L, H, Dh]
        k = self.norm_k(self.k(context), v.dtype).unflatten(2, (self.num_heads, -1))  # [B, Lc, H, Dh]
        out = attention(q, k, v, backend="sdpa")  # [B, L, H, Dh]
        return self.o(out.flatten(2))


class Head(nn.Module):
    """Output head, all fp32: LayerNorm, modulation by `e` (the time_embedding output, not e0), Linear."""

    def __init__(self, dim: int, out_dim: int, patch_size: tuple[int, ...], eps: float) -> None:
        super().__init__()
        self.norm = WanLayerNorm(dim, eps)
        self.head = nn.Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [B, L, D] fp32, e [B, D] fp32 → [B, L, prod(patch)·out_dim] fp32."""
        shift, scale = (self.modulation + e.unsqueeze(1)).chunk(2, dim=1)  # [B, 1, D] each
        return self.head(self.norm(x) * (1 + scale) + shift)


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back to the input dtype (official `WanLayerNorm`).

    `fused` (set by `WanModel.use_fused_norms`) runs the one-pass Triton kernel of `engine.ops.norms` instead.
    """

    def __init__(self, dim: int, eps: float, elementwise_affine: bool = False) -> None:
        super().__init__(dim, eps=eps, elementwise_affine=elementwise_affine)
        self.fused = False

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None, **residual: torch.Tensor) -> torch.Tensor:
        """`residual` (fused only): the residual=, gate=, residual_out= update of `engine.ops.norms.layer_norm`."""
        if self.fused:
            return norms.layer_norm(x, self.weight, self.bias, self.eps, out_dtype=out_dtype, **residual)
        return super().forward(x.float()).to(out_dtype or x.dtype)

    def modulate(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                 out_dtype: torch.dtype, **residual: torch.Tensor) -> torch.Tensor:
        """norm(x)·(1 + scale) + shift in fp32 (official block: `norm1(x).float() * (1 + scale) + shift`)."""
        if self.fused:
            return norms.layer_norm_modulate(x, shift, scale, self.eps, out_dtype=out_dtype, **residual)
        return (self(x).float() * (1 + scale) + shift).to(out_dtype)


class WanRMSNorm(nn.Module):
    """RMSNorm over the full model dim (all heads jointly), official `WanRMSNorm`.

    Normalises in fp32, rounds to the input dtype, then multiplies by the fp32 weight, so a bf16 input gives
    an fp32 output exactly as the official code under autocast.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.fused = False  # Triton kernel (TurboDiffusion FastRMSNorm: weight applied before the one cast)

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """RMSNorm(x)·weight in out_dtype (fp32 as the official module; bf16 when it only feeds attention)."""
        if self.fused:
            return norms.rms_norm(x, self.weight, self.eps, out_dtype=out_dtype)
        xf = x.float()
        return ((xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight
                ).to(out_dtype)


def _residual_add_(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """x + y(·gate) in one kernel, in place unless autograd still needs x (the norms save their input)."""
    if x.requires_grad:
        return x + y if gate is None else torch.addcmul(x, y, gate)
    return x.add_(y) if gate is None else x.addcmul_(y, gate)


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Official `sinusoidal_embedding_1d`: [B] timesteps → [B, dim] fp32, cos half first, computed in fp64."""
    half = dim // 2
    position = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(position, freqs)  # [B, half]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Head-dim channels rotated by the frame, row and column position: d − 4⌊d/6⌋, 2⌊d/6⌋, 2⌊d/6⌋.

    44/42/42 at d = 128 (official `WanModel.__init__` building `freqs` from three `rope_params`).
    """
    spatial = 2 * (head_dim // 6)
    return head_dim - 2 * spatial, spatial, spatial


def rope_tables(grid: Grid, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the 3-D RoPE angles for every token of a (F', H', W') grid.

    Angles are computed in fp64 on the CPU (as the official fp64 `rope_params`) and only the cos/sin values
    are rounded to fp32, so they match the official complex128 tables to ~6e-8.

    Returns:
        (cos, sin), each [L, 1, head_dim / 2] fp32 with L = F'·H'·W' in (frame, row, column) order; pair j of
        a head is rotated by the angle in column j (broadcast over heads).
    """
    if max(grid) > _ROPE_MAX_POSITIONS:
        raise ValueError(f"token grid {grid} exceeds the {_ROPE_MAX_POSITIONS} RoPE positions per axis")
    axes = []
    for axis, (positions, channels) in enumerate(zip(grid, rope_split(head_dim), strict=True)):
        # ω_j = θ^(−2j/n), j = 0 … n/2 − 1 (official `rope_params`).
        omega = 1.0 / torch.pow(_ROPE_THETA, torch.arange(0, channels, 2, dtype=torch.float64) / channels)
        angles = torch.outer(torch.arange(positions, dtype=torch.float64), omega)  # [positions, channels / 2]
        shape = [1, 1, 1, channels // 2]
        shape[axis] = positions
        axes.append(angles.view(shape).expand(*grid, channels // 2))  # [F', H', W', channels / 2]
    angles = torch.cat(axes, dim=-1).reshape(math.prod(grid), 1, head_dim // 2)  # [L, 1, Dh / 2]
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x_2j, x_2j+1) of x [B, L, H, Dh] by the tables [L, 1, Dh/2], in fp32."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, L, H, Dh / 2, 2]
    x_even, x_odd = pairs.unbind(-1)
    rotated = torch.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], dim=-1)
    return rotated.flatten(-2)  # [B, L, H, Dh]


__all__ = ["WanModel", "sinusoidal_embedding", "rope_split", "rope_tables", "apply_rope"]
