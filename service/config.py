"""Service settings: every field is also an environment variable with the `ACE_` prefix."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ACE_", extra="ignore")

    encoder: Path  # encoder artifact directory (required)
    index_root: Path | None = None  # index root (versions/ + CURRENT); None runs without an index
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when available
    autocast: bool = True  # fp16/bf16 autocast on CUDA (CPU always runs fp32)
    threads: int | None = Field(None, ge=1)  # torch intra-op threads; None keeps torch's default
    worker_stall_s: float = Field(120.0, gt=0)  # one forward pass longer than this: /ready says 503
    max_batch_size: int = Field(8, ge=1, le=1024)  # images per forward pass
    max_wait_ms: float = Field(5.0, ge=0)  # how long the worker waits to fill a batch
    queue_size: int = Field(64, ge=1)  # images waiting for the worker; beyond it requests get 429
    max_upload_bytes: int = Field(32 * 1024 * 1024, ge=1024)  # whole request body, checked while read
    max_pixels: int = Field(64_000_000, ge=4)  # decoded pixels per image (decompression bombs)
    max_request_pixels: int = Field(160_000_000, ge=4)  # decoded pixels of all uploads of one request
    memory_budget_mb: int = Field(2048, ge=16)  # working memory of all uploads being decoded and
    # answered at once in this process; a request waits for its share (docs/service.md)
    memory_wait_s: float = Field(30.0, ge=0)  # longest wait for that share before a 429
    max_points: int = Field(64, ge=1)  # points or boxes per request
    max_targets: int = Field(8, ge=0)  # uploaded target images per request
    max_image_ids: int = Field(32, ge=0)  # indexed image ids per request
    max_k: int = Field(100, ge=1)  # largest k (matches per point)
    max_look: int = 4  # dense encoders: re-search each match at 2x and 4x the encoder's
    # size, as far as the images' own resolution goes; 1 = no second look (docs/service.md)
    locate_hits: int = Field(8, ge=0)  # distinct index-hit images per request located at fine
    # precision (their previews embedded once more); 0 = patch centres only
    poll_interval_s: float = Field(10.0, ge=0)  # CURRENT pointer poll; 0 disables polling
    api_key: SecretStr | None = None  # admin routes need it; without one they answer 403
    cors_origins: Annotated[list[str], NoDecode] = []  # comma-separated allowed origins
    log_level: str = "info"

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @field_validator("max_look")
    @classmethod
    def _known_look(cls, value: int) -> int:
        if value not in (1, 2, 4):
            raise ValueError(f"ACE_MAX_LOOK must be 1 (no second look), 2 or 4; got {value}")
        return value

    @model_validator(mode="after")
    def _queue_fits_a_request(self) -> Settings:
        inputs = 1 + {1: 0, 2: 1, 4: 2}[self.max_look]  # each image and its second looks
        needed = (1 + self.max_targets) * inputs
        if self.queue_size < needed:
            raise ValueError(f"ACE_QUEUE_SIZE ({self.queue_size}) must hold one request's images and "
                             f"their second looks: at least (1 + ACE_MAX_TARGETS) x {inputs} = {needed} "
                             "(or lower ACE_MAX_LOOK)")
        return self


class ConnectionSettings(BaseSettings):
    """Limits of the HTTP connection itself, applied by uvicorn's protocol (service/protocol.py)."""

    model_config = SettingsConfigDict(env_prefix="ACE_", extra="ignore")

    max_header_bytes: int = Field(16 * 1024, ge=1024)  # request line + headers; beyond: 431
    header_timeout_s: float = Field(10.0, gt=0)  # request line + headers must arrive within this
    body_timeout_s: float = Field(60.0, gt=0)  # the whole body must arrive within this
