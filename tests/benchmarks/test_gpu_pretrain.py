"""`benchmarks/gpu_pretrain.py`: one skip row without CUDA; its whole code path on CPU (not a timing test).

The GPU run happens once, on a machine these tests never see, so the CPU override
(`MASKDIET_BENCH_FORCE_CPU=1` with `MASKDIET_BENCH_TINY=1`) takes every measurement the GPU run takes: the
bare step eager and compiled, FLOP counting, the matmul, the DataLoader feed, curation and both `pretrain`
runs. It starts its own Ray, so it runs as a subprocess through `run_all.py` (as a user runs it), never
inside this session's Ray.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import gpu_pretrain
from benchmarks.common import TINY_ENV, parse_rows
from benchmarks.run_all import module_targets
from tests.benchmarks.runner import ROOT, run_all

# Every row the CPU path prints (the GPU adds `_mfu` against the data-sheet peak, the spec peak itself and
# peak memory).
CPU_ROWS = [
    "matmul_tflops",
    *(
        f"{model}_mask{mask}_{mode}_{what}"
        for model in ("vit_b", "vit_l")
        for mask in ("075", "000")
        for mode in ("eager", "compiled")
        for what in ("images_per_s", "tflops", "mfu_vs_matmul")
    ),
    *(f"{model}_mask{mask}_gflops_per_image" for model in ("vit_b", "vit_l") for mask in ("075", "000")),
    "vit_b_mask_speedup",
    "vit_l_mask_speedup",
    "vit_l_eager_mask_speedup",
    "vit_l_compiled_speedup_vs_eager",
    "dataloader_steady_images_per_s",
    "dataloader_vs_bare",
    *(
        f"pretrain_{kind}_{what}"
        for kind in ("streamed", "cached")
        for what in (
            "steady_images_per_s",
            "loop_images_per_s",
            "call_images_per_s",
            "first_step_s",
            "build_trainer_s",
            "fit_to_first_step_s",
            "vs_bare",
            "vs_dataloader",
        )
    ),
    "startup_ray_start_s",
    "startup_build_trainer_s",
    "startup_fit_to_first_step_s",
    "time_to_first_step_s",
]
GPU_ONLY = {"vit_b_mask075_compiled_mfu", "vit_l_mask075_compiled_mfu"}  # no data-sheet peak for a CPU


def _without_override(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.delenv(gpu_pretrain.FORCE_CPU_ENV, raising=False)
    return {k: v for k, v in os.environ.items() if k != gpu_pretrain.FORCE_CPU_ENV}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the benchmark would run")
def test_without_cuda_it_is_one_skip_row(monkeypatch: pytest.MonkeyPatch) -> None:
    env = _without_override(monkeypatch)
    assert gpu_pretrain.run(quick=True) == [gpu_pretrain.SKIP_ROW]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_pretrain", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert parse_rows(done.stdout) == [("skipped_no_cuda", 1.0)], (
        done.stdout
    )  # finite: run_all's table takes it
    assert "skipped: no CUDA" in done.stderr


def test_targets_are_the_issues_and_readable_by_run_all() -> None:
    targets = module_targets("gpu_pretrain")
    assert targets == gpu_pretrain.TARGETS
    assert targets["time_to_first_step_s"] == ("<=", 20.0)
    assert targets["vit_l_mask075_compiled_mfu"] == (">=", 0.45)
    assert set(targets) <= set(CPU_ROWS) | GPU_ONLY


def test_spec_peak_is_looked_up_by_device_name() -> None:
    peak = gpu_pretrain.spec_peak_tflops
    assert peak("NVIDIA H200") == 989.0
    assert peak("NVIDIA H100 80GB HBM3") == 989.0 and peak("NVIDIA H100 PCIe") == 756.0
    assert peak("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak("NVIDIA L4") is None


def test_device_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_override(monkeypatch)
    assert gpu_pretrain.choose_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert gpu_pretrain.choose_device(None) is None
        with pytest.raises(SystemExit, match="no CUDA"):
            gpu_pretrain.choose_device("cuda")
    monkeypatch.setenv(gpu_pretrain.FORCE_CPU_ENV, "1")
    assert gpu_pretrain.choose_device(None) == torch.device("cpu")


def test_steady_rate_weights_lines_by_their_time() -> None:
    history = [
        {"step": 10, "images_per_s": 100.0},  # warm-up: left out
        {"step": 20, "images_per_s": 200.0},  # 10 steps
        {"step": 40, "images_per_s": 400.0},  # 20 steps
    ]
    # 30 steps of b images in 10 b / 200 + 20 b / 400 = 0.1 b seconds → 300 images/s
    assert gpu_pretrain.steady_rate(history, after=10) == pytest.approx(300.0)
    assert math.isnan(gpu_pretrain.steady_rate(history, after=40))


@pytest.mark.slow  # bare steps of two tiny MAEs, a DataLoader, two Ray starts, curate and two pretrain runs
def test_cpu_override_runs_every_measurement(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**_without_override(monkeypatch), TINY_ENV: "1", gpu_pretrain.FORCE_CPU_ENV: "1"}
    done = run_all("--only", "gpu_pretrain", env=env)
    rows = dict(parse_rows(done.stdout))
    missing = [r for r in CPU_ROWS if r not in rows]
    assert not missing, f"rows missing: {missing}\n{done.stdout}"
    bad = {r: v for r, v in rows.items() if not math.isfinite(v)}
    assert not bad, f"non-finite rows: {bad}"
    assert "skipped_no_cuda" not in rows and not GPU_ONLY & set(rows)
    assert rows["pipeline_kept_images"] == rows["pipeline_images"] > 0
    assert "# target" in done.stdout  # run_all marked the rows that have targets
