"""The opt-in CUDA W8A8 GEMM's host side: when it may run, and that its source builds where nvcc exists."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch

from engine.ops import cuda_build, w8a8_cuda
from engine.ops import int8_linear as w8a8


def test_never_used_on_cpu_or_when_off(monkeypatch: pytest.MonkeyPatch) -> None:
    a = torch.zeros(256, 128, dtype=torch.int8)
    out = torch.empty(256, 256, dtype=torch.bfloat16)
    monkeypatch.setattr(w8a8_cuda, "ENABLED", True)
    assert not w8a8_cuda.usable(a, a, None, out)  # CPU tensors
    monkeypatch.setattr(w8a8_cuda, "ENABLED", False)
    assert not w8a8_cuda.usable(a, a, None, out)


def test_cpu_linear_does_not_reach_the_cuda_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the CUDA kernel was called for a CPU tensor")

    monkeypatch.setattr(w8a8_cuda, "ENABLED", True)
    monkeypatch.setattr(w8a8_cuda, "block_scaled_mm_cuda", fail)
    x = torch.randn(4, 160)
    layer = w8a8.Int8Linear.from_linear(torch.nn.Linear(160, 96))
    assert layer(x).shape == (4, 96)


@pytest.mark.skipif(cuda_build.nvcc() is None, reason="nvcc not installed")
def test_source_builds_for_sm90a_and_exports_the_entry(tmp_path: Path) -> None:
    library_path = w8a8_cuda.build(tmp_path)
    assert library_path.exists() and library_path.parent == tmp_path
    assert w8a8_cuda.build(tmp_path) == library_path  # cached by the source's hash: no rebuild
    try:
        library = ctypes.CDLL(str(library_path))
    except OSError as error:  # a machine without the CUDA driver cannot load it; the build itself was checked
        pytest.skip(f"cannot load without a CUDA driver: {error}")
    assert hasattr(library, "w8a8_gemm")
