"""Attention benchmark at the Wan shapes (one device call): dense cuDNN / flash SDPA vs `sla` and `sagesla`.

For each shape: cuDNN and flash SDPA (bf16, dense); dense sagesla on the CUDA kernel (csrc/sagesla_attn.cu)
and on the Triton kernel (FP8 and 16-bit P·V); sagesla at topk 0.1 and 0.15 with the block map, quantization
and linear branch included in the time: the sm90 default (128×128 blocks, CUDA kernel), TurboDiffusion's sm90
64×128 map on the CUDA and on the Triton kernel, and sla; the pre-pass alone; the linear branch's share
(sagesla with vs without proj_l); and a per-kernel profile of one default sagesla call. Times are medians of ≥ 20
CUDA-event timings after warm-up, of single synchronized calls and, for the default rows and dense cuDNN /
sagesla, also of calls issued back to back (per call). TOPS-equivalent = 4·L²·D·H / time (dense-equivalent
work); for sparse rows also per kept block (the work actually done). Fidelity beside each time: cosine and
relative L1 against fp32 exact attention (dense rows) or the fp32 reference of the same sparse semantics (sparse
rows), on the first `--fidelity-heads` heads (the reference is O(L²)).

Run: python bench/attention.py --out attention.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.ops import sagesla_cuda, sla  # noqa: E402

SHAPES = {"wan2.1-1.3b-480p": (1, 32760, 12, 128), "wan2.1-14b-720p": (1, 75600, 40, 128)}


def median_ms(fn: Callable[[], object], *, min_runs: int = 20, min_seconds: float = 0.5) -> float:
    """Median CUDA-event time of fn after 3 warm-up calls; at least min_runs runs and min_seconds in all."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - started < min_seconds:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def back_to_back_ms(fn: Callable[[], object], *, calls: int = 20, runs: int = 10) -> float:
    """Median over runs of (CUDA-event time of `calls` calls issued back to back) / calls.

    The host then runs ahead of the GPU, as it does inside the model, so its launch overhead is hidden; median_ms
    syncs after every call and counts the host's time to the first launch.
    """
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times: list[float] = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def fidelity(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    out, ref = out.double().flatten(), ref.double().flatten()
    cosine = F.cosine_similarity(out, ref, dim=0).item()
    return cosine, ((out - ref).abs().sum() / ref.abs().sum()).item()


def make_inputs(shape: tuple[int, int, int, int], seed: int) -> tuple[torch.Tensor, ...]:
    """bf16 q, k, v [B, L, H, D]; K with a shared channel bias (the case K smoothing exists for)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    batch, seq, heads, dim = shape
    q = torch.randn(shape, generator=gen, device="cuda")
    k = torch.randn(shape, generator=gen, device="cuda") + 4.0 * torch.randn(dim, generator=gen, device="cuda")
    v = torch.randn(shape, generator=gen, device="cuda")
    return tuple(t.bfloat16() for t in (q, k, v))


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: SDPBackend) -> torch.Tensor:
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


@contextlib.contextmanager
def triton_kernel_only() -> Iterator[None]:
    """sagesla's Triton attention kernel instead of the CUDA one (csrc/sagesla_attn.cu), for a side-by-side row."""
    enabled = sagesla_cuda.ENABLED
    sagesla_cuda.ENABLED = False
    try:
        yield
    finally:
        sagesla_cuda.ENABLED = enabled


def run_shape(name: str, shape: tuple[int, int, int, int], fidelity_heads: int) -> list[dict]:
    batch, seq, heads, dim = shape
    q, k, v = make_inputs(shape, seed=0)
    torch.manual_seed(0)
    proj_l = torch.nn.Linear(dim, dim).cuda()
    torch.nn.init.normal_(proj_l.weight, std=0.5 / math.sqrt(dim))
    dense_ops = 4.0 * seq * seq * dim * heads * batch
    sub = tuple(t[:, :, :fidelity_heads] for t in (q, k, v))  # fidelity on the first heads only
    everything = torch.ones((batch, fidelity_heads, math.ceil(seq / 128), math.ceil(seq / 128)), dtype=torch.bool,
                            device="cuda")
    exact = sla.sparse_attention_reference(*sub, everything, block_q=128, block_k=128)
    sparse_refs = {(topk, bq, bk): sla.sparse_linear_attention_reference(*sub, topk=topk, block_q=bq, block_k=bk,
                                                                         proj_l=proj_l)
                   for topk in (0.1, 0.15) for bq, bk in ((128, 128), (64, 128))}
    rows: list[dict] = []

    def record(method: str, fn: Callable[[], torch.Tensor], topk: float | None, ref: torch.Tensor | None,
               back_to_back: bool = False) -> None:
        ms = median_ms(fn)
        row = {"shape": name, "method": method, "ms": round(ms, 4), "tops_dense_equiv": round(dense_ops / ms / 1e9, 1)}
        if back_to_back:  # long calls (14B dense) in fewer, shorter runs: the host's share is tiny there anyway
            b2b = back_to_back_ms(fn, calls=20 if ms < 10 else 5, runs=10 if ms < 10 else 5)
            row["ms_back_to_back"] = round(b2b, 4)
            row["tops_dense_equiv_back_to_back"] = round(dense_ops / b2b / 1e9, 1)
        if topk is not None:
            n_kblocks = math.ceil(seq / 128)  # every map here has key blocks of 128
            kept = sla.kept_blocks(topk, n_kblocks) / n_kblocks
            row.update(topk=topk, kept_fraction=round(kept, 4),
                       tops_kept_blocks=round(kept * dense_ops / ms / 1e9, 1))
        if ref is not None:
            out = fn()[:, :, :fidelity_heads]
            row["cos"], row["rel_l1"] = (round(x, 6) for x in fidelity(out, ref))
        rows.append(row)
        print(json.dumps(row), flush=True)

    def sagesla(topk: float, block_q: int, linear: bool = True, fp8: bool = True) -> Callable[[], torch.Tensor]:
        return lambda: sla.sparse_linear_attention(q, k, v, topk=topk, block_q=block_q, block_k=128,
                                                   proj_l=proj_l if linear else None, backend="sagesla", fp8_pv=fp8)

    # dense rows back to back as well: a single synchronized sagesla call also times the host's ~0.5 ms of
    # Python and launches before the attention kernel starts, which the model hides (it runs ahead of the GPU)
    record("cudnn_sdpa_bf16", lambda: sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION), None, exact, back_to_back=True)
    record("flash_sdpa_bf16", lambda: sdpa(q, k, v, SDPBackend.FLASH_ATTENTION), None, exact)
    record("sagesla_dense_fp8pv_cuda", sagesla(1.0, 128, linear=False), None, exact, back_to_back=True)
    with triton_kernel_only():
        record("sagesla_dense_fp8pv_triton", sagesla(1.0, 64, linear=False), None, exact)
        record("sagesla_dense_bf16pv_triton", sagesla(1.0, 64, linear=False, fp8=False), None, exact)
    for topk in (0.1, 0.15):
        # the default on sm90: 128×128 blocks, the CUDA kernel; then TurboDiffusion's sm90 64×128 map on both kernels
        record("sagesla_fp8pv_cuda_128x128", sagesla(topk, 128), topk, sparse_refs[topk, 128, 128],
               back_to_back=True)
        record("sagesla_fp8pv_cuda_128x128_no_linear", sagesla(topk, 128, linear=False), topk, None,
               back_to_back=True)
        record("sagesla_fp8pv_cuda_64x128", sagesla(topk, 64), topk, sparse_refs[topk, 64, 128])
        with triton_kernel_only():
            record("sagesla_fp8pv_triton_64x128", sagesla(topk, 64), topk, sparse_refs[topk, 64, 128])
            record("sagesla_bf16pv_triton_64x128", sagesla(topk, 64, fp8=False), topk, sparse_refs[topk, 64, 128])
        record("sla_fwd_64x128", lambda topk=topk: sla.sparse_linear_attention(
            q, k, v, topk=topk, block_q=64, block_k=128, proj_l=proj_l, backend="sla"), topk, sparse_refs[topk, 64, 128])
        # the pre-pass alone as the CUDA path runs it: statistics (with proj_l folded in), pooling, quantization
        # (+ permuted FP8 Vᵀ), top-k; the φ(K)ᵀV reduction runs on a second stream, outside this time
        record("prepass_cuda_path_128x128", lambda topk=topk: sla._prepare(
            q, k, v, topk=topk, block_q=128, block_k=128, quantize=True, fp8_pv=True, linear=True, proj_l=proj_l,
            permute_v=True).lut, topk, None)
    return rows


