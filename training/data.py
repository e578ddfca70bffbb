"""Training data: image sources and the ACE sample pipeline (docs/training.md, "Data sources").

Sources: a folder (recursive), a list file of relative paths with a root (ChestX-ray14 split
lists), or a landmark data set directory such as the phantoms (`DIR/images/`).

One sample: decode -> grey -> random-resized-crop to the base image (grid*cell px) -> draw a
parity-aligned view pair -> cut L and S on cell boundaries -> independent photometric
augmentation per view (never geometric: it would move the grid) -> normalise -> masks and targets.

Randomness is drawn from a generator seeded by (seed, epoch, index), so a sample depends neither
on the worker that makes it nor on where a run was resumed.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from skimage import exposure
from torch.utils.data import Dataset, DistributedSampler

from ace_model.config import PIXEL_MEAN, PIXEL_STD, GeometryConfig
from ace_model.errors import InputError
from ace_model.geometry import (
    ViewPair,
    composition_target,
    cut_views,
    decomposition_target,
    overlap_masks,
    sample_pair,
)
from ace_model.method import ACEBatch
from ace_model.preprocess import IMAGE_SUFFIXES, DecodedImage, ImageDecodeError, load_image

RATIO_RANGE = (3 / 4, 4 / 3)  # aspect-ratio jitter of the base random-resized-crop (torchvision default)
MAX_DECODE_RETRIES = 10  # consecutive unreadable images tolerated before giving up


# ---------------------------------------------------------------------------------------------
# Image sources


def find_images(folder: str | Path) -> list[Path]:
    """All PNG / JPEG / TIFF / BMP / DICOM files below `folder`, sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found below {root}")
    return paths


def _list_entry(line: str) -> str | None:
    """First field of a split-list line ("path [labels...]" or CSV); None for blanks/headers."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    entry = text.replace(",", " ").split()[0]
    return entry if Path(entry).suffix.lower() in IMAGE_SUFFIXES else None


def read_list_file(list_file: str | Path, root: str | Path) -> list[Path]:
    """Paths named in a split list, relative to `root`.

    ChestX-ray14 lists hold bare file names while the download nests them in
    `images_NNN/images/`; names not found directly under `root` are looked up by file name below it.
    """
    root = Path(root)
    entries = [e for e in map(_list_entry, Path(list_file).read_text().splitlines()) if e]
    if not entries:
        raise InputError(f"list file {list_file} names no image files")
    paths = [root / e for e in entries]
    missing = [i for i, p in enumerate(paths) if not p.is_file()]
    if missing:
        by_name = {p.name: p for p in find_images(root)}
        for i in missing:
            paths[i] = by_name.get(Path(entries[i]).name, paths[i])
    _check_exist(paths, list_file, root)
    return paths


def _check_exist(paths: Sequence[Path], list_file: str | Path, root: Path) -> None:
    absent = [str(p) for p in paths if not p.is_file()]
    if absent:
        raise FileNotFoundError(
            f"{len(absent)} of {len(paths)} images named in {list_file} are not under {root}, "
            f"e.g. {absent[:3]}; check --root"
        )


def resolve_images(
    source: str | Path | None, list_file: str | Path | None = None, root: str | Path | None = None
) -> list[Path]:
    """The training images of a folder, a landmark data set directory, or a list file + root."""
    if list_file is not None:
        base = root if root is not None else source
        if base is None:
            raise InputError("a list file needs --root (the folder its paths are relative to)")
        return read_list_file(list_file, base)
    if source is None:
        raise InputError("no training data: give a folder (--data) or a list file (--list, --root)")
    folder = Path(source)
    if (folder / "images").is_dir() and (folder / "landmarks.csv").is_file():
        return find_images(folder / "images")  # a landmark data set: skip plots and extras
    return find_images(folder)


def read_image(path: Path) -> DecodedImage:
    """load_image for a file the user named: an undecodable file is a user error naming it."""
    try:
        return load_image(path)
    except ImageDecodeError as err:
        raise InputError(f"{path}: {err}") from err


# ---------------------------------------------------------------------------------------------
# Pixel operations (grey float32 images in [0, 1])


def load_grey(path: Path, short_side: int) -> np.ndarray:
    """Decode to grey (H, W) float32, downsized so that the short side is at most `short_side`."""
    grey = load_image(path).as_float().mean(axis=2)
    height, width = grey.shape
    scale = short_side / min(height, width)
    if scale >= 1.0:
        return grey.astype(np.float32)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = Image.fromarray(grey.astype(np.float32), mode="F")
    return np.asarray(image.resize(size, Image.Resampling.BICUBIC))


def random_resized_box(
    rng: np.random.Generator, height: int, width: int, scale: tuple[float, float]
) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a crop with area in `scale` and ratio in 3/4..4/3."""
    log_ratio = np.log(RATIO_RANGE)
    for _ in range(10):
        area = height * width * rng.uniform(*scale)
        ratio = float(np.exp(rng.uniform(*log_ratio)))
        w, h = np.sqrt(area * ratio), np.sqrt(area / ratio)
        if w <= width and h <= height:
            left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
            return float(left), float(top), float(left + w), float(top + h)
    return _central_box(height, width)


