"""GET /metrics in the Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.errors import documented
from service.state import AppState, app_state

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus metrics"},
                       **documented(has_inputs=False)})
async def metrics(request: Request) -> Response:
    state = app_state(request)
    _refresh_gauges(state)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _refresh_gauges(state: AppState) -> None:
    state.metrics.queue_depth.set(state.batcher.depth)
    with state.served.lease() as generation:  # a swap must not close the index while it is read
        index = generation.index
        state.metrics.index_images.set(index.num_images if index else 0)
        state.metrics.index_patches.set(index.num_patches if index else 0)
