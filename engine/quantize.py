"""W8A8 quantization of the Wan DiT: a module swap plus a saved `-quant` checkpoint (TurboDiffusion's format).

Scheme "w8a8-int8-block128" (TurboDiffusion `inference/modify_model.py: replace_linear_norm`, `ops/core.py`):
every nn.Linear inside `model.blocks` named `self_attn.{q,k,v,o}`, `cross_attn.{q,k,v,o}`, `ffn.0` or `ffn.2`
becomes an `Int8Linear` whose state-dict entries are `<name>.int8_weight` int8 [N, K], `<name>.scale` fp32
[ceil(N/128), ceil(K/128)] and `<name>.bias` (original dtype). Everything else — patch/text/time embeddings,
time_projection, head, modulation, norms, the SLA `proj_l` — keeps its float weights, under the same keys.

Two ways in, as gpt-fast's quantize.py:
- offline: `quantize_checkpoint(in_path, out_path)` (`tdserve quantize IN OUT`) reads an official / TurboWan
  state dict (.pth or .safetensors, an optional `net.` prefix stripped), quantizes the block Linears and writes a
  `-quant` file; `W8A8QuantHandler(model).create_quantized_state_dict()` does the same from a live model;
- runtime: `W8A8QuantHandler(model).convert_for_runtime()` swaps the modules (on the meta device: empty buffers
  for `load_state_dict(assign=True)`; with real weights: quantized in memory by `Int8Linear.from_linear`).

Metadata (scheme, block size, format version) travels inside the file and loaders read it, never the file name:
- .safetensors: the header's `__metadata__` strings `tdserve.quantization.{scheme,block_size,format_version}`.
- .pth: one entry `"tdserve.quantization"` in the saved OrderedDict's `_metadata` attribute — the per-module
  version table that `nn.Module.state_dict()` already carries and `torch.save` / `torch.load(weights_only=True)`
  round-trip. `load_state_dict` looks that table up by module prefix only, and no module is named
  "tdserve.quantization", so the entry is inert: TurboDiffusion's `load_state_dict(strict=True, assign=True)`
  sees exactly the tensor keys it expects (a `__metadata__` *key* would fail its strict check).
TurboDiffusion's own `-quant.pth` files carry no metadata; `quantization_metadata` recognises them by their
`int8_weight` keys (the only scheme they have).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from engine.ops.int8_linear import QUANT_BLOCK, Backend, Int8FeedForward, Int8Linear, quantize_blockwise

StateDict = dict[str, torch.Tensor]

QUANT_SCHEME = "w8a8-int8-block128"
QUANT_FORMAT_VERSION = 1
METADATA_KEY = "tdserve.quantization"
# The block Linears TurboDiffusion quantizes (10 per block); proj_l, embeddings, head and modulation stay float.
_QUANTIZED_LINEAR = re.compile(r"^blocks\.\d+\.(?:(?:self_attn|cross_attn)\.[qkvo]|ffn\.[02])$")
_OPTIONAL_PREFIX = "net."  # rCM training checkpoints wrap the model as `net` (TurboDiffusion strips it too)


@dataclass(frozen=True)
class QuantizationMetadata:
    """What a quantized checkpoint says about itself."""

    scheme: str = QUANT_SCHEME
    block_size: int = QUANT_BLOCK
    format_version: int = QUANT_FORMAT_VERSION

    def to_strings(self) -> dict[str, str]:
        """safetensors header form: flat `tdserve.quantization.<field>` strings."""
        return {f"{METADATA_KEY}.{name}": str(value) for name, value in asdict(self).items()}

    @classmethod
    def from_strings(cls, strings: Mapping[str, str]) -> QuantizationMetadata | None:
        prefix = f"{METADATA_KEY}."
        fields = {k.removeprefix(prefix): v for k, v in strings.items() if k.startswith(prefix)}
        if not fields:
            return None
        return cls(scheme=fields["scheme"], block_size=int(fields["block_size"]),
                   format_version=int(fields["format_version"]))

    def check_supported(self) -> None:
        """Raise if this build cannot run the checkpoint's scheme."""
        if (self.scheme, self.block_size) != (QUANT_SCHEME, QUANT_BLOCK) or self.format_version > QUANT_FORMAT_VERSION:
            raise ValueError(f"unsupported quantized checkpoint {self}: this build runs scheme {QUANT_SCHEME!r}, "
                             f"block {QUANT_BLOCK}, format version ≤ {QUANT_FORMAT_VERSION}; re-run "
                             f"`tdserve quantize` on the float checkpoint")


