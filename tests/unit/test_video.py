"""MP4 writing: H.264 yuv420p +faststart, round trip through imageio-ffmpeg's ffmpeg, streaming, atomicity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.video import Mp4Stream, frames_from_video, probe_mp4, read_mp4, write_mp4

F, H, W = 17, 48, 64


def _moving_gradient(num_frames: int = F, height: int = H, width: int = W) -> np.ndarray:
    """[F, H, W, 3] uint8: smooth gradients, red moving 8 levels per frame so frame order is visible."""
    f = np.arange(num_frames)[:, None, None]
    y = np.arange(height)[None, :, None]
    x = np.arange(width)[None, None, :]
    red, green, blue = np.broadcast_arrays(2 * x + 8 * f, 16 + 3 * y + 2 * f, 200 - 2 * x - y + 0 * f)
    return np.stack([red, green, blue], axis=-1).astype(np.uint8)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def test_write_mp4_probe_reports_h264_yuv420p_faststart(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    assert write_mp4(_moving_gradient(), path) == F
    assert probe_mp4(path) == {
        "codec": "h264", "pix_fmt": "yuv420p", "width": W, "height": H, "num_frames": F, "fps": 16.0,
        "faststart": True,
    }


def test_write_mp4_honours_fps(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    write_mp4(_moving_gradient(9), path, fps=24)
    info = probe_mp4(path)
    assert info["fps"] == 24.0 and info["num_frames"] == 9


def test_write_mp4_round_trip_keeps_frames(tmp_path: Path) -> None:
    frames = _moving_gradient()
    path = tmp_path / "clip.mp4"
    write_mp4(frames, path)
    decoded, fps = read_mp4(path)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8 and fps == 16.0
    # Measured 41.3 dB at crf 18 (most of the loss is RGB -> yuv420p: crf 0 gives 42.5 dB). 36 dB leaves
    # margin for other libx264 builds, while a one-frame shift (8 red levels/frame) measures 34.8 dB and a
    # reversal 14.8 dB.
    assert _psnr(decoded, frames) > 36.0
    assert _psnr(decoded[1:], frames[:-1]) < 36.0


def test_write_mp4_streamed_chunks_give_the_same_video(tmp_path: Path) -> None:
    frames = _moving_gradient()
    write_mp4(frames, tmp_path / "whole.mp4")
    chunks = (c for c in (frames[:1], frames[1:1], frames[1:5], frames[5:13], frames[13:]))  # one empty chunk
    assert write_mp4(chunks, tmp_path / "streamed.mp4") == F
    whole, _ = read_mp4(tmp_path / "whole.mp4")
    streamed, _ = read_mp4(tmp_path / "streamed.mp4")
    np.testing.assert_array_equal(streamed, whole)  # libx264 is deterministic for identical input


@pytest.mark.parametrize("x264_params", ["", "sliced-threads=1:threads=4", "bframes=0:rc-lookahead=0"])
def test_write_mp4_x264_params_keep_the_frames(tmp_path: Path, x264_params: str) -> None:
    frames = _moving_gradient()
    path = tmp_path / "clip.mp4"
    assert write_mp4(frames, path, x264_params=x264_params) == F
    decoded, _ = read_mp4(path)
    assert _psnr(decoded, frames) > 36.0 and _psnr(decoded[1:], frames[:-1]) < 36.0


@pytest.mark.parametrize(("height", "width"), [(47, 64), (48, 63)])
def test_write_mp4_refuses_odd_sizes(tmp_path: Path, height: int, width: int) -> None:
    with pytest.raises(ValueError, match="even height and width"):
        write_mp4(_moving_gradient(3, height, width), tmp_path / "odd.mp4")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "frames",
    [np.zeros((2, 8, 8, 3), np.float32), np.zeros((8, 8, 3), np.uint8), np.zeros((2, 8, 8, 4), np.uint8)],
)
def test_write_mp4_refuses_frames_that_are_not_uint8_rgb(tmp_path: Path, frames: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"uint8 numpy arrays \[f, H, W, 3\]"):
        write_mp4(frames, tmp_path / "bad.mp4")


def test_write_mp4_reports_ffmpeg_failure(tmp_path: Path) -> None:
    with pytest.raises((RuntimeError, OSError)):  # OSError when ffmpeg has already closed its input pipe
        write_mp4(_moving_gradient(3), tmp_path / "clip.mp4", preset="no-such-preset")
    assert list(tmp_path.iterdir()) == []


def test_write_mp4_refuses_empty_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no frames"):
        write_mp4(iter([]), tmp_path / "empty.mp4")
    with pytest.raises(ValueError, match="no frames"):
        write_mp4(np.zeros((0, 8, 8, 3), np.uint8), tmp_path / "empty.mp4")


def test_write_mp4_replaces_atomically_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    write_mp4(_moving_gradient(5), path)
    first = path.read_bytes()

    def failing_stream():
        yield _moving_gradient(4)
        assert path.read_bytes() == first  # while encoding, the published file is untouched
        yield _moving_gradient(4, 32, 32)  # size change mid-stream

    with pytest.raises(ValueError, match="frame size changed"):
        write_mp4(failing_stream(), path)
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"] and path.read_bytes() == first

    write_mp4(_moving_gradient(7), path)
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"] and probe_mp4(path)["num_frames"] == 7


def test_frames_from_video_maps_range_and_layout() -> None:
    video = torch.rand(3, 4, 6, 8) * 2.4 - 1.2  # [C, F, H, W], some values outside [-1, 1]
    video[:, 0, 0, 0] = torch.tensor([-1.0, 0.0, 1.0])
    frames = frames_from_video(video[None])
    assert frames.shape == (4, 6, 8, 3) and frames.dtype == np.uint8 and frames.flags.c_contiguous
    # round((x + 1) / 2 * 255) with round-half-to-even: 0 -> 127.5 -> 128.
    assert frames[0, 0, 0].tolist() == [0, 128, 255]
    expected = ((video.clamp(-1, 1) + 1) / 2 * 255).round().permute(1, 2, 3, 0).to(torch.uint8).numpy()
    np.testing.assert_array_equal(frames, expected)
    np.testing.assert_array_equal(frames_from_video(video), frames)


def test_frames_from_video_refuses_batches_and_bad_shapes() -> None:
    with pytest.raises(ValueError, match="one sample"):
        frames_from_video(torch.zeros(2, 3, 1, 4, 4))
    with pytest.raises(ValueError, match=r"\[3, F, H, W\]"):
        frames_from_video(torch.zeros(4, 1, 4, 4))


def test_probe_mp4_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        probe_mp4(tmp_path / "missing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video")
    with pytest.raises(ValueError, match="junk.mp4"):
        probe_mp4(junk)


def test_mp4_stream_encodes_in_the_background_the_same_video(tmp_path: Path) -> None:
    frames = _moving_gradient()
    write_mp4(frames, tmp_path / "whole.mp4")
    stream = Mp4Stream(tmp_path / "streamed.mp4", fps=16)
    for chunk in (frames[:1], frames[1:5], frames[5:13], frames[13:]):
        stream.put(chunk)
    assert stream.close() == F
    np.testing.assert_array_equal(read_mp4(tmp_path / "streamed.mp4")[0], read_mp4(tmp_path / "whole.mp4")[0])


def test_mp4_stream_abort_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(KeyError):
        with Mp4Stream(tmp_path / "clip.mp4") as stream:
            stream.put(_moving_gradient(5))
            raise KeyError("the producer failed")  # e.g. a canceled generation
    assert list(tmp_path.iterdir()) == []


def test_mp4_stream_encoder_failure_is_raised_by_close_and_never_blocks_put(tmp_path: Path) -> None:
    stream = Mp4Stream(tmp_path / "clip.mp4", preset="no-such-preset")
    for _ in range(20):  # more chunks than the queue holds: the failed encoder keeps draining
        stream.put(_moving_gradient(3))
    with pytest.raises((RuntimeError, OSError)):
        stream.close()
    assert list(tmp_path.iterdir()) == []
    empty = Mp4Stream(tmp_path / "empty.mp4")
    with pytest.raises(ValueError, match="no frames"):
        empty.close()
    with pytest.raises(RuntimeError, match="closed"):
        empty.put(_moving_gradient(1))
