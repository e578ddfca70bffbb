"""ace_model.index on seeded synthetic patch grids with structure (clustered, low-rank), against exact
search: recall of every approximate configuration, round trips, id decoding, versions, restriction."""

from __future__ import annotations

import ast
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from ace_model import index as ix
from ace_model.encoder import ENCODER_STORE
from ace_model.index import (
    EncoderMismatchError,
    ImageRecord,
    IndexNotFoundError,
    IndexParams,
    PatchIndex,
    Segment,
    unit_rows,
)
from ace_model.index import build as index_build
from ace_model.index import search as index_search
from ace_model.preprocess import CoordinateMap

DIM = 64
GRID = 8
SIZE = 128  # model pixels: stride 16
FINGERPRINT = "f" * 16
FAST_IVF = {"nlist": 16, "pq_bytes": 16, "train_size": 5_000}  # seconds to train


def structured_vectors(rng: np.random.Generator, count: int, dim: int = DIM) -> np.ndarray:
    """Unit vectors like real patch embeddings: 40 clusters in an 8-dim subspace + small noise."""
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0][:, :8]  # (D, 8)
    centres = rng.standard_normal((40, 8)) * 3.0
    strong = centres[rng.integers(0, 40, count)] + rng.standard_normal((count, 8))
    vectors = strong @ basis.T + 0.15 * rng.standard_normal((count, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def concentrated_vectors(rng: np.random.Generator, count: int, dim: int = DIM) -> np.ndarray:
    """Like trained patch embeddings: one shared direction holds most of every vector, neighbours
    differ by a few hundredths (benchmarks/index.md: cosine 0.9998 to the nearest other patch)."""
    spread = structured_vectors(rng, count, dim) * 0.05
    vectors = spread + np.eye(dim, dtype=np.float32)[0]
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def write_segment(folder: Path, first: int, count: int, seed: int, prefix: str = "img",
                  make: Callable[[np.random.Generator, int], np.ndarray] = structured_vectors) -> Segment:
    """`count` images (some non-square, so some padding patches) as one grid-store segment."""
    rng = np.random.default_rng(seed)
    grids = make(rng, count * GRID * GRID).reshape(count, GRID, GRID, DIM)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{first}.npy"
    np.save(path, grids.astype(np.float16))
    records = []
    for i in range(count):
        width, height = (200, 100) if i % 3 == 0 else (300, 300)
        coords = CoordinateMap.letterbox(width, height, SIZE, GRID)
        records.append(ImageRecord(f"{prefix}{first + i}", f"p{(first + i) // 2}", f"/src/{first + i}.png",
                                   width, height, coords, first + i))
    return Segment(path, first, tuple(records))


def all_vectors(index: PatchIndex) -> tuple[np.ndarray, list[tuple[str, int, int]]]:
    """Every indexed (valid) patch vector as float32 and its (image_id, row, col)."""
    vectors, keys = [], []
    for image_id in index.image_ids():
        mask = index.valid_mask(image_id)
        grid = index.grid(image_id)
        for row, col in zip(*np.nonzero(mask), strict=True):
            vectors.append(grid[row, col])
            keys.append((image_id, int(row), int(col)))
    return np.stack(vectors), keys


def recall_at_k(index: PatchIndex, queries: np.ndarray, k: int, **kwargs: object) -> float:
    vectors, keys = all_vectors(index)
    exact = np.argsort(-(unit_rows(queries) @ unit_rows(vectors).T), axis=1)[:, :k]  # cosine
    hits = index.search(queries, k, **kwargs)
    found = 0
    for q, row in enumerate(hits):
        truth = {keys[j] for j in exact[q]}
        found += len(truth & {(h.image_id, h.row, h.col) for h in row})
    return found / (k * len(queries))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Segment]:
    folder = tmp_path_factory.mktemp("segments")
    return [write_segment(folder, 0, 150, seed=1), write_segment(folder, 150, 150, seed=2)]


def build(root: Path, segments: list[Segment], kind: str, **params: object) -> PatchIndex:
    version = ix.create_version(root, segments, FINGERPRINT, IndexParams(kind=kind, **params))  # type: ignore[arg-type]
    ix.publish(root, version)
    return PatchIndex.open(root)


def queries_from(index: PatchIndex, count: int, seed: int, noise: float = 0.1) -> np.ndarray:
    vectors, _ = all_vectors(index)
    rng = np.random.default_rng(seed)
    picked = vectors[rng.choice(len(vectors), count, replace=False)]
    noisy = picked + noise * rng.standard_normal(picked.shape).astype(np.float32)
    return noisy / np.linalg.norm(noisy, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, corpus: list[Segment]) -> dict[str, PatchIndex]:
    """One published index per type over the whole corpus, shared by the read-only tests."""
    params: dict[str, dict[str, object]] = {"flat": {}, "ivfpq": {**FAST_IVF, "nprobe": 8},
                                            "hnsw": {"hnsw_m": 12, "ef_search": 64}}
    return {kind: build(tmp_path_factory.mktemp(kind), corpus, kind, **p) for kind, p in params.items()}


@pytest.mark.parametrize(("kind", "minimum"), [("flat", 0.999), ("ivfpq", 0.95), ("hnsw", 0.95)])
def test_recall_at_10_against_exact_search(built: dict[str, PatchIndex], kind: str, minimum: float) -> None:
    index = built[kind]
    assert index.kind == kind
    assert recall_at_k(index, queries_from(index, 64, seed=3), 10) >= minimum


@pytest.mark.slow
def test_ivfpq_without_rerank_is_worse_and_rerank_fixes_it(tmp_path: Path, corpus: list[Segment]) -> None:
    common = {"nlist": 16, "pq_bytes": 4, "pq_bits": 4, "nprobe": 4, "train_size": 5_000}
    plain = build(tmp_path / "a", corpus, "ivfpq", rerank=1, **common)
    reranked = build(tmp_path / "b", corpus, "ivfpq", rerank=20, **common)
    queries = queries_from(plain, 64, seed=4)
    assert recall_at_k(reranked, queries, 10) > recall_at_k(plain, queries, 10)
    assert recall_at_k(reranked, queries, 10) >= 0.9


def test_ivfpq_candidates_by_l2_of_unit_vectors_beat_inner_product(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The PQ error of <q, x^> along the shared direction swamps the small differences between
    near neighbours; |q - x^| cancels it. Versions built the old way (inner product) still work."""
    segments = [write_segment(tmp_path / "seg", 0, 300, seed=6, make=concentrated_vectors)]
    common = {**FAST_IVF, "pq_bytes": 8, "nprobe": 4, "rerank": 2}
    current = build(tmp_path / "l2", segments, "ivfpq", **common)
    assert current.manifest["index"]["metric"] == "l2"
    def inner_product_ivfpq(kind: str, dim: int, num_patches: int, params: IndexParams) -> ix.faiss.Index:
        factory = index_build._factory_string(kind, dim, num_patches, params)
        return ix.faiss.index_factory(dim, factory, ix.faiss.METRIC_INNER_PRODUCT)

    with monkeypatch.context() as patched:
        patched.setattr(index_build, "_new_index", inner_product_ivfpq)
        old = build(tmp_path / "ip", segments, "ivfpq", **common)
    assert old.manifest["index"]["metric"] == "inner product"
    queries = queries_from(current, 64, seed=7, noise=0.002)  # as close as trained neighbours are
    assert recall_at_k(current, queries, 10) >= 0.85  # measured 0.94 (inner product: 0.56)
    assert recall_at_k(current, queries, 10) >= recall_at_k(old, queries, 10) + 0.2
    grown = PatchIndex.open(tmp_path / "ip", ix.extend_version(
        tmp_path / "ip", [write_segment(tmp_path / "seg", 300, 20, seed=9, make=concentrated_vectors)]))
    assert recall_at_k(grown, queries, 10, rerank=50) >= 0.9
    added = grown.grid("img310")[2, 5][None]  # an added image's own patch is found first
    assert (grown.search(added, 1, rerank=50)[0][0].image_id, grown.num_images) == ("img310", 320)
    shrunk = PatchIndex.open(tmp_path / "ip",
                             ix.remove_images(tmp_path / "ip", ["img310"], base=grown.version))
    assert all(h.image_id != "img310" for h in shrunk.search(added, 20, rerank=50)[0])


def test_training_sample_grows_with_the_list_count(tmp_path: Path, corpus: list[Segment]) -> None:
    # 64 lists need >= 39 x 64 = 2,496 training patches: more than train_size, fewer than the corpus
    index = build(tmp_path, corpus, "ivfpq", nlist=64, pq_bytes=8, train_size=500)
    assert index.manifest["index"]["nlist"] == 64
    assert recall_at_k(index, queries_from(index, 32, seed=6), 10, nprobe=64) >= 0.9


def test_auto_picks_by_size(built: dict[str, PatchIndex]) -> None:
    assert ix.resolve_kind(IndexParams(), 1_000_000) == "flat"
    assert ix.resolve_kind(IndexParams(), 1_000_001) == "ivfpq"
    assert ix.resolve_kind(IndexParams(kind="hnsw"), 10) == "hnsw"
    flat, ivfpq = built["flat"].manifest["index"], built["ivfpq"].manifest["index"]
    assert ivfpq["bytes_per_patch"] < 0.3 * flat["bytes_per_patch"]


def test_round_trip_of_records_grids_and_manifest(built: dict[str, PatchIndex], corpus: list[Segment]
                                                   ) -> None:
    index = built["flat"]
    source = corpus[0].records[3]
    assert index.record(source.image_id) == source
    expected = np.load(corpus[0].grid_file)[3].astype(np.float32)
    np.testing.assert_array_equal(index.grid(source.image_id), expected)
    assert index.num_images == 300
    assert index.num_patches == sum(int(r.coords.valid_patches().sum()) for s in corpus for r in s.records)
    assert index.num_patches < 300 * GRID * GRID  # padding patches of the 2:1 images are not indexed
    assert index.manifest["encoder_fingerprint"] == FINGERPRINT
    with pytest.raises(KeyError, match="nope"):
        index.record("nope")


def test_hits_decode_to_image_and_original_pixels(built: dict[str, PatchIndex], corpus: list[Segment]
                                                   ) -> None:
    index = built["flat"]
    record = corpus[0].records[0]  # 200 x 100: letterboxed, rows 0-1 and 6-7 are padding
    mask = index.valid_mask(record.image_id)
    row, col = (int(v) for v in np.argwhere(mask)[5])
    query = index.grid(record.image_id)[row, col][None]
    hit = index.search(query, 1)[0][0]
    assert (hit.image_id, hit.patient_id, hit.row, hit.col) == (record.image_id, record.patient_id, row, col)
    np.testing.assert_allclose([hit.x, hit.y], record.coords.from_grid(np.array([col, row])), atol=1e-9)
    assert 0 <= hit.x <= record.width and 0 <= hit.y <= record.height
    assert hit.score == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("kind", ["flat", "ivfpq", "hnsw"])
def test_restriction_and_exclusion(built: dict[str, PatchIndex], kind: str) -> None:
    index = built[kind]
    query = index.grid("img7")[4, 4][None]
    assert index.search(query, 1)[0][0].image_id == "img7"
    excluded = index.search(query, 20, exclude_image_ids=["img7"])[0]
    assert excluded and all(h.image_id != "img7" for h in excluded)
    only = index.search(query, 20, image_ids=["img10", "img11"])[0]
    assert {h.image_id for h in only} <= {"img10", "img11"} and len(only) == 20
    patients = index.search(query, 5, patient_ids=["p3"])[0]  # p3 = img6, img7
    assert patients[0].image_id == "img7" and {h.patient_id for h in patients} == {"p3"}
    assert index.search(query, 5, patient_ids=["unknown"]) == [[]]
    with pytest.raises(KeyError):
        index.search(query, 5, image_ids=["unknown"])


@pytest.mark.parametrize("kind", ["flat", "ivfpq", "hnsw"])
def test_large_restriction_goes_through_faiss_selector(built: dict[str, PatchIndex], kind: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    index = built[kind]
    monkeypatch.setattr(index_search, "EXACT_RESTRICT_MAX_PATCHES", 10)
    monkeypatch.setattr(index_search, "EXCLUDE_OVERFETCH_MAX", 10)
    allowed = [f"img{i}" for i in range(0, 300, 2)]
    query = index.grid("img8")[4, 4][None]
    hits = index.search(query, 10, image_ids=allowed, exclude_image_ids=["img8"])[0]
    assert len(hits) == 10 and all(h.image_id in allowed and h.image_id != "img8" for h in hits)
    assert all(h.image_id != "img8" for h in index.search(query, 10, exclude_image_ids=["img8"])[0])


def test_nprobe_per_call_does_not_change_the_index(built: dict[str, PatchIndex]) -> None:
    index = built["ivfpq"]
    queries = queries_from(index, 32, seed=5)
    before = index.search(queries, 10)
    assert recall_at_k(index, queries, 10, nprobe=1) < recall_at_k(index, queries, 10)
    assert index.search(queries, 10) == before  # the per-call nprobe left the shared index alone


def test_mismatched_encoder_is_refused(built: dict[str, PatchIndex]) -> None:
    root = built["flat"].directory.parent.parent
    assert PatchIndex.open(root, expected_encoder=FINGERPRINT).num_images == 300
    with pytest.raises(EncoderMismatchError, match="rebuild the index"):
        PatchIndex.open(root, expected_encoder="0" * 16)


def test_missing_index_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(IndexNotFoundError, match="no published index"):
        PatchIndex.open(tmp_path)
    assert ix.current_version(tmp_path) is None


def test_failed_build_leaves_current_untouched(tmp_path: Path, corpus: list[Segment],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    first = build(tmp_path, corpus, "flat").version

    def explode(*args: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(index_build, "_write_manifest", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        ix.create_version(tmp_path, corpus, FINGERPRINT)
    assert ix.current_version(tmp_path) == first
    assert ix.list_versions(tmp_path) == [first]
    assert not any((tmp_path / ix.BUILDING_DIR).iterdir())


def test_add_remove_publish_rollback(tmp_path: Path, corpus: list[Segment]) -> None:
    base = build(tmp_path, corpus[:1], "ivfpq", **FAST_IVF)  # also checks that add reuses the quantiser
    added = ix.extend_version(tmp_path, corpus[1:], encoder_fingerprint=FINGERPRINT)
    grown = PatchIndex.open(tmp_path, added)
    assert grown.num_images == 300 and grown.has_image("img200")
    assert grown.manifest["parent"] == base.version
    assert ix.current_version(tmp_path) == base.version  # not published yet
    removed = ix.remove_images(tmp_path, ["img200", "img3"], base=added)
    shrunk = PatchIndex.open(tmp_path, removed)
    assert shrunk.num_images == 298 and not shrunk.has_image("img200")
    query = grown.grid("img200")[3, 3][None]
    assert all(h.image_id != "img200" for h in shrunk.search(query, 50)[0])
    ix.publish(tmp_path, added)
    ix.publish(tmp_path, removed)
    assert ix.rollback(tmp_path) == added
    assert ix.current_version(tmp_path) == added
    assert ix.rollback(tmp_path) == base.version
    with pytest.raises(IndexNotFoundError, match="nothing to roll back"):
        ix.rollback(tmp_path)


def test_add_refuses_other_encoder_and_duplicates(tmp_path: Path, corpus: list[Segment]) -> None:
    build(tmp_path, corpus[:1], "flat")
    with pytest.raises(EncoderMismatchError):
        ix.extend_version(tmp_path, corpus[1:], encoder_fingerprint="0" * 16)
    with pytest.raises(ValueError, match="duplicate image id"):
        ix.extend_version(tmp_path, corpus[:1], encoder_fingerprint=FINGERPRINT)
    assert len(ix.list_versions(tmp_path)) == 1


@pytest.mark.slow
def test_hnsw_remove_rebuilds(tmp_path: Path, corpus: list[Segment]) -> None:
    build(tmp_path, corpus, "hnsw", hnsw_m=8)
    index = PatchIndex.open(tmp_path, ix.remove_images(tmp_path, ["img5"]))
    assert index.num_images == 299 and index.kind == "hnsw"
    assert all(h.image_id != "img5" for h in index.search(index.grid("img6")[:2].reshape(-1, DIM), 20)[0])


def test_prune_keeps_current_and_rollback_target(tmp_path: Path, corpus: list[Segment]) -> None:
    versions = [ix.create_version(tmp_path, corpus[:1], FINGERPRINT) for _ in range(4)]
    ix.publish(tmp_path, versions[0])
    ix.publish(tmp_path, versions[1])
    ix.publish(tmp_path, versions[2], keep=1)  # keeps the newest, the current and its rollback target
    assert ix.list_versions(tmp_path) == versions[1:]


def test_prune_drops_stored_encoders_no_kept_version_uses(tmp_path: Path, corpus: list[Segment]) -> None:
    store = tmp_path / ENCODER_STORE
    for name in (FINGERPRINT, "old-unused", "young-unused"):
        (store / name).mkdir(parents=True)
    two_days_ago = time.time() - 2 * 86400
    for name in (FINGERPRINT, "old-unused"):
        os.utime(store / name, (two_days_ago, two_days_ago))
    ix.publish(tmp_path, ix.create_version(tmp_path, corpus[:1], FINGERPRINT))
    # the version's own encoder stays; a young one may belong to a build still running
    assert sorted(p.name for p in store.iterdir()) == sorted([FINGERPRINT, "young-unused"])


def test_publish_unknown_version_fails(tmp_path: Path) -> None:
    with pytest.raises(IndexNotFoundError, match="no complete version"):
        ix.publish(tmp_path, "nope")


def test_ids_pack_and_unpack() -> None:
    ids = ix.pack_ids(np.array([0, 5, 2**40]), np.array([0, 195, 2**20 - 1]))
    images, patches = ix.unpack_ids(ids)
    assert images.tolist() == [0, 5, 2**40] and patches.tolist() == [0, 195, 2**20 - 1]


def test_png_thumbnails_of_older_versions_are_found_and_kept(tmp_path: Path, corpus: list[Segment]) -> None:
    """Versions built before previews became JPEG hold <index>.png: still served, and kept by add/remove."""
    folder = tmp_path / "thumbs"
    folder.mkdir()
    first, second = corpus[0].records[0], corpus[0].records[1]
    (folder / f"{first.image_index}.png").write_bytes(b"old png")
    (folder / f"{second.image_index}.jpg").write_bytes(b"new jpeg")
    with_thumbs = Segment(corpus[0].grid_file, corpus[0].first, corpus[0].records, folder)
    base = build(tmp_path / "root", [with_thumbs], "flat")
    assert base.thumbnail_path(first.image_id).read_bytes() == b"old png"  # type: ignore[union-attr]
    assert base.thumbnail_path(second.image_id).read_bytes() == b"new jpeg"  # type: ignore[union-attr]
    assert base.thumbnail_path(corpus[0].records[2].image_id) is None
    removed = PatchIndex.open(tmp_path / "root", ix.remove_images(tmp_path / "root", [second.image_id]))
    assert removed.thumbnail_path(first.image_id).read_bytes() == b"old png"  # type: ignore[union-attr]
    newer = corpus[1].records[0]  # a JPEG-era addition on top of a PNG-era version
    (folder / f"{newer.image_index}.jpg").write_bytes(b"added jpeg")
    grown = PatchIndex.open(tmp_path / "root", ix.extend_version(
        tmp_path / "root", [Segment(corpus[1].grid_file, corpus[1].first, corpus[1].records, folder)],
        base=removed.version))
    assert grown.thumbnail_path(newer.image_id).read_bytes() == b"added jpeg"  # type: ignore[union-attr]
    assert grown.thumbnail_path(first.image_id).read_bytes() == b"old png"  # type: ignore[union-attr]


@pytest.mark.parametrize("kind", ["flat", "ivfpq", "hnsw"])
def test_scores_are_cosines_whatever_the_stored_norms(tmp_path: Path, corpus: list[Segment],
                                                       kind: str) -> None:
    """Rows stored with norms far from 1 score the same cosine through FAISS and the exact scan."""
    grid = np.load(corpus[0].grid_file).astype(np.float32)
    scales = np.random.default_rng(3).uniform(0.5, 2.0, size=(*grid.shape[:3], 1)).astype(np.float32)
    np.save(tmp_path / "scaled.npy", (grid * scales).astype(np.float16))
    scaled = Segment(tmp_path / "scaled.npy", corpus[0].first, corpus[0].records)
    index = build(tmp_path / kind, [scaled], kind, **(FAST_IVF if kind == "ivfpq" else {}))
    query = 3.0 * index.grid("img7")[1, 2][None]  # not a unit vector either
    through_faiss = index.search(query, 5, rerank=50)[0]
    scanned = index.search(query, 5, image_ids=["img7"])[0][0]
    assert (through_faiss[0].image_id, through_faiss[0].row, through_faiss[0].col) == ("img7", 1, 2)
    assert through_faiss[0].score == pytest.approx(1.0, abs=1e-5)
    assert scanned.score == pytest.approx(1.0, abs=1e-5)
    stored = unit_rows(np.stack([index.grid(h.image_id)[h.row, h.col] for h in through_faiss]))
    np.testing.assert_allclose([h.score for h in through_faiss], stored @ unit_rows(query)[0], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The manifest reader and the package's names


def test_manifest_reader_gives_the_published_or_a_named_version(tmp_path: Path,
                                                                corpus: list[Segment]) -> None:
    first = ix.create_version(tmp_path, corpus[:1], FINGERPRINT, IndexParams(kind="flat"),
                              build_config={"encoder": "/enc", "device": "cpu", "precision": "fp32"})
    with pytest.raises(IndexNotFoundError, match="no published index"):
        ix.read_manifest(tmp_path)
    ix.publish(tmp_path, first)
    second = ix.extend_version(tmp_path, corpus[1:], encoder_fingerprint=FINGERPRINT)
    published = ix.read_manifest(tmp_path)
    assert isinstance(published, ix.Manifest) and published.version == first
    assert (published.index_type, published.encoder_fingerprint) == ("flat", FINGERPRINT)
    assert published.num_images == len(corpus[0].records) == PatchIndex.open(tmp_path).num_images
    assert published.build == {"encoder": "/enc", "device": "cpu", "precision": "fp32"}
    assert published.bytes_per_patch > 0 and published.raw["version"] == first
    named = ix.read_manifest(tmp_path, second)
    assert named.version == second and named.num_images == sum(len(s.records) for s in corpus)
    assert named.next_image_index == corpus[1].first + len(corpus[1].records)
    assert named.num_patches == PatchIndex.open(tmp_path, second).num_patches


def test_manifest_reader_refuses_missing_and_foreign_versions(tmp_path: Path, corpus: list[Segment]) -> None:
    with pytest.raises(IndexNotFoundError, match="no published index"):
        ix.read_manifest(tmp_path / "nowhere")
    version = ix.create_version(tmp_path, corpus[:1], FINGERPRINT, IndexParams(kind="flat"))
    with pytest.raises(IndexNotFoundError, match=r"manifest\.json missing"):
        ix.read_manifest(tmp_path, "20000101-000000-000000")
    path = ix.version_dir(tmp_path, version) / ix.MANIFEST_FILE
    path.write_text(path.read_text().replace('"format": 1', '"format": 99'))
    with pytest.raises(ix.IndexFormatError, match="format 99"):
        ix.read_manifest(tmp_path, version)


def test_every_exported_name_resolves_and_type_checkers_see_the_same_names() -> None:
    init = Path(ix.__file__)
    tree = ast.parse(init.read_text())
    checked = next(node for node in tree.body if isinstance(node, ast.If))  # `if TYPE_CHECKING:`
    typed = {alias.asname or alias.name for node in checked.body
             if isinstance(node, ast.Import | ast.ImportFrom) for alias in node.names}
    eager = {"DEFAULT_KEEP", "INDEX_TYPES", "IndexParams", "resolve_kind"}
    assert typed | eager == set(ix.__all__) and not typed & eager
    for name in ix.__all__:
        assert getattr(ix, name) is not None, name
    with pytest.raises(AttributeError):
        ix.no_such_name  # noqa: B018
