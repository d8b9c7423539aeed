"""Wan VAE decode on one GPU, 81 frames, random weights: this tree's fused decode against the variants it
replaced, timed in the same run, and each variant's output against the default's.

    python bench/vae_decode.py --out $OUT/vae_decode.json              # 480P and 720P
    python bench/vae_decode.py --sizes 480p --repeats 5

Variants (all bf16 channels-last with the fused Triton norms):
- `fused`: the default (96-wide convs zero-padded to 128 outputs, the upsample fused with the adds before it);
- `unpadded`: `PADDED_OUT_CHANNELS` empty (every conv at its own width);
- `session9`: unpadded, and ATen's channels-last nearest upsample after a separate bias/residual pass.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine.models.vae as vae_module  # noqa: E402
from engine.configs import from_name  # noqa: E402
from engine.models.vae import WanVAE  # noqa: E402
from engine.ops.vae_ops import add_bias_residual  # noqa: E402

LATENT_SIZES = {"480p": (60, 104), "720p": (90, 160)}  # latent H, W of 480x832 and 720x1280


def _aten_upsample(x: torch.Tensor, *, bias: torch.Tensor | None = None,
                   residual: torch.Tensor | None = None) -> torch.Tensor:
    if bias is not None or residual is not None:
        x = add_bias_residual(x, bias=bias, residual=residual, out=x)
    return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    saved = vae_module.PADDED_OUT_CHANNELS, vae_module.upsample_nearest2x
    if name in ("unpadded", "session9"):
        vae_module.PADDED_OUT_CHANNELS = {}
    if name == "session9":
        vae_module.upsample_nearest2x = _aten_upsample
    try:
        yield
    finally:
        vae_module.PADDED_OUT_CHANNELS, vae_module.upsample_nearest2x = saved


def decode(vae: WanVAE, latent: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(list(vae.decode_frames(latent)), dim=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="480p,720p")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--variants", default="fused,unpadded,session9")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    vae = WanVAE.from_config(from_name("wan2.1-t2v-1.3b").vae).to("cuda", torch.bfloat16).eval()
    with torch.no_grad():  # random weights of std 1/sqrt(fan_in): O(1) activations through the stack
        for p in vae.parameters():
            p.copy_(torch.randn_like(p) / (p[0].numel() ** 0.5 if p.dim() > 1 else 5.0))
    results: dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                  "frames": args.frames, "sizes": {}}
    for size in args.sizes.split(","):
        h, w = LATENT_SIZES[size]
        latent = torch.randn(1, 16, (args.frames - 1) // 4 + 1, h, w, device="cuda", dtype=torch.bfloat16)
        rows: dict[str, dict[str, object]] = {}
        outputs: dict[str, torch.Tensor] = {}
        for name in args.variants.split(","):
            with variant(name):
                outputs[name] = decode(vae, latent)  # also warms cuDNN's autotuner for the shapes
                times = []
                for _ in range(args.repeats):
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    decode(vae, latent)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
            rows[name] = {"decode_s_median": statistics.median(times), "decode_s_all": times}
        first = next(iter(outputs))
        # The decode clamps to [-1, 1]: a comparison is only as good as the share of outputs inside the clamp.
        results.setdefault("unclamped_fraction", {})[size] = (outputs[first].abs() < 1).float().mean().item()
        for name, out in outputs.items():
            diff = (out - outputs[first]).abs()
            rows[name]["max_abs_diff_vs_" + first] = diff.max().item()
            rows[name]["mean_abs_diff_vs_" + first] = diff.mean().item()
            rows[name]["speedup_of_" + first] = rows[name]["decode_s_median"] / rows[first]["decode_s_median"]
        results["sizes"][size] = rows
        for name, row in rows.items():
            print(f"{size} {name:10} {row['decode_s_median'] * 1e3:8.1f} ms  {first} is "
                  f"{row['speedup_of_' + first]:.3f}x faster  "
                  f"max|diff| {row['max_abs_diff_vs_' + first]:.4f}  "
                  f"mean {row['mean_abs_diff_vs_' + first]:.5f}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
