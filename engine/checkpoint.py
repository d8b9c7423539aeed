"""Checkpoint reading: every supported on-disk layout → our modules, strictly, built once on the target device.

Layouts (the README's "Checkpoints" section shows the folder trees):
- official Wan folders (Wan-AI/Wan2.1-*, Wan2.2-*): DiT as `config.json` + one or sharded
  `diffusion_pytorch_model*.safetensors` (+ `.index.json`), A14B experts in `high_noise_model/` and
  `low_noise_model/`; `Wan2.1_VAE.pth`; `models_t5_umt5-xxl-enc-bf16.pth`; tokenizer in `google/umt5-xxl/`.
- TurboDiffusion `.pth` files (TurboDiffusion/TurboWan*): official key names, but a 2-D `patch_embedding.weight`
  [D, Cin·1·2·2], an optional `net.` prefix and the SLA `…self_attn.attn_op.local_attn.proj_l.*` keys;
  `-quant` files hold W8A8 `int8_weight`/`scale` buffers instead of the block Linears' `weight`.
- diffusers folders (Wan-AI/*-Diffusers): `transformer/` (+ `transformer_2/` = low-noise expert), `vae/`,
  `text_encoder/`, `tokenizer/`, with diffusers/transformers key names mapped back to the official ones here.

Loading never materialises a tensor twice: modules are built on the meta device with their final dtypes, each
checkpoint tensor is read (memory-mapped), cast and moved once, and `load_state_dict(assign=True)` adopts it.
Files are read with `torch.load(weights_only=True, mmap=True)` or safetensors only; nothing is ever fetched.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.configs import ModelSpec

StateDict = dict[str, torch.Tensor]

VAE_FILE = "Wan2.1_VAE.pth"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER_DIRS = ("google/umt5-xxl", "tokenizer")
DIT_WEIGHTS = "diffusion_pytorch_model"
SLA_PROJ_SUFFIX = ".self_attn.attn_op.local_attn.proj_l."


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says which file and what is wrong."""


# ---------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------


def read_state_dict(path: str | Path) -> StateDict:
    """Tensors of a `.safetensors`/`.pth`/`.pt` file or of a folder of (sharded) safetensors, memory-mapped."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors files in this folder")
        index = next(iter(path.glob("*.safetensors.index.json")), None)
        if index is not None:
            shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [path / name for name in shard_names]
            missing = [str(f) for f in files if not f.exists()]
            if missing:
                raise CheckpointError(f"{index}: shards listed in the index are missing: {missing}")
        state: StateDict = {}
        for f in files:
            state.update(read_state_dict(f))
        return state
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))  # memory-maps the file; tensors are views until cast
    if path.suffix in (".pth", ".pt", ".bin"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # pickled code or a corrupt file: say which file
            raise CheckpointError(f"{path}: cannot be read as a weights-only torch file ({e})") from e
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    raise CheckpointError(f"{path}: unsupported file type {path.suffix!r} (use .safetensors or .pth)")


def strip_prefix(state: StateDict, prefix: str) -> StateDict:
    """Drop a wrapper prefix such as TurboDiffusion/rCM's `net.` when every key carries it."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items()}
    return state


# ---------------------------------------------------------------------------------------------------------
# Key maps: diffusers / transformers names → official Wan names (wan.md §12, §9.3)
# ---------------------------------------------------------------------------------------------------------

# Ordered substring replacements official → diffusers (scripts/convert_wan_to_diffusers.py); the inverse is
# applied in reverse order. Block-level norm3 ↔ norm2 and the scale_shift_tables are handled by regex below.
_DIT_RENAMES: tuple[tuple[str, str], ...] = (
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.head", "proj_out"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
    ("self_attn.o", "attn1.to_out.0"),
    ("self_attn.q", "attn1.to_q"),
    ("self_attn.k", "attn1.to_k"),
    ("self_attn.v", "attn1.to_v"),
    ("self_attn.norm_q", "attn1.norm_q"),
    ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.o", "attn2.to_out.0"),
    ("cross_attn.q", "attn2.to_q"),
    ("cross_attn.k", "attn2.to_k"),
    ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.norm_q", "attn2.norm_q"),
    ("cross_attn.norm_k", "attn2.norm_k"),
)


