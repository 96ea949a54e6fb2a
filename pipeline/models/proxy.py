"""Proxy classifiers: the small models that scoring trains briefly to tell easy examples from hard ones.

A proxy is split as `body` (images → features h) and a linear `head` (h → logits): GraNd's closed form and
the prototype embeddings need the features. `train_proxy` trains one for a few epochs (SGD, constant lr,
as Paul et al. 2021 score mid-training) and counts forgetting events on the way, reading its images window
by window (`RowWindows`: no process holds them all); `stages.score` trains K of them as Ray tasks or Ray
Train jobs (`stages.proxy_jobs`), on CPUs or GPUs, and scores every example with them.

Two tasks: `labels` (the given classes) and `rotation` (label-free: predict which of `ROTATIONS` quarter
turns was applied, for the prototype score).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.config import ScoreConfig
from pipeline.core.errors import UserInputError

ROTATIONS = 4  # label-free proxy task: predict k in rot90(x, k)


# ---------------------------------------------------------------------------------------------- models


class ProxyNet(nn.Module):
    """A classifier split as `body` (images → features h, (N, D)) and a linear `head` (h → logits, (N, C)).

    The split is what GraNd's closed form and the prototype embeddings need.
    """

    def __init__(self, body: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, S, S) normalised floats → h: (N, D)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3, S, S) → logits (N, C)."""
        return self.head(self.features(x))


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


SMALL_IMAGE_PX = 64  # up to this size a ResNet proxy gets the CIFAR stem


def build_proxy(name: str, num_classes: int, image_size: int | None = None) -> ProxyNet:
    """`cnn-small`: a stride-2 stem and 2 conv blocks (16-32-64 channels, ~25k weights, ~0.7M
    multiply-adds at 32×32), global average pool, D = 64: K of them train on a laptop's cores in seconds.
    `resnet18`: timm's ResNet-18 trunk (random init), D = 512, with the ImageNet stem (7×7 stride-2 conv and
    a max-pool: 32× down by the last stage) above `SMALL_IMAGE_PX`, and at or below it (or with no size
    given) the CIFAR stem (3×3 stride-1 conv, no pool), since the ImageNet one leaves a 32 px image 1×1
    after the second stage."""
    if name == "cnn-small":
        body = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False),  # (N, 16, S/2, S/2)
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # S/4
            _conv_block(16, 32),
            nn.MaxPool2d(2),  # S/8
            _conv_block(32, 64),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),  # (N, 64)
        )
        return ProxyNet(body, 64, num_classes)
    if name == "resnet18":
        import timm

        trunk = timm.create_model("resnet18", pretrained=False, num_classes=0)
        if image_size is None or image_size <= SMALL_IMAGE_PX:
            trunk.conv1 = nn.Conv2d(3, trunk.conv1.out_channels, 3, stride=1, padding=1, bias=False)
            trunk.maxpool = nn.Identity()
        return ProxyNet(trunk, trunk.num_features, num_classes)
    raise UserInputError(f"unknown score.model {name!r}; expected cnn-small or resnet18")


def to_input(images: np.ndarray) -> torch.Tensor:
    """(N, S, S, 3) uint8 → (N, 3, S, S) float32 roughly centred: (x/255 − 0.5) / 0.25."""
    x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float()  # the one copy, then in place
    return x.div_(255.0).sub_(0.5).div_(0.25)


def random_shift(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Translate each image by up to ±`pad` pixels (reflect padding): cheap augmentation, no flips
    (a flipped digit is another digit)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, x.shape[1], h, w + 2 * pad)
    out = padded.gather(2, rows)  # (N, 3, H, W+2p)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, x.shape[1], h, w)
    return out.gather(3, cols)  # (N, 3, H, W)


