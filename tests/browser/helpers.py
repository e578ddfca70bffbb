"""What the viewer tests share with their fixtures (tests/browser/conftest.py builds a Corpus)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PHANTOM_SIZE = 256  # side of the corpus's phantom PNGs


@dataclass(frozen=True)
class Corpus:
    encoder_dir: Path
    index_root: Path
    query: Path  # a phantom PNG outside the index
    query_landmarks: dict[str, tuple[float, float]]
    target: Path  # another phantom PNG outside the index
    indexed: list[str]  # image ids in the index
    unstored_thumbnail: str  # an indexed id whose thumbnail is made from its source on request
