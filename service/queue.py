"""Jobs in Redis: the job record, RQ queues, admission, cancel, idempotency, worker registry and the janitor.

Two layers, each with one job:
- **Our job record** (`td:job:{id}`, a hash of JSON values) is the truth the API reports: status, stage,
  progress, timings, error. Every change that depends on the current state goes through one Lua
  compare-and-set (`_CAS`), so a cancel, a worker's progress write and the janitor can never overwrite
  each other's terminal state. Finished records expire after `result_ttl_s`; in-flight ones never do.
- **RQ** moves the work: one queue per model (named after it), the JSON serializer, a finite `job_timeout`,
  `Retry(max=1)` for a worker that dies mid-job. The job function catches every ordinary error itself and
  records it, so RQ's retry fires only when the worker process is lost (SIGKILL, cold shutdown); the
  `on_failure` callback then moves the record back to `queued` or, on the second loss, to `worker_lost`.

A submission is one Lua script (`_SUBMIT`) and so one round trip: the key's quota, the queue-depth admission,
our record with its indexes, and the RQ job (the hash and queue push RQ's own enqueue writes, built by RQ's
`Queue.create_job`), all or nothing. A 202 therefore means the job is in Redis and in its queue, and no burst
can pass `queue_max_depth` or a quota.

Terminal transitions are appended to the `td:events` stream (id, status, code): the seam for webhooks and
metrics, which read it instead of hooking into every code path that ends a job.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import secrets
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field
from redis import Redis
from redis.exceptions import RedisError
from rq import Callback, Queue, Retry
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import TimerDeathPenalty
from rq.utils import now as rq_now

from engine.configs import ModelSpec, from_name
from service import metrics
from service.auth import ANONYMOUS
from service.schemas import (
    ErrorCode,
    GenerateRequest,
    JobError,
    JobPublic,
    JobStatus,
    Mode,
    ModelDefaults,
    ModelLimits,
    ModelPublic,
    ModelsPublic,
    ReadyPublic,
    Stage,
    VideoCreateRequest,
    VideoError,
    VideoPublic,
    WorkerPublic,
)
from service.settings import Settings, get_settings
from service.storage import ImageInfo, InvalidImage, Storage, VideoFile, canonical_job_id, inspect_image

log = logging.getLogger("tdserve.queue")

PREFIX = "td"
JOB_FUNCTION = "service.worker.run_job"
FAILURE_CALLBACK = "service.queue.on_rq_job_failure"
EVENTS_MAXLEN = 10_000
# Progress at the start of each stage (denoising fills 5 → 85 step by step); 100 only when completed.
STAGE_PROGRESS: dict[str, tuple[int, int]] = {
    "queued": (0, 0),
    "text_encode": (0, 5),
    "denoise": (5, 85),
    "vae_decode": (85, 95),
    "encode_mp4": (95, 99),
}
# One unit of work for the job_timeout formula: one 480p step over 81 frames.
_UNIT_WORK = 81 * 832 * 480


def key(*parts: str) -> str:
    """Every Redis key of the service is built here: `td:<part>:<part>…`."""
    return ":".join((PREFIX, *parts))


JOBS_INDEX = key("jobs")  # zset: job id → created_at (listing, newest first)
DEADLINES = key("deadlines")  # zset: job id → deadline (the janitor expires queued jobs past it)
WORKERS = key("workers")  # set of worker names; each has key("worker", name) with a TTL
EVENTS = key("events")  # stream of terminal transitions
JANITOR_LOCK = key("janitor")
# Retry-After for a full quota when the model has no measured run time yet.
_DEFAULT_QUOTA_RETRY_S = 10


# --- Errors the routes map to HTTP --------------------------------------------------------------------------


class JobNotFound(LookupError):
    pass


class JobConflict(RuntimeError):
    """The job is in a state that forbids the request (409)."""


class QueueFull(RuntimeError):
    def __init__(self, model: str, retry_after_s: int) -> None:
        super().__init__(f"the queue of {model} is full; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class QuotaExceeded(RuntimeError):
    """The API key already has its `max_active_jobs_per_key` queued or running jobs (429 quota_exceeded)."""

    def __init__(self, limit: int, retry_after_s: int) -> None:
        super().__init__(f"this API key already has {limit} queued or running jobs, its limit")
        self.retry_after_s = retry_after_s


class InvalidField(ValueError):
    """A request field breaks a rule that depends on the model (422, naming the field)."""

    def __init__(self, field: str, message: str, value: Any = None) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
        self.value = value


# --- The stored record --------------------------------------------------------------------------------------


class JobRecord(BaseModel):
    """What Redis holds for one job (never sent as is: `to_job_public` / `to_video_public` map it)."""

    id: str
    model: str
    mode: Mode
    status: JobStatus
    stage: Stage = "queued"
    progress: int = 0
    prompt: str
    # GenerationRequest fields with every default resolved at submission (width/height stay None for I2V
    # without an explicit size: the engine derives them from the image's aspect ratio).
    params: dict[str, Any]
    fps: int
    image_file: str | None = None
    created_at: float
    started_at: float | None = None
    completed_at: float | None = None
    expires_at: float | None = None
    deadline_at: float | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    error_code: ErrorCode | None = None
    error_message: str | None = None
    attempts: int = 0
    rq_job_id: str
    job_timeout_s: int
    worker: str | None = None
    video_size_bytes: int | None = None
    video_sha256: str | None = None
    webhook_url: str | None = None
    metadata: dict[str, str] | None = None
    idempotency_key: str | None = None  # the Redis key of the idempotency record that points here
    # The scope (service/auth.py) of the API key that created the job: only that key sees it. A record
    # without one (written before jobs had owners) is ANONYMOUS's, so no keyed caller sees it.
    owner: str = ANONYMOUS

    def encode(self) -> dict[str, str]:
        return {name: json.dumps(value) for name, value in self.model_dump(mode="json").items()}

    @classmethod
    def decode(cls, fields: dict[str, str]) -> JobRecord:
        return cls.model_validate({name: json.loads(value) for name, value in fields.items()})


def jobs_index(owner: str) -> str:
    """The zset listing `owner`'s jobs: ANONYMOUS (authentication disabled) lists every job."""
    return JOBS_INDEX if owner == ANONYMOUS else key("jobs", owner)


