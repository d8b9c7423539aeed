"""Checkpoint layouts: every supported layout round-trips into our modules; every error names its cause."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine import checkpoint
from engine.checkpoint import CheckpointError
from engine.configs import from_name
from engine.models.dit import WanModel
from engine.models.t5 import UMT5Encoder
from engine.models.vae import WanVAE

TINY_T2V = from_name("tiny-t2v")
TINY_I2V = from_name("tiny-i2v")


def _random_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Fresh random values for every tensor, so a wrong mapping cannot hide behind equal inits."""
    return {k: torch.randn_like(v) if v.is_floating_point() else v.clone() for k, v in module.state_dict().items()}


def _write_official_single(root: Path, dit_state: dict[str, torch.Tensor], vae_state, t5_state, shards: int = 1) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"_class_name": "WanModel", "dim": TINY_T2V.dit.dim}))
    keys = sorted(dit_state)
    if shards == 1:
        save_file(dit_state, str(root / "diffusion_pytorch_model.safetensors"))
    else:
        weight_map = {}
        for i in range(shards):
            name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: dit_state[k].contiguous() for k in keys[i::shards]}
            save_file(part, str(root / name))
            weight_map.update({k: name for k in part})
        (root / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    torch.save(vae_state, root / checkpoint.VAE_FILE)
    torch.save(t5_state, root / checkpoint.T5_FILE)
    (root / "google" / "umt5-xxl").mkdir(parents=True)
    (root / "google" / "umt5-xxl" / "tokenizer.json").write_text("{}")


@pytest.fixture(scope="module")
def tiny_states() -> tuple[dict, dict, dict]:
    torch.manual_seed(1)
    dit = _random_state(WanModel.from_config(TINY_T2V.dit))
    vae = _random_state(WanVAE.from_config(TINY_T2V.vae))
    t5 = _random_state(UMT5Encoder.from_config(TINY_T2V.t5))
    return dit, vae, t5


def _load_dit(state: dict[str, torch.Tensor], spec=TINY_T2V) -> WanModel:
    with torch.device("meta"):
        model = WanModel.from_config(spec.dit)
    normalized = checkpoint.normalize_dit_state_dict(state, spec.dit.in_dim)
    return checkpoint.load_into(model, normalized, device="cpu", source="test")


def _assert_same_state(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = module.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key].to(value.dtype), value), key


@pytest.mark.parametrize("shards", [1, 3])
def test_official_folder_roundtrips(tmp_path: Path, tiny_states, shards: int) -> None:
    dit, vae, t5 = tiny_states
    _write_official_single(tmp_path, dit, vae, t5, shards=shards)
    files = checkpoint.find_model_files(TINY_T2V, tmp_path)
    assert files.dit == (tmp_path,) and files.vae.name == checkpoint.VAE_FILE
    _assert_same_state(_load_dit(checkpoint.read_state_dict(files.dit[0])), dit)
    with torch.device("meta"):
        vae_model = WanVAE.from_config(TINY_T2V.vae)
    loaded_vae = checkpoint.load_into(vae_model, checkpoint.read_state_dict(files.vae), device="cpu", source="vae")
    _assert_same_state(loaded_vae, vae)


def test_turbodiffusion_pth_roundtrips(tmp_path: Path, tiny_states) -> None:
    dit, _, _ = tiny_states
    turbo = {"net." + k: v for k, v in dit.items()}
    weight = dit["patch_embedding.weight"]
    turbo["net.patch_embedding.weight"] = weight.reshape(weight.shape[0], -1)  # TurboWan's 2-D Linear form
    torch.save(turbo, tmp_path / "TurboWan2.1-T2V-tiny.pth")
    state = checkpoint.read_state_dict(tmp_path / "TurboWan2.1-T2V-tiny.pth")
    _assert_same_state(_load_dit(state), dit)


def test_turbodiffusion_patch_linear_equals_conv3d() -> None:
    """The 2-D TurboWan patch weight is the Conv3d weight flattened (c, kt, kh, kw): check on real input."""
    conv = torch.nn.Conv3d(4, 8, kernel_size=(1, 2, 2), stride=(1, 2, 2))
    x = torch.randn(1, 4, 3, 6, 6)
    patches = x.unfold(3, 2, 2).unfold(4, 2, 2)  # [1, C, F, H/2, W/2, 2, 2]
    patches = patches.permute(0, 2, 3, 4, 1, 5, 6).reshape(1, 3, 3, 3, 4 * 1 * 2 * 2)  # (c, kt, kh, kw) order
    linear = patches @ conv.weight.reshape(8, -1).T + conv.bias
    reshaped = checkpoint.dit_from_turbodiffusion({"patch_embedding.weight": conv.weight.reshape(8, -1)}, 4)
    assert torch.equal(reshaped["patch_embedding.weight"], conv.weight)
    torch.testing.assert_close(linear.permute(0, 4, 1, 2, 3), conv(x), rtol=1e-5, atol=1e-5)  # fp32 sums


