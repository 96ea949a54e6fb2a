"""Read stage: list the images under a URL and read their bytes with Ray Data.

Listing is recursive over `data.extensions` (case-insensitive); names or folders that start with `.` or `_`
are skipped (sidecars such as `_truth.parquet`). Labels come from the first folder under the root
(`root/<class>/.../<file>`, classes sorted, index = position) or from a labels table (csv/parquet with
columns `path`, `label` and optionally `class_name`; paths relative to the root or full URLs). Files
directly under the root, with no class folder, get label -1.

Output of `read_images` (a Ray Dataset): `path` (full URL), `bytes`, `label` (int64), `class_name`.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import ray
import ray.data

from pipeline.config import DataConfig
from pipeline.storage import StorageError, check_readable, pyarrow_filesystem, to_url, url_to_fs

log = logging.getLogger(__name__)


class LabelsError(ValueError):
    """The labels table is unusable; the message names the problem rows."""


@dataclass(frozen=True)
class ImageListing:
    """What `list_images` found: one entry per object, in sorted path order."""

    root: str  # the input URL
    paths: list[str]  # full URLs
    labels: list[int]
    class_names: list[str]
    classes: list[str] = field(default_factory=list)  # sorted class names; label i is classes[i]

    def __len__(self) -> int:
        return len(self.paths)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "path": self.paths,
                "label": np.asarray(self.labels, dtype=np.int64),
                "class_name": self.class_names,
            }
        )

    def subset(self, keep: set[str]) -> ImageListing:
        """Only the paths in `keep` (e.g. the objects new since the last run)."""
        rows = [i for i, p in enumerate(self.paths) if p in keep]
        return ImageListing(
            root=self.root,
            paths=[self.paths[i] for i in rows],
            labels=[self.labels[i] for i in rows],
            class_names=[self.class_names[i] for i in rows],
            classes=self.classes,
        )


def _hidden(relative: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative.split("/"))


def _read_labels_table(url: str, storage_options: dict[str, Any]) -> pd.DataFrame:
    fs, path = url_to_fs(url, storage_options)
    if not fs.exists(path):
        raise LabelsError(f"labels table not found: {url}")
    with fs.open(path, "rb") as f:
        table = pd.read_parquet(f) if path.endswith(".parquet") else pd.read_csv(f)
    missing = {"path", "label"} - set(table.columns)
    if missing:
        raise LabelsError(f"labels table {url} lacks column(s) {sorted(missing)}; it needs path,label")
    return table


def list_images(config: DataConfig) -> ImageListing:
    """List the image objects under `config.input` with their labels. Raises StorageError / LabelsError."""
    check_readable(config.input, config.storage_options)
    fs, root = url_to_fs(config.input, config.storage_options)
    root = root.rstrip("/")
    extensions = tuple(e.lower() for e in config.extensions)
    found = sorted(
        p for p in fs.find(root) if p.lower().endswith(extensions) and not _hidden(posixpath.relpath(p, root))
    )
    if config.labels:
        return _listing_from_table(config, fs, root, found)
    relative = [posixpath.relpath(p, root) for p in found]
    folder = [r.split("/")[0] if "/" in r else "" for r in relative]
    classes = sorted({c for c in folder if c})
    index = {c: i for i, c in enumerate(classes)}
    return ImageListing(
        root=config.input,
        paths=[to_url(fs, p) for p in found],
        labels=[index.get(c, -1) for c in folder],
        class_names=folder,
        classes=classes,
    )


def _listing_from_table(config: DataConfig, fs: Any, root: str, found: list[str]) -> ImageListing:
    assert config.labels is not None
    table = _read_labels_table(config.labels, config.storage_options)
    present = {to_url(fs, p) for p in found}
    urls = []
    for p in table["path"].astype(str):
        if "://" in p or p.startswith("/"):
            urls.append(p)
        else:
            urls.append(to_url(fs, posixpath.join(root, p)))
    missing = [u for u in urls if u not in present]
    if missing:
        raise LabelsError(
            f"labels table {config.labels} references {len(missing)} file(s) not found under "
            f"{config.input}, e.g. {missing[0]}"
        )
    labels = table["label"].astype(np.int64).tolist()
    if "class_name" in table.columns:
        names = table["class_name"].astype(str).tolist()
        classes = [n for _, n in sorted(set(zip(labels, names, strict=True)))]
    else:
        names = [str(x) for x in labels]
        classes = [str(x) for x in sorted(set(labels))]
    order = np.argsort(urls, kind="stable")
    return ImageListing(
        root=config.input,
        paths=[urls[i] for i in order],
        labels=[labels[i] for i in order],
        class_names=[names[i] for i in order],
        classes=classes,
    )


class AttachLabels:
    """`map_batches` callable: turns Ray's filesystem paths into full URLs and adds `label`, `class_name`."""

    name = "labels"
    requires = ("path",)
    produces = ("path", "label", "class_name")

    def __init__(self, lookup: dict[str, tuple[str, int, str]]) -> None:
        self.lookup = lookup  # filesystem path -> (url, label, class_name)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        rows = [self.lookup[str(p)] for p in batch["path"]]
        batch["path"] = np.asarray([r[0] for r in rows], dtype=object)
        batch["label"] = np.asarray([r[1] for r in rows], dtype=np.int64)
        batch["class_name"] = np.asarray([r[2] for r in rows], dtype=object)
        return batch


def read_images(listing: ImageListing, config: DataConfig) -> ray.data.Dataset:
    """A lazy Ray Dataset of the listed objects' bytes and labels (nothing is read until consumed)."""
    if len(listing) == 0:
        raise StorageError(
            f"no images found under {config.input} (extensions: {', '.join(config.extensions)})"
        )
    fs, _ = url_to_fs(config.input, config.storage_options)
    raw_paths = [fs._strip_protocol(url) for url in listing.paths]
    lookup = {
        raw: (url, label, name)
        for raw, url, label, name in zip(
            raw_paths, listing.paths, listing.labels, listing.class_names, strict=True
        )
    }
    ds = ray.data.read_binary_files(
        raw_paths,
        include_paths=True,
        filesystem=pyarrow_filesystem(fs),
        override_num_blocks=max(1, min(len(raw_paths) // config.read_batch_size, 200)),
    )
    return ds.map_batches(AttachLabels(lookup), batch_size=config.read_batch_size, batch_format="numpy")
