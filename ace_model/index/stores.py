"""What a version stores beside the FAISS file, and the FAISS settings readers and writers share.

A FAISS id packs (image_index, patch_index): id = image_index << PATCH_BITS | patch_index, with
patch_index the row-major position in the h x w grid. Letterbox-padding patches are not indexed.
The metadata database holds one row per image (ids, source, size, CoordinateMap, valid mask);
the grid store holds float16 (n, h, w, D) patch grids, memory-mapped, rows = image indexes.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ace_model.errors import InputError
from ace_model.index.layout import THUMB_SUFFIX, IndexFormatError
from ace_model.preprocess import CoordinateMap

PATCH_BITS = 20  # up to 2**20 patches per image, 2**43 images
PATCH_MASK = (1 << PATCH_BITS) - 1
ADD_BATCH_IMAGES = 512  # images per chunk read from the grid store while indexing
_THUMB_SUFFIXES = (THUMB_SUFFIX, ".png")  # versions built before 2026-11-27 hold PNG previews


@dataclass(frozen=True)
class ImageRecord:
    image_id: str
    patient_id: str | None
    source: str  # path or URI the image was read from
    width: int  # original width in pixels
    height: int  # original height in pixels
    coords: CoordinateMap  # letterbox transform: original pixels <-> patch grid
    image_index: int = -1  # row in the grid store; high bits of every FAISS id of this image


@dataclass(frozen=True)
class Segment:
    """Embedded images ready to index (build_index writes these)."""

    grid_file: Path  # .npy float16 (count, h, w, D); rows of images without a record are ignored
    first: int  # image index of the file's first row
    records: tuple[ImageRecord, ...]  # images of this segment, image_index set
    thumbnails: Path | None = None  # directory holding <image_index>.jpg (or .png)


def pack_ids(image_index: np.ndarray | int, patch_index: np.ndarray | int) -> np.ndarray:
    return (np.asarray(image_index, dtype=np.int64) << PATCH_BITS) | np.asarray(patch_index, np.int64)


def unpack_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(ids, dtype=np.int64)
    return ids >> PATCH_BITS, ids & PATCH_MASK


def faiss_api() -> Any:
    """The faiss module untyped: its bundled stubs lack the keyword constructors of SearchParameters."""
    return faiss


def configure_faiss(threads: int | None = None) -> None:
    """BLAS for any batch >= 20 queries (the build default of 128000 makes a 196-query search 7x
    slower); `threads` sets FAISS's OpenMP pool (process-wide)."""
    faiss.cvar.distance_compute_blas_threshold = 20
    if threads is not None:
        faiss.omp_set_num_threads(max(1, threads))


# ----------------------------------------------------------------------------- metadata database

_SCHEMA = """
CREATE TABLE images (
    image_index INTEGER PRIMARY KEY,
    image_id TEXT NOT NULL UNIQUE,
    patient_id TEXT,
    source TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    coords TEXT NOT NULL,  -- CoordinateMap fields as JSON
    valid BLOB NOT NULL    -- np.packbits of the (h*w,) valid-patch mask, row-major
);
CREATE INDEX images_patient ON images (patient_id);
"""


def _record_row(record: ImageRecord) -> tuple[Any, ...]:
    valid = np.packbits(record.coords.valid_patches()).tobytes()
    return (record.image_index, record.image_id, record.patient_id, record.source, record.width,
            record.height, json.dumps(record.coords.to_dict()), valid)


def insert_records(db_path: Path, records: Iterable[ImageRecord]) -> None:
    with closing(sqlite3.connect(db_path)) as db, db:
        try:
            db.executemany("INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?)", map(_record_row, records))
        except sqlite3.IntegrityError as err:
            raise InputError(f"duplicate image id in the index ({err}); image ids must be unique") from err


def create_db(db_path: Path) -> None:
    with closing(sqlite3.connect(db_path)) as db:
        db.executescript(_SCHEMA)


def read_records(db_path: Path) -> list[ImageRecord]:
    query = "SELECT image_index, image_id, patient_id, source, width, height, coords FROM images"
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        rows = db.execute(query + " ORDER BY image_index").fetchall()
    return [ImageRecord(r[1], r[2], r[3], r[4], r[5], CoordinateMap(**json.loads(r[6])), r[0]) for r in rows]


def delete_records(db_path: Path, image_indexes: Sequence[int]) -> None:
    with closing(sqlite3.connect(db_path)) as db, db:
        db.executemany("DELETE FROM images WHERE image_index = ?", [(int(i),) for i in image_indexes])


# ----------------------------------------------------------------------------- grid store and thumbnails


def link_or_copy(src: Path, dst: Path) -> None:
    """Versions share immutable files through hard links; copy where links are impossible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def open_grid(path: Path) -> np.ndarray:
    grid = np.load(path, mmap_mode="r")
    if grid.dtype != np.float16 or grid.ndim != 4:
        raise IndexFormatError(f"{path}: expected a float16 (n, h, w, D) array, "
                               f"got {grid.dtype} {grid.shape}")
    return grid


def segment_batches(grid: np.ndarray, first: int, records: Sequence[ImageRecord]
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (unit vectors (m, D) float32, ids (m,)) of the valid patches, a few hundred images at a time."""
    flat = grid.reshape(grid.shape[0], -1, grid.shape[-1])  # (n, P, D)
    for start in range(0, len(records), ADD_BATCH_IMAGES):
        batch = records[start : start + ADD_BATCH_IMAGES]
        indexes = np.array([r.image_index for r in batch], dtype=np.int64)
        masks = np.stack([r.coords.valid_patches() for r in batch])  # (b, P)
        vectors = unit_rows(np.asarray(flat[indexes - first], dtype=np.float32)[masks])
        ids = pack_ids(indexes[:, None], np.arange(masks.shape[1])[None, :])[masks]
        yield np.ascontiguousarray(vectors), ids


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to norm 1. Every score is a cosine: float16 storage leaves norms off by up to
    ~1e-4, as much as the gap between a query's 10th and 100th neighbour, so inner products of
    stored rows would rank near-ties by rounding noise rather than by direction."""
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def count_patches(records: Iterable[ImageRecord]) -> int:
    return int(sum(int(r.coords.valid_patches().sum()) for r in records))


def find_thumbnail(folder: Path, image_index: int) -> Path | None:
    for suffix in _THUMB_SUFFIXES:
        if (path := folder / f"{image_index}{suffix}").is_file():
            return path
    return None
