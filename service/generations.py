"""The served generation: an encoder and the index it built, swapped together without a restart.

A request leases the current generation (`with holder.lease() as gen:`) and uses its encoder and
index for its whole life, so a query is never embedded by one encoder and searched in an index
built by another. A reload opens the published index version; when another encoder built it, the
artifact at ACE_ENCODER is loaded if it carries that encoder's fingerprint (the usual case after
`ace train` + `ace export` + `ace index build --publish`), and the pair is swapped in as one new
generation. The previous generation is closed when its last lease ends; its encoder stays cached
so that a rollback to the previous index is served at once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ace_model.encoder import ArtifactError, Encoder, read_artifact_meta
from ace_model.index import IndexFormatError, IndexNotFoundError, PatchIndex, current_version

log = logging.getLogger("ace.service.index")

ReloadStatus = Literal["swapped", "unchanged", "refused", "missing", "disabled"]
EncoderLoader = Callable[[Path, str], Encoder]  # (artifact dir, expected fingerprint) -> ready encoder
CACHED_ENCODERS = 2  # the served encoder and the one before it (a rollback needs no reload)


@dataclass(frozen=True)
class ReloadResult:
    status: ReloadStatus
    version: str | None  # the version served after the reload
    detail: str


@dataclass(frozen=True)
class Generation:
    encoder: Encoder  # on the serving device, in eval mode; only the batcher's worker runs it
    index: PatchIndex | None  # None until a version built by `encoder` is published

    @property
    def version(self) -> str | None:
        return self.index.version if self.index is not None else None


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
        self._load_encoder = load_encoder
        self._slot = _Slot(first)
        self._encoders = {first.encoder.fingerprint: first.encoder}
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()  # one reload at a time (admin route and poller)
        self._refused: set[tuple[str, str | None]] = set()  # (version, artifact fingerprint) tried

    @property
    def current(self) -> Generation:
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
            served = self.current.version
            published = current_version(self.index_root)
            if published is None:
                return ReloadResult("missing", served, f"no published index under {self.index_root}")
            if published == served and not force:
                return ReloadResult("unchanged", published, f"already serving {published}")
            attempt = (published, self._artifact_fingerprint())
            if attempt in self._refused and not force:
                return ReloadResult("refused", served, f"index {published} was refused earlier "
                                    "(no encoder for it at ACE_ENCODER); see the log")
            return self._open_and_swap(self.index_root, published, attempt)

    def _open_and_swap(self, root: Path, version: str, attempt: tuple[str, str | None]) -> ReloadResult:
        served = self.current.version
        try:
            index = PatchIndex.open(root, version)
        except (IndexNotFoundError, IndexFormatError, OSError) as err:
            log.error("cannot open index %s under %s: %s; still serving %s", version, root, err, served)
            return ReloadResult("missing", served, f"cannot open index {version}: {err}")
        try:
            encoder = self._encoder_for(index)
        except (ArtifactError, RuntimeError) as err:  # no such encoder, or it failed to load
            index.close()
            self._refused.add(attempt)
            log.error("refusing index %s: %s; still serving %s", version, err, served)
            return ReloadResult("refused", served, f"index {version} refused: {err}")
        self._replace(_Slot(Generation(encoder, index)))
        log.info("now serving index %s (%d images, %d patches) with encoder %s", index.version,
                 index.num_images, index.num_patches, encoder.fingerprint)
        return ReloadResult("swapped", index.version, f"now serving {index.version}")

    def _encoder_for(self, index: PatchIndex) -> Encoder:
        """The encoder that built `index`: cached, or loaded from ACE_ENCODER when it is that one."""
        wanted = index.encoder_fingerprint
        if wanted in self._encoders:
            return self._encoders[wanted]
        on_disk = self._artifact_fingerprint()
        if on_disk != wanted:
            raise ArtifactError(
                f"it was built by encoder {wanted}; this service serves {self.current.encoder.fingerprint} "
                f"and the artifact at {self.encoder_dir} is {on_disk or 'unreadable'}. Export that "
                "encoder to ACE_ENCODER, or publish an index built by the encoder there"
            )
        encoder = self._load_encoder(self.encoder_dir, wanted)
        self._remember(encoder)
        return encoder

    def _remember(self, encoder: Encoder) -> None:
        self._encoders[encoder.fingerprint] = encoder
        keep = {self.current.encoder.fingerprint, encoder.fingerprint}
        while len(self._encoders) > CACHED_ENCODERS:  # dicts keep insertion order: oldest first
            del self._encoders[next(f for f in self._encoders if f not in keep)]

    def _artifact_fingerprint(self) -> str | None:
        try:
            return str(read_artifact_meta(self.encoder_dir)["fingerprint"])
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
        with self._lock:
            slot = self._slot
            slot.retired = True
            close_now = slot.users == 0
        if close_now:
            slot.close()
