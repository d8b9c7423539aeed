"""MP4 output: H.264 (libx264), yuv420p, `+faststart`, 16 fps by default, through imageio-ffmpeg.

`write_mp4` pipes raw RGB frames into the ffmpeg binary that the imageio-ffmpeg wheel ships (no system ffmpeg
needed) and accepts either the whole clip or an iterable of chunks, so frames can be encoded while the VAE is
still decoding. The file appears atomically: ffmpeg writes a hidden temp file in the target directory and
`os.replace` moves it into place only after ffmpeg has finished, so a reader never sees half a video.

yuv420p stores chroma at half resolution in both directions, so libx264 needs even widths and heights; odd
sizes are refused rather than silently rescaled (imageio-ffmpeg's `macro_block_size` would resize to a
multiple of 16; it is set to 1 here). Every Wan size is a multiple of 16 anyway.

`Mp4Stream` runs `write_mp4` on a background thread fed chunk by chunk: the service hands it each decoded chunk
as the VAE yields it, so libx264 encodes while the GPU decodes and only the tail of the encode stays on the
request's critical path.

`read_mp4` and `probe_mp4` decode with the same binary, for tests and tools (there may be no ffprobe).
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

DEFAULT_FPS = 16  # Wan / TurboDiffusion output rate
# libx264's constant-rate factor: 0 is lossless, 23 its default; 18 is commonly taken as visually lossless and
# keeps an 81-frame 832x480 clip at a few MB.
DEFAULT_CRF = 18
# libx264 preset: on the H100 machine's CPU (bench/encode.py, 81 frames, crf 18) veryfast encodes 480p in 0.26 s
# and 720p in 0.44 s against medium's 0.72 / 1.15 s, at the same PSNR (37.2 dB) and an 8 % smaller file; the
# faster presets (superfast, ultrafast) double to quadruple the size. The encode sits on the request's critical
# path, so the default is veryfast.
DEFAULT_PRESET = "veryfast"
# libx264's threading. Its default, frame threads, gives each thread a frame of its own; sliced threads split
# every frame between them, so fewer frames are still in flight when the last chunk arrives. Measured on the
# H200 machine's 16 cores (docs/PERFORMANCE.md, MP4 encode): the tail after a 1.3B request's last chunk was
# 72 ms with sliced threads and 92 ms with frame threads (bench/encode.py: 2-3 % more bytes, 0.03 dB less
# PSNR).
DEFAULT_X264_PARAMS = "sliced-threads=1"


def frames_from_video(video: torch.Tensor) -> np.ndarray:
    """Convert a decoded video in [-1, 1] to uint8 RGB frames.

    Args:
        video: [3, F, H, W] or [1, 3, F, H, W] (one sample; index a batch before calling), any float dtype and
            device. Values outside [-1, 1] are clamped, as TurboDiffusion does before saving.

    Returns:
        [F, H, W, 3] uint8, C-contiguous, on the host: round((x + 1) / 2 · 255).
    """
    if video.dim() == 5:
        if video.shape[0] != 1:
            raise ValueError(f"expected one sample, got a batch of {video.shape[0]}; index the batch first")
        video = video[0]
    return uint8_frames(video).cpu().numpy()


def uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """`frames_from_video` without the trip to the host: [3, F, H, W] in [-1, 1] → [F, H, W, 3] uint8 tensor on
    the video's device (the caller chooses how and when to copy it)."""
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a video [3, F, H, W] or [1, 3, F, H, W], got {tuple(video.shape)}")
    pixels = ((video.float().clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).contiguous()  # [3, F, H, W] -> [F, H, W, 3]


def write_mp4(
    frames: np.ndarray | Iterable[np.ndarray],
    path: str | os.PathLike[str],
    fps: float = DEFAULT_FPS,
    *,
    crf: int = DEFAULT_CRF,
    preset: str = DEFAULT_PRESET,
    x264_params: str = DEFAULT_X264_PARAMS,
) -> int:
    """Encode uint8 RGB frames to an H.264 yuv420p MP4 with the moov atom in front (+faststart).

    Args:
        frames: [F, H, W, 3] uint8, or an iterable of [f, H, W, 3] uint8 chunks (all the same H and W),
            written as they arrive.
        path: destination; its directory must exist. Replaced atomically if it already exists.
        fps: frames per second.
        crf: libx264 constant-rate factor, 0 (lossless) to 51.
        preset: libx264 speed/size preset (ultrafast … veryslow).
        x264_params: libx264 options as `key=value:key=value` (ffmpeg's `-x264-params`), "" for none. ffmpeg
            skips an option libx264 does not know without an error.

    Returns:
        The number of frames written.

    Raises:
        ValueError: no frames, a chunk that is not uint8 [f, H, W, 3], sizes that change between chunks, odd
            H or W, or a bad fps / crf.
        RuntimeError: ffmpeg did not produce a complete file (e.g. an unknown preset).
    """
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps!r}")
    if not 0 <= crf <= 51:
        raise ValueError(f"crf must be in 0..51 (libx264), got {crf!r}")
    path = Path(path)
    chunks = _checked_chunks([frames] if isinstance(frames, np.ndarray) else frames)
    first = next(chunks, None)
    if first is None:
        raise ValueError("no frames to write")
    height, width = first.shape[1:3]
    tmp_path = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    import imageio_ffmpeg  # imported here so the engine imports with torch alone

    writer = imageio_ffmpeg.write_frames(
        str(tmp_path),
        (width, height),
        pix_fmt_in="rgb24",
        pix_fmt_out="yuv420p",
        fps=fps,
        quality=None,  # rate control is the crf below
        codec="libx264",
        macro_block_size=1,  # never rescale; even sizes are checked above
        ffmpeg_log_level="error",
        output_params=["-crf", str(crf), "-preset", preset,
                       *(["-x264-params", x264_params] if x264_params else []),
                       "-movflags", "+faststart", "-f", "mp4"],
    )
    num_frames = 0
    try:
        writer.send(None)  # start ffmpeg
        for chunk in _prepend(first, chunks):
            if chunk.shape[1:3] != (height, width):
                new_size = f"{chunk.shape[2]}x{chunk.shape[1]}"
                raise ValueError(f"frame size changed from {width}x{height} to {new_size} (W x H)")
            writer.send(chunk)
            num_frames += chunk.shape[0]
        writer.close()  # closes ffmpeg's stdin and waits for it to finish the file
        # write_frames does not report ffmpeg's exit status. With +faststart the moov atom is moved in front
        # of mdat only when ffmpeg finalises the file, so its position proves a complete MP4.
        if not tmp_path.is_file() or not _moov_before_mdat(tmp_path):
            raise RuntimeError(f"ffmpeg did not finish {path} (see its messages on stderr)")
        os.replace(tmp_path, path)
    finally:
        writer.close()
        tmp_path.unlink(missing_ok=True)
    return num_frames


