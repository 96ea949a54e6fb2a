"""Demo data: a labeled image folder (`<root>/<class>/<name>.png|jpg`) written offline to any fsspec URL.

Sources, all shipped with installed packages or generated:
- `digits`: scikit-learn's 8×8 handwritten digits (1,797 of them), upscaled, with a random grey-level pair
  (ink and paper), shift and a little noise per copy; classes `digit_0` … `digit_9`. The pair is grey, not
  coloured: a random hue per image is what any pixel-reconstruction objective (MAE) learns to encode first,
  and it then drowns the digit's shape in the encoder's features (measured: kNN at chance after training).
- `shapes`: procedurally drawn shapes (circle, square, triangle, cross, ring, stripes) of random size,
  position and colour.
- `photos`: random crops of scikit-image's sample photos; the class is the photo.
- `fashion`: Fashion-MNIST's real 28×28 grey photos of clothing (Zalando, MIT licence), read from the IDX
  files of the Debian package `dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`; folder
  `/usr/share/datasets/fashion-mnist`, or `$MASKDIET_FASHION_MNIST`); classes `T-shirt_top` … `Ankle_boot`.
  The official split stays apart (`split`: train, 6,000 a class; test, 1,000 a class): the first `per_class`
  of each class in the file's order, written at their own 28 px unless `size` is given, named after their
  row in the IDX file. It is a source of its own: not mixed with the generated ones.

`noise` moves that fraction of images into a wrong class folder and records the truth in `_truth.parquet`
(path, true_label, true_class, given_label, noisy): evaluation reads the true labels from it. `bad` adds that many bad files (empty, random bytes, text, HTML,
truncated JPEG/PNG, a PNG declaring 50,000² pixels) listed in `_bad.parquet` with the quarantine reason each
should get. Sidecar names start with `_`, which listing skips. Output is deterministic for a seed.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from pipeline.core.errors import UserInputError
from pipeline.core.runs import TRUTH_NAME
from pipeline.core.storage import join, to_url, url_to_fs

log = logging.getLogger(__name__)

SOURCES = ("digits", "shapes", "photos", "fashion")
GENERATED = ("digits", "shapes", "photos")  # drawn per image from a seed; `fashion` is read from files
SPLITS = ("train", "test")
# Fashion-MNIST's labels 0-9, as folder names ("T-shirt/top" holds a slash)
FASHION_CLASSES = (
    "T-shirt_top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle_boot",
)
FASHION_DIR = "/usr/share/datasets/fashion-mnist"  # where the Debian package puts the IDX files
FASHION_DIR_ENV = "MASKDIET_FASHION_MNIST"  # another folder with the same files
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SHAPES = ("circle", "square", "triangle", "cross", "ring", "stripes")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")
BAD_KINDS = (
    ("empty.jpg", "empty"),
    ("random.jpg", "not-an-image"),
    ("notes.png", "not-an-image"),
    ("error-page.jpg", "not-an-image"),
    ("truncated.jpg", "truncated"),
    ("truncated.png", "truncated"),
    ("bomb.png", "too-large"),
)


@dataclass(frozen=True)
class DemoSpec:
    sources: tuple[str, ...] = ("digits",)
    per_class: int = 200  # images per class (fashion: at most this many, from the files)
    size: int | None = None  # side of each image in pixels; None: 32 (fashion: its own 28)
    noise: float = 0.0  # fraction moved to a wrong class folder
    bad: int = 0  # bad files added
    image_format: str = "mixed"  # png | jpg | mixed
    seed: int = 0
    split: str = "train"  # fashion: the official train or test split
    fashion_dir: str | None = None  # fashion's IDX folder; None: $MASKDIET_FASHION_MNIST, else FASHION_DIR

    def __post_init__(self) -> None:
        unknown = set(self.sources) - set(SOURCES)
        if unknown or not self.sources:
            raise UserInputError(
                f"unknown demo source(s) {sorted(unknown)}; choose from {', '.join(SOURCES)}"
            )
        if "fashion" in self.sources and len(self.sources) > 1:
            raise UserInputError("--classes fashion is a source of its own; it does not mix with others")
        if self.split not in SPLITS:
            raise UserInputError(f"--split must be train or test, got {self.split!r}")
        if self.split != "train" and "fashion" not in self.sources:
            raise UserInputError("--split test needs --classes fashion (generated sources have no split)")
        if not 0.0 <= self.noise < 1.0:
            raise UserInputError(f"--noise must be in [0, 1), got {self.noise}")
        if self.per_class < 1 or (self.size is not None and self.size < 8) or self.bad < 0:
            raise UserInputError("per_class ≥ 1, size ≥ 8 and bad ≥ 0 are required")
        if self.image_format not in ("png", "jpg", "mixed"):
            raise UserInputError(f"--format must be png, jpg or mixed, got {self.image_format!r}")


# ---------------------------------------------------------------------------------------------- sources


def _digit_renderer(size: int) -> tuple[list[str], Callable[[int, np.random.Generator], np.ndarray]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    by_class = [digits.images[digits.target == c] / 16.0 for c in range(10)]

    def render(label: int, rng: np.random.Generator) -> np.ndarray:
        pool = by_class[label]
        glyph = pool[rng.integers(len(pool))]
        inner = int(size * rng.uniform(0.7, 0.95))
        img = np.asarray(
            Image.fromarray((glyph * 255).astype(np.uint8)).resize((inner, inner), Image.BILINEAR)
        )
        canvas = np.zeros((size, size), dtype=np.float32)
        dy, dx = rng.integers(0, size - inner + 1, size=2)
        canvas[dy : dy + inner, dx : dx + inner] = img / 255.0
        fg = rng.uniform(0.5, 1.0)  # ink and paper grey levels: varied contrast, no hue (module docs)
        bg = rng.uniform(0.0, 0.35)
        rgb = np.repeat(bg + canvas[..., None] * (fg - bg), 3, axis=2)
        rgb += rng.normal(0, 0.03, size=rgb.shape)
        return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)

    return [f"digit_{i}" for i in range(10)], render


def _shape_renderer(size: int) -> tuple[list[str], Callable[[int, np.random.Generator], np.ndarray]]:
    def render(label: int, rng: np.random.Generator) -> np.ndarray:
        bg = tuple(int(v) for v in rng.integers(0, 90, size=3))
        fg = tuple(int(v) for v in rng.integers(140, 256, size=3))
        image = Image.new("RGB", (size, size), bg)
        draw = ImageDraw.Draw(image)
        r = rng.uniform(0.25, 0.45) * size
        cx, cy = rng.uniform(r, size - r, size=2)
        box = (cx - r, cy - r, cx + r, cy + r)
        kind = SHAPES[label]
        if kind == "circle":
            draw.ellipse(box, fill=fg)
        elif kind == "square":
            draw.rectangle(box, fill=fg)
        elif kind == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
        elif kind == "cross":
            w = r / 3
            draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fg)
            draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fg)
        elif kind == "ring":
            draw.ellipse(box, outline=fg, width=max(2, int(r / 3)))
        else:  # stripes
            period = int(rng.integers(4, 9))
            for x in range(0, size, period):
                draw.rectangle((x, 0, x + period // 2 - 1, size), fill=fg)
        array = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, size=(size, size, 3))
        return np.clip(array, 0, 255).astype(np.uint8)

    return list(SHAPES), render


def _photo_renderer(size: int) -> tuple[list[str], Callable[[int, np.random.Generator], np.ndarray]]:
    import skimage.data

    photos = [np.asarray(getattr(skimage.data, name)()) for name in PHOTOS]

    def render(label: int, rng: np.random.Generator) -> np.ndarray:
        photo = photos[label]
        h, w = photo.shape[:2]
        side = int(min(h, w) * rng.uniform(0.25, 0.6))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(photo[y : y + side, x : x + side]).convert("RGB")
        return np.asarray(crop.resize((size, size), Image.BILINEAR))

    return list(PHOTOS), render


RENDERERS = {"digits": _digit_renderer, "shapes": _shape_renderer, "photos": _photo_renderer}


# ---------------------------------------------------------------------------------------------- fashion

# IDX type codes (http://yann.lecun.com/exdb/mnist/): the data that follows is big-endian
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(data: bytes) -> np.ndarray:
    """An IDX file's array (gzip or plain): magic 0x0000, a type code, the number of dimensions, each
    dimension as a big-endian uint32, then the values row-major. Fashion-MNIST ships in this format; a few
    lines of numpy read it, with no dataset library."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in IDX_DTYPES:
        raise UserInputError(f"not an IDX file (magic {data[:4].hex() or 'missing'})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserInputError(f"IDX header cut short: {ndim} dimensions need {header} bytes, got {len(data)}")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(IDX_DTYPES[data[2]])
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != count * dtype.itemsize:
        raise UserInputError(
            f"IDX body holds {len(data) - header} bytes; shape {shape} of {dtype} needs {count * dtype.itemsize}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def fashion_dir(folder: str | None = None) -> str:
    """Where the Fashion-MNIST IDX files are: `folder`, else $MASKDIET_FASHION_MNIST, else the Debian path."""
    return folder or os.environ.get(FASHION_DIR_ENV) or FASHION_DIR


def _idx_file(folder: str, name: str) -> str:
    for candidate in (f"{name}.gz", name):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    raise UserInputError(
        f"Fashion-MNIST not found ({name}.gz missing in {folder}): install it with "
        f"`apt-get install dataset-fashion-mnist`, or set {FASHION_DIR_ENV} to a folder holding its IDX files"
    )


def load_fashion_mnist(split: str = "train", folder: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) int64 in Fashion-MNIST's own order 0-9) of one official split."""
    root = fashion_dir(folder)
    images_name, labels_name = FASHION_FILES[split]
    with open(_idx_file(root, images_name), "rb") as f:
        images = read_idx(f.read())
    with open(_idx_file(root, labels_name), "rb") as f:
        labels = read_idx(f.read()).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserInputError(
            f"Fashion-MNIST files in {root} do not match: images {images.shape}, labels {labels.shape}"
        )
    if labels.min(initial=0) < 0 or labels.max(initial=0) >= len(FASHION_CLASSES):
        raise UserInputError(f"Fashion-MNIST labels in {root} outside 0-{len(FASHION_CLASSES) - 1}")
    return images.astype(np.uint8), labels


Item = tuple[int, np.ndarray, str]  # (true label = index in the sorted class names, image, file stem)


def _fashion_items(spec: DemoSpec) -> tuple[list[str], Iterator[Item]]:
    """Sorted class names and, class by class, the first `per_class` images of each in the file's order,
    each named after its class and its row in the IDX file (so it can be traced back)."""
    images, labels = load_fashion_mnist(spec.split, spec.fashion_dir)
    classes = sorted(FASHION_CLASSES)

    def items() -> Iterator[Item]:
        for true_label, name in enumerate(classes):
            for row in np.flatnonzero(labels == FASHION_CLASSES.index(name))[: spec.per_class]:
                image = images[row]
                if spec.size is not None and spec.size != image.shape[0]:
                    image = np.asarray(Image.fromarray(image).resize((spec.size, spec.size), Image.BILINEAR))
                yield true_label, image, f"{name}_{int(row):05d}"

    return classes, items()


def _generated_items(spec: DemoSpec, rng: np.random.Generator) -> tuple[list[str], Iterator[Item]]:
    """Sorted class names and `per_class` rendered images of each, drawn from `rng` as they are consumed."""
    size = spec.size or 32
    classes: list[str] = []
    renderers: list[tuple[int, Callable[[int, np.random.Generator], np.ndarray]]] = []
    for source in spec.sources:
        names, render = RENDERERS[source](size)
        for i, name in enumerate(names):
            classes.append(name)
            renderers.append((i, render))
    order = sorted(range(len(classes)), key=lambda i: classes[i])  # label = index in sorted class names
    classes_sorted = [classes[i] for i in order]

    def items() -> Iterator[Item]:
        for true_label, source_index in enumerate(order):
            local_label, render = renderers[source_index]
            for k in range(spec.per_class):
                yield true_label, render(local_label, rng), f"{classes_sorted[true_label]}_{k:05d}"

    return classes_sorted, items()


# ---------------------------------------------------------------------------------------------- bad files


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG" if fmt == "jpg" else "PNG", quality=90)
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A tiny PNG whose header declares `width`×`height` pixels: a decompression bomb's signature."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def bad_file(kind: str, rng: np.random.Generator, size: int = 32) -> bytes:
    """The bytes of one bad file of `kind` (a name from BAD_KINDS)."""
    noisy = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    if kind == "empty.jpg":
        return b""
    if kind == "random.jpg":
        return rng.integers(0, 256, size=2048, dtype=np.uint8).tobytes()
    if kind == "notes.png":
        return b"this is a text file, not a picture\n" * 10
    if kind == "error-page.jpg":
        return b"<html><head><title>503 Service Unavailable</title></head><body>Slow down</body></html>"
    if kind == "truncated.jpg":
        data = _encode(noisy, "jpg")
        return data[: len(data) // 2]
    if kind == "truncated.png":
        data = _encode(noisy, "png")
        return data[: len(data) // 2]
    if kind == "bomb.png":
        return bomb_png()
    raise ValueError(f"unknown bad-file kind {kind!r}")


# ---------------------------------------------------------------------------------------------- writer


@dataclass(frozen=True)
class DemoResult:
    root: str
    classes: list[str]
    images: int
    noisy: int
    bad: int


def write_demo_data(url: str, spec: DemoSpec, storage_options: dict | None = None) -> DemoResult:
    """Write the demo set described by `spec` under `url`; returns what was written."""
    rng = np.random.default_rng(spec.seed)
    if "fashion" in spec.sources:
        classes_sorted, items = _fashion_items(spec)  # fails here, before anything is written
    else:
        classes_sorted, items = _generated_items(spec, rng)
    fs, root = url_to_fs(url, storage_options)
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)

    files: dict[str, bytes] = {}
    truth = []
    position = [0] * len(classes_sorted)  # index within its class: "mixed" alternates per class
    for true_label, array, stem in items:
        k, position[true_label] = position[true_label], position[true_label] + 1
        fmt = spec.image_format if spec.image_format != "mixed" else ("png" if k % 2 == 0 else "jpg")
        given = true_label
        if spec.noise > 0 and rng.random() < spec.noise and len(classes_sorted) > 1:
            given = int((true_label + rng.integers(1, len(classes_sorted))) % len(classes_sorted))
        path = f"{root}/{classes_sorted[given]}/{stem}.{fmt}"
        files[path] = _encode(array, fmt)
        truth.append((to_url(fs, path), true_label, classes_sorted[true_label], given, given != true_label))
    bad_rows = []
    for b in range(spec.bad):
        kind, reason = BAD_KINDS[b % len(BAD_KINDS)]
        folder = classes_sorted[b % len(classes_sorted)]
        path = f"{root}/{folder}/bad_{b:03d}_{kind}"
        files[path] = bad_file(kind, rng, spec.size or 32)
        bad_rows.append((to_url(fs, path), kind, reason))

    for folder in {p.rsplit("/", 1)[0] for p in files}:
        fs.makedirs(folder, exist_ok=True)
    items = list(files.items())
    for start in range(0, len(items), 256):
        fs.pipe(dict(items[start : start + 256]))
    truth_frame = pd.DataFrame(truth, columns=["path", "true_label", "true_class", "given_label", "noisy"])
    bad_frame = pd.DataFrame(bad_rows, columns=["path", "kind", "reason"])
    for name, frame in ((TRUTH_NAME, truth_frame), ("_bad.parquet", bad_frame)):
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        fs.pipe_file(f"{root}/{name}", buffer.getvalue())
    log.info(
        "wrote %d images (%d noisy) and %d bad files to %s",
        len(truth),
        int(truth_frame.noisy.sum()),
        len(bad_rows),
        url,
    )
    return DemoResult(
        root=join(url, ""),
        classes=classes_sorted,
        images=len(truth),
        noisy=int(truth_frame.noisy.sum()),
        bad=len(bad_rows),
    )
