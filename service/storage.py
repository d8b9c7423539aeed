"""Result storage: one folder per job under the storage root (a shared volume in compose).

    {root}/{job_id}/input.{png|jpg|webp}   the uploaded I2V first frame
    {root}/{job_id}/video.mp4              the result, written to a temporary name then renamed

Every path comes from a validated UUID, never from client text, so no request can reach outside the root.
Files live as long as their job record: the janitor deletes folders whose record has expired.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:
    import numpy as np

    from engine.video import Mp4Stream

IMAGE_FORMATS: dict[str, str] = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
VIDEO_NAME = "video.mp4"


class InvalidImage(ValueError):
    """The upload is not a complete PNG/JPEG/WebP image within the pixel limit."""


@dataclass(frozen=True)
class VideoFile:
    path: Path
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class ImageInfo:
    extension: str
    width: int
    height: int


def canonical_job_id(job_id: str) -> str:
    """The canonical UUID text of `job_id`; ValueError for anything else (the only gate to a path)."""
    return str(uuid.UUID(job_id))


def inspect_image(data: bytes, *, max_pixels: int) -> ImageInfo:
    """Check that `data` is a whole PNG, JPEG or WebP image of at most `max_pixels` pixels.

    The size is checked from the header before any pixel is decoded, so a decompression bomb costs nothing.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in IMAGE_FORMATS:
                raise InvalidImage(f"image format {image.format} is not one of PNG, JPEG, WebP")
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidImage(f"image {width}x{height} exceeds the limit of {max_pixels} pixels")
            image.load()  # decodes every byte: a truncated file fails here
            return ImageInfo(IMAGE_FORMATS[image.format], width, height)
    except InvalidImage:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own limit, checked when it reads the header
        raise InvalidImage(f"image exceeds the limit of {max_pixels} pixels ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise InvalidImage(f"image is not a readable PNG, JPEG or WebP file ({e})") from None


class Storage:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def job_dir(self, job_id: str) -> Path:
        return self.root / canonical_job_id(job_id)

    def save_image(self, job_id: str, data: bytes, extension: str) -> str:
        """Store the input image beside the job; returns its file name."""
        if extension not in IMAGE_FORMATS.values():
            raise ValueError(f"image extension {extension!r} is not one of {sorted(IMAGE_FORMATS.values())}")
        name = f"input.{extension}"
        _atomic_write_bytes(self.job_dir(job_id) / name, data)
        return name

    def image_path(self, job_id: str, name: str) -> Path:
        if name not in {f"input.{ext}" for ext in IMAGE_FORMATS.values()}:
            raise ValueError(f"image name {name!r} is not an input image name")
        return self.job_dir(job_id) / name

    def video_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / VIDEO_NAME

    def write_video(self, job_id: str, frames: np.ndarray, fps: int) -> VideoFile:
        """Encode `frames` [F, H, W, 3] uint8 to `video.mp4` (a one-chunk `video_stream`)."""
        stream = self.video_stream(job_id, fps)
        stream.put(frames)
        return self.finish_video(job_id, stream)

    def video_stream(self, job_id: str, fps: int) -> Mp4Stream:
        """An encoder into `video.mp4` fed chunk by chunk while the frames are still being decoded; end it with
        `finish_video` (or `abort()` it). `write_mp4` encodes to a temporary name and renames it into place, so a
        reader sees either no video or the whole one."""
        from engine.video import Mp4Stream

        path = self.video_path(job_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        return Mp4Stream(path, fps=fps)

    def finish_video(self, job_id: str, stream: Mp4Stream) -> VideoFile:
        """Wait for the stream's file to be complete and in place; raises what the encoder hit (disk full, ...)."""
        stream.close()
        path = self.video_path(job_id)
        _fsync(path.parent)
        size, digest = _size_and_sha256(path)
        return VideoFile(path, size, digest)

    def delete(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def job_ids(self) -> list[str]:
        """Ids of every job folder (the janitor compares them with the live records)."""
        ids = []
        for entry in self.root.iterdir():
            try:
                if entry.is_dir() and canonical_job_id(entry.name) == entry.name:
                    ids.append(entry.name)
            except ValueError:
                continue
        return ids


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(temp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
        _fsync(path.parent)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _size_and_sha256(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
