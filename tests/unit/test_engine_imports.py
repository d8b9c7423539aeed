"""The engine imports with torch (+ triton) alone: the H100 image has no service dependencies."""

from __future__ import annotations

import subprocess
import sys

BLOCKED = ("fastapi", "pydantic", "redis", "rq", "httpx", "prometheus_client", "imageio_ffmpeg", "tokenizers",
           "PIL", "safetensors", "service", "diffusers", "transformers")


def test_engine_imports_without_service_dependencies() -> None:
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import engine.pipeline, engine.checkpoint, engine.ops.attention, engine.video, engine.sampling
import engine.models.dit, engine.models.vae, engine.models.t5
import engine.quantize, engine.ops.int8_linear, engine.ops.norms, engine.ops.sla
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
