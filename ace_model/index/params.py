"""The knobs of an index version: the FAISS index type and its parameters, and how many
published versions are kept. No numpy, FAISS or torch here: `ace index build --help` shows
these defaults."""

from __future__ import annotations

from dataclasses import dataclass

from ace_model.errors import InputError

INDEX_TYPES = ("auto", "flat", "ivfpq", "hnsw")
DEFAULT_KEEP = 3  # published versions kept on disk (plus the current and its rollback target)


@dataclass(frozen=True)
class IndexParams:
    kind: str = "auto"  # auto | flat | ivfpq | hnsw
    flat_max_patches: int = 1_000_000  # auto picks flat up to this many patches, ivfpq beyond
    nlist: int = 0  # IVF lists; 0 = 4 * sqrt(num_patches) clipped to [16, 65536]
    pq_bytes: int = 48  # PQ code bytes per patch (sub-quantiser count rounded to a divisor of D)
    # ivfpq: learn a rotation (OPQ) before PQ; on trained patch embeddings (variance in ~16 of 192
    # directions) plain PQ's 4-dimension sub-spaces split it badly (benchmarks/index.md)
    opq: bool = True
    pq_bits: int = 8  # bits per sub-quantiser code: 8, or 4 (twice the sub-quantisers, fast to train)
    # defaults: recall@10 0.988 / 0.985 at 1M / 5M patches (benchmarks/index.md); with L2 candidates
    # a deeper re-rank adds nothing, more lists probed a little
    nprobe: int = 16  # default IVF lists visited per query
    rerank: int = 10  # ivfpq: re-rank k * rerank PQ candidates exactly from the grid store
    hnsw_m: int = 32  # HNSW neighbours per node
    ef_construction: int = 80  # HNSW build breadth
    ef_search: int = 128  # default HNSW search breadth
    train_size: int = 200_000  # patches sampled to train the quantisers (at least 40 per IVF list)
    seed: int = 0  # training sample seed

    def __post_init__(self) -> None:
        if self.kind not in INDEX_TYPES:
            raise InputError(f"unknown index type {self.kind!r}; choose one of {INDEX_TYPES}")
        if self.pq_bits not in (4, 8):
            raise InputError(f"pq_bits must be 4 or 8, got {self.pq_bits}")


def resolve_kind(params: IndexParams, num_patches: int) -> str:
    if params.kind != "auto":
        return params.kind
    return "flat" if num_patches <= params.flat_max_patches else "ivfpq"