def kernel_breakdown(shape: tuple[int, int, int, int], topk: float, fp8: bool) -> list[dict]:
    """Per-kernel GPU time of one sagesla call (with proj_l), from the torch profiler over 5 calls."""
    q, k, v = make_inputs(shape, seed=1)
    proj_l = torch.nn.Linear(shape[-1], shape[-1]).cuda()
    call = lambda: sla.sparse_linear_attention(q, k, v, topk=topk, proj_l=proj_l, backend="sagesla", fp8_pv=fp8)
    call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            call()
        torch.cuda.synchronize()
    events = []
    for event in prof.key_averages():
        total_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        if total_us > 0:
            events.append({"kernel": event.key[:90], "us_per_call": round(total_us / 5, 1)})
    return sorted(events, key=lambda e: -e["us_per_call"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {list(SHAPES)}")
    parser.add_argument("--fidelity-heads", type=int, default=2)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/attention.py needs a CUDA GPU")
    rows = []
    breakdown = {}
    for name in args.shapes.split(","):
        key = f"{name} sagesla topk 0.1 fp8pv (default path)"
        breakdown[key] = kernel_breakdown(SHAPES[name], 0.1, True)
        print(key, json.dumps(breakdown[key], indent=0), flush=True)
        rows += run_shape(name, SHAPES[name], args.fidelity_heads)
    tuned = {kernel.fn.__name__: {str(key): str(config) for key, config in kernel.cache.items()}
             for kernel in (sla._sagesla_fwd_kernel, sla._sla_fwd_kernel)}
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"), "autotuned": tuned}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "kernel_breakdown_us": breakdown}, indent=1))
    print(f"\n{meta['device']}  torch {meta['torch']}  triton {meta['triton']}")
    print(f"{'shape':18} {'method':38} {'topk':>5} {'ms':>9} {'TOPS-eq':>8} {'TOPS-kept':>9} {'cos':>9} {'relL1':>7}")
    for row in rows:
        print(f"{row['shape']:18} {row['method']:38} {row.get('topk', ''):>5} {row['ms']:9.3f} "
              f"{row['tops_dense_equiv']:8.0f} {row.get('tops_kept_blocks', ''):>9} {row.get('cos', ''):>9} "
              f"{row.get('rel_l1', ''):>7}")
    print(json.dumps(tuned, indent=1))


if __name__ == "__main__":
    main()