def rotate(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Rotate image i of x (N, 3, S, S) by k[i] quarter turns."""
    out = x.clone()
    for quarter in range(1, ROTATIONS):
        idx = (k == quarter).nonzero(as_tuple=True)[0]
        if len(idx):
            out[idx] = torch.rot90(x[idx], quarter, dims=(2, 3))
    return out


# ---------------------------------------------------------------------------------------------- training


class RowWindows(Protocol):
    """Where a proxy reads its images: windows of rows, fetched one at a time (`stages.pixels`), so that no
    process holds every image. Together the windows of one pass cover every row once."""

    def __len__(self) -> int: ...

    def windows(self, generator: torch.Generator | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(rows (n,) int64, images (n, S, S, 3) uint8) per window; in a random order drawn from
        `generator`, rows shuffled within each window, or in row order when it is None."""
        ...


class ArrayWindows:
    """`RowWindows` over images already in memory (a laptop-sized set, an experiment, a test), in windows of
    `size` rows."""

    def __init__(self, images: np.ndarray, size: int = 4096) -> None:
        self.images, self.size = images, size

    def __len__(self) -> int:
        return len(self.images)

    def windows(self, generator: torch.Generator | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        n = len(self.images)
        order = torch.randperm(n, generator=generator).numpy() if generator is not None else np.arange(n)
        for start in range(0, n, self.size):
            rows = order[start : start + self.size]
            yield rows, self.images[rows]


@dataclass(frozen=True)
class ProxySpec:
    """What a proxy-training task needs from the config (small and picklable)."""

    model: str
    num_classes: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    augment: bool
    task: str = "labels"  # labels | rotation (label-free)
    threads: int = 1
    device: str = "cpu"  # cuda with score.use_gpu: the proxy trains and scores there, in bf16
    image_size: int | None = None  # the decoded size (picks a ResNet's stem)

    @classmethod
    def from_config(
        cls, config: ScoreConfig, num_classes: int, task: str = "labels", image_size: int | None = None
    ) -> ProxySpec:
        return cls(
            model=config.model,
            num_classes=ROTATIONS if task == "rotation" else num_classes,
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            weight_decay=config.weight_decay,
            augment=config.augment,
            task=task,
            threads=max(1, math.floor(config.cpus_per_model)),
            device="cuda" if config.use_gpu else "cpu",
            image_size=image_size,
        )

    def build(self) -> ProxyNet:
        """A fresh proxy of this spec (random init, on the CPU)."""
        return build_proxy(self.model, self.num_classes, self.image_size)

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """bf16 autocast on a GPU; nothing on CPU (fp32 there: CPU bf16 is slow and changes the scores)."""
        if self.device == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


@dataclass
class ProxyResult:
    seed: int
    state: dict[str, torch.Tensor]  # the trained weights (CPU)
    forgetting: np.ndarray  # (N,) forgetting events per example (NaN for the rotation task)
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch
    resumed_from: int = 0  # epochs a stopped run had done when this one went on from them (0: from scratch)


@dataclass
class ProxyTraining:
    """Where one proxy's training stands after `epoch` epochs: everything needed to go on exactly as if it
    had not stopped (the weights, the optimizer's momentum, the data-order generator and the forgetting
    counts), saved in a checkpoint after every epoch when the proxy trains as a Ray Train job."""

    epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict
    generator: torch.Tensor  # torch.Generator.get_state(): the next epoch's window order, shifts, rotations
    last_correct: torch.Tensor  # (N,) bool
    ever_correct: torch.Tensor  # (N,) bool
    events: torch.Tensor  # (N,) int64 forgetting events so far
    losses: list[float]


def train_proxy(
    images: RowWindows,
    labels: np.ndarray,
    spec: ProxySpec,
    seed: int,
    resume: ProxyTraining | None = None,
    on_epoch: Callable[[ProxyTraining], None] | None = None,
) -> ProxyResult:
    """Train one proxy for `spec.epochs` epochs (SGD, momentum 0.9, constant lr) and count forgetting.

    images: the N rows' uint8 pixels, read window by window (each epoch visits the windows in a new random
    order and shuffles the rows within each); labels: (N,) int64 in [0, C). Forgetting follows Toneva et
    al.: each time an example is in a minibatch its (train-mode) correctness is recorded; a correct →
    incorrect step is one event. Examples never predicted correctly get `epochs` events.

    `on_epoch` gets a `ProxyTraining` after every epoch (a Ray Train job checkpoints it); given one as
    `resume`, training goes on from its epoch and ends as the uninterrupted run would (same result on CPU).
    torch runs `spec.threads` intra-op threads while it trains, and the caller's count after.
    """
    with intra_op_threads(spec.threads):
        return _train_proxy(images, labels, spec, seed, resume, on_epoch)


@contextlib.contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count is process-wide: set it for the block, then give the caller back its
    own (a proxy trained in a driver must not leave the rest of the driver on one thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_proxy(
    images: RowWindows,
    labels: np.ndarray,
    spec: ProxySpec,
    seed: int,
    resume: ProxyTraining | None,
    on_epoch: Callable[[ProxyTraining], None] | None,
) -> ProxyResult:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = torch.device(spec.device)
    model = spec.build().to(device)
    opt = torch.optim.SGD(
        model.parameters(), lr=spec.lr, momentum=0.9, nesterov=True, weight_decay=spec.weight_decay
    )
    y_all = torch.from_numpy(np.array(labels, dtype=np.int64))  # a writable copy
    n = len(images)
    last_correct = torch.zeros(n, dtype=torch.bool)
    ever_correct = torch.zeros(n, dtype=torch.bool)
    events = torch.zeros(n, dtype=torch.int64)
    losses: list[float] = []
    first_epoch = 0
    if resume is not None:
        model.load_state_dict(resume.model)
        opt.load_state_dict(resume.optimizer)
        gen.set_state(resume.generator)
        last_correct, ever_correct, events = resume.last_correct, resume.ever_correct, resume.events
        losses, first_epoch = list(resume.losses), resume.epoch
    model.train()
    for epoch in range(first_epoch, spec.epochs):
        total, count = torch.zeros((), device=device), 0
        for rows, pixels in images.windows(gen):
            for start in range(0, len(rows), spec.batch_size):
                idx = torch.from_numpy(rows[start : start + spec.batch_size])
                if len(idx) < 2:  # BatchNorm needs two samples
                    continue
                x = to_input(pixels[start : start + spec.batch_size])  # floats for one batch only
                if spec.augment:
                    x = random_shift(x, gen)
                if spec.task == "rotation":
                    y = torch.randint(0, ROTATIONS, (len(idx),), generator=gen)
                    x = rotate(x, y)
                else:
                    y = y_all[idx]
                x, y_dev = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with spec.autocast():
                    logits = model(x)
                    loss = F.cross_entropy(logits.float(), y_dev)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                correct = (logits.detach().argmax(1) == y_dev).cpu()
                events[idx] += (last_correct[idx] & ~correct).long()
                last_correct[idx] = correct
                ever_correct[idx] |= correct
                total += loss.detach() * len(idx)
                count += len(idx)
        mean = float(total) / max(count, 1)  # one host sync per epoch
        if not math.isfinite(mean):
            raise FloatingPointError(f"proxy seed {seed}: non-finite loss {mean}; lower score.lr")
        losses.append(mean)
        if on_epoch is not None:
            on_epoch(
                ProxyTraining(  # copies: training goes on changing the live tensors in place
                    epoch + 1,
                    cpu_state(model),
                    copy.deepcopy(opt.state_dict()),
                    gen.get_state(),
                    last_correct.clone(),
                    ever_correct.clone(),
                    events.clone(),
                    list(losses),
                )
            )
    recompute_batchnorm(model, images, spec)
    forgetting = events.double().numpy()
    forgetting[~ever_correct.numpy()] = spec.epochs
    if spec.task == "rotation":
        forgetting[:] = np.nan
    return ProxyResult(seed, cpu_state(model), forgetting, losses, resume.epoch if resume else 0)


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the model's weights and buffers."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, images: RowWindows, spec: ProxySpec) -> None:
    """Set BatchNorm running statistics to the exact mean/var of the final weights' activations over every
    image (unaugmented, one pass in row order). A few epochs at a high learning rate leave the running
    averages behind the weights, and eval-mode scores (EL2N is computed in eval mode) would then describe a
    different network."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    device = torch.device(spec.device)
    for _, pixels in images.windows(None):
        for start in range(0, len(pixels), spec.batch_size):
            chunk = to_input(pixels[start : start + spec.batch_size])
            if len(chunk) > 1:  # a 1×1 feature map of one image has no variance (BatchNorm raises)
                with spec.autocast():
                    model(chunk.to(device, non_blocking=True))
    for m in norms:
        m.momentum = 0.1
    model.eval()
