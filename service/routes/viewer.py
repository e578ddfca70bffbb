"""The web viewer: the page at `/`, its static files, and the small routes only a browser needs.

- `GET /images`, `GET /images/{id}`, `GET /images/{id}/thumbnail`: the indexed images, viewable.
- `POST /preview`: any supported upload (DICOM included) as a PNG the browser can show, decoded
  exactly as `/match` decodes it; its original size comes in `X-Image-Width` / `X-Image-Height`.
- `POST /heatmap`: cosine similarity of one query point with every patch of uploaded targets or
  indexed images, with the original-pixel rectangle the patch grid covers, for an overlay.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import numpy as np
import torch
from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, Response
from PIL import Image
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from ace_model.index import PatchIndex
from ace_model.match import MASKED, Levels, MatchOptions, similarity
from ace_model.preprocess import (
    CoordinateMap,
    DecodedImage,
    ImageDecodeError,
    decode_side,
    load_image,
    thumbnail_jpeg,
    to_pil,
)
from service.errors import ApiError, documented, invalid
from service.pipeline import (
    base_input,
    check_ids,
    check_targets,
    decoded,
    embed,
    indexed_levels,
    read_uploads,
)
from service.queries import QueryShapes, check_inside, is_coordinate
from service.state import app_state

router = APIRouter(tags=["viewer"])

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
MEDIA_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
PREVIEW_SIDE = 1024  # longest side of a /preview PNG
PNG_OK: dict[int | str, dict[str, object]] = {200: {"content": {"image/png": {}}}}
THUMBNAIL_OK: dict[int | str, dict[str, object]] = {200: {"content": {"image/jpeg": {}, "image/png": {}}}}
THUMBNAIL_TYPES = {".jpg": "image/jpeg", ".png": "image/png"}  # index versions before 2026-11-27: PNG


class ImageInfo(BaseModel):
    image_id: str
    patient_id: str | None
    width: int = Field(description="original width in pixels (the coordinate system of matches)")
    height: int = Field(description="original height in pixels")
    thumbnail: str = Field(description="URL of a preview (JPEG, <= 512 px)")


class ImageList(BaseModel):
    index_version: str | None
    total: int = Field(description="indexed images in this version")
    images: list[ImageInfo] = Field(description="the requested page, in index order")


class Heatmap(BaseModel):
    target: int | str = Field(description="upload position of the target, or the indexed image id")
    width: int = Field(description="the target's original width in pixels")
    height: int = Field(description="the target's original height in pixels")
    extent: tuple[float, float, float, float] = Field(
        description="x0, y0, x1, y1: the original-pixel rectangle the whole patch grid covers")
    values: list[list[float | None]] = Field(
        description="rows x cols cosine similarity per patch; null on letterbox padding")


class HeatmapResponse(BaseModel):
    point: tuple[float, float]
    maps: list[Heatmap]


@dataclass(frozen=True)
class _Target:
    key: int | str  # upload position or indexed image id
    levels: Levels  # its embeddings (indexed images: the coarse grid only)
    coords: CoordinateMap


# ----------------------------------------------------------------------------- page and assets


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return _static_file("index.html")


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str) -> FileResponse:
    return _static_file(name)


def _static_file(name: str) -> FileResponse:
    allowed = {p.name for p in STATIC_DIR.iterdir() if p.suffix in MEDIA_TYPES}
    if name not in allowed:  # a fixed set of names: no path ever leaves the folder
        raise ApiError(404, f"no static file {name!r}")
    path = STATIC_DIR / name
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers={"Cache-Control": "no-cache"})


# ----------------------------------------------------------------------------- indexed images


@router.get("/images", response_model=ImageList, responses=documented())
async def list_images(
    request: Request,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> ImageList:
    with app_state(request).served.lease() as generation:
        index = generation.index
        if index is None:
            return ImageList(index_version=None, total=0, images=[])
        ids = index.image_ids()
        page = [_image_info(index, image_id) for image_id in ids[offset : offset + limit]]
        return ImageList(index_version=index.version, total=len(ids), images=page)


# Image ids may contain "/" (sent as %2F): the thumbnail route is declared first so that
# ".../thumbnail" is never read as part of an id.
@router.get("/images/{image_id:path}/thumbnail", response_class=Response,
            responses={**THUMBNAIL_OK, **documented(404)})
async def thumbnail(request: Request, image_id: str) -> Response:
    with app_state(request).served.lease() as generation:
        index = generation.index
        indexed = _indexed(index, image_id)
        stored = indexed.thumbnail_path(image_id)
        if stored is None:
            data = await run_in_threadpool(_thumbnail_from_source, indexed, image_id)
            return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=300"})
        data = await run_in_threadpool(stored.read_bytes)
    return Response(data, media_type=THUMBNAIL_TYPES[stored.suffix], headers={"Cache-Control": "max-age=300"})


@router.get("/images/{image_id:path}", response_model=ImageInfo, responses=documented(404))
async def image_info(request: Request, image_id: str) -> ImageInfo:
    with app_state(request).served.lease() as generation:
        index = generation.index
        return _image_info(_indexed(index, image_id), image_id)


def _indexed(index: PatchIndex | None, image_id: str) -> PatchIndex:
    if index is None:
        raise ApiError(404, "no index is loaded, so there are no indexed images to show")
    if not index.has_image(image_id):
        raise ApiError(404, f"image id {image_id!r} is not in index version {index.version}; "
                            "GET /images lists the indexed images")
    return index


def _image_info(index: PatchIndex, image_id: str) -> ImageInfo:
    record = index.record(image_id)
    return ImageInfo(image_id=image_id, patient_id=record.patient_id, width=record.width,
                     height=record.height, thumbnail=f"/images/{quote(image_id, safe='')}/thumbnail")


def _thumbnail_from_source(index: PatchIndex, image_id: str) -> bytes:
    source = index.record(image_id).source
    try:
        return thumbnail_jpeg(load_image(source))
    except (OSError, ImageDecodeError) as err:
        raise ApiError(404, f"image {image_id!r} has no stored thumbnail and its source {source} "
                            f"cannot be read ({err}); rebuild the index to store thumbnails") from err


def _png(image: DecodedImage, max_side: int) -> bytes:
    picture = to_pil(image)
    picture.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    picture.save(out, "PNG")
    return out.getvalue()


# ----------------------------------------------------------------------------- uploads


@router.post("/preview", response_class=Response, responses={**PNG_OK, **documented(400, 413, 415, 429)})
async def preview(
    request: Request, image: Annotated[UploadFile, File(description="PNG, JPEG, TIFF or DICOM")]
) -> Response:
    state = app_state(request)
    async with decoded(state, await read_uploads(image), PREVIEW_SIDE) as (picture,):
        data = await run_in_threadpool(_png, picture, PREVIEW_SIDE)
    size = {"X-Image-Width": str(picture.width), "X-Image-Height": str(picture.height)}
    return Response(data, media_type="image/png", headers=size)


@router.post("/heatmap", response_model=HeatmapResponse, responses=documented(400, 413, 415, 429))
async def heatmap(
    request: Request,
    image: Annotated[UploadFile, File(description="query image: PNG, JPEG, TIFF or DICOM")],
    point: Annotated[str, Form(description="JSON [x, y] in query pixels")],
    targets: Annotated[list[UploadFile] | None, File(description="images to map the point in")] = None,
    image_ids: Annotated[str | None, Form(description="JSON array of indexed image ids")] = None,
) -> HeatmapResponse:
    state = app_state(request)
    shapes = QueryShapes(np.array([_parse_point(point)], dtype=np.float64), None)
    ids = check_targets(state.settings, len(targets or []), image_ids)
    uploads = await read_uploads(image, targets or [])
    with state.served.lease() as generation:
        encoder, index = generation.encoder, generation.index
        check_ids(index, ids)
        indexed = [_Target(i, indexed_levels(index, i), index.record(i).coords) for i in ids] if index else []
        async with decoded(state, uploads, decode_side(encoder.spec.img_size), encoder) as images:
            prepared = [await run_in_threadpool(base_input, d, encoder) for d in images]
            check_inside(shapes, prepared[0][1])
            embedded = await embed(state, [tensor for tensor, _ in prepared], encoder)
            levels = [Levels.of(e.patches, e.fine, c) for e, (_, c) in zip(embedded, prepared, strict=True)]
            query_px = torch.as_tensor(prepared[0][1].to_model(shapes.points), dtype=torch.float32)
            found = [_Target(i, lv, c)
                     for i, (lv, (_, c)) in enumerate(zip(levels[1:], prepared[1:], strict=True))]
            maps = [_heatmap(levels[0], query_px, target) for target in [*found, *indexed]]
    x, y = shapes.points[0]
    return HeatmapResponse(point=(float(x), float(y)), maps=maps)


def _parse_point(text: str) -> tuple[float, float]:
    message = "`point` must be a JSON array [x, y] of two finite numbers, e.g. [120.5, 80]"
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise invalid(f"{message} ({err})") from err
    if not isinstance(value, list) or len(value) != 2 or not all(is_coordinate(v) for v in value):
        raise invalid(message)
    return float(value[0]), float(value[1])


def _heatmap(query: Levels, query_px: torch.Tensor, target: _Target) -> Heatmap:
    """The map /match's argmax runs on (coarse + fine where both exist), at its own resolution."""
    maps = similarity(query, query_px, target.levels, MatchOptions())
    sim = maps.combined[0].numpy()  # (H, W), padding MASKED
    side = target.coords.size
    (x0, y0), (x1, y1) = target.coords.to_original(np.array([[0.0, 0.0], [side, side]]))
    values = [[round(float(v), 4) if v > MASKED else None for v in row] for row in sim]
    return Heatmap(target=target.key, width=target.coords.orig_w, height=target.coords.orig_h,
                   extent=(float(x0), float(y0), float(x1), float(y1)), values=values)