class Mp4StreamAborted(Exception):
    """The producer gave up (failure or cancel): the encoder stops and no file appears."""


class Mp4Stream:
    """`write_mp4` on a background thread, fed chunk by chunk with `put`, finished with `close` or `abort`.

    `put` never raises for an encoder failure (a full disk, say): the failure is kept and raised by `close`, so
    the producer's own errors and the storage's stay apart. Usable as a context manager: leaving it on an
    exception aborts (no file, the temp file removed), leaving it normally does not close it.
    """

    _DONE = object()
    _ABORT = object()

    def __init__(self, path: str | os.PathLike[str], fps: float = DEFAULT_FPS, **options: object) -> None:
        # A few chunks of slack: enough to cover ffmpeg's pauses, bounded so a stalled encoder holds little memory.
        self._chunks: queue.Queue[object] = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._frames = 0
        self._closed = False  # the producer sent its marker
        self._ended = False  # the encoder took it
        self._thread = threading.Thread(target=self._encode, args=(Path(path), fps, options), name="mp4-stream",
                                        daemon=True)
        self._thread.start()

    def _encode(self, path: Path, fps: float, options: dict[str, object]) -> None:
        try:
            self._frames = write_mp4(self._iterate(), path, fps, **options)  # type: ignore[arg-type]
        except Mp4StreamAborted:
            pass
        except BaseException as error:  # noqa: BLE001 - handed to the producer by close()
            self._error = error
            # Until the producer's close/abort marker arrives, keep taking chunks so a put never blocks.
            while not self._ended:
                item = self._chunks.get()
                self._ended = item is self._DONE or item is self._ABORT

    def _iterate(self) -> Iterator[np.ndarray]:
        while True:
            item = self._chunks.get()
            if item is self._DONE or item is self._ABORT:
                self._ended = True
                if item is self._ABORT:
                    raise Mp4StreamAborted
                return
            yield item  # type: ignore[misc]

    def put(self, chunk: np.ndarray) -> None:
        """Queue a uint8 [f, H, W, 3] chunk (blocks while 4 chunks wait); ignored once the encoder failed."""
        if self._closed:
            raise RuntimeError("the stream is closed")
        if self._error is None:
            self._chunks.put(chunk)

    def close(self) -> int:
        """Wait for the file to be complete and in place; returns the number of frames written.

        Raises:
            The encoder's error (ValueError for bad frames or no frames, RuntimeError / OSError for ffmpeg or
            the disk).
        """
        self._finish(self._DONE)
        if self._error is not None:
            raise self._error
        return self._frames

    def abort(self) -> None:
        """Stop encoding and leave no file behind."""
        self._finish(self._ABORT)

    def _finish(self, marker: object) -> None:
        if not self._closed:
            self._closed = True
            self._chunks.put(marker)
        self._thread.join()

    def __enter__(self) -> Mp4Stream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is not None:
            self.abort()


