"""The FastAPI app factory.

`create_app(settings)` builds an app; its lifespan loads the encoder, starts the inference
worker, runs a warm-up forward pass, opens the published index and polls for new versions.
Everything lives in `app.state.ace` (a `service.state.AppState`: settings, encoder, batcher,
index holder, metrics) so that optional routers such as the viewer can reuse it.
uvicorn runs `service.main:create_app_from_env` with `factory=True` (settings from ACE_ env vars).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from collections.abc import AsyncIterator

import torch
from fastapi import APIRouter, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from ace_model.encoder import load_encoder
from service.batcher import Batcher, BatcherConfig, resolve_device
from service.config import Settings
from service.errors import install_error_handlers
from service.index_holder import IndexHolder
from service.limits import BodyLimitMiddleware
from service.metrics import Metrics, RequestMetricsMiddleware
from service.routes import admin, health, match, metrics
from service.state import AppState

log = logging.getLogger("ace.service")

VIEWER_MODULE = "service.routes.viewer"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def create_app(settings: Settings) -> FastAPI:
    app_metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = _start(settings, app_metrics)
        app.state.ace = state
        poller = asyncio.create_task(_poll_index(state)) if settings.poll_interval_s > 0 else None
        try:
            await _warm_up(state)
            yield
        finally:
            if poller is not None:
                poller.cancel()
            state.batcher.stop()
            state.index.close()

    app = FastAPI(title="ACE correspondence service", version="0.1.0", lifespan=lifespan,
                  description="Patch retrieval and cross-patient anatomical correspondence for chest X-rays.")
    _add_middleware(app, settings, app_metrics)
    install_error_handlers(app)
    for router in _routers():
        app.include_router(router)
    return app


def create_app_from_env() -> FastAPI:
    settings = Settings()  # type: ignore[call-arg]  # required fields come from ACE_ env vars
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    return create_app(settings)


def _routers() -> list[APIRouter]:
    routers = [match.router, health.router, metrics.router, admin.router]
    try:
        viewer = importlib.import_module(VIEWER_MODULE)
    except ModuleNotFoundError as err:
        if err.name != VIEWER_MODULE:
            raise
        return routers
    return [*routers, viewer.router]


def _add_middleware(app: FastAPI, settings: Settings, app_metrics: Metrics) -> None:
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST"], allow_headers=["*"])
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(RequestMetricsMiddleware, metrics=app_metrics)


def _start(settings: Settings, app_metrics: Metrics) -> AppState:
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    encoder = load_encoder(settings.encoder)
    device = resolve_device(settings.device)
    config = BatcherConfig(settings.max_batch_size, settings.max_wait_ms, settings.queue_size,
                           device, settings.autocast)
    batcher = Batcher(encoder, config, app_metrics.observe_batch)
    batcher.start()
    holder = IndexHolder(settings.index_root, encoder.fingerprint)
    result = holder.reload()
    log.info("encoder %s (%s) on %s; index: %s", encoder.fingerprint, encoder.spec.backbone, device,
             result.detail)
    return AppState(settings, encoder, batcher, holder, app_metrics)


async def _warm_up(state: AppState) -> None:
    size = state.encoder.spec.img_size
    await state.batcher.embed([torch.zeros(3, size, size)])
    state.warmed_up = True


async def _poll_index(state: AppState) -> None:
    while True:
        await asyncio.sleep(state.settings.poll_interval_s)
        try:
            result = await asyncio.to_thread(state.index.reload)
        except Exception:  # a broken version on disk must not stop the poller
            log.exception("index poll failed; still serving %s", state.index.version)
            continue
        if result.status == "swapped":
            state.metrics.index_swaps.labels(result.status).inc()
