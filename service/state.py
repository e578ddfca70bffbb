"""What one app instance holds, as `app.state.ace` (an AppState); routes reach it via `app_state`."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from service.batcher import Batcher
from service.budget import MemoryBudget
from service.config import Settings
from service.generations import GenerationHolder
from service.metrics import Metrics


@dataclass
class AppState:
    settings: Settings  # the resolved settings of this app
    batcher: Batcher  # `await batcher.embed([tensor, ...], generation.encoder)` -> patch grids
    served: GenerationHolder  # `with served.lease() as generation:` -> its encoder and index (or None)
    metrics: Metrics  # this app's Prometheus registry
    budget: MemoryBudget  # images' working memory, reserved per request (service/pipeline.py)
    warmed_up: bool = False  # a first forward pass has run


def app_state(request: Request) -> AppState:
    state = request.app.state.ace
    assert isinstance(state, AppState)
    return state
