"""Writing index versions: a new one from embedded segments (`create_version`), the published
one plus more images (`extend_version`) or minus some (`remove_images`). A version is staged in
ROOT/.building/ and appears under versions/ only when complete; versions share immutable grid
files and thumbnails through hard links.

Index types: `flat` (exact), `ivfpq` (IVF + product quantisation, candidates ranked by L2 between
unit vectors and re-ranked exactly from the float16 grid store), `hnsw` (graph over float32
vectors). FAISS holds unit rows, so every score is a cosine.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from ace_model.errors import InputError
from ace_model.index.layout import (
    DB_FILE,
    FAISS_FILE,
    GRID_DIR,
    INDEX_FORMAT,
    MANIFEST_FILE,
    THUMB_DIR,
    UnknownImageError,
    check_encoder,
    load_manifest,
    new_version_name,
    resolve_version,
    staging,
    version_dir,
)
from ace_model.index.params import IndexParams, resolve_kind
from ace_model.index.stores import (
    ImageRecord,
    Segment,
    configure_faiss,
    count_patches,
    create_db,
    delete_records,
    find_thumbnail,
    insert_records,
    link_or_copy,
    open_grid,
    pack_ids,
    read_records,
    segment_batches,
)

# ----------------------------------------------------------------------------- building FAISS


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
        for vectors, _ in segment_batches(grid, first, records):
            parts.append(vectors[rng.random(len(vectors)) < keep])
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def _add_all(index: faiss.Index, sources: Sequence[tuple[np.ndarray, int, Sequence[ImageRecord]]],
             total: int) -> None:
    with tqdm(total=total, desc="indexing", unit="patch", unit_scale=True) as bar:
        for grid, first, records in sources:
            for vectors, ids in segment_batches(grid, first, records):
                index.add_with_ids(vectors, ids)
                bar.update(len(ids))


def _build_faiss(sources: Sequence[tuple[np.ndarray, int, Sequence[ImageRecord]]], dim: int,
                 params: IndexParams, timings: dict[str, float]) -> tuple[faiss.Index, str]:
    total = sum(count_patches(records) for _, _, records in sources)
    kind = resolve_kind(params, total)
    index = _new_index(kind, dim, total, params)
    start = time.perf_counter()
    if not index.is_trained:
        sample = _training_sample(sources, total, params)
        if len(sample) < 39 * _nlist(params, total):
            raise InputError(f"{total} patches are too few to train {kind} with "
                             f"{_nlist(params, total)} lists; use --type flat or a smaller nlist")
        index.train(sample)
    timings["train_s"] = time.perf_counter() - start
    start = time.perf_counter()
    _add_all(index, sources, total)
    timings["add_s"] = time.perf_counter() - start
    return index, kind


# ----------------------------------------------------------------------------- writing versions


def create_version(root: str | Path, segments: Sequence[Segment], encoder_fingerprint: str,
                   params: IndexParams | None = None, build_config: dict[str, Any] | None = None,
                   timings: dict[str, float] | None = None) -> str:
    """Write a new complete version from embedded segments; returns its name (not published)."""
    params = params or IndexParams()
    if not segments:
        raise InputError("no images to index: every source failed or the source is empty")
    root, version = Path(root), new_version_name()
    timings = dict(timings or {})
    configure_faiss()
    with staging(root, version) as work:
        _prepare_work(work)
        seg_meta = [_copy_segment(s, work) for s in segments]
        records = [r for s in segments for r in s.records]
        insert_records(work / DB_FILE, records)
        h, w, dim = _geometry(s.grid_file for s in segments)
        sources = [(open_grid(s.grid_file), s.first, s.records) for s in segments]
        index, kind = _build_faiss(sources, dim, params, timings)
        faiss.write_index(index, str(work / FAISS_FILE))
        manifest = _base_manifest(version, encoder_fingerprint, (h, w), dim, records, seg_meta)
        manifest.update(index=_index_manifest(kind, params, index), build=build_config or {},
                        timings=timings, parent=None)
        manifest["index"]["factory"] = _factory_string(kind, dim, manifest["num_patches"], params)
        _write_manifest(work, manifest)
    return version


def extend_version(root: str | Path, segments: Sequence[Segment], base: str | None = None,
                   encoder_fingerprint: str | None = None, build_config: dict[str, Any] | None = None
                   ) -> str:
    """A new version = `base` (default: current) + the images of `segments`; returns its name."""
    root = Path(root)
    base = resolve_version(root, base)
    base_dir = version_dir(root, base)
    manifest = load_manifest(base_dir)
    check_encoder(manifest, encoder_fingerprint, base_dir)
    _check_additions(base_dir, manifest, segments)
    version, timings = new_version_name(), {}
    configure_faiss()
    with staging(root, version) as work:
        _copy_base(base_dir, work, manifest)
        new_meta = [_copy_segment(s, work) for s in segments]
        new_records = [r for s in segments for r in s.records]
        insert_records(work / DB_FILE, new_records)
        index = faiss.read_index(str(base_dir / FAISS_FILE))
        start = time.perf_counter()
        sources = [(open_grid(s.grid_file), s.first, s.records) for s in segments]
        _add_all(index, sources, count_patches(new_records))
        timings["add_s"] = time.perf_counter() - start
        faiss.write_index(index, str(work / FAISS_FILE))
        _finish_derived(work, manifest, version, base, manifest["segments"] + new_meta, timings, build_config)
    return version


def remove_images(root: str | Path, image_ids: Iterable[str], base: str | None = None) -> str:
    """A new version = `base` (default: current) without `image_ids`; returns its name."""
    root = Path(root)
    base = resolve_version(root, base)
    base_dir = version_dir(root, base)
    manifest = load_manifest(base_dir)
    by_id = {r.image_id: r for r in read_records(base_dir / DB_FILE)}
    unknown = sorted(set(image_ids) - set(by_id))
    if unknown:
        raise UnknownImageError(f"not in index version {base}: {', '.join(unknown[:10])}")
    doomed = sorted(by_id[i].image_index for i in set(image_ids))
    version, timings = new_version_name(), {}
    configure_faiss()
    with staging(root, version) as work:
        _copy_base(base_dir, work, manifest, drop=frozenset(doomed))
        delete_records(work / DB_FILE, doomed)
        start = time.perf_counter()
        index = _index_without(base_dir, work, manifest, doomed)
        timings["remove_s"] = time.perf_counter() - start
        faiss.write_index(index, str(work / FAISS_FILE))
        _finish_derived(work, manifest, version, base, manifest["segments"], timings, None)
    return version


def _copy_segment(segment: Segment, work: Path) -> dict[str, Any]:
    grid = open_grid(segment.grid_file)
    name = f"{segment.first:012d}.npy"
    link_or_copy(segment.grid_file, work / GRID_DIR / name)
    if segment.thumbnails is not None:
        for record in segment.records:
            thumb = find_thumbnail(segment.thumbnails, record.image_index)
            if thumb is not None:
                link_or_copy(thumb, work / THUMB_DIR / thumb.name)
    return {"file": name, "first": segment.first, "count": int(grid.shape[0])}


def _prepare_work(work: Path) -> None:
    (work / GRID_DIR).mkdir()
    (work / THUMB_DIR).mkdir()
    create_db(work / DB_FILE)


def _geometry(grid_files: Iterable[Path]) -> tuple[int, int, int]:
    shapes = {open_grid(path).shape[1:] for path in grid_files}
    if len(shapes) != 1:
        raise InputError(f"segments disagree on the patch grid shape: {sorted(shapes)}")
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


def _base_manifest(version: str, fingerprint: str, hw: tuple[int, int], dim: int,
                   records: Sequence[ImageRecord], segments: list[dict[str, Any]]) -> dict[str, Any]:
    next_index = max((s["first"] + s["count"] for s in segments), default=0)
    return {"format": INDEX_FORMAT, "version": version, "created": datetime.now(UTC).isoformat(),
            "encoder_fingerprint": fingerprint, "grid": list(hw), "dim": dim,
            "num_images": len(records), "num_patches": count_patches(records),
            "next_image_index": next_index, "segments": segments}


def _copy_base(base_dir: Path, work: Path, manifest: dict[str, Any], drop: frozenset[int] = frozenset()
               ) -> None:
    """Link the base version's grid segments and thumbnails, copy its database."""
    (work / GRID_DIR).mkdir()
    (work / THUMB_DIR).mkdir()
    for seg in manifest["segments"]:
        link_or_copy(base_dir / GRID_DIR / seg["file"], work / GRID_DIR / seg["file"])
    for thumb in (base_dir / THUMB_DIR).iterdir():
        if int(thumb.stem) not in drop:
            link_or_copy(thumb, work / THUMB_DIR / thumb.name)
    shutil.copy2(base_dir / DB_FILE, work / DB_FILE)