def _rename_dit_key_to_diffusers(key: str) -> str:
    if key == "head.modulation":
        return "scale_shift_table"
    key = re.sub(r"^blocks\.(\d+)\.modulation$", r"blocks.\1.scale_shift_table", key)
    key = re.sub(r"^blocks\.(\d+)\.norm3\.", r"blocks.\1.norm2.", key)
    for official, diffusers in _DIT_RENAMES:
        key = re.sub(rf"(^|\.){re.escape(official)}\.", rf"\g<1>{diffusers}.", key)
    return key


def _rename_dit_key_from_diffusers(key: str) -> str:
    if key == "scale_shift_table":
        return "head.modulation"
    key = re.sub(r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation", key)
    key = re.sub(r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3.", key)
    for official, diffusers in reversed(_DIT_RENAMES):
        key = re.sub(rf"(^|\.){re.escape(diffusers)}\.", rf"\g<1>{official}.", key)
    return key


def dit_to_diffusers(state: StateDict) -> StateDict:
    """Official Wan DiT keys → diffusers `WanTransformer3DModel` keys (T2V and Wan2.2 I2V, no CLIP branch)."""
    return {_rename_dit_key_to_diffusers(k): v for k, v in state.items()}


def dit_from_diffusers(state: StateDict) -> StateDict:
    """diffusers `WanTransformer3DModel` keys → official Wan DiT keys."""
    return {_rename_dit_key_from_diffusers(k): v for k, v in state.items()}


def _vae_block_renames() -> list[tuple[str, str]]:
    """Official → diffusers prefixes of the Wan2.1 VAE (convert_vae, wan.md §12.2), most specific first."""
    renames: list[tuple[str, str]] = []
    for side in ("encoder", "decoder"):
        renames += [
            (f"{side}.middle.0.", f"{side}.mid_block.resnets.0."),
            (f"{side}.middle.1.", f"{side}.mid_block.attentions.0."),
            (f"{side}.middle.2.", f"{side}.mid_block.resnets.1."),
            (f"{side}.head.0.", f"{side}.norm_out."),
            (f"{side}.head.2.", f"{side}.conv_out."),
            (f"{side}.conv1.", f"{side}.conv_in."),
        ]
    for i in range(11):
        renames.append((f"encoder.downsamples.{i}.", f"encoder.down_blocks.{i}."))
    for i in range(15):
        stage, slot = divmod(i, 4)
        target = f"up_blocks.{stage}.upsamplers.0." if slot == 3 else f"up_blocks.{stage}.resnets.{slot}."
        renames.append((f"decoder.upsamples.{i}.", f"decoder.{target}"))
    renames += [("conv1.", "quant_conv."), ("conv2.", "post_quant_conv.")]
    return renames


_VAE_RESIDUAL_RENAMES: tuple[tuple[str, str], ...] = (
    ("residual.0.", "norm1."),
    ("residual.2.", "conv1."),
    ("residual.3.", "norm2."),
    ("residual.6.", "conv2."),
    ("shortcut.", "conv_shortcut."),
)


def vae_to_diffusers(state: StateDict) -> StateDict:
    """Official `Wan2.1_VAE.pth` keys → diffusers `AutoencoderKLWan` keys."""
    blocks = _vae_block_renames()
    out: StateDict = {}
    for key, value in state.items():
        new = key
        for official, diffusers in blocks:
            if new.startswith(official):
                new = diffusers + new[len(official):]
                break
        for official, diffusers in _VAE_RESIDUAL_RENAMES:
            new = new.replace("." + official, "." + diffusers)
        out[new] = value
    return out


def vae_from_diffusers(state: StateDict) -> StateDict:
    """diffusers `AutoencoderKLWan` keys → official `Wan2.1_VAE.pth` keys."""
    blocks = _vae_block_renames()
    out: StateDict = {}
    for key, value in state.items():
        new = key
        for official, diffusers in _VAE_RESIDUAL_RENAMES:
            new = new.replace("." + diffusers, "." + official)
        for official, diffusers in blocks:
            if new.startswith(diffusers):
                new = official + new[len(diffusers):]
                break
        out[new] = value
    return out


# (official, transformers) key-prefix templates; {i} is a block index, {p} one of the q/k/v/o projections.
_T5_KEYS: tuple[tuple[str, str], ...] = (
    ("blocks.{i}.norm1.", "encoder.block.{i}.layer.0.layer_norm."),
    ("blocks.{i}.attn.{p}.", "encoder.block.{i}.layer.0.SelfAttention.{p}."),
    ("blocks.{i}.pos_embedding.embedding.", "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias."),
    ("blocks.{i}.norm2.", "encoder.block.{i}.layer.1.layer_norm."),
    ("blocks.{i}.ffn.gate.0.", "encoder.block.{i}.layer.1.DenseReluDense.wi_0."),
    ("blocks.{i}.ffn.fc1.", "encoder.block.{i}.layer.1.DenseReluDense.wi_1."),
    ("blocks.{i}.ffn.fc2.", "encoder.block.{i}.layer.1.DenseReluDense.wo."),
    ("norm.", "encoder.final_layer_norm."),
    ("token_embedding.", "shared."),
)


def _template_regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>[qkvo])")
    return re.compile("^" + pattern)


def _rename_by_templates(state: StateDict, pairs: Iterable[tuple[str, str]]) -> StateDict:
    compiled = [(_template_regex(src), dst) for src, dst in pairs]
    out: StateDict = {}
    for key, value in state.items():
        for regex, dst in compiled:
            match = regex.match(key)
            if match:
                key = dst.format(**match.groupdict()) + key[match.end():]
                break
        out[key] = value
    return out


def t5_to_transformers(state: StateDict) -> StateDict:
    """Official umT5 encoder keys → transformers `UMT5EncoderModel` keys (embedding tied to `shared`)."""
    return _rename_by_templates(state, _T5_KEYS)


def t5_from_transformers(state: StateDict) -> StateDict:
    """transformers `UMT5EncoderModel` keys → official keys (`encoder.embed_tokens` is `shared`'s tied copy)."""
    state = {k: v for k, v in state.items() if k != "encoder.embed_tokens.weight" or "shared.weight" not in state}
    if "encoder.embed_tokens.weight" in state:
        state["shared.weight"] = state.pop("encoder.embed_tokens.weight")
    return _rename_by_templates(state, [(dst, src) for src, dst in _T5_KEYS])


def dit_from_turbodiffusion(state: StateDict, in_dim: int) -> StateDict:
    """TurboWan `.pth` → official DiT keys: strip `net.`, give `patch_embedding.weight` back its Conv3d shape.

    TurboDiffusion stores the patch embedding as a Linear over each 1×2×2 patch flattened channel-major
    (c, kt, kh, kw) — exactly a reshape of the Conv3d weight [D, Cin, 1, 2, 2].
    """
    state = strip_prefix(state, "net.")
    weight = state.get("patch_embedding.weight")
    if weight is not None and weight.dim() == 2:
        dim, flat = weight.shape
        if flat % in_dim:
            raise CheckpointError(f"patch_embedding.weight {list(weight.shape)} does not fit in_dim {in_dim}")
        state = dict(state)
        state["patch_embedding.weight"] = weight.reshape(dim, in_dim, 1, 2, 2)
    return state


def normalize_dit_state_dict(state: StateDict, in_dim: int) -> StateDict:
    """Any supported DiT layout (official, TurboWan, diffusers) → official key names and shapes."""
    if any(k.startswith("condition_embedder.") for k in state):
        return dit_from_diffusers(state)
    return dit_from_turbodiffusion(state, in_dim)


# ---------------------------------------------------------------------------------------------------------
# Strict loading into a module built on the meta device
# ---------------------------------------------------------------------------------------------------------


def _list(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming missing and unexpected keys and shape mismatches."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    wrong_shape = [f"{k}: file {list(state[k].shape)} vs model {list(expected[k])}"
                   for k in expected.keys() & state.keys() if state[k].shape != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_list(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatches ({len(wrong_shape)}): {'; '.join(sorted(wrong_shape)[:12])}")
    if problems:
        raise CheckpointError(f"{source} does not fit {type(module).__name__}: " + " | ".join(problems))


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], *, device: torch.device | str,
              source: str) -> nn.Module:
    """Strictly load `state` into `module` (typically on meta), each tensor cast to the dtype the module
    holds for it and moved to `device` once; returns the module in eval mode."""
    check_state_dict(module, state, source)
    targets = module.state_dict()
    ready = {}
    for key, tensor in state.items():
        dtype = targets[key].dtype if targets[key].is_floating_point() else tensor.dtype
        ready[key] = tensor.to(device=device, dtype=dtype)
    module.load_state_dict(ready, strict=True, assign=True)
    return module.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------
# Finding the files of a model in a checkpoint folder
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFiles:
    """Where each component of one model lies (a file, or a folder of safetensors shards)."""

    dit: tuple[Path, ...]  # one per expert, high-noise expert first
    vae: Path
    t5: Path
    tokenizer: Path  # tokenizer.json (unused by the tiny specs' byte-level tokenizer)


def _dit_in_folder(folder: Path) -> Path | None:
    if any(folder.glob(f"{DIT_WEIGHTS}*.safetensors")):
        return folder
    return None


def _turbo_files(root: Path, quantized: bool | None) -> list[Path]:
    candidates = sorted(p for p in root.glob("*.pth") if p.name not in (VAE_FILE, T5_FILE))
    candidates += sorted(root.glob("*.safetensors")) if not any(root.glob(f"{DIT_WEIGHTS}*")) else []
    # Both variants present: the asked-for one; unasked, the plain file (TurboDiffusion's advice for H100s).
    wanted = False if quantized is None else quantized
    return [p for p in candidates if ("-quant" in p.stem) == wanted] or candidates


def find_model_files(spec: ModelSpec, root: str | Path, *, quantized: bool | None = None) -> ModelFiles:
    """Resolve the files of `spec` under `root` for any supported layout; the error lists what was looked for.

    Args:
        quantized: prefer TurboWan `-quant` files (True) or plain ones (False); None: the plain file when both
            are there, else whichever is.
    """
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder {root} does not exist")
    n_experts = len(spec.experts) or 1
    dit: list[Path] = []
    if spec.experts and all((root / name).is_dir() for name in spec.experts):  # official Wan2.2 A14B
        dit = [root / name for name in spec.experts]
    elif (root / "transformer").is_dir():  # diffusers; transformer_2 is the low-noise expert
        dit = [root / "transformer"] + ([root / "transformer_2"] if spec.experts else [])
    elif _dit_in_folder(root) is not None:  # official single-model folder
        dit = [root]
    else:  # TurboDiffusion .pth files
        files = _turbo_files(root, quantized)
        if spec.experts:
            high = [p for p in files if "high" in p.stem.lower()]
            low = [p for p in files if "low" in p.stem.lower()]
            dit = [high[0], low[0]] if len(high) == 1 and len(low) == 1 else []
        elif len(files) == 1:
            dit = files
    if len(dit) != n_experts or not all(p.exists() for p in dit):
        raise CheckpointError(
            f"{root}: cannot find the DiT weights of {spec.name} (looked for "
            + ("high_noise_model/ + low_noise_model/, transformer/ + transformer_2/, or one *high*.pth and one "
               "*low*.pth" if spec.experts else
               f"{DIT_WEIGHTS}*.safetensors, transformer/, or exactly one TurboWan *.pth")
            + "); see the README's checkpoint layout")
    vae = root / VAE_FILE if (root / VAE_FILE).exists() else root / "vae"
    t5 = root / T5_FILE if (root / T5_FILE).exists() else root / "text_encoder"
    tokenizer = next((root / d / "tokenizer.json" for d in T5_TOKENIZER_DIRS if (root / d / "tokenizer.json").exists()),
                     root / T5_TOKENIZER_DIRS[0] / "tokenizer.json")
    needed = [("VAE", vae), ("text encoder", t5)]
    if spec.t5.tokenizer == "umt5-xxl":  # the tiny specs' byte-level tokenizer needs no file
        needed.append(("tokenizer", tokenizer))
    for what, path in needed:
        if not path.exists():
            raise CheckpointError(f"{root}: no {what} found (expected {path}); see the README's checkpoint layout")
    return ModelFiles(dit=tuple(dit), vae=vae, t5=t5, tokenizer=tokenizer)



def normalize_vae_state_dict(state: StateDict) -> StateDict:
    """`Wan2.1_VAE.pth` keys pass through; a diffusers `vae/` folder's keys are mapped back."""
    return vae_from_diffusers(state) if any(k.startswith("quant_conv.") for k in state) else state


def normalize_t5_state_dict(state: StateDict) -> StateDict:
    """`models_t5_umt5-xxl-enc-bf16.pth` keys pass through; a transformers `text_encoder/` is mapped back."""
    return t5_from_transformers(state) if "shared.weight" in state or "encoder.embed_tokens.weight" in state else state
