"""Evaluation: weighted kNN, linear probe, fine-tune, the raw-pixel baseline, architecture from a state dict,
labels from demo truth (never the injected noise) and a separate test folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core.config import load_config
from pipeline.evaluate import (
    evaluate_encoder,
    finetune_accuracy,
    knn_accuracy,
    linear_probe_accuracy,
    pixel_features,
    split_indices,
)
from pipeline.models.checkpoint import export_encoder, read_encoder_state, size_from_state
from pipeline.models.mae import build_mae


def _clusters(n_per_class: int, classes: int, dim: int, spread: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 3
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[y] + spread * torch.randn(len(y), dim, generator=g)
    return x, y


def test_knn_separates_clusters_and_is_chance_on_noise() -> None:
    x, y = _clusters(40, 5, 16, 0.5, seed=0)
    tx, ty = _clusters(20, 5, 16, 0.5, seed=0)
    assert knn_accuracy(x, y, tx, ty, k=20, temperature=0.07) > 0.95
    noise_x = torch.randn(200, 16, generator=torch.Generator().manual_seed(1))
    noise_t = torch.randn(100, 16, generator=torch.Generator().manual_seed(2))
    acc = knn_accuracy(noise_x, y, noise_t, ty, k=20)
    assert acc < 0.45  # chance is 0.2


def test_knn_weights_votes_by_similarity() -> None:
    # one very close neighbour of class 1 outweighs two distant ones of class 0 at a low temperature
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.05, 1.0]])
    labels = torch.tensor([1, 0, 0])
    query = torch.tensor([[1.0, 0.05]])
    assert knn_accuracy(train, labels, query, torch.tensor([1]), k=3, temperature=0.07) == 1.0
    # at a huge temperature every vote counts the same: the majority (class 0) wins
    assert knn_accuracy(train, labels, query, torch.tensor([1]), k=3, temperature=1e6) == 0.0


def test_linear_probe_learns_a_linear_rule() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=g) * torch.tensor([10.0, 1, 1, 1, 1, 1, 1, 1])  # BN undoes scale
    y = (x[:, 1] + x[:, 2] > 0).long()
    acc = linear_probe_accuracy(x[:400], y[:400], x[400:], y[400:], epochs=30, lr=0.1, batch=64)
    assert acc > 0.95


def test_split_is_seeded_and_disjoint() -> None:
    train, test = split_indices(100, 0.3, seed=0)
    assert len(test) == 30 and len(train) == 70 and not set(train) & set(test)
    assert np.array_equal(test, split_indices(100, 0.3, seed=0)[1])


def test_size_is_recovered_from_an_exported_encoder(tmp_path) -> None:
    model = build_mae("mae_vit_micro_patch4")
    export_encoder(model, str(tmp_path / "encoder.pth"))
    state = read_encoder_state(str(tmp_path))  # a folder holding encoder.pth works too
    size = size_from_state(state)
    assert (size.embed_dim, size.depth, size.patch_size, size.img_size) == (64, 2, 4, 32)
    with pytest.raises(ValueError, match="not a ViT encoder"):
        size_from_state({"weight": torch.zeros(1)})


def test_evaluate_command_reports_pretrained_and_random_init(tmp_path) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.demo_data import DemoSpec, write_demo_data

    images = tmp_path / "digits"
    write_demo_data(str(images), DemoSpec(per_class=6, bad=2, seed=4))
    torch.manual_seed(0)
    export_encoder(build_mae("mae_vit_micro_patch4"), str(tmp_path / "out" / "encoder.pth"))

    config = load_config(overrides=["evaluate.probe_epochs=5", "evaluate.knn_k=5"])
    result = evaluate_encoder(str(tmp_path / "out"), str(images), config)
    assert (result.num_train, result.num_test, result.num_classes) == (42, 18, 10)  # bad files skipped
    keys = list(result.as_dict())
    assert keys[:8] == [
        *("knn_accuracy", "probe_accuracy", "random_knn_accuracy", "random_probe_accuracy"),
        *("pixel_knn_accuracy", "pixel_probe_accuracy", "finetune_accuracy", "random_finetune_accuracy"),
    ]
    for key in keys[:8]:
        assert 0.0 <= result.as_dict()[key] <= 1.0, key
    assert result.feature_dim == 64 and result.model == "vit_tiny_patch16_224"
    assert result.labels == "demo truth" and result.test == "holdout 0.3"
    assert result.device == ("cuda" if torch.cuda.is_available() else "cpu")  # evaluate.device auto

    out = CliRunner().invoke(
        app,
        [
            *("evaluate", "--checkpoint", str(tmp_path / "out" / "encoder.pth"), "--data", str(images)),
            *("--set", "evaluate.probe_epochs=5"),
        ],
    )
    assert out.exit_code == 0, out.output
    for row in ("pretrained", "random init", "raw pixels", "fine-tune"):
        assert row in out.output, out.output
    missing = CliRunner().invoke(
        app, ["evaluate", "--checkpoint", str(tmp_path / "nope"), "--data", str(images)]
    )
    assert missing.exit_code == 2 and "error" in missing.output


def test_encoder_weights_must_match_the_size() -> None:
    """Evaluation loads exactly the encoder's keys: a foreign or partial state dict is refused by name."""
    from pipeline.models.checkpoint import encoder_from_state
    from pipeline.models.mae import build_mae, get_size

    size = get_size("mae_vit_micro_patch4")
    state = build_mae("mae_vit_micro_patch4").encoder_state_dict()
    loaded = encoder_from_state(size, state)
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    with pytest.raises(ValueError, match=r"unexpected \['head\.weight'\]"):
        encoder_from_state(size, {**state, "head.weight": torch.zeros(10, 64)})
    del state["norm.bias"]
    with pytest.raises(ValueError, match=r"missing \['norm\.bias'\]"):
        encoder_from_state(size, state)


