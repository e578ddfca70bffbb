"""Index hits located at fine precision in their own images.

The index holds coarse vectors only (small, many). A hit is a coarse patch; to say *where* in that
image the query point lies, the hit image's stored preview (the index's JPEG thumbnail, 512 px)
is embedded at the encoder's size and the query point is searched with both levels within one
coarse cell of the hit patch (`ace_model.match.refine_near`). The best-ranked distinct images
are located, at most ACE_LOCATE_HITS per request; the rest keep their patch centres.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from starlette.concurrency import run_in_threadpool

from ace_model.encoder import Encoder
from ace_model.index import PatchIndex
from ace_model.match import Levels, refine_near
from ace_model.preprocess import CoordinateMap, ImageDecodeError, decode_image
from service.batcher import QueueFullError, WorkerDownError
from service.pipeline import base_input
from service.queries import QuerySet
from service.schemas import Match
from service.state import AppState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preview:
    image_id: str
    tensor: torch.Tensor  # (3, S, S) model input of the preview
    coords: CoordinateMap  # the preview's letterbox
    scale: tuple[float, float]  # preview px per original px, along x and y (rounded apart)


def hit_images(matches: list[list[Match]], limit: int) -> list[str]:
    """Distinct hit images, best ranks first (rank 1 of every point, then rank 2, ...)."""
    order: dict[str, None] = {}
    for rank in range(max((len(m) for m in matches), default=0)):
        for row in matches:
            if rank < len(row):
                order.setdefault(row[rank].image_id, None)
    return list(order)[:limit]


def load_preview(index: PatchIndex, image_id: str, encoder: Encoder) -> Preview | None:
    path = index.thumbnail_path(image_id)
    if path is None:
        return None
    try:
        image = decode_image(path.read_bytes())
    except (ImageDecodeError, OSError):
        return None  # a damaged preview leaves the hit at its patch centre
    tensor, coords = base_input(image, encoder)
    original = index.record(image_id).coords
    return Preview(image_id, tensor, coords, (image.width / original.orig_w, image.height / original.orig_h))


async def locate_hits(state: AppState, encoder: Encoder, index: PatchIndex, matches: list[list[Match]],
                      queries: QuerySet, query: Levels) -> None:
    """Move each located hit's x, y from its patch centre to the fine answer (in place)."""
    limit = min(state.settings.locate_hits, state.settings.queue_size)  # previews go in one batch
    if limit == 0 or not encoder.spec.is_dense:
        return
    ids = hit_images(matches, limit)
    loaded = [await run_in_threadpool(load_preview, index, i, encoder) for i in ids]
    previews = [p for p in loaded if p is not None]
    try:
        embedded = await state.batcher.embed([p.tensor for p in previews], encoder)
    except (QueueFullError, WorkerDownError) as err:
        state.metrics.rejected.inc(len(previews))
        log.warning("%s: %d index hits answered at their patch centres", err, len(previews))
        return  # busy: answer with patch centres rather than refuse the request
    levels = {p.image_id: (p, Levels.of(e.patches, e.fine, p.coords))
              for p, e in zip(previews, embedded, strict=True)}
    await run_in_threadpool(_relocate, matches, queries, query, levels, encoder.spec.img_size / encoder.grid)


def _relocate(matches: list[list[Match]], queries: QuerySet, query: Levels,
              levels: dict[str, tuple[Preview, Levels]], cell_px: float) -> None:
    """One search per hit image, with every (point, hit) pair that landed in it."""
    for image_id, (preview, target) in levels.items():
        pairs = [(n, match) for n, row in enumerate(matches) for match in row if match.image_id == image_id]
        rows = np.array([n for n, _ in pairs])
        scale = np.array(preview.scale)
        around = preview.coords.to_model(np.array([[m.x, m.y] for _, m in pairs]) * scale)
        coarse = None if queries.boxes_px is None else queries.vectors[torch.from_numpy(rows)]  # box means
        xy, _ = refine_near(query, queries.model_xy[rows], target, around, cell_px, query_coarse=coarse)
        for (_, match), (x, y) in zip(pairs, preview.coords.to_original(xy) / scale, strict=True):
            match.x, match.y, match.located = float(x), float(y), True
