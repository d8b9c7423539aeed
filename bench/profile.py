"""Where the time of one DiT call and of one VAE decode goes, on the GPU (torch profiler kernel summary).

    python bench/profile.py --out $OUT/profile.json                 # 1.3B-480P turbo DiT call + 480P decode
    python bench/profile.py --model wan2.1-t2v-14b --size 720p --parts dit

Random weights at the real shapes (values do not change speed). Prints, per part, the median wall time of a
few calls (CUDA-synchronised) and the top kernels by GPU time, grouped into families (GEMM, attention, norm,
elementwise, copy, conv, ...), so a fusion target is chosen by measurement.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.configs import from_name  # noqa: E402
from engine.pipeline import Pipeline  # noqa: E402

FAMILIES = (  # first match wins; kernel names of our Triton kernels, cuBLAS/cuDNN and ATen
    ("attention_sparse", r"sagesla|_sla_|kv_stats|prepare_q|prepare_kv"),
    ("attention_dense", r"flash|fmha|cudnn.*attn|sdpa|attention"),
    ("gemm_int8_fp8", r"block_scaled_mm|_quantize_blockwise"),
    ("gemm", r"gemm|sm90_xmma|cutlass|nvjet|matmul"),
    ("conv", r"conv|implicit|wgrad|dgrad|fprop"),
    ("norm", r"_norm_kernel|layer_norm|rms|normalize"),
    ("rope", r"rope"),
    ("copy_cat", r"copy|cat|Cat|gather|scatter|index"),
    ("reduce", r"reduce|sum|mean"),
    ("elementwise", r"elementwise|vectorized|unrolled|fill"),
)


def family(name: str) -> str:
    for fam, pattern in FAMILIES:
        if re.search(pattern, name, re.IGNORECASE):
            return fam
    return "other"


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def kernel_summary(fn) -> dict[str, object]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        fn()
        torch.cuda.synchronize()
    # The ATen ops (with input shapes) behind the GPU time: names the copy or cast a kernel row cannot.
    ops = [op for op in prof.key_averages(group_by_input_shape=True) if op.self_device_time_total > 0]
    ops.sort(key=lambda op: -op.self_device_time_total)
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(event.name, []).append(event.device_time_total / 1e3)  # ms
    rows = sorted(((name, sum(t), len(t)) for name, t in kernels.items()), key=lambda r: -r[1])
    families: dict[str, float] = {}
    for name, total, _ in rows:
        families[family(name)] = families.get(family(name), 0.0) + total
    return {"gpu_ms": sum(r[1] for r in rows),
            "families_ms": dict(sorted(families.items(), key=lambda kv: -kv[1])),
            "top": [{"kernel": name[:140], "ms": round(total, 3), "calls": calls} for name, total, calls in rows[:40]],
            "ops": [{"op": op.key, "shapes": str(op.input_shapes)[:160], "ms": round(op.self_device_time_total / 1e3, 3),
                     "calls": op.count} for op in ops[:30]]}


def profile_dit(pipe: Pipeline, width: int, height: int, frames: int, repeats: int) -> dict[str, object]:
    model = pipe.experts[0]
    spec = pipe.spec
    latent_frames = (frames - 1) // 4 + 1
    x = torch.randn(1, 16, latent_frames, height // 8, width // 8, device="cuda")
    y = (torch.randn(1, spec.dit.in_dim - 16, latent_frames, height // 8, width // 8, device="cuda")
         if spec.dit.in_dim > 16 else None)
    t = torch.tensor([900.0], device="cuda")
    context = torch.randn(1, spec.dit.text_len, spec.dit.text_dim, device="cuda", dtype=pipe.dtype)

    def call() -> None:
        with torch.no_grad():
            model(x, t, context, y)

    call()
    call()
    times = timed(call, repeats)
    return {"call_s_median": statistics.median(times), "call_s_all": times, **kernel_summary(call)}


def profile_vae(pipe: Pipeline, width: int, height: int, frames: int, repeats: int) -> dict[str, object]:
    latent = torch.randn(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8, device="cuda")

    def call() -> None:
        with torch.no_grad():
            for _ in pipe.vae.decode_frames(latent.to(pipe.vae.dtype)):
                pass

    call()
    times = timed(call, repeats)
    return {"decode_s_median": statistics.median(times), "decode_s_all": times, **kernel_summary(call)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="wan2.1-t2v-1.3b")
    parser.add_argument("--size", default="480p")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--parts", default="dit,vae")
    parser.add_argument("--attention", default="sagesla")
    parser.add_argument("--quant", default="w8a8")
    parser.add_argument("--gemm", default="int8", choices=["int8", "fp8"], help="the W8A8 GEMM")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    spec = from_name(args.model)
    width, height = spec.resolution(args.size, "16:9")
    pipe = Pipeline.load(args.model, random_weights=True, device="cuda", attention=args.attention,
                         quant=None if args.quant == "none" else args.quant, gemm=args.gemm)
    results: dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                  "model": args.model, "width": width, "height": height, "frames": args.frames,
                                  "attention": args.attention, "quant": args.quant, "gemm": args.gemm}
    parts = args.parts.split(",")
    if "dit" in parts:
        results["dit"] = profile_dit(pipe, width, height, args.frames, args.repeats)
    if "vae" in parts:
        results["vae"] = profile_vae(pipe, width, height, args.frames, max(2, args.repeats // 2))
    for part in ("dit", "vae"):
        if part in results:
            r = results[part]
            wall = r.get("call_s_median", r.get("decode_s_median"))
            print(f"\n== {part}: wall {wall * 1e3:.1f} ms, GPU kernels {r['gpu_ms']:.1f} ms")
            for fam, ms in r["families_ms"].items():
                print(f"   {fam:18} {ms:9.2f} ms")
            for row in r["top"][:25]:
                print(f"   {row['ms']:9.2f} ms {row['calls']:5d}x  {row['kernel']}")
            print("   -- ATen ops by GPU time")
            for row in r["ops"][:20]:
                print(f"   {row['ms']:9.2f} ms {row['calls']:5d}x  {row['op']} {row['shapes']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
