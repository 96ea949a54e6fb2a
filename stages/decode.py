"""Decode stage: image bytes → RGB uint8 array at a fixed size, or a quarantine reason. Never raises.

Input columns: `bytes` (raw object), `path`. Output columns: `path`, `sha256` (unless `hash_bytes=False`),
`image` (N×S×S×3 uint8; zeros where decoding failed), `ok` (bool), `reason` (`ok` or a quarantine reason),
`error` (message or ""). When the batch comes from a shard or table reader it also has `read_reason` and
`read_error` (`stages.formats.SAMPLE_COLUMNS`): a row with a `read_reason` is quarantined with it, not
decoded (its bytes are still hashed), and both columns are dropped.

Resize policy (`decode.resize`): `center-crop` (default) scales the shorter side to S and crops the centre
S×S, keeping the aspect ratio as training crops expect; `squash` resizes straight to S×S. EXIF orientation
is applied first; transparent pixels are composited on `decode.background`; 16-bit and float images are
scaled to 8 bits by their own range; animated images use their first frame.

Quarantine reasons:
- `missing`: listed, but deleted before it was read (`bytes` is None).
- `empty`: a zero-byte object.
- `too-large`: over `max_bytes`, or declared dimensions over `max_pixels` (decided from the header, before
  any pixel is decoded, so a decompression bomb costs nothing).
- `not-an-image`: no image format recognises the bytes (text, HTML error pages, random bytes).
- `truncated`: the header is fine but the pixel data ends early.
- `corrupt`: the pixel data is damaged in another way.

Shard samples and table rows may also be quarantined by their reader (`stages.formats.CONTAINER_REASONS`):
`no-image` (no image member or bytes), `missing-label`, `bad-label`, `duplicate-key`; a shard that ends
early quarantines the sample it was in as `truncated`.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.core.config import DecodeConfig
from stages.base import ALL_TO_ALL, Batch, Stage

QUARANTINE_REASONS = ("missing", "empty", "too-large", "not-an-image", "truncated", "corrupt")
READ_FAULT_COLUMNS = ("read_reason", "read_error")  # a container reader's verdict, when there is one


class BadImage(Exception):
    """An object that cannot become a training image; `reason` is one of QUARANTINE_REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class DecodeOptions:
    image_size: int = 32
    resize: str = "center-crop"
    max_pixels: int = 89_478_485
    max_bytes: int = 256 * 1024 * 1024
    background: tuple[int, int, int] = (255, 255, 255)

    @classmethod
    def from_config(cls, config: DecodeConfig) -> DecodeOptions:
        return cls(
            image_size=config.image_size,
            resize=config.resize,
            max_pixels=config.max_pixels,
            max_bytes=config.max_bytes,
            background=tuple(config.background),
        )


# Leading bytes of the formats we decode: an object that starts like an image but will not open is a damaged
# image (truncated or corrupt), not "not-an-image" (e.g. a WebP cut short fails at open, not at load).
_SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


