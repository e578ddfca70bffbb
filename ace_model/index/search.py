"""Reading one index version: `PatchIndex` opens it read-only and answers top-k patch searches
(cosine scores), optionally restricted to some images or patients or excluding some images.
Search restricted to a few images scans their grid-store rows exactly; larger restrictions and
exclusions go through FAISS ID selectors in per-call SearchParameters (the shared index is never
mutated), so one PatchIndex is safe to search from many threads. Versions built before
2026-11-27 hold raw rows (inner products, within ~1e-4 of the cosine) and still load.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt
import torch

from ace_model.index.layout import (
    DB_FILE,
    FAISS_FILE,
    GRID_DIR,
    THUMB_DIR,
    check_encoder,
    load_manifest,
    resolve_version,
    version_dir,
)
from ace_model.index.stores import (
    ImageRecord,
    configure_faiss,
    faiss_api,
    find_thumbnail,
    open_grid,
    pack_ids,
    read_records,
    unit_rows,
    unpack_ids,
)

EXACT_RESTRICT_MAX_PATCHES = 50_000  # restrictions this small scan grid rows instead of FAISS
EXCLUDE_OVERFETCH_MAX = 4096  # exclusions this small over-fetch and filter (keeps BLAS search)


@dataclass(frozen=True)
class PatchHit:
    image_id: str
    patient_id: str | None
    row: int
    col: int
    x: float  # patch centre in the hit image's original pixels
    y: float
    score: float  # cosine similarity of the query and the stored patch vector


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
        self._segments = [open_grid(directory / GRID_DIR / s["file"]) for s in manifest["segments"]]
        self._firsts = np.array([s["first"] for s in manifest["segments"]], dtype=np.int64)
        patches = self.grid_shape[0] * self.grid_shape[1]
        self._table = _Table.build(read_records(directory / DB_FILE), manifest["next_image_index"], patches)

    @classmethod
    def open(cls, root: str | Path, version: str | None = None, expected_encoder: object = None
             ) -> PatchIndex:
        """version None = the published one. expected_encoder: a fingerprint or an Encoder."""
        root = Path(root)
        directory = version_dir(root, resolve_version(root, version))
        manifest = load_manifest(directory)
        check_encoder(manifest, expected_encoder, directory)
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
        defaults, api = self.manifest["index"]["params"], faiss_api()
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
