"""On-demand builds of the CUDA C++ kernels in csrc/ into plain shared objects, loaded with ctypes.

No torch headers: `nvcc -gencode=arch=compute_90a,code=sm_90a -shared` builds a kernel in seconds, not the minutes
of torch's extension loader. The library lands in `$TDSERVE_KERNEL_CACHE` (default ~/.cache/tdserve/kernels),
named by the hash of its source, the shared headers (csrc/*.cuh) and the flags, so an edit rebuilds and a
concurrent worker never loads a half-written file. The sources are read from `$TDSERVE_CSRC` (default: csrc/ of
this checkout): an installed package finds them there, and a cache built ahead of time (the container image runs
`python -m engine.ops.cuda_build CACHE`) is used without nvcc.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

CSRC = Path(os.environ.get("TDSERVE_CSRC", Path(__file__).resolve().parents[2] / "csrc"))
NVCC_FLAGS = ["-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-shared", "-Xcompiler", "-fPIC"]


def cache_dir() -> Path:
    return Path(os.environ.get("TDSERVE_KERNEL_CACHE", Path.home() / ".cache" / "tdserve" / "kernels"))


def nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def build(source: Path, cache: Path | None = None) -> Path:
    """Compile `source` for sm_90a unless the cache holds this exact build; returns the .so path."""
    digest = hashlib.sha256(source.read_bytes())
    for header in sorted(CSRC.glob("*.cuh")):
        digest.update(header.read_bytes())
    digest.update(" ".join(NVCC_FLAGS).encode())
    target = (cache or cache_dir()) / f"{source.stem}-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    compiler = nvcc()
    if compiler is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        result = subprocess.run([compiler, *NVCC_FLAGS, "-o", str(partial), str(source)], capture_output=True,
                                text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"nvcc failed ({result.returncode}):\n{result.stderr[-4000:]}")
        os.replace(partial, target)  # atomic: concurrent workers never load a half-written file
    return target


def load(source: Path, entry: str, argtypes: list) -> ctypes.CDLL | None:
    """The built library with its extern "C" `entry` (returning a cudaError_t code) typed, or None (logged) where
    nvcc or the build fails: callers fall back to Triton."""
    try:
        library = ctypes.CDLL(str(build(source)))
    except (RuntimeError, OSError) as error:
        log.warning("%s unavailable, using the Triton kernel: %s", source.name, error)
        return None
    function = getattr(library, entry)
    function.restype = ctypes.c_int
    function.argtypes = argtypes
    return library


@functools.cache
def sm90(index: int) -> bool:
    """Whether CUDA device `index` is compute capability 9.0, the only target the kernels are built for."""
    import torch  # here, not at the top: the image's kernel stage runs this module without torch

    return torch.cuda.get_device_capability(index) == (9, 0)


@functools.cache
def sm_count(index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


def main() -> None:
    """Build every csrc/*.cu into the cache directory given as the only argument (the image does this)."""
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m engine.ops.cuda_build CACHE_DIR")
    for source in sorted(CSRC.glob("*.cu")):
        print(build(source, Path(sys.argv[1])))


if __name__ == "__main__":
    main()
