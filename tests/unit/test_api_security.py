"""Security of the API in-process: keys (hashed, required unless explicitly disabled), per-key rate limit and
job quota in Redis, CORS off by default, the body limit, no pickle on the queue, and hand-written bad input
(each answered 4xx naming the field and the rule).

Real Redis (its own DB index, flushed around each test) and the real app through Starlette's TestClient."""

from __future__ import annotations

import base64
import io
import json
import pickle
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import SecretStr
from rq.serializers import JSONSerializer

from service.app import create_app
from service.auth import key_digest, new_api_key
from service.limits import QuotaExceeded, submit_job
from service.queue import Jobs, submission_from_generate
from service.schemas import GenerateRequest, JobStatus
from service.settings import Settings
from tests.integration.faultkit import assert_no_pickle
from tests.integration.redis_server import SECURITY_DB, flushed_db_url

KEY_A, KEY_B = new_api_key(), new_api_key()


def png(size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A 1-bit PNG of width × height black pixels: a few KB that claim width × height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    yield Settings(
        _env_file=None,
        redis_url=flushed_db_url(SECURITY_DB),  # type: ignore[call-arg]
        storage_dir=tmp_path / "results",
        models=["tiny-t2v", "tiny-i2v"],
        api_keys=[key_digest(KEY_A), key_digest(KEY_B)],
    )
    flushed_db_url(SECURITY_DB)


@pytest.fixture
def api(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def t2v(**overrides: Any) -> dict[str, Any]:
    return {"model": "tiny-t2v", "prompt": "a red fox", "num_frames": 5, "steps": 1, **overrides}


def jobs_of(api: TestClient) -> Jobs:
    jobs: Jobs = api.app.state.jobs  # type: ignore[attr-defined]
    return jobs


# --- API keys -------------------------------------------------------------------------------------------------


def test_keys_are_stored_hashed_and_plain_keys_refused_outside_local(settings: Settings) -> None:
    assert settings.api_keys == [key_digest(KEY_A), key_digest(KEY_B)]
    dump = settings.model_dump_json() + repr(settings)
    assert KEY_A not in dump and KEY_B not in dump
    local = Settings(_env_file=None, api_keys=[KEY_A])  # type: ignore[call-arg]
    assert local.api_keys == [key_digest(KEY_A)] and KEY_A not in repr(local)
    with pytest.raises(ValueError, match="sha256:<hex> digests outside local"):
        Settings(_env_file=None, environment="production", api_keys=[KEY_A])  # type: ignore[call-arg]
    production = Settings(_env_file=None, environment="production", api_keys=[key_digest(KEY_A)])  # type: ignore[call-arg]
    assert production.api_keys == [key_digest(KEY_A)]
    for name in ("auth_disabled", "fault_injection"):
        with pytest.raises(ValueError, match=f"{name} is refused when environment is 'staging'"):
            Settings(_env_file=None, environment="staging", api_keys=[key_digest(KEY_A)], **{name: True})  # type: ignore[call-arg, arg-type]


def test_the_api_refuses_to_start_without_keys_unless_auth_is_explicitly_disabled(settings: Settings) -> None:
    open_settings = settings.model_copy(update={"api_keys": []})
    with pytest.raises(RuntimeError, match="TD_AUTH_DISABLED=true"), TestClient(create_app(open_settings)):
        pass
    with TestClient(create_app(open_settings.model_copy(update={"auth_disabled": True}))) as api:
        assert api.post("/v1/generate", json=t2v()).status_code == 202


def test_every_v1_route_needs_a_valid_bearer_key(api: TestClient) -> None:
    job_id = api.post("/v1/generate", json=t2v(), headers=auth(KEY_A)).json()["id"]
    routes = [
        ("POST", "/v1/generate"),
        ("POST", "/v1/videos"),
        ("GET", "/v1/jobs"),
        ("GET", f"/v1/jobs/{job_id}"),
        ("GET", f"/v1/jobs/{job_id}/video"),
        ("GET", f"/v1/jobs/{job_id}/webhook"),
        ("POST", f"/v1/jobs/{job_id}/cancel"),
        ("DELETE", f"/v1/jobs/{job_id}"),
        ("GET", "/v1/videos"),
        ("GET", f"/v1/videos/{job_id}"),
        ("GET", f"/v1/videos/{job_id}/content"),
        ("POST", f"/v1/videos/{job_id}/cancel"),
        ("DELETE", f"/v1/videos/{job_id}"),
        ("GET", "/v1/models"),
    ]
    bad_credentials = [
        {},
        auth("wrong"),
        auth(key_digest(KEY_A)),  # the stored digest is not a key
        auth(KEY_A + "x"),
        {"Authorization": f"Basic {KEY_A}"},
        {"Authorization": KEY_A},
    ]
    for method, path in routes:
        for headers in bad_credentials:
            response = api.request(method, path, json=t2v(), headers=headers)
            assert response.status_code == 401, (method, path, headers)
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"]["code"] == "unauthorized"
    assert api.get("/healthz").status_code == 200  # probes need no key
    assert api.get(f"/v1/jobs/{job_id}", headers=auth(KEY_A)).status_code == 200


# --- Rate limit and quota ---------------------------------------------------------------------------------------


def test_rate_limit_is_per_key_with_retry_after(settings: Settings) -> None:
    limited = settings.model_copy(update={"rate_limit_per_s": 0.5, "rate_limit_burst": 3})
    with TestClient(create_app(limited)) as api:
        for _ in range(3):
            assert api.get("/v1/models", headers=auth(KEY_A)).status_code == 200
        refused = api.get("/v1/models", headers=auth(KEY_A))
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
        # The next request conforms one emission interval (2 s at 0.5/s) after the burst.
        assert refused.headers["retry-after"] == "2"
        assert api.get("/v1/models", headers=auth(KEY_B)).status_code == 200  # another key, its own budget
        # The state lives in Redis (shared by replicas), keyed by the key's scope, never the key.
        rate_keys = jobs_of(api).redis.keys("td:rate:*")
        assert len(rate_keys) == 2 and not any(KEY_A in k or KEY_B in k for k in rate_keys)


def test_job_quota_per_key_with_retry_after_and_free_replays(settings: Settings) -> None:
    with TestClient(create_app(settings.model_copy(update={"max_active_jobs_per_key": 2}))) as api:
        jobs_of(api).record_run_time("tiny-t2v", 4.2)
        first = api.post("/v1/generate", json=t2v(), headers={**auth(KEY_A), "Idempotency-Key": "one"})
        assert first.status_code == 202
        assert api.post("/v1/generate", json=t2v(seed=2), headers=auth(KEY_A)).status_code == 202
        full = api.post("/v1/generate", json=t2v(seed=3), headers=auth(KEY_A))
        assert full.status_code == 429 and full.json()["error"]["code"] == "quota_exceeded"
        assert full.headers["retry-after"] == "5"  # the model's average run, rounded up
        # A replay creates nothing, so it is answered even at the quota.
        replay = api.post("/v1/generate", json=t2v(), headers={**auth(KEY_A), "Idempotency-Key": "one"})
        assert replay.status_code == 202 and replay.json()["id"] == first.json()["id"]
        assert api.post("/v1/generate", json=t2v(), headers=auth(KEY_B)).status_code == 202
        # An ended job frees its slot.
        assert api.post(f"/v1/jobs/{first.json()['id']}/cancel", headers=auth(KEY_A)).status_code == 200
        assert api.post("/v1/generate", json=t2v(seed=4), headers=auth(KEY_A)).status_code == 202
        assert api.post("/v1/generate", json=t2v(seed=5), headers=auth(KEY_A)).status_code == 429
        # A refused submission (invalid body) takes no slot either.
        assert api.post("/v1/generate", json=t2v(num_frames=10), headers=auth(KEY_B)).status_code == 422
        assert api.post("/v1/generate", json=t2v(seed=6), headers=auth(KEY_B)).status_code == 202


def test_quota_holds_under_concurrent_submissions(settings: Settings) -> None:
    quota = settings.model_copy(update={"max_active_jobs_per_key": 5})
    jobs = Jobs.from_settings(quota)
    submission = submission_from_generate(quota, GenerateRequest(**t2v()), None)
    outcomes: list[str] = []
    lock = threading.Lock()

    def submit_one() -> None:
        try:
            submit_job(jobs, submission, idempotency_key=None, scope="scope-a")
            outcome = "accepted"
        except QuotaExceeded:
            outcome = "refused"
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=submit_one) for _ in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("accepted") == 5 and outcomes.count("refused") == 19
    assert jobs.redis.zcard("td:active:scope-a") == 5  # reservations became job ids, none left behind


# --- CORS, body limit, queue serializer ---------------------------------------------------------------------


def test_cors_is_off_by_default_and_only_allows_configured_origins(
    api: TestClient, settings: Settings
) -> None:
    preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    response = api.options("/v1/generate", headers=preflight)
    assert "access-control-allow-origin" not in response.headers and response.status_code == 405
    simple = api.get("/healthz", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in simple.headers

    allowed = settings.model_copy(update={"cors_origins": ["https://app.example"]})
    with TestClient(create_app(allowed)) as cors_api:
        ok = cors_api.options("/v1/generate", headers={**preflight, "Origin": "https://app.example"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
        assert cors_api.options("/v1/generate", headers=preflight).status_code == 400


def test_bodies_over_the_limit_are_refused_while_streaming(settings: Settings) -> None:
    small = settings.model_copy(
        update={"max_request_bytes": 64 * 1024, "api_keys": [], "auth_disabled": True}
    )
    sent: list[int] = []

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server must count
        for _ in range(64):
            sent.append(16 * 1024)
            yield b" " * (16 * 1024)

    with TestClient(create_app(small)) as api:
        response = api.post("/v1/generate", content=chunks(), headers={"content-type": "application/json"})
        assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"
        declared = api.post(
            "/v1/generate",
            content=b"{}",
            headers={"content-type": "application/json", "content-length": "65537"},
        )
        assert declared.status_code == 413
        assert api.post("/v1/generate", json=t2v(prompt="x" * 1000)).status_code == 202


def test_the_queue_holds_no_pickle(api: TestClient) -> None:
    job_id = api.post("/v1/generate", json=t2v(), headers=auth(KEY_A)).json()["id"]
    jobs = jobs_of(api)
    assert jobs.queue("tiny-t2v").serializer is JSONSerializer
    record = jobs.get(job_id)
    raw = jobs.rq_redis.hget(f"rq:job:{record.rq_job_id}", "data")
    assert isinstance(raw, bytes)
    payload = zlib.decompress(raw)  # RQ compresses the serialized call
    assert json.loads(payload) == ["service.worker.run_job", None, [job_id], {}]
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(payload)
    assert assert_no_pickle(jobs.rq_redis) > 0


# --- Hand-written bad input -----------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    "body, field, rule",
    [
        (t2v(prompt=""), "prompt", "at least 1 character"),
        (t2v(prompt=" \n\t"), "prompt", "non-whitespace"),
        (t2v(prompt="x" * 2001), "prompt", "at most 2000 characters"),
        (
            t2v(prompt="caf\udce9"),
            "prompt",
            "unable to parse raw data as a unicode string",
        ),  # the JSON escape \udce9: a lone surrogate
        (t2v(num_frames=10), "num_frames", "4k+1"),
        (t2v(num_frames=0), "num_frames", "greater than or equal to 1"),
        (t2v(num_frames=165), "num_frames", "less than or equal to 161"),
        (t2v(width=168, height=96), "width", "multiple of 16"),
        (t2v(width=160, height=100), "height", "multiple of 16"),
        (t2v(width=4096, height=4096), "width", "exceeds"),
        (t2v(width=8192, height=96), "width", "less than or equal to 4096"),
        (t2v(steps=0), "steps", "greater than or equal to 1"),
        (t2v(steps=5), "steps", "less than or equal to 4"),
        (t2v(model="wan9-t2v"), "model", "not served"),
        ({**t2v(), "model": "tiny-i2v"}, "image", "required"),
        ({**t2v(model="tiny-i2v"), "image": b64(png()[:80])}, "image", "not a readable"),  # truncated
        ({**t2v(model="tiny-i2v"), "image": b64(b"GIF89a plain text")}, "image", "not a readable"),
        ({**t2v(model="tiny-i2v"), "image": "%%%"}, "image", "base64"),
        ({**t2v(model="tiny-i2v"), "image": "file:///etc/passwd"}, "image", "base64"),
        ({**t2v(model="tiny-i2v"), "image": "http://169.254.169.254/x.png"}, "image", "not fetched"),
        (t2v(metadata={"k": "caf\udce9"}), "metadata", "valid UTF-8"),
        (t2v(webhook_url="http://127.0.0.1/hook"), "webhook_url", "TD_WEBHOOK_SECRET"),
        (t2v(webhook_url="file:///etc/passwd"), "webhook_url", "URL scheme should be 'http' or 'https'"),
        (t2v(deadline_seconds=-1), "deadline_seconds", "greater than 0"),
        (t2v(seed=2**63), "seed", "less than or equal to"),
        (t2v(unknown_knob=1), "unknown_knob", "Extra inputs are not permitted"),
    ],
)
def test_bad_input_is_422_naming_the_field_and_the_rule(
    api: TestClient, body: dict[str, Any], field: str, rule: str
) -> None:
    # json.dumps escapes non-ASCII, so a lone surrogate travels as the JSON escape a client could send.
    headers = {**auth(KEY_A), "content-type": "application/json"}
    response = api.post("/v1/generate", content=json.dumps(body), headers=headers)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == field and rule in error["message"], error


def test_non_utf8_bytes_in_a_json_body_name_the_field(api: TestClient) -> None:
    raw = b'{"model": "tiny-t2v", "prompt": "caf\xe9 au lait", "num_frames": 5}'  # Latin-1 é
    response = api.post(
        "/v1/generate", content=raw, headers={**auth(KEY_A), "content-type": "application/json"}
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["param"] == "prompt" and "unable to parse raw data as a unicode string" in error["message"]
    broken = api.post(
        "/v1/generate", content=b'{"prompt": ', headers={**auth(KEY_A), "content-type": "application/json"}
    )
    assert broken.status_code == 422 and "JSON decode error" in broken.json()["error"]["message"]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the 4097² case: over 1×, under 2×
def test_a_decompression_bomb_is_refused_from_its_header(api: TestClient, settings: Settings) -> None:
    # 6000 × 6000 = 36 Mpx in 5 KB: under Pillow's default limit (89 Mpx) but over twice the service's
    # (2 × 16.7 Mpx), so only the deliberately lowered limit makes Pillow itself refuse to open it.
    bomb = bomb_png(6000, 6000)
    assert len(bomb) < 64 * 1024
    assert Image.MAX_IMAGE_PIXELS == settings.max_image_pixels
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(bomb))
    response = api.post(
        "/v1/generate",
        data={"model": "tiny-i2v", "prompt": "waves", "num_frames": "5"},
        files={"image": ("bomb.png", bomb, "image/png")},
        headers=auth(KEY_A),
    )
    assert response.status_code == 422
    assert (
        response.json()["error"]["param"] == "image"
        and "exceeds the limit" in response.json()["error"]["message"]
    )
    # Just over the limit (not yet a Pillow error): the service's own header check refuses it too.
    over = api.post(
        "/v1/generate",
        json={**t2v(model="tiny-i2v"), "image": b64(bomb_png(4097, 4097))},
        headers=auth(KEY_A),
    )
    assert (
        over.status_code == 422 and "exceeds the limit of 16777216 pixels" in over.json()["error"]["message"]
    )


def test_uploads_over_the_limit_are_413(settings: Settings) -> None:
    small = settings.model_copy(update={"max_upload_bytes": 4096})
    with TestClient(create_app(small)) as api:
        response = api.post(
            "/v1/generate",
            data={"model": "tiny-i2v", "prompt": "waves", "num_frames": "5"},
            files={"image": ("big.png", b"\x89PNG" + b"\x00" * 8192, "image/png")},
            headers=auth(KEY_A),
        )
        assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"


def test_idempotency_key_reuse_with_another_body_is_409(api: TestClient) -> None:
    headers = {**auth(KEY_A), "Idempotency-Key": "reused"}
    assert api.post("/v1/generate", json=t2v(), headers=headers).status_code == 202
    conflict = api.post("/v1/generate", json=t2v(prompt="another"), headers=headers)
    assert conflict.status_code == 409 and "different request body" in conflict.json()["error"]["message"]
    too_long = api.post("/v1/generate", json=t2v(), headers={**auth(KEY_A), "Idempotency-Key": "k" * 256})
    assert too_long.status_code == 422 and too_long.json()["error"]["param"] == "Idempotency-Key"


@pytest.mark.parametrize(
    "path",
    [
        "/v1/jobs/not-a-uuid",
        "/v1/jobs/%2e%2e",
        "/v1/jobs/..%5C..%5Cwindows%5Cwin.ini",
        "/v1/jobs/%252e%252e%252fetc%252fpasswd",
        "/v1/jobs/0b6f2d1e-51a7-4c2e-9d7e-1c0a4b0f9e11%00/video",
        "/v1/jobs/0b6f2d1e-51a7-4c2e-9d7e-1c0a4b0f9e1/video",
        "/v1/videos/..%2F..%2Fetc%2Fpasswd/content",
        "/v1/jobs/..%2F..%2Fetc%2Fpasswd",
    ],
)
def test_non_uuid_ids_and_path_traversal_are_refused(api: TestClient, path: str) -> None:
    response = api.get(path, headers=auth(KEY_A))
    if response.status_code == 422:
        error = response.json()["error"]
        assert error["param"] in ("job_id", "video_id") and "UUID" in error["message"]
    else:  # a decoded "/" leaves no route to match
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert "root:" not in response.text


def test_an_uploaded_file_name_never_reaches_the_file_system(api: TestClient, settings: Settings) -> None:
    response = api.post(
        "/v1/generate",
        data={"model": "tiny-i2v", "prompt": "waves", "num_frames": "5"},
        files={"image": ("../../../../tmp/evil.png", png(), "image/png")},
        headers=auth(KEY_A),
    )
    assert response.status_code == 202
    job_dir = jobs_of(api).storage.job_dir(response.json()["id"])
    assert [p.name for p in job_dir.iterdir()] == ["input.png"]
    stored = {p.relative_to(settings.storage_dir) for p in settings.storage_dir.rglob("*") if p.is_file()}
    assert stored == {Path(job_dir.name) / "input.png"}
    with pytest.raises(ValueError):
        jobs_of(api).storage.job_dir("../../etc")
    with pytest.raises(ValueError):
        jobs_of(api).storage.image_path(response.json()["id"], "../../etc/passwd")


# --- Job isolation between keys --------------------------------------------------------------------------------


def complete_with_video(jobs: Jobs, job_id: str) -> None:
    """Run the worker's side of a job by hand: claim it, encode a real 4-frame MP4, mark it completed."""
    record = jobs.claim(job_id, jobs.get(job_id).rq_job_id, "test-worker")
    assert record is not None
    video = jobs.storage.write_video(job_id, np.zeros((4, 48, 64, 3), np.uint8), fps=record.fps)
    assert jobs.complete(record, video, {"denoise": 0.1}, record.params)


def job_routes(job_id: str) -> list[tuple[str, str]]:
    """Every route that names one job, reads first (cancel and delete change it)."""
    return [
        ("GET", f"/v1/jobs/{job_id}"),
        ("GET", f"/v1/jobs/{job_id}/video"),
        ("HEAD", f"/v1/jobs/{job_id}/video"),
        ("GET", f"/v1/jobs/{job_id}/webhook"),
        ("GET", f"/v1/videos/{job_id}"),
        ("GET", f"/v1/videos/{job_id}/content"),
        ("POST", f"/v1/jobs/{job_id}/cancel"),
        ("POST", f"/v1/videos/{job_id}/cancel"),
        ("DELETE", f"/v1/jobs/{job_id}"),
        ("DELETE", f"/v1/videos/{job_id}"),
    ]


def listed(api: TestClient, key: str) -> dict[str, set[str]]:
    return {
        path: {item["id"] for item in api.get(path, headers=auth(key)).json()["data"]}
        for path in ("/v1/jobs", "/v1/videos")
    }


def test_jobs_of_one_key_are_invisible_to_another(settings: Settings) -> None:
    webhooks = settings.model_copy(
        update={"webhook_secret": SecretStr("whsec_" + base64.b64encode(b"s" * 32).decode())}
    )
    with TestClient(create_app(webhooks)) as api:
        jobs = jobs_of(api)
        queued = api.post(
            "/v1/generate", json=t2v(webhook_url="https://hooks.example.com/td"), headers=auth(KEY_A)
        ).json()["id"]
        completed = api.post("/v1/videos", json={"model": "tiny-t2v", "prompt": "a fox"}, headers=auth(KEY_A))
        completed_id = completed.json()["id"]
        complete_with_video(jobs, completed_id)
        own_b = api.post("/v1/generate", json=t2v(), headers=auth(KEY_B)).json()["id"]
        unknown = "0b6f2d1e-51a7-4c2e-9d7e-1c0a4b0f9e11"

        for job_id in (queued, completed_id):
            for method, path in job_routes(job_id):
                response = api.request(method, path, headers=auth(KEY_B))
                # The answer of an id that does not exist, so B learns nothing about A's job.
                absent = api.request(method, path.replace(job_id, unknown), headers=auth(KEY_B))
                assert response.status_code == absent.status_code == 404, (method, path)
                if method != "HEAD":
                    assert response.json()["error"]["code"] == "not_found", (method, path)
                    assert response.json() == json.loads(absent.text.replace(unknown, job_id)), (method, path)
        assert jobs.get(queued).status == JobStatus.queued  # B's cancel and delete changed nothing
        assert jobs.get(completed_id).status == JobStatus.completed
        assert jobs.storage.video_path(completed_id).is_file()

        assert listed(api, KEY_A) == {path: {queued, completed_id} for path in ("/v1/jobs", "/v1/videos")}
        assert listed(api, KEY_B) == {path: {own_b} for path in ("/v1/jobs", "/v1/videos")}
        for path in ("/v1/jobs", "/v1/videos"):  # A's id is no cursor for B: the same 422 as an unknown id
            cursor = api.get(path, params={"after": queued}, headers=auth(KEY_B))
            assert cursor.status_code == 422 and cursor.json()["error"]["param"] == "after"

        # A still does everything with its own jobs.
        assert api.get(f"/v1/jobs/{queued}", headers=auth(KEY_A)).json()["status"] == "queued"
        assert api.get(f"/v1/videos/{completed_id}", headers=auth(KEY_A)).json()["status"] == "completed"
        assert api.get(f"/v1/jobs/{queued}/webhook", headers=auth(KEY_A)).json()["status"] == "waiting"
        mp4 = jobs.storage.video_path(completed_id).read_bytes()
        for path in (f"/v1/jobs/{completed_id}/video", f"/v1/videos/{completed_id}/content"):
            download = api.get(path, headers=auth(KEY_A))
            assert download.status_code == 200 and download.content == mp4
        assert api.head(f"/v1/jobs/{completed_id}/video", headers=auth(KEY_A)).status_code == 200
        first = api.get("/v1/jobs", params={"limit": 1}, headers=auth(KEY_A)).json()
        rest = api.get("/v1/jobs", params={"after": first["last_id"]}, headers=auth(KEY_A)).json()
        assert [j["id"] for j in first["data"] + rest["data"]] == [completed_id, queued]  # newest first
        canceled = api.post(f"/v1/jobs/{queued}/cancel", headers=auth(KEY_A))
        assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
        assert api.post(f"/v1/videos/{queued}/cancel", headers=auth(KEY_A)).json()["status"] == "canceled"
        assert api.delete(f"/v1/jobs/{queued}", headers=auth(KEY_A)).status_code == 204
        deleted = api.delete(f"/v1/videos/{completed_id}", headers=auth(KEY_A))
        assert deleted.status_code == 200 and deleted.json()["deleted"] is True
        assert not jobs.storage.video_path(completed_id).exists()
        assert listed(api, KEY_A) == {path: set() for path in ("/v1/jobs", "/v1/videos")}
        assert listed(api, KEY_B) == {path: {own_b} for path in ("/v1/jobs", "/v1/videos")}


def test_without_keys_every_job_is_visible_as_before(settings: Settings) -> None:
    local = settings.model_copy(update={"api_keys": [], "auth_disabled": True})
    with TestClient(create_app(local)) as api:
        first = api.post("/v1/generate", json=t2v()).json()["id"]
        second = api.post("/v1/videos", json={"model": "tiny-t2v", "prompt": "a fox"}).json()["id"]
        assert {item["id"] for item in api.get("/v1/jobs").json()["data"]} == {first, second}
        assert {item["id"] for item in api.get("/v1/videos").json()["data"]} == {first, second}
        assert api.get(f"/v1/videos/{first}").status_code == 200
        assert api.post(f"/v1/jobs/{second}/cancel").json()["status"] == "canceled"
        assert api.delete(f"/v1/videos/{first}").status_code == 200
        assert [item["id"] for item in api.get("/v1/jobs").json()["data"]] == [second]
