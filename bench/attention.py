"""Attention benchmark at the Wan shapes (one device call): dense cuDNN / flash SDPA vs `sla` and `sagesla`.

For each shape: cuDNN and flash SDPA (bf16, dense); dense sagesla (FP8 and 16-bit P·V); sagesla and sla at
topk 0.1 and 0.15 with the block map, quantization and linear branch included in the time; the pre-pass
alone (statistics, pooling, quantization, top-k); the linear branch's share (sagesla with vs without
proj_l); two other block geometries; and a per-kernel profile of one sagesla call. Times are medians of ≥ 20
CUDA-event timings after warm-up. TOPS-equivalent = 4·L²·D·H / time (dense-equivalent work); for sparse rows
also per kept block (the work actually done). Fidelity beside each time: cosine and relative L1 against fp32
exact attention (dense rows) or the fp32 reference of the same sparse semantics (sparse rows), on the first
`--fidelity-heads` heads (the reference is O(L²)).

Run: python bench/attention.py --out attention.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.ops import sla  # noqa: E402

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


def run_shape(name: str, shape: tuple[int, int, int, int], fidelity_heads: int) -> list[dict]:
    batch, seq, heads, dim = shape
    q, k, v = make_inputs(shape, seed=0)
    torch.manual_seed(0)
    proj_l = torch.nn.Linear(dim, dim).cuda()
    torch.nn.init.normal_(proj_l.weight, std=0.5 / math.sqrt(dim))
    block_q, block_k = sla.default_block_sizes(q.device)
    n_kblocks = math.ceil(seq / block_k)
    dense_ops = 4.0 * seq * seq * dim * heads * batch
    sub = tuple(t[:, :, :fidelity_heads] for t in (q, k, v))  # fidelity on the first heads only
    everything = torch.ones((batch, fidelity_heads, math.ceil(seq / block_q), n_kblocks), dtype=torch.bool,
                            device="cuda")
    exact = sla.sparse_attention_reference(*sub, everything, block_q=block_q, block_k=block_k)
    sparse_refs = {topk: sla.sparse_linear_attention_reference(*sub, topk=topk, block_q=block_q, block_k=block_k,
                                                               proj_l=proj_l) for topk in (0.1, 0.15)}
    rows: list[dict] = []

    def record(method: str, fn: Callable[[], torch.Tensor], topk: float | None, ref: torch.Tensor | None) -> None:
        ms = median_ms(fn)
        row = {"shape": name, "method": method, "ms": round(ms, 4), "tops_dense_equiv": round(dense_ops / ms / 1e9, 1)}
        if topk is not None:
            kept = sla.kept_blocks(topk, n_kblocks) / n_kblocks
            row.update(topk=topk, kept_fraction=round(kept, 4),
                       tops_kept_blocks=round(kept * dense_ops / ms / 1e9, 1))
        if ref is not None:
            out = fn()[:, :, :fidelity_heads]
            row["cos"], row["rel_l1"] = (round(x, 6) for x in fidelity(out, ref))
        rows.append(row)
        print(json.dumps(row), flush=True)

    record("cudnn_sdpa_bf16", lambda: sdpa(q, k, v, SDPBackend.CUDNN_ATTENTION), None, exact)
    record("flash_sdpa_bf16", lambda: sdpa(q, k, v, SDPBackend.FLASH_ATTENTION), None, exact)
    for fp8 in (True, False):
        pv = "fp8pv" if fp8 else "bf16pv"
        record(f"sagesla_dense_{pv}",
               lambda: sla.sparse_linear_attention(q, k, v, topk=1.0, backend="sagesla", fp8_pv=fp8), None, exact)
    for topk in (0.1, 0.15):
        for fp8 in (True, False):
            pv = "fp8pv" if fp8 else "bf16pv"
            record(f"sagesla_{pv}", lambda: sla.sparse_linear_attention(
                q, k, v, topk=topk, proj_l=proj_l, backend="sagesla", fp8_pv=fp8), topk, sparse_refs[topk])
            record(f"sagesla_{pv}_no_linear", lambda: sla.sparse_linear_attention(
                q, k, v, topk=topk, backend="sagesla", fp8_pv=fp8), topk, None)
        record("sla_fwd", lambda: sla.sparse_linear_attention(q, k, v, topk=topk, proj_l=proj_l, backend="sla"),
               topk, sparse_refs[topk])
        for fp8 in (True, False):
            # the pre-pass alone: K mean / V absmax / φ(K)ᵀV, pooling, INT8 (+ FP8 V) quantization, top-k
            record(f"prepass_{'fp8pv' if fp8 else 'bf16pv'}", lambda: sla._prepare(
                q, k, v, topk=topk, block_q=block_q, block_k=block_k, quantize=True, fp8_pv=fp8, linear=True).lut,
                topk, None)
    for block_q, block_k in ((128, 128), (128, 64)):
        # other block geometries of the map (different selections, so no fidelity row): which runs fastest
        topk, n_blocks = 0.1, math.ceil(seq / block_k)
        for fp8 in (True, False):
            ms = median_ms(lambda: sla.sparse_linear_attention(q, k, v, topk=topk, block_q=block_q, block_k=block_k,
                                                               proj_l=proj_l, backend="sagesla", fp8_pv=fp8))
            kept = sla.kept_blocks(topk, n_blocks) / n_blocks
            row = {"shape": name, "method": f"sagesla_{'fp8pv' if fp8 else 'bf16pv'}_{block_q}x{block_k}",
                   "ms": round(ms, 4), "tops_dense_equiv": round(dense_ops / ms / 1e9, 1), "topk": topk,
                   "kept_fraction": round(kept, 4), "tops_kept_blocks": round(kept * dense_ops / ms / 1e9, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
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
        for fp8 in (True, False):
            key = f"{name} sagesla topk 0.1 {'fp8pv' if fp8 else 'bf16pv'}"
            breakdown[key] = kernel_breakdown(SHAPES[name], 0.1, fp8)
            print(key, json.dumps(breakdown[key], indent=0), flush=True)
        rows += run_shape(name, SHAPES[name], args.fidelity_heads)
    tuned = {kernel.fn.__name__: {str(key): str(config) for key, config in kernel.cache.items()}
             for kernel in (sla._sagesla_fwd_kernel, sla._sla_fwd_kernel)}
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"), "autotuned": tuned}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "kernel_breakdown_us": breakdown}, indent=1))
    print(f"\n{meta['device']}  torch {meta['torch']}  triton {meta['triton']}")
    print(f"{'shape':18} {'method':28} {'topk':>5} {'ms':>9} {'TOPS-eq':>8} {'TOPS-kept':>9} {'cos':>9} {'relL1':>7}")
    for row in rows:
        print(f"{row['shape']:18} {row['method']:28} {row.get('topk', ''):>5} {row['ms']:9.3f} "
              f"{row['tops_dense_equiv']:8.0f} {row.get('tops_kept_blocks', ''):>9} {row.get('cos', ''):>9} "
              f"{row.get('rel_l1', ''):>7}")
    print(json.dumps(tuned, indent=1))


if __name__ == "__main__":
    main()
