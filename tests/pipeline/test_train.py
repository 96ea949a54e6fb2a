"""Pretraining on Ray Train: 2 workers (0.5 CPU each) over demo images on moto S3; the loss falls; the run
writes a timm-loadable encoder, metrics and checkpoints to S3; rerunning the same run name resumes.

The images are few, so most runs read them from S3 once into the decoded cache; the diverging run streams
them from S3 through Ray Data every epoch (`pretrain.cache_decoded_mib=0`), the path of a large set."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.core.config import Config, load_config
from pipeline.core.storage import join, read_json_lines, url_to_fs
from pipeline.demo_data import DemoSpec, write_demo_data
from pipeline.models.checkpoint import read_encoder_state, size_from_state
from pipeline.models.mae import timm_encoder
from pipeline.train import TrainingDiverged, build_trainer, pretrain, worker_resources
from pipeline.train_loop import (
    MetricWindow,
    RunState,
    StepResult,
    Worker,
    checkpoint_due,
    compile_enabled,
    log_due,
    report_due,
)
from stages.manifest import write_manifest
from stages.read import list_images

STEPS = 120  # global batches of 16
EVAL_EVERY = 40
MORE = 30  # steps of the resumed rerun


def _config(images: str, output: str, *overrides: str) -> Config:
    return load_config(
        overrides=[
            f"data.input={images}",
            f"output={output}",
            "pretrain.model=mae_vit_micro_patch4",
            f"pretrain.steps={STEPS}",
            "pretrain.batch_size=8",
            "pretrain.num_workers=2",
            "pretrain.cpus_per_worker=0.5",
            "pretrain.base_lr=0.01",  # lr = 0.01 × 16 / 256 = 6.25e-4
            "pretrain.warmup_steps=10",
            "pretrain.log_every=10",
            f"pretrain.eval_every={EVAL_EVERY}",
            "pretrain.checkpoint_every=80",  # a multiple of EVAL_EVERY: checkpoints validate too
            "pretrain.val_images=16",
            "pretrain.crop_scale_min=0.5",
            "data.read_batch_size=8",
            *overrides,
        ]
    )


@pytest.fixture
def s3_manifest(s3_bucket: str) -> tuple[str, str]:
    """Demo digits on S3 and a manifest keeping all of them; returns (images URL, manifest URL)."""
    images = join(s3_bucket, "images")
    write_demo_data(images, DemoSpec(per_class=8, seed=3))
    frame = list_images(load_config(overrides=[f"data.input={images}"]).data).frame()
    frame["sha256"] = ""
    frame["kept"] = True
    frame["reason"] = "kept"
    manifest = join(s3_bucket, "curated", "manifest.parquet")
    write_manifest(manifest, frame, {"run_id": "test"})
    return images, manifest


def test_worker_resources_leave_cpus_to_ray_data(ray_cluster) -> None:
    config = load_config(overrides=["pretrain.num_workers=2", "ray.data_cpu_share=0.5"])
    assert worker_resources(config) == {"CPU": 0.5}  # 2 CPUs × (1 − 0.5) / 2 workers
    config = load_config(overrides=["pretrain.num_workers=1", "pretrain.cpus_per_worker=0.25"])
    assert worker_resources(config) == {"CPU": 0.25}


def test_log_report_and_checkpoint_steps() -> None:
    """A checkpoint goes out with a report, and a report carries a metrics line of its own step."""
    pre = load_config(
        overrides=[
            "pretrain.steps=100",
            "pretrain.log_every=10",
            "pretrain.eval_every=20",
            "pretrain.checkpoint_every=30",
        ]
    ).pretrain
    steps = range(1, pre.steps + 1)
    assert [s for s in steps if checkpoint_due(s, pre)] == [30, 60, 90, 100]  # and the last step
    assert [s for s in steps if report_due(s, pre)] == [20, 30, 40, 60, 80, 90, 100]
    assert [s for s in steps if log_due(s, pre)] == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]


def _result(loss: float, recon: float, lr: float = 0.1, ratio: float = 0.75) -> StepResult:
    return StepResult(losses=torch.tensor([loss, recon]), lr=lr, mask_ratio=ratio, images=16)


def test_metric_window_lines() -> None:
    """A metrics.jsonl line: mean losses over its steps (kept as tensors until the line), throughput without
    the run's first step (pipeline warm-up), keys in the order the file has always had; the first line
    after a resume says where, the first after a start carries its first step's time."""
    window = MetricWindow()
    window.start_pass()
    step = _result(2.0, 1.0)
    window.add(step)
    window.add(_result(4.0, 3.0, lr=0.2, ratio=0.7))
    assert window.steps == 2 and all(isinstance(t, torch.Tensor) for t in window.losses)
    line = window.line(2, step)
    assert list(line) == ["step", "loss", "recon_loss", "lr", "mask_ratio", "images_per_s", "time"]
    assert (line["step"], line["loss"], line["recon_loss"], line["lr"]) == (2, 3.0, 2.0, 0.1)
    assert line["images_per_s"] > 0  # 16 images over the second step's time
    assert window.steps == 0 and window.nonfinite is None
    run = RunState(step=120, resumed_from=120, first_step_time=1234.5)
    run.add_line({"step": 130})
    run.add_line({"step": 140})
    assert run.history == [{"step": 130, "resumed_from": 120, "first_step_time": 1234.5}, {"step": 140}]
    assert run.latest == {"step": 140}


