"""The SDK's retry on 429 (Retry-After honoured), against the real app served by uvicorn in a thread."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from service.app import create_app
from service.client import APIError, AsyncClient, Client
from service.queue import Jobs
from service.settings import Settings
from tests.integration.redis_server import UNIT_DB, flushed_db_url, free_port


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Jobs]]:
    """An API whose tiny-t2v queue holds one job; no worker runs, so a second submission is refused."""
    settings = Settings(
        _env_file=None,
        redis_url=flushed_db_url(UNIT_DB),  # type: ignore[call-arg]
        storage_dir=tmp_path,
        models=["tiny-t2v"],
        queue_max_depth=1,
        auth_disabled=True,
    )
    app = create_app(settings)
    port = free_port()
    uvicorn_server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uvicorn_server.run, daemon=True)
    thread.start()
    while not uvicorn_server.started:
        time.sleep(0.01)
    jobs: Jobs = app.state.jobs
    jobs.record_run_time("tiny-t2v", 1.0)  # Retry-After = one average run = 1 s
    try:
        yield f"http://127.0.0.1:{port}", jobs
    finally:
        uvicorn_server.should_exit = True
        thread.join(timeout=10)
        flushed_db_url(UNIT_DB)


def test_client_retries_429_after_retry_after_then_gives_up(server: tuple[str, Jobs]) -> None:
    url, _ = server
    with Client(url, max_retries=2) as client:
        client.submit("first", model="tiny-t2v", num_frames=5)
        start = time.monotonic()
        with pytest.raises(APIError) as refused:
            client.submit("second", model="tiny-t2v", num_frames=5)
        assert refused.value.status_code == 429 and refused.value.code == "queue_full"
        assert time.monotonic() - start >= 2.0  # two waits of Retry-After: 1


def test_client_retry_succeeds_once_the_queue_has_room(server: tuple[str, Jobs]) -> None:
    url, jobs = server

    async def scenario() -> str:
        async with AsyncClient(url, max_retries=5) as client:
            first = await client.submit("first", model="tiny-t2v", num_frames=5)
            # Free the queue while the second submission waits out its Retry-After.
            asyncio.get_running_loop().call_later(0.3, jobs.cancel, first.id)
            second = await client.submit("second", model="tiny-t2v", num_frames=5)
            assert (await client.get(second.id)).status.value == "queued"
            return second.id

    job_id = asyncio.run(scenario())
    assert jobs.get(job_id).prompt == "second"
