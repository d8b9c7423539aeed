"""The HTTP API contract: request and response models (their descriptions and examples feed openapi.yaml).

Two families share the same jobs:
- our routes (`POST /v1/generate`, `/v1/jobs/...`): `GenerateRequest` in, `JobPublic` / `JobsPublic` out;
- OpenAI Videos routes (`/v1/videos/...`): `VideoCreateRequest` in, `VideoPublic` / `VideosPublic` out, with
  the OpenAI field names and statuses plus our extensions (`stage`, `queue_position`, `eta_seconds`, …).
Inputs forbid unknown fields, so a typo is a 422 naming the field instead of a silently ignored knob.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator

MAX_PROMPT_CHARS = 2000
MAX_FRAMES = 161
MAX_SEED = 2**63 - 1
MAX_DEADLINE_S = 7 * 24 * 3600


class JobStatus(StrEnum):
    queued = "queued"
    in_progress = "in_progress"
    completed = "completed"
    failed = "failed"
    canceled = "canceled"
    expired = "expired"  # its deadline passed before a worker started it

    @property
    def is_terminal(self) -> bool:
        return self not in (JobStatus.queued, JobStatus.in_progress)


Stage = Literal["queued", "text_encode", "denoise", "vae_decode", "encode_mp4"]
Mode = Literal["t2v", "i2v"]
Size = Literal["480p", "720p"]
AspectRatio = Literal["16:9", "9:16", "1:1", "4:3"]
Attention = Literal["sdpa", "sla", "sagesla"]

# Closed vocabulary of `error.code` on failed, canceled and expired jobs.
ErrorCode = Literal[
    "invalid_request",  # the engine refused the parameters
    "out_of_memory",  # CUDA OOM; the worker freed its cache and went on
    "worker_lost",  # the worker died twice while running the job
    "deadline_exceeded",  # deadline_seconds passed while running
    "expired_in_queue",  # deadline_seconds passed before a worker started it
    "timeout",  # the queue's hard job_timeout fired
    "canceled",  # canceled by the client
    "storage_error",  # the result could not be written
    "internal_error",  # anything else (the worker log has the job id and traceback)
]


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_num_frames(value: int | None) -> int | None:
    # The Wan VAE encodes 1 + 4k frames (one causal frame, then chunks of 4).
    if value is not None and (value - 1) % 4:
        raise ValueError("num_frames must be 4k+1 (1, 5, 9, …, 161)")
    return value


def _is_utf8(value: str) -> bool:
    # Lone surrogates: bytes that were not UTF-8 (service/deps.py decodes with surrogateescape) or a
    # "\ud800"-style JSON escape. Neither can be encoded, stored or tokenized; pydantic refuses them in plain
    # str fields but lets them through as dict values.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_prompt(value: str) -> str:
    # (pydantic's str validation already refuses lone surrogates in a top-level string field.)
    if not value.strip():
        raise ValueError("prompt must contain non-whitespace text")
    return value


def _check_metadata(value: dict[str, str] | None) -> dict[str, str] | None:
    # OpenAI's metadata limits: at most 16 pairs, keys up to 64 characters, values up to 512.
    if value is None:
        return value
    if len(value) > 16:
        raise ValueError("metadata holds at most 16 keys")
    for key, item in value.items():
        if len(key) > 64 or len(item) > 512:
            raise ValueError("metadata keys are at most 64 characters and values at most 512")
        if not (_is_utf8(key) and _is_utf8(item)):
            raise ValueError("metadata keys and values must be valid UTF-8 text")
    return value


class GenerationOptions(_Input):
    """Engine knobs shared by `POST /v1/generate` and `POST /v1/videos`."""

    aspect_ratio: AspectRatio | None = Field(
        default=None, description="Preset aspect ratio (model default 16:9)."
    )
    num_frames: int | None = Field(
        default=None, ge=1, le=MAX_FRAMES, description="Frames, 4k+1 (model default 81 = 5 s at 16 fps)."
    )
    steps: int | None = Field(default=None, ge=1, le=4, description="rCM sampling steps (default 4).")
    seed: int | None = Field(
        default=None,
        ge=0,
        le=MAX_SEED,
        description="Noise seed; chosen at random when absent and always reported back.",
    )
    sigma_max: float | None = Field(
        default=None,
        gt=0,
        le=1000,
        allow_inf_nan=False,
        description="rCM initial sigma (model default: 80 t2v, 200 i2v).",
    )
    attention: Attention | None = Field(default=None, description="Self-attention backend override.")
    topk: float | None = Field(default=None, gt=0, le=1, description="Sparse-attention key fraction (SLA).")
    ode: bool = Field(default=False, description="Deterministic ODE sampling instead of rCM's SDE steps.")
    fps: int | None = Field(
        default=None, ge=1, le=60, description="Frame rate of the MP4 (model default 16)."
    )
    deadline_seconds: float | None = Field(
        default=None,
        gt=0,
        le=MAX_DEADLINE_S,
        description="Counted from submission: not started by then → `expired`; still running → `failed` "
        "with `deadline_exceeded`.",
    )
    webhook_url: AnyHttpUrl | None = Field(
        default=None,
        max_length=2048,
        description="Receives a Standard Webhooks POST (`video.completed`, `video.failed`, `video.canceled`) "
        "signed with the server's secret when the job ends; retried with backoff. Private and loopback "
        "addresses are refused.",
    )
    metadata: dict[str, str] | None = Field(default=None, description="Up to 16 string pairs, echoed back.")

    _num_frames = field_validator("num_frames")(_check_num_frames)
    _metadata = field_validator("metadata")(_check_metadata)


class GenerateRequest(GenerationOptions):
    """Body of `POST /v1/generate` (JSON; as multipart the image is the `image` file part)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "tiny-t2v",
                    "prompt": "a red fox running through snow",
                    "num_frames": 9,
                    "steps": 2,
                    "seed": 7,
                }
            ]
        },
    )

    model: str | None = Field(
        default=None,
        description="Model name (GET /v1/models); default: the first served model of the requested mode.",
    )
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    mode: Mode | None = Field(default=None, description="t2v or i2v (default: the model's mode).")
    image: str | None = Field(
        default=None, description="I2V first frame: base64 or a data URL (PNG, JPEG, WebP)."
    )
    size: Size | None = Field(default=None, description="Resolution preset (model default).")
    width: int | None = Field(
        default=None,
        ge=16,
        le=4096,
        multiple_of=16,
        description="Explicit width (with height), a multiple of 16.",
    )
    height: int | None = Field(
        default=None,
        ge=16,
        le=4096,
        multiple_of=16,
        description="Explicit height (with width), a multiple of 16.",
    )

    _prompt = field_validator("prompt")(_check_prompt)