# ---------------------------------------------------------------------------------------------------------------
# State-dict level (offline)
# ---------------------------------------------------------------------------------------------------------------


def is_quantized_linear_name(module_name: str) -> bool:
    """True for the block Linears the scheme quantizes, e.g. `blocks.3.cross_attn.k` or `blocks.0.ffn.2`."""
    return _QUANTIZED_LINEAR.match(module_name) is not None


def is_quantized_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True when the state dict holds W8A8 `int8_weight` buffers (ours or TurboDiffusion's `-quant` files)."""
    return any(key.endswith(".int8_weight") for key in state_dict)


def quantization_metadata(state_dict: Mapping[str, torch.Tensor]) -> QuantizationMetadata | None:
    """The metadata of a loaded state dict (see module docstring); None for a float checkpoint.

    A quantized state dict without metadata (TurboDiffusion's own `-quant.pth`) is their one scheme.
    """
    table = getattr(state_dict, "_metadata", None) or {}
    entry = table.get(METADATA_KEY)
    if entry is not None:
        return QuantizationMetadata(scheme=str(entry["scheme"]), block_size=int(entry["block_size"]),
                                    format_version=int(entry["format_version"]))
    return QuantizationMetadata() if is_quantized_state_dict(state_dict) else None


def quantize_state_dict(state_dict: Mapping[str, torch.Tensor], *, device: str | torch.device = "cpu") -> StateDict:
    """Quantize the block Linears of an official-key DiT state dict; other tensors pass through unchanged.

    Args:
        state_dict: official Wan / TurboWan keys, optionally prefixed `net.`.
        device: where the quantizer runs ("cpu": the torch reference; "cuda": the Triton kernel, bit-identical).

    Returns:
        An OrderedDict in the input's key order with each `<linear>.weight` replaced by `<linear>.int8_weight`
        and `<linear>.scale` (on the CPU), and our metadata attached.

    Raises:
        ValueError: already quantized, or no block Linear found (wrong key layout: convert to official keys first).
    """
    if is_quantized_state_dict(state_dict):
        raise ValueError("the state dict is already quantized (it has `.int8_weight` keys)")
    backend: Backend = "triton" if torch.device(device).type == "cuda" else "torch"
    quantized: OrderedDict[str, torch.Tensor] = OrderedDict()
    count = 0
    for key, tensor in state_dict.items():
        key = key.removeprefix(_OPTIONAL_PREFIX)
        module_name, _, leaf = key.rpartition(".")
        if leaf == "weight" and is_quantized_linear_name(module_name):
            if tensor.dim() != 2:
                raise ValueError(f"{key} should be a 2-D Linear weight; got shape {tuple(tensor.shape)}")
            int8_weight, scale = quantize_blockwise(tensor.to(device), "int8", backend=backend)
            quantized[f"{module_name}.int8_weight"] = int8_weight.cpu()
            quantized[f"{module_name}.scale"] = scale.cpu()
            count += 1
        else:
            quantized[key] = tensor
    if count == 0:
        raise ValueError("no block Linear (`blocks.N.self_attn.q.weight` …) found: the quantizer expects official "
                         "Wan key names; convert diffusers layouts with engine.checkpoint first")
    quantized._metadata = _with_quantization_entry(state_dict, QuantizationMetadata())  # type: ignore[attr-defined]
    return quantized


def _with_quantization_entry(
    state_dict: Mapping[str, torch.Tensor], metadata: QuantizationMetadata
) -> dict[str, dict[str, object]]:
    """The state dict's `_metadata` table (module versions, if any) plus our entry."""
    table = dict(getattr(state_dict, "_metadata", None) or {})
    table[METADATA_KEY] = asdict(metadata)
    return table


def save_quantized_state_dict(
    state_dict: Mapping[str, torch.Tensor], path: str | Path, metadata: QuantizationMetadata | None = None
) -> None:
    """Write a quantized state dict as .safetensors (metadata in the header) or .pth (metadata in `_metadata`)."""
    metadata = metadata or QuantizationMetadata()
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path),
                  metadata={"format": "pt", **metadata.to_strings()})
        return
    to_save: OrderedDict[str, torch.Tensor] = OrderedDict(state_dict)
    to_save._metadata = _with_quantization_entry(state_dict, metadata)  # type: ignore[attr-defined]
    torch.save(to_save, path)


