"""Result storage: paths only from canonical UUIDs, whole images only, atomic files."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.video import probe_mp4
from service.storage import InvalidImage, Storage, canonical_job_id, inspect_image

JOB_ID = "3f1c2a9e-8a51-4d43-9b1e-1f6f0e4c2d7a"


def encoded(fmt: str, size: tuple[int, int] = (32, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, format=fmt)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_only(width: int, height: int) -> bytes:
    """A well-formed PNG that claims width × height but holds (almost) no pixel data: a bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b""))
        + _chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "job_id", ["../etc", "", "abc", f"{JOB_ID}/../x", "3F1C2A9E8A514D439B1E1F6F0E4C2D7A/.."]
)
def test_storage_refuses_job_ids_that_are_not_uuids(tmp_path: Path, job_id: str) -> None:
    with pytest.raises(ValueError):
        Storage(tmp_path).job_dir(job_id)


def test_storage_paths_stay_under_the_root(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    assert canonical_job_id(JOB_ID.upper()) == JOB_ID
    assert storage.job_dir(JOB_ID.upper()) == tmp_path / JOB_ID
    with pytest.raises(ValueError):
        storage.image_path(JOB_ID, "../../secret.png")


@pytest.mark.parametrize("fmt, extension", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")])
def test_inspect_image_accepts_png_jpeg_webp(fmt: str, extension: str) -> None:
    info = inspect_image(encoded(fmt), max_pixels=10_000)
    assert (info.extension, info.width, info.height) == (extension, 32, 16)


@pytest.mark.parametrize("data", [encoded("GIF"), encoded("BMP"), encoded("PNG")[:-30], b"", b"hello"])
def test_inspect_image_refuses_other_formats_and_truncated_files(data: bytes) -> None:
    with pytest.raises(InvalidImage):
        inspect_image(data, max_pixels=10_000)


@pytest.mark.parametrize("side", [5000, 100_000])  # above our limit; above Pillow's own bomb limit too
def test_inspect_image_refuses_a_decompression_bomb_from_its_header(side: int) -> None:
    with pytest.raises(InvalidImage, match="exceeds the limit"):
        inspect_image(png_header_only(side, side), max_pixels=4096 * 4096)


def test_writes_are_atomic_and_leave_no_temporary_files(tmp_path: Path) -> None:
    storage = Storage(tmp_path)
    name = storage.save_image(JOB_ID, encoded("PNG"), "png")
    assert storage.image_path(JOB_ID, name).read_bytes() == encoded("PNG")
    frames = np.random.default_rng(0).integers(0, 256, size=(5, 48, 64, 3), dtype=np.uint8)
    video = storage.write_video(JOB_ID, frames, fps=16)
    assert video.path == storage.video_path(JOB_ID)
    assert video.sha256 == hashlib.sha256(video.path.read_bytes()).hexdigest()
    assert video.size_bytes == video.path.stat().st_size
    assert probe_mp4(video.path)["num_frames"] == 5
    assert sorted(p.name for p in storage.job_dir(JOB_ID).iterdir()) == ["input.png", "video.mp4"]
    assert storage.job_ids() == [JOB_ID]
    storage.delete(JOB_ID)
    assert storage.job_ids() == []
