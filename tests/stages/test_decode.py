"""Decode: every odd-but-valid image becomes RGB at the right size; every bad object gets the right reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.demo_data import BAD_KINDS, bad_file
from stages.decode import BadImage, DecodeOptions, DecodeStage, GatherDecoded, decode_image

OPTIONS = DecodeOptions(image_size=16)


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def gradient(width: int = 40, height: int = 30) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 128)], axis=-1).astype(np.uint8)


def test_rgb_png_is_resized_with_center_crop() -> None:
    out = decode_image(encode(Image.fromarray(gradient()), "PNG"), OPTIONS)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    # centre crop of a 40x30 image keeps x in [5, 35): the left column is not the image's x=0 column
    assert out[:, 0, 0].mean() > 20


def test_grayscale_becomes_three_equal_channels() -> None:
    out = decode_image(encode(Image.fromarray(gradient()[..., 0]), "PNG"), OPTIONS)
    assert out.shape == (16, 16, 3)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


def test_cmyk_jpeg_decodes_to_rgb() -> None:
    cmyk = Image.fromarray(gradient()).convert("CMYK")
    out = decode_image(encode(cmyk, "JPEG"), OPTIONS)
    assert out.shape == (16, 16, 3) and out.std() > 5


def test_16_bit_png_is_scaled_by_its_range() -> None:
    array = (np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)
    out = decode_image(encode(Image.fromarray(array), "PNG"), OPTIONS)
    assert out.min() <= 10 and out.max() >= 245


def test_transparency_is_composited_on_white() -> None:
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)  # fully transparent black
    out = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), OPTIONS)
    assert (out == 255).all()
    palette = Image.fromarray(gradient()).convert("P")
    palette.info["transparency"] = 0
    out = decode_image(encode(palette, "PNG", transparency=0), OPTIONS)
    assert out.shape == (16, 16, 3)


def test_animated_gif_uses_first_frame() -> None:
    red = Image.new("RGB", (20, 20), (255, 0, 0))
    blue = Image.new("RGB", (20, 20), (0, 0, 255))
    data = encode(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    out = decode_image(data, OPTIONS)
    assert out[..., 0].mean() > 200 and out[..., 2].mean() < 50


def test_exif_orientation_is_applied() -> None:
    tall = np.zeros((40, 20, 3), dtype=np.uint8)
    tall[:20] = 255  # white top half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display: the white half ends up on the right
    data = encode(Image.fromarray(tall), "JPEG", exif=exif.tobytes(), quality=95)
    out = decode_image(data, DecodeOptions(image_size=16, resize="squash"))
    assert out[:, 8:].mean() > 200 and out[:, :8].mean() < 50


def test_huge_but_legal_image_is_resized() -> None:
    big = Image.fromarray(np.full((3000, 4000, 3), 90, dtype=np.uint8))
    out = decode_image(encode(big, "JPEG"), OPTIONS)
    assert out.shape == (16, 16, 3) and abs(int(out.mean()) - 90) <= 3


def test_one_pixel_image_is_upscaled() -> None:
    out = decode_image(encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), OPTIONS)
    assert out.shape == (16, 16, 3) and tuple(out[8, 8]) == (10, 20, 30)


def test_wrong_extension_still_decodes() -> None:
    # bytes are what count: a PNG named .jpg is a good image
    assert decode_image(encode(Image.fromarray(gradient()), "PNG"), OPTIONS).shape == (16, 16, 3)


@pytest.mark.parametrize(("kind", "reason"), BAD_KINDS)
def test_bad_files_get_their_reason(kind: str, reason: str) -> None:
    with pytest.raises(BadImage) as caught:
        decode_image(bad_file(kind, np.random.default_rng(0)), OPTIONS)
    assert caught.value.reason == reason


def test_truncated_webp_is_quarantined() -> None:
    data = encode(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "WEBP"
    )
    with pytest.raises(BadImage) as caught:
        decode_image(data[: len(data) // 2], OPTIONS)
    assert caught.value.reason in ("truncated", "not-an-image")


def test_max_pixels_is_decided_before_decoding() -> None:
    data = encode(Image.fromarray(gradient(200, 200)), "PNG")
    with pytest.raises(BadImage, match="max_pixels") as caught:
        decode_image(data, DecodeOptions(image_size=16, max_pixels=100 * 100))
    assert caught.value.reason == "too-large"


def test_stage_keeps_going_past_bad_rows() -> None:
    good = encode(Image.fromarray(gradient()), "PNG")
    batch = {
        "path": np.array(["a.png", "b.jpg", "c.png"], dtype=object),
        "bytes": np.array([good, b"", good], dtype=object),
    }
    out = DecodeStage(OPTIONS)(batch)
    assert out["ok"].tolist() == [True, False, True]
    assert out["reason"].tolist() == ["ok", "empty", "ok"]
    assert out["image"].shape == (3, 16, 16, 3) and "bytes" not in out
    assert out["sha256"][0] == out["sha256"][2] != out["sha256"][1]
    unhashed = DecodeStage(OPTIONS, hash_bytes=False)(batch)  # the training stream's decode
    assert "sha256" not in unhashed and unhashed["ok"].tolist() == out["ok"].tolist()
    assert set(DecodeStage(OPTIONS, hash_bytes=False).outputs) == set(DecodeStage.outputs) - {"sha256"}
    assert np.array_equal(unhashed["image"], out["image"])


@pytest.mark.parametrize("where", ["open", "load"])
def test_any_decoder_exception_is_a_quarantine_reason(where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A damaged file can make a PIL plugin raise what no list foresees (struct.error, IndexError, ...):
    the stage quarantines it as corrupt and goes on with the batch, it never raises."""
    import struct

    def broken(*args: object, **kwargs: object) -> None:
        raise struct.error("unpack requires a buffer of 4 bytes")

    data = encode(Image.new("RGB", (8, 8)), "PNG")
    if where == "open":
        monkeypatch.setattr("stages.decode.Image.open", broken)
    else:
        monkeypatch.setattr("PIL.ImageFile.ImageFile.load", broken)
    batch = {"path": np.asarray(["a.png"], dtype=object), "bytes": np.asarray([data], dtype=object)}
    out = DecodeStage(DecodeOptions(image_size=8))(batch)
    assert out["ok"].tolist() == [False] and out["reason"][0] in ("corrupt", "truncated")
    assert "struct" in out["error"][0] or "unpack" in out["error"][0]


