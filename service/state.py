"""What one app instance holds, as `app.state.ace` (an AppState); routes reach it via `app_state`."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from ace_model.encoder import Encoder
from service.batcher import Batcher
from service.config import Settings
from service.index_holder import IndexHolder
from service.metrics import Metrics


@dataclass
class AppState:
    settings: Settings  # the resolved settings of this app
    encoder: Encoder  # owned by the batcher's worker: never call it from a handler
    batcher: Batcher  # `await batcher.embed([tensor, ...])` -> patch grids
    index: IndexHolder  # `with index.lease() as patch_index:` (None when no index is served)
    metrics: Metrics  # this app's Prometheus registry
    warmed_up: bool = False  # a first forward pass has run


def app_state(request: Request) -> AppState:
    state = request.app.state.ace
    assert isinstance(state, AppState)
    return state
