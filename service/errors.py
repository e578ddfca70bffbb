"""User-facing errors: one exception type carrying the status code and a message that says what to do."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ace_model.preprocess import ImageDecodeError

DECODE_STATUS = {
    "unsupported": 415,  # not an image format we read
    "corrupt": 422,  # a known format whose content is broken or truncated
    "multiframe": 422,
    "too_large": 413,  # too many pixels once decoded
}


class ApiError(Exception):
    def __init__(self, status_code: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.headers = headers


def invalid(detail: str) -> ApiError:
    return ApiError(422, detail)


def from_decode_error(err: ImageDecodeError, what: str) -> ApiError:
    return ApiError(DECODE_STATUS.get(err.kind, 422), f"{what}: {err}")


async def _api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error_handler)
