"""openapi.yaml at the repository root is the app's generated schema.

Regenerate it with `tdserve openapi > openapi.yaml`."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from service.app import create_app
from service.settings import Settings

OPENAPI = Path(__file__).resolve().parents[2] / "openapi.yaml"


def generated() -> dict[str, object]:
    schema = create_app(Settings(_env_file=None)).openapi()  # type: ignore[call-arg]
    normalized: dict[str, object] = json.loads(json.dumps(schema))  # tuples → lists, as YAML reads them
    return normalized


def test_openapi_yaml_matches_the_app() -> None:
    assert yaml.safe_load(OPENAPI.read_text()) == generated(), (
        "openapi.yaml drifted from the app: run `tdserve openapi > openapi.yaml`"
    )


def test_openapi_documents_bodies_examples_and_operation_ids() -> None:
    schema = generated()
    paths: dict[str, dict[str, dict[str, object]]] = schema["paths"]  # type: ignore[assignment]
    components: dict[str, dict[str, object]] = schema["components"]["schemas"]  # type: ignore[index]
    for path, operations in paths.items():
        for method, operation in operations.items():
            tag = operation["tags"][0]  # type: ignore[index]
            assert str(operation["operationId"]).startswith(f"{tag}-"), (method, path)
    for route, body in (("/v1/generate", "Generate"), ("/v1/videos", "VideoCreate")):
        content = paths[route]["post"]["requestBody"]["content"]  # type: ignore[index]
        assert set(content) == {"application/json", "multipart/form-data"}  # type: ignore[arg-type]
        assert "examples" in components[f"{body}Request"]
        assert components[f"{body}Form"]["properties"]  # type: ignore[index]
    for name in ("JobPublic", "VideoPublic"):
        assert "examples" in components[name]
    video = paths["/v1/jobs/{job_id}/video"]["get"]["responses"]
    assert "video/mp4" in video["200"]["content"] and "206" in video  # type: ignore[index, operator]
