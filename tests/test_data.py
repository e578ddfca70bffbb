"""Training data: sources, the sample pipeline's geometry, determinism and the sampler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ace_model.config import preset
from ace_model.geometry import ViewPair, composition_target, decomposition_target, overlap_masks, sample_pair
from ace_model.method import ACEBatch
from training.data import (
    ACEDataset,
    EpochSampler,
    Photometric,
    build_sample,
    collate,
    find_images,
    load_grey,
    random_resized_box,
    read_list_file,
    resolve_images,
    to_input,
)

GEOMETRY = preset("tiny").geometry


def write_png(path: Path, seed: int, size: tuple[int, int] = (90, 80)) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size=size, dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    for i in range(4):
        write_png(tmp_path / "data" / f"sub{i % 2}" / f"img{i}.png", i)
    (tmp_path / "data" / "notes.txt").write_text("not an image")
    return tmp_path / "data"


def test_find_images_is_recursive_and_skips_other_files(image_folder: Path) -> None:
    found = find_images(image_folder)
    assert [p.name for p in found] == ["img0.png", "img2.png", "img1.png", "img3.png"]


def test_find_images_reports_an_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no images"):
        find_images(tmp_path)


def test_list_file_takes_the_first_field_and_finds_nested_names(tmp_path: Path) -> None:
    write_png(tmp_path / "root" / "a.png", 0)
    write_png(tmp_path / "root" / "images_001" / "images" / "b.png", 1)
    listing = tmp_path / "train_val_list.txt"
    listing.write_text("Image Index,Finding Labels\n# comment\na.png Effusion|Mass\n\nb.png,No Finding\n")
    paths = read_list_file(listing, tmp_path / "root")
    assert paths == [tmp_path / "root" / "a.png", tmp_path / "root" / "images_001" / "images" / "b.png"]


def test_list_file_with_missing_images_says_which(tmp_path: Path) -> None:
    write_png(tmp_path / "root" / "a.png", 0)
    listing = tmp_path / "list.txt"
    listing.write_text("a.png\nmissing.png\n")
    with pytest.raises(FileNotFoundError, match=r"1 of 2 .*missing.png"):
        read_list_file(listing, tmp_path / "root")


def test_landmark_dataset_dir_uses_only_its_images_folder(tmp_path: Path) -> None:
    write_png(tmp_path / "set" / "images" / "s1.png", 0)
    write_png(tmp_path / "set" / "plots" / "errors.png", 1)
    (tmp_path / "set" / "landmarks.csv").write_text("image,landmark,x,y\n")
    assert resolve_images(tmp_path / "set") == [tmp_path / "set" / "images" / "s1.png"]


def test_dicom_images_decode_to_grey(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    grey = load_grey(Path(get_testdata_file("CT_small.dcm")), short_side=32)
    assert grey.shape == (32, 32) and grey.dtype == np.float32
    assert 0.0 <= grey.min() < grey.max() <= 1.0


def test_random_resized_box_respects_area_ratio_and_bounds() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = random_resized_box(rng, 300, 200, (0.85, 1.0))
        w, h = right - left, bottom - top
        assert left >= 0 and right <= 200 and top >= 0 and bottom <= 300
        assert 0.85 * 0.999 <= w * h / (300 * 200) <= 1.0 + 1e-9
        assert 3 / 4 - 1e-9 <= w / h <= 4 / 3 + 1e-9


def test_views_are_the_base_regions_the_offsets_name() -> None:
    rng = np.random.default_rng(3)
    base = rng.random((GEOMETRY.base_px, GEOMETRY.base_px)).astype(np.float32)
    cell, n = GEOMETRY.cell, GEOMETRY.n
    for _ in range(10):
        pair = sample_pair(rng, GEOMETRY.grid, n)
        sample = build_sample(base, pair, GEOMETRY, rng, augment=None)
        xs, ys, xl, yl = pair.xs * cell, pair.ys * cell, pair.xl * cell, pair.yl * cell
        small = base[xs : xs + n * cell, ys : ys + n * cell]
        big = base[xl : xl + 2 * n * cell, yl : yl + 2 * n * cell]
        large = big.reshape(n * cell, 2, n * cell, 2).mean(axis=(1, 3))
        torch.testing.assert_close(sample.view_s, to_input(small))
        torch.testing.assert_close(sample.view_l, to_input(large))
        assert sample.offsets.tolist() == [pair.xl, pair.yl, pair.xs, pair.ys]


def test_masks_and_targets_follow_the_offsets() -> None:
    rng = np.random.default_rng(4)
    base = rng.random((GEOMETRY.base_px, GEOMETRY.base_px)).astype(np.float32)
    pair = ViewPair(1, 2, 5, 0)
    sample = build_sample(base, pair, GEOMETRY, rng, augment=Photometric())
    mask_l, mask_s = overlap_masks(pair, GEOMETRY.n)
    assert torch.equal(sample.mask_l, torch.from_numpy(mask_l))
    assert torch.equal(sample.mask_s, torch.from_numpy(mask_s))
    assert torch.equal(sample.target_dec, torch.from_numpy(decomposition_target(pair, GEOMETRY.n)))
    assert torch.equal(sample.target_comp, torch.from_numpy(composition_target(pair, GEOMETRY.n)))


def test_photometric_augmentation_stays_in_range_and_is_seeded() -> None:
    view = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    always = Photometric(p_brightness_contrast=1, p_blur=1, p_sharpen=1, p_clahe=1)
    first = always(view, np.random.default_rng(7))
    second = always(view, np.random.default_rng(7))
    assert first.shape == view.shape and first.dtype == np.float32
    assert first.min() >= 0.0 and first.max() <= 1.0
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first, view)


def test_dataset_samples_depend_only_on_seed_epoch_and_index(image_folder: Path) -> None:
    paths = find_images(image_folder)
    one = ACEDataset(paths, GEOMETRY, seed=5, augment=Photometric())
    other = ACEDataset(paths, GEOMETRY, seed=5, augment=Photometric(), cache_mb=0)
    for key in [(0, 1), (3, 2)]:
        a, b = one[key], other[key]
        assert torch.equal(a.view_l, b.view_l) and torch.equal(a.offsets, b.offsets)
    epochs = {tuple(one[(epoch, 0)].offsets.tolist()) for epoch in range(8)}
    assert len(epochs) > 1


def test_collate_makes_an_ace_batch_of_the_configured_shapes(image_folder: Path) -> None:
    dataset = ACEDataset(find_images(image_folder), GEOMETRY, augment=Photometric())
    batch = collate([dataset[i] for i in range(3)])
    n, side = GEOMETRY.n, GEOMETRY.view_px
    assert isinstance(batch, ACEBatch)
    assert batch.view_l.shape == batch.view_s.shape == (3, 3, side, side)
    assert batch.mask_l.dtype == torch.bool and batch.mask_s.shape == (3, n * n)
    assert batch.target_dec.shape == (3, n * n, 4 * n * n)
    assert batch.target_comp.shape == (3, n * n, n * n // 4)


def test_an_unreadable_image_is_replaced_with_a_warning(image_folder: Path) -> None:
    broken = image_folder / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    dataset = ACEDataset([broken, *find_images(image_folder)], GEOMETRY)
    with pytest.warns(UserWarning, match="broken.png"):
        sample = dataset[0]
    assert torch.isfinite(sample.view_s).all()


def test_sampler_shards_ranks_disjointly_and_resumes_mid_epoch() -> None:
    data = list(range(10))
    samplers = [EpochSampler(data, samples_per_rank=5, num_replicas=2, rank=r, seed=0) for r in (0, 1)]
    for sampler in samplers:
        sampler.set_epoch(3)
    keys = [list(s) for s in samplers]
    assert all(epoch == 3 for part in keys for epoch, _ in part)
    assert sorted(i for part in keys for _, i in part) == data
    samplers[0].start = 2
    assert list(samplers[0]) == keys[0][2:] and len(samplers[0]) == 3


def test_sampler_chains_permutations_for_long_epochs() -> None:
    sampler = EpochSampler(list(range(4)), samples_per_rank=10, num_replicas=1, rank=0, seed=1)
    indices = [i for _, i in sampler]
    assert len(indices) == 10 and sorted(indices[:4]) == [0, 1, 2, 3]
    sampler.set_epoch(1)
    assert [i for _, i in sampler] != indices
