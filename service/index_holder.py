"""Holds the served PatchIndex version and swaps in newly published ones without dropping requests.

A request takes a lease (`with holder.lease() as index:`) and keeps that version for its whole
life. A swap replaces the current version atomically; the old one is closed when its last lease
ends, so in-flight requests finish on the version they started with.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ace_model.index import EncoderMismatchError, IndexNotFoundError, PatchIndex, current_version

log = logging.getLogger("ace.service.index")

ReloadStatus = Literal["swapped", "unchanged", "refused", "missing", "disabled"]


@dataclass(frozen=True)
class ReloadResult:
    status: ReloadStatus
    version: str | None  # the version served after the reload
    detail: str


class _Slot:
    """One opened version plus the number of requests still using it."""

    def __init__(self, index: PatchIndex) -> None:
        self.index = index
        self.users = 0
        self.retired = False


class IndexHolder:
    def __init__(self, root: Path | None, encoder_fingerprint: str) -> None:
        self.root = root
        self.encoder_fingerprint = encoder_fingerprint
        self._slot: _Slot | None = None
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()  # one reload at a time (admin route and poller)
        self._refused: set[str] = set()  # versions from another encoder: logged once, not reopened

    @property
    def current(self) -> PatchIndex | None:
        slot = self._slot
        return slot.index if slot is not None else None

    @property
    def version(self) -> str | None:
        index = self.current
        return index.version if index is not None else None

    @contextlib.contextmanager
    def lease(self) -> Iterator[PatchIndex | None]:
        with self._lock:
            slot = self._slot
            if slot is not None:
                slot.users += 1
        try:
            yield slot.index if slot is not None else None
        finally:
            if slot is not None:
                self._release(slot)

    def _release(self, slot: _Slot) -> None:
        with self._lock:
            slot.users -= 1
            close_now = slot.retired and slot.users == 0
        if close_now:
            slot.index.close()

    def reload(self, force: bool = False) -> ReloadResult:
        """Open the published version if it differs from the served one (or always when force)."""
        if self.root is None:
            return ReloadResult("disabled", None, "no index root configured (set ACE_INDEX_ROOT)")
        with self._reload_lock:
            published = current_version(self.root)
            if published is None:
                return ReloadResult("missing", self.version, f"no published index under {self.root}")
            if published == self.version and not force:
                return ReloadResult("unchanged", published, f"already serving {published}")
            if published in self._refused and not force:
                return ReloadResult("refused", self.version, f"index {published} was refused earlier "
                                    "(another encoder built it); see the log")
            return self._open_and_swap(self.root, published)

    def _open_and_swap(self, root: Path, version: str) -> ReloadResult:
        try:
            index = PatchIndex.open(root, version, expected_encoder=self.encoder_fingerprint)
        except EncoderMismatchError as err:
            log.error("refusing index %s under %s: built by another encoder (%s); still serving %s",
                      version, root, err, self.version)
            self._refused.add(version)
            return ReloadResult("refused", self.version, f"index {version} refused: {err}")
        except IndexNotFoundError as err:
            log.error("cannot open index %s under %s: %s; still serving %s", version, root, err,
                      self.version)
            return ReloadResult("missing", self.version, str(err))
        self._replace(_Slot(index))
        log.info("now serving index %s (%d images, %d patches)", index.version, index.num_images,
                 index.num_patches)
        return ReloadResult("swapped", index.version, f"now serving {index.version}")

    def _replace(self, slot: _Slot | None) -> None:
        with self._lock:
            old, self._slot = self._slot, slot
            if old is None:
                return
            old.retired = True
            close_now = old.users == 0
        if close_now:
            old.index.close()

    def close(self) -> None:
        self._replace(None)
