"""umT5 encoder, tokenizers and TextEncoder (engine/models/t5.py) on the CPU with tiny configs.

The encoder is checked against an independent implementation, transformers' `UMT5EncoderModel`, on the
same random weights, renamed by the engine's own official -> transformers map
(`engine.checkpoint.t5_to_transformers`, wan.md §9.3); the umT5 tokenizer path against
transformers' fast tokenizer reading the same tokenizer.json (what the official `AutoTokenizer` call runs).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, normalizers, pre_tokenizers, processors

from engine.checkpoint import t5_from_transformers, t5_to_transformers
from engine.configs import T5Config, from_name
from engine.models.t5 import (
    TextEncoder,
    Tokenizer,
    UMT5Encoder,
    clean_prompt,
    relative_position_buckets,
)

TINY_T5 = from_name("tiny-t2v").t5  # dim 64, 4 heads of 16, 2 layers, vocab 259
# dim_attn != dim, 3 layers: catches a q/k/v/o width mix-up that dim == dim_attn hides.
WIDE_ATTN_T5 = T5Config(
    vocab=300, dim=48, dim_attn=64, dim_ffn=96, num_heads=4, num_layers=3, tokenizer="bytes"
)


def _randomised_encoder(cfg: T5Config, seed: int) -> UMT5Encoder:
    """Encoder with every tensor redrawn: norm weights around 1, a strong position bias, outlier tokens."""
    gen = torch.Generator().manual_seed(seed)
    model = UMT5Encoder.from_config(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                param.copy_(1.0 + 0.2 * noise)
            elif "pos_embedding" in name:
                param.copy_(2.0 * noise)
            elif name == "token_embedding.weight":
                param.copy_(noise)
                param[torch.randint(cfg.vocab, (8,), generator=gen)] *= 30.0  # outlier rows
            else:
                param.copy_(noise * param.shape[-1] ** -0.5)
    return model


def _transformers_reference(model: UMT5Encoder, cfg: T5Config) -> torch.nn.Module:
    from transformers import UMT5Config, UMT5EncoderModel

    hf_cfg = UMT5Config(
        vocab_size=cfg.vocab,
        d_model=cfg.dim,
        d_kv=cfg.dim_attn // cfg.num_heads,
        d_ff=cfg.dim_ffn,
        num_heads=cfg.num_heads,
        num_layers=cfg.num_layers,
        relative_attention_num_buckets=cfg.num_buckets,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        dense_act_fn="gelu_new",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
    )
    reference = UMT5EncoderModel(hf_cfg).eval()
    mapped = t5_to_transformers(model.state_dict())
    # transformers holds the tied embedding twice (`shared` and `encoder.embed_tokens`); the map names it once.
    mapped["encoder.embed_tokens.weight"] = mapped["shared.weight"]
    reference.load_state_dict(mapped, strict=True)
    # The loader's inverse map (transformers `text_encoder/` folders) gives back exactly the official keys.
    assert t5_from_transformers(reference.state_dict()).keys() == model.state_dict().keys()
    return reference


@pytest.mark.parametrize("cfg", [TINY_T5, WIDE_ATTN_T5], ids=["tiny-t2v", "dim_attn-ne-dim"])
def test_umt5_encoder_matches_transformers_fp32(cfg: T5Config) -> None:
    model = _randomised_encoder(cfg, seed=1)
    reference = _transformers_reference(model, cfg)
    # L = 200 > max distance 128: exact, log-spaced and clamped buckets in both directions all occur.
    lengths = torch.tensor([200, 131, 7])
    ids = torch.randint(3, cfg.vocab, (3, 200))
    mask = (torch.arange(200)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        ours = model(ids, mask)
        ref = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    err = (ours[valid] - ref[valid]).abs().max() / ref[valid].abs().max()
    # Same fp32 function; only summation order differs (einsum vs matmul, fused vs explicit GELU).
    assert err <= 1e-4, f"max|diff|/max|ref| = {err:.2e}"


def test_umt5_encoder_bf16_tracks_fp32() -> None:
    model = _randomised_encoder(TINY_T5, seed=2)
    ids = torch.randint(3, TINY_T5.vocab, (2, 64))
    mask = (torch.arange(64)[None, :] < torch.tensor([[64], [20]])).long()  # finfo(bf16).min on padded keys
    with torch.no_grad():
        ref = model(ids, mask)
        ours = model.to(torch.bfloat16)(ids, mask)
    assert ours.dtype == torch.bfloat16 and ours.isfinite().all()
    err = (ours.float() - ref).abs().max() / ref.abs().max()
    # bf16 rounds every op to 8 mantissa bits (2^-8 = 4e-3); through 2 layers with unscaled scores and outlier
    # tokens this measures 2e-2 to 3.5e-2 over seeds, so 6e-2 (while a wrong formula gives O(1)).
    assert err <= 6e-2, f"bf16 vs fp32: {err:.2e}"


def test_umt5_encoder_full_size_keys_and_shapes_on_meta() -> None:
    with torch.device("meta"):
        model = UMT5Encoder.from_config(T5Config())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # wan.md §9.2: the keys of models_t5_umt5-xxl-enc-bf16.pth.
    expected = {"token_embedding.weight": (256384, 4096), "norm.weight": (4096,)}
    for n in range(24):
        expected |= {
            f"blocks.{n}.norm1.weight": (4096,),
            f"blocks.{n}.attn.q.weight": (4096, 4096),
            f"blocks.{n}.attn.k.weight": (4096, 4096),
            f"blocks.{n}.attn.v.weight": (4096, 4096),
            f"blocks.{n}.attn.o.weight": (4096, 4096),
            f"blocks.{n}.norm2.weight": (4096,),
            f"blocks.{n}.ffn.gate.0.weight": (10240, 4096),
            f"blocks.{n}.ffn.fc1.weight": (10240, 4096),
            f"blocks.{n}.ffn.fc2.weight": (4096, 10240),
            f"blocks.{n}.pos_embedding.embedding.weight": (32, 64),
        }
    assert len(shapes) == 242
    assert shapes == expected


def test_relative_position_buckets_values() -> None:
    buckets = relative_position_buckets(300, num_buckets=32, max_distance=128, device="cpu")
    row = buckets[150]  # query at 150: key - query runs from -150 to 149
    assert row[150] == 0
    assert row[151] == 16 + 1 and row[149] == 1  # keys after the query use the upper 16 buckets
    assert row[150 + 7] == 16 + 7 and row[150 + 8] == 16 + 8  # exact below 8, first log bucket at 8
    assert row[150 + 127] == 16 + 15 and row[0] == 15  # |d| >= 128 (and just below) saturate at bucket 15
    # log buckets: 8 + floor(log(d / 8) / log(16) * 8); d = 16 -> 10, d = 32 -> 12, d = 64 -> 14
    assert [int(row[150 - d]) for d in (16, 32, 64)] == [10, 12, 14]


def test_byte_tokenizer_ids_eos_and_padding() -> None:
    tok = Tokenizer.byte_level()
    prompts = ["héllo 世界 🎬\n\t~", ""]
    ids, mask = tok(prompts)
    assert ids.shape == mask.shape == (2, 512) and ids.dtype == mask.dtype == torch.int64
    raw = list(prompts[0].encode("utf-8"))
    assert ids[0, : len(raw)].tolist() == [b + 3 for b in raw]
    assert ids[0, len(raw)] == 1 and mask[0].sum() == len(raw) + 1
    assert (ids[0, len(raw) + 1 :] == 0).all() and (mask[0, len(raw) + 1 :] == 0).all()
    assert ids[1, 0] == 1 and mask[1].sum() == 1  # an empty prompt is just the EOS


def test_byte_tokenizer_covers_every_utf8_byte() -> None:
    # Code points whose UTF-8 forms use every byte that valid UTF-8 can contain (0x00-0xF4 except C0, C1).
    chars = [chr(c) for c in range(0x800)]
    chars += [chr(0x800 + 0x1000 * k) for k in range(16) if not 0xD800 <= 0x800 + 0x1000 * k < 0xE000]
    chars += [chr(0xD000), *(chr(max(0x10000, 0x40000 * k)) for k in range(5))]  # leads ED and F0-F4
    prompts = ["".join(chars[i : i + 100]) for i in range(0, len(chars), 100)]
    ids, mask = Tokenizer.byte_level(text_len=512)(prompts)
    seen = set()
    for row, length, prompt in zip(ids, mask.sum(1), prompts):
        raw = list(prompt.encode("utf-8"))
        assert row[: length - 1].tolist() == [b + 3 for b in raw]
        seen.update(raw)
    assert seen == set(range(0xF5)) - {0xC0, 0xC1}


def test_byte_tokenizer_truncates_to_511_tokens_plus_eos() -> None:
    tok = Tokenizer.byte_level()
    ids, mask = tok(["a" * 511, "b" * 512, "c" * 2000])
    assert (mask == 1).all()  # 511 + EOS fills 512 exactly
    for row, letter in zip(ids, "abc"):
        assert (row[:511] == ord(letter) + 3).all() and row[511] == 1


def _tiny_unigram_tokenizer_json(path: Path) -> Path:
    """A small umT5-shaped tokenizer.json: Unigram pieces, Metaspace, specials 0/1/2, template "$A </s>"."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -1.0) for w in ("a", "cat", "dog", "on", "the", "mat", "red")]
    pieces += [(c, -4.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    backend = BackendTokenizer(models.Unigram(pieces, unk_id=2))
    backend.normalizer = normalizers.Replace(" {2,}", " ")
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.add_special_tokens(["<pad>", "</s>", "<unk>"])
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    file = path / "tokenizer.json"
    backend.save(str(file))
    return file


def test_tokenizer_from_file_matches_transformers_fast_tokenizer(tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    file = _tiny_unigram_tokenizer_json(tmp_path)
    ours = Tokenizer.from_file(tmp_path)  # the folder form, as <ckpt>/google/umt5-xxl
    reference = PreTrainedTokenizerFast(tokenizer_file=str(file), pad_token="<pad>", eos_token="</s>")
    prompts = ["a red cat on the mat", "the dog 7 !", "", " ".join(["the cat"] * 400)]  # last: > 512 tokens
    ids, mask = ours(prompts)
    # The official call (wan/modules/tokenizers.py HuggingfaceTokenizer with seq_len=512).
    ref = reference(prompts, padding="max_length", truncation=True, max_length=512, add_special_tokens=True)
    assert ids.tolist() == ref["input_ids"]
    assert mask.tolist() == ref["attention_mask"]
    assert ids[3, 511] == 1 and ids[0, 0] != 0  # truncation kept the EOS; tokens really came out


def test_tokenizer_from_file_missing_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "spiece.model").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_file(tmp_path)


def test_text_encoder_umt5_spec_needs_tokenizer_path() -> None:
    with pytest.raises(ValueError, match="google/umt5-xxl/tokenizer.json"):
        TextEncoder.from_spec(T5Config(), device="meta")


@pytest.mark.parametrize(
    ("raw", "cleaned"),
    [
        ("  a  cat\n\ton the\u00a0mat  ", "a cat on the mat"),
        ("&amp;lt;b&amp;gt; &amp;amp;", "<b> &"),  # double-escaped entities: unescaped twice
        ("Tom &amp; Jerry&#39;s", "Tom & Jerry's"),
        ("\n\n", ""),
    ],
)
def test_clean_prompt_official_whitespace_rule(raw: str, cleaned: str) -> None:
    assert clean_prompt(raw) == cleaned


def _tiny_text_encoder(cache_size: int = 64) -> TextEncoder:
    encoder = TextEncoder.from_spec(TINY_T5, dtype=torch.float32, cache_size=cache_size)
    encoder.model.load_state_dict(_randomised_encoder(TINY_T5, seed=3).state_dict())
    return encoder


def test_text_encoder_zeroes_rows_past_each_prompt_length() -> None:
    encoder = _tiny_text_encoder()
    prompts = ["a cat", "a much longer prompt about a dog on a mat", ""]
    out = encoder.encode(prompts)
    assert out.shape == (3, 512, 64) and out.dtype == torch.float32
    for row, prompt in zip(out, prompts):
        length = len(prompt.encode()) + 1  # bytes + EOS
        assert torch.equal(row[length:], torch.zeros_like(row[length:]))
        assert (row[:length].abs().sum(-1) > 0).all()


def test_text_encoder_valid_rows_independent_of_padding() -> None:
    encoder = _tiny_text_encoder(cache_size=0)
    short = "a cat on the mat"
    alone = encoder.encode([short])[0]
    batched = encoder.encode([short, "x" * 300])[0]  # runs at 301 positions instead of 17
    # The official way: all 512 positions through the encoder with the mask, then trim.
    ids, mask = encoder.tokenizer([short])
    with torch.no_grad():
        full = encoder.model(ids, mask)[0]
    length = len(short) + 1
    # Masked keys weigh exp(finfo.min) = 0 exactly; what remains is GEMM summation order at other sizes.
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone[:length], full[:length], rtol=1e-5, atol=1e-6)


def test_text_encoder_cache_hits_by_cleaned_prompt() -> None:
    encoder = _tiny_text_encoder(cache_size=2)
    first = encoder.encode(["a cat", "a dog"])
    assert (encoder.hits, encoder.misses) == (0, 2)
    again = encoder.encode(["a  dog ", "a cat", "a cat"])  # same cleaned prompts
    assert (encoder.hits, encoder.misses) == (3, 2)
    assert torch.equal(again[0], first[1])
    assert torch.equal(again[1], first[0]) and torch.equal(again[2], first[0])
    encoder.encode(["a bird"])  # evicts the least recently used prompt, "a dog"
    encoder.encode(["a dog"])
    assert (encoder.hits, encoder.misses) == (3, 4)


def test_text_encoder_rejects_empty_prompt_list() -> None:
    with pytest.raises(ValueError, match="at least one prompt"):
        _tiny_text_encoder().encode([])
