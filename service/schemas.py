"""Request and response models: together with routes/match.py's form fields they ARE the API."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Match(BaseModel):
    image_id: str = Field(description="indexed image holding the matching patch")
    patient_id: str | None = Field(description="that image's patient, when known")
    x: float = Field(description="the query point's location in the hit image, original pixels (x right): "
                                 "located at fine precision when `located`, else the hit patch's centre")
    y: float = Field(description="as x (y down)")
    score: float = Field(description="cosine similarity of the coarse patch with the query's embedding")
    located: bool = Field(False, description="x, y were located at fine precision in the hit image")


class Correspondence(BaseModel):
    target: int | str = Field(description="upload position of the target, or the indexed image id")
    x: float = Field(description="sub-patch refined location, original pixels of the target")
    y: float
    score: float = Field(description="combined coarse + fine cosine similarity at the match")
    confidence: float = Field(description="softmax probability mass of the similarity map near the "
                                          "match, in [0, 1]; calibrated against error in docs/eval.md")
    mutual: bool = Field(description="matching back from the target lands within one coarse cell of "
                                     "the query point (inside the box, for a box)")


class PointResult(BaseModel):
    point: tuple[float, float] = Field(description="the query point (a box's centre), query pixels")
    box: tuple[float, float, float, float] | None = Field(None, description="the query box, if any")
    matches: list[Match] = Field(description="top-k patches over the index, best first")
    correspondences: list[Correspondence] = Field(description="one per target / requested image id")


class Timing(BaseModel):
    queue: float = Field(description="ms waiting for the inference worker (longest image)")
    inference: float = Field(description="ms of the forward pass(es)")
    search: float = Field(description="ms of index search and correspondence")
    total: float = Field(description="ms from request parsed to response built")


class MatchResponse(BaseModel):
    encoder: str = Field(description="fingerprint of the encoder that embedded the images")
    index_version: str | None = Field(description="index version searched; null without an index")
    results: list[PointResult] = Field(description="one per point or box, in request order")
    timing_ms: Timing


class ErrorResponse(BaseModel):
    detail: str = Field(description="what was wrong and what to do about it")
    request_id: str = Field("", description="this request's id, also in the X-Request-ID header; "
                                             "a 500's traceback is logged under it")


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    encoder_loaded: bool
    warmed_up: bool
    index_loaded: bool
    detail: str


class EncoderInfo(BaseModel):
    fingerprint: str
    backbone: str
    img_size: int
    grid: int
    dim: int


class IndexInfo(BaseModel):
    version: str
    num_images: int
    num_patches: int


class Limits(BaseModel):
    max_upload_bytes: int
    max_pixels: int
    max_request_pixels: int
    memory_budget_mb: int
    max_points: int
    max_targets: int
    max_image_ids: int
    max_k: int


class BatchingInfo(BaseModel):
    device: str
    autocast: bool
    precision: str  # fp32 | bf16 | fp16, as ace_model.embedding.EmbeddingPolicy chose
    max_batch_size: int
    max_wait_ms: float
    queue_size: int
    threads: int


class Info(BaseModel):
    encoder: EncoderInfo
    index: IndexInfo | None
    index_root: str | None = Field(description="the index root; only shown to requests with the API key")
    limits: Limits
    batching: BatchingInfo


class ReloadResponse(BaseModel):
    status: str = Field(description="swapped | unchanged | refused | missing | failed | disabled")
    version: str | None = Field(description="the version served after the reload")
    detail: str