def test_diffusers_folder_roundtrips(tmp_path: Path, tiny_states) -> None:
    dit, vae, t5 = tiny_states
    for name in ("transformer", "vae", "text_encoder", "tokenizer"):
        (tmp_path / name).mkdir()
    save_file(checkpoint.dit_to_diffusers(dit), str(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"))
    save_file(checkpoint.vae_to_diffusers(vae), str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    hf_t5 = checkpoint.t5_to_transformers(t5)
    hf_t5["encoder.embed_tokens.weight"] = hf_t5["shared.weight"]  # transformers saves the tied copy too
    save_file({k: v.clone() for k, v in hf_t5.items()}, str(tmp_path / "text_encoder" / "model.safetensors"))
    (tmp_path / "tokenizer" / "tokenizer.json").write_text("{}")
    files = checkpoint.find_model_files(TINY_T2V, tmp_path)
    _assert_same_state(_load_dit(checkpoint.read_state_dict(files.dit[0])), dit)
    assert checkpoint.normalize_vae_state_dict(checkpoint.read_state_dict(files.vae)).keys() == vae.keys()
    t5_back = checkpoint.normalize_t5_state_dict(checkpoint.read_state_dict(files.t5))
    assert t5_back.keys() == t5.keys()
    assert all(torch.equal(t5_back[k], t5[k]) for k in t5)


def test_a14b_expert_folders_resolve_high_then_low(tmp_path: Path, tiny_states) -> None:
    dit_i2v = _random_state(WanModel.from_config(TINY_I2V.dit))
    _, vae, t5 = tiny_states
    for name in ("high_noise_model", "low_noise_model"):
        (tmp_path / name).mkdir()
        save_file(dit_i2v, str(tmp_path / name / "diffusion_pytorch_model.safetensors"))
    torch.save(vae, tmp_path / checkpoint.VAE_FILE)
    torch.save(t5, tmp_path / checkpoint.T5_FILE)
    (tmp_path / "google" / "umt5-xxl").mkdir(parents=True)
    (tmp_path / "google" / "umt5-xxl" / "tokenizer.json").write_text("{}")
    files = checkpoint.find_model_files(TINY_I2V, tmp_path)
    assert [p.name for p in files.dit] == ["high_noise_model", "low_noise_model"]


def test_turbo_expert_files_resolve_by_name(tmp_path: Path, tiny_states) -> None:
    _, vae, t5 = tiny_states
    for name in ("TurboWan2.2-I2V-A14B-high-720P.pth", "TurboWan2.2-I2V-A14B-low-720P.pth",
                 "TurboWan2.2-I2V-A14B-high-720P-quant.pth", "TurboWan2.2-I2V-A14B-low-720P-quant.pth"):
        torch.save({}, tmp_path / name)
    torch.save(vae, tmp_path / checkpoint.VAE_FILE)
    torch.save(t5, tmp_path / checkpoint.T5_FILE)
    (tmp_path / "google" / "umt5-xxl").mkdir(parents=True)
    (tmp_path / "google" / "umt5-xxl" / "tokenizer.json").write_text("{}")
    plain = checkpoint.find_model_files(TINY_I2V, tmp_path, quantized=False)
    assert [p.name for p in plain.dit] == ["TurboWan2.2-I2V-A14B-high-720P.pth", "TurboWan2.2-I2V-A14B-low-720P.pth"]
    quant = checkpoint.find_model_files(TINY_I2V, tmp_path, quantized=True)
    assert all("-quant" in p.name for p in quant.dit)


def test_missing_and_unexpected_keys_are_named(tiny_states) -> None:
    dit, _, _ = tiny_states
    broken = dict(dit)
    broken.pop("blocks.0.ffn.0.weight")
    broken["blocks.0.surprise.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): blocks\.0\.ffn\.0\.weight.*unexpected keys \(1\): "
                                              r"blocks\.0\.surprise\.weight"):
        _load_dit(broken)


def test_shape_mismatch_is_named(tiny_states) -> None:
    dit, _, _ = tiny_states
    broken = dict(dit)
    broken["head.head.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1\): head\.head\.weight: file \[3, 3\]"):
        _load_dit(broken)


def test_folder_errors_name_what_is_missing(tmp_path: Path, tiny_states) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.find_model_files(TINY_T2V, tmp_path / "nope")
    with pytest.raises(CheckpointError, match="cannot find the DiT weights of tiny-t2v"):
        checkpoint.find_model_files(TINY_T2V, tmp_path)
    dit, _, _ = tiny_states
    save_file(dit, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match="no VAE found"):
        checkpoint.find_model_files(TINY_T2V, tmp_path)


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    """weights_only=True: a file carrying arbitrary objects is rejected with the file named."""
    torch.save({"weight": torch.zeros(1), "evil": object()}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="bad.pth: cannot be read as a weights-only torch file"):
        checkpoint.read_state_dict(tmp_path / "bad.pth")


def test_missing_shard_is_named(tmp_path: Path, tiny_states) -> None:
    dit, vae, t5 = tiny_states
    _write_official_single(tmp_path, dit, vae, t5, shards=2)
    (tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shards listed in the index are missing"):
        checkpoint.read_state_dict(tmp_path)
