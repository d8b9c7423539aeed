"""The API without workers: validation, idempotency, auth, admission, cancel/delete, listing, OpenAI mapping.

Real Redis (DB 14, flushed around each test) and the real app through Starlette's TestClient; jobs stay queued
because no worker runs here (tests/integration runs them)."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.auth import key_digest
from service.queue import EVENTS, Jobs
from service.settings import Settings
from tests.integration.redis_server import UNIT_DB, flushed_db_url


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 100, 50)).save(buffer, format=fmt)
    return buffer.getvalue()


PNG_B64 = base64.b64encode(image_bytes()).decode()


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    yield Settings(
        _env_file=None,
        redis_url=flushed_db_url(UNIT_DB),  # type: ignore[call-arg]
        storage_dir=tmp_path / "results",
        models=["tiny-t2v", "tiny-i2v"],
        auth_disabled=True,
    )
    flushed_db_url(UNIT_DB)


def make_client(settings: Settings) -> TestClient:
    return TestClient(create_app(settings))


@pytest.fixture
def api(settings: Settings) -> Iterator[TestClient]:
    with make_client(settings) as client:
        yield client


def jobs_of(api: TestClient) -> Jobs:
    jobs: Jobs = api.app.state.jobs  # type: ignore[attr-defined]
    return jobs


def t2v(**overrides: Any) -> dict[str, Any]:
    return {"model": "tiny-t2v", "prompt": "a red fox", "num_frames": 5, "steps": 1, **overrides}


def i2v(**overrides: Any) -> dict[str, Any]:
    return {
        "model": "tiny-i2v",
        "prompt": "waves",
        "image": PNG_B64,
        "num_frames": 5,
        "steps": 1,
        **overrides,
    }


def assert_field_error(response: Any, field: str) -> None:
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"]["param"] == field
    assert any(item["loc"][-1] == field for item in body["detail"]), body


@pytest.mark.parametrize(
    "body, field",
    [
        (t2v(prompt=""), "prompt"),
        (t2v(prompt="   "), "prompt"),
        (t2v(prompt="x" * 2001), "prompt"),
        (t2v(num_frames=10), "num_frames"),
        (t2v(num_frames=165), "num_frames"),
        (t2v(steps=0), "steps"),
        (t2v(steps=5), "steps"),
        (t2v(seed=-1), "seed"),
        (t2v(width=100, height=96), "width"),
        (t2v(width=160), "height"),
        (t2v(width=4096, height=4096), "width"),
        (t2v(width=144, height=272), "height"),
        (t2v(width=256, height=256), "width"),  # each side within limits, the area above the largest preset's
        (t2v(size="1080p"), "size"),
        (t2v(aspect_ratio="2:1"), "aspect_ratio"),
        (t2v(model="wan9-t2v"), "model"),
        (t2v(mode="i2v"), "mode"),
        (t2v(image=PNG_B64), "image"),
        (i2v(image=None), "image"),
        (i2v(image="not base64 !!"), "image"),
        (i2v(image="https://example.com/a.png"), "image"),
        (i2v(image=base64.b64encode(b"plain text, not an image").decode()), "image"),
        (i2v(image=base64.b64encode(image_bytes()[:60]).decode()), "image"),
        (i2v(image=base64.b64encode(image_bytes("GIF")).decode()), "image"),
        (t2v(topk=0), "topk"),
        (t2v(topk=1.5), "topk"),
        (t2v(sigma_max=0), "sigma_max"),
        (t2v(fps=0), "fps"),
        (t2v(deadline_seconds=0), "deadline_seconds"),
        (t2v(webhook_url="ftp://example.com/hook"), "webhook_url"),
        (t2v(metadata={f"k{i}": "v" for i in range(17)}), "metadata"),
        (t2v(attention="flash"), "attention"),
        (t2v(colour="red"), "colour"),
    ],
)
def test_generate_rejects_invalid_fields_naming_them(
    api: TestClient, body: dict[str, Any], field: str
) -> None:
    assert_field_error(api.post("/v1/generate", json=body), field)


def test_generate_accepts_json_base64_data_url_and_multipart_images(api: TestClient) -> None:
    for body in (
        i2v(),
        i2v(image=f"data:image/png;base64,{PNG_B64}"),
        i2v(image=base64.b64encode(image_bytes("WEBP")).decode()),
    ):
        response = api.post("/v1/generate", json=body)
        assert response.status_code == 202, response.text
        assert response.json()["mode"] == "i2v"
    upload = api.post(
        "/v1/generate",
        data={"model": "tiny-i2v", "prompt": "waves", "num_frames": "5", "ode": "true"},
        files={"image": ("first.jpg", image_bytes("JPEG"), "image/jpeg")},
    )
    assert upload.status_code == 202, upload.text
    job_id = upload.json()["id"]
    assert (jobs_of(api).storage.job_dir(job_id) / "input.jpg").is_file()
    assert jobs_of(api).get(job_id).params["ode"] is True
    both = api.post(
        "/v1/generate",
        data={"model": "tiny-i2v", "prompt": "x", "image": PNG_B64},
        files={"image": ("a.png", image_bytes(), "image/png")},
    )
    assert both.status_code == 422


def test_generate_refuses_images_over_the_pixel_limit(settings: Settings) -> None:
    small = settings.model_copy(update={"max_image_pixels": 64 * 64})
    with make_client(small) as api:
        big = base64.b64encode(image_bytes(size=(80, 80))).decode()
        response = api.post("/v1/generate", json=i2v(image=big))
        assert_field_error(response, "image")
        assert "exceeds the limit" in response.json()["error"]["message"]


def test_bodies_that_are_not_a_json_object_or_a_form(api: TestClient) -> None:
    assert (
        api.post(
            "/v1/generate", content=b"{not json", headers={"content-type": "application/json"}
        ).status_code
        == 422
    )
    assert (
        api.post(
            "/v1/generate", content=b"\xff\xfe", headers={"content-type": "application/json"}
        ).status_code
        == 422
    )
    assert api.post("/v1/generate", json=[t2v()]).status_code == 422
    assert api.post("/v1/generate", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    too_large = api.post(
        "/v1/generate",
        content=b"{}",
        headers={"content-type": "application/json", "content-length": str(10**9)},
    )
    assert too_large.status_code == 413


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/v1/jobs/{id}"),
        ("GET", "/v1/jobs/{id}/video"),
        ("POST", "/v1/jobs/{id}/cancel"),
        ("DELETE", "/v1/jobs/{id}"),
        ("GET", "/v1/videos/{id}"),
        ("GET", "/v1/videos/{id}/content"),
        ("DELETE", "/v1/videos/{id}"),
        ("POST", "/v1/videos/{id}/cancel"),
    ],
)
def test_unknown_ids_are_404_and_malformed_ids_422(api: TestClient, method: str, path: str) -> None:
    assert api.request(method, path.format(id="0b6f2d1e-51a7-4c2e-9d7e-1c0a4b0f9e11")).status_code == 404
    malformed = api.request(method, path.format(id="not-a-uuid"))
    assert malformed.status_code == 422
    assert malformed.json()["error"]["param"] in ("job_id", "video_id")


def test_idempotency_key_replays_the_job_and_refuses_another_body(api: TestClient) -> None:
    headers = {"Idempotency-Key": "key-1"}
    first = api.post("/v1/generate", json=t2v(), headers=headers)
    replay = api.post("/v1/generate", json=t2v(), headers=headers)
    assert first.status_code == replay.status_code == 202
    assert replay.json()["id"] == first.json()["id"] and replay.headers["idempotent-replayed"] == "true"
    # The randomly chosen seed is not part of the body: the replay reports the first job's seed.
    assert replay.json()["seed"] == first.json()["seed"]
    assert api.post("/v1/generate", json=t2v(steps=2), headers=headers).status_code == 409
    # Deleting the job frees its key.
    assert api.delete(f"/v1/jobs/{first.json()['id']}").status_code == 204
    fresh = api.post("/v1/generate", json=t2v(), headers=headers)
    assert fresh.status_code == 202 and fresh.json()["id"] != first.json()["id"]


def test_api_keys_are_required_and_scope_idempotency(settings: Settings) -> None:
    with make_client(settings.model_copy(update={"api_keys": ["key-a", "key-b"]})) as api:
        missing = api.post("/v1/generate", json=t2v())
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert api.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert api.get("/healthz").status_code == 200  # probes need no key

        def submit(key: str) -> str:
            response = api.post(
                "/v1/generate",
                json=t2v(),
                headers={"Authorization": f"Bearer {key}", "Idempotency-Key": "shared"},
            )
            assert response.status_code == 202
            job_id: str = response.json()["id"]
            return job_id

        assert submit("key-a") == submit("key-a") != submit("key-b")


def test_full_queue_answers_429_with_retry_after(settings: Settings) -> None:
    with make_client(settings.model_copy(update={"queue_max_depth": 2})) as api:
        jobs_of(api).record_run_time("tiny-t2v", 7.0)
        assert api.post("/v1/generate", json=t2v()).status_code == 202
        assert api.post("/v1/generate", json=t2v()).status_code == 202
        full = api.post("/v1/generate", json=t2v())
        assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
        assert full.headers["retry-after"] == "7"  # one average run (7 s) with no worker serving
        assert api.post("/v1/generate", json=i2v()).status_code == 202  # queues are per model


def test_cancel_removes_a_queued_job_and_delete_removes_its_files(api: TestClient) -> None:
    job = api.post("/v1/generate", json=i2v()).json()
    assert job["status"] == "queued" and job["queue_position"] == 0
    assert next(m for m in api.get("/v1/models").json()["data"] if m["id"] == "tiny-i2v")["queue_depth"] == 1
    canceled = api.post(f"/v1/jobs/{job['id']}/cancel")
    assert canceled.status_code == 200
    body = canceled.json()
    assert (
        body["status"] == "canceled"
        and body["error"]["code"] == "canceled"
        and body["queue_position"] is None
    )
    assert body["expires_at"] is not None and body["timings"]["total"] >= 0
    assert next(m for m in api.get("/v1/models").json()["data"] if m["id"] == "tiny-i2v")["queue_depth"] == 0
    assert api.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "canceled"
    assert api.get(f"/v1/jobs/{job['id']}/video").status_code == 409

    events = jobs_of(api).redis.xrange(EVENTS)
    assert [fields["status"] for _, fields in events if fields["job_id"] == job["id"]] == ["canceled"]

    job_dir = jobs_of(api).storage.job_dir(job["id"])
    assert job_dir.is_dir()
    assert api.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert api.get(f"/v1/jobs/{job['id']}").status_code == 404 and not job_dir.exists()
    assert job["id"] not in [j["id"] for j in api.get("/v1/jobs").json()["data"]]


def test_lists_page_by_creation_time(api: TestClient) -> None:
    ids = [api.post("/v1/generate", json=t2v(prompt=f"job {i}")).json()["id"] for i in range(5)]
    first = api.get("/v1/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in first["data"]] == ids[::-1][:2] and first["has_more"]
    second = api.get("/v1/jobs", params={"limit": 2, "after": first["last_id"]}).json()
    assert [j["id"] for j in second["data"]] == ids[::-1][2:4] and second["has_more"]
    last = api.get("/v1/jobs", params={"limit": 2, "after": second["last_id"]}).json()
    assert [j["id"] for j in last["data"]] == [ids[0]] and not last["has_more"]
    ascending = api.get("/v1/videos", params={"order": "asc", "limit": 100}).json()
    assert [v["id"] for v in ascending["data"]] == ids and ascending["object"] == "list"
    assert_field_error(api.get("/v1/jobs", params={"after": "0b6f2d1e-51a7-4c2e-9d7e-1c0a4b0f9e11"}), "after")
    assert api.get("/v1/jobs", params={"limit": 101}).status_code == 422
    # An expired record disappears from the list (and from the index).
    jobs_of(api).redis.delete(f"td:job:{ids[2]}")
    assert ids[2] not in [j["id"] for j in api.get("/v1/jobs", params={"limit": 100}).json()["data"]]


def test_openai_create_maps_seconds_size_and_input_reference(api: TestClient) -> None:
    form = api.post(
        "/v1/videos", data={"model": "tiny-t2v", "prompt": "a boat", "seconds": "1", "size": "160x96"}
    )
    assert form.status_code == 202, form.text
    video = form.json()
    assert form.headers["location"] == f"/v1/videos/{video['id']}"
    # 1 s at 16 fps = 16 frames → the nearest 4k+1 count is 17.
    assert video["object"] == "video" and video["num_frames"] == 17 and video["seconds"] == f"{17 / 16:g}"
    assert video["size"] == "160x96" and video["status"] == "queued" and video["progress"] == 0
    assert isinstance(video["created_at"], int) and video["completed_at"] is None

    reference = api.post(
        "/v1/videos",
        json={
            "model": "tiny-i2v",
            "prompt": "waves",
            "num_frames": 5,
            "input_reference": {"image_url": f"data:image/png;base64,{PNG_B64}"},
        },
    )
    assert reference.status_code == 202, reference.text
    uploaded = api.post(
        "/v1/videos",
        data={"model": "tiny-i2v", "prompt": "waves", "num_frames": "5"},
        files={"input_reference": ("a.png", image_bytes(), "image/png")},
    )
    assert uploaded.status_code == 202, uploaded.text

    assert_field_error(
        api.post("/v1/videos", json={"model": "tiny-t2v", "prompt": "x", "size": "100x96"}), "size"
    )
    assert_field_error(
        api.post("/v1/videos", json={"model": "tiny-t2v", "prompt": "x", "size": "big"}), "size"
    )
    assert_field_error(
        api.post("/v1/videos", json={"model": "tiny-t2v", "prompt": "x", "seconds": "20"}), "seconds"
    )
    assert_field_error(api.post("/v1/videos", json={"model": "tiny-i2v", "prompt": "x"}), "input_reference")
    assert_field_error(
        api.post("/v1/videos", data={"model": "tiny-t2v", "prompt": "x", "metadata": "{"}), "metadata"
    )
    assert api.get(f"/v1/videos/{video['id']}/content", params={"variant": "thumbnail"}).status_code == 422
    assert api.get(f"/v1/videos/{video['id']}/content").status_code == 409
    retrieved = api.get(f"/v1/videos/{video['id']}")
    assert retrieved.json()["id"] == video["id"] and int(retrieved.headers["openai-poll-after-ms"]) >= 500
    deleted = api.delete(f"/v1/videos/{video['id']}").json()
    assert deleted == {"id": video["id"], "object": "video.deleted", "deleted": True}


def test_deadline_expires_a_queued_job(api: TestClient) -> None:
    job = api.post("/v1/generate", json=t2v(deadline_seconds=0.2)).json()
    time.sleep(0.3)
    jobs_of(api).expire_overdue()
    expired = api.get(f"/v1/jobs/{job['id']}").json()
    assert expired["status"] == "expired" and expired["error"]["code"] == "expired_in_queue"
    video = api.get(f"/v1/videos/{job['id']}").json()
    assert video["status"] == "failed" and video["error"]["code"] == "expired_in_queue"
    assert jobs_of(api).queue("tiny-t2v").count == 0


def test_janitor_deletes_orphan_folders(api: TestClient) -> None:
    job = api.post("/v1/generate", json=i2v()).json()
    jobs = jobs_of(api)
    orphan = jobs.storage.job_dir("6f1c2a9e-8a51-4d43-9b1e-1f6f0e4c2d7a")
    orphan.mkdir(parents=True)
    old = time.time() - 3600
    import os

    os.utime(orphan, (old, old))
    jobs.sweep_storage()
    assert not orphan.exists() and jobs.storage.job_dir(job["id"]).is_dir()


def test_health_readiness_and_models_without_workers(api: TestClient) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 503 and ready.json() == {"ready": False, "redis": True, "workers": []}
    models = {m["id"]: m for m in api.get("/v1/models").json()["data"]}
    assert set(models) == {"tiny-t2v", "tiny-i2v"} and not models["tiny-t2v"]["ready"]
    assert models["tiny-t2v"]["defaults"]["num_frames"] == 81 and models["tiny-i2v"]["mode"] == "i2v"
    assert models["tiny-t2v"]["limits"]["max_frames"] == 161
    assert models["tiny-t2v"]["limits"]["presets"]["480p"]["16:9"] == [160, 96]


def test_redis_unavailable_answers_503_with_retry_after(tmp_path: Path) -> None:
    settings = Settings(
        _env_file=None,
        redis_url="redis://127.0.0.1:1/0",  # type: ignore[call-arg]
        storage_dir=tmp_path,
        auth_disabled=True,
    )
    with make_client(settings) as api:
        response = api.post("/v1/generate", json=t2v())
        assert response.status_code == 503 and response.headers["retry-after"] == "5"
        assert api.get("/readyz").json()["redis"] is False


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TD_MODELS", "tiny-t2v, tiny-i2v")
    monkeypatch.setenv("TD_CHECKPOINT_DIRS", json.dumps({"tiny-t2v": "/ckpt/t2v"}))
    monkeypatch.setenv("TD_API_KEYS", "a,b")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    # Plain keys are hashed on load (local only): the settings never hold a usable key.
    assert settings.models == ["tiny-t2v", "tiny-i2v"]
    assert settings.api_keys == [key_digest("a"), key_digest("b")]
    assert (
        settings.checkpoint_dir("tiny-t2v") == Path("/ckpt/t2v")
        and settings.checkpoint_dir("tiny-i2v") is None
    )
    with pytest.raises(ValueError, match="unknown"):
        Settings(_env_file=None, models=["nope"])  # type: ignore[call-arg]
    monkeypatch.delenv("TD_API_KEYS")
    with pytest.raises(ValueError, match="api_keys"):
        Settings(_env_file=None, environment="production")  # type: ignore[call-arg]


def test_env_example_lists_every_setting_and_loads() -> None:
    example = Path(__file__).resolve().parents[2] / ".env.example"
    names = {
        line.split("=", 1)[0].removeprefix("TD_").lower()
        for line in example.read_text().splitlines()
        if line.startswith("TD_")
    }
    assert set(Settings.model_fields) <= names, set(Settings.model_fields) - names
    settings = Settings(_env_file=example)  # type: ignore[call-arg]
    assert settings.models == ["tiny-t2v", "tiny-i2v"] and settings.checkpoint_dirs == {}