def active_jobs(owner: str) -> str:
    """The zset of `owner`'s queued and running jobs (job id → created_at): its concurrent-job quota."""
    return key("active", owner)


def _encode_fields(fields: dict[str, Any]) -> list[str]:
    flat: list[str] = []
    for name, value in fields.items():
        flat += [name, json.dumps(value.value if isinstance(value, JobStatus) else value)]
    return flat


# KEYS[1] job hash. ARGV[1] allowed statuses (JSON strings, newline-separated; empty = any), ARGV[2] required
# `attempts` (JSON; empty = any), ARGV[3] TTL seconds (empty = keep), ARGV[4..] field, value, …
_CAS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] ~= '' then
  local status = redis.call('HGET', KEYS[1], 'status')
  local allowed = false
  for s in string.gmatch(ARGV[1], '[^\\n]+') do
    if s == status then allowed = true end
  end
  if not allowed then return 0 end
end
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[2] then return 0 end
if #ARGV > 3 then redis.call('HSET', KEYS[1], unpack(ARGV, 4)) end
if ARGV[3] ~= '' then redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3])) end
return 1
"""

# One submission in one round trip and one atomic step: the owner's quota, the queue-depth admission, our
# record, the indexes, and the RQ job with its queue push (the writes RQ's `Queue.enqueue_job` makes for a job
# without dependencies: the job hash, the queue in RQ's set of queues, RPUSH of the id).
# KEYS[1] RQ queue, KEYS[2] job hash, KEYS[3] RQ job hash, KEYS[4] RQ's set of queues, KEYS[5] index of every
# job, KEYS[6] owner's index, KEYS[7] deadlines, KEYS[8] owner's active jobs, KEYS[9] the model's stats.
# ARGV[1] queue_max_depth, ARGV[2] max active jobs of the owner (0: no quota), ARGV[3] job id, ARGV[4] RQ job
# id, ARGV[5] created_at, ARGV[6] deadline ('' none), ARGV[7] job-hash key prefix, ARGV[8] count of job-hash
# arguments, then the job hash's field/value pairs, then the RQ job hash's.
# Returns {outcome, count, run_s, pixel_frame_s}: outcome 0 queued (count: its 0-based queue position),
# 1 quota full (count: the owner's active jobs), 2 queue full (count: the queue depth).
_SUBMIT = """
local stats = redis.call('HMGET', KEYS[9], 'run_s', 'pixel_frame_s')
local limit = tonumber(ARGV[2])
if limit > 0 and redis.call('ZCARD', KEYS[8]) >= limit then
  -- Jobs leave the zset when they end (Jobs._after_terminal); before refusing, drop any that a crash between
  -- a job's end and that removal left behind, so the count is exact whenever it decides.
  local active = 0
  for _, id in ipairs(redis.call('ZRANGE', KEYS[8], 0, -1)) do
    local status = redis.call('HGET', ARGV[7] .. id, 'status')
    if status == '"queued"' or status == '"in_progress"' then
      active = active + 1
    else
      redis.call('ZREM', KEYS[8], id)
    end
  end
  if active >= limit then return {1, active, stats[1], stats[2]} end
end
local depth = redis.call('LLEN', KEYS[1])
if depth >= tonumber(ARGV[1]) then return {2, depth, stats[1], stats[2]} end
local split = 8 + tonumber(ARGV[8])
redis.call('HSET', KEYS[2], unpack(ARGV, 9, split))
redis.call('ZADD', KEYS[5], ARGV[5], ARGV[3])
if KEYS[6] ~= KEYS[5] then redis.call('ZADD', KEYS[6], ARGV[5], ARGV[3]) end
if ARGV[6] ~= '' then redis.call('ZADD', KEYS[7], ARGV[6], ARGV[3]) end
if limit > 0 then redis.call('ZADD', KEYS[8], ARGV[5], ARGV[3]) end
redis.call('SADD', KEYS[4], KEYS[1])
redis.call('HSET', KEYS[3], unpack(ARGV, split + 1))
local length = redis.call('RPUSH', KEYS[1], ARGV[4])
return {0, length - 1, stats[1], stats[2]}
"""


@dataclass(frozen=True)
class ModelStats:
    """A model's measured averages (`Jobs.record_run_time`): seconds per run and per pixel-frame."""

    run_s: float | None = None
    pixel_frame_s: float | None = None

    @classmethod
    def parse(cls, run_s: str | None, pixel_frame_s: str | None) -> ModelStats:
        return cls(
            None if run_s is None else float(run_s), None if pixel_frame_s is None else float(pixel_frame_s)
        )


@dataclass(frozen=True)
class QueueView:
    """What a job's reply reads besides its record: its queue position (queued jobs) and its model's stats."""

    position: int | None
    stats: ModelStats


# --- Submissions --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Submission:
    """A validated request with every default resolved; `fingerprint` identifies it for Idempotency-Key."""

    model: str
    mode: Mode
    prompt: str
    params: dict[str, Any]
    fps: int
    image: bytes | None
    image_info: ImageInfo | None
    deadline_s: float | None
    webhook_url: str | None
    metadata: dict[str, str] | None
    fingerprint: str


def decode_image_text(text: str, field: str) -> bytes:
    """Base64 or a `data:image/...;base64,` URL → bytes. Remote URLs are refused: nothing is fetched."""
    payload = text.strip()
    if payload.startswith("data:"):
        header, sep, payload = payload.partition(",")
        if not sep or not header.endswith(";base64"):
            raise InvalidField(field, f"{field} must be a base64 data URL (data:image/png;base64,…)")
    elif payload.startswith(("http://", "https://")):
        raise InvalidField(field, f"{field} must be base64 or a data URL; remote URLs are not fetched")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidField(field, f"{field} is not valid base64") from None


def _served_spec(settings: Settings, model: str | None, mode: Mode | None, has_image: bool) -> ModelSpec:
    if model is None:
        wanted = mode or ("i2v" if has_image else "t2v")
        candidates = [name for name in settings.models if from_name(name).mode == wanted]
        if not candidates:
            raise InvalidField(
                "model", f"no served model does {wanted}; served models: {', '.join(settings.models)}"
            )
        model = candidates[0]
    if model not in settings.models:
        raise InvalidField(
            "model", f"model {model!r} is not served; served models: {', '.join(settings.models)}", model
        )
    spec = from_name(model)
    if mode is not None and mode != spec.mode:
        raise InvalidField(
            "mode", f"mode {mode!r} does not match model {model!r}, which does {spec.mode}", mode
        )
    return spec


