"""Shards: the same small JPEGs on S3, one object each vs 100-image WebDataset shards: curate and an epoch.

Workload: `N` JPEGs of `SOURCE_PX`² pixels (crops of scikit-image's sample photos, written by
`pipeline.demo_data`, quality 90, about 1.5 KB each; 5 classes), put on moto's S3 server twice, byte for
byte the same images:

- objects: one object per image, `s3://shards/data/objects/<class>/<file>.jpg` (the folder format);
- shards: `PER_SHARD`-image WebDataset tars, `s3://shards/data/wds/train-NNNNNN.tar`, written with `tarfile`
  as webdataset writes them (`<key>.jpg` then `<key>.cls`, the class index as text; the images shuffled
  across shards with a fixed seed, as real shard sets are), named by a brace pattern
  (`.../train-{000000..000199}.tar`).

For each layout, in the same run and on the same Ray:

- curate: `pipeline.curate.curate` with `score.method=none` (list → read → decode at `OUTPUT_PX`² →
  manifest + quarantine), exactly as `maskdiet curate --score none` runs it; images/s over the call.
- pretrain: one streamed pretraining epoch over that curate's manifest: `pipeline.train.pretrain` with the
  tests' micro MAE (`mae_vit_micro_patch4`, 32 px), 1 Train worker, batch `BATCH`, steps = kept images //
  `BATCH`, `pretrain.cache_decoded_mib=0` (every image read from S3 and decoded by Ray Data, as for a set
  too large for the decoded cache) and no validation set (its images would be read by the driver, apart
  from the stream). The epoch's images/s (`_images_per_s`, the target's) is the images trained after the
  first step over the wall time from the first step to the last metrics line (`epoch_rate`, data waits
  included). Beside it: the whole call's rate (`_call_images_per_s`: Train's worker start, the first batch
  and the final checkpoint included, about 20-25 s here for either layout, paid once per job however many
  epochs it runs, as Ray's start is in the ingest benchmark), the seconds to the first step, and the
  training loop's own figure (`_loop_images_per_s`: `PretrainResult.images_per_s`, a step-weighted mean of
  its windows' rates, which overstates a stream whose windows are uneven).

S3 requests are counted at the server: moto's WSGI app runs behind a counting layer (`CountingApp`,
`counting_s3`) in this process, and every request from the driver and from Ray's workers passes through
it, classified as GET (an object or a byte range of one), HEAD, LIST (a bucket listing) or other. The
outputs (manifests, checkpoints) go to a local folder, so the counts are the input's reads only. The
pretraining counts include what the stream reads ahead into a second epoch (`stages.stream.epochs_needed`
gives a one-epoch run two passes; the run stops after its steps). The moto server runs in the benchmark
process, so it competes for the same cores; its per-request cost is far above real S3's (milliseconds of
Python per request, one process), so the speed-up here says what the request count costs on this box, not
on AWS.

Order: an untimed warm-up curate of a few hundred images of each layout (Ray's workers, imports), then
each round runs shards first (so one-off costs land on the layout the target favours), then objects, for
curate and then pretraining. Rates are medians over the rounds, request counts are from the first round.
"""

from __future__ import annotations

if __package__ in (None, ""):  # `python benchmarks/shards.py`: make the repository importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contextlib
import io
import logging
import math
import os
import statistics
import tarfile
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import S3_ENV, Row, free_port, local_ray, main, ratio, tiny
from pipeline.core.config import Config, load_config
from pipeline.demo_data import PHOTOS, DemoSpec, write_demo_data

log = logging.getLogger(__name__)

# The targets (read by run_all.py): shards at least 3x faster, with at least 50x fewer requests.
TARGETS = {
    "shards_curate_speedup_ratio_vs_objects": (">=", 3.0),
    "shards_curate_fewer_requests_ratio_vs_objects": (">=", 50.0),
    "shards_pretrain_speedup_ratio_vs_objects": (">=", 3.0),
    "shards_pretrain_fewer_requests_ratio_vs_objects": (">=", 50.0),
}

