"""The patch index: every valid patch of a corpus in FAISS, plus what a hit needs to be useful.

Root layout (docs/index.md has the user's view):
    ROOT/CURRENT                  name of the published version, replaced atomically
    ROOT/HISTORY                  published versions, oldest first (JSON list; rollback walks it)
    ROOT/versions/<version>/      complete versions only
        manifest.json             encoder fingerprint, counts, index type and parameters, timings
        index.faiss               FAISS index over packed ids
        grid/<first>.npy          float16 (n, h, w, D) patch grids, memory-mapped; rows are image indexes
        meta.sqlite               one row per image: ids, source, size, CoordinateMap, valid mask
        thumbnails/<index>.jpg    <= 512 px previews for the viewer (.png in older versions)
    ROOT/.building/<version>/     work in progress, renamed into versions/ only when complete

A FAISS id packs (image_index, patch_index): id = image_index << PATCH_BITS | patch_index, with
patch_index the row-major position in the h x w grid. Letterbox-padding patches are not indexed.

Scores are cosines: FAISS holds unit rows. Index types: `flat` (exact), `ivfpq` (IVF + product
quantisation, candidates ranked by L2 between unit vectors and re-ranked exactly from the float16
grid store), `hnsw` (graph over float32 vectors). Versions built before 2026-11-27 hold raw rows
(inner products, within ~1e-4 of the cosine) and still load.
Search restricted to a few images scans their grid-store rows exactly; larger restrictions and
exclusions go through FAISS ID selectors in per-call SearchParameters (the shared index is never
mutated).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt
import torch
from tqdm import tqdm

from ace_model.encoder import ENCODER_STORE
from ace_model.preprocess import CoordinateMap

INDEX_FORMAT = 1
PATCH_BITS = 20  # up to 2**20 patches per image, 2**43 images
PATCH_MASK = (1 << PATCH_BITS) - 1
CURRENT_FILE = "CURRENT"
HISTORY_FILE = "HISTORY"
VERSIONS_DIR = "versions"
BUILDING_DIR = ".building"
MANIFEST_FILE = "manifest.json"
FAISS_FILE = "index.faiss"
DB_FILE = "meta.sqlite"
GRID_DIR = "grid"
THUMB_DIR = "thumbnails"
THUMB_SUFFIX = ".jpg"
_THUMB_SUFFIXES = (THUMB_SUFFIX, ".png")  # versions built before 2026-11-27 hold PNG previews
INDEX_TYPES = ("auto", "flat", "ivfpq", "hnsw")
DEFAULT_KEEP = 3  # published versions kept on disk (plus the current and its rollback target)
EXACT_RESTRICT_MAX_PATCHES = 50_000  # restrictions this small scan grid rows instead of FAISS
EXCLUDE_OVERFETCH_MAX = 4096  # exclusions this small over-fetch and filter (keeps BLAS search)
STORE_GRACE_S = 24 * 3600  # a stored encoder younger than this is kept: a build may be using it
ADD_BATCH_IMAGES = 512  # images per chunk read from the grid store while indexing


class IndexNotFoundError(FileNotFoundError):
    """No index root, no published version, or an unknown version."""


class EncoderMismatchError(RuntimeError):
    """The index was built by a different encoder than the reader's."""


class IndexFormatError(RuntimeError):
    """A version directory that is incomplete, corrupt or of an unknown format."""


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
class PatchHit:
    image_id: str
    patient_id: str | None
    row: int
    col: int
    x: float  # patch centre in the hit image's original pixels
    y: float
    score: float  # cosine similarity of the query and the stored patch vector


@dataclass(frozen=True)
class IndexParams:
    kind: str = "auto"  # auto | flat | ivfpq | hnsw
    flat_max_patches: int = 1_000_000  # auto picks flat up to this many patches, ivfpq beyond
    nlist: int = 0  # IVF lists; 0 = 4 * sqrt(num_patches) clipped to [16, 65536]
    pq_bytes: int = 48  # PQ code bytes per patch (sub-quantiser count rounded to a divisor of D)
    # ivfpq: learn a rotation (OPQ) before PQ; on trained patch embeddings (variance in ~16 of 192
    # directions) plain PQ's 4-dimension sub-spaces split it badly (benchmarks/index.md)
    opq: bool = True
    pq_bits: int = 8  # bits per sub-quantiser code: 8, or 4 (twice the sub-quantisers, fast to train)
    # defaults: recall@10 0.988 / 0.985 at 1M / 5M patches (benchmarks/index.md); with L2 candidates
    # a deeper re-rank adds nothing, more lists probed a little
    nprobe: int = 16  # default IVF lists visited per query
    rerank: int = 10  # ivfpq: re-rank k * rerank PQ candidates exactly from the grid store
    hnsw_m: int = 32  # HNSW neighbours per node
    ef_construction: int = 80  # HNSW build breadth
    ef_search: int = 128  # default HNSW search breadth
    train_size: int = 200_000  # patches sampled to train the quantisers (at least 40 per IVF list)
    seed: int = 0  # training sample seed

    def __post_init__(self) -> None:
        if self.kind not in INDEX_TYPES:
            raise ValueError(f"unknown index type {self.kind!r}; choose one of {INDEX_TYPES}")
        if self.pq_bits not in (4, 8):
            raise ValueError(f"pq_bits must be 4 or 8, got {self.pq_bits}")


