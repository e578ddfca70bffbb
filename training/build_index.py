"""Embed a corpus with an encoder and write, extend or shard-build patch index versions.

Embedding runs in chunks of `chunk_size` images written to ROOT/.building/embed-<key>/chunks/<n>/
(float16 grid, records, thumbnails), each renamed into place when complete: a rerun resumes
without redoing finished chunks, and `--num-shards K --shard I` processes chunks n with n % K == I,
so several machines or torchrun ranks share the work. The key hashes the encoder fingerprint and
the image list, so every shard of one corpus finds the same directory. A final step (the build
itself when unsharded, `ace index merge` otherwise) trains the FAISS quantiser once on a sample of
all chunks and writes one version (ace_model.index.create_version).
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ace_model import index as ix
from ace_model.embedding import EmbeddingPolicy
from ace_model.encoder import ENCODER_STORE, Encoder, load_encoder, store_artifact
from ace_model.errors import InputError, UserError
from ace_model.preprocess import (
    CoordinateMap,
    ImageDecodeError,
    decode_side,
    encoder_view,
    load_image,
    prepare,
    thumbnail_jpeg,
)
from training.data import find_images, read_list_file

DEFAULT_CHUNK = 256  # images per resumable chunk


@dataclass(frozen=True)
class ImageSource:
    image_id: str
    path: Path
    patient_id: str | None = None  # from a metadata CSV; DICOM PatientID fills it when absent


@dataclass
class BuildSummary:
    version: str | None
    images: int
    failed: int
    patches: int
    bytes_per_patch: float
    seconds: float

    def text(self) -> str:
        where = f"version {self.version}" if self.version else "shard embedded (run `ace index merge`)"
        return (f"{where}: {self.images} images ({self.failed} failed), {self.patches} patches, "
                f"{self.bytes_per_patch:.1f} bytes/patch in the index, {self.seconds:.1f} s")


# ----------------------------------------------------------------------------- image sources


def collect_sources(sources: str | Path | Sequence[str | Path], metadata: str | Path | None = None
                    ) -> list[ImageSource]:
    """Images of folders, list files and landmark data sets (DIR/images + DIR/metadata.csv)."""
    items = [item for source in _as_list(sources) for item in _one_source(Path(source))]
    if metadata is not None:
        items = _apply_metadata(items, _read_metadata(Path(metadata)))
    _check_unique(items)
    return items


def _as_list(sources: str | Path | Sequence[str | Path]) -> list[str | Path]:
    return [sources] if isinstance(sources, str | Path) else list(sources)


def _one_source(source: Path) -> list[ImageSource]:
    if source.is_file():
        return [ImageSource(_id_of(p, source.parent), p) for p in read_list_file(source, source.parent)]
    if (source / "metadata.csv").is_file() and (source / "images").is_dir():
        return _landmark_set(source)
    return [ImageSource(_id_of(p, source), p) for p in find_images(source)]


def _id_of(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).with_suffix("").as_posix()
    except ValueError:
        return path.stem


def _landmark_set(folder: Path) -> list[ImageSource]:
    with (folder / "metadata.csv").open(newline="") as table:
        rows = list(csv.DictReader(table))
    return [ImageSource(r.get("image_id") or Path(r["image"]).stem, folder / r["image"],
                        r.get("patient_id") or None) for r in rows]


def _read_metadata(path: Path) -> dict[str, dict[str, str]]:
    """Rows keyed by image_id and by image (path or file name)."""
    with path.open(newline="") as table:
        rows = list(csv.DictReader(table))
    if rows and not {"image", "image_id"} & set(rows[0]):
        raise InputError(f"{path} needs an `image` or `image_id` column (and `patient_id`)")
    keyed: dict[str, dict[str, str]] = {}
    for row in rows:
        for key in (row.get("image_id"), row.get("image"), Path(row.get("image") or "").name):
            if key:
                keyed[key] = row
    return keyed


def _apply_metadata(items: list[ImageSource], rows: dict[str, dict[str, str]]) -> list[ImageSource]:
    out = []
    for item in items:
        row = rows.get(item.image_id) or rows.get(str(item.path)) or rows.get(item.path.name) or {}
        out.append(ImageSource(row.get("image_id") or item.image_id, item.path,
                               row.get("patient_id") or item.patient_id))
    return out


def _check_unique(items: list[ImageSource]) -> None:
    seen: dict[str, Path] = {}
    for item in items:
        if item.image_id in seen:
            raise InputError(f"image id {item.image_id!r} names both {seen[item.image_id]} and {item.path}; "
                             "give a metadata CSV with unique image_id values")
        seen[item.image_id] = item.path
    if not items:
        raise InputError("no images found in the given sources")


# ----------------------------------------------------------------------------- decoding (threads)


class DecodedImages:
    """Decode + letterbox + thumbnail of one image; run in threads beside inference."""

    def __init__(self, items: Sequence[ImageSource], size: int, grid: int, grey: bool) -> None:
        self.items, self.size, self.grid, self.grey = items, size, grid, grey  # grey: spec.reads_grey

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int) -> dict[str, Any]:
        item = self.items[position]
        try:
            image = load_image(item.path, max_side=decode_side(self.size))
        except (ImageDecodeError, OSError) as err:
            return {"position": position, "error": f"{item.path}: {err}"}
        tensor, coords = prepare(encoder_view(image, self.size, self.grey), self.size, self.grid)
        return {"position": position, "error": None, "tensor": tensor, "coords": coords,
                "patient_id": item.patient_id or image.patient_id, "thumbnail": thumbnail_jpeg(image)}


def decoded_batches(dataset: DecodedImages, positions: Sequence[int], batch_size: int, workers: int
                    ) -> Iterator[list[dict[str, Any]]]:
    """Batches of decoded samples in `positions` order. workers > 0 decodes in that many threads,
    at most two batches ahead: PIL, NumPy and torch release the GIL, and threads neither copy tensors
    between processes nor start a second OpenMP pool beside the encoder's."""
    if workers <= 0:
        for start in range(0, len(positions), batch_size):
            yield [dataset[p] for p in positions[start : start + batch_size]]
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        pending: deque[Future[dict[str, Any]]] = deque()
        ahead = iter(positions)
        for position in itertools.islice(ahead, 2 * batch_size):
            pending.append(pool.submit(dataset.__getitem__, position))
        while pending:
            batch = [pending.popleft().result() for _ in range(min(batch_size, len(pending)))]
            for position in itertools.islice(ahead, len(batch)):
                pending.append(pool.submit(dataset.__getitem__, position))
            yield batch