SOURCE_PX = 48  # side of the JPEGs on storage
OUTPUT_PX = 32  # side of the decoded images (the micro MAE's input)
PER_SHARD = 100  # images per WebDataset shard
BATCH = 64  # pretraining batch (one worker)
BUCKET = "shards"
KINDS = ("get", "head", "list", "other")  # request types counted at the server
LAYOUTS = ("shards", "objects")  # the order each round runs them in


def workload(quick: bool) -> tuple[int, int, int]:
    """(images, timed rounds, warm-up images)."""
    if tiny():
        return 200, 1, 20  # a smoke run: the warm-up only has to start Ray's workers, not steady them
    return (5000, 1, 500) if quick else (20000, 1, 500)


# ---------------------------------------------------------------------------------------------- counting


class RequestCounts:
    """Requests by type and response bytes, counted as the server answers them (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, kind: str, nbytes: int = 0) -> None:
        with self._lock:
            self._counts[kind] += 1
            self._counts["bytes"] += nbytes

    def add_bytes(self, nbytes: int) -> None:
        with self._lock:
            self._counts["bytes"] += nbytes

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self._counts)


def request_kind(method: str, path: str, query: str) -> str:
    """The S3 operation a path-style request is: `get` (GetObject, whole or a range), `head` (HeadObject
    or HeadBucket), `list` (ListObjects / ListObjectsV2 on a bucket), or `other` (writes, bucket
    sub-resources such as ?location)."""
    if method == "HEAD":
        return "head"
    if method != "GET":
        return "other"
    key = path.lstrip("/").partition("/")[2]
    if key:
        return "get"
    subresources = {part.partition("=")[0] for part in query.split("&") if part}
    listing = {
        "list-type",
        "prefix",
        "delimiter",
        "max-keys",
        "continuation-token",
        "marker",
        "encoding-type",
    }
    return "list" if subresources <= listing else "other"


class CountingApp:
    """WSGI middleware in front of moto's app: counts every request by `request_kind`, and the bytes of
    every response body."""

    def __init__(self, app: Callable[..., Iterable[bytes]], counts: RequestCounts) -> None:
        self.app = app
        self.counts = counts

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        kind = request_kind(
            environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", "")
        )
        self.counts.add(kind)
        body = self.app(environ, start_response)
        try:
            for chunk in body:
                self.counts.add_bytes(len(chunk))
                yield chunk
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()


@contextlib.contextmanager
def counting_s3() -> Iterator[tuple[str, RequestCounts]]:
    """moto's S3 server on a free local port behind `CountingApp`, with the standard AWS variables
    pointing at it (as `benchmarks.common.moto_s3`, which has no counting layer). Start it before Ray so
    Ray's workers inherit the endpoint. Yields (endpoint URL, the counts)."""
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    from pipeline.core.runtime import environment

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request otherwise
    counts = RequestCounts()
    app = CountingApp(DomainDispatcherApplication(create_backend_app), counts)
    server = make_server("127.0.0.1", free_port(), app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="moto-s3", daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    try:
        with environment({**S3_ENV, "AWS_ENDPOINT_URL": endpoint}):
            yield endpoint, counts
    finally:
        server.shutdown()
        thread.join()


@contextlib.contextmanager
def counted(counts: RequestCounts, into: dict[str, float]) -> Iterator[None]:
    """Fill `into` with the requests (by kind, `total`) and response bytes served during the block."""
    before = counts.snapshot()
    try:
        yield
    finally:
        delta = counts.snapshot()
        delta.subtract(before)
        into.update({kind: float(delta[kind]) for kind in KINDS})
        into["total"] = float(sum(delta[kind] for kind in KINDS))
        into["bytes"] = float(delta["bytes"])


# ---------------------------------------------------------------------------------------------- data


@dataclass
class Jpeg:
    """One JPEG: its class (folder) name and index, file name, and bytes."""

    class_name: str
    label: int
    name: str
    data: bytes


def make_images(folder: str, count: int) -> list[Jpeg]:
    """`count` JPEG photo crops (SOURCE_PX², a class per sample photo) written to the local `folder` by the
    demo-data generator, read back in path order."""
    per_class = max(1, count // len(PHOTOS))
    spec = DemoSpec(sources=("photos",), per_class=per_class, size=SOURCE_PX, image_format="jpg", seed=0)
    write_demo_data(folder, spec)
    root = Path(folder)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))
    return [
        Jpeg(name, label, f.name, f.read_bytes())
        for label, name in enumerate(classes)
        for f in sorted((root / name).iterdir())
        if f.suffix == ".jpg"
    ]