def max_dimensions(spec: ModelSpec) -> tuple[int, int, int]:
    """(max width, max height, max area) over the spec's presets: the memory envelope checked at admission."""
    presets = [wh for table in spec.resolutions.values() for wh in table.values()]
    return max(w for w, _ in presets), max(h for _, h in presets), max(w * h for w, h in presets)


def _resolve(
    settings: Settings,
    *,
    model: str | None,
    mode: Mode | None,
    prompt: str,
    image: bytes | None,
    image_field: str,
    size: str | None,
    width: int | None,
    height: int | None,
    size_field: str,
    options: GenerateRequest | VideoCreateRequest,
    fingerprint_source: dict[str, Any],
) -> Submission:
    spec = _served_spec(settings, model, mode, image is not None)
    if spec.mode == "i2v" and image is None:
        raise InvalidField(image_field, f"{image_field} is required: {spec.name} is an image-to-video model")
    if spec.mode == "t2v" and image is not None:
        raise InvalidField(
            image_field, f"{image_field} is not accepted: {spec.name} is a text-to-video model"
        )
    image_info = None
    if image is not None:
        if len(image) > settings.max_upload_bytes:
            raise InvalidField(image_field, f"{image_field} is larger than {settings.max_upload_bytes} bytes")
        try:
            image_info = inspect_image(image, max_pixels=settings.max_image_pixels)
        except InvalidImage as e:
            raise InvalidField(image_field, str(e)) from None

    if (width is None) != (height is None):
        raise InvalidField("width" if width is None else "height", "width and height must be given together")
    if width is not None and height is not None:
        max_w, max_h, max_area = max_dimensions(spec)
        for name, value, limit in (("width", width, max_w), ("height", height, max_h)):
            field = size_field if size_field == "size" else name
            if value % spec.size_multiple:
                raise InvalidField(field, f"{name} {value} must be a multiple of {spec.size_multiple}", value)
            if value > limit:
                raise InvalidField(
                    field, f"{name} {value} exceeds {limit}, the largest {name} of {spec.name}", value
                )
        if width * height > max_area:
            raise InvalidField(
                size_field if size_field == "size" else "width",
                f"{width}x{height} exceeds the largest area of {spec.name} ({max_area} pixels)",
            )
    elif image is None or options.aspect_ratio is not None:
        # (I2V without an aspect ratio keeps width/height None: the engine follows the image's aspect.)
        try:
            width, height = spec.resolution(size, options.aspect_ratio)
        except ValueError as e:
            raise InvalidField("size" if size not in spec.resolutions else "aspect_ratio", str(e)) from None

    num_frames = spec.num_frames if options.num_frames is None else options.num_frames
    if num_frames > spec.max_frames:
        raise InvalidField(
            "num_frames",
            f"num_frames {num_frames} exceeds {spec.max_frames}, the limit of {spec.name}",
            num_frames,
        )
    steps = spec.default_steps if options.steps is None else options.steps
    if steps > spec.max_steps:
        raise InvalidField(
            "steps", f"steps {steps} exceeds {spec.max_steps}, the limit of {spec.name}", steps
        )
    seed = secrets.randbelow(2**31) if options.seed is None else options.seed
    params = {
        "width": width,
        "height": height,
        "size": size,
        "aspect_ratio": options.aspect_ratio,
        "num_frames": num_frames,
        "steps": steps,
        "seed": seed,
        "sigma_max": spec.sigma_max if options.sigma_max is None else options.sigma_max,
        "ode": options.ode,
        "attention": options.attention,
        "topk": options.topk,
    }
    digest = hashlib.sha256(json.dumps(fingerprint_source, sort_keys=True, default=str).encode())
    if image is not None:
        digest.update(hashlib.sha256(image).digest())
    return Submission(
        model=spec.name,
        mode=spec.mode,
        prompt=prompt,
        params=params,
        fps=spec.fps if options.fps is None else options.fps,
        image=image,
        image_info=image_info,
        deadline_s=options.deadline_seconds,
        webhook_url=None if options.webhook_url is None else str(options.webhook_url),
        metadata=options.metadata,
        fingerprint=digest.hexdigest(),
    )


def submission_from_generate(
    settings: Settings, request: GenerateRequest, upload: bytes | None
) -> Submission:
    """`POST /v1/generate`: the image comes as a multipart `image` part or as base64 text in `image`."""
    if upload is not None and request.image is not None:
        raise InvalidField("image", "image was given both as a file part and as text")
    image = (
        upload
        if upload is not None
        else (None if request.image is None else decode_image_text(request.image, "image"))
    )
    source = {"route": "generate", **request.model_dump(mode="json", exclude_unset=True, exclude={"image"})}
    return _resolve(
        settings,
        model=request.model,
        mode=request.mode,
        prompt=request.prompt,
        image=image,
        image_field="image",
        size=request.size,
        width=request.width,
        height=request.height,
        size_field="width",
        options=request,
        fingerprint_source=source,
    )


def submission_from_video(
    settings: Settings, request: VideoCreateRequest, upload: bytes | None
) -> Submission:
    """`POST /v1/videos`: OpenAI fields (`seconds`, `size` "WxH", `input_reference`) mapped to ours."""
    if upload is not None and request.input_reference is not None:
        raise InvalidField("input_reference", "input_reference was given both as a file and as an object")
    image = (
        upload
        if upload is not None
        else (
            None
            if request.input_reference is None
            else decode_image_text(request.input_reference.image_url, "input_reference")
        )
    )
    width = height = None
    if request.size is not None:
        w, _, h = request.size.partition("x")
        width, height = int(w), int(h)
    options = request
    if request.seconds is not None and request.num_frames is None:
        spec = _served_spec(settings, request.model, None, image is not None)
        fps = spec.fps if request.fps is None else request.fps
        # The 4k+1 frame count nearest to seconds × fps, within the model's limit.
        frames = 4 * round(float(request.seconds) * fps / 4) + 1
        if frames > spec.max_frames:
            raise InvalidField(
                "seconds",
                f"seconds {request.seconds} at {fps} fps exceeds {spec.max_frames} "
                f"frames, the limit of {spec.name}",
                request.seconds,
            )
        options = request.model_copy(update={"num_frames": frames})
    source = {
        "route": "videos",
        **request.model_dump(mode="json", exclude_unset=True, exclude={"input_reference"}),
    }
    return _resolve(
        settings,
        model=request.model,
        mode=None,
        prompt=request.prompt,
        image=image,
        image_field="input_reference",
        size=None,
        width=width,
        height=height,
        size_field="size",
        options=options,
        fingerprint_source=source,
    )


