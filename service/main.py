"""The FastAPI app factory.

`create_app(settings)` builds an app; its lifespan starts the inference worker, loads and warms
up the encoder, opens the published index and polls for new versions (a version built by a new
encoder brings that encoder in with it: see service/generations.py). Everything lives in
`app.state.ace` (a `service.state.AppState`: settings, batcher, served generation, metrics) so
that optional routers such as the viewer can reuse it.
uvicorn runs `service.main:create_app_from_env` with `factory=True` (settings from ACE_ env vars).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from fastapi import APIRouter, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

from ace_model.embedding import EmbeddingPolicy
from ace_model.encoder import Encoder, load_encoder
from service.batcher import Batcher, BatcherConfig
from service.budget import MB, MemoryBudget
from service.config import Settings
from service.errors import RequestIdMiddleware, install_error_handlers
from service.generations import Generation, GenerationHolder
from service.limits import BodyLimitMiddleware
from service.metrics import Metrics, RequestMetricsMiddleware
from service.routes import admin, health, match, metrics, viewer
from service.state import AppState

log = logging.getLogger("ace.service")

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
            state.served.close()

    # /docs and /redoc load Swagger UI and ReDoc from this service (fastapi-offline), not from a CDN
    app = FastAPIOffline(title="ACE correspondence service", version="0.1.0", lifespan=lifespan,
                         description="Patch retrieval and cross-patient anatomical correspondence "
                                     "for chest X-rays.")
    # registered once per app (a lifespan may run more than once): reads the running worker's
    app_metrics.track_worker_cpu(lambda: _worker_cpu_s(app))
    _add_middleware(app, settings, app_metrics)
    install_error_handlers(app)
    for router in _routers():
        app.include_router(router)
    return app


def _worker_cpu_s(app: FastAPI) -> float:
    state: AppState | None = getattr(app.state, "ace", None)
    return state.batcher.worker_cpu_s if state is not None else 0.0


def create_app_from_env() -> FastAPI:
    settings = Settings()  # type: ignore[call-arg]  # required fields come from ACE_ env vars
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    return create_app(settings)


def _routers() -> list[APIRouter]:
    return [match.router, health.router, metrics.router, admin.router, viewer.router]


def _add_middleware(app: FastAPI, settings: Settings, app_metrics: Metrics) -> None:
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST"], allow_headers=["*"])
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(RequestMetricsMiddleware, metrics=app_metrics)
    app.add_middleware(RequestIdMiddleware)  # added last = outermost: ids and 500s for all of the above


def _start(settings: Settings, app_metrics: Metrics) -> AppState:
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    policy = EmbeddingPolicy.resolve(settings.device, settings.autocast)
    config = BatcherConfig(settings.max_batch_size, settings.max_wait_ms, settings.queue_size,
                           policy, settings.worker_stall_s)
    batcher = Batcher(config, app_metrics.observe_batch)
    batcher.start()

    def load_ready(directory: Path, fingerprint: str) -> Encoder:
        return batcher.prepare(load_encoder(directory, expected_fingerprint=fingerprint))

    encoder = policy.place(load_encoder(settings.encoder))  # warmed up by the lifespan
    served = GenerationHolder(Generation(encoder, None), settings.index_root, settings.encoder, load_ready)
    result = served.reload()
    log.info("encoder %s (%s) on %s (%s); index: %s", served.current.encoder.fingerprint,
             encoder.spec.backbone, policy.device, policy.precision, result.detail)
    budget = MemoryBudget(settings.memory_budget_mb * MB, settings.memory_wait_s)
    return AppState(settings, batcher, served, app_metrics, budget)


async def _warm_up(state: AppState) -> None:
    encoder = state.served.current.encoder
    size = encoder.spec.img_size
    await state.batcher.embed([torch.zeros(3, size, size, dtype=torch.uint8)], encoder)
    state.warmed_up = True


async def _poll_index(state: AppState) -> None:
    while True:
        await asyncio.sleep(state.settings.poll_interval_s)
        try:
            result = await asyncio.to_thread(state.served.reload)
        except Exception:  # a broken version on disk must not stop the poller
            log.exception("index poll failed; still serving %s", state.served.current.version)
            continue
        if result.status == "swapped":
            state.metrics.index_swaps.labels(result.status).inc()