def _central_box(height: int, width: int) -> tuple[float, float, float, float]:
    """Fallback (as torchvision): the largest central crop with the ratio clamped to 3/4..4/3."""
    w = min(float(width), height * RATIO_RANGE[1])
    h = min(float(height), width / RATIO_RANGE[0])
    left, top = (width - w) / 2, (height - h) / 2
    return left, top, left + w, top + h


def resize_box(grey: np.ndarray, box: tuple[float, float, float, float], side: int) -> np.ndarray:
    """Bicubic resample of `box` of `grey` to (side, side), clipped to [0, 1]."""
    image = Image.fromarray(grey.astype(np.float32), mode="F")
    return np.clip(np.asarray(image.resize((side, side), Image.Resampling.BICUBIC, box=box)), 0.0, 1.0)


@dataclass(frozen=True)
class Photometric:
    """Per-view photometric augmentation (docs/training.md, "Data sources"; albumentations-like defaults)."""

    p_brightness_contrast: float = 0.5  # probability of a brightness/contrast change
    brightness: float = 0.2  # additive shift drawn from +-brightness
    contrast: float = 0.2  # multiplicative factor drawn from 1 +- contrast
    p_blur: float = 0.5  # probability of a Gaussian blur
    blur_sigma: tuple[float, float] = (0.3, 1.5)  # blur sigma range in pixels
    p_sharpen: float = 0.3  # probability of an unsharp mask
    sharpen_amount: tuple[float, float] = (0.2, 0.5)  # unsharp-mask strength range
    p_clahe: float = 0.3  # probability of contrast-limited adaptive histogram equalisation
    clahe_clip: float = 0.01  # CLAHE clip limit (skimage units)

    def __call__(self, view: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() < self.p_brightness_contrast:
            gain = rng.uniform(1 - self.contrast, 1 + self.contrast)
            view = view * gain + rng.uniform(-self.brightness, self.brightness)
        if rng.random() < self.p_blur:
            view = ndimage.gaussian_filter(view, rng.uniform(*self.blur_sigma))
        if rng.random() < self.p_sharpen:
            view = view + rng.uniform(*self.sharpen_amount) * (view - ndimage.gaussian_filter(view, 1.0))
        view = np.clip(view, 0.0, 1.0)
        if rng.random() < self.p_clahe:
            view = exposure.equalize_adapthist(view, clip_limit=self.clahe_clip)
        return view.astype(np.float32)


def to_input(view: np.ndarray) -> torch.Tensor:
    """Grey (H, W) in [0, 1] -> normalised (3, H, W) model input."""
    grey = (torch.from_numpy(np.ascontiguousarray(view, dtype=np.float32)) - PIXEL_MEAN) / PIXEL_STD
    return grey.expand(3, -1, -1).contiguous()


# ---------------------------------------------------------------------------------------------
# Samples


@dataclass
class ACESample:
    view_l: torch.Tensor  # (3, V, V) large view, downsampled by 2
    view_s: torch.Tensor  # (3, V, V) small view
    mask_l: torch.Tensor  # (n*n,) bool
    mask_s: torch.Tensor  # (n*n,) bool
    target_dec: torch.Tensor  # (n*n, 4*n*n)
    target_comp: torch.Tensor  # (n*n, n*n/4)
    offsets: torch.Tensor  # (4,) int64: xl, yl, xs, ys in cells


def build_sample(
    base: np.ndarray, pair: ViewPair, geometry: GeometryConfig,
    rng: np.random.Generator, augment: Photometric | None,
) -> ACESample:
    """Views, masks and targets of one base image (grid*cell px, grey) and one view pair."""
    large, small = cut_views(base, pair, geometry.cell, geometry.n)
    if augment is not None:
        large, small = augment(large, rng), augment(small, rng)
    mask_l, mask_s = overlap_masks(pair, geometry.n)
    return ACESample(
        to_input(large), to_input(small), torch.from_numpy(mask_l), torch.from_numpy(mask_s),
        torch.from_numpy(decomposition_target(pair, geometry.n)),
        torch.from_numpy(composition_target(pair, geometry.n)),
        torch.from_numpy(pair.as_array()),
    )


def collate(samples: Sequence[ACESample]) -> ACEBatch:
    def stack(name: str) -> torch.Tensor:
        return torch.stack([getattr(s, name) for s in samples])

    return ACEBatch(stack("view_l"), stack("view_s"), stack("mask_l"), stack("mask_s"),
                    stack("target_dec"), stack("target_comp"))


class ACEDataset(Dataset[ACESample]):
    """ACE training samples from image files; keys are `index` or `(epoch, index)`.

    Decoded images are kept downsized in memory (per process, up to `cache_mb`) because decoding
    costs about as much as a CPU training step.
    """

    def __init__(
        self, paths: Sequence[Path], geometry: GeometryConfig, seed: int = 0,
        augment: Photometric | None = None, cache_mb: float = 1024.0,
    ) -> None:
        if not paths:
            raise InputError("the training data set is empty")
        self.paths = list(paths)
        self.geometry = geometry
        self.seed = seed
        self.augment = augment
        self.cache_bytes = int(cache_mb * 2**20)
        self._cache: dict[int, np.ndarray] = {}
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> ACESample:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        rng = np.random.default_rng([self.seed, epoch, index])
        base = self.base_image(index, rng)
        pair = sample_pair(rng, self.geometry.grid, self.geometry.n)
        return build_sample(base, pair, self.geometry, rng, self.augment)

    def base_image(self, index: int, rng: np.random.Generator) -> np.ndarray:
        """Random-resized-crop of image `index` to the (base_px, base_px) grey base image."""
        grey = self.grey(index)
        height, width = grey.shape
        box = random_resized_box(rng, height, width, self.geometry.base_scale)
        return resize_box(grey, box, self.geometry.base_px)

    def grey(self, index: int) -> np.ndarray:
        if index in self._cache:
            return self._cache[index].astype(np.float32)
        grey = self._decode_with_fallback(index)
        stored = grey.astype(np.float16)
        if self._cached_bytes + stored.nbytes <= self.cache_bytes:
            self._cache[index] = stored
            self._cached_bytes += stored.nbytes
        return grey

    def _decode_with_fallback(self, index: int) -> np.ndarray:
        """Unreadable files are replaced by the next readable one, with a warning (one bad file
        must not end a long run)."""
        for attempt in range(MAX_DECODE_RETRIES):
            current = (index + attempt) % len(self.paths)
            try:
                return load_grey(self.paths[current], self.geometry.base_px)
            except (ImageDecodeError, OSError) as err:
                warnings.warn(f"skipping unreadable training image {self.paths[current]}: {err}",
                              stacklevel=2)
        raise RuntimeError(f"{MAX_DECODE_RETRIES} consecutive training images could not be read, "
                           f"starting at {self.paths[index]}")


class EpochSampler(DistributedSampler[tuple[int, int]]):
    """Shuffled, rank-sharded `(epoch, index)` keys; `set_epoch` per epoch, `start` to resume.

    Every epoch is `samples_per_rank` keys per rank (whole permutations chained when an epoch is
    longer than the data set), so the schedule's epoch length is independent of the data size.
    """

    def __init__(
        self, dataset: Dataset[Any], samples_per_rank: int, num_replicas: int, rank: int, seed: int
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.samples_per_rank = samples_per_rank
        self.start = 0  # keys of the current epoch already consumed (resume mid-epoch)

    def epoch_indices(self) -> list[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        needed = self.samples_per_rank * self.num_replicas
        order: list[int] = []
        while len(order) < needed:
            order += torch.randperm(len(self.dataset), generator=generator).tolist()  # type: ignore[arg-type]
        return order[self.rank : needed : self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.epoch_indices()[self.start :]:
            yield self.epoch, index

    def __len__(self) -> int:
        return self.samples_per_rank - self.start