def job_timeout_s(settings: Settings, spec: ModelSpec, params: dict[str, Any]) -> int:
    """RQ's hard limit for one run: finite (RQ's heartbeat TTL and abandoned-job detection depend on it) and
    proportional to the work, so a stuck 720p job is not cut at a 480p bound or left for hours."""
    width, height = params["width"], params["height"]
    if width is None or height is None:  # I2V adaptive size keeps the preset's area
        max_w, max_h, _ = max_dimensions(spec)
        width, height = max_w, max_h
    units = params["steps"] * params["num_frames"] * width * height / _UNIT_WORK
    return int(math.ceil(settings.job_timeout_base_s + settings.job_timeout_per_unit_s * units))


# --- The job store ------------------------------------------------------------------------------------------


# Every Redis client of the service (service/limits.py's asyncio one too).
REDIS_OPTIONS: dict[str, Any] = {
    "socket_connect_timeout": 2,
    "socket_timeout": 10,
    "health_check_interval": 30,
}


def connect(settings: Settings) -> tuple[Redis, Redis]:
    """(text client for our keys, bytes client for RQ, which needs undecoded replies)."""
    return (
        Redis.from_url(settings.redis_url, decode_responses=True, **REDIS_OPTIONS),
        Redis.from_url(settings.redis_url, **REDIS_OPTIONS),
    )


