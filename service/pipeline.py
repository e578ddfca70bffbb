"""The one request path of every route that takes images (/match, /heatmap, /preview).

1. `read_uploads`: the multipart files, named as the client will read them in errors.
2. `decoded`: peek every header (size, format) and refuse what is over the per-image and per-request
   pixel limits before decoding anything; reserve the request's working memory in the process's
   budget (service/budget.py); decode, reduced while decoding to the largest size the encoder can
   use; hold the reservation until the request has answered.
3. `embed`: through the inference worker; a full queue is a 429 and counted, here only.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from fastapi import UploadFile
from starlette.concurrency import run_in_threadpool

from ace_model.encoder import Encoder
from ace_model.index import PatchIndex
from ace_model.match import Levels, look_scales
from ace_model.preprocess import (
    CoordinateMap,
    DecodedImage,
    ImageDecodeError,
    ImageHeader,
    decode_image,
    decode_memory_bytes,
    decode_side,
    encoder_view,
    inflated_bytes,
    peek_image,
    prepare,
    reduction_factor,
)
from service.batcher import Embedded, QueueFullError, WorkerDownError
from service.config import Settings
from service.errors import ApiError, from_decode_error, invalid
from service.queries import parse_image_ids
from service.state import AppState

FLOAT = 4  # bytes
WORK_FACTOR = 2  # similarity maps and copies made while matching, beside the tensors themselves
VIEW_COLOUR_BYTES = 3 + 4 + 1  # per decoded pixel: see model_bytes
VIEW_GREY_BYTES = 1 + 1


@dataclass(frozen=True)
class Upload:
    what: str  # how errors name it: "image", "targets[2]"
    data: bytes


def check_targets(settings: Settings, n_targets: int, image_ids: str | None) -> list[str]:
    """The target count and the parsed `image_ids` field (before anything is read or decoded)."""
    if n_targets > settings.max_targets:
        raise invalid(f"{n_targets} targets uploaded; at most {settings.max_targets} per request "
                      "(ACE_MAX_TARGETS)")
    return parse_image_ids(image_ids, settings.max_image_ids)


def check_ids(index: PatchIndex | None, ids: list[str]) -> None:
    if not ids:
        return
    if index is None:
        raise invalid("`image_ids` needs an index, and this service has none loaded")
    unknown = [i for i in ids if not index.has_image(i)]
    if unknown:
        raise invalid(f"unknown image id(s) {unknown[:5]} (index version {index.version})")


def indexed_levels(index: PatchIndex, image_id: str) -> Levels:
    """An indexed image as a match target: its stored coarse grid (the index keeps no fine level)."""
    grid = torch.from_numpy(np.ascontiguousarray(index.grid(image_id), dtype=np.float32))
    return Levels.of(grid, None, index.record(image_id).coords)


async def read_uploads(image: UploadFile, targets: Sequence[UploadFile] = ()) -> list[Upload]:
    uploads = [Upload("image", await image.read())]
    return uploads + [Upload(f"targets[{n}]", await t.read()) for n, t in enumerate(targets)]


@contextlib.asynccontextmanager
async def decoded(state: AppState, uploads: list[Upload], max_side: int,
                  encoder: Encoder | None = None, max_look: int = 1) -> AsyncIterator[list[DecodedImage]]:
    """The uploads decoded (longer side reduced towards `max_side`), within the memory budget.
    With an encoder, the budget also covers the model inputs and embeddings of every look."""
    headers = [await _peek(state, upload) for upload in uploads]
    _check_request_pixels(state, headers)
    need = sum(len(u.data) + decode_memory_bytes(h, max_side) for u, h in zip(uploads, headers, strict=True))
    if encoder is not None:
        need += sum(model_bytes(encoder, h, max_look) for h in headers)
    async with state.budget.reserve(need, _describe(uploads)):
        yield [await _decode(state, upload, max_side) for upload in uploads]


async def _peek(state: AppState, upload: Upload) -> ImageHeader:
    """The upload's header. A deflated DICOM is inflated whole even for that, so its peek holds
    a share of the budget too (measured first by streaming, without holding it)."""
    max_pixels = state.settings.max_pixels
    try:
        inflated = await run_in_threadpool(inflated_bytes, upload.data, max_pixels)
        async with state.budget.reserve(2 * inflated, f"the deflated DICOM in {upload.what}"):
            return await run_in_threadpool(peek_image, upload.data, max_pixels)
    except ImageDecodeError as err:
        raise from_decode_error(err, upload.what) from err


async def _decode(state: AppState, upload: Upload, max_side: int) -> DecodedImage:
    try:
        return await run_in_threadpool(decode_image, upload.data, state.settings.max_pixels, max_side)
    except ImageDecodeError as err:
        raise from_decode_error(err, upload.what) from err


def _check_request_pixels(state: AppState, headers: list[ImageHeader]) -> None:
    total, limit = sum(h.width * h.height for h in headers), state.settings.max_request_pixels
    if total > limit:
        raise ApiError(413, f"the request's {len(headers)} images hold {total} pixels together; the limit "
                            f"is {limit} per request (ACE_MAX_REQUEST_PIXELS): send fewer or smaller images")


def _describe(uploads: list[Upload]) -> str:
    return "the uploaded image" if len(uploads) == 1 else f"the {len(uploads)} uploaded images"


def base_input(image: DecodedImage, encoder: Encoder) -> tuple[torch.Tensor, CoordinateMap]:
    """The image's uint8 model input at the encoder's size (made from its `encoder_view`, as the
    index makes it) and its coordinate map. Call from a worker thread: it resizes."""
    size = encoder.spec.img_size
    return prepare(encoder_view(image, size, encoder.spec.reads_grey), size, encoder.grid)


def model_bytes(encoder: Encoder, header: ImageHeader, max_look: int) -> int:
    """Upper bound of one image's encoder view (encoder_view copies the decoded pixels into Pillow:
    RGB, its 4-byte RGBX image and the averaged or resized result; grey: the L image and the
    result) and its model inputs and embeddings at its base size and every look."""
    size = encoder.spec.img_size
    factor = reduction_factor(header.width, header.height, decode_side(size))
    decoded_pixels = -(-header.width // factor) * -(-header.height // factor)
    view = decoded_pixels * (VIEW_COLOUR_BYTES if header.channels >= 3 else VIEW_GREY_BYTES)
    scales = (1, *look_scales(header.width, header.height, size, max_look)) if encoder.spec.is_dense else (1,)
    per_pixel = 3 + encoder.dim / (size / encoder.grid) ** 2  # input channels + coarse vectors
    levels = encoder.levels().get("fine")
    if levels is not None:
        per_pixel += levels["dim"] / levels["stride"] ** 2
    return view + int(WORK_FACTOR * FLOAT * per_pixel * sum((s * size) ** 2 for s in scales))


async def embed(state: AppState, tensors: list[torch.Tensor], encoder: Encoder) -> list[Embedded]:
    """Every tensor through the worker; a full queue refuses them all (429, counted)."""
    try:
        return await state.batcher.embed(tensors, encoder)
    except QueueFullError as err:
        state.metrics.rejected.inc(len(tensors))
        raise ApiError(429, str(err), headers={"Retry-After": "1"}) from err
    except WorkerDownError as err:
        raise ApiError(503, str(err)) from err