def _unreadable(data: bytes, message: str) -> tuple[str, str]:
    """(reason, message) for bytes no decoder would open: `not-an-image` unless they start like an image."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        declared = int.from_bytes(data[4:8], "little") + 8  # RIFF size counts the bytes after the first 8
        if declared > len(data):
            return "truncated", f"WebP declares {declared} bytes, object has {len(data)} ({message})"
        return "corrupt", f"WebP: {message}"
    fmt = next((f for sig, f in _SIGNATURES.items() if data.startswith(sig)), None)
    if fmt is None:
        return "not-an-image", message
    lowered = message.lower()
    reason = "truncated" if ("truncat" in lowered or "eof" in lowered) else "corrupt"
    return reason, f"{fmt}: {message}"


def _open(data: bytes | None, options: DecodeOptions) -> Image.Image:
    if data is None:
        raise BadImage("missing", "the object was deleted since it was listed")
    if len(data) == 0:
        raise BadImage("empty", "zero-byte object")
    if len(data) > options.max_bytes:
        raise BadImage("too-large", f"{len(data)} bytes > decode.max_bytes={options.max_bytes}")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below decides; PIL's warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadImage("too-large", str(e)) from None
    except UnidentifiedImageError:
        raise BadImage(*_unreadable(data, "no image format recognises these bytes")) from None
    except Exception as e:  # OSError, SyntaxError, ... and whatever else a plugin trips on
        raise BadImage(*_unreadable(data, f"{type(e).__name__}: {e}")) from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise BadImage("corrupt", f"declared size {width}x{height}")
    if width * height > options.max_pixels:
        raise BadImage(
            "too-large",
            f"{width}x{height} = {width * height} pixels > decode.max_pixels={options.max_pixels}",
        )
    return image


def _load(image: Image.Image, size: int) -> Image.Image:
    """Decode the pixels (first frame only); JPEGs decode at a reduced scale when much larger than `size`."""
    try:
        if image.format == "JPEG":
            image.draft(image.mode if image.mode in ("RGB", "L") else None, (size, size))
        image.load()
    # OSError, SyntaxError, DecompressionBombError, struct.error from a damaged header, ...
    except Exception as e:
        message = f"{type(e).__name__}: {e}"
        lowered = message.lower()
        reason = (
            "truncated" if ("truncat" in lowered or "eof" in lowered or "premature" in lowered) else "corrupt"
        )
        raise BadImage(reason, message) from None
    return image


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any PIL mode → RGB; transparency composited on `background`, high bit depths scaled by range."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        return Image.fromarray(scaled.round().astype(np.uint8), mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _resize(image: Image.Image, size: int, policy: str) -> Image.Image:
    if policy == "squash":
        return image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    box = (left, top, left + side, top + side)  # the centred square, cropped as part of the resize
    return image.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)


def decode_image(data: bytes | None, options: DecodeOptions) -> np.ndarray:
    """Decode one object (None: deleted since listing) to an `image_size`×`image_size`×3 uint8 array; raises
    `BadImage` with a reason."""
    image = _open(data, options)
    image = _load(image, options.image_size)
    try:
        image = ImageOps.exif_transpose(image)
        image = _to_rgb(image, options.background)
        image = _resize(image, options.image_size, options.resize)
        array = np.asarray(image, dtype=np.uint8)
    except BadImage:
        raise
    except Exception as e:  # damaged EXIF, palette or pixel data discovered late
        raise BadImage("corrupt", f"{type(e).__name__}: {e}") from None
    expected = (options.image_size, options.image_size, 3)
    if array.shape != expected:
        raise BadImage("corrupt", f"decoded shape {array.shape}, expected {expected}")
    return array


class DecodeStage(Stage):
    """Map stage: decodes a batch of objects, turning failures into quarantine rows (see the module docstring
    for the columns).

    `hash_bytes=False` leaves out the `sha256` column: the training stream has no use for it, and hashing
    every object costs about 2% of a decode.
    """

    name = "decode"
    inputs = ("path", "bytes")
    outputs = ("path", "sha256", "image", "ok", "reason", "error")
    drops = ("bytes", *READ_FAULT_COLUMNS)

    def __init__(self, options: DecodeOptions, hash_bytes: bool = True) -> None:
        self.options = options
        self.hash_bytes = hash_bytes
        if not hash_bytes:
            self.outputs = tuple(c for c in DecodeStage.outputs if c != "sha256")

    def process(self, batch: Batch) -> Batch:
        size = self.options.image_size
        paths = list(batch["path"])
        blobs = list(batch["bytes"])
        n = len(paths)
        images = np.zeros((n, size, size, 3), dtype=np.uint8)
        sha, ok, reason, error = [], np.zeros(n, dtype=bool), [], []
        faults = batch.get("read_reason")
        fault_errors = batch.get("read_error")
        for i, blob in enumerate(blobs):
            data = bytes(blob) if blob is not None else None
            if self.hash_bytes:
                sha.append(hashlib.sha256(data).hexdigest() if data is not None else "")
            if faults is not None and faults[i]:
                reason.append(str(faults[i]))
                error.append(str(fault_errors[i] if fault_errors is not None else "")[:500])
                continue
            try:
                images[i] = decode_image(data, self.options)
                ok[i] = True
                reason.append("ok")
                error.append("")
            except BadImage as e:
                reason.append(e.reason)
                error.append(str(e)[:500])
        out = {k: v for k, v in batch.items() if k not in self.drops}
        out.update(
            path=np.asarray(paths, dtype=object),
            image=images,
            ok=ok,
            reason=np.asarray(reason, dtype=object),
            error=np.asarray(error, dtype=object),
        )
        if self.hash_bytes:
            out["sha256"] = np.asarray(sha, dtype=object)
        return out


# Columns of a decodable image after `GatherDecoded`, and of a quarantine row.
GOOD_COLUMNS = ("path", "sha256", "label", "class_name")
QUARANTINE_COLUMNS = ("path", "sha256", "reason", "error")


class GatherDecoded(Stage):
    """All-to-all: every decoded row's metadata at once → the decodable rows (`GOOD_COLUMNS`), sorted by
    path; `quarantine` gives the others. The pixels never come here (`stages.pixels.PixelStore` keeps them).

    Global because of the sort: Ray Data hands blocks back in no fixed order, and proxy training, hence every
    score, depends on the order of its rows.
    """

    name = "gather-decoded"
    kind = ALL_TO_ALL
    passthrough = False
    inputs = (*GOOD_COLUMNS, "ok", "reason", "error")
    outputs = GOOD_COLUMNS

    def process(self, batch: Batch) -> Batch:
        good = np.flatnonzero(np.asarray(batch["ok"], dtype=bool))
        order = good[np.argsort(np.asarray(batch["path"])[good].astype(str), kind="stable")]
        return {name: np.asarray(batch[name])[order] for name in self.outputs}

    def quarantine(self, batch: Batch) -> pd.DataFrame:
        """The rows that did not decode (`QUARANTINE_COLUMNS`), sorted by path."""
        bad = ~np.asarray(batch["ok"], dtype=bool)
        frame = pd.DataFrame({name: np.asarray(batch[name])[bad] for name in QUARANTINE_COLUMNS})
        return frame.sort_values("path").reset_index(drop=True)
