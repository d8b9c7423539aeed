"""Service settings: one `Settings` class, every field overridable from the environment with the `TD_` prefix.

`.env.example` at the repository root lists every field. Lists are comma-separated
(`TD_MODELS=tiny-t2v,tiny-i2v`), mappings are JSON
(`TD_CHECKPOINT_DIRS={"wan2.1-t2v-1.3b": "/ckpt/wan2.1-t2v-1.3b"}`).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from engine.configs import MODEL_CONFIGS


def _comma_list(value: Any) -> Any:
    """`"a, b"` → `["a", "b"]`; lists pass through (pydantic-settings would otherwise expect JSON)."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


CommaList = Annotated[list[str], NoDecode, BeforeValidator(_comma_list)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TD_", env_file=".env", env_ignore_empty=True, extra="ignore"
    )

    environment: Literal["local", "staging", "production"] = "local"

    # --- Redis and queues ---------------------------------------------------------------------------------
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Models served: the API accepts jobs for these, `tdserve run` starts one worker per entry.
    models: CommaList = Field(default_factory=lambda: ["tiny-t2v", "tiny-i2v"])
    # Admission control: a submit is refused with 429 + Retry-After once this many jobs wait for one model.
    queue_max_depth: int = Field(default=64, ge=1)

    # --- Storage and retention ----------------------------------------------------------------------------
    storage_dir: Path = Path("results")
    # Finished jobs (record + files) are kept this long after they end; `expires_at` reports it.
    result_ttl_s: int = Field(default=24 * 3600, ge=60)
    idempotency_ttl_s: int = Field(default=24 * 3600, ge=60)
    janitor_interval_s: float = Field(default=5.0, gt=0)

    # --- Limits -------------------------------------------------------------------------------------------
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    # Pillow's decompression-bomb limit for uploaded images (width × height).
    max_image_pixels: int = Field(default=4096 * 4096, ge=64 * 64)
    # RQ job_timeout = base + per_unit × (steps × frames × area / (81 × 832 × 480)): one unit is one
    # 480p step over 81 frames; the bound must cover the slowest supported job on the slowest GPU.
    job_timeout_base_s: float = Field(default=120.0, gt=0)
    job_timeout_per_unit_s: float = Field(default=120.0, gt=0)

    # --- Workers ------------------------------------------------------------------------------------------
    # One folder per model, or a root holding one sub-folder per model name. No entry → random weights, which
    # only the tiny models accept.
    checkpoint_dirs: dict[str, Path] = Field(default_factory=dict)
    checkpoint_root: Path | None = None
    device: str | None = None  # None → cuda when available, else cpu
    attention: Literal["sdpa", "sla", "sagesla"] | None = None
    topk: float | None = Field(default=None, gt=0, le=1)
    quant: Literal["w8a8"] | None = None
    offload_idle_expert: bool = False
    torch_threads: int | None = Field(default=None, ge=1)
    worker_heartbeat_s: float = Field(default=2.0, gt=0)
    # A worker silent this long is lost: its job is retried once, then failed with `worker_lost`.
    worker_lost_after_s: float = Field(default=15.0, gt=0)
    # SIGTERM: the current job may run this much longer; then it is stopped and put back in the queue.
    worker_stop_grace_s: float = Field(default=60.0, ge=0)
    # After this many CUDA out-of-memory failures in a row the worker marks itself UNHEALTHY and exits.
    worker_max_consecutive_ooms: int = Field(default=3, ge=1)

    # --- HTTP ---------------------------------------------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    api_workers: int = Field(default=1, ge=1)
    # Bearer keys accepted by the API; empty → no authentication (allowed only when environment is local).
    api_keys: CommaList = Field(default_factory=list)
    cors_origins: CommaList = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        unknown = [m for m in self.models if m not in MODEL_CONFIGS]
        if unknown:
            raise ValueError(f"models {unknown} are unknown; known models: {', '.join(MODEL_CONFIGS)}")
        if not self.models:
            raise ValueError("models must name at least one model")
        if self.worker_lost_after_s < 2 * self.worker_heartbeat_s:
            raise ValueError("worker_lost_after_s must be at least twice worker_heartbeat_s")
        if not self.api_keys and self.environment != "local":
            raise ValueError(f"api_keys must be set when environment is {self.environment!r}")
        return self

    def checkpoint_dir(self, model: str) -> Path | None:
        """The checkpoint folder of `model`, or None (random weights: tiny models only)."""
        if model in self.checkpoint_dirs:
            return self.checkpoint_dirs[model]
        if self.checkpoint_root is not None and (self.checkpoint_root / model).is_dir():
            return self.checkpoint_root / model
        return None


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (the API injects this as a dependency so tests can override it)."""
    return Settings()
