"""MP4 encode cost on the serving machine: time, size and PSNR of an 81-frame clip.

    python bench/encode.py --out $OUT/encode.json     # 480p and 720p: presets, then the streamed tails

Two tables. "presets": the whole clip through `write_mp4` per libx264 preset. "streamed": the clip fed the way
the VAE decode hands it over (1 frame, then 4 every DECODE_CHUNK_S) through `Mp4Stream` with the default
preset and each libx264 threading choice; `tail_s` is the time from the last chunk to the file in place, the
part of the encode left on a request's critical path.

The clip is synthetic but video-like (moving smooth structures, fine texture, mild noise), so the presets'
motion search and entropy coding see realistic work; pure noise would be the worst case for every preset.
Times are wall clock of `write_mp4` (ffmpeg as a subprocess, all cores), median of 3 after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.video import Mp4Stream, read_mp4, write_mp4  # noqa: E402

PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium")
SIZES = {"480p": (480, 832), "720p": (720, 1280)}
# Seconds per decoded 4-frame chunk: the exact VAE decode's time over its 21 chunks on the H100 (session 10:
# 0.683 s at 480p, 1.555 s at 720p).
DECODE_CHUNK_S = {"480p": 0.683 / 21, "720p": 1.555 / 21}
X264_THREADING = {
    "frame threads (libx264 default)": "",
    "sliced threads": "sliced-threads=1",
    "sliced, no lookahead or B-frames (zerolatency)": "bframes=0:rc-lookahead=0:sync-lookahead=0:mbtree=0:"
                                                      "sliced-threads=1",
}


def clip(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((frames, height, width, 3), np.uint8)
    for f in range(frames):
        t = f / frames
        base = (np.sin(x / 37 + 6 * t) + np.cos(y / 23 - 4 * t) + np.sin((x + y) / 11 + 9 * t) * 0.3)
        texture = np.sin(x / 2.3 + y / 3.1 + 20 * t) * 0.15
        for c in range(3):
            value = 128 + 50 * base * (0.8 + 0.2 * c) + 40 * texture + rng.normal(0, 3, (height, width))
            out[f, :, :, c] = np.clip(value, 0, 255)
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def streamed_tail(frames: np.ndarray, path: Path, chunk_s: float, x264_params: str) -> float:
    """Seconds from the last chunk handed to an `Mp4Stream` to the finished file, chunks paced by chunk_s."""
    with Mp4Stream(path, x264_params=x264_params) as stream:
        stream.put(frames[:1])
        for first in range(1, len(frames), 4):
            time.sleep(chunk_s)
            stream.put(frames[first : first + 4])
        start = time.perf_counter()
        stream.close()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--crf", type=int, default=18)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows, streamed = [], []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.mp4"
        for size, (height, width) in SIZES.items():
            frames = clip(args.frames, height, width)
            write_mp4(frames, path, crf=args.crf, preset="ultrafast")  # warm-up: binary in the page cache
            for preset in PRESETS:
                times = []
                for _ in range(3):
                    start = time.perf_counter()
                    write_mp4(frames, path, crf=args.crf, preset=preset)
                    times.append(time.perf_counter() - start)
                decoded, _ = read_mp4(path)
                row = {"size": size, "preset": preset, "crf": args.crf, "seconds": statistics.median(times),
                       "megabytes": path.stat().st_size / 1e6, "psnr_db": psnr(decoded, frames)}
                rows.append(row)
                print(json.dumps(row), flush=True)
            for name, params in X264_THREADING.items():
                tails = [streamed_tail(frames, path, DECODE_CHUNK_S[size], params) for _ in range(3)]
                decoded, _ = read_mp4(path)
                row = {"size": size, "x264_threading": name, "x264_params": params, "crf": args.crf,
                       "chunk_s": DECODE_CHUNK_S[size], "tail_s": statistics.median(tails), "tails_s": tails,
                       "megabytes": path.stat().st_size / 1e6, "psnr_db": psnr(decoded, frames)}
                streamed.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"presets": rows, "streamed": streamed}, indent=1))


if __name__ == "__main__":
    main()
