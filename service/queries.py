"""Query points and boxes: parsing the form fields, embedding them, locating them in a target grid.

Points are sampled bilinearly from the query's coarse grid (the vector the index searches); a box
is the normalised mean of the coarse patches whose centres lie inside it (at least the patch under
its centre). Correspondence goes coarse to fine through `ace_model.match.match_points`; a box's
match is mutual when matching back lands inside the box.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ace_model.match import Found, Levels, Look, box_vectors, match_points, sample_at
from ace_model.preprocess import CoordinateMap
from service.errors import invalid


@dataclass(frozen=True)
class QueryShapes:
    points: np.ndarray  # (N, 2) original pixels of the query image (a box's centre)
    boxes: np.ndarray | None  # (N, 4) x0, y0, x1, y1 when boxes were given


@dataclass(frozen=True)
class QuerySet:
    vectors: torch.Tensor  # (N, D) unit-norm coarse query embeddings (what the index searches)
    model_xy: np.ndarray  # (N, 2) query points in the query's model px
    boxes_px: np.ndarray | None  # (N, 4) boxes in the query's model px; None for points


def parse_shapes(points: str | None, boxes: str | None, max_points: int) -> QueryShapes:
    if (points is None) == (boxes is None):
        raise invalid("send exactly one of the form fields `points` or `boxes`")
    if points is not None:
        xy = _parse_array(points, "points", 2, max_points)
        return QueryShapes(xy, None)
    box = _parse_array(boxes or "", "boxes", 4, max_points)
    if np.any(box[:, 2] < box[:, 0]) or np.any(box[:, 3] < box[:, 1]):
        raise invalid("each box must be [x0, y0, x1, y1] with x0 <= x1 and y0 <= y1")
    return QueryShapes((box[:, :2] + box[:, 2:]) / 2, box)


def _parse_array(text: str, field: str, width: int, max_rows: int) -> np.ndarray:
    example = "[[120.5, 80]]" if width == 2 else "[[10, 20, 60, 90]]"
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as err:  # RecursionError: absurdly deep nesting
        raise invalid(f"`{field}` is not valid JSON ({err}); expected e.g. {example}") from err
    if not isinstance(value, list) or not value:
        raise invalid(f"`{field}` must be a non-empty JSON array, e.g. {example}")
    if len(value) > max_rows:
        raise invalid(f"{len(value)} {field} given; at most {max_rows} per request")
    if not all(_is_numbers(row, width) for row in value):
        raise invalid(f"every entry of `{field}` must be an array of {width} finite numbers, e.g. {example}")
    return np.asarray(value, dtype=np.float64).reshape(-1, width)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a coordinate")


def _is_numbers(row: object, width: int) -> bool:
    if not isinstance(row, list) or len(row) != width:
        return False
    return all(is_coordinate(v) for v in row)


def is_coordinate(value: object) -> bool:
    """A finite JSON number (not a bool, not an integer beyond float range)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def parse_image_ids(text: str | None, max_ids: int) -> list[str]:
    """The `image_ids` form field: a JSON array of strings, duplicates dropped, order kept."""
    if text is None:
        return []
    try:
        ids = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise invalid(f'`image_ids` is not valid JSON ({err}); expected e.g. ["img-001"]') from err
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise invalid('`image_ids` must be a JSON array of strings, e.g. ["img-001"]')
    if len(ids) > max_ids:
        raise invalid(f"{len(ids)} image_ids given; at most {max_ids} per request")
    return list(dict.fromkeys(ids))


def check_inside(shapes: QueryShapes, coords: CoordinateMap) -> None:
    corners = shapes.points if shapes.boxes is None else shapes.boxes.reshape(-1, 2)
    outside = ~coords.contains(corners)
    if outside.any():
        first = corners[int(np.argmax(outside))].tolist()
        raise invalid(
            f"coordinate {first} lies outside the query image "
            f"({coords.orig_w}x{coords.orig_h} pixels; x in [0, {coords.orig_w}], y in [0, {coords.orig_h}])"
        )


def embed_queries(shapes: QueryShapes, grid: torch.Tensor, coords: CoordinateMap) -> QuerySet:
    """grid: (h, w, D) unit-norm coarse patch embeddings of the query image."""
    model_xy = coords.to_model(shapes.points)
    if shapes.boxes is None:
        vectors = sample_at(grid, torch.as_tensor(model_xy, dtype=torch.float32), coords.size)
        return QuerySet(vectors, model_xy, None)
    boxes_px = coords.to_model(shapes.boxes.reshape(-1, 2)).reshape(-1, 4)
    return QuerySet(box_vectors(grid, shapes.boxes, coords), model_xy, boxes_px)


def locate_queries(query: QuerySet, query_levels: Levels, target_levels: Levels,
                   looks: Sequence[Look] = ()) -> Found:
    """Best location of every query in the target, coarse to fine (ace_model.match.match_points);
    target model px out. A box's coarse vector is its mean; its fine query is its centre."""
    coarse = None if query.boxes_px is None else query.vectors
    return match_points(query_levels, query.model_xy, target_levels, second_look=list(looks),
                        query_coarse=coarse, query_boxes=query.boxes_px)