def tar_shard(members: list[tuple[str, bytes]]) -> bytes:
    """A tar of `members` (name, bytes) in order, as webdataset's `TarWriter` writes one (ustar, fixed
    mode and time, so the same images give the same bytes)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(payload), 0o444, 0
            info.uname = info.gname = "bigdata"
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def shard_files(images: list[Jpeg], seed: int = 0) -> list[bytes]:
    """`images` shuffled (seeded) into tars of `PER_SHARD` samples: `<key>.jpg` then `<key>.cls`, the key a
    running number (webdataset keys hold no dot) and the label the class index as text."""
    order = np.random.default_rng(seed).permutation(len(images))
    shards = []
    for start in range(0, len(order), PER_SHARD):
        members: list[tuple[str, bytes]] = []
        for k in order[start : start + PER_SHARD]:
            key = f"{int(k):08d}"
            members += [(f"{key}.jpg", images[k].data), (f"{key}.cls", str(images[k].label).encode())]
        shards.append(tar_shard(members))
    return shards


@dataclass(frozen=True)
class Layouts:
    """The input URLs of one image set on S3: its folder of objects and its shards' brace pattern."""

    objects: str
    shards: str

    def url(self, layout: str) -> str:
        return self.objects if layout == "objects" else self.shards


def upload(fs: Any, prefix: str, images: list[Jpeg]) -> Layouts:
    """Put `images` under `s3://BUCKET/<prefix>/` as one object each and as shards; their input URLs."""
    objects = f"{BUCKET}/{prefix}/objects"
    files = {f"{objects}/{i.class_name}/{i.name}": i.data for i in images}
    items = list(files.items())
    for start in range(0, len(items), 1000):
        fs.pipe(dict(items[start : start + 1000]))
    shards = shard_files(images)
    last = len(shards) - 1
    fs.pipe({f"{BUCKET}/{prefix}/wds/train-{n:06d}.tar": data for n, data in enumerate(shards)})
    pattern = f"s3://{BUCKET}/{prefix}/wds/train-{{{0:06d}..{last:06d}}}.tar"
    log.info("uploaded %d images as objects and as %d shards under %s", len(images), len(shards), prefix)
    return Layouts(objects=f"s3://{objects}", shards=pattern)


# ---------------------------------------------------------------------------------------------- measure


def make_config(input_url: str, output: str, endpoint: str) -> Config:
    """Curate `input_url` with no score (every decodable image kept), then pretrain the micro MAE on it
    for one streamed epoch (steps are set per run from the kept count)."""
    return load_config(
        base={"data": {"storage_options": {"endpoint_url": endpoint}}},
        overrides=[
            f"data.input={input_url}",
            f"output={output}",
            f"decode.image_size={OUTPUT_PX}",
            "score.method=none",
            "pretrain.model=mae_vit_micro_patch4",
            f"pretrain.batch_size={BATCH}",
            "pretrain.num_workers=1",
            "pretrain.cache_decoded_mib=0",  # stream from S3 through Ray Data, as a large set does
            "pretrain.val_images=0",  # no held-out images read apart from the stream
            "pretrain.log_every=10",
        ],
    )


@dataclass
class Phase:
    """One layout's runs of one phase: wall seconds of each call and the images it handled; for
    pretraining also the epoch's own rate (the training loop's, from the first step to the last) and the
    seconds to the first step; requests of the first run."""

    seconds: list[float] = field(default_factory=list)
    images: int = 0
    epoch_rates: list[float] = field(default_factory=list)
    loop_rates: list[float] = field(default_factory=list)
    first_step_s: list[float] = field(default_factory=list)
    requests: dict[str, float] = field(default_factory=dict)

    def add(self, seconds: float, images: int, requests: dict[str, float]) -> None:
        self.seconds.append(seconds)
        self.images = images
        self.requests = self.requests or requests

    @property
    def rate(self) -> float:
        """Images/s over the whole call (median of the runs)."""
        return ratio(self.images, statistics.median(self.seconds))


