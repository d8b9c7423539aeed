"""Container entrypoint: run `tdserve <args>`, giving each worker replica a GPU of its own.

    entrypoint.py api                      → exec tdserve api
    entrypoint.py worker --model tiny-t2v  → lock free GPU i, exec tdserve worker … (CUDA_VISIBLE_DEVICES=i)

`docker compose up --scale worker=N` starts N identical containers, and a device reservation with `count: 1`
gives every replica the same GPU (docker/compose#11863, NVIDIA/nvidia-container-toolkit#521). So the worker
service reserves all GPUs and each replica takes one here: it holds an exclusive `flock` on
`<lock dir>/gpu<i>.lock` for the first index i nobody holds, and keeps that file descriptor open across the
exec. The lock directory is a named volume shared by the replicas on one host. The kernel releases a flock
when the last descriptor closes, so a worker that exits, crashes or is killed frees its GPU at once, and a
restarted or replacement replica can take it.

A worker started with CUDA_VISIBLE_DEVICES already set (by the operator: MIG UUIDs, a fixed device) is left
as it is, and so is a container that sees no GPU (a tiny model on CPU).
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import sys
from pathlib import Path
from typing import NoReturn

GPU_LOCK_DIR = Path("/run/tdserve/gpu-locks")
DEVICE_DIR = Path("/dev")
# The NVIDIA container runtime creates /dev/nvidia<minor> for each GPU the container may use (nvidiactl,
# nvidia-uvm, … are control nodes, not GPUs).
_GPU_NODE = re.compile(r"nvidia\d+")


class NoFreeGPU(RuntimeError):
    """Every GPU this container sees is held by another worker."""


def visible_gpu_count(device_dir: Path = DEVICE_DIR) -> int:
    """Number of GPU device nodes in `device_dir` (0 on a machine or container without GPUs)."""
    if not device_dir.is_dir():
        return 0
    return sum(1 for node in device_dir.iterdir() if _GPU_NODE.fullmatch(node.name))


def claim_gpu(lock_dir: Path, gpu_count: int) -> tuple[int, int]:
    """Lock the lowest GPU index that no other process holds.

    Args:
        lock_dir: folder shared by all workers of one host (created if missing).
        gpu_count: GPUs visible in this container; indices 0 … gpu_count-1 are tried in order.

    Returns:
        (index, fd): the GPU index and the locked descriptor, inheritable so the lock outlives an exec.
        Closing the descriptor (or the process ending) releases the GPU.

    Raises:
        NoFreeGPU: all `gpu_count` indices are held.
    """
    lock_dir.mkdir(parents=True, exist_ok=True)
    for index in range(gpu_count):
        fd = os.open(lock_dir / f"gpu{index}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        # Who holds it, for an operator looking into the volume; the lock itself is what counts.
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode())
        os.set_inheritable(fd, True)
        return index, fd
    raise NoFreeGPU(f"all {gpu_count} GPUs are held by other workers (locks in {lock_dir}); "
                    f"run at most {gpu_count} worker replicas on this host")


def main(argv: list[str]) -> NoReturn:
    args = argv or ["api"]
    env = dict(os.environ)
    if args[0] == "worker" and "CUDA_VISIBLE_DEVICES" not in env:
        gpu_count = visible_gpu_count(DEVICE_DIR)
        if gpu_count:
            try:
                index, _fd = claim_gpu(GPU_LOCK_DIR, gpu_count)
            except NoFreeGPU as e:
                print(f"entrypoint: {e}", file=sys.stderr)
                sys.exit(1)
            env["CUDA_VISIBLE_DEVICES"] = str(index)
            print(f"entrypoint: this worker takes GPU {index} of {gpu_count}", file=sys.stderr, flush=True)
    os.execvpe("tdserve", ["tdserve", *args], env)


if __name__ == "__main__":
    main(sys.argv[1:])
