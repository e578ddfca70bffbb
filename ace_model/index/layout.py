"""An index root on disk and its versions: names and paths, the manifest, publishing (an atomic
pointer switch), rollback and pruning. This is what readers need to find a version and what
`ace index publish | rollback | list` change; building lives in ace_model.index.build.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ace_model.encoder import ENCODER_STORE
from ace_model.errors import UserError
from ace_model.index.params import DEFAULT_KEEP

INDEX_FORMAT = 1
CURRENT_FILE = "CURRENT"
HISTORY_FILE = "HISTORY"
VERSIONS_DIR = "versions"
BUILDING_DIR = ".building"
MANIFEST_FILE = "manifest.json"
FAISS_FILE = "index.faiss"
DB_FILE = "meta.sqlite"
GRID_DIR = "grid"
THUMB_DIR = "thumbnails"
THUMB_SUFFIX = ".jpg"
STORE_GRACE_S = 24 * 3600  # a stored encoder younger than this is kept: a build may be using it


class IndexNotFoundError(UserError, FileNotFoundError):
    """No index root, no published version, or an unknown version."""


class EncoderMismatchError(UserError, RuntimeError):
    """The index was built by a different encoder than the reader's."""


class IndexFormatError(UserError, RuntimeError):
    """A version directory that is incomplete, corrupt or of an unknown format."""


class UnknownImageError(UserError, KeyError):
    """Image ids that are not in the index version."""

    def __str__(self) -> str:  # KeyError's would quote the message
        return str(self.args[0]) if self.args else ""

@dataclass(frozen=True)
class Manifest:
    """A version's manifest.json: the fields callers read, typed; `raw` holds all of it."""

    version: str
    encoder_fingerprint: str
    index_type: str  # flat | ivfpq | hnsw
    num_images: int
    num_patches: int
    next_image_index: int  # first image index a version derived from this one may use
    bytes_per_patch: float  # FAISS file bytes per indexed patch
    build: dict[str, Any]  # how it was built: encoder, sources, device and precision, failures
    raw: dict[str, Any]


def read_manifest(root: str | Path, version: str | None = None) -> Manifest:
    """The manifest of `version` (None: the published one). IndexNotFoundError when there is no such
    complete version, IndexFormatError when it is of another format."""
    root = Path(root)
    raw = load_manifest(version_dir(root, resolve_version(root, version)))
    index = raw["index"]
    return Manifest(raw["version"], raw["encoder_fingerprint"], index["type"], int(raw["num_images"]),
                    int(raw["num_patches"]), int(raw["next_image_index"]),
                    float(index.get("bytes_per_patch", 0.0)), dict(raw.get("build") or {}), raw)


def load_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise IndexNotFoundError(f"no complete index version at {directory} ({MANIFEST_FILE} missing)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != INDEX_FORMAT:
        raise IndexFormatError(f"{path}: index format {manifest.get('format')!r}, expected {INDEX_FORMAT}")
    return dict(manifest)


def resolve_version(root: Path, version: str | None) -> str:
    if version is not None:
        return version
    current = current_version(root)
    if current is None:
        raise IndexNotFoundError(
            f"no published index under {root} (no {CURRENT_FILE} file); build one with "
            "`ace index build ... --publish` or publish one with `ace index publish VERSION`"
        )
    return current


def check_encoder(manifest: dict[str, Any], expected: object, where: Path) -> None:
    if expected is None:
        return
    fingerprint = expected if isinstance(expected, str) else getattr(expected, "fingerprint", None)
    if fingerprint != manifest["encoder_fingerprint"]:
        raise EncoderMismatchError(
            f"index {where} was built by encoder {manifest['encoder_fingerprint']}, but the loaded "
            f"encoder is {fingerprint}; rebuild the index with this encoder (`ace index build`) or "
            "load the encoder the index was built with"
        )


def new_version_name() -> str:
    """Sortable, unique within a process: UTC time to the microsecond."""
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")


def version_dir(root: str | Path, version: str) -> Path:
    return Path(root) / VERSIONS_DIR / version


def list_versions(root: str | Path) -> list[str]:
    """Complete versions, oldest first."""
    folder = Path(root) / VERSIONS_DIR
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if (p / MANIFEST_FILE).is_file())


def current_version(root: str | Path) -> str | None:
    pointer = Path(root) / CURRENT_FILE
    if not pointer.is_file():
        return None
    return pointer.read_text().strip() or None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _history(root: Path) -> list[str]:
    path = root / HISTORY_FILE
    return list(json.loads(path.read_text())) if path.is_file() else []


def publish(root: str | Path, version: str, keep: int = DEFAULT_KEEP) -> None:
    """Point CURRENT at `version` atomically, record it for rollback, prune old versions."""
    root = Path(root)
    if not (version_dir(root, version) / MANIFEST_FILE).is_file():
        raise IndexNotFoundError(f"no complete version {version!r} under {root / VERSIONS_DIR}")
    history = [v for v in _history(root) if v != version] + [version]
    _write_atomic(root / HISTORY_FILE, json.dumps(history))
    _write_atomic(root / CURRENT_FILE, version + "\n")
    prune(root, keep)


def rollback(root: str | Path) -> str:
    """Publish the previously published version that still exists; returns its name."""
    root = Path(root)
    history = [v for v in _history(root) if (version_dir(root, v) / MANIFEST_FILE).is_file()]
    current = current_version(root)
    if current in history:
        history = history[: history.index(current)]
    if not history:
        raise IndexNotFoundError(f"nothing to roll back to under {root}: no earlier published version")
    _write_atomic(root / HISTORY_FILE, json.dumps(history))
    _write_atomic(root / CURRENT_FILE, history[-1] + "\n")
    return history[-1]


def prune(root: str | Path, keep: int = DEFAULT_KEEP) -> list[str]:
    """Delete all but the `keep` newest versions, never the current one or its rollback target."""
    root = Path(root)
    versions = list_versions(root)
    protected = set(versions[-keep:] if keep > 0 else []) | set(_history(root)[-2:])
    doomed = [v for v in versions if v not in protected]
    for version in doomed:
        shutil.rmtree(version_dir(root, version), ignore_errors=True)
    _prune_encoder_store(root)
    return doomed


def _prune_encoder_store(root: Path) -> None:
    """Drop stored encoders no kept version was built by; young ones may belong to a running build."""
    store = root / ENCODER_STORE
    if not store.is_dir():
        return
    used = {load_manifest(version_dir(root, v)).get("encoder_fingerprint") for v in list_versions(root)}
    cutoff = time.time() - STORE_GRACE_S
    for folder in store.iterdir():
        if folder.name not in used and not folder.name.startswith(".") and folder.stat().st_mtime < cutoff:
            shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def staging(root: Path, version: str) -> Iterator[Path]:
    """A work directory that becomes versions/<version> only if the block completes."""
    work = root / BUILDING_DIR / version
    work.mkdir(parents=True)
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    (root / VERSIONS_DIR).mkdir(exist_ok=True)
    os.replace(work, version_dir(root, version))