def load_state_dict_file(path: str | Path) -> OrderedDict[str, torch.Tensor]:
    """Read a .pth (`torch.load(weights_only=True, mmap=True)`) or .safetensors file onto the CPU.

    Our quantization metadata, from either format, ends up in the result's `_metadata[METADATA_KEY]`, so
    `quantization_metadata` reads both the same way.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        state_dict: OrderedDict[str, torch.Tensor] = OrderedDict()
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                state_dict[key] = handle.get_tensor(key)
        metadata = QuantizationMetadata.from_strings(header)
        if metadata is not None:
            state_dict._metadata = {METADATA_KEY: asdict(metadata)}  # type: ignore[attr-defined]
        return state_dict
    loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(loaded, Mapping):
        raise TypeError(f"{path} does not hold a state dict (got {type(loaded).__name__})")
    return loaded if isinstance(loaded, OrderedDict) else OrderedDict(loaded)


def quantize_checkpoint(
    in_path: str | Path, out_path: str | Path, *, device: str | torch.device = "cpu"
) -> QuantizationMetadata:
    """Offline quantizer behind `tdserve quantize IN OUT`: float DiT weights → TurboDiffusion-compatible `-quant` file.

    Args:
        in_path: any DiT layout `engine.checkpoint` reads: an official file or (sharded) folder, a TurboWan
            .pth, a diffusers `transformer/` folder.
        out_path: .pth (loads in TurboDiffusion unchanged) or .safetensors.
        device: "cpu" or "cuda" for the quantizer (identical output).

    Returns:
        The metadata written into the file.
    """
    from engine import checkpoint

    state = checkpoint.strip_prefix(checkpoint.read_state_dict(in_path), "net.")
    if any(k.startswith("condition_embedder.") for k in state):
        state = checkpoint.dit_from_diffusers(state)
    patch = state.get("patch_embedding.weight")
    if patch is not None and patch.dim() == 5:  # TurboDiffusion's patch embedding is a Linear: [D, Cin·1·2·2]
        state = {**state, "patch_embedding.weight": patch.flatten(1)}
    quantized = quantize_state_dict(state, device=device)
    metadata = QuantizationMetadata()
    save_quantized_state_dict(quantized, out_path, metadata)
    return metadata


# ---------------------------------------------------------------------------------------------------------------
# Module level (runtime)
# ---------------------------------------------------------------------------------------------------------------


def replace_linear_int8(model: nn.Module) -> int:
    """Swap the scheme's Linears under `model.blocks` for Int8Linear in place; returns how many were swapped.

    Each block's `ffn` (Linear, GELU(tanh), Linear) becomes an `Int8FeedForward`, which keeps the same children
    and keys but fuses the GELU and the second Linear's activation quantization into the first GEMM.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no `blocks`: W8A8 applies to the Wan DiT")
    swapped = 0
    for index, block in enumerate(blocks):
        targets = [(name, module) for name, module in block.named_modules()
                   if isinstance(module, nn.Linear) and is_quantized_linear_name(f"blocks.{index}.{name}")]
        for name, linear in targets:
            parent_name, _, child_name = name.rpartition(".")
            setattr(block.get_submodule(parent_name), child_name, Int8Linear.from_linear(linear))
            swapped += 1
        ffn = getattr(block, "ffn", None)
        if (isinstance(ffn, nn.Sequential) and len(ffn) == 3 and isinstance(ffn[0], Int8Linear)
                and isinstance(ffn[1], nn.GELU) and ffn[1].approximate == "tanh" and isinstance(ffn[2], Int8Linear)):
            block.ffn = Int8FeedForward(ffn[0], ffn[2])
    return swapped


class W8A8QuantHandler:
    """The W8A8 block-128 scheme for one DiT (gpt-fast's handler shape)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @torch.no_grad()
    def create_quantized_state_dict(self) -> StateDict:
        """The model's state dict with its block Linears quantized (what `quantize_checkpoint` writes)."""
        device = next(self.model.parameters()).device
        return quantize_state_dict(self.model.state_dict(), device="cuda" if device.type == "cuda" else "cpu")

    def convert_for_runtime(self) -> nn.Module:
        """Swap the block Linears for Int8Linear (empty on meta, quantized in memory otherwise)."""
        replace_linear_int8(self.model)
        return self.model
