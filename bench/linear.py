"""W8A8 linear benchmark at the Wan shapes, one device call: python bench/linear.py [--out DIR] [--quick]

Per (M, K, N), in the same run and on the same random data (x ~ N(0, 1) with a few 10× outlier channels,
w ~ N(0, 0.02)): bf16 cuBLAS (`torch.matmul`), `torch._int_mm`, cuBLAS FP8 `torch._scaled_mm` (per-tensor
scales, fast accumulation, no quantization cost), our Triton INT8 and FP8 block-128 paths, each timed for the
activation quantizer alone, the GEMM alone and both (the number that counts), and the opt-in CUDA C++ GEMM
(csrc/w8a8_gemm.cu): INT8 in both of its variants, FP8 alone and with its quantizer. TOPS = 2·M·N·K / time; the
relative error ‖y − y_fp32‖ / ‖y_fp32‖ is against the float Linear computed in fp32. Also: the device copy rate
(the memory ceiling) and the fused LayerNorm+modulate against it, and the wgmma instructions in the chosen
kernels' SASS. Timings are medians of `triton.testing.do_bench` (CUDA events, L2 flushed) after warm-up.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.ops import fp8_cublas, w8a8_cuda
from engine.ops import int8_linear as w8a8
from engine.ops.norms import layer_norm_modulate

# (M, K, N): 1.3B-480P (32760 tokens) and 14B-720P (75600 tokens), the issue's list.
SHAPES = [
    (32760, 1536, 1536), (32760, 1536, 8960), (32760, 8960, 1536),
    (75600, 5120, 5120), (75600, 5120, 13824), (75600, 13824, 5120),
]
QUICK_SHAPES = [(32760, 1536, 8960), (75600, 5120, 5120)]
ENABLED_BY_USER = w8a8_cuda.ENABLED  # the CUDA kernel is opt-in; rows that time it flip the switch and restore it


def bench_ms(fn: Callable[[], object]) -> float:
    return float(triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median"))


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


def copy_rate_tbs() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e9  # bytes read + written, TB/s


def sass_summary() -> list[str]:
    """Registers, spills and matrix instructions of every compiled variant of the GEMM kernel."""
    lines = []
    try:
        for device_cache in w8a8._block_scaled_mm_kernel.device_caches.values():
            for kernel in device_cache[0].values():
                kernel._init_handles()
                sass = kernel.asm["sass"]
                counts = {op: len(re.findall(rf"\b{op}\b", sass))
                          for op in ("IGMMA", "QGMMA", "HGMMA", "IMMA", "HMMA", "I2FP.F32.S32", "I2F")}
                constants = getattr(kernel.src, "constants", None) or getattr(kernel.src, "constexprs", None) or {}
                names = ("IS_INT8", "GELU_QUANT", "BLOCK_M", "BLOCK_N", "SPLIT_N")
                meta = {key: value for key, value in constants.items() if str(key) in names or
                        (isinstance(key, tuple) and len(key) == 1 and isinstance(key[0], str) and key[0] in names)}
                lines.append(f"{meta} warps={kernel.metadata.num_warps} stages={kernel.metadata.num_stages} "
                             f"regs={kernel.n_regs} spills={kernel.n_spills} {counts}")
    except (AttributeError, KeyError, IndexError, RuntimeError, OSError) as error:  # cache layout varies by version
        lines.append(f"unavailable ({type(error).__name__}: {error})")
    return lines


def bench_shape(m: int, k: int, n: int) -> dict[str, object]:
    torch.manual_seed(0)
    x = torch.randn(m, k, device="cuda")
    x[:, torch.randint(0, k, (8,))] *= 10.0  # outlier channels
    x = x.bfloat16()
    w = (torch.randn(n, k, device="cuda") * 0.02).bfloat16()
    flops = 2.0 * m * n * k
    row: dict[str, object] = {"M": m, "K": k, "N": n}
    ref = x.float() @ w.float().T  # fp32 float Linear (TF32 off by default for matmul)

    y = x @ w.T
    row["bf16_ms"] = bench_ms(lambda: x @ w.T)
    row["bf16_err"] = rel_error(y, ref)

    wq, ws = w8a8.quantize_blockwise(w, "int8")
    xq, xs = w8a8.quantize_blockwise(x, "int8")
    wq_t = wq.T  # [K, N] column-major, the layout cuBLASLt wants for B
    row["int_mm_ms"] = bench_ms(lambda: torch._int_mm(xq, wq_t))

    x8_t, w8_t = x.to(torch.float8_e4m3fn), w.float().mul(20.0).to(torch.float8_e4m3fn).T
    one = torch.ones((), device="cuda")
    row["scaled_mm_ms"] = bench_ms(lambda: torch._scaled_mm(x8_t, w8_t, one, one, out_dtype=torch.bfloat16,
                                                            use_fast_accum=True))

    # Ours, Triton, INT8 (the checkpoint format): activation quantizer + block-scaled GEMM. The opt-in CUDA kernel
    # is switched off for the Triton rows and timed directly below.
    w8a8_cuda.ENABLED = False
    y = w8a8.block_scaled_mm(xq, xs, wq, ws, out_dtype=torch.bfloat16)  # autotunes once
    row["int8_config"] = str(w8a8._block_scaled_mm_autotuned.best_config)
    row["int8_quant_ms"] = bench_ms(lambda: w8a8.quantize_blockwise(x, "int8"))
    row["int8_gemm_ms"] = bench_ms(lambda: w8a8.block_scaled_mm(xq, xs, wq, ws, out_dtype=torch.bfloat16))
    row["int8_ms"] = bench_ms(lambda: w8a8.int8_linear(x, wq, ws))
    row["int8_err"] = rel_error(w8a8.int8_linear(x, wq, ws), ref)
    same_math = w8a8.block_scaled_mm_reference(xq, xs, wq, ws)  # fp32, same quantized math
    row["int8_vs_same_math"] = rel_error(y, same_math)

    # Ours, FP8 e4m3 with the same 128×128 blocks, weight requantized from INT8 at load.
    fq, fs = w8a8.requantize_int8_to_fp8(wq, ws)
    xq8, xs8 = w8a8.quantize_blockwise(x, "fp8")
    w8a8.block_scaled_mm(xq8, xs8, fq, fs, out_dtype=torch.bfloat16)
    row["fp8_config"] = str(w8a8._block_scaled_mm_autotuned.best_config)
    row["fp8_quant_ms"] = bench_ms(lambda: w8a8.quantize_blockwise(x, "fp8"))
    row["fp8_gemm_ms"] = bench_ms(lambda: w8a8.block_scaled_mm(xq8, xs8, fq, fs, out_dtype=torch.bfloat16))
    row["fp8_ms"] = bench_ms(lambda: w8a8.fp8_linear(x, fq, fs))
    row["fp8_err"] = rel_error(w8a8.fp8_linear(x, fq, fs), ref)

    # cuBLAS block-scaled FP8 (engine/ops/fp8_cublas.py): 1×128 activation groups, the same e4m3 weight, K padded.
    row["cublas_fp8"] = fp8_cublas.usable(x, k, n)
    if row["cublas_fp8"]:
        wp, wsp = fp8_cublas.pad_weight(fq, fs)
        xg, xgs = fp8_cublas.quantize_groups(x, padded_cols=wp.shape[1])

        def cublas_fp8_linear() -> torch.Tensor:
            return fp8_cublas.block_fp8_mm(*fp8_cublas.quantize_groups(x, padded_cols=wp.shape[1]), wp, wsp, None,
                                           torch.bfloat16)

        row["cublas_fp8_quant_ms"] = bench_ms(lambda: fp8_cublas.quantize_groups(x, padded_cols=wp.shape[1]))
        row["cublas_fp8_gemm_ms"] = bench_ms(lambda: fp8_cublas.block_fp8_mm(xg, xgs, wp, wsp, None, torch.bfloat16))
        row["cublas_fp8_ms"] = bench_ms(cublas_fp8_linear)
        row["cublas_fp8_err"] = rel_error(cublas_fp8_linear(), ref)
        for key in ("cublas_fp8_gemm", "cublas_fp8"):
            row[f"{key}_tops"] = flops / row[f"{key}_ms"] / 1e9
        row["cublas_fp8_speedup"] = row["bf16_ms"] / row["cublas_fp8_ms"]

    # The CUDA C++ kernel (csrc/w8a8_gemm.cu): INT8 in both variants, FP8 (ping-pong) alone and with its quantizer.
    w8a8_cuda.ENABLED = True
    row["cuda"] = w8a8_cuda.usable(xq, wq, None, y)
    w8a8_cuda.ENABLED = ENABLED_BY_USER
    if row["cuda"]:
        out = torch.empty(m, n, dtype=torch.bfloat16, device="cuda")
        for variant in range(2):
            row[f"cuda_v{variant}_ms"] = bench_ms(lambda variant=variant: w8a8_cuda.block_scaled_mm_cuda(
                xq, xs, wq, ws, None, out, variant=variant))
        row["cuda_fp8_ms"] = bench_ms(lambda: w8a8_cuda.block_scaled_mm_cuda(xq8, xs8, fq, fs, None, out))

        def cuda_fp8_linear() -> torch.Tensor:
            xq8_, xs8_ = w8a8.quantize_blockwise(x, "fp8")
            return w8a8_cuda.block_scaled_mm_cuda(xq8_, xs8_, fq, fs, None, out)

        row["cuda_fp8_linear_ms"] = bench_ms(cuda_fp8_linear)
        row["cuda_fp8_err"] = rel_error(cuda_fp8_linear(), ref)
        for key in ("cuda_v0", "cuda_v1", "cuda_fp8", "cuda_fp8_linear"):
            row[f"{key}_tops"] = flops / row[f"{key}_ms"] / 1e9
        row["cuda_fp8_speedup"] = row["bf16_ms"] / row["cuda_fp8_linear_ms"]

    for key in ("bf16", "int_mm", "scaled_mm", "int8_gemm", "int8", "fp8_gemm", "fp8"):
        row[f"{key}_tops"] = flops / row[f"{key}_ms"] / 1e9
    row["int8_speedup"] = row["bf16_ms"] / row["int8_ms"]
    row["fp8_speedup"] = row["bf16_ms"] / row["fp8_ms"]
    return row


def bench_ffn(m: int, d: int, f: int) -> dict[str, object]:
    """Wan's FFN (Linear d→f, GELU tanh, Linear f→d): bf16, W8A8 as three steps, W8A8 fused (Int8FeedForward)."""
    torch.manual_seed(0)
    x = torch.randn(m, d, device="cuda")
    x[:, torch.randint(0, d, (8,))] *= 10.0
    x = x.bfloat16()
    fc1 = torch.nn.Linear(d, f, device="cuda", dtype=torch.bfloat16)
    fc2 = torch.nn.Linear(f, d, device="cuda", dtype=torch.bfloat16)
    ref = torch.nn.functional.gelu(x.float() @ fc1.weight.float().T + fc1.bias.float(), approximate="tanh")
    ref = ref @ fc2.weight.float().T + fc2.bias.float()
    bf16 = torch.nn.Sequential(fc1, torch.nn.GELU(approximate="tanh"), fc2)
    ffn = w8a8.Int8FeedForward(w8a8.Int8Linear.from_linear(fc1), w8a8.Int8Linear.from_linear(fc2))
    with torch.no_grad():
        w8a8_cuda.ENABLED = False  # the W8A8 rows run Triton; the CUDA row switches it on
        row: dict[str, object] = {"M": m, "D": d, "F": f,
                                  "bf16_ms": bench_ms(lambda: bf16(x)),
                                  "int8_steps_ms": bench_ms(lambda: torch.nn.Sequential.forward(ffn, x)),
                                  "int8_fused_ms": bench_ms(lambda: ffn(x))}
        row["gelu_quant_config"] = str(w8a8._block_scaled_mm_gelu_quant_autotuned.best_config)
        row["bf16_err"] = rel_error(bf16(x), ref)
        row["int8_fused_err"] = rel_error(ffn(x), ref)
        w8a8_cuda.ENABLED = True
        row["cuda_fused_ms"] = bench_ms(lambda: ffn(x))  # the Triton kernel where the CUDA one cannot run
        w8a8_cuda.ENABLED = ENABLED_BY_USER
        for layer in (ffn[0], ffn[2]):
            layer.use_fp8()  # cuBLAS FP8 where it runs (GELU + group quantizer in one pass), else Triton FP8
        row["fp8_cublas"] = ffn[0].runs_cublas_fp8(x)
        row["fp8_ms"] = bench_ms(lambda: ffn(x))
        row["fp8_err"] = rel_error(ffn(x), ref)
    flops = 4.0 * m * d * f
    for key in ("bf16", "int8_steps", "int8_fused", "cuda_fused", "fp8"):
        row[f"{key}_tops"] = flops / row[f"{key}_ms"] / 1e9
    return row