@dataclass
class Measured:
    """One layout's curate and pretraining runs, and how many images its curation kept."""

    curate: Phase = field(default_factory=Phase)
    pretrain: Phase = field(default_factory=Phase)
    kept: int = 0


def run_curate(config: Config, counts: RequestCounts, measured: Measured | None = None) -> str:
    """`curate(config)`, timed and counted into `measured` when given; returns the manifest's URL."""
    from pipeline.curate import curate

    requests: dict[str, float] = {}
    with counted(counts, requests):
        start = time.perf_counter()
        result = curate(config)
        seconds = time.perf_counter() - start
    images = len(result.manifest) + len(result.quarantine)
    assert len(result.quarantine) == 0, f"quarantined {result.quarantine['reason'].value_counts().to_dict()}"
    if measured is not None:
        measured.curate.add(seconds, images, requests)
        measured.kept = int(result.manifest["kept"].sum())
    log.info(
        "curate %s: %d images in %.1f s, requests %s, load %s",
        config.data.input,
        images,
        seconds,
        requests,
        load(),
    )
    return result.manifest_url


def run_pretrain(
    config: Config, manifest: str, output: str, counts: RequestCounts, measured: Measured
) -> None:
    """One streamed epoch of the kept images (steps = kept // BATCH), timed and counted into `measured`."""
    from pipeline.train import pretrain

    steps = max(1, measured.kept // BATCH)
    config = config.model_copy(deep=True)
    pre = config.pretrain
    pre.steps = steps
    pre.eval_every = pre.checkpoint_every = steps  # one report and one (local) checkpoint, at the end
    pre.warmup_steps = min(pre.warmup_steps, steps // 2)
    requests: dict[str, float] = {}
    with counted(counts, requests):
        start = time.perf_counter()
        result = pretrain(config, manifest, output, run_name="epoch")
        seconds = time.perf_counter() - start
    assert result.steps == steps, f"trained {result.steps} of {steps} steps"
    measured.pretrain.add(seconds, steps * BATCH, requests)
    rate = epoch_rate(result.history, steps)
    measured.pretrain.epoch_rates.append(rate)
    measured.pretrain.loop_rates.append(result.images_per_s)
    measured.pretrain.first_step_s.append(result.first_step_seconds or math.nan)
    log.info(
        "pretrain %s: %d steps in %.1f s (first step after %.1f s, then %.0f images/s; the loop's "
        "figure %.0f), requests %s, load %s",
        *(manifest, steps, seconds, result.first_step_seconds or math.nan, rate, result.images_per_s),
        *(requests, load()),
    )


def epoch_rate(history: list[dict[str, Any]], steps: int) -> float:
    """Images/s from the first step to the last: the images of steps 2..`steps` over the wall time from the
    first step's end (`first_step_time`) to the last metrics line. Not the loop's `images_per_s`, which
    averages its windows' rates weighted by steps: on a stream whose windows run at 120 and at 2,000 images/s
    that mean is about twice the images per second of wall time."""
    first = min((h["first_step_time"] for h in history if "first_step_time" in h), default=math.nan)
    last = max((h["time"] for h in history if "time" in h), default=math.nan)
    return ratio((steps - 1) * BATCH, last - first)


def load() -> str:
    """The machine's 1-, 5- and 15-minute load averages (other work on the box moves every rate)."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def phase_rows(name: str, shards: Phase, objects: Phase) -> list[Row]:
    """Rows of one phase (`curate` or `pretrain`): each layout's rate and requests by kind, then the
    speed-up of shards over objects and how many times fewer requests they made.

    Curate's rate is over the whole call (listing included). Pretraining's headline rate is the epoch's
    (`_images_per_s`: from the first step to the last, `epoch_rate`), and the whole call's is
    beside it (`_call_images_per_s`: Train's worker start, the first batch and the final checkpoint
    included: a fixed cost of the job, not of the epoch or the layout)."""
    rows: list[Row] = []
    for layout, phase in (("objects", objects), ("shards", shards)):
        prefix = f"shards_{name}_{layout}"
        if name == "pretrain":
            rows += [
                (f"{prefix}_images_per_s", statistics.median(phase.epoch_rates)),
                (f"{prefix}_call_images_per_s", phase.rate),
                (f"{prefix}_loop_images_per_s", statistics.median(phase.loop_rates)),
                (f"{prefix}_first_step_s", statistics.median(phase.first_step_s)),
            ]
        else:
            rows.append((f"{prefix}_images_per_s", phase.rate))
        rows.append((f"{prefix}_seconds", statistics.median(phase.seconds)))
        rows.append((f"{prefix}_requests", phase.requests["total"]))
        rows += [(f"{prefix}_{kind}_requests", phase.requests[kind]) for kind in KINDS if kind != "other"]
        rows.append((f"{prefix}_requests_per_image", ratio(phase.requests["total"], phase.images)))
        rows.append((f"{prefix}_served_mb", phase.requests["bytes"] / 1e6))
    value = dict(rows)
    speedup = ratio(value[f"shards_{name}_shards_images_per_s"], value[f"shards_{name}_objects_images_per_s"])
    rows.append((f"shards_{name}_speedup_ratio_vs_objects", speedup))
    if name == "pretrain":
        rows.append((f"shards_{name}_call_speedup_ratio_vs_objects", ratio(shards.rate, objects.rate)))
    fewer = ratio(objects.requests["total"], shards.requests["total"])
    rows.append((f"shards_{name}_fewer_requests_ratio_vs_objects", fewer))
    rows.append(
        (f"shards_{name}_fewer_gets_ratio_vs_objects", ratio(objects.requests["get"], shards.requests["get"]))
    )
    return rows


def run(quick: bool = False) -> list[Row]:
    count, rounds, warm = workload(quick)
    cores = os.cpu_count() or 1
    with (
        tempfile.TemporaryDirectory(prefix="maskdiet-bench-shards-") as tmp,
        counting_s3() as (endpoint, counts),
    ):
        import s3fs

        images = make_images(os.path.join(tmp, "jpegs"), count)
        fs = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=endpoint)
        fs.mkdir(BUCKET)
        data = upload(fs, "data", images)
        warm_data = upload(fs, "warm", images[:: max(1, len(images) // warm)][:warm])
        measured = {layout: Measured() for layout in LAYOUTS}
        with local_ray(num_cpus=cores):
            for layout in LAYOUTS:  # Ray's workers started, imports done, before anything is timed
                run_curate(
                    make_config(warm_data.url(layout), os.path.join(tmp, f"warm-{layout}"), endpoint), counts
                )
            for r in range(rounds):
                manifests = {}
                for layout in LAYOUTS:
                    config = make_config(
                        data.url(layout), os.path.join(tmp, f"curate-{layout}-{r}"), endpoint
                    )
                    manifests[layout] = run_curate(config, counts, measured[layout])
                for layout in LAYOUTS:
                    config = make_config(
                        data.url(layout), os.path.join(tmp, f"curate-{layout}-{r}"), endpoint
                    )
                    output = os.path.join(tmp, f"pretrain-{layout}-{r}")
                    run_pretrain(config, manifests[layout], output, counts, measured[layout])
    ours, base = measured["shards"], measured["objects"]
    assert ours.curate.images == base.curate.images == len(images), "the layouts hold different images"
    rows = phase_rows("curate", ours.curate, base.curate) + phase_rows(
        "pretrain", ours.pretrain, base.pretrain
    )
    sizes = [len(i.data) for i in images]
    rows += [
        ("shards_images", float(len(images))),
        ("shards_per_shard", float(PER_SHARD)),
        ("shards_shard_count", float(-(-len(images) // PER_SHARD))),
        ("shards_jpeg_kb_mean", float(np.mean(sizes)) / 1e3),
        ("shards_source_px", float(SOURCE_PX)),
        ("shards_output_px", float(OUTPUT_PX)),
        ("shards_rounds", float(rounds)),
        ("shards_cores", float(cores)),
    ]
    return rows


if __name__ == "__main__":
    main(run, __doc__.splitlines()[0])