def read_mp4(path: str | os.PathLike[str]) -> tuple[np.ndarray, float]:
    """Decode a video to uint8 RGB frames [F, H, W, 3] and its frame rate."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    try:
        meta = next(reader)
        width, height = meta["size"]
        frames = [np.frombuffer(frame, dtype=np.uint8).reshape(height, width, 3) for frame in reader]
    finally:
        reader.close()
    return np.stack(frames) if frames else np.zeros((0, height, width, 3), np.uint8), float(meta["fps"])


def probe_mp4(path: str | os.PathLike[str]) -> dict[str, object]:
    """Describe the first video stream by decoding the whole file with imageio-ffmpeg's ffmpeg binary.

    Returns:
        dict with codec (e.g. "h264"), pix_fmt, width, height, num_frames (decoded frames), fps (float) and
        faststart (whether the moov atom precedes mdat).

    Raises:
        FileNotFoundError: no such file.
        ValueError: ffmpeg found no video stream.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no video at {path}")
    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-nostats", "-i", str(path),
           "-map", "0:v:0", "-f", "null", "-progress", "pipe:1", "-"]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    # Stream line of the input section, e.g. "Stream #0:0[0x1](und): Video: h264 (High) (avc1 / 0x31637661),
    # yuv420p(progressive), 64x48 [SAR 1:1 DAR 4:3], 15 kb/s, 16 fps, 16 tbr, 16384 tbn (default)".
    input_section = result.stderr.split("Stream mapping:")[0]
    stream = re.search(r"Stream #\d+:\d+.*?: Video: (\w+)[^,]*, (\w+).*?, (\d+)x(\d+)", input_section)
    if stream is None or result.returncode != 0:
        raise ValueError(f"ffmpeg found no decodable video stream in {path}:\n{result.stderr[-2000:]}")
    rate = re.search(r", ([\d.]+) fps", input_section)
    counts = re.findall(r"^frame=(\d+)$", result.stdout, flags=re.MULTILINE)
    return {
        "codec": stream.group(1),
        "pix_fmt": stream.group(2),
        "width": int(stream.group(3)),
        "height": int(stream.group(4)),
        "num_frames": int(counts[-1]) if counts else 0,
        "fps": float(rate.group(1)) if rate else 0.0,
        "faststart": _moov_before_mdat(path),
    }


def _checked_chunks(chunks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """Validate each chunk and make it C-contiguous (ffmpeg reads its raw bytes); skip empty chunks."""
    for chunk in chunks:
        is_rgb = isinstance(chunk, np.ndarray) and chunk.ndim == 4 and chunk.shape[3] == 3
        if not is_rgb or chunk.dtype != np.uint8:
            desc = f"{chunk.dtype} {chunk.shape}" if isinstance(chunk, np.ndarray) else type(chunk).__name__
            raise ValueError(f"frames must be uint8 numpy arrays [f, H, W, 3] (RGB), got {desc}")
        if chunk.shape[1] % 2 or chunk.shape[2] % 2:
            raise ValueError(f"H.264 yuv420p needs an even height and width, got {chunk.shape[2]}x"
                             f"{chunk.shape[1]} (W x H); crop or pad the frames")
        if chunk.shape[0]:
            yield np.ascontiguousarray(chunk)


def _prepend(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    yield from rest


def _moov_before_mdat(path: Path) -> bool:
    """Whether moov comes before mdat among the top-level MP4 boxes (ISO/IEC 14496-12 box headers: 4-byte
    big-endian size, 4-byte type; size 1 means a 64-bit size follows, 0 means "to the end of the file")."""
    with path.open("rb") as f:
        while header := f.read(8):
            if len(header) < 8:
                break
            size, kind = int.from_bytes(header[:4], "big"), header[4:8]
            if kind in (b"moov", b"mdat"):
                return kind == b"moov"
            if size == 1:
                size = int.from_bytes(f.read(8), "big") - 8
            if size < 8:
                break
            f.seek(size - 8, os.SEEK_CUR)
    return False