def bench_norms(copy_tbs: float) -> list[dict[str, object]]:
    rows = []
    for length, d in ((32760, 1536), (75600, 5120)):
        for in_dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(1, length, d, device="cuda").to(in_dtype)
            shift, scale = torch.randn(1, 1, d, device="cuda"), torch.randn(1, 1, d, device="cuda")
            out = torch.empty(1, length, d, device="cuda", dtype=torch.bfloat16)
            ms = bench_ms(lambda x=x, shift=shift, scale=scale, out=out: layer_norm_modulate(
                x, shift, scale, out_dtype=torch.bfloat16, out=out))
            ref = layer_norm_modulate(x, shift, scale, out_dtype=torch.float32, backend="torch")
            bytes_moved = x.numel() * (x.element_size() + 2)
            rows.append({"L": length, "D": d, "in": str(in_dtype), "ms": ms, "tbs": bytes_moved / ms / 1e9,
                         "of_copy": bytes_moved / ms / 1e9 / copy_tbs, "err": rel_error(out, ref)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    parser.add_argument("--quick", action="store_true", help="two shapes only")
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    header = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
              "triton": triton.__version__, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    print(header, flush=True)
    copy_tbs = copy_rate_tbs()
    print(f"device copy {copy_tbs:.2f} TB/s", flush=True)
    rows = []
    for m, k, n in QUICK_SHAPES if args.quick else SHAPES:
        row = bench_shape(m, k, n)
        rows.append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    ffns = [bench_ffn(m, d, f) for m, d, f in ((32760, 1536, 8960), (75600, 5120, 13824))]
    for row in ffns:
        print(json.dumps(row), flush=True)
    norms = bench_norms(copy_tbs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "linear.json").write_text(json.dumps({**header, "copy_tbs": copy_tbs, "rows": rows,
                                                      "ffn": ffns, "norms": norms}, indent=1))

    print("\n| M, K, N | bf16 cuBLAS | _int_mm | _scaled_mm fp8 | INT8 GEMM | INT8 +quant (×bf16) "
          "| CUDA INT8 free / ping-pong | FP8 GEMM | FP8 +quant (×bf16) | err bf16 / int8 / fp8 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cuda = " / ".join(f"{r[f'cuda_v{v}_tops']:.0f}" for v in range(2)) if r["cuda"] else "–"
        print(f"| {r['M']}, {r['K']}, {r['N']} | {r['bf16_tops']:.0f} | {r['int_mm_tops']:.0f} | "
              f"{r['scaled_mm_tops']:.0f} | {r['int8_gemm_tops']:.0f} | {r['int8_tops']:.0f} "
              f"({r['int8_speedup']:.2f}×) | {cuda} | {r['fp8_gemm_tops']:.0f} | {r['fp8_tops']:.0f} "
              f"({r['fp8_speedup']:.2f}×) | {r['bf16_err']:.1e} / {r['int8_err']:.1e} / {r['fp8_err']:.1e} |")
    for r in rows:
        if r["cublas_fp8"]:
            print(f"cuBLAS FP8 {r['M']},{r['K']},{r['N']}: GEMM {r['cublas_fp8_gemm_tops']:.0f} TOPS, +quant "
                  f"{r['cublas_fp8_tops']:.0f} ({r['cublas_fp8_speedup']:.2f}× bf16; quant "
                  f"{r['cublas_fp8_quant_ms']:.3f} ms), err {r['cublas_fp8_err']:.1e}")
    for r in rows:
        if r["cuda"]:
            print(f"CUDA FP8 {r['M']},{r['K']},{r['N']}: GEMM {r['cuda_fp8_tops']:.0f} TOPS, +quant "
                  f"{r['cuda_fp8_linear_tops']:.0f} ({r['cuda_fp8_speedup']:.2f}× bf16), err {r['cuda_fp8_err']:.1e}")
    for r in rows:
        print(f"{r['M']},{r['K']},{r['N']}: int8 {r['int8_config']} | fp8 {r['fp8_config']} | "
              f"quant ms int8 {r['int8_quant_ms']:.3f} fp8 {r['fp8_quant_ms']:.3f} | same-math {r['int8_vs_same_math']:.1e}")
    for r in ffns:
        print(f"FFN M={r['M']} {r['D']}→{r['F']}→{r['D']}: bf16 {r['bf16_ms']:.2f} ms ({r['bf16_tops']:.0f}) | "
              f"W8A8 three steps {r['int8_steps_ms']:.2f} ms ({r['int8_steps_tops']:.0f}) | W8A8 fused "
              f"{r['int8_fused_ms']:.2f} ms ({r['int8_fused_tops']:.0f}, ×{r['bf16_ms'] / r['int8_fused_ms']:.2f}) | "
              f"CUDA fused {r['cuda_fused_ms']:.2f} ms ({r['cuda_fused_tops']:.0f}) | FP8 "
              f"{'cuBLAS' if r['fp8_cublas'] else 'Triton'} {r['fp8_ms']:.2f} ms ({r['fp8_tops']:.0f}, "
              f"×{r['bf16_ms'] / r['fp8_ms']:.2f}, err {r['fp8_err']:.1e}) | "
              f"err bf16 {r['bf16_err']:.1e} fused {r['int8_fused_err']:.1e} | {r['gelu_quant_config']}")
    sass = sass_summary()
    (args.out / "linear_sass.txt").write_text("\n".join(sass))
    print("\n".join(sass))
    for r in norms:
        print(f"layer_norm_modulate L={r['L']} D={r['D']} {r['in']}→bf16: {r['ms']:.3f} ms, {r['tbs']:.2f} TB/s "
              f"({100 * r['of_copy']:.0f} % of copy), err {r['err']:.1e}")


if __name__ == "__main__":
    main()