class JobError(BaseModel):
    code: ErrorCode
    message: str


class JobPublic(BaseModel):
    """A generation job as the API reports it."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "3f1c2a9e-8a51-4d43-9b1e-1f6f0e4c2d7a",
                    "object": "job",
                    "model": "tiny-t2v",
                    "mode": "t2v",
                    "status": "in_progress",
                    "stage": "denoise",
                    "progress": 47,
                    "queue_position": None,
                    "eta_seconds": 1.2,
                    "prompt": "a red fox running through snow",
                    "width": 160,
                    "height": 96,
                    "num_frames": 9,
                    "fps": 16,
                    "steps": 2,
                    "seed": 7,
                    "timings": {"queue": 0.01, "text_encode": 0.02},
                    "error": None,
                    "attempts": 1,
                    "created_at": "2026-01-01T12:00:00Z",
                    "started_at": "2026-01-01T12:00:00.010000Z",
                    "completed_at": None,
                    "expires_at": None,
                    "video_url": None,
                    "metadata": None,
                }
            ]
        }
    )

    id: str
    object: Literal["job"] = "job"
    model: str
    mode: Mode
    status: JobStatus
    stage: Stage
    progress: int = Field(ge=0, le=100, description="Moves at every denoising step.")
    queue_position: int | None = Field(description="0-based position among queued jobs of this model.")
    eta_seconds: float | None = Field(description="Estimated seconds until the video is ready.")
    prompt: str
    width: int | None
    height: int | None
    num_frames: int
    fps: int
    steps: int
    seed: int
    timings: dict[str, float] = Field(
        description="Seconds per stage: queue, text_encode, image_encode (I2V), denoise, vae_decode, encode_mp4 "
        "(what is left of the encode after the last frame is decoded; it runs during the decode), total."
    )
    error: JobError | None
    attempts: int = Field(description="Times a worker started the job (2 after one retry).")
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    expires_at: datetime | None = Field(description="When the job and its video are deleted.")
    video_url: str | None = Field(description="Path of the MP4 once completed.")
    metadata: dict[str, str] | None


class JobsPublic(BaseModel):
    """One page of jobs, newest first; pass `last_id` as `after` for the next page."""

    object: Literal["list"] = "list"
    data: list[JobPublic]
    has_more: bool
    first_id: str | None
    last_id: str | None


# --- OpenAI Videos -----------------------------------------------------------------------------------------


class ImageReference(_Input):
    """OpenAI's JSON `input_reference`: a URL of the first frame (here: a data URL or bare base64)."""

    image_url: str