@dataclass(frozen=True)
class Segment:
    """Embedded images ready to index (build_index writes these)."""

    grid_file: Path  # .npy float16 (count, h, w, D); rows of images without a record are ignored
    first: int  # image index of the file's first row
    records: tuple[ImageRecord, ...]  # images of this segment, image_index set
    thumbnails: Path | None = None  # directory holding <image_index>.jpg (or .png)


# ----------------------------------------------------------------------------- ids and FAISS setup


def pack_ids(image_index: np.ndarray | int, patch_index: np.ndarray | int) -> np.ndarray:
    return (np.asarray(image_index, dtype=np.int64) << PATCH_BITS) | np.asarray(patch_index, np.int64)


def unpack_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(ids, dtype=np.int64)
    return ids >> PATCH_BITS, ids & PATCH_MASK


def _faiss_api() -> Any:
    """The faiss module untyped: its bundled stubs lack the keyword constructors of SearchParameters."""
    return faiss


def configure_faiss(threads: int | None = None) -> None:
    """BLAS for any batch >= 20 queries (the build default of 128000 makes a 196-query search 7x
    slower); `threads` sets FAISS's OpenMP pool (process-wide)."""
    faiss.cvar.distance_compute_blas_threshold = 20
    if threads is not None:
        faiss.omp_set_num_threads(max(1, threads))


# ----------------------------------------------------------------------------- root and versions


def new_version_name() -> str:
    """Sortable, unique within a process: UTC time to the microsecond."""
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")


def version_dir(root: str | Path, version: str) -> Path:
    return Path(root) / VERSIONS_DIR / version


def list_versions(root: str | Path) -> list[str]:
    """Complete versions, oldest first."""
    folder = Path(root) / VERSIONS_DIR
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / MANIFEST_FILE).is_file())


def current_version(root: str | Path) -> str | None:
    pointer = Path(root) / CURRENT_FILE
    if not pointer.is_file():
        return None
    return pointer.read_text().strip() or None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _history(root: Path) -> list[str]:
    path = root / HISTORY_FILE
    return list(json.loads(path.read_text())) if path.is_file() else []


def publish(root: str | Path, version: str, keep: int = DEFAULT_KEEP) -> None:
    """Point CURRENT at `version` atomically, record it for rollback, prune old versions."""
    root = Path(root)
    if not (version_dir(root, version) / MANIFEST_FILE).is_file():
        raise IndexNotFoundError(f"no complete version {version!r} under {root / VERSIONS_DIR}")
    history = [v for v in _history(root) if v != version] + [version]
    _write_atomic(root / HISTORY_FILE, json.dumps(history))
    _write_atomic(root / CURRENT_FILE, version + "\n")
    prune(root, keep)


def rollback(root: str | Path) -> str:
    """Publish the previously published version that still exists; returns its name."""
    root = Path(root)
    history = [v for v in _history(root) if (version_dir(root, v) / MANIFEST_FILE).is_file()]
    current = current_version(root)
    if current in history:
        history = history[: history.index(current)]
    if not history:
        raise IndexNotFoundError(f"nothing to roll back to under {root}: no earlier published version")
    _write_atomic(root / HISTORY_FILE, json.dumps(history))
    _write_atomic(root / CURRENT_FILE, history[-1] + "\n")
    return history[-1]


def prune(root: str | Path, keep: int = DEFAULT_KEEP) -> list[str]:
    """Delete all but the `keep` newest versions, never the current one or its rollback target."""
    root = Path(root)
    versions = list_versions(root)
    protected = set(versions[-keep:] if keep > 0 else []) | set(_history(root)[-2:])
    doomed = [v for v in versions if v not in protected]
    for version in doomed:
        shutil.rmtree(version_dir(root, version), ignore_errors=True)
    _prune_encoder_store(root)
    return doomed


def _prune_encoder_store(root: Path) -> None:
    """Drop stored encoders no kept version was built by; young ones may belong to a running build."""
    store = root / ENCODER_STORE
    if not store.is_dir():
        return
    used = {_read_manifest(version_dir(root, v)).get("encoder_fingerprint") for v in list_versions(root)}
    cutoff = time.time() - STORE_GRACE_S
    for folder in store.iterdir():
        if folder.name not in used and not folder.name.startswith(".") and folder.stat().st_mtime < cutoff:
            shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def _staging(root: Path, version: str) -> Iterator[Path]:
    """A work directory that becomes versions/<version> only if the block completes."""
    work = root / BUILDING_DIR / version
    work.mkdir(parents=True)
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    (root / VERSIONS_DIR).mkdir(exist_ok=True)
    os.replace(work, version_dir(root, version))


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


