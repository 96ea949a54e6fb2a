"""Every benchmark script runs end to end on tiny inputs through `run_all.py` (not a timing test).

The benchmarks start their own Ray, S3 server and child processes, so they run as a subprocess here (as a
user runs them), never inside this session's Ray. `MASKDIET_BENCH_TINY=1` shrinks every input.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from benchmarks.common import TINY_ENV, parse_rows, print_rows
from benchmarks.run_all import README_END, README_START, discover, write_readme
from tests.benchmarks.runner import run_all

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
        "scaling_proxy_head_node_tasks",
        "scaling_proxy_worker_node_tasks",
        "scaling_score_head_node_tasks",
        "scaling_score_worker_node_tasks",
    ],
    "proxy_throughput": [
        "proxy_images_per_s_maskdiet",
        "proxy_images_per_s_torch_loop",
        "proxy_train_ratio_vs_torch_loop",
        "proxy_resnet18_train_ratio_vs_torch_loop",
        "proxy_jobs_train_ratio_vs_torch_loop",
    ],
    "memory": ["memory_curate_small_peak_pss_mb", "memory_curate_pss_growth_large_vs_small"],
    "shards": [
        "shards_curate_speedup_ratio_vs_objects",
        "shards_curate_fewer_requests_ratio_vs_objects",
        "shards_pretrain_speedup_ratio_vs_objects",
        "shards_pretrain_fewer_requests_ratio_vs_objects",
    ],
    "gpu_pretrain": ["skipped_no_cuda"],  # CI has no GPU: the one row it prints there
    "score_memory": ["score_memory_large_peak_pss_mb", "score_memory_pss_growth_large_vs_small"],
    "prune_scale": [
        "prune_scale_total_seconds",
        "prune_scale_peak_pss_mb",
        "prune_scale_peak_rss_mb",
        *[
            f"prune_scale_{step}_{unit}"
            for step in (
                "keep_hard",
                "offset",
                "keep_easy",
                "class_balanced",
                "stratified",
                "random",
                "manifest",
                "cache_store",
                "cache_lookup",
            )
            for unit in ("seconds", "peak_pss_mb")
        ],
    ],
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
    done = run_all("--write-readme", "--readme", str(readme), env=env)
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
