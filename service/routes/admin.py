"""Admin routes: they need the API key (header `X-API-Key` or `Authorization: Bearer`), and answer
403 while the service has none configured."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from service.errors import ApiError, documented
from service.schemas import ReloadResponse
from service.state import app_state

# failed: the version is fine but loading its encoder failed (e.g. out of memory); retried later
RELOAD_STATUS = {"swapped": 200, "unchanged": 200, "refused": 409, "missing": 404, "failed": 503,
                 "disabled": 409}


def require_api_key(
    request: Request,
    x_api_key: Annotated[str | None, Header()] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> None:
    """403 while no key is configured (admin is off by default), 401 for a missing or wrong key."""
    if app_state(request).settings.api_key is None:
        raise ApiError(403, "admin routes are disabled: start the service with ACE_API_KEY set "
                            "(or `ace serve --api-key`) to use them")
    if not has_api_key(request, x_api_key, authorization):
        raise ApiError(401, "missing or wrong API key: send it in the X-API-Key header",
                       headers={"WWW-Authenticate": "Bearer"})


def has_api_key(request: Request, x_api_key: str | None, authorization: str | None) -> bool:
    """The request carries the configured key (compared in constant time); False without a key."""
    expected = app_state(request).settings.api_key
    given = x_api_key or _bearer(authorization)
    if expected is None or given is None:
        return False
    return secrets.compare_digest(given.encode(), expected.get_secret_value().encode())


def _bearer(authorization: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_api_key)])


@router.post("/reload", response_model=ReloadResponse,
             responses={**documented(401, 403), 404: {"model": ReloadResponse},
                        409: {"model": ReloadResponse}, 503: {"model": ReloadResponse}})
async def reload(request: Request, force: bool = False) -> JSONResponse:
    """Serve the version CURRENT names, with its encoder (force: reopen even if unchanged)."""
    state = app_state(request)
    result = await run_in_threadpool(state.served.reload, force)
    state.metrics.index_swaps.labels(result.status).inc()
    body = ReloadResponse(status=result.status, version=result.version, detail=result.detail)
    return JSONResponse(body.model_dump(), status_code=RELOAD_STATUS[result.status])
