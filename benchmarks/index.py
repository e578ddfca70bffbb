"""Patch index benchmark: build time, bytes/patch, recall@10 vs exact and queries/s ratios.

Corpus: real patch embeddings (cpu preset, vit_tiny, D=192) of DISTINCT phantom chest X-rays (subject
s, views 0 and 1: same anatomy, own pose and exposure), embedded by the trained encoder
artifacts/ace-cpu-phantoms-30min (else artifacts/ace-cpu-phantoms, else a random-init cpu encoder)
and cached in runs/index-bench/. Sizes beyond the distinct patches repeat the distinct set with small
Gaussian jitter (sigma per dimension, renormalised); the run prints sigma against the measured
nearest-neighbour distances. Queries: the patches of held-out phantom subjects (one image's 196
patches per search call, k = 10). Recall@10 against exact (cosine) search is given strict (same
patches) and tie-aware (hits within TIE_EPS cosine of the exact 10th score), plus how stable the
exact top 10 itself is below float16 precision (--stability). Speeds are measured interleaved
(round-robin over index configurations, median of rounds) in one process, so the ratios against
exact search are comparable.

    nice .venv/bin/python benchmarks/index.py --sizes 1000000 --types flat ivfpq hnsw
    nice .venv/bin/python benchmarks/index.py --sizes 5000000 --types flat ivfpq --sigma 0.0004 --rounds 6
    nice .venv/bin/python benchmarks/index.py --sizes 0 --e2e-images 512   # build vs raw encoder throughput
    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/index.py --sizes 0 --e2e-images 512  # 1 core free
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ace_model import index as ix
from ace_model.encoder import Encoder, EncoderSpec, load_encoder
from ace_model.preprocess import CoordinateMap, decode_image, letterbox_tensor, normalise
from training.build_index import EmbedOptions, default_decode_threads, run_build
from training.phantoms import generate_phantom

TRAINED = (Path("artifacts/ace-cpu-phantoms-30min"), Path("artifacts/ace-cpu-phantoms"))
CACHE = Path("runs/index-bench")
PHANTOM_SEED = 7  # the encoder was trained on seed 1 phantoms
QUERY_SUBJECT = 100_000  # held-out subjects start here
SEGMENT_IMAGES = 1024
PHANTOM_SIDE = 512


def encoder_dir_for_bench(work: Path) -> Path:
    for folder in TRAINED:
        if (folder / "encoder.json").is_file():
            return folder
    Encoder(EncoderSpec("vit_tiny_patch16_224", 224)).save(work / "random-encoder")
    return work / "random-encoder"


def phantom_png(subject: int, view: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(generate_phantom(subject, seed=PHANTOM_SEED, view=view).image).save(buffer, format="PNG")
    return buffer.getvalue()


def _worker_init() -> None:
    torch.set_num_threads(1)


def phantom_input(job: tuple[int, int, int]) -> np.ndarray:
    """(3, size, size) uint8 model input of one phantom view, read back from PNG like a file on disk."""
    subject, view, size = job
    return letterbox_tensor(decode_image(phantom_png(subject, view)), size).numpy()


def phantom_jobs(first_subject: int, count: int, size: int) -> list[tuple[int, int, int]]:
    return [(first_subject + i // 2, i % 2, size) for i in range(count)]


def embed_phantoms(encoder: Encoder, first_subject: int, count: int, workers: int = 2) -> np.ndarray:
    """(count, h, w, D) float16 grids; phantoms render in worker processes while the encoder runs."""
    out = np.zeros((count, encoder.grid, encoder.grid, encoder.dim), dtype=np.float16)
    jobs = phantom_jobs(first_subject, count, encoder.spec.img_size)
    # spawned, not forked: a fork after torch/FAISS started their OpenMP pools deadlocks the children
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init)
    with pool, torch.inference_mode():
        inputs = pool.map(phantom_input, jobs, chunksize=8)
        for start, batch in batched(inputs, 16):
            inputs_u8 = torch.from_numpy(np.stack(batch))
            out[start : start + len(batch)] = encoder(normalise(inputs_u8)).patches.numpy()
    return out


def batched(items: Iterator[np.ndarray], size: int) -> Iterator[tuple[int, list[np.ndarray]]]:
    batch: list[np.ndarray] = []
    start = 0
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield start, batch
            start, batch = start + size, []
    if batch:
        yield start, batch


def cached_embeddings(encoder: Encoder, first_subject: int, count: int) -> np.ndarray:
    """Embeddings of `count` phantom images, computed once per encoder and cached under runs/."""
    path = CACHE / f"phantoms-{encoder.fingerprint}-seed{PHANTOM_SEED}-s{first_subject}-n{count}.npy"
    if not path.is_file():
        start = time.perf_counter()
        grids = embed_phantoms(encoder, first_subject, count)
        print(f"embedded {count} phantom images in {time.perf_counter() - start:.0f} s "
              f"({count / (time.perf_counter() - start):.1f} img/s incl. rendering) -> {path}", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path.with_suffix(".tmp.npy"), grids)
        path.with_suffix(".tmp.npy").replace(path)
    return np.load(path, mmap_mode="r")


def phantom_coords(encoder: Encoder) -> CoordinateMap:
    return CoordinateMap.letterbox(PHANTOM_SIDE, PHANTOM_SIDE, encoder.spec.img_size, encoder.grid)


def jittered(base: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    noisy = base + sigma * rng.standard_normal(base.shape).astype(np.float32)
    return noisy / np.linalg.norm(noisy, axis=-1, keepdims=True)


def virtual_grids(base: np.ndarray, first: int, count: int, sigma: float) -> np.ndarray:
    """Images first..first+count-1: image v is distinct image v % n, jittered unless v < n."""
    picks = np.arange(first, first + count) % len(base)
    grids = np.asarray(base[picks], dtype=np.float32)
    copy = np.arange(first, first + count) >= len(base)
    if copy.any():
        grids[copy] = jittered(grids[copy], np.random.default_rng(first), sigma)
    return grids.astype(np.float16)


def write_corpus(work: Path, base: np.ndarray, coords: CoordinateMap, patches: int, sigma: float
                 ) -> list[ix.Segment]:
    """Segments holding the first `patches` patches (whole images) of the distinct-then-jittered corpus."""
    per_image = int(coords.valid_patches().sum())
    count = -(-patches // per_image)
    work.mkdir(parents=True, exist_ok=True)
    segments = []
    for first in range(0, count, SEGMENT_IMAGES):
        n = min(SEGMENT_IMAGES, count - first)
        path = work / f"seg{first}.npy"
        np.save(path, virtual_grids(base, first, n, sigma))
        recs = tuple(ix.ImageRecord(f"v{first + i}", f"p{(first + i) % len(base) // 2}", "phantom",
                                    PHANTOM_SIDE, PHANTOM_SIDE, coords, first + i) for i in range(n))
        segments.append(ix.Segment(path, first, recs))
    return segments


def neighbour_distances(base: np.ndarray, samples: int = 400) -> tuple[float, float]:
    """Median Euclidean distance from sampled patches to their 1st and 10th nearest other patch."""
    flat = np.asarray(base, dtype=np.float32).reshape(-1, base.shape[-1])
    rng = np.random.default_rng(3)
    picks = rng.choice(len(flat), samples, replace=False)
    index = ix.faiss.IndexFlatIP(flat.shape[1])
    index.add(flat)
    scores, _ = index.search(flat[picks], 11)  # column 0 is the patch itself
    dist = np.sqrt(np.maximum(0.0, 2 - 2 * scores))
    return float(np.median(dist[:, 1])), float(np.median(dist[:, 10]))


def params_for(kind: str, patches: int, args: argparse.Namespace) -> ix.IndexParams:
    opq = ix.IndexParams.opq if args.opq is None else args.opq
    return ix.IndexParams(kind=kind, nlist=args.nlist, pq_bytes=48, opq=opq, train_size=args.train_size,
                          hnsw_m=32, ef_search=64)


TIE_EPS = 1e-4  # cosine: a hit within this of the exact 10th score ties with it (float16 store noise ~3e-5)


def recall(truth: list[list[ix.PatchHit]], found: list[list[ix.PatchHit]]) -> tuple[float, float]:
    """(strict recall@k by patch identity, tie-aware recall@k: hits scoring >= exact k-th - TIE_EPS)."""
    key = lambda h: (h.image_id, h.row, h.col)  # noqa: E731
    strict = sum(len({key(h) for h in t} & {key(h) for h in f}) for t, f in zip(truth, found, strict=True))
    ties = sum(min(len(t), sum(h.score >= t[-1].score - TIE_EPS for h in f))
               for t, f in zip(truth, found, strict=True))
    total = sum(len(t) for t in truth)
    return strict / total, ties / total


def float16_stability(index: ix.PatchIndex, segments: list[ix.Segment], queries: list[np.ndarray]) -> float:
    """Strict recall@10 of exact search over the stored float16 vectors against exact search over
    float32 vectors that round to the same float16 values: how much of the strict top 10 is decided
    below the storage precision."""
    flat = ix.faiss.IndexFlatIP(index.dim)
    rng = np.random.default_rng(5)
    for segment in segments:
        half = np.load(segment.grid_file).reshape(-1, index.dim)
        ulp = np.spacing(np.abs(half)).astype(np.float32)
        noise = ulp * (rng.random(half.shape, dtype=np.float32) - 0.5)
        flat.add(ix.unit_rows(half.astype(np.float32) + noise))
    stable = []
    for q in queries:
        _, ids = flat.search(ix.unit_rows(q), 10)
        truth = index.search(q, 10)
        got = [{(int(i) // index.grid_shape[1] ** 2, int(i) % index.grid_shape[1] ** 2) for i in row}
               for row in ids]
        stable += [len(got[j] & {(int(h.image_id[1:]), h.row * index.grid_shape[1] + h.col)
                                 for h in truth[j]}) / 10 for j in range(len(q))]
    return float(np.mean(stable))


Variant = tuple[ix.PatchIndex, dict[str, int]]  # an index and per-call search arguments (nprobe, rerank)


def variants_of(indexes: dict[str, ix.PatchIndex], ivf: list[str]) -> dict[str, Variant]:
    out: dict[str, Variant] = {}
    for kind, index in indexes.items():
        if kind != "ivfpq":
            out[kind] = (index, {})
            continue
        for setting in ivf:
            nprobe, rerank = (int(v) for v in setting.split("/"))
            out[f"ivfpq nprobe={nprobe} rerank={rerank}"] = (index, {"nprobe": nprobe, "rerank": rerank})
    return out


def interleaved_qps(variants: dict[str, Variant], queries: list[np.ndarray], rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for name, (index, kwargs) in variants.items():
            start = time.perf_counter()
            index.search(queries[r % len(queries)], 10, **kwargs)
            times[name].append(time.perf_counter() - start)
    return {name: len(queries[0]) / float(np.median(t)) for name, t in times.items()}


def build_all(work: Path, segments: list[ix.Segment], patches: int, args: argparse.Namespace
              ) -> tuple[dict[str, ix.PatchIndex], dict[str, float]]:
    indexes, build_s = {}, {}
    for kind in ["flat", *[k for k in args.types if k != "flat"]]:
        start = time.perf_counter()
        version = ix.create_version(work / kind, segments, "bench", params_for(kind, patches, args))
        build_s[kind] = time.perf_counter() - start
        indexes[kind] = ix.PatchIndex.open(work / kind, version)
        print(f"built {kind} over {indexes[kind].num_patches} patches in {build_s[kind]:.0f} s "
              f"({indexes[kind].manifest['index'].get('nlist', '-')} lists)", flush=True)
    return indexes, build_s


def bench_size(work: Path, base: np.ndarray, coords: CoordinateMap, queries: list[np.ndarray], patches: int,
               args: argparse.Namespace) -> None:
    segments = write_corpus(work / "corpus", base, coords, patches, args.sigma)
    indexes, build_s = build_all(work, segments, patches, args)
    truth = [hits for q in queries for hits in indexes["flat"].search(q, 10)]
    variants = variants_of(indexes, args.ivf)
    qps = interleaved_qps(variants, queries, args.rounds)
    n = indexes["flat"].num_patches
    print(f"\n| N patches | index | build s | bytes/patch (index) | recall@10 strict | recall@10 ties "
          f"{TIE_EPS:g} | queries/s (196/call) | vs exact |\n|---|---|---|---|---|---|---|---|")
    for name, (index, kwargs) in variants.items():
        strict, ties = recall(truth, [hits for q in queries for hits in index.search(q, 10, **kwargs)])
        bpp = index.manifest["index"]["bytes_per_patch"]
        print(f"| {n:,} | {name} | {build_s[index.kind]:.0f} | {bpp:.1f} | {strict:.3f} | {ties:.3f} | "
              f"{qps[name]:.0f} | {qps[name] / qps['flat']:.1f}x |", flush=True)
    if args.stability:
        stable = float16_stability(indexes["flat"], segments, queries[: args.stability])
        print(f"\nexact float16 top 10 vs exact top 10 of float32 vectors rounding to the same float16: "
              f"strict recall {stable:.3f} ({args.stability} query images)", flush=True)
    for index in indexes.values():
        index.close()


def bench_e2e(work: Path, encoder_dir: Path, encoder: Encoder, count: int, rounds: int,
              workers: list[int | None]) -> None:
    """End-to-end build images/s (per decode-thread setting) vs raw encoder images/s on the same
    images, interleaved."""
    folder = CACHE / f"e2e-{count}"  # rendered once, reused by later runs
    folder.mkdir(parents=True, exist_ok=True)
    for i, (subject, view, _) in enumerate(phantom_jobs(500, count, 0)):
        if not (folder / f"ph{i}.png").is_file():
            (folder / f"ph{i}.png").write_bytes(phantom_png(subject, view))
    paths = sorted(folder.glob("*.png"))
    tensors = [letterbox_tensor(decode_image(p.read_bytes()), encoder.spec.img_size) for p in paths]
    raw: list[float] = []
    build: dict[int | None, list[float]] = {w: [] for w in workers}
    for r in range(rounds):
        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, count, 16):
                encoder(normalise(torch.stack(tensors[i : i + 16])))
        raw.append(count / (time.perf_counter() - start))
        for w in workers:
            start = time.perf_counter()
            run_build(encoder_dir, folder, work / f"e2e-root{r}-{w}", params=ix.IndexParams(kind="flat"),
                      options=EmbedOptions(16, w, show_progress=False))
            build[w].append(count / (time.perf_counter() - start))
        print(f"round {r}: raw {raw[-1]:.1f} img/s, build " + ", ".join(
            f"{_threads(w)} {b[-1]:.1f}" for w, b in build.items()) + " img/s", flush=True)
    raw_ips = float(np.median(raw))
    print("\n| images | encoder threads | decode threads | raw encoder img/s | end-to-end build img/s | "
          "ratio of medians | median of per-round ratios |\n|---|---|---|---|---|---|---|")
    for w, runs in build.items():
        build_ips, per_round = float(np.median(runs)), float(np.median(np.array(runs) / np.array(raw)))
        print(f"| {count} | {torch.get_num_threads()} | {_threads(w)} | {raw_ips:.1f} | {build_ips:.1f} | "
              f"{build_ips / raw_ips:.2f} | {per_round:.2f} |")


def _threads(workers: int | None) -> str:
    return f"auto ({default_decode_threads()})" if workers is None else str(workers)


def describe_corpus(base: np.ndarray, sizes: list[int], sigma: float) -> None:
    distinct = base.shape[0] * base.shape[1] * base.shape[2]
    nn1, nn10 = neighbour_distances(base)
    print(f"corpus: {base.shape[0]} distinct phantom images = {distinct:,} distinct patches; median distance "
          f"to the nearest other patch {nn1:.3f}, to the 10th {nn10:.3f}", flush=True)
    if max(sizes, default=0) > distinct:
        shift = sigma * np.sqrt(base.shape[-1])
        print(f"beyond {distinct:,} patches: copies with jitter sigma {sigma} per dimension (displacement "
              f"~{shift:.3f} = {shift / nn1:.2f} x the median nearest-neighbour distance)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1_000_000])
    parser.add_argument("--types", nargs="+", default=["flat", "ivfpq", "hnsw"])
    parser.add_argument("--distinct-images", type=int, default=5120,
                        help="distinct phantom images embedded for the corpus (196 patches each)")
    parser.add_argument("--query-images", type=int, default=8)
    parser.add_argument("--sigma", type=float, default=0.005, help="per-dimension jitter of repeated images")
    parser.add_argument("--nlist", type=int, default=0, help="IVF lists (0 = the library default)")
    parser.add_argument("--train-size", type=int, default=200_000)
    parser.add_argument("--ivf", nargs="+", default=["8/10", "16/10", "16/20", "32/10"],
                        help="IVF-PQ search settings NPROBE/RERANK, each measured")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--opq", action=argparse.BooleanOptionalAction, default=None,
                        help="IVF-PQ with (without) an OPQ rotation; default: the library's")
    parser.add_argument("--stability", type=int, default=2,
                        help="query images for the float16 tie check (0 = skip)")
    parser.add_argument("--e2e-images", type=int, default=0)
    parser.add_argument("--e2e-rounds", type=int, default=3)
    parser.add_argument("--e2e-workers", type=int, nargs="*", default=[],
                        help="decode-thread counts measured besides the default (auto)")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    ix.configure_faiss(threads=torch.get_num_threads())  # FAISS and torch share one OpenMP pool
    work = args.work or Path(tempfile.mkdtemp(prefix="ace-index-bench-"))
    encoder_dir = encoder_dir_for_bench(work)
    encoder = load_encoder(encoder_dir)
    print(f"encoder {encoder_dir} ({encoder.fingerprint}), D={encoder.dim}, work dir {work}", flush=True)
    sizes = [s for s in args.sizes if s > 0]
    if sizes:
        base = cached_embeddings(encoder, 0, args.distinct_images)
        held_out = cached_embeddings(encoder, QUERY_SUBJECT, args.query_images)
        describe_corpus(base, sizes, args.sigma)
        queries = [np.asarray(g, dtype=np.float32).reshape(-1, encoder.dim) for g in held_out]
    for size in sizes:
        bench_size(work / f"n{size}", base, phantom_coords(encoder), queries, size, args)
        shutil.rmtree(work / f"n{size}", ignore_errors=True)
    if args.e2e_images:
        bench_e2e(work, encoder_dir, encoder, args.e2e_images, args.e2e_rounds, [None, *args.e2e_workers])


if __name__ == "__main__":
    main()
