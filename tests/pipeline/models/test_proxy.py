"""pipeline/models/proxy.py: the proxies' models and their training over windows of rows."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from pipeline.models.proxy import ArrayWindows, ProxySpec, build_proxy, train_proxy


def test_resnet_stem_follows_the_image_size() -> None:
    """The CIFAR stem at small sizes (a 32 px image would be 1×1 after two ImageNet-stem stages), the
    ImageNet stem above 64 px; both give D = 512 features."""
    small, large = build_proxy("resnet18", 10, 32), build_proxy("resnet18", 10, 96)
    assert small.body.conv1.kernel_size == (3, 3) and isinstance(small.body.maxpool, nn.Identity)
    assert large.body.conv1.kernel_size == (7, 7) and not isinstance(large.body.maxpool, nn.Identity)
    for model, size in ((small, 32), (large, 96)):
        x = torch.randn(2, 3, size, size)
        assert model.features(x).shape == (2, 512) and model(x).shape == (2, 10)


class RecordingWindows(ArrayWindows):
    """`ArrayWindows` that records the largest window it handed out."""

    def __init__(self, images: np.ndarray, size: int) -> None:
        super().__init__(images, size)
        self.largest = 0

    def windows(self, generator: torch.Generator | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for rows, images in super().windows(generator):
            self.largest = max(self.largest, len(rows))
            yield rows, images


def test_a_proxy_learns_from_windows_and_counts_forgetting() -> None:
    """Two classes a proxy tells apart at once (dark vs bright images): the loss falls, every row gets a
    forgetting count, and no step saw more than one window of rows."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 64)
    images = np.where(labels[:, None, None, None] == 1, 200, 40) + rng.integers(
        -30, 30, size=(128, 16, 16, 3)
    )
    windows = RecordingWindows(images.clip(0, 255).astype(np.uint8), size=32)
    spec = ProxySpec("cnn-small", 2, epochs=4, batch_size=16, lr=0.05, weight_decay=0.0, augment=True)
    result = train_proxy(windows, labels, spec, seed=0)
    assert result.losses[-1] < result.losses[0]
    assert result.forgetting.shape == (128,) and (result.forgetting >= 0).all()
    assert windows.largest == 32
    again = train_proxy(
        RecordingWindows(windows.images, size=32), labels, spec, seed=0
    )  # same seed, same run
    assert again.losses == result.losses


def test_a_resumed_proxy_ends_as_the_uninterrupted_one() -> None:
    """Stopped after any epoch and resumed from what `on_epoch` handed out (as a Ray Train job resumes from
    its checkpoint), a proxy ends with the same weights, forgetting counts and losses as a run that never
    stopped: the data order, shifts, momentum and counts all carry over."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, size=96)
    images = rng.integers(0, 256, size=(96, 12, 12, 3), dtype=np.uint8)
    spec = ProxySpec("cnn-small", 3, epochs=3, batch_size=16, lr=0.05, weight_decay=5e-4, augment=True)
    saved = []
    straight = train_proxy(ArrayWindows(images, size=40), labels, spec, seed=4, on_epoch=saved.append)
    assert [s.epoch for s in saved] == [1, 2, 3]
    assert saved[-1].losses == straight.losses
    for stop in saved[:2]:
        resumed = train_proxy(ArrayWindows(images, size=40), labels, spec, seed=4, resume=stop)
        assert resumed.losses == straight.losses
        np.testing.assert_array_equal(resumed.forgetting, straight.forgetting)
        for name, value in straight.state.items():
            assert torch.equal(resumed.state[name], value), name


def test_training_a_proxy_gives_the_caller_its_thread_count_back() -> None:
    """A proxy trained in a driver (the experiment's supervised anchor) ran the driver's later fine-tunes
    on one thread; torch's count is process-wide, so `train_proxy` must restore it."""
    labels = np.repeat([0, 1], 8)
    images = np.random.default_rng(2).integers(0, 256, size=(16, 12, 12, 3), dtype=np.uint8)
    spec = ProxySpec(
        "cnn-small", 2, epochs=1, batch_size=8, lr=0.05, weight_decay=0.0, augment=False, threads=1
    )
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        train_proxy(ArrayWindows(images, size=16), labels, spec, seed=0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