def _check_additions(base_dir: Path, manifest: dict[str, Any], segments: Sequence[Segment]) -> None:
    existing = {r.image_id for r in read_records(base_dir / DB_FILE)}
    duplicates = sorted(existing.intersection(r.image_id for s in segments for r in s.records))
    if duplicates:
        raise InputError(f"duplicate image id: already in the index: {', '.join(duplicates[:10])}; "
                         "remove them first (`ace index remove`) to replace them")
    low = min((s.first for s in segments), default=manifest["next_image_index"])
    if low < manifest["next_image_index"]:
        raise InputError(f"new segments start at image index {low}, but the base version uses "
                         f"indexes up to {manifest['next_image_index'] - 1}")


def _finish_derived(work: Path, manifest: dict[str, Any], version: str, base: str,
                    segments: list[dict[str, Any]], timings: dict[str, float],
                    build_config: dict[str, Any] | None) -> None:
    records = read_records(work / DB_FILE)
    new = _base_manifest(version, manifest["encoder_fingerprint"], tuple(manifest["grid"]),
                         manifest["dim"], records, segments)
    new["next_image_index"] = max(new["next_image_index"], manifest["next_image_index"])
    new.update(index=manifest["index"], build=build_config or manifest.get("build", {}),
               timings=timings, parent=base)
    _write_manifest(work, new)


def _index_without(base_dir: Path, work: Path, manifest: dict[str, Any], doomed: Sequence[int]
                   ) -> faiss.Index:
    if manifest["index"]["type"] == "hnsw":  # HNSW cannot delete: rebuild from the grid store
        params = IndexParams(**{**manifest["index"]["params"], "kind": "hnsw"})
        sources = _sources_of(work, manifest["segments"], read_records(work / DB_FILE))
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
        sources.append((open_grid(directory / GRID_DIR / seg["file"]), seg["first"], mine))
    return sources
