"""Every benchmark script runs end to end on tiny inputs through `run_all.py` (not a timing test).

The benchmarks start their own Ray, S3 server and child processes, so they run as a subprocess here (as a
user runs them), never inside this session's Ray. `MASKDIET_BENCH_TINY=1` shrinks every input.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import TINY_ENV, parse_rows, print_rows
from benchmarks.run_all import README_END, README_START, discover, write_readme

ROOT = Path(__file__).resolve().parents[2]

# Rows the issue asks for, by benchmark; other benchmarks must print at least one finite row.
EXPECTED = {
    "ingest": [
        "ingest_local_ratio_vs_dataloader",
        "ingest_s3_ratio_vs_dataloader",
        "ingest_local_decode_limit_images_per_s",
        "ingest_local_fraction_of_decode_limit",
        "ingest_local_parallel_decode_fraction_of_decode_limit",
        "ingest_local_fraction_of_parallel_decode",
    ],
    "scaling": [
        "scaling_curate_ratio_2cpu_vs_1cpu",
        "scaling_cluster_head_node_tasks",
        "scaling_cluster_worker_node_tasks",
    ],
    "memory": ["memory_curate_small_peak_pss_mb", "memory_curate_pss_growth_large_vs_small"],
    "shards": [
        "shards_curate_speedup_ratio_vs_objects",
        "shards_curate_fewer_requests_ratio_vs_objects",
        "shards_pretrain_speedup_ratio_vs_objects",
        "shards_pretrain_fewer_requests_ratio_vs_objects",
    ],
    "gpu_pretrain": ["skipped_no_cuda"],  # CI has no GPU: the one row it prints there
}


def test_rows_round_trip(capsys: pytest.CaptureFixture[str]) -> None:
    rows = [("a_per_s", 1234.5678), ("b_ratio_vs_c", 0.8125), ("nan_row", math.nan)]
    print_rows(rows)
    out = capsys.readouterr().out + "# a comment line\nnot: a number\nc_ratio: 1.5    # target >= 1: met\n"
    parsed = dict(parse_rows(out))
    assert set(parsed) == {"a_per_s", "b_ratio_vs_c", "nan_row", "c_ratio"} and parsed["c_ratio"] == 1.5
    assert parsed["a_per_s"] == pytest.approx(1234.6, abs=0.05) and parsed["b_ratio_vs_c"] == 0.8125
    assert math.isnan(parsed["nan_row"])


def test_readme_section_replaced(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\nintro\n\n{README_START}\nold table\n{README_END}\n\nafter\n")
    write_readme(readme, "new table")
    text = readme.read_text()
    assert "old table" not in text and "new table" in text
    assert text.startswith("# title\nintro") and text.rstrip().endswith("after")
    write_readme(readme, "newer table")  # idempotent: one section, replaced again
    assert readme.read_text().count(README_START) == 1 and "newer table" in readme.read_text()


@pytest.mark.slow
def test_every_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    names = discover()
    assert {"ingest", "scaling", "memory"} <= set(names)
    readme = tmp_path / "README.md"
    env = {**os.environ, TINY_ENV: "1"}
    done = subprocess.run(
        [sys.executable, "benchmarks/run_all.py", "--quick", "--write-readme", "--readme", str(readme)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, f"run_all failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    sections = done.stdout.split("\n# ")
    for name in names:
        section = next((s for s in sections if s.startswith(f"{name} (")), None)
        assert section is not None, f"no output section for benchmark {name}:\n{done.stdout}"
        rows = dict(parse_rows(section))
        assert rows, f"benchmark {name} printed no rows:\n{section}"
        missing = [r for r in EXPECTED.get(name, []) if r not in rows]
        assert not missing, f"benchmark {name} lacks rows {missing}"
        bad = {r: v for r, v in rows.items() if not math.isfinite(v)}
        assert not bad, f"benchmark {name} printed non-finite rows {bad}"
    table = readme.read_text()
    assert f"| cores | {os.cpu_count()} |" in table  # the machine it ran on
    for rows in EXPECTED.values():
        assert all(f"`{r}`" in table for r in rows)
