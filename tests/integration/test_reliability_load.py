"""The load script (bench/load.py) at smoke size: its own Redis and a 2-worker API, a burst of submissions
answered 202 or 429 with Retry-After, polls answered 200, nothing 5xx, memory flat while polling.

The full run (500 concurrent submissions + 5000 polls, 3 rounds) and its figures are in docs/RELIABILITY.md;
latency bars are checked there, not here: a shared CI machine's timing says little about the API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import REPO

pytestmark = pytest.mark.integration


def test_load_smoke_answers_every_request_within_the_contract(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "load.py"), "--submissions", "60", "--polls", "600"]
        + ["--rounds", "1", "--queue-depth", "30", "--out", str(out)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    submit, poll = report["submit"], report["poll"]
    assert submit["requests"] == 60 and set(submit["statuses"]) == {"202", "429"}, submit
    assert submit["missing_retry_after"] == 0
    # The queue fills to its depth exactly, then refuses (admission and enqueue are one atomic step).
    assert submit["statuses"] == {"202": 30, "429": 30}, submit
    assert poll["requests"] == 600 and poll["statuses"] == {"200": 600}, poll
    assert report["api_rss_mib"]["growth_while_polling"] <= 1.0, report["api_rss_mib"]
    # The CPU each request cost is reported (the arithmetic behind the latency: docs/RELIABILITY.md).
    for phase in (submit, poll):
        assert phase["cpu_ms_per_request"]["api"] > 0 and phase["cpu_ms_per_request"]["redis"] >= 0, phase
