"""W8A8 module swap and `-quant` checkpoints: keys, metadata, bit-identical reload, TurboDiffusion-style loading."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.ops.int8_linear import Int8Linear, quantize_blockwise_reference
from engine.quantize import (
    METADATA_KEY,
    QUANT_SCHEME,
    QuantizationMetadata,
    W8A8QuantHandler,
    is_quantized_linear_name,
    is_quantized_state_dict,
    load_state_dict_file,
    quantization_metadata,
    quantize_checkpoint,
    quantize_state_dict,
    replace_linear_int8,
)

DIM, FFN_DIM = 160, 288  # not multiples of 128: ragged scale blocks


class _Attention(nn.Module):
    def __init__(self, with_proj_l: bool) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(DIM, DIM) for _ in range(4))
        self.norm_q = nn.LayerNorm(DIM)
        if with_proj_l:  # TurboWan's SLA projection: must stay fp32 / unquantized
            self.attn_op = nn.Module()
            self.attn_op.local_attn = nn.Module()
            self.attn_op.local_attn.proj_l = nn.Linear(64, 64)


class _Block(nn.Module):
    """The official WanAttentionBlock's module names, nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.self_attn = _Attention(with_proj_l=True)
        self.cross_attn = _Attention(with_proj_l=False)
        self.norm3 = nn.LayerNorm(DIM)
        self.ffn = nn.Sequential(nn.Linear(DIM, FFN_DIM), nn.GELU(approximate="tanh"), nn.Linear(FFN_DIM, DIM))
        self.modulation = nn.Parameter(torch.randn(1, 6, DIM))