class VideoCreateRequest(GenerationOptions):
    """Body of `POST /v1/videos` (OpenAI Videos fields; JSON, or multipart with `input_reference` as a file).

    Extensions: every field of `POST /v1/generate` except `size` presets; `num_frames` wins over `seconds`.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "tiny-t2v",
                    "prompt": "a red fox running through snow",
                    "seconds": "1",
                    "size": "160x96",
                }
            ]
        },
    )

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    seconds: str | None = Field(
        default=None,
        pattern=r"^\d{1,3}(\.\d{1,3})?$",
        description="Clip length; frames = 4k+1 nearest to seconds × fps.",
    )
    size: str | None = Field(
        default=None,
        pattern=r"^\d{2,4}x\d{2,4}$",
        description="WIDTHxHEIGHT, both multiples of 16 (default: the model's preset).",
    )
    input_reference: ImageReference | None = None

    _prompt = field_validator("prompt")(_check_prompt)


VideoStatus = Literal["queued", "in_progress", "completed", "failed", "canceled"]


class VideoError(BaseModel):
    code: str
    message: str


class VideoPublic(BaseModel):
    """OpenAI's video object; `canceled` status and the fields after `error` are extensions."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "3f1c2a9e-8a51-4d43-9b1e-1f6f0e4c2d7a",
                    "object": "video",
                    "model": "tiny-t2v",
                    "status": "completed",
                    "progress": 100,
                    "created_at": 1767268800,
                    "completed_at": 1767268803,
                    "expires_at": 1767355203,
                    "prompt": "a red fox running through snow",
                    "size": "160x96",
                    "seconds": "0.5625",
                    "remixed_from_video_id": None,
                    "error": None,
                    "stage": "encode_mp4",
                    "queue_position": None,
                    "eta_seconds": 0.0,
                    "seed": 7,
                    "num_frames": 9,
                    "fps": 16,
                    "steps": 2,
                    "timings": {"queue": 0.01, "total": 2.9},
                }
            ]
        }
    )

    id: str
    object: Literal["video"] = "video"
    model: str
    status: VideoStatus
    progress: int = Field(ge=0, le=100)
    created_at: int
    completed_at: int | None
    expires_at: int | None
    prompt: str
    size: str | None
    seconds: str
    remixed_from_video_id: str | None = None
    error: VideoError | None
    stage: Stage
    queue_position: int | None
    eta_seconds: float | None
    seed: int
    num_frames: int
    fps: int
    steps: int
    timings: dict[str, float]


class VideosPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[VideoPublic]
    has_more: bool
    first_id: str | None
    last_id: str | None


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True


# --- Webhooks ----------------------------------------------------------------------------------------------


class WebhookDeliveryPublic(BaseModel):
    """The webhook delivery of a job: its Standard Webhooks message and how delivering it went."""

    object: Literal["webhook_delivery"] = "webhook_delivery"
    job_id: str
    url: str
    status: Literal["waiting", "pending", "delivered", "failed"] = Field(
        description="waiting: the job has not ended; pending: being delivered or retried; delivered: a 2xx "
        "answer; failed: attempts exhausted or destination refused."
    )
    id: str | None = Field(description="The `webhook-id` header, the same on every attempt (dedupe on it).")
    event: str | None = Field(description="video.completed, video.failed or video.canceled.")
    attempts: int
    last_status_code: int | None
    last_error: str | None
    created_at: datetime | None
    last_attempt_at: datetime | None
    next_attempt_at: datetime | None
    delivered_at: datetime | None


# --- Models, health ----------------------------------------------------------------------------------------


class ModelDefaults(BaseModel):
    size: str
    aspect_ratio: str
    width: int
    height: int
    num_frames: int
    steps: int
    fps: int
    sigma_max: float


class ModelLimits(BaseModel):
    max_frames: int
    max_steps: int
    size_multiple: int
    max_width: int
    max_height: int
    presets: dict[str, dict[str, tuple[int, int]]] = Field(
        description="size → aspect ratio → (width, height)"
    )


WorkerState = Literal["STARTING", "READY", "BUSY", "UNHEALTHY", "SETUP_FAILED"]


class WorkerPublic(BaseModel):
    id: str
    model: str
    state: WorkerState
    device: str | None
    current_job: str | None
    last_heartbeat: datetime | None
    metrics_url: str | None


class ModelPublic(BaseModel):
    id: str
    object: Literal["model"] = "model"
    mode: Mode
    ready: bool = Field(description="At least one worker of this model is READY or BUSY.")
    queue_depth: int
    workers: list[WorkerPublic]
    defaults: ModelDefaults
    limits: ModelLimits


class ModelsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelPublic]


class HealthPublic(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyPublic(BaseModel):
    ready: bool
    redis: bool
    workers: list[WorkerPublic]


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str
    param: str | None = None


class ErrorPublic(BaseModel):
    """Every 4xx/5xx: FastAPI's `detail` plus an OpenAI-style `error` object (what the OpenAI SDK reads)."""

    detail: Any
    error: ErrorBody
