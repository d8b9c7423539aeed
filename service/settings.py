"""Service settings: one `Settings` class, every field overridable from the environment with the `TD_` prefix.

`.env.example` at the repository root lists every field. Lists are comma-separated
(`TD_MODELS=tiny-t2v,tiny-i2v`), mappings are JSON
(`TD_CHECKPOINT_DIRS={"wan2.1-t2v-1.3b": "/ckpt/wan2.1-t2v-1.3b"}`).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, SecretStr, ValidationInfo, field_validator, model_validator
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
    # "auto": W8A8 exactly when the checkpoint is a -quant file; "w8a8" quantizes float checkpoints at load
    quant: Literal["auto", "w8a8", "none"] = "auto"
    gemm: Literal["int8", "fp8"] = "int8"  # the W8A8 GEMM (engine.pipeline.Pipeline.load)
    offload_idle_expert: bool = False
    torch_threads: int | None = Field(default=None, ge=1)
    worker_heartbeat_s: float = Field(default=2.0, gt=0)
    # A worker silent this long is lost: its job is retried once, then failed with `worker_lost`.
    worker_lost_after_s: float = Field(default=15.0, gt=0)
    # SIGTERM: the current job may run this much longer; then it is stopped and put back in the queue.
    worker_stop_grace_s: float = Field(default=60.0, ge=0)
    # After this many CUDA out-of-memory failures in a row the worker marks itself UNHEALTHY and exits.
    worker_max_consecutive_ooms: int = Field(default=3, ge=1)
    # Each worker serves Prometheus metrics on 0.0.0.0:<port> (0: a free port; /readyz shows each metrics_url).
    worker_metrics_port: int = Field(default=9100, ge=0, le=65535)

    # --- HTTP ---------------------------------------------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    api_workers: int = Field(default=1, ge=1)
    # Origins allowed by CORS; empty → no CORS headers at all (browsers on other origins are refused).
    cors_origins: CommaList = Field(default_factory=list)

    # --- Security (service/auth.py, service/limits.py) -----------------------------------------------------
    # Bearer keys accepted by the API, stored as `sha256:<hex>` digests (`tdserve keygen` makes a key and its
    # digest); a plain key is hashed on load, in local only. With keys, every /v1 route needs one.
    api_keys: CommaList = Field(default_factory=list)
    # No keys and no key required: local runs only (`tdserve run` sets it). Without keys and without this
    # the API refuses to start. Ignored when api_keys is set.
    auth_disabled: bool = False
    # Per-key request rate on /v1 (GCRA in Redis): sustained requests per second and burst; 429 + Retry-After.
    rate_limit_per_s: float = Field(default=20.0, gt=0)
    rate_limit_burst: int = Field(default=100, ge=1)
    # Per-key concurrent-job quota (queued + in progress); 429 + Retry-After past it.
    max_active_jobs_per_key: int = Field(default=16, ge=1)
    # Largest request body in bytes; None → room for a max_upload_bytes image sent as base64 JSON.
    max_request_bytes: int | None = Field(default=None, ge=1024)

    # --- Webhooks (service/webhooks.py) --------------------------------------------------------------------
    # Standard Webhooks signing secret, `whsec_<base64 of 24-64 random bytes>` (`tdserve keygen --webhook`).
    # Jobs with a webhook_url are refused while it is unset.
    webhook_secret: SecretStr | None = None
    # SSRF guard: webhook URLs resolving to private, loopback or link-local addresses are refused unless this
    # is set (tests use a loopback receiver).
    webhook_allow_private: bool = False
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    # Attempts per event; the first retry waits webhook_backoff_s, each next one twice as long (≤ 1 h).
    webhook_max_attempts: int = Field(default=10, ge=1)
    webhook_backoff_s: float = Field(default=30.0, gt=0)

    # --- Testing ---------------------------------------------------------------------------------------------
    # Honour `metadata["tdserve_fault"]` in workers (service/faults.py): local only, for fault-injection tests.
    fault_injection: bool = False

    @field_validator("api_keys")
    @classmethod
    def _hash_api_keys(cls, keys: list[str], info: ValidationInfo) -> list[str]:
        from service.auth import is_key_digest, key_digest

        plain = [key for key in keys if not is_key_digest(key)]
        if plain and info.data.get("environment", "local") != "local":
            raise ValueError(
                "api_keys must be sha256:<hex> digests outside local (`tdserve keygen` prints one per key)"
            )
        return [key if is_key_digest(key) else key_digest(key) for key in keys]

    @field_validator("webhook_secret")
    @classmethod
    def _check_webhook_secret(cls, secret: SecretStr | None) -> SecretStr | None:
        from service.auth import secret_key

        if secret is not None:
            secret_key(secret.get_secret_value())  # raises ValueError naming the rule
        return secret

    @property
    def request_limit_bytes(self) -> int:
        """The request-body limit: max_request_bytes, else a max_upload_bytes image as base64 plus 64 KiB."""
        if self.max_request_bytes is not None:
            return self.max_request_bytes
        return -(-self.max_upload_bytes * 4 // 3) + 64 * 1024

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
        for name in ("auth_disabled", "fault_injection"):
            if getattr(self, name) and self.environment != "local":
                raise ValueError(f"{name} is refused when environment is {self.environment!r}")
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
