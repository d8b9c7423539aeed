"""One DiT call with bf16 linears vs W8A8 INT8 (Triton) vs W8A8 FP8 (cuBLAS): time and output fidelity, same run.

The same random weights (the benchmark models' seed), SageSLA attention in all three, so the outputs differ only
by the linears. INT8 is the float model quantized in place (TurboDiffusion's format), FP8 that INT8 model after
`Int8Linear.use_fp8` (the pipeline's gemm="fp8"). Fidelity: cosine and relative L2 of the DiT output against the
bf16-linear call. Times: median of synchronized calls after two warm-up calls.

Run: python bench/gemm_fidelity.py --models wan2.1-t2v-1.3b,wan2.1-t2v-14b --out gemm_fidelity.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.configs import from_name
from engine.ops.int8_linear import Int8Linear
from engine.pipeline import Pipeline
from engine.quantize import W8A8QuantHandler


def fidelity(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    out, ref = out.double().flatten(), ref.double().flatten()
    return {"cos": torch.nn.functional.cosine_similarity(out, ref, dim=0).item(),
            "rel_l2": ((out - ref).norm() / ref.norm()).item()}


def bench_model(name: str, repeats: int) -> dict[str, object]:
    spec = from_name(name)
    width, height = spec.resolution("720p" if "14b" in name else "480p", "16:9")
    pipe = Pipeline.load(name, random_weights=True, device="cuda", attention="sagesla", quant=None)
    model = pipe.experts[0]
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(1, 16, 21, height // 8, width // 8, device="cuda", generator=gen)  # 81 frames
    t = torch.tensor([900.0], device="cuda")
    context = torch.randn(1, spec.dit.text_len, spec.dit.text_dim, device="cuda", generator=gen).to(pipe.dtype)

    def timed() -> tuple[torch.Tensor, float]:
        with torch.no_grad():
            out = model(x, t, context, None)
            model(x, t, context, None)
            times = []
            for _ in range(repeats):
                torch.cuda.synchronize()
                start = time.perf_counter()
                model(x, t, context, None)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        return out.float(), statistics.median(times)

    row: dict[str, object] = {"model": name, "device": torch.cuda.get_device_name(), "width": width,
                              "height": height}
    reference, row["bf16_s"] = timed()
    W8A8QuantHandler(model).convert_for_runtime()
    torch.cuda.empty_cache()
    int8_out, row["int8_s"] = timed()
    row["int8_vs_bf16"] = fidelity(int8_out, reference)
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.use_fp8()
    torch.cuda.empty_cache()
    fp8_out, row["fp8_s"] = timed()
    row["fp8_vs_bf16"] = fidelity(fp8_out, reference)
    row["fp8_vs_int8"] = fidelity(fp8_out, int8_out)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="wan2.1-t2v-1.3b,wan2.1-t2v-14b")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        rows.append(bench_model(name, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
        args.out.write_text(json.dumps(rows, indent=1))
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
