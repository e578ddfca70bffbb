"""POST /match: patch retrieval over the index and correspondence in uploaded or indexed images."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import torch
from fastapi import APIRouter, File, Form, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from ace_model.encoder import Encoder
from ace_model.index import PatchIndex
from ace_model.match import Levels, common_looks, look_scales
from ace_model.preprocess import CoordinateMap, DecodedImage, decode_side, encoder_view, prepare
from service.batcher import Embedded
from service.config import Settings
from service.errors import ApiError, documented, invalid
from service.hits import locate_hits
from service.pipeline import check_ids, check_targets, decoded, embed, indexed_levels, read_uploads
from service.queries import (
    QuerySet,
    QueryShapes,
    check_inside,
    embed_queries,
    locate_queries,
    parse_shapes,
)
from service.schemas import Correspondence, Match, MatchResponse, PointResult, Timing
from service.state import AppState, app_state

router = APIRouter(tags=["match"])

SELF_PROBE_HITS = 4  # near-duplicates of the query in the index beyond this many are not excluded
SELF_MIN_SCORE = 0.995  # cosine of a patch with its own float16-stored copy

ERRORS = documented(400, 413, 415, 429, 503)


@dataclass(frozen=True)
class Prepared:
    tensor: torch.Tensor  # (3, S, S) uint8 model input
    coords: CoordinateMap
    image: DecodedImage | None = None  # kept until the looks are prepared
    looks: tuple[tuple[torch.Tensor, CoordinateMap], ...] = ()  # inputs of the higher-resolution looks


@dataclass(frozen=True)
class Target:
    key: int | str  # upload position or indexed image id
    levels: Levels  # its embeddings at the encoder's img_size
    coords: CoordinateMap
    looks: tuple[Levels, ...] = ()  # at 2x / 4x the size, for the second looks


@router.post("/match", response_model=MatchResponse, responses=ERRORS)
async def match(
    request: Request,
    image: Annotated[UploadFile, File(description="query image: PNG, JPEG, TIFF or DICOM")],
    points: Annotated[str | None, Form(description="JSON [[x, y], ...] in query pixels")] = None,
    boxes: Annotated[str | None, Form(description="JSON [[x0, y0, x1, y1], ...] instead of points")] = None,
    k: Annotated[int, Form(description="matches per point from the index")] = 5,
    targets: Annotated[list[UploadFile] | None, File(description="images to locate every point in")] = None,
    image_ids: Annotated[str | None, Form(description="JSON array of indexed image ids")] = None,
) -> MatchResponse:
    started = time.perf_counter()
    state = app_state(request)
    target_files = targets or []
    ids = _check_request(state.settings, k, len(target_files), image_ids)
    shapes = parse_shapes(points, boxes, state.settings.max_points)
    uploads = await read_uploads(image, target_files)
    with state.served.lease() as generation:
        encoder, index = generation.encoder, generation.index
        _check_index_served(state, index)
        check_ids(index, ids)
        max_look = state.settings.max_look if encoder.spec.is_dense else 1
        async with decoded(state, uploads, decode_side(encoder.spec.img_size), encoder, max_look) as images:
            query, *prepared = [await run_in_threadpool(_prepare, im, encoder) for im in images]
            check_inside(shapes, query.coords)
            query, prepared = await run_in_threadpool(_add_looks, query, prepared, encoder, max_look)
            pairs = await _embed(state, [query, *prepared], encoder)
            search_started = time.perf_counter()
            results, queries = await run_in_threadpool(_answer, shapes, query, pairs, prepared, index, ids, k)
            if index is not None:
                await locate_hits(state, encoder, index, [r.matches for r in results], queries,
                                  _levels(pairs[0][0], query.coords))
        timing = _timing([e for base, looks in pairs for e in (base, *looks)], started, search_started)
        return MatchResponse(encoder=encoder.fingerprint, index_version=generation.version,
                             results=results, timing_ms=timing)


def _check_request(settings: Settings, k: int, n_targets: int, image_ids: str | None) -> list[str]:
    if not 1 <= k <= settings.max_k:
        raise invalid(f"k must be between 1 and {settings.max_k}; got {k}")
    return check_targets(settings, n_targets, image_ids)


def _check_index_served(state: AppState, index: PatchIndex | None) -> None:
    """With ACE_INDEX_ROOT set, an answer without index matches would be silently incomplete."""
    if index is None and state.settings.index_root is not None:
        reason = state.served.problem or "none is published yet"
        raise ApiError(503, f"no index is served, so /match cannot search it: {reason}",
                       headers={"Retry-After": "10"})


def _prepare(image: DecodedImage, encoder: Encoder) -> Prepared:
    image = encoder_view(image, encoder.spec.img_size, encoder.spec.reads_grey)  # once for every look
    tensor, coords = prepare(image, encoder.spec.img_size, encoder.grid)
    return Prepared(tensor, coords, image)


def _add_looks(query: Prepared, uploads: list[Prepared], encoder: Encoder, max_look: int
               ) -> tuple[Prepared, list[Prepared]]:
    """Prepare only the looks a pair will use: a size both the query and that target have the
    resolution for (none without targets: index hits are located at the base size)."""
    def scales(p: Prepared) -> set[int]:
        assert p.image is not None
        return set(look_scales(p.image.width, p.image.height, encoder.spec.img_size, max_look))

    wanted = [scales(u) for u in uploads]
    shared = scales(query) & set().union(*wanted)
    targets = [_looked(u, w & shared, encoder) for u, w in zip(uploads, wanted, strict=True)]
    return _looked(query, shared, encoder), targets


def _looked(prepared: Prepared, scales: set[int], encoder: Encoder) -> Prepared:
    assert prepared.image is not None
    size, grid = encoder.spec.img_size, encoder.grid
    looks = tuple(prepare(prepared.image, s * size, s * grid) for s in sorted(scales))
    return Prepared(prepared.tensor, prepared.coords, None, looks)


EmbeddedImage = tuple[Embedded, list[Embedded]]  # at the base size, at each look's size


async def _embed(state: AppState, images: list[Prepared], encoder: Encoder) -> list[EmbeddedImage]:
    """Every image at the base size, then every 2x look, then every 4x look (the worker batches
    images of one size together wherever they are in its queue)."""
    order = [(n, -1) for n in range(len(images))]
    order += [(n, j) for j in range(max((len(p.looks) for p in images), default=0))
              for n, p in enumerate(images) if j < len(p.looks)]
    tensors = [images[n].tensor if j < 0 else images[n].looks[j][0] for n, j in order]
    embedded = await embed(state, tensors, encoder)
    by_slot = dict(zip(order, embedded, strict=True))
    return [(by_slot[(n, -1)], [by_slot[(n, j)] for j in range(len(p.looks))]) for n, p in enumerate(images)]


def _levels(embedded: Embedded, coords: CoordinateMap) -> Levels:
    return Levels.of(embedded.patches, embedded.fine, coords)


def _look_levels(looks: list[Embedded], prepared: Prepared) -> tuple[Levels, ...]:
    return tuple(_levels(e, coords) for e, (_, coords) in zip(looks, prepared.looks, strict=True))


def _answer(
    shapes: QueryShapes, query: Prepared, embedded: list[EmbeddedImage], uploads: list[Prepared],
    index: PatchIndex | None, ids: list[str], k: int,
) -> tuple[list[PointResult], QuerySet]:
    query_grid = embedded[0][0].patches
    queries = embed_queries(shapes, query_grid, query.coords)
    query_levels = (_levels(embedded[0][0], query.coords), _look_levels(embedded[0][1], query))
    pairs = zip(embedded[1:], uploads, strict=True)
    targets = [Target(i, _levels(e, p.coords), p.coords, _look_levels(looks, p))
               for i, ((e, looks), p) in enumerate(pairs)]
    if index is not None:
        targets += [_indexed_target(index, image_id) for image_id in ids]
    matches = _search(index, queries, ids, k, query_grid, query)
    found = [_correspond(queries, query_levels, target) for target in targets]
    results = [
        PointResult(point=_pair(shapes.points[n]), box=_quad(shapes.boxes, n), matches=matches[n],
                    correspondences=[per_target[n] for per_target in found])
        for n in range(len(shapes.points))
    ]
    return results, queries


def _indexed_target(index: PatchIndex, image_id: str) -> Target:
    return Target(image_id, indexed_levels(index, image_id), index.record(image_id).coords)


def _search(
    index: PatchIndex | None, queries: QuerySet, ids: list[str], k: int, query_grid: torch.Tensor,
    query: Prepared,
) -> list[list[Match]]:
    if index is None:
        return [[] for _ in range(len(queries.model_xy))]
    vectors = np.ascontiguousarray(queries.vectors.numpy(), dtype=np.float32)
    exclude = _self_in_index(index, query_grid, query)
    hits = index.search(vectors, k, image_ids=ids or None, exclude_image_ids=exclude)
    return [[Match(image_id=h.image_id, patient_id=h.patient_id, x=h.x, y=h.y, score=h.score, located=False)
             for h in row] for row in hits]


def _self_in_index(index: PatchIndex, query_grid: torch.Tensor, query: Prepared) -> tuple[str, ...]:
    """Ids of indexed copies of the query image: the probe patch finds itself, then the grids agree."""
    _, w, dim = query_grid.shape
    valid = np.flatnonzero(query.coords.valid_patches())
    probe = int(valid[len(valid) // 2]) if len(valid) else 0
    probe_vector = query_grid.reshape(-1, dim)[probe : probe + 1].numpy()
    row, col = divmod(probe, w)
    hits = index.search(np.ascontiguousarray(probe_vector, dtype=np.float32), SELF_PROBE_HITS)[0]
    candidates = {hit.image_id for hit in hits
                  if hit.score > SELF_MIN_SCORE and (hit.row, hit.col) == (row, col)}
    return tuple(i for i in sorted(candidates) if _same_grid(index.grid(i), query_grid))


def _same_grid(stored: np.ndarray, grid: torch.Tensor) -> bool:
    # the index stores float16, so an identical image differs by rounding only
    return stored.shape == tuple(grid.shape) and bool(np.abs(stored - grid.numpy()).max() < 2e-2)


def _correspond(queries: QuerySet, query: tuple[Levels, tuple[Levels, ...]], target: Target
                ) -> list[Correspondence]:
    found = locate_queries(queries, query[0], target.levels, common_looks(query[1], target.looks))
    xy = target.coords.to_original(found.xy)
    return [
        Correspondence(target=target.key, x=float(xy[n, 0]), y=float(xy[n, 1]), score=float(found.score[n]),
                       confidence=float(found.confidence[n]), mutual=bool(found.mutual[n]))
        for n in range(len(xy))
    ]


def _pair(row: np.ndarray) -> tuple[float, float]:
    return float(row[0]), float(row[1])


def _quad(boxes: np.ndarray | None, n: int) -> tuple[float, float, float, float] | None:
    if boxes is None:
        return None
    x0, y0, x1, y1 = (float(v) for v in boxes[n])
    return x0, y0, x1, y1


def _timing(embedded: list[Embedded], started: float, search_started: float) -> Timing:
    now = time.perf_counter()  # images may share a batch or not: report the slowest of each
    return Timing(queue=max(e.queue_ms for e in embedded),
                  inference=max(e.inference_ms for e in embedded),
                  search=(now - search_started) * 1000, total=(now - started) * 1000)
