"""A short run of bench/soak.py: mixed load while the target restarts, no leaks."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.procs import ROOT


def test_short_soak_passes_every_check() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--seconds", "20", "--restart-every", "6"],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    report = json.loads(result.stdout)
    print(json.dumps({k: report[k] for k in ("outcomes", "jobs", "checks")}, indent=1))
    assert report["target_restarts"] >= 2
    assert report["checks"] and all(report["checks"].values()), report
    assert result.returncode == 0
