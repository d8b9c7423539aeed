"""Python SDK for the tdserve API: `Client` (sync) and `AsyncClient` (asyncio), both on httpx.

    from service.client import Client

    with Client("http://127.0.0.1:8000") as client:
        job = client.generate("a red fox running through snow", "fox.mp4", model="tiny-t2v", num_frames=9,
                              progress=lambda job: print(job.stage, job.progress))

`generate` = `submit` + `wait` + `download`. Requests answered 429 or 503 are retried after the server's
`Retry-After` (at most `max_retries` times); `submit` sends an Idempotency-Key (generated when not given),
so a retried submission can never create a second job.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from service.schemas import JobPublic, JobsPublic, JobStatus, ModelsPublic

Model = TypeVar("Model", bound=BaseModel)
ProgressCallback = Callable[[JobPublic], None]
AsyncProgressCallback = Callable[[JobPublic], Awaitable[None] | None]

RETRY_STATUSES = (429, 503)
MAX_RETRY_AFTER_S = 60.0
DEFAULT_POLL_S = 1.0


class APIError(Exception):
    """The API answered with an error status."""

    def __init__(self, status_code: int, code: str, message: str, body: Any = None) -> None:
        super().__init__(f"{status_code} {code}: {message}")
        self.status_code = status_code
        self.code = code
        self.message = message
        self.body = body


class JobFailed(Exception):
    """`generate` ended with a job that is failed, canceled or expired."""

    def __init__(self, job: JobPublic) -> None:
        error = f" ({job.error.code}: {job.error.message})" if job.error else ""
        super().__init__(f"job {job.id} {job.status.value}{error}")
        self.job = job


def _raise_for_status(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        body = response.json()
        error = body.get("error") or {}
        code, message = error.get("code", "http_error"), error.get("message", response.text)
    except (json.JSONDecodeError, AttributeError):
        body, code, message = response.text, "http_error", response.text
    raise APIError(response.status_code, code, message, body)


def _retry_after_s(response: httpx.Response, attempt: int) -> float:
    value = response.headers.get("Retry-After")
    delay = float(value) if value is not None and value.isdigit() else min(2.0**attempt, 30.0)
    return min(delay, MAX_RETRY_AFTER_S)


def _poll_after_s(response: httpx.Response, poll_interval: float | None) -> float:
    if poll_interval is not None:
        return poll_interval
    hint = response.headers.get("openai-poll-after-ms")
    return int(hint) / 1000 if hint is not None and hint.isdigit() else DEFAULT_POLL_S


def _submit_request(
    prompt: str,
    model: str | None,
    image: str | Path | bytes | None,
    idempotency_key: str | None,
    params: dict[str, Any],
) -> dict[str, Any]:
    """httpx keyword arguments for POST /v1/generate: JSON, or multipart when there is an image file."""
    body = {
        "prompt": prompt,
        **({"model": model} if model else {}),
        **{name: value for name, value in params.items() if value is not None},
    }
    headers = {"Idempotency-Key": idempotency_key or str(uuid.uuid4())}
    if image is None:
        return {"json": body, "headers": headers}
    data = image if isinstance(image, bytes) else Path(image).read_bytes()
    form = {
        name: json.dumps(value)
        if isinstance(value, dict)
        else str(value).lower()
        if isinstance(value, bool)
        else str(value)
        for name, value in body.items()
    }
    return {"data": form, "files": {"image": ("image", data)}, "headers": headers}


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class Client:
    """Synchronous client."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.max_retries = max_retries
        self._http = httpx.Client(
            base_url=base_url, headers=_headers(api_key), timeout=timeout, transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            response = self._http.request(method, path, **kwargs)
            if response.status_code not in RETRY_STATUSES or attempt == self.max_retries:
                break
            time.sleep(_retry_after_s(response, attempt))
        _raise_for_status(response)
        return response

    def _get_model(self, path: str, model: type[Model], **kwargs: Any) -> Model:
        return model.model_validate_json(self._request("GET", path, **kwargs).content)

    def submit(
        self,
        prompt: str,
        *,
        model: str | None = None,
        image: str | Path | bytes | None = None,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> JobPublic:
        """Submit a job; `params` are the fields of POST /v1/generate (num_frames, steps, seed, size, …)."""
        response = self._request(
            "POST", "/v1/generate", **_submit_request(prompt, model, image, idempotency_key, params)
        )
        return JobPublic.model_validate_json(response.content)

    def get(self, job_id: str) -> JobPublic:
        return self._get_model(f"/v1/jobs/{job_id}", JobPublic)

    def list(self, *, after: str | None = None, limit: int = 20) -> JobsPublic:
        params: dict[str, Any] = {"limit": limit, **({"after": after} if after else {})}
        return self._get_model("/v1/jobs", JobsPublic, params=params)

    def models(self) -> ModelsPublic:
        return self._get_model("/v1/models", ModelsPublic)

    def wait(
        self,
        job_id: str,
        *,
        progress: ProgressCallback | None = None,
        poll_interval: float | None = None,
        timeout: float | None = None,
    ) -> JobPublic:
        """Poll until the job ends (completed, failed, canceled, expired), calling `progress` each time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            response = self._request("GET", f"/v1/jobs/{job_id}")
            job = JobPublic.model_validate_json(response.content)
            if progress is not None:
                progress(job)
            if job.status.is_terminal:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job.status.value} after {timeout} s")
            time.sleep(_poll_after_s(response, poll_interval))

    def download(self, job_id: str, path: str | Path) -> Path:
        """Stream the MP4 to `path` (written to a temporary name, then renamed)."""
        path = Path(path)
        temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
        try:
            with self._http.stream("GET", f"/v1/jobs/{job_id}/video") as response:
                if not response.is_success:
                    response.read()
                    _raise_for_status(response)
                with open(temp, "wb") as f:
                    for chunk in response.iter_bytes():
                        f.write(chunk)
            temp.replace(path)
        finally:
            temp.unlink(missing_ok=True)
        return path

    def cancel(self, job_id: str) -> JobPublic:
        return JobPublic.model_validate_json(self._request("POST", f"/v1/jobs/{job_id}/cancel").content)

    def delete(self, job_id: str) -> None:
        self._request("DELETE", f"/v1/jobs/{job_id}")

    def generate(
        self,
        prompt: str,
        output: str | Path,
        *,
        progress: ProgressCallback | None = None,
        timeout: float | None = None,
        **params: Any,
    ) -> JobPublic:
        """Submit, wait, download; raises JobFailed when the job does not complete."""
        job = self.submit(prompt, **params)
        job = self.wait(job.id, progress=progress, timeout=timeout)
        if job.status != JobStatus.completed:
            raise JobFailed(job)
        self.download(job.id, output)
        return job


class AsyncClient:
    """asyncio client with the same methods as `Client` (awaitable)."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 5,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.max_retries = max_retries
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=_headers(api_key), timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            response = await self._http.request(method, path, **kwargs)
            if response.status_code not in RETRY_STATUSES or attempt == self.max_retries:
                break
            await asyncio.sleep(_retry_after_s(response, attempt))
        _raise_for_status(response)
        return response

    async def _get_model(self, path: str, model: type[Model], **kwargs: Any) -> Model:
        return model.model_validate_json((await self._request("GET", path, **kwargs)).content)

    async def submit(
        self,
        prompt: str,
        *,
        model: str | None = None,
        image: str | Path | bytes | None = None,
        idempotency_key: str | None = None,
        **params: Any,
    ) -> JobPublic:
        request = _submit_request(prompt, model, image, idempotency_key, params)
        response = await self._request("POST", "/v1/generate", **request)
        return JobPublic.model_validate_json(response.content)

    async def get(self, job_id: str) -> JobPublic:
        return await self._get_model(f"/v1/jobs/{job_id}", JobPublic)

    async def list(self, *, after: str | None = None, limit: int = 20) -> JobsPublic:
        params: dict[str, Any] = {"limit": limit, **({"after": after} if after else {})}
        return await self._get_model("/v1/jobs", JobsPublic, params=params)

    async def models(self) -> ModelsPublic:
        return await self._get_model("/v1/models", ModelsPublic)

    async def wait(
        self,
        job_id: str,
        *,
        progress: AsyncProgressCallback | None = None,
        poll_interval: float | None = None,
        timeout: float | None = None,
    ) -> JobPublic:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            response = await self._request("GET", f"/v1/jobs/{job_id}")
            job = JobPublic.model_validate_json(response.content)
            if progress is not None:
                result = progress(job)
                if result is not None:
                    await result
            if job.status.is_terminal:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job.status.value} after {timeout} s")
            await asyncio.sleep(_poll_after_s(response, poll_interval))

    async def download(self, job_id: str, path: str | Path) -> Path:
        path = Path(path)
        temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
        try:
            async with self._http.stream("GET", f"/v1/jobs/{job_id}/video") as response:
                if not response.is_success:
                    await response.aread()
                    _raise_for_status(response)
                with open(temp, "wb") as f:
                    async for chunk in response.aiter_bytes():
                        f.write(chunk)
            temp.replace(path)
        finally:
            temp.unlink(missing_ok=True)
        return path

    async def cancel(self, job_id: str) -> JobPublic:
        response = await self._request("POST", f"/v1/jobs/{job_id}/cancel")
        return JobPublic.model_validate_json(response.content)

    async def delete(self, job_id: str) -> None:
        await self._request("DELETE", f"/v1/jobs/{job_id}")

    async def generate(
        self,
        prompt: str,
        output: str | Path,
        *,
        progress: AsyncProgressCallback | None = None,
        timeout: float | None = None,
        **params: Any,
    ) -> JobPublic:
        job = await self.submit(prompt, **params)
        job = await self.wait(job.id, progress=progress, timeout=timeout)
        if job.status != JobStatus.completed:
            raise JobFailed(job)
        await self.download(job.id, output)
        return job