class _TinyDiT(nn.Module):
    def __init__(self, num_layers: int = 2) -> None:
        super().__init__()
        self.patch_embedding = nn.Linear(64, DIM)
        self.text_embedding = nn.Sequential(nn.Linear(32, DIM), nn.GELU(approximate="tanh"), nn.Linear(DIM, DIM))
        self.blocks = nn.ModuleList(_Block() for _ in range(num_layers))
        self.head = nn.Module()
        self.head.head = nn.Linear(DIM, 64)

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Every quantized Linear once, so a swapped model can be compared numerically."""
        for block in self.blocks:
            for attn in (block.self_attn, block.cross_attn):
                x = attn.o(attn.q(x) + attn.k(x) + attn.v(x))
            x = block.ffn(x)
        return x


QUANTIZED_SUFFIXES = [f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo"] + ["ffn.0", "ffn.2"]


def test_is_quantized_linear_name_selects_exactly_the_block_linears() -> None:
    for suffix in QUANTIZED_SUFFIXES:
        assert is_quantized_linear_name(f"blocks.12.{suffix}")
    for name in ["blocks.0.self_attn.attn_op.local_attn.proj_l", "blocks.0.ffn.1", "patch_embedding", "head.head",
                 "text_embedding.0", "time_projection.1", "blocks.0.self_attn.norm_q", "blocks.0.modulation"]:
        assert not is_quantized_linear_name(name)


def test_quantize_state_dict_replaces_only_block_linears() -> None:
    model = _TinyDiT().to(torch.bfloat16)
    original = model.state_dict()
    quantized = quantize_state_dict(original)
    for index in range(2):
        for suffix in QUANTIZED_SUFFIXES:
            name = f"blocks.{index}.{suffix}"
            weight = original[f"{name}.weight"]
            assert f"{name}.weight" not in quantized
            q, s = quantize_blockwise_reference(weight)
            assert torch.equal(quantized[f"{name}.int8_weight"], q)
            assert torch.equal(quantized[f"{name}.scale"], s)
            assert quantized[f"{name}.scale"].shape == ((weight.shape[0] + 127) // 128, (weight.shape[1] + 127) // 128)
            assert quantized[f"{name}.bias"].dtype == torch.bfloat16  # TurboDiffusion keeps the original dtype
    untouched = [key for key in original if not any(f".{s}." in key for s in QUANTIZED_SUFFIXES)]
    assert "blocks.0.self_attn.attn_op.local_attn.proj_l.weight" in untouched
    for key in untouched:
        assert quantized[key] is original[key]
    assert len(quantized) == len(original) + 2 * len(QUANTIZED_SUFFIXES)  # weight → int8_weight + scale


def test_quantize_state_dict_strips_net_prefix_and_rejects_bad_input() -> None:
    state = {f"net.{k}": v for k, v in _TinyDiT(num_layers=1).state_dict().items()}
    quantized = quantize_state_dict(state)
    assert "blocks.0.ffn.2.int8_weight" in quantized and not any(k.startswith("net.") for k in quantized)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_state_dict(quantized)
    with pytest.raises(ValueError, match="official"):
        quantize_state_dict({"transformer_blocks.0.attn1.to_q.weight": torch.randn(4, 4)})  # diffusers keys


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_quantize_checkpoint_reloads_bit_identically(tmp_path: Path, suffix: str) -> None:
    model = _TinyDiT().to(torch.bfloat16)
    float_path = tmp_path / f"model{suffix}"
    if suffix == ".pth":
        torch.save(model.state_dict(), float_path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(float_path))
    quant_path = tmp_path / f"model-quant{suffix}"

    written = quantize_checkpoint(float_path, quant_path)
    reloaded = load_state_dict_file(quant_path)
    expected = quantize_state_dict(model.state_dict())

    assert sorted(reloaded) == sorted(expected)
    if suffix == ".pth":
        assert list(reloaded) == list(expected)  # torch.save keeps the module order (safetensors sorts keys)
    for key, tensor in expected.items():
        assert reloaded[key].dtype == tensor.dtype and torch.equal(reloaded[key], tensor), key
    assert quantization_metadata(reloaded) == written == QuantizationMetadata()
    assert written.scheme == QUANT_SCHEME and written.block_size == 128 and written.format_version == 1


def test_quant_pth_loads_the_turbodiffusion_way(tmp_path: Path) -> None:
    # TurboDiffusion: torch.load(weights_only=False), swap every block Linear, load_state_dict(strict, assign).
    model = _TinyDiT()
    path = tmp_path / "model-quant.pth"
    torch.save(model.state_dict(), tmp_path / "model.pth")
    quantize_checkpoint(tmp_path / "model.pth", path)
    state = torch.load(path, map_location="cpu", weights_only=False)
    assert METADATA_KEY in state._metadata and METADATA_KEY not in state  # metadata is not a tensor key

    target = _TinyDiT()
    assert replace_linear_int8(target) == 2 * len(QUANTIZED_SUFFIXES)
    result = target.load_state_dict(state, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys

    in_memory = W8A8QuantHandler(model).convert_for_runtime()  # quantized by Int8Linear.from_linear
    x = torch.randn(3, 7, DIM)
    torch.testing.assert_close(target.forward_blocks(x), in_memory.forward_blocks(x), rtol=0, atol=0)


def test_handler_converts_on_meta_then_loads(tmp_path: Path) -> None:
    model = _TinyDiT()
    handler = W8A8QuantHandler(model)
    quantized = handler.create_quantized_state_dict()
    assert is_quantized_state_dict(quantized) and quantization_metadata(quantized) == QuantizationMetadata()

    with torch.device("meta"):
        skeleton = _TinyDiT()
    W8A8QuantHandler(skeleton).convert_for_runtime()
    assert isinstance(skeleton.blocks[1].ffn[2], Int8Linear) and skeleton.blocks[1].ffn[2].int8_weight.is_meta
    assert isinstance(skeleton.blocks[0].self_attn.attn_op.local_attn.proj_l, nn.Linear)
    assert isinstance(skeleton.head.head, nn.Linear) and isinstance(skeleton.patch_embedding, nn.Linear)
    skeleton.load_state_dict(quantized, strict=True, assign=True)

    x = torch.randn(2, 5, DIM)
    reference = W8A8QuantHandler(model).convert_for_runtime().forward_blocks(x)
    torch.testing.assert_close(skeleton.forward_blocks(x), reference, rtol=0, atol=0)


def test_quantization_metadata_of_float_and_foreign_files() -> None:
    float_state = _TinyDiT(num_layers=1).state_dict()
    assert quantization_metadata(float_state) is None and not is_quantized_state_dict(float_state)
    # TurboDiffusion's own -quant.pth: int8 keys, no metadata → their one scheme.
    foreign = OrderedDict(quantize_state_dict(float_state))
    assert quantization_metadata(foreign) == QuantizationMetadata()
    newer = OrderedDict(foreign)
    newer._metadata = {METADATA_KEY: {"scheme": QUANT_SCHEME, "block_size": 128, "format_version": 99}}
    with pytest.raises(ValueError, match="format version"):
        quantization_metadata(newer).check_supported()  # type: ignore[union-attr]


def test_replace_linear_int8_on_wan_model_swaps_ten_per_block() -> None:
    from engine.configs import from_name
    from engine.models.dit import WanModel

    config = from_name("tiny-t2v").dit
    with torch.device("meta"):
        model = WanModel(dim=config.dim, ffn_dim=config.ffn_dim, num_heads=config.num_heads,
                         num_layers=config.num_layers, text_dim=config.text_dim, freq_dim=config.freq_dim)
    float_keys = set(model.state_dict())
    assert replace_linear_int8(model) == 10 * config.num_layers
    quant_keys = set(model.state_dict())
    for index in range(config.num_layers):
        for suffix in QUANTIZED_SUFFIXES:
            name = f"blocks.{index}.{suffix}"
            assert f"{name}.weight" in float_keys and f"{name}.weight" not in quant_keys
            assert {f"{name}.int8_weight", f"{name}.scale", f"{name}.bias"} <= quant_keys
    assert {k for k in float_keys if not k.startswith("blocks.")} <= quant_keys  # embeddings, head untouched


def test_tdserve_quantize_cli_writes_a_loadable_quant_file(tmp_path: Path) -> None:
    """`tdserve quantize` on an official-layout safetensors DiT writes TurboDiffusion's layout: 2-D patch
    embedding, int8_weight/scale buffers, and it loads back through the pipeline's checkpoint path."""
    from safetensors.torch import save_file

    from engine.checkpoint import normalize_dit_state_dict
    from engine.configs import from_name
    from engine.models.dit import WanModel
    from service.cli import main

    cfg = from_name("tiny-t2v").dit
    state = {k: v.contiguous() for k, v in WanModel.from_config(cfg).state_dict().items()}
    save_file(state, str(tmp_path / "dit.safetensors"))
    assert main(["quantize", str(tmp_path / "dit.safetensors"), str(tmp_path / "dit-quant.pth")]) == 0
    written = torch.load(tmp_path / "dit-quant.pth", weights_only=True)
    assert written["patch_embedding.weight"].dim() == 2
    assert written["blocks.0.ffn.0.int8_weight"].dtype == torch.int8
    assert "blocks.0.ffn.0.weight" not in written
    back = normalize_dit_state_dict(written, cfg.in_dim)
    assert back["patch_embedding.weight"].shape == state["patch_embedding.weight"].shape
    assert main(["quantize", str(tmp_path / "missing.pth"), str(tmp_path / "x.pth")]) == 2
