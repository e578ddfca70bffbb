"""Patch index benchmark: build time, bytes/patch, recall@10 vs exact and queries/s ratios.

Corpus: real patch embeddings (cpu preset, D=192) of phantom chest X-rays from the encoder in
artifacts/ace-cpu-phantoms (a random-init cpu encoder if absent), multiplied to N patches by small
Gaussian jitter per virtual image (renormalised), so the vectors keep the structure of real ones.
Queries: the 196 patches of held-out phantom images (one image's patches per search call).
Speeds are measured interleaved (round-robin over index types, median of rounds) in one process.

    nice .venv/bin/python benchmarks/index.py --sizes 1000000 --types flat ivfpq hnsw
    nice .venv/bin/python benchmarks/index.py --e2e-images 32     # build vs raw encoder throughput
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ace_model import index as ix
from ace_model.encoder import Encoder, EncoderSpec, load_encoder
from ace_model.preprocess import decode_image, prepare
from training.build_index import EmbedOptions, run_build
from training.phantoms import generate_phantom

TRAINED = Path("artifacts/ace-cpu-phantoms")
SEGMENT_IMAGES = 1024


def encoder_for_bench(work: Path) -> Encoder:
    if (TRAINED / "encoder.json").is_file():
        return load_encoder(TRAINED)
    encoder = Encoder(EncoderSpec("vit_tiny_patch16_224", 224))
    encoder.save(work / "random-encoder")
    return encoder


def phantom_pngs(folder: Path, count: int, first_subject: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = generate_phantom(first_subject + i // 2, seed=7, view=i % 2).image
        path = folder / f"ph{first_subject}_{i}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def embed(encoder: Encoder, paths: list[Path]) -> tuple[np.ndarray, list[ix.ImageRecord]]:
    tensors, records = [], []
    for path in paths:
        tensor, coords = prepare(decode_image(path.read_bytes()), encoder.spec.img_size, encoder.grid)
        tensors.append(tensor)
        records.append(ix.ImageRecord(path.stem, None, str(path), coords.orig_w, coords.orig_h, coords))
    with torch.inference_mode():
        grids = torch.cat([encoder(torch.stack(tensors[i : i + 16])).patches
                           for i in range(0, len(tensors), 16)])
    return grids.numpy(), records


def jittered(base: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    noisy = base + sigma * rng.standard_normal(base.shape).astype(np.float32)
    return noisy / np.linalg.norm(noisy, axis=-1, keepdims=True)


def write_corpus(work: Path, base: np.ndarray, records: list[ix.ImageRecord], patches: int,
                 sigma: float) -> list[ix.Segment]:
    """Virtual images = a base image's grid + jitter, until `patches` valid patches exist."""
    per_image = int(records[0].coords.valid_patches().sum())
    count = -(-patches // per_image)
    rng, segments = np.random.default_rng(0), []
    work.mkdir(parents=True, exist_ok=True)
    for first in range(0, count, SEGMENT_IMAGES):
        n = min(SEGMENT_IMAGES, count - first)
        picks = rng.integers(0, len(base), n)
        path = work / f"seg{first}.npy"
        np.save(path, jittered(base[picks], rng, sigma).astype(np.float16))
        recs = tuple(ix.ImageRecord(f"v{first + i}", f"p{(first + i) // 2}", records[p].source,
                                    records[p].width, records[p].height, records[p].coords, first + i)
                     for i, p in enumerate(picks))
        segments.append(ix.Segment(path, first, recs))
    return segments


def params_for(kind: str, patches: int, opq: bool = False) -> ix.IndexParams:
    nlist = int(2 ** round(np.log2(np.sqrt(patches))))  # ~1k lists at 1M, 2k at 5M
    return ix.IndexParams(kind=kind, nlist=nlist, pq_bytes=48, nprobe=16, rerank=10, train_size=100_000,
                          hnsw_m=32, ef_search=64, opq=opq)


def recall(truth: list[list[ix.PatchHit]], found: list[list[ix.PatchHit]]) -> float:
    key = lambda h: (h.image_id, h.row, h.col)  # noqa: E731
    hits = sum(len({key(h) for h in t} & {key(h) for h in f}) for t, f in zip(truth, found, strict=True))
    return hits / sum(len(t) for t in truth)


Variant = tuple[ix.PatchIndex, dict[str, int]]  # an index and per-call search arguments (nprobe, rerank)


def variants_of(indexes: dict[str, ix.PatchIndex]) -> dict[str, Variant]:
    out: dict[str, Variant] = {}
    for kind, index in indexes.items():
        if kind != "ivfpq":
            out[kind] = (index, {})
            continue
        for nprobe, rerank in [(16, 10), (16, 50), (64, 50), (64, 100)]:
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


def bench_size(work: Path, base: np.ndarray, records: list[ix.ImageRecord], queries: list[np.ndarray],
               patches: int, kinds: list[str], sigma: float, rounds: int, opq: bool = False) -> None:
    segments = write_corpus(work / "corpus", base, records, patches, sigma)
    indexes, build_s = {}, {}
    for kind in ["flat", *[k for k in kinds if k != "flat"]]:
        start = time.perf_counter()
        version = ix.create_version(work / kind, segments, "bench", params_for(kind, patches, opq))
        build_s[kind] = time.perf_counter() - start
        indexes[kind] = ix.PatchIndex.open(work / kind, version)
        print(f"built {kind} over {indexes[kind].num_patches} patches in {build_s[kind]:.0f} s", flush=True)
    truth = [hits for q in queries for hits in indexes["flat"].search(q, 10)]
    variants = variants_of(indexes)
    qps = interleaved_qps(variants, queries, rounds)
    n = indexes["flat"].num_patches
    print("\n| N patches | index | build s | bytes/patch | recall@10 | queries/s (196/call) | vs exact |")
    print("|---|---|---|---|---|---|---|")
    for name, (index, kwargs) in variants.items():
        rec = recall(truth, [hits for q in queries for hits in index.search(q, 10, **kwargs)])
        bpp = index.manifest["index"]["bytes_per_patch"]
        print(f"| {n:,} | {name} | {build_s[index.kind]:.0f} | {bpp:.1f} | {rec:.3f} | {qps[name]:.0f} | "
              f"{qps[name] / qps['flat']:.1f}x |", flush=True)
    for index in indexes.values():
        index.close()


def bench_e2e(work: Path, encoder_dir: Path, encoder: Encoder, count: int, rounds: int) -> None:
    """End-to-end build images/s vs raw encoder images/s on the same images, interleaved."""
    paths = phantom_pngs(work / "e2e", count, first_subject=500)
    tensors = [prepare(decode_image(p.read_bytes()), encoder.spec.img_size, encoder.grid)[0] for p in paths]
    raw, build = [], []
    for r in range(rounds):
        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, count, 16):
                encoder(torch.stack(tensors[i : i + 16]))
        raw.append(count / (time.perf_counter() - start))
        start = time.perf_counter()
        run_build(encoder_dir, work / "e2e", work / f"e2e-root{r}", params=ix.IndexParams(kind="flat"),
                  options=EmbedOptions(16, 2, show_progress=False))
        build.append(count / (time.perf_counter() - start))
    raw_ips, build_ips = float(np.median(raw)), float(np.median(build))
    print(f"\n| images | raw encoder img/s | end-to-end build img/s | ratio |\n|---|---|---|---|\n"
          f"| {count} | {raw_ips:.1f} | {build_ips:.1f} | {build_ips / raw_ips:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1_000_000])
    parser.add_argument("--types", nargs="+", default=["flat", "ivfpq", "hnsw"])
    parser.add_argument("--base-images", type=int, default=96, help="phantom images embedded as the base")
    parser.add_argument("--sigma", type=float, default=0.02, help="per-dimension jitter of virtual images")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--opq", action="store_true", help="IVF-PQ with an OPQ rotation")
    parser.add_argument("--e2e-images", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    ix.configure_faiss(threads=2)
    work = args.work or Path(tempfile.mkdtemp(prefix="ace-index-bench-"))
    encoder = encoder_for_bench(work)
    encoder_dir = TRAINED if (TRAINED / "encoder.json").is_file() else work / "random-encoder"
    print(f"encoder {encoder_dir} ({encoder.fingerprint}), D={encoder.dim}, work dir {work}", flush=True)
    base, records = embed(encoder, phantom_pngs(work / "base", args.base_images, first_subject=0))
    held_out, _ = embed(encoder, phantom_pngs(work / "queries", 4, first_subject=1000))
    rng = np.random.default_rng(1)
    queries = [jittered(g.reshape(-1, encoder.dim), rng, args.sigma) for g in held_out]
    for size in args.sizes:
        bench_size(work / f"n{size}", base, records, queries, size, args.types, args.sigma, args.rounds,
                   args.opq)
        shutil.rmtree(work / f"n{size}", ignore_errors=True)
    if args.e2e_images:
        bench_e2e(work, encoder_dir, encoder, args.e2e_images, rounds=2)


if __name__ == "__main__":
    main()
