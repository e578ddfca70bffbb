"""Liveness, readiness and a description of what is served."""

from __future__ import annotations

from typing import Annotated

import torch
from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse

from ace_model.encoder import Encoder
from ace_model.index import PatchIndex
from service.errors import documented
from service.generations import Generation
from service.routes.admin import has_api_key
from service.schemas import BatchingInfo, EncoderInfo, Health, IndexInfo, Info, Limits, Readiness
from service.state import AppState, app_state

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health, responses=documented(has_inputs=False))
async def health() -> Health:
    return Health(status="ok")


@router.get("/ready", response_model=Readiness,
            responses={**documented(has_inputs=False), 503: {"model": Readiness}})
async def ready(request: Request) -> JSONResponse:
    readiness = _readiness(app_state(request))
    return JSONResponse(readiness.model_dump(), status_code=200 if readiness.ready else 503)


def _readiness(state: AppState) -> Readiness:
    index_loaded = state.served.current.index is not None
    needs_index = state.settings.index_root is not None
    worker_problem = state.batcher.problem()
    ready = state.warmed_up and (index_loaded or not needs_index) and worker_problem is None
    if worker_problem is not None:
        detail = worker_problem
    elif not state.warmed_up:
        detail = "warming up the encoder"
    elif needs_index and not index_loaded:
        detail = f"no index served: {state.served.problem or 'none published yet'}"
    else:
        detail = "ready"
    return Readiness(ready=ready, encoder_loaded=True, warmed_up=state.warmed_up,
                     index_loaded=index_loaded, detail=detail)


@router.get("/info", response_model=Info, responses=documented())
async def info(
    request: Request,
    x_api_key: Annotated[str | None, Header()] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> Info:
    """What is served. Filesystem paths only for a request with the API key."""
    state = app_state(request)
    with state.served.lease() as generation:
        return _info(state, generation, show_paths=has_api_key(request, x_api_key, authorization))


def _info(state: AppState, generation: Generation, show_paths: bool) -> Info:
    settings = state.settings
    root = settings.index_root if show_paths else None
    return Info(encoder=_encoder_info(generation.encoder), index=_index_info(generation.index),
                index_root=str(root) if root else None,
                limits=Limits(max_upload_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels,
                              max_request_pixels=settings.max_request_pixels,
                              memory_budget_mb=settings.memory_budget_mb,
                              max_points=settings.max_points, max_targets=settings.max_targets,
                              max_image_ids=settings.max_image_ids, max_k=settings.max_k),
                batching=_batching_info(state))


def _encoder_info(encoder: Encoder) -> EncoderInfo:
    return EncoderInfo(fingerprint=encoder.fingerprint, backbone=encoder.spec.backbone,
                       img_size=encoder.spec.img_size, grid=encoder.grid, dim=encoder.dim)


def _index_info(index: PatchIndex | None) -> IndexInfo | None:
    if index is None:
        return None
    return IndexInfo(version=index.version, num_images=index.num_images, num_patches=index.num_patches)


def _batching_info(state: AppState) -> BatchingInfo:
    config = state.batcher.config
    policy = config.policy
    return BatchingInfo(device=str(policy.device), autocast=policy.precision != "fp32",
                        precision=policy.precision,
                        max_batch_size=config.max_batch_size, max_wait_ms=config.max_wait_ms,
                        queue_size=config.queue_size, threads=torch.get_num_threads())
