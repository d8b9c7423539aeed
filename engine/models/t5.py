"""umT5-XXL text encoder (encoder only), its tokenizer and the prompt-embedding wrapper of the Wan pipelines.

The whole text path lives in this file: `TextEncoder` (clean -> tokenize -> encode -> zero the padding rows,
with an LRU cache), then `UMT5Encoder` and its layers, then the `Tokenizer` and the text cleaning.

Follows Wan-Video/Wan2.1 `wan/modules/t5.py` (`T5Encoder`, built by `umt5_xxl(encoder_only=True)`) and
`wan/modules/tokenizers.py` (`HuggingfaceTokenizer`, clean="whitespace"); identical in Wan2.2. Numerics as the
official pure-bf16 encoder:
- pre-norm blocks `x + attn(norm1(x))`, `x + ffn(norm2(x))`, final `norm`; T5 RMSNorm (no mean, no bias) with
  the variance in fp32, eps 1e-6;
- attention without the 1/sqrt(d) scale (T5 folds it into the init), additive bias = relative position bias +
  `finfo(dtype).min` on masked keys, softmax in fp32;
- a relative position bias per layer (umT5; T5 shares one): 32 bidirectional buckets, max distance 128;
- gated-GELU FFN `fc2(fc1(x) * gelu_tanh(gate(x)))`, no biases anywhere.
transformers' `UMT5EncoderModel` computes the same function (the key map is in the tests); it keeps `wo` in
fp32 when loaded in bf16, the official encoder does not.

Text rule (wan.md §9.5): the encoder output is trimmed to each prompt's true length (tokens + EOS) and
zero-padded back to 512 rows; the DiT's cross-attention takes those 512 rows without a mask.
"""

from __future__ import annotations

import html
import math
import re
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from engine.configs import T5Config

if TYPE_CHECKING:  # the tokenizers package is imported when a tokenizer is built, so the engine imports without it
    from tokenizers import Tokenizer as _BackendTokenizer

try:  # optional, as in the official cleaning; without it prompts skip only the mojibake repair step
    import ftfy
except ImportError:
    ftfy = None

PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"  # ids 0, 1, 2 in umT5 and in the byte tokenizer
MAX_DISTANCE = 128  # T5RelativeEmbedding(max_dist=128): relative distances beyond this share the last bucket
EPS = 1e-6  # T5LayerNorm eps


