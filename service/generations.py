"""The served generation: an encoder and the index it built, swapped together without a restart.

A request leases the current generation (`with holder.lease() as gen:`) and uses its encoder and
index for its whole life, so a query is never embedded by one encoder and searched in an index
built by another. A reload opens the published index version and finds the encoder that built it
(by fingerprint): in memory (the served one and the one before, so a rollback is immediate), at
ACE_ENCODER (the usual case after `ace export` + `ace index build --publish`), or in the index
root's encoder store, where every index build keeps a copy of its encoder (so a restart between a
retrain and the new index, or after a rollback, still serves the published version). The pair is
warmed up and swapped in as one new generation; the previous one is closed when its last lease
ends.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ace_model.encoder import ENCODER_STORE, ArtifactError, Encoder, read_artifact_meta
from ace_model.index import IndexFormatError, IndexNotFoundError, PatchIndex, current_version

log = logging.getLogger("ace.service.index")

ReloadStatus = Literal["swapped", "unchanged", "refused", "missing", "failed", "disabled"]
EncoderLoader = Callable[[Path, str], Encoder]  # (artifact dir, expected fingerprint) -> ready encoder
CACHED_ENCODERS = 2  # the served encoder and the one before it (a rollback needs no reload)


@dataclass(frozen=True)
class ReloadResult:
    status: ReloadStatus
    version: str | None  # the version served after the reload
    detail: str


@dataclass(frozen=True)
class Generation:
    encoder: Encoder  # on the serving device, in eval mode
    index: PatchIndex | None  # None until a version built by `encoder` is published

    @property
    def version(self) -> str | None:
        return self.index.version if self.index is not None else None


class NoEncoderError(LookupError):
    """No copy of the encoder a version was built by: in memory, at ACE_ENCODER or in the store."""


class _Slot:
    """One generation plus the number of requests still using it."""

    def __init__(self, generation: Generation) -> None:
        self.generation = generation
        self.users = 0
        self.retired = False

    def close(self) -> None:
        if self.generation.index is not None:
            self.generation.index.close()


class GenerationHolder:
    def __init__(self, first: Generation, index_root: Path | None, encoder_dir: Path,
                 load_encoder: EncoderLoader) -> None:
        self.index_root = index_root
        self.encoder_dir = encoder_dir
        self.problem: str | None = None  # why the published version is not served, if it is not
        self._load_encoder = load_encoder
        self._slot = _Slot(first)
        self._encoders = {first.encoder.fingerprint: first.encoder}
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()  # one reload at a time (admin route and poller)
        self._refused: set[tuple[str, str | None]] = set()  # (version, ACE_ENCODER fingerprint)
        self._closed = False

    @property
    def current(self) -> Generation:
        """The served generation, for a glance; a request that uses it must take a lease."""
        return self._slot.generation

    @contextlib.contextmanager
    def lease(self) -> Iterator[Generation]:
        with self._lock:
            slot = self._slot
            slot.users += 1
        try:
            yield slot.generation
        finally:
            self._release(slot)

    def _release(self, slot: _Slot) -> None:
        with self._lock:
            slot.users -= 1
            close_now = slot.retired and slot.users == 0
        if close_now:
            slot.close()

    def reload(self, force: bool = False) -> ReloadResult:
        """Serve the published version if it differs from the served one (or always when force)."""
        if self.index_root is None:
            return ReloadResult("disabled", None, "no index root configured (set ACE_INDEX_ROOT)")
        with self._reload_lock:
            if self._closed:
                return ReloadResult("unchanged", self.current.version, "the service is shutting down")
            result = self._reload(self.index_root, force)
            if result.status in ("swapped", "unchanged"):
                self.problem = None
            elif result.status != "disabled":
                self.problem = result.detail
            return result

    def _reload(self, root: Path, force: bool) -> ReloadResult:
        served = self.current.version
        published = current_version(root)
        if published is None:
            return ReloadResult("missing", served, f"no index published under {root} yet")
        if published == served and not force:
            return ReloadResult("unchanged", published, f"already serving {published}")
        attempt = (published, self._fingerprint_at(self.encoder_dir))
        if attempt in self._refused and not force:
            return ReloadResult("refused", served, f"index {published} was refused earlier: "
                                f"{self.problem or 'see the log'}")
        return self._open_and_swap(root, published, attempt)

    def _open_and_swap(self, root: Path, version: str, attempt: tuple[str, str | None]) -> ReloadResult:
        try:
            index = PatchIndex.open(root, version)
        except IndexNotFoundError as err:  # unpublished or pruned between two reads
            return self._fail("missing", f"cannot open index {version}: {err}")
        except (IndexFormatError, OSError, RuntimeError) as err:  # incomplete or damaged on disk
            self._refused.add(attempt)
            return self._fail("refused", f"index {version} cannot be read: {err}")
        try:
            encoder = self._encoder_for(index.encoder_fingerprint)
        except NoEncoderError as err:
            index.close()
            self._refused.add(attempt)
            return self._fail("refused", f"index {version} refused: {err}")
        except (ArtifactError, RuntimeError) as err:  # e.g. out of memory: retried at the next poll
            index.close()
            return self._fail("failed", f"loading the encoder of index {version} failed: {err}")
        self._replace(_Slot(Generation(encoder, index)))
        log.info("now serving index %s (%d images, %d patches) with encoder %s", index.version,
                 index.num_images, index.num_patches, encoder.fingerprint)
        return ReloadResult("swapped", index.version, f"now serving {index.version}")

    def _fail(self, status: ReloadStatus, detail: str) -> ReloadResult:
        served = self.current.version
        log.error("%s; still serving %s", detail, served or "no index")
        return ReloadResult(status, served, detail)

    def _encoder_for(self, fingerprint: str) -> Encoder:
        """The encoder with this fingerprint: cached, at ACE_ENCODER, or in the index's store."""
        if fingerprint in self._encoders:
            return self._encoders[fingerprint]
        candidates = [self.encoder_dir]
        if self.index_root is not None:
            candidates.append(self.index_root / ENCODER_STORE / fingerprint)
        for directory in candidates:
            if self._fingerprint_at(directory) == fingerprint:
                encoder = self._load_encoder(directory, fingerprint)
                self._remember(encoder)
                return encoder
        raise NoEncoderError(
            f"it was built by encoder {fingerprint}, which is neither served nor at {self.encoder_dir} "
            f"(that holds {self._fingerprint_at(self.encoder_dir) or 'no readable encoder'}) nor in "
            f"the index's encoder store; export that encoder to ACE_ENCODER, or publish an index "
            "built by the encoder there"
        )

    def _remember(self, encoder: Encoder) -> None:
        self._encoders[encoder.fingerprint] = encoder
        keep = {self.current.encoder.fingerprint, encoder.fingerprint}
        while len(self._encoders) > CACHED_ENCODERS:  # dicts keep insertion order: oldest first
            del self._encoders[next(f for f in self._encoders if f not in keep)]

    @staticmethod
    def _fingerprint_at(directory: Path) -> str | None:
        try:
            return str(read_artifact_meta(directory)["fingerprint"])
        except (ArtifactError, OSError):
            return None

    def _replace(self, slot: _Slot) -> None:
        with self._lock:
            old, self._slot = self._slot, slot
            old.retired = True
            close_now = old.users == 0
        if close_now:
            old.close()

    def close(self) -> None:
        """Stop reloading and close the served index once its last request is done."""
        with self._reload_lock:  # a reload in flight finishes first and is then closed too
            self._closed = True
            with self._lock:
                slot = self._slot
                slot.retired = True
                close_now = slot.users == 0
            if close_now:
                slot.close()
