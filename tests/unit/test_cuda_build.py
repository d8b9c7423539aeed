"""engine/ops/cuda_build.py: cache names follow the sources' content, and a prebuilt cache needs no nvcc."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.ops import cuda_build

ROOT = Path(__file__).resolve().parents[2]
needs_nvcc = pytest.mark.skipif(cuda_build.nvcc() is None, reason="nvcc not installed")


@needs_nvcc
def test_prebuilt_cache_is_found_without_nvcc_from_a_copy_of_the_sources(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "kernels"
    # what the image does: build every kernel into a cache directory ahead of time
    result = subprocess.run([sys.executable, "-m", "engine.ops.cuda_build", str(cache)], cwd=ROOT,
                            capture_output=True, text=True, check=True)
    built = sorted(Path(line) for line in result.stdout.split())
    assert [path.name.split("-")[0] for path in built] == sorted(p.stem for p in cuda_build.CSRC.glob("*.cu"))
    # the runtime: the sources elsewhere (TDSERVE_CSRC), no nvcc; the same content finds the same files
    sources = tmp_path / "csrc"
    shutil.copytree(cuda_build.CSRC, sources)
    monkeypatch.setattr(cuda_build, "CSRC", sources)
    monkeypatch.setattr(cuda_build, "nvcc", lambda: None)
    for path in built:
        assert cuda_build.build(sources / f"{path.name.split('-')[0]}.cu", cache) == path
    # an edited source is another build, which now needs nvcc
    (sources / "hopper.cuh").write_text((sources / "hopper.cuh").read_text() + "\n// edited\n")
    with pytest.raises(RuntimeError, match="nvcc not found"):
        cuda_build.build(sources / "sagesla_attn.cu", cache)


def test_image_builds_the_kernels_where_the_runtime_looks_for_them() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    build = re.search(r"RUN python3 -m engine\.ops\.cuda_build (\S+)", dockerfile)
    assert build, "the image does not prebuild the CUDA kernels"
    runtime = dockerfile.split("AS runtime", 1)[1]
    assert f"TDSERVE_KERNEL_CACHE={build.group(1)}" in runtime
    assert f"COPY --from=kernels {build.group(1)} {build.group(1)}" in runtime
    csrc = re.search(r"TDSERVE_CSRC=(\S+)", runtime).group(1)
    assert f"COPY --from=kernels {csrc} {csrc}" in runtime


@needs_nvcc
def test_load_types_the_entry_and_logs_a_failed_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("TDSERVE_KERNEL_CACHE", str(tmp_path))
    library = cuda_build.load(cuda_build.CSRC / "sagesla_attn.cu", "sagesla_attention", [ctypes.c_void_p])
    assert library is not None
    assert library.sagesla_attention.restype is ctypes.c_int
    assert library.sagesla_attention.argtypes == [ctypes.c_void_p]
    broken = tmp_path / "broken.cu"
    broken.write_text("this is not CUDA\n")
    assert cuda_build.load(broken, "entry", []) is None
    assert "broken.cu unavailable" in caplog.text