def test_metric_window_finds_the_first_non_finite_step() -> None:
    """Divergence is found when the window is read back, and named by the step where it began."""
    window = MetricWindow()
    for loss in (1.0, 2.0, float("nan"), float("inf")):
        window.add(_result(loss, loss))
    line = window.line(14, _result(0.0, 0.0))  # steps 11..14
    assert math.isnan(line["loss"]) and window.nonfinite is not None
    assert window.nonfinite[0] == 13 and math.isnan(window.nonfinite[1])


def test_compile_follows_the_setting_and_the_device() -> None:
    cpu, gpu = Worker(0, 1, torch.device("cpu")), Worker(0, 1, torch.device("cuda"))
    pre = load_config().pretrain
    assert pre.compile == "auto" and not compile_enabled(pre, cpu) and compile_enabled(pre, gpu)
    on = load_config(overrides=["pretrain.compile=on"]).pretrain  # YAML's bare `on` is a bool: taken as "on"
    off = load_config(overrides=["pretrain.compile=off"]).pretrain
    assert compile_enabled(on, cpu) and not compile_enabled(off, gpu)


def test_first_step_seconds_counts_from_this_call() -> None:
    from pipeline.train import first_step_seconds

    history = [{"step": 10, "first_step_time": 100.0}, {"step": 20}, {"step": 30, "first_step_time": 250.0}]
    assert first_step_seconds(history, called=90.0) == 10.0
    assert first_step_seconds(history, called=200.0) == 50.0  # a resumed run: the earlier call's is older
    assert first_step_seconds(history, called=300.0) is None


@pytest.mark.slow  # inductor compiles the micro model's step in ~30 s on 2 cores (cached afterwards)
def test_compiled_step_trains_as_the_eager_step() -> None:
    """`pretrain.compile=on` on CPU: the same losses as eager, step after step, for the random and the block
    mask, through a mask-ratio schedule (one recompile: the visible count becomes a dynamic size)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from pipeline.models.mae import MaskedAutoencoder, size_of
    from pipeline.train_loop import (
        TrainModel,
        build_augment,
        build_masker,
        build_optimizer,
        peak_lr,
        train_step,
    )

    worker = Worker(0, 1, torch.device("cpu"))
    rng = np.random.default_rng(0)
    batches = [
        {"image": torch.from_numpy(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))} for _ in range(4)
    ]
    for strategy in ("random", "block"):
        torch._dynamo.reset()
        config = load_config(
            overrides=[
                "pretrain.model=mae_vit_micro_patch4",
                "decode.image_size=32",
                "pretrain.steps=4",
                "pretrain.warmup_steps=1",
                f"pretrain.mask.strategy={strategy}",
                "pretrain.mask.schedule=linear",
                "pretrain.mask.ratio_end=0.6",
            ]
        )
        pre = config.pretrain
        losses, counter = {}, CompileCounterWithBackend("inductor")
        for compile_ in (False, True):
            torch.manual_seed(0)
            mae = MaskedAutoencoder(size_of(config))
            model = TrainModel(
                raw=mae,
                ddp=mae,
                optimizer=build_optimizer(mae, peak_lr(pre, 1), pre.weight_decay, worker.device),
                masker=build_masker(config, mae, worker, 0),
                peak_lr=peak_lr(pre, 1),
                augment=build_augment(config, worker, 0),
                forward=torch.compile(mae, backend=counter) if compile_ else mae,
            )
            losses[compile_] = [train_step(model, b, i, pre, worker).losses for i, b in enumerate(batches)]
        eager, compiled = torch.stack(losses[False]), torch.stack(losses[True])
        assert torch.allclose(compiled, eager, rtol=1e-4, atol=1e-6), (strategy, compiled, eager)
        assert counter.frame_count <= 2, strategy  # static, then dynamic once the ratio changed


def test_ray_train_console_level_follows_config(ray_cluster, s3_manifest, s3_bucket) -> None:
    """Ray Train's own INFO lines (every report and checkpoint) stay off the console unless asked for."""
    images, manifest = s3_manifest
    output = join(s3_bucket, "quiet")
    quiet = build_trainer(_config(images, output), manifest, output)
    assert quiet.run_config.logging_config.log_level == "WARNING"
    chatty = build_trainer(_config(images, output, "ray.train_log_level=INFO"), manifest, output)
    assert chatty.run_config.logging_config.log_level == "INFO"


