"""The HTTP service end to end: real Redis, a real uvicorn API process, real worker processes (tiny models on
the CPU)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine.video import probe_mp4
from service.client import APIError, AsyncClient, Client
from service.schemas import JobPublic
from tests.integration.conftest import LONG_JOB, LiveStack, png_bytes, small_job, submit, wait_job

pytestmark = pytest.mark.integration

STAGE_ORDER = ["queued", "text_encode", "denoise", "vae_decode", "encode_mp4"]


def test_t2v_job_moves_through_stages_and_serves_a_valid_mp4(client: httpx.Client, tmp_path: Path) -> None:
    response = client.post("/v1/generate", json=small_job(num_frames=17, steps=4, seed=11))
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["seed"] == 11 and job["num_frames"] == 17 and (job["width"], job["height"]) == (160, 96)

    polls: list[dict[str, Any]] = []
    done = wait_job(client, job["id"], ("completed", "failed"), on_poll=polls.append)
    assert done["status"] == "completed", done
    progress = [p["progress"] for p in polls]
    assert progress == sorted(progress), "progress went backwards"
    stages = [STAGE_ORDER.index(p["stage"]) for p in polls]
    assert stages == sorted(stages), "stages out of order"
    # Decoding 17 frames takes seconds; polled every 50 ms it cannot be missed.
    assert any(p["stage"] == "vae_decode" and p["status"] == "in_progress" for p in polls)
    assert done["progress"] == 100 and done["eta_seconds"] == 0.0 and done["attempts"] == 1
    assert set(done["timings"]) == {"queue", "text_encode", "denoise", "vae_decode", "encode_mp4", "total"}
    assert done["expires_at"] is not None and done["video_url"] == f"/v1/jobs/{job['id']}/video"

    video = client.get(done["video_url"])
    assert video.status_code == 200
    assert video.headers["content-type"] == "video/mp4" and video.headers["accept-ranges"] == "bytes"
    etag = video.headers["etag"]
    path = tmp_path / "fox.mp4"
    path.write_bytes(video.content)
    info = probe_mp4(path)
    assert (info["codec"], info["pix_fmt"], info["num_frames"]) == ("h264", "yuv420p", 17)
    assert (info["width"], info["height"], info["fps"], info["faststart"]) == (160, 96, 16.0, True)

    size = len(video.content)
    part = client.get(done["video_url"], headers={"Range": "bytes=10-109"})
    assert part.status_code == 206 and part.content == video.content[10:110]
    assert part.headers["content-range"] == f"bytes 10-109/{size}"
    assert client.get(done["video_url"], headers={"Range": f"bytes={size}-"}).status_code == 416
    assert client.get(done["video_url"], headers={"Range": "bytes=0-9", "If-Range": etag}).status_code == 206
    assert (
        client.get(done["video_url"], headers={"Range": "bytes=0-9", "If-Range": '"stale"'}).status_code
        == 200
    )
    head = client.head(done["video_url"])
    assert head.status_code == 200 and int(head.headers["content-length"]) == size and head.content == b""


def test_i2v_job_with_an_uploaded_png(client: httpx.Client, tmp_path: Path) -> None:
    response = client.post(
        "/v1/generate",
        data={
            "model": "tiny-i2v",
            "prompt": "waves on a beach",
            "num_frames": "5",
            "steps": "2",
            "metadata": json.dumps({"run": "i2v"}),
        },
        files={"image": ("first.png", png_bytes(64, 48), "image/png")},
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["mode"] == "i2v" and job["metadata"] == {"run": "i2v"}
    assert job["width"] is None  # no aspect ratio given: the engine follows the image's 4:3
    done = wait_job(client, job["id"], ("completed", "failed"))
    assert done["status"] == "completed", done
    width, height = done["width"], done["height"]
    assert width % 16 == 0 and height % 16 == 0 and width > height
    path = tmp_path / "waves.mp4"
    path.write_bytes(client.get(done["video_url"]).content)
    info = probe_mp4(path)
    assert (info["num_frames"], info["width"], info["height"]) == (5, width, height)


def test_cancel_removes_a_queued_job_and_stops_a_running_one(client: httpx.Client, stack: LiveStack) -> None:
    blocker = submit(client, LONG_JOB)
    waiting = submit(client, small_job(prompt="never runs"))
    wait_job(client, blocker["id"], ("in_progress",), timeout=30)
    queued = client.get(f"/v1/jobs/{waiting['id']}").json()
    assert queued["status"] == "queued" and queued["queue_position"] == 0

    canceled = client.post(f"/v1/jobs/{waiting['id']}/cancel")
    assert canceled.status_code == 200
    assert canceled.json()["status"] == "canceled" and canceled.json()["error"]["code"] == "canceled"
    t2v = next(m for m in client.get("/v1/models").json()["data"] if m["id"] == "tiny-t2v")
    assert t2v["queue_depth"] == 0  # gone from the RQ queue, not just marked

    start = time.monotonic()
    running = client.post(f"/v1/jobs/{blocker['id']}/cancel").json()
    assert running["status"] == "canceled"
    worker = stack.wait_worker("t2v-worker", ("READY",), timeout=30)
    assert worker["current_job"] is None
    assert time.monotonic() - start < 10, "the worker did not stop at its next step"
    final = client.get(f"/v1/jobs/{blocker['id']}").json()
    assert final["status"] == "canceled" and final["stage"] == "denoise"  # never reached the VAE
    assert client.get(f"/v1/jobs/{blocker['id']}/video").status_code == 409

    # The worker is healthy, the canceled queued job never ran, canceling again changes nothing.
    assert wait_job(client, submit(client, small_job())["id"], ("completed",))["status"] == "completed"
    assert client.get(f"/v1/jobs/{waiting['id']}").json()["attempts"] == 0
    assert client.post(f"/v1/jobs/{waiting['id']}/cancel").json()["status"] == "canceled"


def test_idempotency_key_returns_the_same_job(client: httpx.Client) -> None:
    body = small_job(prompt="idempotent fox")
    first = client.post("/v1/generate", json=body, headers={"Idempotency-Key": "fox-1"})
    again = client.post("/v1/generate", json=body, headers={"Idempotency-Key": "fox-1"})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    other_body = client.post(
        "/v1/generate", json=small_job(prompt="another fox"), headers={"Idempotency-Key": "fox-1"}
    )
    assert other_body.status_code == 409 and "Idempotency-Key" in other_body.json()["error"]["message"]
    other_key = client.post("/v1/generate", json=body, headers={"Idempotency-Key": "fox-2"})
    assert other_key.json()["id"] != first.json()["id"]

    done = wait_job(client, first.json()["id"], ("completed",))
    replay = client.post("/v1/generate", json=body, headers={"Idempotency-Key": "fox-1"}).json()
    assert replay["id"] == done["id"] and replay["status"] == "completed" and replay["attempts"] == 1


def test_errors_name_the_field(client: httpx.Client) -> None:
    assert client.get("/v1/jobs/00000000-0000-4000-8000-000000000000").status_code == 404
    not_uuid = client.get("/v1/jobs/..%2F..%2Fetc%2Fpasswd")
    assert not_uuid.status_code in (404, 422)
    bad_id = client.get("/v1/jobs/not-a-job-id")
    assert bad_id.status_code == 422 and bad_id.json()["error"]["param"] == "job_id"
    for body, field in (
        (small_job(num_frames=10), "num_frames"),
        (small_job(model="nope"), "model"),
        (small_job(model="tiny-i2v"), "image"),
        (small_job(steps=5), "steps"),
        (small_job(width=100, height=96), "width"),
        (small_job(colour="red"), "colour"),
    ):
        response = client.post("/v1/generate", json=body)
        assert response.status_code == 422, body
        assert response.json()["error"]["param"] == field
        assert any(item["loc"][-1] == field for item in response.json()["detail"])


def test_api_restart_keeps_every_job(client: httpx.Client, stack: LiveStack) -> None:
    finished = [submit(client, small_job(prompt=f"before restart {i}")) for i in range(2)]
    for job in finished:
        wait_job(client, job["id"], ("completed",))
    canceled = submit(client, LONG_JOB)
    client.post(f"/v1/jobs/{canceled['id']}/cancel")
    running = submit(client, small_job(prompt="running across the restart", num_frames=33))
    ids = [job["id"] for job in (*finished, canceled, running)]
    before = {job_id: client.get(f"/v1/jobs/{job_id}").json() for job_id in ids}
    etag = client.head(f"/v1/jobs/{ids[0]}/video").headers["etag"]

    stack.stop_api()
    stack.start_api()

    with httpx.Client(base_url=stack.url, timeout=30) as fresh:
        listed = {job["id"] for job in fresh.get("/v1/jobs", params={"limit": 100}).json()["data"]}
        assert set(ids) <= listed
        for job_id in ids[:3]:
            after = fresh.get(f"/v1/jobs/{job_id}").json()
            for field in ("status", "seed", "prompt", "timings", "created_at", "completed_at", "error"):
                assert after[field] == before[job_id][field], field
        assert fresh.head(f"/v1/jobs/{ids[0]}/video").headers["etag"] == etag
        assert wait_job(fresh, running["id"], ("completed",))["status"] == "completed"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK marks the Sora API as deprecated
def test_openai_sdk_round_trip(stack: LiveStack, tmp_path: Path) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused-locally", max_retries=0)
    video = client.videos.create(
        model="tiny-t2v",
        prompt="a paper boat",
        seconds="1",
        size="160x96",
        extra_body={"num_frames": 5, "steps": 2, "seed": 3},
    )
    assert video.object == "video" and video.status in ("queued", "in_progress") and video.size == "160x96"
    video = client.videos.poll(video.id, poll_interval_ms=100)
    assert video.status == "completed" and video.progress == 100 and video.seconds == "0.3125"
    assert video.model == "tiny-t2v" and video.completed_at is not None and video.expires_at is not None
    path = tmp_path / "boat.mp4"
    client.videos.download_content(video.id).write_to_file(path)
    assert probe_mp4(path)["num_frames"] == 5

    # seconds alone picks the 4k+1 frame count nearest to seconds × 16 fps; input_reference is the 1st frame.
    i2v = client.videos.create_and_poll(
        model="tiny-i2v",
        prompt="waves",
        seconds="1",
        input_reference=("first.png", png_bytes(64, 64), "image/png"),
        extra_body={"steps": 1},
        poll_interval_ms=100,
    )
    assert i2v.status == "completed" and i2v.seconds == f"{17 / 16:g}"

    assert video.id in [v.id for v in client.videos.list(limit=100, order="desc").data]
    deleted = client.videos.delete(video.id)
    assert deleted.deleted and deleted.object == "video.deleted" and deleted.id == video.id
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    with pytest.raises(openai.UnprocessableEntityError):
        client.videos.create(model="tiny-t2v", prompt="bad size", size="100x96")


def test_python_sdk_sync_and_async(stack: LiveStack, tmp_path: Path) -> None:
    updates: list[JobPublic] = []
    with Client(stack.url) as client:
        job = client.generate(
            "a fox in the sdk",
            tmp_path / "sync.mp4",
            model="tiny-t2v",
            num_frames=5,
            steps=2,
            progress=updates.append,
        )
        assert job.status.value == "completed" and probe_mp4(tmp_path / "sync.mp4")["num_frames"] == 5
        assert updates and updates[-1].status.value == "completed"
        assert {m.id for m in client.models().data} == {"tiny-t2v", "tiny-i2v"}
        assert job.id in [j.id for j in client.list(limit=100).data]
        with pytest.raises(APIError) as conflict:
            client.cancel(job.id)
        assert conflict.value.status_code == 409
        with pytest.raises(APIError) as missing:
            client.get("00000000-0000-4000-8000-000000000000")
        assert missing.value.status_code == 404

    async def run_async() -> JobPublic:
        async with AsyncClient(stack.url) as client:
            seen: list[str] = []

            async def progress(job: JobPublic) -> None:
                seen.append(job.status.value)

            result = await client.generate(
                "waves from async",
                tmp_path / "async.mp4",
                model="tiny-i2v",
                image=png_bytes(),
                num_frames=5,
                steps=1,
                progress=progress,
            )
            assert seen[-1] == "completed"
            await client.delete(result.id)
            return result

    result = asyncio.run(run_async())
    assert result.mode == "i2v" and probe_mp4(tmp_path / "async.mp4")["num_frames"] == 5


def test_cli_submit_shows_progress_and_writes_the_mp4(stack: LiveStack, tmp_path: Path) -> None:
    output = tmp_path / "cli.mp4"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.cli",
            "submit",
            "a fox from the cli",
            "--model",
            "tiny-t2v",
            "--frames",
            "9",
            "--steps",
            "2",
            "--seed",
            "5",
            "--url",
            stack.url,
            "-o",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=stack.env,
    )
    assert result.returncode == 0, result.stderr
    assert "100%" in result.stderr and "wrote" in result.stderr and "seed 5" in result.stderr
    assert probe_mp4(output)["num_frames"] == 9


def test_readyz_lists_the_ready_workers(client: httpx.Client) -> None:
    ready = client.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["ready"] and body["redis"]
    assert {(w["model"], w["state"]) for w in body["workers"]} <= {
        (m, s) for m in ("tiny-t2v", "tiny-i2v") for s in ("READY", "BUSY")
    }
    assert client.get("/healthz").json() == {"status": "ok"}
