"""Training augmentation on a batch tensor, on whatever device the batch is on: random resized crop + flip.

    BatchAugment(size, scale_min, flip_p, seed)(images)    # images (N, 3, H, W) float → (N, 3, size, size)

The CPUs only read and decode; the crops run where the model trains, in one `grid_sample` over the batch.
Crop boxes are drawn as torchvision's `RandomResizedCrop` draws them: area share uniform in
[scale_min, 1], aspect ratio log-uniform in [3/4, 4/3], up to 10 tries per image, else the largest
centred box of an allowed aspect ratio (the whole image when it is square); the box's position is uniform
over the places it fits. The box is resized bilinearly to `size` × `size`
(pixel centers map as in PIL's `resize(box=...)`: `align_corners=False`, edges replicated), then mirrored
left-right with probability `flip_p` (an exact mirror: `flip(-1)` of the same crop).

The random numbers come from the augmenter's own seeded CPU generator (a few per image, so the draw costs
nothing) and reach the device pinned and non-blocking: the same seed gives the same crops on CPU and GPU,
and nothing waits for the device. Bilinear interpolation commutes with per-channel normalisation, so the
batch may be normalised before or after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)  # aspect ratios (width / height) of the crop box, as torchvision's
TRIES = 10  # box draws per image before falling back to the whole image, as torchvision's


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; a host tensor bound for CUDA goes pinned and non-blocking, so the host does not
    wait for the copy (a plain `.to("cuda")` of pageable memory synchronises the stream)."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@dataclass(frozen=True)
class CropBoxes:
    """One crop per image of a batch, in input pixels: `boxes` (N, 4) float64 as (left, top, width, height),
    integers, inside the image; `flip` (N,) bool, True = mirror left-right."""

    boxes: torch.Tensor
    flip: torch.Tensor


def sample_crops(
    n: int,
    height: int,
    width: int,
    scale_min: float,
    flip_p: float,
    generator: torch.Generator | None = None,
    ratio: tuple[float, float] = RATIO_RANGE,
) -> CropBoxes:
    """Draw `n` crop boxes of a `height` × `width` image (see the module docstring), on the CPU."""
    area = float(height * width)
    u = torch.rand(n, TRIES, 2, generator=generator, dtype=torch.float64)
    share = scale_min + (1.0 - scale_min) * u[..., 0]  # (N, TRIES) area share
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])  # width / height
    w = torch.round(torch.sqrt(area * share * aspect))
    h = torch.round(torch.sqrt(area * share / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (N, TRIES)
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)  # the first try that fits (0 when none does)
    found = fits.any(dim=1)
    # None fits: the largest box of an allowed aspect ratio, centred (torchvision's fallback)
    fallback_w, fallback_h = float(width), float(height)
    if width / height < ratio[0]:
        fallback_h = float(round(width / ratio[0]))
    elif width / height > ratio[1]:
        fallback_w = float(round(height * ratio[1]))
    w = torch.where(found, w.gather(1, first).squeeze(1), fallback_w)
    h = torch.where(found, h.gather(1, first).squeeze(1), fallback_h)
    place = torch.rand(n, 3, generator=generator, dtype=torch.float64)
    left = torch.floor(place[:, 0] * (width - w + 1)).clamp_max(width - w)  # uniform over the fits
    top = torch.floor(place[:, 1] * (height - h + 1)).clamp_max(height - h)
    left = torch.where(found, left, float((width - fallback_w) // 2))
    top = torch.where(found, top, float((height - fallback_h) // 2))
    return CropBoxes(boxes=torch.stack([left, top, w, h], dim=1), flip=place[:, 2] < flip_p)


def crop_thetas(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, 4) boxes (left, top, width, height) → (N, 2, 3) affine matrices for `F.affine_grid` with
    `align_corners=False`: output pixel i of S samples input x = left + (i + 0.5) · width / S − 0.5."""
    left, top, w, h = boxes.unbind(dim=1)
    zero = torch.zeros_like(left)
    row_x = torch.stack([w / width, zero, (2 * left + w) / width - 1], dim=1)
    row_y = torch.stack([zero, h / height, (2 * top + h) / height - 1], dim=1)
    return torch.stack([row_x, row_y], dim=1)


def resized_crops(images: torch.Tensor, crops: CropBoxes, size: int) -> torch.Tensor:
    """images (N, C, H, W) float → (N, C, size, size): each image's box resized bilinearly, then mirrored
    where `crops.flip`. Runs on `images.device`; the boxes may be on the CPU."""
    n, c, height, width = images.shape
    thetas = to_device(crop_thetas(crops.boxes, height, width).to(images.dtype), images.device)
    grid = F.affine_grid(thetas, [n, c, size, size], align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    flip = to_device(crops.flip, images.device).view(n, 1, 1, 1)
    return torch.where(flip, out.flip(-1), out)


class BatchAugment:
    """Random resized crop + horizontal flip for whole batches (see the module docstring); seeded, so one
    worker's sequence of crops is reproducible. With `enabled` off, images of another side than `size`
    are only resized (whole image, no flip), and images of that side pass through untouched."""

    def __init__(
        self, size: int, scale_min: float = 0.2, flip_p: float = 0.5, seed: int = 0, enabled: bool = True
    ) -> None:
        assert 0.0 < scale_min <= 1.0, f"scale_min must be in (0, 1], got {scale_min}"
        self.size = size
        self.scale_min = scale_min
        self.flip_p = flip_p
        self.enabled = enabled
        self.generator = torch.Generator().manual_seed(seed)

    def crops(self, n: int, height: int, width: int) -> CropBoxes:
        """The next `n` crop boxes for images of `height` × `width` (advances the generator)."""
        return sample_crops(n, height, width, self.scale_min, self.flip_p, self.generator)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, H, W) float, on any device → (N, 3, size, size) on the same device."""
        n, _, height, width = images.shape
        if not self.enabled:
            if (height, width) == (self.size, self.size):
                return images
            whole = torch.tensor([[0.0, 0.0, width, height]], dtype=torch.float64).expand(n, -1)
            return resized_crops(images, CropBoxes(whole, torch.zeros(n, dtype=torch.bool)), self.size)
        return resized_crops(images, self.crops(n, height, width), self.size)