class Jobs:
    """Every operation on jobs; the API, the worker and the janitor share it."""

    def __init__(self, settings: Settings, redis: Redis, rq_redis: Redis, storage: Storage) -> None:
        self.settings = settings
        self.redis = redis
        self.rq_redis = rq_redis
        self.storage = storage
        self._cas = redis.register_script(_CAS)
        self._submit = redis.register_script(_SUBMIT)
        self._queues: dict[str, Queue] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> Jobs:
        redis, rq_redis = connect(settings)
        return cls(settings, redis, rq_redis, Storage(settings.storage_dir))

    def queue(self, model: str) -> Queue:
        queue = self._queues.get(model)
        if queue is None:
            queue = self._queues[model] = Queue(model, connection=self.rq_redis, serializer=JSONSerializer)
        return queue

    # --- record access ---

    def find(self, job_id: str) -> JobRecord | None:
        fields = self.redis.hgetall(key("job", canonical_job_id(job_id)))
        return JobRecord.decode(fields) if fields else None  # type: ignore[arg-type]

    def get(self, job_id: str, *, scope: str = ANONYMOUS) -> JobRecord:
        """The job as `scope` may see it: a keyed caller sees only its own jobs; ANONYMOUS (authentication
        disabled, or the service itself) sees every job.

        Raises:
            JobNotFound: no such job, or another key's — the same answer, so a job's existence never leaks.
        """
        record = self.find(job_id)
        if record is None or (scope != ANONYMOUS and record.owner != scope):
            raise JobNotFound(f"job {job_id} not found")
        return record

    def _update(
        self,
        job_id: str,
        fields: dict[str, Any],
        *,
        when: Iterable[JobStatus] = (),
        attempts: int | None = None,
        ttl_s: int | None = None,
    ) -> bool:
        """Compare-and-set: apply `fields` only while the status is in `when` and `attempts` matches."""
        allowed = "\n".join(json.dumps(status.value) for status in when)
        expected = "" if attempts is None else json.dumps(attempts)
        ttl = "" if ttl_s is None else str(ttl_s)
        applied = self._cas(keys=[key("job", job_id)], args=[allowed, expected, ttl, *_encode_fields(fields)])
        return bool(applied)

    def _terminal_fields(
        self, status: JobStatus, code: ErrorCode | None, message: str | None, record: JobRecord
    ) -> dict[str, Any]:
        now = time.time()
        timings = dict(record.timings)
        timings["total"] = now - record.created_at
        return {
            "status": status,
            "completed_at": now,
            "expires_at": now + self.settings.result_ttl_s,
            "error_code": code,
            "error_message": message,
            "timings": timings,
        }

    def _after_terminal(self, record: JobRecord) -> None:
        """After a job ended: forget its deadline, free its quota slot, publish the event, fold its run time into
        the ETA."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(DEADLINES, record.id)
            pipe.zrem(active_jobs(record.owner), record.id)  # its quota slot is free
            pipe.xadd(
                EVENTS,
                {
                    "job_id": record.id,
                    "model": record.model,
                    "status": record.status.value,
                    "code": record.error_code or "",
                },
                maxlen=EVENTS_MAXLEN,
                approximate=True,
            )
            pipe.execute()
        if record.status == JobStatus.completed and record.started_at and record.completed_at:
            self.record_run_time(record.model, record.completed_at - record.started_at, _pixel_frames(record))

    def _finish(
        self,
        record: JobRecord,
        status: JobStatus,
        code: ErrorCode | None,
        message: str | None,
        *,
        when: Iterable[JobStatus],
        attempts: int | None = None,
        extra: dict[str, Any] | None = None,
    ) -> bool:
        fields = {**self._terminal_fields(status, code, message, record), **(extra or {})}
        if not self._update(
            record.id, fields, when=when, attempts=attempts, ttl_s=self.settings.result_ttl_s
        ):
            return False
        # Counted here, by the one process whose compare-and-set ended the job (service/metrics.py).
        metrics.count_job_finished(record.model, record.mode, status.value, code)
        self._after_terminal(record.model_copy(update=fields))
        if status != JobStatus.completed:
            log.info("job %s %s%s", record.id, status.value, f" ({code}: {message})" if code else "")
        return True

    # --- submission ---

    def submit(
        self,
        submission: Submission,
        *,
        idempotency_key: str | None = None,
        scope: str = ANONYMOUS,
        max_active: int | None = None,
    ) -> tuple[JobRecord, bool, QueueView]:
        """Create and enqueue a job owned by `scope`; returns (record, replayed, its queue view). With an
        Idempotency-Key (kept per scope), the same key and body return the first job (replayed=True: it takes
        no quota slot) and a different body raises JobConflict.

        Raises:
            QuotaExceeded: `scope` already has `max_active` queued or running jobs.
            QueueFull: the model's queue holds `queue_max_depth` jobs.
        """
        job_id = str(uuid.uuid4())
        idem_key = None
        if idempotency_key is not None:
            idem_key = key("idem", scope, hashlib.sha256(idempotency_key.encode()).hexdigest())
            existing = self._claim_idempotency_key(idem_key, job_id, submission.fingerprint)
            if existing is not None:
                return existing, True, self.queue_view(existing)
        try:
            record, view = self._create(job_id, submission, idem_key, scope, max_active)
        except BaseException:
            if idem_key is not None:
                self.redis.delete(idem_key)
            raise
        return record, False, view

    def _claim_idempotency_key(self, idem_key: str, job_id: str, fingerprint: str) -> JobRecord | None:
        value = json.dumps({"job_id": job_id, "fingerprint": fingerprint})
        for _ in range(50):
            if self.redis.set(idem_key, value, nx=True, ex=self.settings.idempotency_ttl_s):
                return None
            stored = self.redis.get(idem_key)
            if stored is None:
                continue  # expired between the two calls: claim it again
            first = json.loads(stored)
            if first["fingerprint"] != fingerprint:
                raise JobConflict("Idempotency-Key was already used with a different request body")
            record = self.find(first["job_id"])
            if record is not None:
                return record
            # The first request is still creating its job (or the job was deleted): wait, then re-check.
            time.sleep(0.05)
            if self.redis.get(idem_key) == stored and self.find(first["job_id"]) is None:
                self.redis.delete(idem_key)
        raise JobConflict("Idempotency-Key is in use by a request that is still being processed")

    def _create(
        self, job_id: str, submission: Submission, idem_key: str | None, owner: str, max_active: int | None
    ) -> tuple[JobRecord, QueueView]:
        spec = from_name(submission.model)
        now = time.time()
        image_file = None
        if submission.image is not None and submission.image_info is not None:
            image_file = self.storage.save_image(job_id, submission.image, submission.image_info.extension)
        record = JobRecord(
            id=job_id,
            model=submission.model,
            mode=submission.mode,
            status=JobStatus.queued,
            prompt=submission.prompt,
            params=submission.params,
            fps=submission.fps,
            image_file=image_file,
            created_at=now,
            deadline_at=None if submission.deadline_s is None else now + submission.deadline_s,
            rq_job_id=f"{job_id}-1",
            job_timeout_s=job_timeout_s(self.settings, spec, submission.params),
            webhook_url=submission.webhook_url,
            metadata=submission.metadata,
            idempotency_key=idem_key,
            owner=owner,
        )
        queue = self.queue(record.model)
        rq_job = self._rq_job(record)
        rq_job.enqueued_at = rq_now()  # what Queue.enqueue_job stamps (its status is already queued)
        job_fields = [item for pair in record.encode().items() for item in pair]
        rq_fields = [item for pair in rq_job.to_dict().items() for item in pair]
        outcome, count, run_s, pixel_frame_s = self._submit(
            keys=[
                queue.key,
                key("job", job_id),
                rq_job.key,
                queue.redis_queues_keys,
                JOBS_INDEX,
                jobs_index(owner),
                DEADLINES,
                active_jobs(owner),
                key("stats", record.model),
            ],
            args=[
                self.settings.queue_max_depth,
                max_active or 0,
                job_id,
                record.rq_job_id,
                now,
                "" if record.deadline_at is None else record.deadline_at,
                key("job", ""),
                len(job_fields),
                *job_fields,
                *rq_fields,
            ],
        )
        stats = ModelStats.parse(run_s, pixel_frame_s)
        if outcome == 0:
            return record, QueueView(count, stats)
        if image_file is not None:
            self.storage.delete(job_id)
        if outcome == 1:
            metrics.count_job_rejected(record.model, "quota_exceeded")
            retry = _DEFAULT_QUOTA_RETRY_S if stats.run_s is None else max(1, math.ceil(stats.run_s))
            raise QuotaExceeded(max_active or 0, retry)
        metrics.count_job_rejected(record.model, "queue_full")
        raise QueueFull(record.model, self.retry_after_s(record.model, count, stats))

    def _rq_job(self, record: JobRecord) -> Job:
        """The RQ job that runs `record` (status queued, not yet written)."""
        return self.queue(record.model).create_job(
            JOB_FUNCTION,
            args=[record.id],
            job_id=record.rq_job_id,
            timeout=record.job_timeout_s,
            result_ttl=self.settings.result_ttl_s,
            failure_ttl=self.settings.result_ttl_s,
            retry=Retry(max=1),
            on_failure=Callback(FAILURE_CALLBACK),
            description=f"{record.model} job {record.id}",
        )

    # --- client operations ---

    def cancel(self, job_id: str, *, scope: str = ANONYMOUS) -> JobRecord:
        """Queued: removed from the queue at once. Running: marked canceled now; the worker sees it at its
        next step check, stops and frees the GPU. Already canceled: unchanged. Another key's job:
        JobNotFound."""
        record = self.get(job_id, scope=scope)
        if record.status == JobStatus.canceled:
            return record
        if record.status.is_terminal:
            raise JobConflict(f"job {record.id} is already {record.status.value}")
        if self._finish(
            record,
            JobStatus.canceled,
            "canceled",
            "canceled by the client",
            when=(JobStatus.queued, JobStatus.in_progress),
        ):
            if record.status == JobStatus.queued:
                self._drop_rq_job(record)
            return self.get(job_id)
        return self.cancel(job_id)  # the status moved under us: decide again on the fresh record

    def _drop_rq_job(self, record: JobRecord) -> None:
        try:
            Job.fetch(record.rq_job_id, connection=self.rq_redis, serializer=JSONSerializer).cancel()
        except (NoSuchJobError, InvalidJobOperation):
            pass

    def delete(self, job_id: str, *, scope: str = ANONYMOUS) -> None:
        """Delete the job and its files (a running job is canceled first). Another key's job: JobNotFound."""
        record = self.get(job_id, scope=scope)
        if not record.status.is_terminal:
            try:
                self.cancel(job_id)
            except JobConflict:
                pass  # it ended meanwhile
        with self.redis.pipeline() as pipe:
            pipe.delete(key("job", record.id))
            pipe.zrem(JOBS_INDEX, record.id)
            pipe.zrem(jobs_index(record.owner), record.id)
            pipe.zrem(DEADLINES, record.id)
            pipe.zrem(active_jobs(record.owner), record.id)
            pipe.execute()
        if record.status != JobStatus.in_progress:  # a running RQ job is the worker's; RQ's TTLs clear it
            try:
                Job.fetch(record.rq_job_id, connection=self.rq_redis, serializer=JSONSerializer).delete()
            except NoSuchJobError:
                pass
        if record.idempotency_key is not None:
            stored = self.redis.get(record.idempotency_key)
            if stored is not None and json.loads(stored)["job_id"] == record.id:
                self.redis.delete(record.idempotency_key)
        self.storage.delete(record.id)

    def page(
        self,
        *,
        after: str | None = None,
        limit: int = 20,
        order: Literal["asc", "desc"] = "desc",
        scope: str = ANONYMOUS,
    ) -> tuple[list[JobRecord], bool]:
        """One page of the jobs `scope` may see (its own; ANONYMOUS: all) by creation time; returns
        (records, has_more)."""
        index = jobs_index(scope)
        start = 0
        if after is not None:
            rank = (self.redis.zrevrank if order == "desc" else self.redis.zrank)(index, after)
            if rank is None:
                raise InvalidField("after", f"after {after!r} is not a known job id", after)
            start = int(rank) + 1  # type: ignore[arg-type]
        records: list[JobRecord] = []
        for record in self._iter_index(index, start, order):
            if len(records) == limit:
                return records, True
            records.append(record)
        return records, False

    def _iter_index(self, index: str, start: int, order: Literal["asc", "desc"]) -> Iterator[JobRecord]:
        batch = 100
        while True:
            read = self.redis.zrevrange if order == "desc" else self.redis.zrange
            ids: list[str] = read(index, start, start + batch - 1)  # type: ignore[assignment]
            if not ids:
                return
            with self.redis.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hgetall(key("job", job_id))
                found = pipe.execute()
            gone = [job_id for job_id, fields in zip(ids, found, strict=True) if not fields]
            if gone:  # expired records: drop them from this index and the index of every job
                with self.redis.pipeline(transaction=False) as pipe:
                    pipe.zrem(index, *gone)
                    pipe.zrem(JOBS_INDEX, *gone)
                    pipe.execute()
            for fields in found:
                if fields:
                    yield JobRecord.decode(fields)
            start += batch - len(gone)

    def video(self, job_id: str, *, scope: str = ANONYMOUS) -> tuple[JobRecord, VideoFile]:
        record = self.get(job_id, scope=scope)
        if record.status != JobStatus.completed:
            raise JobConflict(f"job {record.id} is {record.status.value}; its video exists once completed")
        path = self.storage.video_path(record.id)
        if not path.is_file() or record.video_sha256 is None or record.video_size_bytes is None:
            raise JobNotFound(f"the video of job {record.id} is no longer stored")
        return record, VideoFile(path, record.video_size_bytes, record.video_sha256)

    # --- estimates ---

    def record_run_time(self, model: str, seconds: float, pixel_frames: int | None = None) -> None:
        """Fold one run into the model's exponential moving averages (weight 0.2: about the last 10 jobs):
        seconds per run (queue waits) and seconds per pixel-frame (this job's own remaining time; both
        denoising and decoding grow with frames × width × height)."""
        stats = key("stats", model)
        previous = self.redis.hmget(stats, ["run_s", "pixel_frame_s"])
        values = {"run_s": seconds}
        if pixel_frames:
            values["pixel_frame_s"] = seconds / pixel_frames
        for index, (name, value) in enumerate(values.items()):
            old = previous[index]
            average = value if old is None else 0.8 * float(old) + 0.2 * value
            self.redis.hset(stats, name, f"{average:.9g}")

    def model_stats(self, model: str) -> ModelStats:
        return ModelStats.parse(*self.redis.hmget(key("stats", model), ["run_s", "pixel_frame_s"]))

    @staticmethod
    def estimated_run_s(record: JobRecord, stats: ModelStats) -> float | None:
        """This job's run time from the model's seconds per pixel-frame, else its average run time."""
        if stats.pixel_frame_s is None:
            return stats.run_s
        return stats.pixel_frame_s * _pixel_frames(record)

    def retry_after_s(self, model: str, depth: int, stats: ModelStats) -> int:
        """Seconds until the queue has drained one slot's worth, for 429 Retry-After (1 s … 1 h)."""
        if stats.run_s is None:
            estimate = 30.0
        else:
            workers = max(1, self._serving_workers(model))
            estimate = stats.run_s * max(1, depth - self.settings.queue_max_depth + 1) / workers
        return int(min(3600, max(1, math.ceil(estimate))))

    def _serving_workers(self, model: str) -> int:
        return sum(1 for w in self.workers() if w.model == model and w.state in ("READY", "BUSY"))

    def eta_s(self, record: JobRecord, view: QueueView) -> float | None:
        """Seconds until the video is ready; None while there is nothing to estimate from.

        In progress: its estimated run time minus the time it has run; once past that estimate, elapsed ×
        remaining / done progress. Queued: its own run, plus one average run per job ahead per serving
        worker and half a run for the jobs the workers hold now.
        """
        if record.status == JobStatus.completed:
            return 0.0
        if record.status.is_terminal:
            return None
        estimate = self.estimated_run_s(record, view.stats)
        if record.status == JobStatus.in_progress and record.started_at is not None:
            elapsed = time.time() - record.started_at
            if estimate is not None and estimate > elapsed:
                return estimate - elapsed
            return elapsed * (100 - record.progress) / record.progress if record.progress >= 5 else None
        average = view.stats.run_s
        if estimate is None or average is None:
            return None
        workers = self._serving_workers(record.model)
        if workers == 0:
            return None
        return estimate + average * ((view.position or 0) + 0.5) / workers

    @staticmethod
    def poll_after_ms(eta_s: float | None) -> int:
        """The `openai-poll-after-ms` hint: a tenth of the ETA, between 0.5 s and 10 s."""
        return 1000 if eta_s is None else int(min(10_000, max(500, eta_s * 100)))

    def queue_view(self, record: JobRecord) -> QueueView:
        """The job's queue position (queued jobs) and its model's stats, in one round trip (none for an ended
        job, whose reply needs neither)."""
        if record.status.is_terminal:
            return QueueView(None, ModelStats())
        queued = record.status == JobStatus.queued
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hmget(key("stats", record.model), ["run_s", "pixel_frame_s"])
            if queued:
                pipe.lpos(self.queue(record.model).key, record.rq_job_id)  # RQ's get_job_position
            replies = pipe.execute()
        position = None
        if queued:  # not in the list: a worker has popped it and is about to claim it
            position = 0 if replies[1] is None else int(replies[1])
        return QueueView(position, ModelStats.parse(*replies[0]))

    # --- API objects ---

    def to_job_public(self, record: JobRecord, view: QueueView | None = None) -> JobPublic:
        view = self.queue_view(record) if view is None else view
        return JobPublic(
            id=record.id,
            model=record.model,
            mode=record.mode,
            status=record.status,
            stage=record.stage,
            progress=100 if record.status == JobStatus.completed else record.progress,
            queue_position=view.position,
            eta_seconds=self.eta_s(record, view),
            prompt=record.prompt,
            width=record.params["width"],
            height=record.params["height"],
            num_frames=record.params["num_frames"],
            fps=record.fps,
            steps=record.params["steps"],
            seed=record.params["seed"],
            timings=record.timings,
            error=None
            if record.error_code is None
            else JobError(code=record.error_code, message=record.error_message or ""),
            attempts=record.attempts,
            created_at=datetime.fromtimestamp(record.created_at, UTC),
            started_at=_datetime(record.started_at),
            completed_at=_datetime(record.completed_at),
            expires_at=_datetime(record.expires_at),
            video_url=f"/v1/jobs/{record.id}/video" if record.status == JobStatus.completed else None,
            metadata=record.metadata,
        )

    def to_video_public(self, record: JobRecord, view: QueueView | None = None) -> VideoPublic:
        view = self.queue_view(record) if view is None else view
        status = {JobStatus.expired: "failed"}.get(record.status, record.status.value)
        width, height = record.params["width"], record.params["height"]
        return VideoPublic(
            id=record.id,
            model=record.model,
            status=status,  # type: ignore[arg-type]
            progress=100 if record.status == JobStatus.completed else record.progress,
            created_at=int(record.created_at),
            completed_at=_int(record.completed_at),
            expires_at=_int(record.expires_at),
            prompt=record.prompt,
            size=None if width is None else f"{width}x{height}",
            seconds=f"{record.params['num_frames'] / record.fps:g}",
            error=None
            if record.error_code is None
            else VideoError(code=record.error_code, message=record.error_message or ""),
            stage=record.stage,
            queue_position=view.position,
            eta_seconds=self.eta_s(record, view),
            seed=record.params["seed"],
            num_frames=record.params["num_frames"],
            fps=record.fps,
            steps=record.params["steps"],
            timings=record.timings,
        )

    # --- workers and models ---

    def publish_worker(self, worker: WorkerPublic, ttl_s: float) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.sadd(WORKERS, worker.id)
            pipe.set(key("worker", worker.id), worker.model_dump_json(), px=int(ttl_s * 1000))
            pipe.execute()

    def remove_worker(self, name: str) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.srem(WORKERS, name)
            pipe.delete(key("worker", name))
            pipe.execute()

    def workers(self) -> list[WorkerPublic]:
        names: list[str] = sorted(self.redis.smembers(WORKERS))  # type: ignore[arg-type]
        if not names:
            return []
        values = self.redis.mget([key("worker", name) for name in names])
        silent = [name for name, value in zip(names, values, strict=True) if value is None]
        if silent:
            self.redis.srem(WORKERS, *silent)
        return [WorkerPublic.model_validate_json(v) for v in values if v is not None]

    def readiness(self) -> ReadyPublic:
        """Ready when Redis answers and at least one worker is READY or BUSY."""
        try:
            self.redis.ping()
            workers = self.workers()
        except RedisError:
            return ReadyPublic(ready=False, redis=False, workers=[])
        return ReadyPublic(
            ready=any(w.state in ("READY", "BUSY") for w in workers), redis=True, workers=workers
        )

    def models(self) -> ModelsPublic:
        workers = self.workers()
        data = []
        for name in self.settings.models:
            spec = from_name(name)
            width, height = spec.resolution()
            max_w, max_h, _ = max_dimensions(spec)
            own = [w for w in workers if w.model == name]
            data.append(
                ModelPublic(
                    id=name,
                    mode=spec.mode,
                    ready=any(w.state in ("READY", "BUSY") for w in own),
                    queue_depth=self.queue(name).count,
                    workers=own,
                    defaults=ModelDefaults(
                        size=spec.default_size,
                        aspect_ratio=spec.default_aspect_ratio,
                        width=width,
                        height=height,
                        num_frames=spec.num_frames,
                        steps=spec.default_steps,
                        fps=spec.fps,
                        sigma_max=spec.sigma_max,
                    ),
                    limits=ModelLimits(
                        max_frames=spec.max_frames,
                        max_steps=spec.max_steps,
                        size_multiple=spec.size_multiple,
                        max_width=max_w,
                        max_height=max_h,
                        presets=spec.resolutions,
                    ),
                )
            )
        return ModelsPublic(data=data)

    # --- worker side ---

    def claim(self, job_id: str, rq_job_id: str, worker: str) -> JobRecord | None:
        """queued → in_progress for this worker; None when the job is gone, canceled, stale or expired."""
        record = self.find(job_id)
        if record is None or record.rq_job_id != rq_job_id or record.status != JobStatus.queued:
            return None
        now = time.time()
        if record.deadline_at is not None and now > record.deadline_at:
            self._finish(
                record,
                JobStatus.expired,
                "expired_in_queue",
                "deadline_seconds passed before a worker was free",
                when=(JobStatus.queued,),
            )
            return None
        fields = {
            "status": JobStatus.in_progress,
            "attempts": record.attempts + 1,
            "started_at": now,
            "worker": worker,
            "stage": "text_encode",
            "progress": 0,
            "timings": {"queue": now - record.created_at},
        }
        if not self._update(job_id, fields, when=(JobStatus.queued,), attempts=record.attempts):
            return None
        return record.model_copy(update=fields)

    def set_params(self, record: JobRecord, params: dict[str, Any]) -> bool:
        """Store the parameters the engine resolved (I2V adaptive width/height)."""
        return self._update(
            record.id, {"params": params}, when=(JobStatus.in_progress,), attempts=record.attempts
        )

    def report_progress(self, record: JobRecord, stage: Stage, step: int, total: int) -> bool:
        """Write stage and progress; False when the job is no longer this worker's running job."""
        low, high = STAGE_PROGRESS[stage]
        progress = low + (high - low) * step // max(total, 1) if stage == "denoise" else low
        return self._update(
            record.id,
            {"stage": stage, "progress": progress},
            when=(JobStatus.in_progress,),
            attempts=record.attempts,
        )

    def stop_reason(self, record: JobRecord) -> Literal["canceled", "deadline"] | None:
        """Checked before every denoising step: canceled/deleted/taken over, or past its deadline."""
        status, attempts = self.redis.hmget(key("job", record.id), ["status", "attempts"])
        if status != json.dumps(JobStatus.in_progress.value) or attempts != json.dumps(record.attempts):
            return "canceled"
        if record.deadline_at is not None and time.time() > record.deadline_at:
            return "deadline"
        return None

    def complete(
        self, record: JobRecord, video: VideoFile, timings: dict[str, float], params: dict[str, Any]
    ) -> bool:
        extra = {
            "stage": "encode_mp4",
            "progress": 100,
            "video_size_bytes": video.size_bytes,
            "video_sha256": video.sha256,
            "params": params,
        }
        record = record.model_copy(update={"timings": {**record.timings, **timings}})
        return self._finish(
            record,
            JobStatus.completed,
            None,
            None,
            when=(JobStatus.in_progress,),
            attempts=record.attempts,
            extra=extra,
        )

    def fail(
        self, record: JobRecord, code: ErrorCode, message: str, timings: dict[str, float] | None = None
    ) -> bool:
        record = record.model_copy(update={"timings": {**record.timings, **(timings or {})}})
        return self._finish(
            record, JobStatus.failed, code, message, when=(JobStatus.in_progress,), attempts=record.attempts
        )

    def requeue(self, record: JobRecord) -> bool:
        """Put a running job back at the front of its queue (worker shutdown), under a new RQ job id."""
        rq_job_id = f"{record.id}-{record.attempts + 1}"
        fields = {
            "status": JobStatus.queued,
            "stage": "queued",
            "progress": 0,
            "worker": None,
            "rq_job_id": rq_job_id,
        }
        if not self._update(record.id, fields, when=(JobStatus.in_progress,), attempts=record.attempts):
            return False
        rq_job = self._rq_job(record.model_copy(update=fields))
        with self.rq_redis.pipeline() as pipe:
            # MULTI first: RQ's enqueue calls multi() itself on a pipeline that is not in a transaction yet.
            pipe.multi()
            self.queue(record.model).enqueue_job(rq_job, pipeline=pipe, at_front=True)
            pipe.execute()
        log.info("job %s requeued (worker stopping)", record.id)
        return True

    def handle_lost_run(self, rq_job: Job) -> None:
        """The worker running `rq_job` died (abandoned, or cold shutdown): back to the queue while RQ retries
        it, else failed with `worker_lost`."""
        record = self.find(str(rq_job.args[0]))
        if record is None or record.rq_job_id != rq_job.id or record.status.is_terminal:
            return
        if rq_job.should_retry:
            fields = {"status": JobStatus.queued, "stage": "queued", "progress": 0, "worker": None}
            if self._update(record.id, fields, when=(JobStatus.in_progress, JobStatus.queued)):
                log.warning("job %s: worker %s lost; retrying", record.id, record.worker)
            return
        self._finish(
            record,
            JobStatus.failed,
            "worker_lost",
            "the worker running this job stopped responding twice",
            when=(JobStatus.in_progress, JobStatus.queued),
        )

    # --- janitor ---

    def janitor_pass(self) -> None:
        """Periodic repairs (one API replica at a time): expire queued jobs past their deadline, hand
        abandoned runs to RQ's retry, delete files whose record has expired."""
        lock_ms = max(100, int(self.settings.janitor_interval_s * 900))
        if not self.redis.set(JANITOR_LOCK, "1", nx=True, px=lock_ms):
            return
        self.expire_overdue()
        for model in self.settings.models:
            # Thread-safe death penalty: the janitor runs off the main thread, where SIGALRM cannot be used.
            registry = StartedJobRegistry(queue=self.queue(model), death_penalty_class=TimerDeathPenalty)
            registry.cleanup()
        self.sweep_storage()

    def expire_overdue(self) -> None:
        overdue: list[str] = self.redis.zrangebyscore(DEADLINES, 0, time.time())  # type: ignore[assignment]
        for job_id in overdue:
            record = self.find(job_id)
            if record is None or record.status.is_terminal:
                self.redis.zrem(DEADLINES, job_id)
            elif record.status == JobStatus.queued and self._finish(
                record,
                JobStatus.expired,
                "expired_in_queue",
                "deadline_seconds passed before a worker was free",
                when=(JobStatus.queued,),
            ):
                self._drop_rq_job(record)

    def sweep_storage(self) -> None:
        """Delete job folders whose record is gone (expired or deleted), keeping fresh ones whose record may
        still be on its way (a submit writes the image before the record)."""
        ids = self.storage.job_ids()
        if not ids:
            return
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.exists(key("job", job_id))
            exists = pipe.execute()
        cutoff = time.time() - 60
        for job_id, alive in zip(ids, exists, strict=True):
            if not alive and self.storage.job_dir(job_id).stat().st_mtime < cutoff:
                self.storage.delete(job_id)


def on_rq_job_failure(job: Job, _connection: Redis, *_exc_info: Any) -> None:
    """RQ `on_failure` callback. Job functions record their own failures and return normally, so this runs
    only when the process running the job is lost (abandoned-job cleanup, or cold shutdown)."""
    Jobs.from_settings(get_settings()).handle_lost_run(job)


def _pixel_frames(record: JobRecord) -> int:
    """frames × width × height of a job (I2V with an adaptive size: the model's default preset area)."""
    width, height = record.params["width"], record.params["height"]
    if width is None or height is None:
        width, height = from_name(record.model).resolution(record.params["size"])
    return int(record.params["num_frames"] * width * height)


def _datetime(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


def _int(ts: float | None) -> int | None:
    return None if ts is None else int(ts)