def test_labeled_images_skip_bad_files_and_keep_labels_aligned(tmp_path) -> None:
    from PIL import Image

    from pipeline.evaluate import load_labeled

    folder = tmp_path / "labeled"
    for label, value in ((0, 40), (1, 200)):
        (folder / f"class{label}").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 20), (value, value, value)).save(folder / f"class{label}" / f"{i}.png")
    (folder / "class0" / "1b.png").write_bytes(b"not an image")  # between good files of class 0
    (folder / "class1" / "0a.png").write_bytes(b"")
    config = load_config()
    images, labels = load_labeled(str(folder), config, 8)
    assert images.shape == (6, 8, 8, 3) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert (images[labels == 0] == 40).all() and (images[labels == 1] == 200).all()  # each with its label

    for path in folder.rglob("*.png"):
        path.write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="no decodable labeled images"):
        load_labeled(str(folder), config, 8)


def _bar_images(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two easy classes of 32 px images: a bright vertical or horizontal bar at a random place, on noise."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(2 * n_per_class, 32, 32, 3), dtype=np.uint8)
    labels = np.repeat([0, 1], n_per_class)
    for i, label in enumerate(labels):
        at = rng.integers(4, 24)
        if label == 0:
            images[i, :, at : at + 6] = 230
        else:
            images[i, at : at + 6, :] = 230
    return images, labels


def test_pixel_baseline_separates_what_pixels_separate() -> None:
    """Flattened normalised pixels: one row per image, the encoder's input normalisation, and kNN on them
    is near perfect on images that differ in pixel space (two colours)."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 40)
    colours = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220]], dtype=np.int16)
    images = np.clip(colours[labels][:, None, None, :] + rng.integers(-40, 40, (120, 16, 16, 3)), 0, 255)
    features = pixel_features(images.astype(np.uint8))
    assert features.shape == (120, 16 * 16 * 3)
    assert float(features[0, 0]) == pytest.approx((images[0, 0, 0, 0] / 255 - 0.485) / 0.229, abs=1e-5)
    train, test = split_indices(120, 0.3, seed=0)
    y = torch.from_numpy(labels)
    assert knn_accuracy(features[train], y[train], features[test], y[test], k=5) > 0.95


def test_knn_in_chunks_equals_knn_at_once() -> None:
    x, y = _clusters(30, 4, 8, 2.0, seed=3)
    tx, ty = _clusters(25, 4, 8, 2.0, seed=4)
    assert knn_accuracy(x, y, tx, ty, k=7) == knn_accuracy(x, y, tx, ty, k=7, chunk=9)


def test_finetune_learns_an_easy_task_and_leaves_the_encoder_alone() -> None:
    images, labels = _bar_images(48, seed=0)
    train, test = split_indices(len(images), 0.25, seed=0)
    y = torch.from_numpy(labels)
    torch.manual_seed(0)
    encoder = build_mae("mae_vit_micro_patch4")
    encoder.eval()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    acc = finetune_accuracy(
        encoder, images[train], y[train], images[test], y[test], epochs=6, lr=3e-3, batch=16, seed=0
    )
    assert acc > 0.75  # chance is 0.5
    after = encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not encoder.training  # the copy was trained, not this one


def test_finetune_param_groups_decay_the_lr_toward_the_input() -> None:
    from pipeline.evaluate import finetune_param_groups

    encoder = build_mae("mae_vit_micro_patch4")  # 2 blocks: layers 0 (embeddings), 1, 2, 3 (final norm)
    head = torch.nn.Linear(64, 3)
    groups = finetune_param_groups(encoder, head, lr=1.0, layer_decay=0.5)
    lrs = sorted({g["lr"] for g in groups})
    assert lrs == [0.125, 0.25, 0.5, 1.0]
    params = {id(p) for g in groups for p in g["params"]}
    assert id(head.weight) in params and id(encoder.patch_embed.proj.weight) in params
    assert id(encoder.pos_embed) not in params  # fixed sin-cos
    assert not any(id(p) in params for p in encoder.decoder_embed.parameters())
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(encoder.cls_token) in no_decay and id(head.bias) in no_decay and id(head.weight) not in no_decay


def test_labels_come_from_demo_truth_not_the_noisy_folders(tmp_path) -> None:
    """Half the images sit in a wrong class folder; evaluation reads their true class from _truth.parquet,
    and a test folder given apart is the test split, indexed by the same class names."""
    import pandas as pd

    from pipeline.demo_data import DemoSpec, write_demo_data
    from pipeline.evaluate import load_labeled, load_split

    noisy, clean = tmp_path / "noisy", tmp_path / "clean"
    write_demo_data(str(noisy), DemoSpec(sources=("shapes",), per_class=6, noise=0.5, seed=1))
    write_demo_data(str(clean), DemoSpec(sources=("shapes",), per_class=3, seed=2))
    truth = pd.read_parquet(noisy / "_truth.parquet").sort_values("path")
    assert truth["noisy"].sum() > 5
    config = load_config()
    _, labels = load_labeled(str(noisy), config, 16)
    assert labels.tolist() == truth["true_label"].tolist()  # not given_label

    moved = tmp_path / "moved"  # truth rows are matched by <class>/<file>, wherever the folder now is
    noisy.rename(moved)
    split = load_split(str(moved), load_config(overrides=[f"evaluate.test_data={clean}"]), 16)
    assert split.labels == "demo truth" and split.test == str(clean)
    assert (len(split.train_labels), len(split.test_labels)) == (36, 18)
    assert sorted(split.train_labels.tolist()) == sorted(truth["true_label"].tolist())
    assert split.classes == sorted(["circle", "square", "triangle", "cross", "ring", "stripes"])
    assert np.bincount(split.test_labels).tolist() == [3] * 6

    (moved / "_truth.parquet").unlink()  # without truth: the folder names, noise and all
    _, folder_labels = load_labeled(str(moved), config, 16)
    assert folder_labels.tolist() == truth["given_label"].tolist()


def test_an_image_table_given_as_evaluation_data_says_to_curate_it_first(tmp_path) -> None:
    """Any .parquet was read as a manifest: an image table failed with a KeyError (a bug, not the user's)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.core.errors import UserInputError
    from pipeline.evaluate import labeled_names

    table = tmp_path / "images.parquet"
    pq.write_table(pa.table({"image": [b"\x89PNG"], "label": [0]}), table)
    with pytest.raises(UserInputError, match="curate an image table or shards first"):
        labeled_names(str(table), load_config(None))


def test_device_auto_is_the_cpu_without_cuda_and_cuda_without_a_gpu_says_how_to_fix(monkeypatch) -> None:
    """`evaluate.device`: auto falls back to the CPU; an explicit cuda on a machine without one is the
    user's to fix (exit 2, naming --set evaluate.device=cpu), before any image is decoded."""
    from pipeline.core.config import ConfigError
    from pipeline.core.errors import UserInputError
    from pipeline.evaluate import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert load_config().evaluate.device == "auto"
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserInputError, match=r"--set evaluate\.device=cpu"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match=r"evaluate\.device"):
        load_config(overrides=["evaluate.device=tpu"])
    config = load_config(overrides=["evaluate.device=cuda"])
    with pytest.raises(UserInputError, match=r"--set evaluate\.device=cpu"):
        evaluate_encoder("/nonexistent/encoder.pth", "/nonexistent/images", config)


def test_probes_on_an_explicit_device_give_the_numbers_of_the_default_path() -> None:
    """The device path (features moved once, votes and the correct count kept on the device, batch orders
    drawn on the CPU) run on CPU tensors here: the same accuracies as without a device, to the bit."""
    from pipeline.evaluate import evaluate_features

    cpu = torch.device("cpu")
    x, y = _clusters(40, 5, 16, 2.0, seed=0)
    tx, ty = _clusters(20, 5, 16, 2.0, seed=1)
    assert knn_accuracy(x, y, tx, ty, k=7, device=cpu) == knn_accuracy(x, y, tx, ty, k=7)
    assert knn_accuracy(x, y, tx, ty, k=7, chunk=9, device=cpu) == knn_accuracy(x, y, tx, ty, k=7)
    probe = linear_probe_accuracy(x, y, tx, ty, epochs=5, lr=0.1, batch=32, seed=3)
    assert linear_probe_accuracy(x, y, tx, ty, epochs=5, lr=0.1, batch=32, seed=3, device=cpu) == probe
    config = load_config(overrides=["evaluate.knn_k=7", "evaluate.probe_epochs=5"])
    assert evaluate_features(x, y, tx, ty, config, cpu) == evaluate_features(x, y, tx, ty, config)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_probes_and_finetune_on_cuda_agree_with_the_cpu() -> None:
    """On a GPU: kNN in float32 matches the CPU but for near ties, the probe (same init and batch orders)
    lands close, and the bf16 fine-tune learns the easy task as on the CPU."""
    cuda = torch.device("cuda")
    x, y = _clusters(40, 5, 16, 2.0, seed=0)
    tx, ty = _clusters(20, 5, 16, 2.0, seed=1)
    assert knn_accuracy(x, y, tx, ty, k=7, device=cuda) == pytest.approx(
        knn_accuracy(x, y, tx, ty, k=7), abs=0.02
    )
    assert linear_probe_accuracy(x, y, tx, ty, epochs=5, device=cuda) == pytest.approx(
        linear_probe_accuracy(x, y, tx, ty, epochs=5), abs=0.05
    )
    images, labels = _bar_images(48, seed=0)
    train, test = split_indices(len(images), 0.25, seed=0)
    yy = torch.from_numpy(labels)
    torch.manual_seed(0)
    encoder = build_mae("mae_vit_micro_patch4").eval()
    acc = finetune_accuracy(
        encoder, images[train], yy[train], images[test], yy[test], epochs=6, lr=3e-3, batch=16, device=cuda
    )
    assert acc > 0.75
