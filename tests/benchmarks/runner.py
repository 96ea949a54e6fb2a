"""Running `benchmarks/run_all.py` from a test, as a user runs it: a subprocess (the benchmarks start their
own Ray, S3 server and child processes, never inside the test session's Ray)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_all(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`run_all.py --quick ARGS` in the repository root; fails the test with its output when it fails."""
    done = subprocess.run(
        [sys.executable, "benchmarks/run_all.py", "--quick", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, f"run_all failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done