# ----------------------------------------------------------------------------- chunks


@dataclass(frozen=True)
class EmbedPlan:
    """Which images go to which chunk, and where chunks live."""

    items: tuple[ImageSource, ...]
    first_index: int  # image index of items[0]
    chunk_size: int
    work: Path  # ROOT/.building/embed-<key>

    @property
    def num_chunks(self) -> int:
        return -(-len(self.items) // self.chunk_size)

    def chunk_dir(self, chunk: int) -> Path:
        return self.work / "chunks" / f"{chunk:06d}"

    def chunk_items(self, chunk: int) -> range:
        return range(chunk * self.chunk_size, min(len(self.items), (chunk + 1) * self.chunk_size))

    def done(self, chunk: int) -> bool:
        return (self.chunk_dir(chunk) / "records.json").is_file()


def make_plan(root: Path, items: Sequence[ImageSource], fingerprint: str, first_index: int = 0,
              chunk_size: int = DEFAULT_CHUNK) -> EmbedPlan:
    listing = json.dumps([fingerprint, first_index, chunk_size,
                          [(i.image_id, str(i.path), i.patient_id) for i in items]])
    key = hashlib.sha256(listing.encode()).hexdigest()[:16]
    return EmbedPlan(tuple(items), first_index, chunk_size, root / ix.BUILDING_DIR / f"embed-{key}")


class ChunkWriter:
    """Collects one chunk's embeddings and writes it atomically when its last image arrives."""

    def __init__(self, plan: EmbedPlan, chunk: int, grid: int, dim: int) -> None:
        self.plan, self.chunk = plan, chunk
        span = plan.chunk_items(chunk)
        self.start, self.remaining = span.start, len(span)
        self.grids = np.zeros((len(span), grid, grid, dim), dtype=np.float16)
        self.records: list[dict[str, Any]] = []
        self.failed: list[str] = []
        self.thumbs: dict[int, bytes] = {}

    def put(self, sample: dict[str, Any], patches: np.ndarray | None) -> bool:
        """Store one image (patches (h, w, D) or None if it failed); True when the chunk is full."""
        if patches is None:
            self.failed.append(sample["error"])
        else:
            self._store(sample, patches)
        self.remaining -= 1
        return self.remaining == 0

    def _store(self, sample: dict[str, Any], patches: np.ndarray) -> None:
        position = sample["position"]
        item, coords = self.plan.items[position], sample["coords"]
        image_index = self.plan.first_index + position
        self.grids[position - self.start] = patches
        self.records.append({"image_index": image_index, "image_id": item.image_id,
                             "patient_id": sample["patient_id"], "source": str(item.path),
                             "coords": coords.to_dict()})
        self.thumbs[image_index] = sample["thumbnail"]

    def write(self) -> None:
        final = self.plan.chunk_dir(self.chunk)
        tmp = final.with_name(final.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "thumbs").mkdir(parents=True)
        np.save(tmp / "grid.npy", self.grids)
        for image_index, data in self.thumbs.items():
            (tmp / "thumbs" / f"{image_index}{ix.THUMB_SUFFIX}").write_bytes(data)
        (tmp / "records.json").write_text(json.dumps({"records": self.records, "failed": self.failed}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)


def load_segment(plan: EmbedPlan, chunk: int) -> tuple[ix.Segment, list[str]]:
    """A finished chunk as an index Segment, plus its failed sources."""
    folder = plan.chunk_dir(chunk)
    data = json.loads((folder / "records.json").read_text())
    records = tuple(_record(r) for r in data["records"])
    first = plan.first_index + plan.chunk_items(chunk).start
    return ix.Segment(folder / "grid.npy", first, records, folder / "thumbs"), list(data["failed"])


def _record(row: dict[str, Any]) -> ix.ImageRecord:
    coords = CoordinateMap(**row["coords"])
    return ix.ImageRecord(row["image_id"], row["patient_id"], row["source"], coords.orig_w, coords.orig_h,
                          coords, int(row["image_index"]))


# ----------------------------------------------------------------------------- embedding


@dataclass(frozen=True)
class EmbedOptions:
    batch_size: int = 16  # images per forward pass
    num_workers: int | None = None  # decoding threads beside inference (0 = inline, None = by core count)
    device: str = "auto"  # auto | cpu | cuda (ace_model.embedding: the service's policy)
    num_shards: int = 1  # chunks are split round-robin between shards
    shard: int = 0  # this process's shard
    show_progress: bool = True
    fp32: bool = False  # keep float32 on CUDA (default: bf16/fp16 autocast there, as the service)
    local_rank: int | None = None  # torchrun's LOCAL_RANK: the GPU of this process

    def policy(self) -> EmbeddingPolicy:
        return EmbeddingPolicy.resolve(self.device, autocast=not self.fp32, local_rank=self.local_rank)


def default_decode_threads() -> int:
    """Decoding threads beside the encoder: the cores torch's threads leave free (there decoding
    costs the encoder nothing: 0.94 of raw encoder throughput, benchmarks/index.md); with none free,
    inline on small hosts, where threads only take CPU from the encoder (2 of 2 cores: 0.68-0.71
    with 0, 1 or 2 threads), else 2, a small share of many cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    free = cores - torch.get_num_threads()
    if free > 0:
        return min(free, 4)
    return 0 if cores <= 4 else 2


def pending_chunks(plan: EmbedPlan, options: EmbedOptions) -> list[int]:
    return [c for c in range(plan.num_chunks) if c % options.num_shards == options.shard and not plan.done(c)]


def embed_chunks(plan: EmbedPlan, encoder: Encoder, policy: EmbeddingPolicy, options: EmbedOptions) -> int:
    """Embed every pending chunk of this shard (encoder placed by `policy`); returns the number of
    images embedded."""
    chunks = pending_chunks(plan, options)
    positions = [p for c in chunks for p in plan.chunk_items(c)]
    if not positions:
        return 0
    dataset = DecodedImages(plan.items, encoder.spec.img_size, encoder.grid, encoder.spec.reads_grey)
    writers = {c: ChunkWriter(plan, c, encoder.grid, encoder.dim) for c in chunks}
    with tqdm(total=len(positions), desc="embedding", unit="img", disable=not options.show_progress) as bar:
        threads = default_decode_threads() if options.num_workers is None else options.num_workers
        for batch in decoded_batches(dataset, positions, options.batch_size, threads):
            _embed_batch(batch, encoder, policy, plan, writers)
            bar.update(len(batch))
    return len(positions)


def _embed_batch(batch: list[dict[str, Any]], encoder: Encoder, policy: EmbeddingPolicy, plan: EmbedPlan,
                 writers: dict[int, ChunkWriter]) -> None:
    good = [s for s in batch if s["error"] is None]
    grids = _embed_grids(encoder, policy, [s["tensor"] for s in good]) if good else None
    row = 0
    for sample in batch:
        patches = None
        if sample["error"] is None and grids is not None:
            patches, row = grids[row], row + 1
        chunk = sample["position"] // plan.chunk_size
        if writers[chunk].put(sample, patches):
            writers.pop(chunk).write()


def _embed_grids(encoder: Encoder, policy: EmbeddingPolicy, tensors: list[torch.Tensor]) -> np.ndarray:
    """(B, h, w, D) float16 coarse grids: what the grid store holds."""
    return policy.forward(encoder, torch.stack(tensors)).patches.numpy().astype(np.float16)


# ----------------------------------------------------------------------------- versions


def _segments(plan: EmbedPlan) -> tuple[list[ix.Segment], list[str]]:
    missing = [c for c in range(plan.num_chunks) if not plan.done(c)]
    if missing:
        raise UserError(f"{len(missing)} of {plan.num_chunks} chunks are not embedded yet (e.g. chunk "
                           f"{missing[0]}); run the remaining shards, then merge again")
    segments, failed = [], []
    for chunk in range(plan.num_chunks):
        segment, bad = load_segment(plan, chunk)
        failed += bad
        if segment.records:
            segments.append(segment)
    return segments, failed


def _summary(root: Path, version: str | None, plan: EmbedPlan, failed: list[str], start: float
             ) -> BuildSummary:
    if version is None:
        return BuildSummary(None, len(plan.items), len(failed), 0, 0.0, time.perf_counter() - start)
    manifest = ix.read_manifest(root, version)
    return BuildSummary(version, manifest.num_images, len(failed), manifest.num_patches,
                        manifest.bytes_per_patch, time.perf_counter() - start)


def build_index(encoder_dir: str | Path, source: str | Path | Sequence[str | Path], root: str | Path,
                publish: bool = True, *, metadata: str | Path | None = None,
                params: ix.IndexParams | None = None, options: EmbedOptions | None = None,
                chunk_size: int = DEFAULT_CHUNK, keep: int = ix.DEFAULT_KEEP) -> str:
    """Embed `source` and write a new index version (published unless publish=False); its name."""
    summary = run_build(encoder_dir, source, root, publish, metadata=metadata, params=params,
                        options=options, chunk_size=chunk_size, keep=keep)
    assert summary.version is not None
    return summary.version


def run_build(encoder_dir: str | Path, source: str | Path | Sequence[str | Path], root: str | Path,
              publish: bool = False, *, metadata: str | Path | None = None,
              params: ix.IndexParams | None = None, options: EmbedOptions | None = None,
              chunk_size: int = DEFAULT_CHUNK, keep: int = ix.DEFAULT_KEEP, merge_only: bool = False
              ) -> BuildSummary:
    """Embed this shard's chunks; when every chunk is done (or merge_only), write the version."""
    start, root, options = time.perf_counter(), Path(root), options or EmbedOptions()
    policy = options.policy()
    encoder = policy.place(_load_and_store(encoder_dir, root))
    plan = make_plan(root, collect_sources(source, metadata), encoder.fingerprint, 0, chunk_size)
    timings: dict[str, float] = {}
    if not merge_only:
        embed_chunks(plan, encoder, policy, options)
        timings["embed_s"] = time.perf_counter() - start
        if options.num_shards > 1:
            return _summary(root, None, plan, [], start)
    segments, failed = _segments(plan)
    config = _build_config(encoder_dir, source, metadata, options, policy, chunk_size, failed)
    version = ix.create_version(root, segments, encoder.fingerprint, params, config, timings)
    _finish(root, version, plan, publish, keep)
    return _summary(root, version, plan, failed, start)


def _load_and_store(encoder_dir: str | Path, root: Path) -> Encoder:
    """Load the encoder and keep a copy in the root's store: readers find it by a version's fingerprint."""
    encoder = load_encoder(encoder_dir)
    store_artifact(encoder_dir, root / ENCODER_STORE)
    return encoder


def _build_config(encoder_dir: str | Path, source: Any, metadata: Any, options: EmbedOptions,
                  policy: EmbeddingPolicy, chunk_size: int, failed: list[str]) -> dict[str, Any]:
    sources = [str(s) for s in _as_list(source)]
    return {"encoder": str(Path(encoder_dir).resolve()), "sources": sources,
            "metadata": str(metadata) if metadata else None, "chunk_size": chunk_size,
            "batch_size": options.batch_size, **policy.describe(), "failed": failed[:100],
            "num_failed": len(failed)}


def _finish(root: Path, version: str, plan: EmbedPlan, publish: bool, keep: int) -> None:
    shutil.rmtree(plan.work, ignore_errors=True)  # the version holds hard links to what it needs
    if publish:
        ix.publish(root, version, keep)


def run_add(source: str | Path | Sequence[str | Path], root: str | Path,
            encoder_dir: str | Path | None = None, publish: bool = False, *,
            metadata: str | Path | None = None, options: EmbedOptions | None = None,
            keep: int = ix.DEFAULT_KEEP) -> BuildSummary:
    """A new version = the current one + the images of `source`."""
    start, root, options = time.perf_counter(), Path(root), options or EmbedOptions()
    policy = options.policy()
    manifest = ix.read_manifest(root)  # the published version; IndexNotFoundError says how to build one
    encoder_path = encoder_dir or manifest.build["encoder"]
    encoder = policy.place(_load_and_store(encoder_path, root))
    plan = make_plan(root, collect_sources(source, metadata), encoder.fingerprint, manifest.next_image_index)
    embed_chunks(plan, encoder, policy, options)
    segments, failed = _segments(plan)
    config = _build_config(encoder_path, source, metadata, options, policy, plan.chunk_size, failed)
    version = ix.extend_version(root, segments, manifest.version, encoder.fingerprint, config)
    _finish(root, version, plan, publish, keep)
    return _summary(root, version, plan, failed, start)
