"""Probe: the Wan VAE decoder's slow kernels against alternatives on one GPU (the record behind
`PADDED_OUT_CHANNELS` and `upsample_nearest2x`, not a benchmark of the engine itself).

    python3 bench/vae_conv_probe.py --out $OUT/vae_conv_probe.json

- the causal 3x3x3 convs per stage width (one 480P/720P chunk: T output frames from T + 2 buffered ones):
  cuDNN conv3d channels-last; the same with 96 outputs zero-padded to 128; three 2-D convs over the time taps,
  summed; one 2-D conv over the taps folded into 3C channels (the copy that folding needs timed apart);
- the 3-output head conv with its outputs padded to 4..32;
- ATen's channels-last nearest x2 upsample against an expand-and-copy.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F


def milliseconds(fn: Callable[[], object], repeats: int = 10) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def probe_conv(channels: int, height: int, width: int, frames: int) -> dict[str, float]:
    cl3d = torch.channels_last_3d
    x = torch.randn(1, channels, frames + 2, height, width, device="cuda", dtype=torch.bfloat16)
    x = x.contiguous(memory_format=cl3d)
    w = (torch.randn(channels, channels, 3, 3, 3, device="cuda") / (27 * channels) ** 0.5).bfloat16()
    w = w.contiguous(memory_format=cl3d)
    flops = 2 * 27 * channels * channels * frames * height * width
    reference = F.conv3d(x, w, None, 1, (0, 1, 1))
    row = {"channels": channels, "height": height, "width": width, "frames": frames}
    row["conv3d_ms"] = milliseconds(lambda: F.conv3d(x, w, None, 1, (0, 1, 1)))
    row["conv3d_tflops"] = flops / row["conv3d_ms"] / 1e9

    images = x[0].transpose(0, 1)  # [T + 2, C, H, W]: the buffered frames as a channels-last image batch
    taps = [w[:, :, k].contiguous(memory_format=torch.channels_last) for k in range(3)]

    def three_convs() -> torch.Tensor:
        out = F.conv2d(images[0:frames], taps[0], None, 1, 1)
        out += F.conv2d(images[1 : frames + 1], taps[1], None, 1, 1)
        out += F.conv2d(images[2 : frames + 2], taps[2], None, 1, 1)
        return out

    row["three_conv2d_ms"] = milliseconds(three_convs)
    row["three_conv2d_rel_l2"] = relative_l2(three_convs().transpose(0, 1)[None], reference)
    folded_w = torch.cat(taps, 1).contiguous(memory_format=torch.channels_last)  # [C, 3C, 3, 3]

    def fold() -> torch.Tensor:
        return torch.cat([images[k : k + frames] for k in range(3)], 1)

    folded_x = fold().contiguous(memory_format=torch.channels_last)
    row["fold_copy_ms"] = milliseconds(fold)
    row["fold_conv2d_ms"] = milliseconds(lambda: F.conv2d(folded_x, folded_w, None, 1, 1))
    row["fold_conv2d_tflops"] = flops / row["fold_conv2d_ms"] / 1e9
    folded_out = F.conv2d(folded_x, folded_w, None, 1, 1)
    row["fold_rel_l2"] = relative_l2(folded_out.transpose(0, 1)[None], reference)
    if channels == 96:
        padded = torch.zeros(128, channels, 3, 3, 3, device="cuda", dtype=torch.bfloat16)
        padded[:channels] = w
        padded = padded.contiguous(memory_format=cl3d)
        row["conv3d_out128_ms"] = milliseconds(lambda: F.conv3d(x, padded, None, 1, (0, 1, 1)))
        for outputs in (3, 4, 8, 16, 32):
            head = (torch.randn(outputs, channels, 3, 3, 3, device="cuda") * 0.01).bfloat16()
            head = head.contiguous(memory_format=cl3d)
            row[f"head_out{outputs}_ms"] = milliseconds(lambda h=head: F.conv3d(x, h, None, 1, (0, 1, 1)))
    return row


def probe_upsample(n: int, channels: int, height: int, width: int) -> dict[str, object]:
    x = torch.randn(n, channels, height, width, device="cuda", dtype=torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    reference = F.interpolate(x, scale_factor=2.0, mode="nearest-exact")
    out = torch.empty_like(reference)

    def expand_copy() -> torch.Tensor:
        target = out.permute(0, 2, 3, 1).view(n, height, 2, width, 2, channels)
        target.copy_(x.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(n, height, 2, width, 2, channels))
        return out

    assert torch.equal(expand_copy(), reference)
    gigabytes = (x.numel() + reference.numel()) * 2 / 1e9
    interpolate_ms = milliseconds(lambda: F.interpolate(x, scale_factor=2.0, mode="nearest-exact"))
    expand_ms = milliseconds(expand_copy)
    return {"shape": [n, channels, height, width], "interpolate_ms": interpolate_ms,
            "expand_copy_ms": expand_ms, "interpolate_tbs": gigabytes / interpolate_ms,
            "expand_copy_tbs": gigabytes / expand_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True  # as the fused decode runs its convs
    results: dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    results["convs"] = [probe_conv(*shape) for shape in
                        [(96, 480, 832, 4), (96, 480, 832, 8), (192, 240, 416, 4), (384, 120, 208, 2)]]
    results["upsample"] = [probe_upsample(*shape) for shape in [(4, 192, 240, 416), (4, 384, 120, 208)]]
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