@pytest.mark.slow
def test_pretrain_on_s3_loss_falls_and_rerun_resumes(ray_cluster, s3_manifest, s3_bucket, tmp_path) -> None:
    images, manifest = s3_manifest
    output = join(s3_bucket, "pretrain")
    config = _config(images, output)
    result = pretrain(config, manifest, output, run_name="mae")

    # Real training: the loss falls clearly, on the training stream and on the held-out images.
    losses = [h["loss"] for h in result.history]
    assert result.steps == STEPS and len(losses) == STEPS // 10
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:2]), losses
    vals = [h["val_loss"] for h in result.history if "val_loss" in h]
    assert len(vals) == STEPS // EVAL_EVERY and vals[-1] < vals[0], vals
    assert result.images_per_s > 0
    assert {"step", "loss", "lr", "mask_ratio", "images_per_s"} <= set(result.history[-1])
    assert "first_step_time" in result.history[0] and 0 < result.first_step_seconds < 600

    # Outputs on S3: metrics.jsonl, checkpoints and an encoder that timm loads.
    fs, _ = url_to_fs(output)
    assert read_json_lines(result.metrics_url) == result.history
    assert result.checkpoint and fs.exists(result.checkpoint.rstrip("/") + "/state.pt")
    state = read_encoder_state(result.encoder_url)
    local = tmp_path / "encoder.pth"
    torch.save(state, local)
    encoder = timm_encoder(size_from_state(state), str(local))
    assert encoder(torch.randn(1, 3, 32, 32)).shape == (1, 64)

    # Rerunning the same run name continues from the last checkpoint (the last step), not from zero.
    more = _config(images, output, f"pretrain.steps={STEPS + MORE}")
    resumed = pretrain(more, manifest, output, run_name="mae")
    assert resumed.steps == STEPS + MORE
    new_lines = [h for h in resumed.history if h["step"] > STEPS]
    assert new_lines[0].get("resumed_from") == STEPS
    assert "first_step_time" in new_lines[0] and 0 < resumed.first_step_seconds < 600  # this call's start
    assert [h["step"] for h in resumed.history[: len(losses)]] == [h["step"] for h in result.history]
    assert len(resumed.history) == (STEPS + MORE) // 10  # no step trained twice


def test_non_finite_loss_stops_with_a_message(ray_cluster, s3_manifest, s3_bucket) -> None:
    images, manifest = s3_manifest
    output = join(s3_bucket, "diverge")
    config = _config(
        images,
        output,
        "pretrain.steps=30",
        "pretrain.base_lr=1e35",  # Adam moves every weight by ~lr: the next forward overflows
        "pretrain.warmup_steps=0",
        "pretrain.grad_clip=null",
        "pretrain.eval_every=5",
        "pretrain.checkpoint_every=1000",
        "pretrain.cache_decoded_mib=0",  # stream from S3 through Ray Data to both workers
    )
    with pytest.raises(TrainingDiverged, match="non-finite loss"):
        pretrain(config, manifest, output, run_name="diverge")


def test_a_validation_image_deleted_since_curation_is_left_out(tmp_path, caplog) -> None:
    """The held-out images are decoded once in the driver; one that is gone is skipped with a warning,
    it does not end the run."""
    from pipeline.train import _validation_images

    images = str(tmp_path / "images")
    write_demo_data(images, DemoSpec(per_class=1, seed=4, image_format="png"))
    paths = list_images(load_config(overrides=[f"data.input={images}"]).data).paths[:4]
    config = load_config(overrides=[f"data.input={images}", "decode.image_size=32"])
    url_to_fs(paths[2])[0].rm_file(paths[2])
    with caplog.at_level("WARNING", logger="pipeline.train"):
        decoded = _validation_images(config, paths)
    assert decoded.shape == (3, 32, 32, 3) and decoded.any(axis=(1, 2, 3)).all()
    assert "1 validation image(s) left out" in caplog.text and "missing" in caplog.text


def test_training_throughput_is_total_images_over_total_time() -> None:
    """Uneven windows: 10 steps of 128 images at 100 images/s (12.8 s), then 30 steps at 50 images/s
    (76.8 s) are 5,120 images in 89.6 s: 57.1 images/s, not the steps-weighted mean of the rates (62.5)."""
    from pipeline.train import training_throughput

    history = [
        {"step": 10, "images_per_s": 100.0},
        {"step": 40, "images_per_s": 50.0},
        {"step": 40},  # a line without a timed window (e.g. the final report) counts nothing
    ]
    assert training_throughput(history) == pytest.approx(5120 / 89.6)
    assert training_throughput([{"step": 5}]) == 0.0
