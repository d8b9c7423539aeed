"""docs/img/e2e.png from the e2e benchmark's JSON: stacked stage times, original vs turbo, per model.

    python bench/plot_e2e.py docs/results/e2e-1.3b.json docs/results/e2e-14b.json docs/results/e2e-a14b-i2v.json

The original (50 UniPC steps + CFG, extrapolated from the timed steps) and turbo (3 rCM steps) sit on separate
linear axes, since they differ by two orders of magnitude; the ratio is written beside each turbo bar.
Needs matplotlib (not a project dependency: `pip install matplotlib`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STAGES = ("text_encode", "image_encode", "denoise", "vae_decode", "encode_mp4")
COLORS = {"text_encode": "#8c8c8c", "image_encode": "#c49c94", "denoise": "#1f77b4", "vae_decode": "#ff7f0e",
          "encode_mp4": "#2ca02c"}


def stage_times(record: dict, *, original: bool) -> dict[str, float]:
    timings = dict(record["timings"])
    if original:
        timings["denoise"] = record["denoise_extrapolated_s"]
    return {stage: timings.get(stage, 0.0) for stage in STAGES}


def turbo_steps(model: dict, preferred: int) -> int:
    """The preferred step count when the run has it, else the fewest steps it has (A14B runs only 4)."""
    available = sorted(int(key.removeprefix("steps_")) for key in model["turbo"] if key.startswith("steps_"))
    return preferred if preferred in available else available[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--model-steps", default="wan2.2-i2v-a14b=4",
                        help="per-model step counts, e.g. the speed issue's 4-step A14B bar")
    parser.add_argument("--out", type=Path, default=Path("docs/img/e2e.png"))
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for path in args.results for m in json.loads(path.read_text())["models"]]
    per_model = {name: int(n) for name, n in (item.split("=") for item in args.model_steps.split(",") if item)}
    device = json.loads(args.results[0].read_text())["device"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 1.2 + 0.9 * len(models)))
    for ax, original in zip(axes, (True, False), strict=True):
        for row, model in enumerate(models):
            steps = turbo_steps(model, per_model.get(model["model"], args.steps))
            record = model["original"] if original else model["turbo"][f"steps_{steps}"]
            left = 0.0
            for stage, seconds in stage_times(record, original=original).items():
                ax.barh(row, seconds, left=left, color=COLORS[stage], label=stage if row == 0 else None)
                left += seconds
            if not original:
                ratio = model[f"speedup_total_steps_{steps}"]
                ax.text(left, row, f"  {left:.2f} s, {steps} steps ({ratio:.0f}× faster)", va="center", fontsize=8)
        ax.set_yticks(range(len(models)), [f"{m['model']} {m['height']}p" for m in models])
        ax.invert_yaxis()
        ax.set_xlabel("seconds")
        ax.set_title("original: 50 UniPC steps + CFG (A14B: 40), dense bf16" if original
                     else "turbo: rCM steps, SageSLA top-k 0.1, W8A8, fused norms")
        ax.margins(x=0.35 if not original else 0.05)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(STAGES), fontsize=8)
    fig.suptitle(f"Request → MP4, 81 frames, {device} (random weights at the real shapes)", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
