"""training.build_index and `ace index`: a tiny encoder artifact over a few small PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ace_model import index as ix
from ace_model.encoder import Encoder, EncoderSpec, load_encoder
from ace_model.preprocess import load_image, normalise, prepare
from tests.helpers import DATASET_SIZES as SIZES
from tests.helpers import write_dataset
from training import build_index as bi
from training.cli import main


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("encoder")
    Encoder(EncoderSpec("vit_tiny_patch16_224", 64)).save(directory)
    return directory





@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), SIZES)


OPTIONS = bi.EmbedOptions(batch_size=4, num_workers=0, show_progress=False)


def test_build_decodes_hits_to_image_and_pixels(tmp_path: Path, encoder_dir: Path, dataset: Path) -> None:
    version = bi.build_index(encoder_dir, dataset, tmp_path, options=OPTIONS, chunk_size=4)
    index = ix.PatchIndex.open(tmp_path, expected_encoder=load_encoder(encoder_dir))
    assert index.version == version == ix.current_version(tmp_path)
    assert index.num_images == len(SIZES) and index.record("im3").patient_id == "pat1"
    record = index.record("im3")  # 120 x 60: letterboxed, padding rows are not indexed
    assert (record.width, record.height) == (120, 60)
    assert index.num_patches < len(SIZES) * 16
    encoder = load_encoder(encoder_dir)
    tensor, coords = prepare(load_image(dataset / "images" / "im3.png"), 64, encoder.grid)
    grid = encoder(normalise(tensor[None])).patches[0].detach().numpy()
    np.testing.assert_allclose(index.grid("im3"), grid, atol=2e-3)  # float16 store
    row, col = np.argwhere(coords.valid_patches().reshape(4, 4))[0]
    hit = index.search(grid[row, col][None], 1)[0][0]
    assert (hit.image_id, hit.row, hit.col) == ("im3", row, col)
    np.testing.assert_allclose([hit.x, hit.y], coords.from_grid(np.array([col, row])))
    thumb = index.thumbnail_path("im3")
    assert thumb is not None and thumb.suffix == ".jpg"
    preview = Image.open(thumb)
    assert preview.format == "JPEG" and preview.mode == "L" and preview.size == (120, 60)
    assert not any((tmp_path / ix.BUILDING_DIR).iterdir())


def test_interrupted_build_resumes_and_never_publishes(tmp_path: Path, encoder_dir: Path, dataset: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    first = bi.build_index(encoder_dir, dataset, tmp_path, options=OPTIONS, chunk_size=2)
    calls = {"n": 0}
    real_write = bi.ChunkWriter.write

    def crash_on_second(self: bi.ChunkWriter) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real_write(self)

    monkeypatch.setattr(bi.ChunkWriter, "write", crash_on_second)
    metadata = tmp_path / "other.csv"
    metadata.write_text("image_id,patient_id\nim0,other\n")
    with pytest.raises(KeyboardInterrupt):
        bi.build_index(encoder_dir, dataset, tmp_path, metadata=metadata, options=OPTIONS, chunk_size=2)
    assert ix.current_version(tmp_path) == first and ix.list_versions(tmp_path) == [first]
    monkeypatch.setattr(bi.ChunkWriter, "write", real_write)
    embedded: list[int] = []
    real_embed = bi._embed_batch
    monkeypatch.setattr(bi, "_embed_batch", lambda batch, *a: (embedded.extend(s["position"] for s in batch),
                                                                 real_embed(batch, *a)))
    second = bi.build_index(encoder_dir, dataset, tmp_path, metadata=metadata, options=OPTIONS, chunk_size=2)
    assert sorted(embedded) == [2, 3, 4, 5]  # chunk 0 was kept from the interrupted run
    assert ix.PatchIndex.open(tmp_path).record("im0").patient_id == "other" and second != first


def test_sharded_build_then_merge_via_cli(tmp_path: Path, encoder_dir: Path, dataset: Path) -> None:
    common = ["--encoder", str(encoder_dir), "--images", str(dataset), "--out", str(tmp_path),
              "--chunk-size", "2", "--workers", "0"]
    for shard in ("0", "1"):
        assert main(["index", "build", *common, "--num-shards", "2", "--shard", shard]) == 0
    assert ix.list_versions(tmp_path) == []
    assert main(["index", "merge", *common, "--publish"]) == 0
    index = ix.PatchIndex.open(tmp_path)
    assert sorted(index.image_ids()) == [f"im{i}" for i in range(len(SIZES))]


def test_merge_with_missing_shard_fails_clearly(tmp_path: Path, encoder_dir: Path, dataset: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--encoder", str(encoder_dir), "--images", str(dataset), "--out", str(tmp_path),
              "--chunk-size", "2", "--workers", "0"]
    assert main(["index", "build", *common, "--num-shards", "2", "--shard", "0"]) == 0
    assert main(["index", "merge", *common]) == 2
    assert "not embedded yet" in capsys.readouterr().err


def test_add_remove_publish_rollback_list_via_cli(tmp_path: Path, encoder_dir: Path, dataset: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "root")
    more = write_dataset(tmp_path / "more", [(64, 64), (80, 40)], prefix="new")
    assert main(["index", "build", "--encoder", str(encoder_dir), "--images", str(dataset), "--out", root,
                 "--workers", "0", "--publish"]) == 0
    first = ix.current_version(root)
    assert main(["index", "add", "--images", str(more), "--root", root, "--workers", "0", "--publish"]) == 0
    added = ix.PatchIndex.open(root)
    assert added.num_images == len(SIZES) + 2 and added.thumbnail_path("new1") is not None
    assert main(["index", "remove", "--image-ids", "im0", "--root", root, "--publish"]) == 0
    assert not ix.PatchIndex.open(root).has_image("im0")
    assert main(["index", "rollback", "--root", root]) == 0
    assert ix.current_version(root) == added.version
    assert main(["index", "publish", first or "", "--root", root]) == 0
    assert main(["index", "list", "--root", root]) == 0
    assert f"* {first}" in capsys.readouterr().out
    assert main(["index", "remove", "--image-ids", "nope", "--root", root]) == 2


def test_threaded_decoding_keeps_order_and_reports_bad_files(tmp_path: Path, dataset: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    items = [*bi.collect_sources(dataset), bi.ImageSource("broken", broken)]
    decoded = bi.DecodedImages(items, 64, 4, grey=False)
    positions = [6, 0, 3, 5, 1, 2, 4]
    inline = list(bi.decoded_batches(decoded, positions, 3, workers=0))
    threaded = list(bi.decoded_batches(decoded, positions, 3, workers=2))
    assert [[s["position"] for s in b] for b in threaded] == [[6, 0, 3], [5, 1, 2], [4]]
    flat = [[sample for batch in batches for sample in batch] for batches in (threaded, inline)]
    for mine, theirs in zip(*flat, strict=True):
        assert (mine["error"] is None) == (theirs["error"] is None)
        assert mine["error"] is None or "broken.png" in mine["error"]
        if mine["error"] is None:
            assert mine["thumbnail"] == theirs["thumbnail"]
            assert bool((mine["tensor"] == theirs["tensor"]).all())


def test_sources_folder_list_file_and_duplicates(tmp_path: Path, dataset: Path) -> None:
    items = bi.collect_sources(dataset / "images")
    assert [i.image_id for i in items] == [f"im{i}" for i in range(len(SIZES))]
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in sorted((dataset / "images").glob("*.png"))[:2]))
    assert len(bi.collect_sources(listing)) == 2
    with pytest.raises(ValueError, match="names both"):
        bi.collect_sources([dataset, dataset / "images"])


@pytest.mark.parametrize(("cores", "torch_threads", "expected"),
                         [(2, 2, 0), (2, 1, 1), (16, 8, 4), (16, 16, 2)])
def test_decode_threads_use_the_cores_torch_leaves_free(monkeypatch: pytest.MonkeyPatch, cores: int,
                                                        torch_threads: int, expected: int) -> None:
    monkeypatch.setattr(bi.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(bi.torch, "get_num_threads", lambda: torch_threads)
    assert bi.default_decode_threads() == expected