class TextEncoder:
    """Prompts -> `[B, text_len, dim]` DiT context: official cleaning, tokenizer, umT5, zeroed padding.

    Rows past each prompt's true length (tokens + EOS) are exactly zero: the official encoder trims its output
    to that length and the DiT zero-pads it back to `text_len` (wan.md §9.5). Because those rows are dropped,
    the encoder runs on the batch's longest true length only; masked keys get weight exp(finfo.min) = 0, so
    the kept rows are the ones the full 512-token pass gives.

    Embeddings are cached per cleaned prompt (LRU, on the encoder's device). `hits` counts prompts served from
    the cache, `misses` prompts that ran through the encoder.
    """

    def __init__(self, tokenizer: Tokenizer, model: UMT5Encoder, cache_size: int = 64) -> None:
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.tokenizer = tokenizer
        self.model = model
        self.cache_size = cache_size
        self.hits = 0
        self.misses = 0
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @classmethod
    def from_spec(
        cls,
        t5_cfg: T5Config,
        tokenizer_path: str | Path | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        cache_size: int = 64,
    ) -> TextEncoder:
        """Tokenizer + encoder for a spec's T5Config; weights are the official random init until loaded.

        Args:
            t5_cfg: `ModelSpec.t5`.
            tokenizer_path: the umT5 `tokenizer.json` or the folder holding it (`<ckpt>/google/umt5-xxl`);
                required when `t5_cfg.tokenizer == "umt5-xxl"`, unused for the built-in "bytes" tokenizer.
            device: where the encoder is built; "meta" to load a checkpoint with `assign=True` afterwards.
            dtype: encoder dtype (the official encoder runs in bf16).
            cache_size: prompt embeddings kept (0 disables the cache).

        Raises:
            ValueError: a umT5 spec without `tokenizer_path`.
        """
        if t5_cfg.tokenizer == "bytes":
            tokenizer = Tokenizer.byte_level(text_len=t5_cfg.text_len)
        elif tokenizer_path is None:
            raise ValueError(
                "the umT5 tokenizer needs tokenizer_path: the tokenizer.json of google/umt5-xxl, shipped in "
                "every Wan checkpoint folder as <ckpt>/google/umt5-xxl/tokenizer.json"
            )
        else:
            tokenizer = Tokenizer.from_file(tokenizer_path, text_len=t5_cfg.text_len)
        with torch.device(device):
            model = UMT5Encoder.from_config(t5_cfg)
        return cls(tokenizer, model.to(dtype=dtype).eval(), cache_size=cache_size)

    @property
    def text_len(self) -> int:
        return self.tokenizer.text_len

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Encode prompts (cached per cleaned prompt).

        Returns:
            [B, text_len, dim] in the encoder's dtype and device; rows past each prompt's length are zero.
        """
        if not prompts:
            raise ValueError("encode needs at least one prompt")
        cleaned = [clean_prompt(p) for p in prompts]
        found: dict[str, torch.Tensor] = {}
        for text in cleaned:
            if text in self._cache:
                self._cache.move_to_end(text)
                found[text] = self._cache[text]
        todo = list(dict.fromkeys(t for t in cleaned if t not in found))  # unique, in order
        if todo:
            found.update(zip(todo, self._encode_uncached(todo).unbind(0)))
            for text in todo:
                self._remember(text, found[text].clone())  # not a view: would pin the whole batch
        self.misses += len(todo)
        self.hits += len(cleaned) - len(todo)
        return torch.stack([found[t] for t in cleaned])

    def _encode_uncached(self, texts: list[str]) -> torch.Tensor:
        """[N, text_len, dim] for already-cleaned texts."""
        ids, mask = self.tokenizer(texts)  # [N, text_len] on the CPU
        lengths = mask.sum(dim=1)  # tokens + EOS, host-side: no device sync
        run_len = int(lengths.max())
        device = self.model.token_embedding.weight.device
        hidden = self.model(ids[:, :run_len].to(device), mask[:, :run_len].to(device))  # [N, run_len, dim]
        padding = torch.arange(run_len)[None, :] >= lengths[:, None]  # [N, run_len]
        out = hidden.new_zeros(len(texts), self.text_len, hidden.shape[-1])
        out[:, :run_len] = hidden.masked_fill(padding.to(device)[..., None], 0.0)
        return out

    def _remember(self, text: str, embedding: torch.Tensor) -> None:
        if self.cache_size == 0:
            return
        self._cache[text] = embedding
        self._cache.move_to_end(text)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def clear_cache(self) -> None:
        self._cache.clear()


# ------------------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------------------


class UMT5Encoder(nn.Module):
    """umT5 encoder with the official `T5Encoder` kwargs and state-dict keys (shared_pos=False, no dropout).

    Keys (umT5-XXL: 242 tensors): `token_embedding.weight`, `blocks.N.{norm1, attn.{q,k,v,o}, norm2,
    ffn.{gate.0, fc1, fc2}, pos_embedding.embedding}.weight`, `norm.weight`.
    """

    def __init__(
        self,
        vocab: int,
        dim: int,
        dim_attn: int,
        dim_ffn: int,
        num_heads: int,
        num_layers: int,
        num_buckets: int = 32,
    ) -> None:
        super().__init__()
        if dim_attn % num_heads:
            raise ValueError(f"dim_attn {dim_attn} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.num_buckets = num_buckets
        self.token_embedding = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            UMT5Block(dim, dim_attn, dim_ffn, num_heads, num_buckets) for _ in range(num_layers)
        )
        self.norm = T5RMSNorm(dim)
        # Relative-position buckets depend only on the length: computed once per (L, device) for all layers.
        self._buckets: dict[tuple[int, torch.device], torch.Tensor] = {}
        self.apply(_init_weights)

    @classmethod
    def from_config(cls, cfg: T5Config) -> UMT5Encoder:
        return cls(
            cfg.vocab, cfg.dim, cfg.dim_attn, cfg.dim_ffn, cfg.num_heads, cfg.num_layers, cfg.num_buckets
        )

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encode token ids.

        Args:
            ids: [B, L] int64 token ids.
            mask: [B, L], nonzero for real tokens; zero keys are masked out. None attends to every key.

        Returns:
            [B, L, dim] in the parameters' dtype (rows at padded positions are computed, not zeroed).
        """
        x = self.token_embedding(ids)  # [B, L, dim]
        buckets = self._relative_buckets(ids.shape[1], ids.device)
        key_keep = None if mask is None else (mask != 0)[:, None, None, :]  # [B, 1, 1, L]
        for block in self.blocks:
            x = block(x, buckets, key_keep)
        return self.norm(x)

    def _relative_buckets(self, length: int, device: torch.device) -> torch.Tensor:
        key = (length, device)
        if key not in self._buckets:
            self._buckets[key] = relative_position_buckets(length, self.num_buckets, MAX_DISTANCE, device)
        return self._buckets[key]


