"""Batch augmentation on the training device: random resized crop + flip computed on (N, 3, H, W) tensors.

On CPU tensors here (CI has no GPU); the same code runs on the GPU batch in a Train worker."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.models.augment import BatchAugment, CropBoxes, resized_crops, sample_crops, to_device

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _coordinates(n: int, side: int) -> torch.Tensor:
    """(N, 3, side, side): channel 0 holds each pixel's column, channel 1 its row, channel 2 the sample."""
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    one = torch.stack([xs, ys, torch.zeros_like(xs)]).double()
    out = one.expand(n, -1, -1, -1).clone()
    out[:, 2] = torch.arange(n).double().view(n, 1, 1)
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_shapes_dtypes_and_device(device: str) -> None:
    images = torch.rand(5, 3, 40, 48, device=device)
    out = BatchAugment(32, scale_min=0.2, flip_p=0.5, seed=0)(images)
    assert out.shape == (5, 3, 32, 32) and out.dtype == images.dtype and out.device == images.device
    half = BatchAugment(32, seed=0)(images.half() if device == "cuda" else images.double())
    assert half.dtype == (torch.float16 if device == "cuda" else torch.float64)
    # off: an image of the right side passes untouched; another side is resized (whole image, no flip)
    same = torch.rand(2, 3, 32, 32, device=device)
    assert BatchAugment(32, enabled=False)(same) is same
    assert BatchAugment(16, enabled=False)(same).shape == (2, 3, 16, 16)


def test_whole_image_without_flip_is_the_identity() -> None:
    images = torch.rand(4, 3, 32, 32) * 255
    whole = CropBoxes(
        torch.tensor([[0.0, 0.0, 32.0, 32.0]]).double().expand(4, -1), torch.zeros(4, dtype=torch.bool)
    )
    assert torch.allclose(resized_crops(images, whole, 32), images, atol=1e-4)
    # scale_min 1 and flip_p 0: every box is the whole image
    assert torch.allclose(BatchAugment(32, scale_min=1.0, flip_p=0.0, seed=3)(images), images, atol=1e-4)


def test_flip_is_the_exact_mirror_of_the_same_crop() -> None:
    images = torch.rand(6, 3, 32, 32)
    crops = sample_crops(6, 32, 32, 0.3, flip_p=0.0, generator=torch.Generator().manual_seed(1))
    plain = resized_crops(images, crops, 24)
    flipped = resized_crops(images, CropBoxes(crops.boxes, torch.ones(6, dtype=torch.bool)), 24)
    assert torch.equal(flipped, plain.flip(-1))
    assert 0 < int(BatchAugment(8, flip_p=0.5, seed=0).crops(1000, 32, 32).flip.sum()) < 1000


def test_crop_boxes_stay_inside_the_image_and_within_the_scale_and_ratio_ranges() -> None:
    crops = sample_crops(20_000, 32, 48, 0.2, 0.5, torch.Generator().manual_seed(0))
    left, top, w, h = crops.boxes.unbind(1)
    assert (left >= 0).all() and (top >= 0).all() and (left + w <= 48).all() and (top + h <= 32).all()
    share = w * h / (32 * 48)
    assert share.max() <= 1.0 and share.min() >= 0.18  # [0.2, 1] up to rounding to whole pixels
    assert share.min() < 0.22 and share.max() > 0.85  # the range is used (4/3 wide at most: 0.9 of 32×48)
    aspect = w / h
    assert aspect.min() >= 0.70 and aspect.max() <= 1.43  # [3/4, 4/3] up to rounding
    assert 0.45 < crops.flip.double().mean() < 0.55


def test_the_crop_seen_in_the_pixels_is_the_box_drawn() -> None:
    """A coordinate image: each output pixel says where in the input it was sampled, so the output spans
    exactly the drawn box (bilinear interpolation of a linear ramp is exact)."""
    n, side, size = 64, 32, 32
    augment = BatchAugment(size, scale_min=0.25, flip_p=0.5, seed=7)
    crops = augment.crops(n, side, side)
    augment.generator.manual_seed(7)  # the same draw again, through __call__
    out = augment(_coordinates(n, side))
    left, top, w, h = crops.boxes.unbind(1)
    # pixel centres: output i samples left + (i + 0.5) * w / size - 0.5, clamped at the image's edge
    for i in range(n):
        xs = (left[i] + (torch.arange(size) + 0.5) * w[i] / size - 0.5).clamp(0, side - 1)
        ys = (top[i] + (torch.arange(size) + 0.5) * h[i] / size - 0.5).clamp(0, side - 1)
        row = out[i, 0, 0]
        assert torch.allclose(row.flip(-1) if crops.flip[i] else row, xs.double(), atol=1e-4)
        assert torch.allclose(out[i, 1, :, 0], ys.double(), atol=1e-4)
        assert torch.allclose(out[i, 2], torch.full_like(out[i, 2], i))  # each image keeps its own pixels
        share = float(w[i] * h[i]) / side**2
        assert 0.23 <= share <= 1.0


def test_same_seed_same_crops_other_seed_other_crops() -> None:
    images = torch.rand(8, 3, 32, 32)
    a = [BatchAugment(32, 0.2, 0.5, seed=11)(images) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    one = BatchAugment(32, 0.2, 0.5, seed=11)
    first, second = one(images), one(images)  # one augmenter: each batch gets fresh crops
    assert torch.equal(first, a[0]) and not torch.equal(first, second)
    assert not torch.equal(BatchAugment(32, 0.2, 0.5, seed=12)(images), a[0])


def test_matches_pil_box_resize() -> None:
    """The crop maps pixel centres as PIL's `resize(box=...)` does (the CPU augmentation this replaced)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    left, top, w, h = 5, 7, 20, 15
    pil = Image.fromarray(image).resize(
        (32, 32), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h)
    )
    crop = CropBoxes(torch.tensor([[left, top, w, h]], dtype=torch.float64), torch.zeros(1, dtype=torch.bool))
    ours = resized_crops(torch.from_numpy(image).permute(2, 0, 1)[None].double(), crop, 32)[0]
    assert np.abs(ours.permute(1, 2, 0).numpy() - np.asarray(pil, dtype=np.float64)).max() < 1.0


def test_to_device_leaves_a_tensor_on_its_device_alone() -> None:
    t = torch.arange(4)
    assert to_device(t, torch.device("cpu")) is t
