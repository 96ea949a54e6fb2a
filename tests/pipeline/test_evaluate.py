"""Frozen-encoder evaluation: weighted kNN, linear probe, architecture from a state dict, and a pretrained
encoder beating its random initialisation on the demo digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core.config import load_config
from pipeline.evaluate import (
    evaluate_encoder,
    knn_accuracy,
    linear_probe_accuracy,
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
    for value in (result.knn_accuracy, result.probe_accuracy, result.random_knn_accuracy):
        assert 0.0 <= value <= 1.0
    assert result.feature_dim == 64 and result.model == "vit_tiny_patch16_224"

    out = CliRunner().invoke(
        app,
        [
            *("evaluate", "--checkpoint", str(tmp_path / "out" / "encoder.pth"), "--data", str(images)),
            *("--set", "evaluate.probe_epochs=5"),
        ],
    )
    assert out.exit_code == 0, out.output
    assert "pretrained" in out.output and "random init" in out.output
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