class UMT5Block(nn.Module):
    """Official `T5SelfAttention` block with its own relative position bias (umT5)."""

    def __init__(self, dim: int, dim_attn: int, dim_ffn: int, num_heads: int, num_buckets: int) -> None:
        super().__init__()
        self.norm1 = T5RMSNorm(dim)
        self.attn = T5Attention(dim, dim_attn, num_heads)
        self.norm2 = T5RMSNorm(dim)
        self.ffn = T5GatedFeedForward(dim, dim_ffn)
        self.pos_embedding = RelativePositionBias(num_buckets, num_heads)

    def forward(self, x: torch.Tensor, buckets: torch.Tensor, key_keep: torch.Tensor | None) -> torch.Tensor:
        bias = self.pos_embedding(buckets)  # [1, H, L, L]
        if key_keep is not None:
            # Official: attn_bias.masked_fill_(mask == 0, finfo(dtype).min) -> [B, H, L, L]
            bias = bias.masked_fill(~key_keep, torch.finfo(bias.dtype).min)
        x = x + self.attn(self.norm1(x), bias)
        return x + self.ffn(self.norm2(x))


class T5Attention(nn.Module):
    """Self-attention without the 1/sqrt(d) scale; scores + bias in the model dtype, softmax in fp32."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim_attn // num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        q = self.q(x).view(b, length, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, L, D]
        k = self.k(x).view(b, length, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, L, D]
        v = self.v(x).view(b, length, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, L, D]
        scores = torch.matmul(q, k.transpose(-1, -2)) + bias  # [B, H, L, L]
        probs = F.softmax(scores.float(), dim=-1).type_as(scores)
        out = torch.matmul(probs, v)  # [B, H, L, D]
        return self.o(out.transpose(1, 2).reshape(b, length, -1))  # [B, L, H*D] -> [B, L, dim]


class T5GatedFeedForward(nn.Module):
    """`fc2(fc1(x) * gelu_tanh(gate(x)))`; `gate` is a Sequential so its key reads `gate.0` (checkpoint)."""

    def __init__(self, dim: int, dim_ffn: int) -> None:
        super().__init__()
        # The official GELU is the tanh formula written out (HF "gelu_new"); F.gelu(approximate="tanh") is it.
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


class RelativePositionBias(nn.Module):
    """Per-layer bias table `embedding [num_buckets, num_heads]` (official `T5RelativeEmbedding`)."""

    def __init__(self, num_buckets: int, num_heads: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)  # [Lq, Lk, H] -> [1, H, Lq, Lk]


class T5RMSNorm(nn.Module):
    """T5LayerNorm: x / rms(x) with the variance in fp32, cast to the weight's dtype, times the weight."""

    def __init__(self, dim: int, eps: float = EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * normed.to(self.weight.dtype)


def relative_position_buckets(
    length: int, num_buckets: int, max_distance: int, device: torch.device | str
) -> torch.Tensor:
    """Bidirectional T5 buckets of `key_pos - query_pos` (official `_relative_position_bucket`).

    Half the buckets per direction (positive distances offset by num_buckets/2); within a direction distances
    below half of that are exact, larger ones fall in log-spaced buckets up to `max_distance`.

    Returns:
        [L, L] int64 bucket ids, rows = query positions.
    """
    positions = torch.arange(length, device=device)
    rel = positions[None, :] - positions[:, None]  # [Lq, Lk]
    half = num_buckets // 2
    buckets = (rel > 0).long() * half
    rel = rel.abs()
    max_exact = half // 2
    # log(0) = -inf for rel = 0 gives a garbage large bucket; torch.where below takes the exact one there.
    large = max_exact + (
        torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    ).long()
    large = large.clamp(max=half - 1)
    return buckets + torch.where(rel < max_exact, rel, large)


@torch.no_grad()
def _init_weights(module: nn.Module) -> None:
    """Official `init_weights` (wan/modules/t5.py); the token embedding keeps nn.Embedding's N(0, 1)."""
    if isinstance(module, T5RMSNorm):
        nn.init.ones_(module.weight)
    elif isinstance(module, T5GatedFeedForward):
        dim, dim_ffn = module.fc1.in_features, module.fc1.out_features
        nn.init.normal_(module.gate[0].weight, std=dim**-0.5)
        nn.init.normal_(module.fc1.weight, std=dim**-0.5)
        nn.init.normal_(module.fc2.weight, std=dim_ffn**-0.5)
    elif isinstance(module, T5Attention):
        dim, dim_attn = module.q.in_features, module.q.out_features
        nn.init.normal_(module.q.weight, std=(dim * dim_attn) ** -0.5)
        nn.init.normal_(module.k.weight, std=dim**-0.5)
        nn.init.normal_(module.v.weight, std=dim**-0.5)
        nn.init.normal_(module.o.weight, std=(module.num_heads * dim_attn) ** -0.5)
    elif isinstance(module, RelativePositionBias):
        num_buckets, num_heads = module.embedding.weight.shape
        nn.init.normal_(module.embedding.weight, std=(2 * num_buckets * num_heads) ** -0.5)


# ------------------------------------------------------------------------------------------------------------
# Tokenizer and text cleaning
# ------------------------------------------------------------------------------------------------------------


class Tokenizer:
    """Fixed-length tokenizer on the `tokenizers` package (no transformers, no sentencepiece at runtime).

    Same output as the official call `AutoTokenizer(...)(texts, padding="max_length", truncation=True,
    max_length=512, add_special_tokens=True)`: `</s>` appended, right truncation that keeps the EOS (511 text
    tokens at most), right padding with `<pad>`.

    umT5 needs the fast-tokenizer file `tokenizer.json` of google/umt5-xxl (16.8 MB). Every Wan checkpoint
    folder ships it as `<ckpt>/google/umt5-xxl/tokenizer.json` next to `spiece.model`,
    `special_tokens_map.json` and `tokenizer_config.json`; the Wan Diffusers repos have it under `tokenizer/`.
    `spiece.model` alone is not enough: converting it (tokenizers' `SentencePieceUnigramTokenizer.from_spm`)
    needs protobuf and sentencepiece's `sentencepiece_model_pb2.py`, which this engine does not depend on.
    """

    def __init__(self, backend: _BackendTokenizer, *, text_len: int = 512) -> None:
        from tokenizers import processors

        self.text_len = text_len
        self.pad_id = _required_token_id(backend, PAD_TOKEN)
        self.eos_id = _required_token_id(backend, EOS_TOKEN)
        # Set, not trusted from the file: T5's template "$A </s>" (transformers T5Converter) and the official
        # padding/truncation call; tokenizers truncates to max_length minus the template's added tokens.
        backend.post_processor = processors.TemplateProcessing(
            single=f"$A {EOS_TOKEN}",
            pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}",
            special_tokens=[(EOS_TOKEN, self.eos_id)],
        )
        backend.enable_truncation(max_length=text_len)
        backend.enable_padding(length=text_len, pad_id=self.pad_id, pad_token=PAD_TOKEN)
        self.backend = backend

    @classmethod
    def from_file(cls, path: str | Path, *, text_len: int = 512) -> Tokenizer:
        """Load a `tokenizer.json`, or the folder holding one (e.g. `<ckpt>/google/umt5-xxl`).

        Raises:
            FileNotFoundError: no tokenizer.json at `path`; the message says which file to put where.
        """
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json at {file}: copy google/umt5-xxl/tokenizer.json from a Wan checkpoint "
                "folder (or tokenizer/tokenizer.json of a Wan Diffusers repo) there; spiece.model alone is "
                "not supported"
            )
        from tokenizers import Tokenizer as _BackendTokenizer

        return cls(_BackendTokenizer.from_file(str(file)), text_len=text_len)

    @classmethod
    def byte_level(cls, *, text_len: int = 512) -> Tokenizer:
        """Byte-level tokenizer of the tiny specs: id = UTF-8 byte + 3, pad 0, eos 1, unk 2 (vocab 259)."""
        byte_chars = _bytes_to_unicode()
        vocab = {PAD_TOKEN: 0, EOS_TOKEN: 1, UNK_TOKEN: 2} | {byte_chars[b]: b + 3 for b in range(256)}
        from tokenizers import Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as _BackendTokenizer

        backend = _BackendTokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
        # ByteLevel maps each UTF-8 byte to one printable character (GPT-2 alphabet); Split isolates each.
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                pre_tokenizers.Split(Regex("."), behavior="isolated"),
            ]
        )
        backend.decoder = decoders.ByteLevel()
        return cls(backend, text_len=text_len)

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize (already cleaned) texts.

        Returns:
            ids [B, text_len] int64 and mask [B, text_len] int64 (1 = token or EOS, 0 = padding), on the CPU.
        """
        encodings = self.backend.encode_batch(texts, add_special_tokens=True)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
        return ids, mask


def clean_prompt(text: str) -> str:
    """Official clean="whitespace": ftfy.fix_text, html.unescape twice, strip, collapse whitespace, strip.

    `ftfy` is optional (not a dependency): when it is not importable the fix_text step is skipped, which only
    matters for prompts carrying mojibake or odd Unicode that ftfy would repair.
    """
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def _required_token_id(backend: _BackendTokenizer, token: str) -> int:
    token_id = backend.token_to_id(token)
    if token_id is None:
        raise ValueError(f"tokenizer has no {token!r} token; expected the umT5 (T5) special tokens")
    return token_id


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of the `tokenizers` ByteLevel pre-tokenizer."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table = {b: chr(b) for b in printable}
    for offset, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + offset)
    return table


__all__ = ["TextEncoder", "UMT5Encoder", "Tokenizer", "clean_prompt", "relative_position_buckets"]