def test_gather_keeps_the_good_rows_sorted_by_path_and_quarantines_the_rest() -> None:
    """Ray Data hands decoded blocks back in any order; gather fixes the order (proxy training depends on
    it) and splits off the rows that did not decode."""
    batch = {
        "path": np.asarray(["c.png", "a.png", "b.png", "d.png"], dtype=object),
        "sha256": np.asarray(["3", "1", "2", "4"], dtype=object),
        "label": np.asarray([2, 0, 1, 3]),
        "class_name": np.asarray(["c", "a", "b", "d"], dtype=object),
        "image": np.arange(4, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8),
        "ok": np.asarray([True, True, False, True]),
        "reason": np.asarray(["ok", "ok", "empty", "ok"], dtype=object),
        "error": np.asarray(["", "", "zero-byte object", ""], dtype=object),
    }
    gather = GatherDecoded()
    good = gather(batch)
    assert list(good) == ["path", "sha256", "label", "class_name"]  # no pixels: PixelStore keeps them
    assert good["path"].tolist() == ["a.png", "c.png", "d.png"] and good["label"].tolist() == [0, 2, 3]
    quarantine = gather.quarantine(batch)
    assert quarantine.to_dict("records") == [
        {"path": "b.png", "sha256": "2", "reason": "empty", "error": "zero-byte object"}
    ]
