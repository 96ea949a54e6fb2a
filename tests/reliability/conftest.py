"""Reliability fixtures: a corpus of hostile image files and a fault-injecting S3 proxy in front of moto.

Both are real: the corpus is bytes on disk (or in a bucket) made the way cameras, scrapers and broken uploads
make them, and the proxy is an HTTP server that forwards every request to the session's moto server unless it
decides to fail it (500 InternalError, 503 SlowDown, a dropped connection) or delay it.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from pipeline.demo_data import bomb_png

# ---------------------------------------------------------------------------------------------- corpus


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _gradient(width: int, height: int) -> np.ndarray:
    """A smooth RGB gradient (H×W×3 uint8): x in red, y in green, so orientation is visible."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack(
        [x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), np.full_like(x, 90)], axis=-1
    ).astype(np.uint8)


def _exif_rotated_jpeg() -> bytes:
    """A 64×32 landscape JPEG stored sideways with EXIF orientation 6 (display rotated 90° clockwise)."""
    stored = Image.fromarray(_gradient(64, 32)).transpose(Image.Transpose.ROTATE_90)  # 32 wide, 64 high
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(stored, "JPEG", exif=exif, quality=95)


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (24, 24), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _palette_with_transparency() -> bytes:
    image = Image.fromarray(_gradient(30, 30)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _encode(image, "PNG", transparency=0)


def _sixteen_bit_png() -> bytes:
    array = np.linspace(0, 65535, 40 * 40).reshape(40, 40).astype(np.uint16)
    return _encode(Image.fromarray(array), "PNG")


def _truncated(fmt: str) -> bytes:
    rng = np.random.default_rng(3)
    noisy = Image.fromarray(rng.integers(0, 256, size=(48, 48, 3), dtype=np.uint8))
    data = _encode(noisy, fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))
    return data[: len(data) // 2]


@dataclass(frozen=True)
class CorpusFile:
    """One file of the hostile corpus: where it goes (relative), its bytes, and what curate must make of it."""

    name: str  # relative path under the corpus root: <class>/<file>
    data: bytes
    expected: str  # "ok" (in the manifest) or the quarantine reason


def hostile_corpus() -> list[CorpusFile]:
    """At least 12 kinds of odd or broken image files, plus a few plain good ones, each with its expected fate.

    Good-but-odd files must land in the manifest (decoded, resized); broken ones in quarantine with the
    reason `stages.decode` documents. Deterministic.
    """
    rng = np.random.default_rng(0)
    good = Image.fromarray(_gradient(40, 30))
    files = [
        CorpusFile("odd/empty.jpg", b"", "empty"),
        CorpusFile(
            "odd/random-bytes.jpg", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not-an-image"
        ),
        CorpusFile(
            "odd/error-page.jpg",
            b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>gone</body></html>\n",
            "not-an-image",
        ),
        CorpusFile("odd/truncated.jpg", _truncated("JPEG"), "truncated"),
        CorpusFile("odd/truncated.png", _truncated("PNG"), "truncated"),
        CorpusFile("odd/truncated.webp", _truncated("WEBP"), "truncated"),
        CorpusFile("odd/bomb.png", bomb_png(60_000, 60_000), "too-large"),
        CorpusFile("odd/huge-legal.jpg", _encode(Image.fromarray(_gradient(4000, 3000)), "JPEG"), "ok"),
        CorpusFile("odd/cmyk.jpg", _encode(good.convert("CMYK"), "JPEG"), "ok"),
        CorpusFile("odd/sixteen-bit.png", _sixteen_bit_png(), "ok"),
        CorpusFile("odd/palette-transparent.png", _palette_with_transparency(), "ok"),
        CorpusFile("odd/animated.gif", _animated_gif(), "ok"),
        CorpusFile("odd/exif-rotated.jpg", _exif_rotated_jpeg(), "ok"),
        CorpusFile("odd/png-named.jpg", _encode(good, "PNG"), "ok"),
        CorpusFile("odd/one-pixel.png", _encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"), "ok"),
        CorpusFile("odd/UPPER-CASE.JPG", _encode(good, "JPEG"), "ok"),
        CorpusFile("odd/rgba.webp", _encode(good.convert("RGBA"), "WEBP"), "ok"),
        CorpusFile("odd/grayscale.tiff", _encode(good.convert("L"), "TIFF"), "ok"),
        CorpusFile("odd/legacy.bmp", _encode(good, "BMP"), "ok"),
    ]
    for i in range(4):
        files.append(
            CorpusFile(f"plain/img-{i}.png", _encode(Image.fromarray(_gradient(20 + i, 20)), "PNG"), "ok")
        )
    return files


@pytest.fixture(scope="session")
def corpus() -> list[CorpusFile]:
    return hostile_corpus()


def write_corpus(url: str, files: list[CorpusFile], storage_options: dict | None = None) -> None:
    """Write the corpus under `url` (any fsspec URL), plus sidecars that listing must skip."""
    from pipeline.core.storage import url_to_fs

    fs, root = url_to_fs(url, storage_options)
    root = root.rstrip("/")
    payload = {f"{root}/{f.name}": f.data for f in files}
    payload[f"{root}/odd/.DS_Store"] = b"\x00\x00\x00\x01Bud1"  # hidden: never listed
    payload[f"{root}/_notes/readme.jpg"] = b"sidecar, not an image"  # '_' folders are skipped
    payload[f"{root}/odd/caption.txt"] = b"not an image extension: never listed"
    payload[f"{root}/odd/.partial-upload.jpg"] = b"hidden: never listed"
    for folder in {p.rsplit("/", 1)[0] for p in payload}:
        fs.makedirs(folder, exist_ok=True)
    fs.pipe(payload)


# ---------------------------------------------------------------------------------------------- fault proxy

FAULT_KINDS = ("500", "503", "drop", "slow")

_ERROR_XML = {
    "500": (
        500,
        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
        b"<Message>We encountered an internal error. Please try again.</Message></Error>",
    ),
    "503": (
        503,
        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
        b"<Message>Please reduce your request rate.</Message></Error>",
    ),
}


@dataclass
class FaultPolicy:
    """What the proxy does to each request. Mutable from the test while the proxy runs (guarded by a lock).

    `rate`: fraction of requests that get a fault, drawn from `kinds` with a seeded RNG. `stall`: a
    predicate on (method, path); a matching request is held (never answered) until `release` is set, and
    `stalled` is set the moment one arrives — a deterministic "the client is in the middle of this write".
    """

    rate: float = 0.0
    kinds: tuple[str, ...] = FAULT_KINDS
    slow_seconds: float = 0.5
    seed: int = 0
    stall: Callable[[str, str], bool] | None = None
    stalled: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    counts: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def draw(self) -> str | None:
        with self.lock:
            self.counts["requests"] += 1
            if self.rate > 0 and self._rng.random() < self.rate:
                kind = self._rng.choice(self.kinds)
                self.counts[kind] += 1
                return kind
            return None


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects
    upstream: tuple[str, int]
    policy: FaultPolicy

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._read_body()
        policy = self.policy
        if policy.stall is not None and policy.stall(self.command, self.path):
            policy.stalled.set()
            policy.release.wait(timeout=120)
            self.close_connection = True
            return
        fault = policy.draw()
        if fault == "drop":
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault in _ERROR_XML:
            status, payload = _ERROR_XML[fault]
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        if fault == "slow":
            time.sleep(policy.slow_seconds)
        headers = {
            k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "connection")
        }
        headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                self.send_header(key, value)
        # a HEAD answer carries the object's length, not the (empty) body's
        length = response.getheader("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length or str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle  # noqa: N815 (http.server's names)


@dataclass
class FaultProxy:
    url: str
    policy: FaultPolicy


@pytest.fixture
def fault_proxy(s3_server: str) -> Iterator[FaultProxy]:
    """A fault-injecting S3 endpoint in front of the session's moto server; starts with no faults."""
    upstream = urlsplit(s3_server)
    policy = FaultPolicy()
    handler = type(
        "Handler", (_ProxyHandler,), {"upstream": (upstream.hostname, upstream.port), "policy": policy}
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield FaultProxy(url=f"http://127.0.0.1:{server.server_address[1]}", policy=policy)
    finally:
        policy.release.set()
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def corpus_writer() -> Callable[..., None]:
    """`write_corpus(url, files, storage_options=None)`, for tests that put the corpus somewhere."""
    return write_corpus