def _insert_records(db_path: Path, records: Iterable[ImageRecord]) -> None:
    with closing(sqlite3.connect(db_path)) as db, db:
        try:
            db.executemany("INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?)", map(_record_row, records))
        except sqlite3.IntegrityError as err:
            raise ValueError(f"duplicate image id in the index ({err}); image ids must be unique") from err


def _create_db(db_path: Path) -> None:
    with closing(sqlite3.connect(db_path)) as db:
        db.executescript(_SCHEMA)


def _read_records(db_path: Path) -> list[ImageRecord]:
    query = "SELECT image_index, image_id, patient_id, source, width, height, coords FROM images"
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        rows = db.execute(query + " ORDER BY image_index").fetchall()
    return [ImageRecord(r[1], r[2], r[3], r[4], r[5], CoordinateMap(**json.loads(r[6])), r[0]) for r in rows]


def _delete_records(db_path: Path, image_indexes: Sequence[int]) -> None:
    with closing(sqlite3.connect(db_path)) as db, db:
        db.executemany("DELETE FROM images WHERE image_index = ?", [(int(i),) for i in image_indexes])


# ----------------------------------------------------------------------------- grid store


def _link_or_copy(src: Path, dst: Path) -> None:
    """Versions share immutable files through hard links; copy where links are impossible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _open_grid(path: Path) -> np.ndarray:
    grid = np.load(path, mmap_mode="r")
    if grid.dtype != np.float16 or grid.ndim != 4:
        raise IndexFormatError(f"{path}: expected a float16 (n, h, w, D) array, "
                               f"got {grid.dtype} {grid.shape}")
    return grid


def _segment_batches(grid: np.ndarray, first: int, records: Sequence[ImageRecord]
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


def _count_patches(records: Iterable[ImageRecord]) -> int:
    return int(sum(int(r.coords.valid_patches().sum()) for r in records))


# ----------------------------------------------------------------------------- building FAISS


def resolve_kind(params: IndexParams, num_patches: int) -> str:
    if params.kind != "auto":
        return params.kind
    return "flat" if num_patches <= params.flat_max_patches else "ivfpq"


def _nlist(params: IndexParams, num_patches: int) -> int:
    if params.nlist > 0:
        return params.nlist
    return int(np.clip(4 * math.sqrt(max(num_patches, 1)), 16, 65536))


def _pq_m(dim: int, params: IndexParams) -> int:
    """Sub-quantisers: the largest divisor of dim whose codes fit in pq_bytes."""
    most = params.pq_bytes * 8 // params.pq_bits
    return max(m for m in range(1, min(dim, most) + 1) if dim % m == 0)


def _factory_string(kind: str, dim: int, num_patches: int, params: IndexParams) -> str:
    if kind == "flat":
        return "IDMap2,Flat"
    if kind == "hnsw":
        return f"IDMap2,HNSW{params.hnsw_m},Flat"
    m = _pq_m(dim, params)
    rotation = f"OPQ{m}," if params.opq else ""
    return f"{rotation}IVF{_nlist(params, num_patches)},PQ{m}x{params.pq_bits}"


def _new_index(kind: str, dim: int, num_patches: int, params: IndexParams) -> faiss.Index:
    # IVF-PQ ranks its candidates by L2 between unit vectors (cosine order; the exact re-rank gives
    # the scores): the PQ error of an inner product <q, x^> is dominated by the component along
    # q ~ x, which the L2 distance |q - x^| cancels (benchmarks/index.md: recall@10 at the same
    # re-rank depth 0.55 -> 0.9+ on trained patch embeddings).
    metric = faiss.METRIC_L2 if kind == "ivfpq" else faiss.METRIC_INNER_PRODUCT
    index = faiss.index_factory(dim, _factory_string(kind, dim, num_patches, params), metric)
    if kind == "hnsw":
        faiss.downcast_index(index.index).hnsw.efConstruction = params.ef_construction  # type: ignore[attr-defined]
    if kind == "ivfpq":  # the factory turns on polysemous training: minutes for Hamming codes we never use
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        ivf.do_polysemous_training = False  # type: ignore[attr-defined]
    return index


def _training_sample(sources: Sequence[tuple[np.ndarray, int, Sequence[ImageRecord]]], total: int,
                     params: IndexParams) -> np.ndarray:
    rng = np.random.default_rng(params.seed)
    # k-means needs >= 39 points per list: 4 sqrt(5M) = 8944 lists outgrow the 200k default sample
    wanted = max(params.train_size, 40 * _nlist(params, total))
    keep = min(1.0, wanted / max(total, 1))
    parts = []
    for grid, first, records in tqdm(sources, desc="training sample", unit="segment", leave=False):
        for vectors, _ in _segment_batches(grid, first, records):
            parts.append(vectors[rng.random(len(vectors)) < keep])
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def _add_all(index: faiss.Index, sources: Sequence[tuple[np.ndarray, int, Sequence[ImageRecord]]],
             total: int) -> None:
    with tqdm(total=total, desc="indexing", unit="patch", unit_scale=True) as bar:
        for grid, first, records in sources:
            for vectors, ids in _segment_batches(grid, first, records):
                index.add_with_ids(vectors, ids)
                bar.update(len(ids))


def _build_faiss(sources: Sequence[tuple[np.ndarray, int, Sequence[ImageRecord]]], dim: int,
                 params: IndexParams, timings: dict[str, float]) -> tuple[faiss.Index, str]:
    total = sum(_count_patches(records) for _, _, records in sources)
    kind = resolve_kind(params, total)
    index = _new_index(kind, dim, total, params)
    start = time.perf_counter()
    if not index.is_trained:
        sample = _training_sample(sources, total, params)
        if len(sample) < 39 * _nlist(params, total):
            raise ValueError(f"{total} patches are too few to train {kind} with "
                             f"{_nlist(params, total)} lists; use --type flat or a smaller nlist")
        index.train(sample)
    timings["train_s"] = time.perf_counter() - start
    start = time.perf_counter()
    _add_all(index, sources, total)
    timings["add_s"] = time.perf_counter() - start
    return index, kind


# ----------------------------------------------------------------------------- writing versions


def find_thumbnail(folder: Path, image_index: int) -> Path | None:
    for suffix in _THUMB_SUFFIXES:
        if (path := folder / f"{image_index}{suffix}").is_file():
            return path
    return None


def _copy_segment(segment: Segment, work: Path) -> dict[str, Any]:
    grid = _open_grid(segment.grid_file)
    name = f"{segment.first:012d}.npy"
    _link_or_copy(segment.grid_file, work / GRID_DIR / name)
    if segment.thumbnails is not None:
        for record in segment.records:
            thumb = find_thumbnail(segment.thumbnails, record.image_index)
            if thumb is not None:
                _link_or_copy(thumb, work / THUMB_DIR / thumb.name)
    return {"file": name, "first": segment.first, "count": int(grid.shape[0])}


def _prepare_work(work: Path) -> None:
    (work / GRID_DIR).mkdir()
    (work / THUMB_DIR).mkdir()
    _create_db(work / DB_FILE)


def _geometry(grid_files: Iterable[Path]) -> tuple[int, int, int]:
    shapes = {_open_grid(path).shape[1:] for path in grid_files}
    if len(shapes) != 1:
        raise ValueError(f"segments disagree on the patch grid shape: {sorted(shapes)}")
    h, w, dim = shapes.pop()
    return int(h), int(w), int(dim)


def _write_manifest(work: Path, manifest: dict[str, Any]) -> None:
    index_bytes = (work / FAISS_FILE).stat().st_size
    manifest["index"]["bytes"] = index_bytes
    manifest["index"]["bytes_per_patch"] = index_bytes / max(manifest["num_patches"], 1)
    (work / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))


def _index_manifest(kind: str, params: IndexParams, index: faiss.Index) -> dict[str, Any]:
    metric = "l2" if index.metric_type == faiss.METRIC_L2 else "inner product"
    info: dict[str, Any] = {"type": kind, "params": asdict(params), "factory": "", "metric": metric}
    if kind == "ivfpq":
        ivf = faiss.extract_index_ivf(index)
        info.update(nlist=int(ivf.nlist), pq_m=int(faiss.downcast_index(ivf).pq.M))  # type: ignore[attr-defined]
    return info


def create_version(root: str | Path, segments: Sequence[Segment], encoder_fingerprint: str,
                   params: IndexParams | None = None, build_config: dict[str, Any] | None = None,
                   timings: dict[str, float] | None = None) -> str:
    """Write a new complete version from embedded segments; returns its name (not published)."""
    params = params or IndexParams()
    if not segments:
        raise ValueError("no images to index: every source failed or the source is empty")
    root, version = Path(root), new_version_name()
    timings = dict(timings or {})
    configure_faiss()
    with _staging(root, version) as work:
        _prepare_work(work)
        seg_meta = [_copy_segment(s, work) for s in segments]
        records = [r for s in segments for r in s.records]
        _insert_records(work / DB_FILE, records)
        h, w, dim = _geometry(s.grid_file for s in segments)
        sources = [(_open_grid(s.grid_file), s.first, s.records) for s in segments]
        index, kind = _build_faiss(sources, dim, params, timings)
        faiss.write_index(index, str(work / FAISS_FILE))
        manifest = _base_manifest(version, encoder_fingerprint, (h, w), dim, records, seg_meta)
        manifest.update(index=_index_manifest(kind, params, index), build=build_config or {},
                        timings=timings, parent=None)
        manifest["index"]["factory"] = _factory_string(kind, dim, manifest["num_patches"], params)
        _write_manifest(work, manifest)
    return version


def _base_manifest(version: str, fingerprint: str, hw: tuple[int, int], dim: int,
                   records: Sequence[ImageRecord], segments: list[dict[str, Any]]) -> dict[str, Any]:
    next_index = max((s["first"] + s["count"] for s in segments), default=0)
    return {"format": INDEX_FORMAT, "version": version, "created": datetime.now(UTC).isoformat(),
            "encoder_fingerprint": fingerprint, "grid": list(hw), "dim": dim,
            "num_images": len(records), "num_patches": _count_patches(records),
            "next_image_index": next_index, "segments": segments}


def _copy_base(base_dir: Path, work: Path, manifest: dict[str, Any], drop: frozenset[int] = frozenset()
               ) -> None:
    """Link the base version's grid segments and thumbnails, copy its database."""
    (work / GRID_DIR).mkdir()
    (work / THUMB_DIR).mkdir()
    for seg in manifest["segments"]:
        _link_or_copy(base_dir / GRID_DIR / seg["file"], work / GRID_DIR / seg["file"])
    for thumb in (base_dir / THUMB_DIR).iterdir():
        if int(thumb.stem) not in drop:
            _link_or_copy(thumb, work / THUMB_DIR / thumb.name)
    shutil.copy2(base_dir / DB_FILE, work / DB_FILE)


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise IndexNotFoundError(f"no complete index version at {directory} ({MANIFEST_FILE} missing)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != INDEX_FORMAT:
        raise IndexFormatError(f"{path}: index format {manifest.get('format')!r}, expected {INDEX_FORMAT}")
    return dict(manifest)


def _resolve_version(root: Path, version: str | None) -> str:
    if version is not None:
        return version
    current = current_version(root)
    if current is None:
        raise IndexNotFoundError(
            f"no published index under {root} (no {CURRENT_FILE} file); build one with "
            "`ace index build ... --publish` or publish one with `ace index publish VERSION`"
        )
    return current


def extend_version(root: str | Path, segments: Sequence[Segment], base: str | None = None,
                   encoder_fingerprint: str | None = None, build_config: dict[str, Any] | None = None
                   ) -> str:
    """A new version = `base` (default: current) + the images of `segments`; returns its name."""
    root = Path(root)
    base = _resolve_version(root, base)
    base_dir = version_dir(root, base)
    manifest = _read_manifest(base_dir)
    _check_encoder(manifest, encoder_fingerprint, base_dir)
    _check_additions(base_dir, manifest, segments)
    version, timings = new_version_name(), {}
    configure_faiss()
    with _staging(root, version) as work:
        _copy_base(base_dir, work, manifest)
        new_meta = [_copy_segment(s, work) for s in segments]
        new_records = [r for s in segments for r in s.records]
        _insert_records(work / DB_FILE, new_records)
        index = faiss.read_index(str(base_dir / FAISS_FILE))
        start = time.perf_counter()
        sources = [(_open_grid(s.grid_file), s.first, s.records) for s in segments]
        _add_all(index, sources, _count_patches(new_records))
        timings["add_s"] = time.perf_counter() - start
        faiss.write_index(index, str(work / FAISS_FILE))
        _finish_derived(work, manifest, version, base, manifest["segments"] + new_meta, timings, build_config)
    return version


def _check_additions(base_dir: Path, manifest: dict[str, Any], segments: Sequence[Segment]) -> None:
    existing = {r.image_id for r in _read_records(base_dir / DB_FILE)}
    duplicates = sorted(existing.intersection(r.image_id for s in segments for r in s.records))
    if duplicates:
        raise ValueError(f"duplicate image id: already in the index: {', '.join(duplicates[:10])}; "
                         "remove them first (`ace index remove`) to replace them")
    low = min((s.first for s in segments), default=manifest["next_image_index"])
    if low < manifest["next_image_index"]:
        raise ValueError(f"new segments start at image index {low}, but the base version uses "
                         f"indexes up to {manifest['next_image_index'] - 1}")


def _finish_derived(work: Path, manifest: dict[str, Any], version: str, base: str,
                    segments: list[dict[str, Any]], timings: dict[str, float],
                    build_config: dict[str, Any] | None) -> None:
    records = _read_records(work / DB_FILE)
    new = _base_manifest(version, manifest["encoder_fingerprint"], tuple(manifest["grid"]),
                         manifest["dim"], records, segments)
    new["next_image_index"] = max(new["next_image_index"], manifest["next_image_index"])
    new.update(index=manifest["index"], build=build_config or manifest.get("build", {}),
               timings=timings, parent=base)
    _write_manifest(work, new)


def remove_images(root: str | Path, image_ids: Iterable[str], base: str | None = None) -> str:
    """A new version = `base` (default: current) without `image_ids`; returns its name."""
    root = Path(root)
    base = _resolve_version(root, base)
    base_dir = version_dir(root, base)
    manifest = _read_manifest(base_dir)
    by_id = {r.image_id: r for r in _read_records(base_dir / DB_FILE)}
    unknown = sorted(set(image_ids) - set(by_id))
    if unknown:
        raise KeyError(f"not in index version {base}: {', '.join(unknown[:10])}")
    doomed = sorted(by_id[i].image_index for i in set(image_ids))
    version, timings = new_version_name(), {}
    configure_faiss()
    with _staging(root, version) as work:
        _copy_base(base_dir, work, manifest, drop=frozenset(doomed))
        _delete_records(work / DB_FILE, doomed)
        start = time.perf_counter()
        index = _index_without(base_dir, work, manifest, doomed)
        timings["remove_s"] = time.perf_counter() - start
        faiss.write_index(index, str(work / FAISS_FILE))
        _finish_derived(work, manifest, version, base, manifest["segments"], timings, None)
    return version


def _index_without(base_dir: Path, work: Path, manifest: dict[str, Any], doomed: Sequence[int]
                   ) -> faiss.Index:
    if manifest["index"]["type"] == "hnsw":  # HNSW cannot delete: rebuild from the grid store
        params = IndexParams(**{**manifest["index"]["params"], "kind": "hnsw"})
        sources = _sources_of(work, manifest["segments"], _read_records(work / DB_FILE))
        index, _ = _build_faiss(sources, manifest["dim"], params, {})
        return index
    index = faiss.read_index(str(base_dir / FAISS_FILE))
    for image_index in doomed:
        first, end = int(pack_ids(image_index, 0)), int(pack_ids(image_index + 1, 0))
        index.remove_ids(faiss.IDSelectorRange(first, end))
    return index


def _sources_of(directory: Path, segments: list[dict[str, Any]], records: Sequence[ImageRecord]
                ) -> list[tuple[np.ndarray, int, list[ImageRecord]]]:
    sources = []
    for seg in segments:
        mine = [r for r in records if seg["first"] <= r.image_index < seg["first"] + seg["count"]]
        sources.append((_open_grid(directory / GRID_DIR / seg["file"]), seg["first"], mine))
    return sources


def _check_encoder(manifest: dict[str, Any], expected: object, where: Path) -> None:
    if expected is None:
        return
    fingerprint = expected if isinstance(expected, str) else getattr(expected, "fingerprint", None)
    if fingerprint != manifest["encoder_fingerprint"]:
        raise EncoderMismatchError(
            f"index {where} was built by encoder {manifest['encoder_fingerprint']}, but the loaded "
            f"encoder is {fingerprint}; rebuild the index with this encoder (`ace index build`) or "
            "load the encoder the index was built with"
        )


# ----------------------------------------------------------------------------- reading and search


@dataclass
class _Table:
    """Per-image arrays in image-index order, for vectorised hit decoding."""

    records: list[ImageRecord]
    position: np.ndarray  # (next_image_index,) int64: image index -> position in records, -1 = absent
    valid: np.ndarray  # (num_images, P) bool valid-patch masks
    coord_params: np.ndarray  # (num_images, 5) float64: stride, scale_x, scale_y, pad_x, pad_y
    by_id: dict[str, int] = field(default_factory=dict)  # image id -> position
    by_patient: dict[str, list[int]] = field(default_factory=dict)  # patient id -> positions

    @classmethod
    def build(cls, records: list[ImageRecord], next_index: int, patches: int) -> _Table:
        position = np.full(max(next_index, 1), -1, dtype=np.int64)
        position[[r.image_index for r in records]] = np.arange(len(records))
        valid = np.zeros((len(records), patches), dtype=bool)
        for pos, record in enumerate(records):
            valid[pos] = record.coords.valid_patches()
        params = np.array([[r.coords.stride, r.coords.scale_x, r.coords.scale_y, r.coords.pad_x,
                            r.coords.pad_y] for r in records], dtype=np.float64).reshape(-1, 5)
        table = cls(records, position, valid, params)
        for pos, record in enumerate(records):
            table.by_id[record.image_id] = pos
            if record.patient_id is not None:
                table.by_patient.setdefault(record.patient_id, []).append(pos)
        return table


class PatchIndex:
    """One published (or named) index version, opened read-only. Safe to search from many threads."""

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.directory = directory
        self.manifest = manifest
        self.version: str = manifest["version"]
        self.encoder_fingerprint: str = manifest["encoder_fingerprint"]
        self.grid_shape: tuple[int, int] = (int(manifest["grid"][0]), int(manifest["grid"][1]))
        self.dim: int = int(manifest["dim"])
        self.kind: str = manifest["index"]["type"]
        self._index = faiss.read_index(str(directory / FAISS_FILE))
        self._segments = [_open_grid(directory / GRID_DIR / s["file"]) for s in manifest["segments"]]
        self._firsts = np.array([s["first"] for s in manifest["segments"]], dtype=np.int64)
        patches = self.grid_shape[0] * self.grid_shape[1]
        self._table = _Table.build(_read_records(directory / DB_FILE), manifest["next_image_index"], patches)

    @classmethod
    def open(cls, root: str | Path, version: str | None = None, expected_encoder: object = None
             ) -> PatchIndex:
        """version None = the published one. expected_encoder: a fingerprint or an Encoder."""
        root = Path(root)
        directory = version_dir(root, _resolve_version(root, version))
        manifest = _read_manifest(directory)
        _check_encoder(manifest, expected_encoder, directory)
        configure_faiss()
        return cls(directory, manifest)

    @property
    def num_images(self) -> int:
        return len(self._table.records)

    @property
    def num_patches(self) -> int:
        return int(self._index.ntotal)

    def image_ids(self) -> list[str]:
        return [r.image_id for r in self._table.records]

    def has_image(self, image_id: str) -> bool:
        return image_id in self._table.by_id

    def record(self, image_id: str) -> ImageRecord:
        if image_id not in self._table.by_id:
            raise KeyError(f"image {image_id!r} is not in index version {self.version}")
        return self._table.records[self._table.by_id[image_id]]

    def grid(self, image_id: str) -> np.ndarray:
        """(h, w, D) float32 patch embeddings of one indexed image."""
        index = self.record(image_id).image_index
        segment = int(np.searchsorted(self._firsts, index, side="right")) - 1
        return np.asarray(self._segments[segment][index - self._firsts[segment]], dtype=np.float32)

    def valid_mask(self, image_id: str) -> np.ndarray:
        """(h, w) bool: patches on image content (the indexed ones)."""
        self.record(image_id)
        return self._table.valid[self._table.by_id[image_id]].reshape(self.grid_shape)

    def thumbnail_path(self, image_id: str) -> Path | None:
        return find_thumbnail(self.directory / THUMB_DIR, self.record(image_id).image_index)

    def close(self) -> None:
        self._index = None  # type: ignore[assignment]
        self._segments = []

    def __enter__(self) -> PatchIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- search

    def search(self, queries: np.ndarray, k: int, image_ids: Iterable[str] | None = None,
               patient_ids: Iterable[str] | None = None, exclude_image_ids: Iterable[str] = (),
               nprobe: int | None = None, rerank: int | None = None) -> list[list[PatchHit]]:
        """Top-k patches for each query (Q, D), best first.

        nprobe (IVF lists probed) and rerank (ivfpq: k * rerank candidates re-scored exactly)
        override the version's defaults for this call only.

        image_ids / patient_ids restrict the search (both given: their union); an unknown image id
        raises KeyError, an unknown patient id matches nothing. exclude_image_ids ignores unknown ids.
        """
        queries = self._check_queries(queries, k)
        allowed = self._allowed(image_ids, patient_ids)
        excluded = self._positions(exclude_image_ids, strict=False)
        if allowed is not None:
            allowed = np.setdiff1d(allowed, excluded)
            if int(self._table.valid[allowed].sum()) <= EXACT_RESTRICT_MAX_PATCHES:
                return self._hits(*self._exact_over(allowed, queries, k))
        return self._hits(*self._faiss_search(queries, k, allowed, excluded, nprobe, rerank))

    def _check_queries(self, queries: np.ndarray, k: int) -> np.ndarray:
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}) for this index, got {queries.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return np.ascontiguousarray(unit_rows(queries))

    def _positions(self, image_ids: Iterable[str], strict: bool) -> np.ndarray:
        ids = [image_ids] if isinstance(image_ids, str) else list(image_ids)
        if strict:
            for image_id in ids:
                self.record(image_id)
        found = {self._table.by_id[i] for i in ids if i in self._table.by_id}
        return np.array(sorted(found), dtype=np.int64)

    def _allowed(self, image_ids: Iterable[str] | None, patient_ids: Iterable[str] | None
                 ) -> np.ndarray | None:
        if image_ids is None and patient_ids is None:
            return None
        positions = set(self._positions(image_ids or (), strict=True).tolist())
        patients = [patient_ids] if isinstance(patient_ids, str) else list(patient_ids or ())
        for patient in patients:
            positions.update(self._table.by_patient.get(patient, ()))
        return np.array(sorted(positions), dtype=np.int64)

    def _ids_of(self, positions: np.ndarray) -> np.ndarray:
        """Packed ids of every valid patch of the images at `positions`."""
        masks = self._table.valid[positions]  # (n, P)
        indexes = np.array([self._table.records[p].image_index for p in positions], dtype=np.int64)
        return pack_ids(indexes[:, None], np.arange(masks.shape[1])[None, :])[masks]

    def _vectors(self, ids: np.ndarray, dtype: npt.DTypeLike = np.float32) -> np.ndarray:
        """(n,) packed ids -> (n, D) from the grid store, one sorted gather per segment file."""
        images, patches = unpack_ids(ids)
        order = np.argsort(ids, kind="stable")  # ids sort by image, so each segment is one run
        segments = np.searchsorted(self._firsts, images[order], side="right") - 1
        bounds = np.flatnonzero(np.diff(segments)) + 1
        out: np.ndarray = np.empty((len(ids), self.dim), dtype=dtype)
        if len(ids) == 0:
            return out
        for start, end in zip(np.r_[0, bounds], np.r_[bounds, len(ids)], strict=True):
            run, segment = order[start:end], int(segments[start])
            grid = self._segments[segment]
            flat = grid.reshape(grid.shape[0], -1, self.dim)
            out[run] = flat[images[run] - self._firsts[segment], patches[run]]
        return out

    def _exact_over(self, positions: np.ndarray, queries: np.ndarray, k: int
                    ) -> tuple[np.ndarray, np.ndarray]:
        ids = self._ids_of(positions)
        scores = queries @ unit_rows(self._vectors(ids)).T  # (Q, n)
        return _top_k(scores, np.broadcast_to(ids, scores.shape), k)

    def _faiss_search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None, excluded: np.ndarray,
                      nprobe: int | None, rerank_factor: int | None) -> tuple[np.ndarray, np.ndarray]:
        selector, drop = self._selector(allowed, excluded)
        rerank = self.kind == "ivfpq"
        factor = rerank_factor or int(self.manifest["index"]["params"]["rerank"])
        fetch = k * factor if rerank else k
        fetch += len(drop)
        params = self._search_params(selector, nprobe)
        scores, ids = self._index.search(queries, min(fetch, max(self.num_patches, 1)), params=params)
        if len(drop):
            ids = np.where(np.isin(ids, drop), -1, ids)
        if rerank:
            return self._exact_scores(queries, ids, k)
        return _top_k(np.where(ids >= 0, scores, -np.inf), ids, k)

    def _selector(self, allowed: np.ndarray | None, excluded: np.ndarray) -> tuple[Any, np.ndarray]:
        """(FAISS selector or None, ids to drop after the search)."""
        if allowed is not None:
            return faiss.IDSelectorBatch(self._ids_of(allowed)), np.zeros(0, np.int64)
        if len(excluded) == 0:
            return None, np.zeros(0, np.int64)
        excluded_ids = self._ids_of(excluded)
        if len(excluded_ids) <= EXCLUDE_OVERFETCH_MAX:
            return None, excluded_ids
        return faiss.IDSelectorNot(faiss.IDSelectorBatch(excluded_ids)), np.zeros(0, np.int64)

    def _search_params(self, selector: Any, nprobe: int | None) -> Any:
        """Per-call parameters: the shared index is never mutated, so concurrent searches are safe."""
        defaults, api = self.manifest["index"]["params"], _faiss_api()
        if self.kind == "ivfpq":
            return api.SearchParametersIVF(sel=selector, nprobe=int(nprobe or defaults["nprobe"]))
        if self.kind == "hnsw":
            return api.SearchParametersHNSW(sel=selector, efSearch=int(defaults["ef_search"]))
        return api.SearchParameters(sel=selector) if selector is not None else None

    def _exact_scores(self, queries: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Score FAISS candidates (Q, c) exactly from the grid store and keep the best k."""
        found = ids >= 0
        if not found.any():
            return _top_k(np.full(ids.shape, -np.inf, np.float32), ids, k)
        safe = np.where(found, ids, ids.max())  # missing slots read any real row and are scored -inf
        vectors = self._vectors(safe.ravel(), np.float16).reshape(*ids.shape, self.dim)  # (Q, c, D)
        # torch converts float16 several times faster than NumPy's astype
        rows = torch.from_numpy(vectors).float()  # (Q, c, D)
        products = torch.matmul(rows, torch.from_numpy(queries)[:, :, None])[:, :, 0]  # (Q, c)
        # cosine: divide by the row norms (4x cheaper than normalising the rows first)
        scores = (products / torch.linalg.vector_norm(rows, dim=-1).clamp_min(1e-12)).numpy()
        scores[~found] = -np.inf
        return _top_k(scores, ids, k)

    def _hits(self, scores: np.ndarray, ids: np.ndarray) -> list[list[PatchHit]]:
        images, patches = unpack_ids(np.where(ids >= 0, ids, 0))
        positions = self._table.position[images]
        rows, cols = np.divmod(patches, self.grid_shape[1])
        stride, sx, sy, px, py = self._table.coord_params[positions].transpose(2, 0, 1)  # 5 x (Q, k)
        xs, ys = ((cols + 0.5) * stride - px) / sx, ((rows + 0.5) * stride - py) / sy
        keep = ((ids >= 0) & np.isfinite(scores)).tolist()
        columns = zip(positions.tolist(), rows.tolist(), cols.tolist(), xs.tolist(), ys.tolist(),
                      scores.tolist(), keep, strict=True)  # Python lists: per-element NumPy access is slow
        return [[self._hit(*hit[:6]) for hit in zip(*row, strict=True) if hit[6]] for row in columns]

    def _hit(self, position: int, row: int, col: int, x: float, y: float, score: float) -> PatchHit:
        record = self._table.records[position]
        return PatchHit(record.image_id, record.patient_id, row, col, x, y, score)


def _top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k columns per row, sorted; missing entries get id -1 and score -inf."""
    k_eff = min(k, scores.shape[1])
    if k_eff == 0:
        return np.full((scores.shape[0], 0), -np.inf, np.float32), np.zeros((scores.shape[0], 0), np.int64)
    part = np.argpartition(-scores, k_eff - 1, axis=1)[:, :k_eff]
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    best = np.take_along_axis(part, order, axis=1)
    top_ids = np.take_along_axis(np.asarray(ids), best, axis=1)
    top_scores = np.take_along_axis(scores, best, axis=1)
    return top_scores, np.where(np.isfinite(top_scores), top_ids, -1)

