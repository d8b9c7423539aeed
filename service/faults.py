"""Fault injection for tests: a worker started with TD_FAULT_INJECTION=true (refused outside local) fails a
job on purpose when its metadata asks, so the live stack's error paths run in real worker processes.

    metadata {"tdserve_fault": "out_of_memory"}  the denoising stage raises torch.OutOfMemoryError, as CUDA
                                                 does when an allocation fails
    metadata {"tdserve_fault": "decode_error"}   the VAE-decode stage raises RuntimeError

Each fault is raised from the progress callback as the pipeline enters that stage, i.e. inside
`Pipeline.generate`, and travels the same `except` clauses a real one would. Other jobs run untouched.
"""

from __future__ import annotations

from service.queue import JobRecord
from service.settings import Settings

FAULT_FIELD = "tdserve_fault"
FAULT_STAGES: dict[str, str] = {"out_of_memory": "denoise", "decode_error": "vae_decode"}


class InjectedFault(RuntimeError):
    """The decode_error fault (a plain engine exception)."""


def check(settings: Settings, record: JobRecord, stage: str) -> None:
    """Raise the fault `record` asks for when it enters its stage; nothing unless fault_injection is on.

    Raises:
        torch.OutOfMemoryError: the out_of_memory fault, entering denoise.
        InjectedFault: the decode_error fault, entering vae_decode.
        ValueError: an unknown fault name (a typo in a test), at the first stage.
    """
    if not settings.fault_injection or not record.metadata or FAULT_FIELD not in record.metadata:
        return
    fault = record.metadata[FAULT_FIELD]
    if fault not in FAULT_STAGES:
        raise ValueError(f"unknown {FAULT_FIELD} {fault!r}; known: {', '.join(FAULT_STAGES)}")
    if stage != FAULT_STAGES[fault]:
        return
    if fault == "out_of_memory":
        import torch

        raise torch.OutOfMemoryError(
            f"CUDA out of memory (injected by {FAULT_FIELD} for job {record.id}). Tried to allocate 2.00 GiB"
        )
    raise InjectedFault(f"injected {fault} in {stage} for job {record.id}")
