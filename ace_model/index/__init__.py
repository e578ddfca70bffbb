"""The patch index: every valid patch of a corpus in FAISS, plus what a hit needs to be useful.

Root layout (docs/index.md has the user's view):
    ROOT/CURRENT                  name of the published version, replaced atomically
    ROOT/HISTORY                  published versions, oldest first (JSON list; rollback walks it)
    ROOT/versions/<version>/      complete versions only
        manifest.json             encoder fingerprint, counts, index type and parameters, timings
        index.faiss               FAISS index over packed ids
        grid/<first>.npy          float16 (n, h, w, D) patch grids, memory-mapped; rows are image indexes
        meta.sqlite               one row per image: ids, source, size, CoordinateMap, valid mask
        thumbnails/<index>.jpg    <= 512 px previews for the viewer (.png in older versions)
    ROOT/encoders/<fingerprint>/  the encoders that built the kept versions
    ROOT/.building/<version>/     work in progress, renamed into versions/ only when complete

Two audiences, one module each: readers (the service) open and search a version
(`search.PatchIndex`) and find the published one (`layout`); writers (`ace index`) build versions
(`build`), publish, roll back and prune them (`layout`). `params` holds the index parameters,
`stores` the metadata database, the grid store and the packed FAISS ids.

Every name is importable from `ace_model.index`; all but the parameters load on first use, so
that building the `ace` parser (which shows their defaults) imports neither FAISS nor torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ace_model.index.params import DEFAULT_KEEP, INDEX_TYPES, IndexParams, resolve_kind

__all__ = [  # names from the parameters (loaded with the package) and the four lazy submodules
    "ADD_BATCH_IMAGES", "BUILDING_DIR", "CURRENT_FILE", "DB_FILE", "DEFAULT_KEEP",
    "EXACT_RESTRICT_MAX_PATCHES", "EXCLUDE_OVERFETCH_MAX", "FAISS_FILE", "GRID_DIR", "HISTORY_FILE",
    "INDEX_FORMAT", "INDEX_TYPES", "MANIFEST_FILE", "PATCH_BITS", "PATCH_MASK", "STORE_GRACE_S",
    "THUMB_DIR", "THUMB_SUFFIX", "VERSIONS_DIR", "EncoderMismatchError", "ImageRecord",
    "IndexFormatError", "IndexNotFoundError", "IndexParams", "Manifest", "PatchHit", "PatchIndex",
    "Segment", "UnknownImageError", "configure_faiss", "create_version", "current_version",
    "extend_version", "faiss", "find_thumbnail", "list_versions", "new_version_name", "pack_ids", "prune",
    "publish", "read_manifest", "remove_images", "resolve_kind", "rollback", "unit_rows", "unpack_ids",
    "version_dir",
]
_LAZY_MODULES = ("layout", "stores", "build", "search")  # searched in this order


def __getattr__(name: str) -> Any:
    if name in __all__:
        for home in _LAZY_MODULES:
            module = importlib.import_module(f"{__name__}.{home}")
            if hasattr(module, name):
                globals()[name] = value = getattr(module, name)  # later lookups skip this function
                return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # what type checkers see (tests/test_index.py checks it matches __all__)
    import faiss as faiss

    from ace_model.index.build import create_version, extend_version, remove_images
    from ace_model.index.layout import (
        BUILDING_DIR,
        CURRENT_FILE,
        DB_FILE,
        FAISS_FILE,
        GRID_DIR,
        HISTORY_FILE,
        INDEX_FORMAT,
        MANIFEST_FILE,
        STORE_GRACE_S,
        THUMB_DIR,
        THUMB_SUFFIX,
        VERSIONS_DIR,
        EncoderMismatchError,
        IndexFormatError,
        IndexNotFoundError,
        Manifest,
        UnknownImageError,
        current_version,
        list_versions,
        new_version_name,
        prune,
        publish,
        read_manifest,
        rollback,
        version_dir,
    )
    from ace_model.index.search import EXACT_RESTRICT_MAX_PATCHES, EXCLUDE_OVERFETCH_MAX, PatchHit, PatchIndex
    from ace_model.index.stores import (
        ADD_BATCH_IMAGES,
        PATCH_BITS,
        PATCH_MASK,
        ImageRecord,
        Segment,
        configure_faiss,
        find_thumbnail,
        pack_ids,
        unit_rows,
        unpack_ids,
    )
