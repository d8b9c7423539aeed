"""End-to-end request time on one GPU: "original" (dense bf16 SDPA, flow UniPC + CFG) vs "turbo" (SageSLA,
W8A8 where available, fused norms, rCM 3 and 4 steps), random weights at the real shapes, same run.

    python bench/e2e.py --out $OUT/e2e.json                       # the three models of the speed issue
    python bench/e2e.py --models wan2.1-t2v-1.3b --original-steps 2

Weight values do not change speed, so random weights stand in for the checkpoints. The original's 50 steps are
timed over `--original-steps` steps (each = 2 model calls for CFG) and extrapolated linearly: every UniPC step
costs the same two DiT calls plus a few element-wise ops. Stages: text_encode and image_encode (I2V) uncached,
then cached (`cached_prompt`: the same request again), denoise, vae_decode, encode_mp4 (when imageio-ffmpeg is
importable: the original encodes after the decode as the official scripts do; turbo streams each decoded chunk
into an `Mp4Stream`, so its encode_mp4 is the tail left after the last frame). `request_to_mp4_s` is the wall
time from the request to the MP4 in place.
Peak and resident GPU memory per variant; for the A14B, the expert switch cost (both experts resident).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.configs import from_name  # noqa: E402
from engine.pipeline import GenerationRequest, Pipeline  # noqa: E402
from engine.sampling import flow_unipc_sigmas, unipc_expert_schedule  # noqa: E402

PROMPT = ("A red fox trots through fresh snow in a pine forest at dawn, breath steaming, low sun through the trees, "
          "cinematic tracking shot")
DEFAULT_MODELS = ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.2-i2v-a14b")
SIZE_OF = {"wan2.1-t2v-1.3b": "480p", "wan2.1-t2v-14b": "720p", "wan2.2-i2v-a14b": "720p"}


def _image(width: int, height: int) -> object:
    from PIL import Image

    gradient = torch.linspace(0, 255, width).repeat(height, 1)
    rgb = torch.stack([gradient, gradient.flip(1), torch.full_like(gradient, 96)], dim=-1).to(torch.uint8)
    return Image.fromarray(rgb.numpy())


def _have_ffmpeg() -> bool:
    try:  # the H100 image has no imageio-ffmpeg unless it is carried (docs/PERFORMANCE.md)
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
        return True
    except (ImportError, RuntimeError):
        return False


def _run(pipe: Pipeline, request: GenerationRequest, *, stream_mp4: bool,
         x264_params: str | None = None) -> dict[str, object]:
    """One request, timed per stage. stream_mp4: encode during the decode (turbo) instead of after it.
    x264_params: libx264 options in place of the engine's default (`write_mp4`)."""
    from engine.video import DEFAULT_X264_PARAMS, Mp4Stream, write_mp4

    x264_params = DEFAULT_X264_PARAMS if x264_params is None else x264_params
    cuda = pipe.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    mp4 = _have_ffmpeg()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "out.mp4"
        start = time.perf_counter()
        stream = Mp4Stream(path, fps=pipe.spec.fps, x264_params=x264_params) if mp4 and stream_mp4 else None
        with stream or contextlib.nullcontext():
            result = pipe.generate(request, on_frames=stream.put if stream else None)
            generated = time.perf_counter()
            if stream:
                stream.close()
            elif mp4:
                write_mp4(result.frames, path, fps=result.fps, x264_params=x264_params)
        done = time.perf_counter()
    record: dict[str, object] = {"timings": result.timings, "generate_s": generated - start,
                                 "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                                 "resident_memory_gib": torch.cuda.memory_allocated() / 2**30 if cuda else None}
    if mp4:
        record["timings"]["encode_mp4"] = done - generated  # type: ignore[index]
        record["request_to_mp4_s"] = done - start
    return record


def _switch_cost_s(pipe: Pipeline, repeats: int = 20) -> float:
    """Median time of the pipeline's expert switch (high → low noise) as the sampler does it, synchronized."""
    times = []
    for _ in range(repeats):
        pipe._expert(0)
        torch.cuda.synchronize()
        start = time.perf_counter()
        pipe._expert(1)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _holders_of_largest_cuda_tensor() -> list[str]:
    """Who keeps GPU memory alive after a pipeline was deleted: the referrer chain of the largest CUDA tensor."""
    tensors = [o for o in gc.get_objects() if torch.is_tensor(o) and o.is_cuda]
    if not tensors:
        return []
    obj: object = max(tensors, key=lambda t: t.untyped_storage().nbytes())
    chain = []
    for _ in range(6):
        referrers = [r for r in gc.get_referrers(obj) if r is not chain and not isinstance(r, type(sys._getframe()))]
        if not referrers:
            break
        obj = referrers[0]
        chain.append(f"{type(obj).__module__}.{type(obj).__qualname__}"
                     + (f" keys={list(obj)[:5]}" if isinstance(obj, dict) else ""))
    return chain


def _offload_switches(pipe: Pipeline, spec: object, steps: int) -> tuple[int, int, float]:
    """(expert switches in the timed original run, in the full `baseline_steps` run, seconds of one offloading
    switch); (0, 0, 0) without offload.

    The warm-up (1 step) leaves its expert active; the switch time is measured by switching back once."""
    if not (pipe.offload_idle_expert and len(pipe.experts) > 1):
        return 0, 0, 0.0
    shift, boundary = spec.baseline_shift, spec.boundary  # type: ignore[attr-defined]
    active = unipc_expert_schedule(flow_unipc_sigmas(1, shift), boundary)[-1]

    def switches(schedule: list[int], first: int) -> int:
        previous = [first, *schedule[:-1]]
        return sum(expert != before for before, expert in zip(previous, schedule, strict=True))

    timed = unipc_expert_schedule(flow_unipc_sigmas(steps, shift), boundary)
    full = unipc_expert_schedule(flow_unipc_sigmas(spec.baseline_steps, shift), boundary)  # type: ignore[attr-defined]
    sync = torch.cuda.synchronize if pipe.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    pipe._expert(1 - timed[-1])
    sync()
    return switches(timed, active), switches(full, full[0]), time.perf_counter() - start


def bench_model(name: str, args: argparse.Namespace) -> dict[str, object]:
    spec = from_name(name)
    width, height = spec.resolution(SIZE_OF.get(name, spec.default_size), "16:9")
    image = _image(width, height) if spec.mode == "i2v" else None
    base = dict(prompt=PROMPT, image=image, width=width, height=height, num_frames=args.frames, seed=0)
    out: dict[str, object] = {"model": name, "width": width, "height": height, "frames": args.frames}

    # Original: dense SDPA, bf16 linears, plain norms, UniPC + CFG; idle A14B expert parked on the CPU (both
    # bf16 14B experts + umT5 do not fit one 80 GB card with the activations).
    pipe = Pipeline.load(name, random_weights=True, device=args.device, attention="sdpa", quant=None,
                         offload_idle_expert=len(spec.experts) > 1)
    for model in pipe.experts:
        model.use_fused_norms(False)
    del model  # a loop variable left bound would keep a whole DiT alive past `del pipe`
    _run(pipe, GenerationRequest(**base, steps=1, sampler="unipc"), stream_mp4=False)  # warm-up (cuDNN, allocator)
    original = _run(pipe, GenerationRequest(**base, steps=args.original_steps, sampler="unipc"), stream_mp4=False)
    denoise = original["timings"]["denoise"]  # type: ignore[index]
    switches, full_switches, switch_s = _offload_switches(pipe, spec, args.original_steps)
    # The A14B original parks the idle bf16 expert on the CPU: a switch moves 2 × 28 GB over PCIe. The timed
    # steps switch or not (their expert sequence is not the full run's), the full run switches once (high to
    # low noise): the per-step time leaves the timed moves out, the extrapolation adds the full run's.
    per_step = (denoise - switches * switch_s) / args.original_steps
    original["denoise_per_step_s"] = per_step
    original["denoise_extrapolated_s"] = per_step * spec.baseline_steps + full_switches * switch_s
    original["offload_switch_s"] = switch_s
    original["offload_switches_in_timed_steps"] = switches
    original["offload_switches_in_full_run"] = full_switches
    original["baseline_steps"] = spec.baseline_steps
    out["original"] = original
    del pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    if torch.cuda.is_available():
        out["memory_after_original_gib"] = torch.cuda.memory_allocated() / 2**30  # must be ~0: nothing leaks
        if out["memory_after_original_gib"] > 1:
            out["leak_holders"] = _holders_of_largest_cuda_tensor()
    quant = "w8a8" if args.quant else None
    pipe = Pipeline.load(name, random_weights=True, device=args.device,
                         attention="sagesla" if args.device == "cuda" else "sdpa", topk=args.topk, quant=quant,
                         gemm=args.gemm)
    _run(pipe, GenerationRequest(**base, steps=1), stream_mp4=True)  # warm-up: Triton autotune, cuDNN
    turbo: dict[str, object] = {"quant": quant, "gemm": pipe.gemm, "topk": args.topk}
    pipe.text_encoder.clear_cache()
    pipe.clear_image_cache()
    for steps in args.steps:
        turbo[f"steps_{steps}"] = _run(pipe, GenerationRequest(**base, steps=steps), stream_mp4=True)
        pipe.text_encoder.clear_cache()
        pipe.clear_image_cache()
    _run(pipe, GenerationRequest(**base, steps=args.steps[0]), stream_mp4=True)
    # A repeated request: prompt embedding (and for I2V the image condition) from the caches.
    cached = _run(pipe, GenerationRequest(**base, steps=args.steps[0]), stream_mp4=True)
    turbo["text_encode_cached_s"] = cached["timings"]["text_encode"]  # type: ignore[index]
    turbo["cached_prompt"] = cached
    # The same cached request with other libx264 options: the MP4 tail side by side with the default's.
    turbo["cached_prompt_x264"] = {
        params: _run(pipe, GenerationRequest(**base, steps=args.steps[0]), stream_mp4=True,
                     x264_params=params)
        for params in args.compare_x264
    }
    if len(pipe.experts) > 1 and pipe.device.type == "cuda":
        turbo["expert_switch_s"] = _switch_cost_s(pipe)
    out["turbo"] = turbo

    orig_total = (original["denoise_extrapolated_s"] + sum(v for k, v in original["timings"].items()  # type: ignore[union-attr]
                                                           if k != "denoise"))
    out["original_total_extrapolated_s"] = orig_total
    for steps in args.steps:
        t = turbo[f"steps_{steps}"]["timings"]  # type: ignore[index]
        out[f"speedup_denoise_steps_{steps}"] = original["denoise_extrapolated_s"] / t["denoise"]
        out[f"speedup_total_steps_{steps}"] = orig_total / sum(t.values())
    del pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--steps", default="3,4")
    parser.add_argument("--original-steps", type=int, default=2)
    parser.add_argument("--topk", type=float, default=0.1)
    parser.add_argument("--no-quant", dest="quant", action="store_false")
    parser.add_argument("--gemm", default="int8", choices=["int8", "fp8"], help="turbo's W8A8 GEMM")
    parser.add_argument("--compare-x264", default=[""], type=lambda v: v.split(","),
                        help="comma-separated libx264 option strings to run the cached request with too "
                             "(default: libx264's own, i.e. frame threads)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default="cuda", help="cpu only to check the script itself, never for timing")
    args = parser.parse_args()
    args.steps = [int(s) for s in args.steps.split(",")]
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (not a timing)"
    results = {"device": device_name, "torch": torch.__version__, "models": []}
    for name in args.models.split(","):
        record = bench_model(name, args)
        results["models"].append(record)  # type: ignore[union-attr]
        print(json.dumps(record, indent=1, default=float), flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))
    steps = args.steps[0]
    print(f"{'model':18} {'original denoise':>17} {f'turbo{steps} denoise':>15} {f'turbo{steps} total':>13} "
          f"{'MP4 ready':>10} {'speedup':>8}")
    for r in results["models"]:  # type: ignore[union-attr]
        run = r["turbo"][f"steps_{steps}"]
        ready = run.get("request_to_mp4_s", float("nan"))
        print(f"{r['model']:18} {r['original']['denoise_extrapolated_s']:17.2f} {run['timings']['denoise']:15.3f} "
              f"{sum(run['timings'].values()):13.3f} {ready:10.3f} {r[f'speedup_total_steps_{steps}']:8.1f}")


if __name__ == "__main__":
    main()
