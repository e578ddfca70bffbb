"""The methods `ace eval` compares: fit on a list of images, then locate points of image `query`
in image `target` (original px in, original px out).

EncoderMethod: an encoder's embeddings and ace_model.match.match_points, the service's matcher;
NCCMethod: template matching on the letterboxed model-size images; FullResolutionNCC: the same at
the images' original resolution; IdentityMethod: the same relative position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from time import perf_counter
from typing import Any, Protocol

import numpy as np
import torch
from scipy.ndimage import uniform_filter
from skimage.feature import match_template

from ace_model.embedding import EmbeddingPolicy
from ace_model.encoder import Encoder, EncoderSpec
from ace_model.match import Found, Levels, MatchOptions, argmax_2d, look_scales, match_points, refine_peak
from ace_model.preprocess import CoordinateMap, DecodedImage, encoder_view, is_grey, letterbox_tensor, prepare


class Method(Protocol):
    name: str

    def fit(self, images: Sequence[DecodedImage]) -> None: ...

    def locate(self, query: int, target: int, xy: np.ndarray) -> np.ndarray:
        """(N, 2) original px in `query` -> (N, 2) original px in `target`."""
        ...


@dataclass(frozen=True)
class Embedded:
    """Images embedded at one input size: per image its Levels and letterbox transform."""

    images: tuple[DecodedImage, ...]
    levels: list[Levels]
    coords: list[CoordinateMap]
    seconds: float  # wall time of preparing and embedding them all


def embed_levels(encoder: Encoder, images: Sequence[DecodedImage], size: int, batch_size: int,
                 desc: str, policy: EmbeddingPolicy) -> Embedded:
    """Letterbox every image at `size` px (a multiple of the base size) and embed it once."""
    grid = encoder.grid * size // encoder.spec.img_size
    base, grey = encoder.spec.img_size, encoder.spec.reads_grey
    policy.forward(encoder, prepare(images[0], size, grid)[0][None])  # warm-up, untimed, as served
    start = perf_counter()
    prepared = [prepare(encoder_view(image, base, grey), size, grid) for image in images]
    out = policy.embed(encoder, [tensor for tensor, _ in prepared], batch_size, desc)
    seconds = perf_counter() - start
    levels = [Levels.of(out.patches[i], None if out.fine is None else out.fine[i], coords)
              for i, (_, coords) in enumerate(prepared)]
    return Embedded(tuple(images), levels, [coords for _, coords in prepared], seconds)


@dataclass
class EncoderMethod:
    """An encoder's embeddings + ace_model.match.match_points (the service's matcher).

    fit() embeds each image once at the base size and, when `second_look` (dense encoders only),
    at the service's look sizes (2x, 4x: `ace_model.match.look_scales`, as far as the images'
    resolution goes); a pair uses the looks both of its images have, as /match does. Variants of
    one encoder share `cache`, so an ablation costs no extra embedding; each still reports the
    embedding time it needs."""

    name: str
    encoder: Encoder
    batch_size: int = 8
    options: MatchOptions = field(default_factory=MatchOptions)
    second_look: bool = False
    ablation: bool = False  # a variant of another method's encoder: left out of the retrieval protocols
    cache: dict[int, Embedded] = field(default_factory=dict, repr=False)  # input size -> embedded
    policy: EmbeddingPolicy = field(default_factory=lambda: EmbeddingPolicy.resolve("cpu"))
    fit_seconds: float = field(init=False, default=0.0)
    base: Embedded = field(init=False, repr=False)
    looks: dict[int, Embedded] = field(init=False, default_factory=dict, repr=False)  # scale -> embedded

    def __post_init__(self) -> None:
        if self.second_look and not self.encoder.spec.is_dense:
            raise ValueError(f"{self.name}: the second look needs a fully convolutional (dense) encoder")
        self.encoder = self.policy.place(self.encoder)

    def fit(self, images: Sequence[DecodedImage]) -> None:
        size = self.encoder.spec.img_size
        self.base = self._embedded(images, size)
        scales = {s for image in images for s in look_scales(image.width, image.height, size)}
        self.looks = {s: self._embedded(images, s * size) for s in sorted(scales)} if self.second_look else {}
        self.fit_seconds = self.base.seconds + sum(e.seconds for e in self.looks.values())

    @property
    def high(self) -> Embedded | None:
        """The 2x look's embeddings, when taken."""
        return self.looks.get(2)

    def _embedded(self, images: Sequence[DecodedImage], size: int) -> Embedded:
        cached = self.cache.get(size)
        if cached is not None and len(cached.images) == len(images) and all(
                a is b for a, b in zip(cached.images, images, strict=True)):
            return cached
        self.cache[size] = embedded = embed_levels(self.encoder, images, size, self.batch_size,
                                                   f"embed {self.name} @{size}", self.policy)
        return embedded

    @property
    def coords(self) -> list[CoordinateMap]:
        return self.base.coords

    @property
    def levels(self) -> list[Levels]:
        return self.base.levels

    def find(self, query: int, target: int, xy: np.ndarray) -> Found:
        """match_points for original px (N, 2) of `query`; the Found's xy in `target` original px."""
        query_px = self.coords[query].to_model(np.asarray(xy, float).reshape(-1, 2))
        found = match_points(self.levels[query], query_px, self.levels[target], self.options,
                             self._pair_looks(query, target))
        return replace(found, xy=self.coords[target].to_original(found.xy))

    def locate(self, query: int, target: int, xy: np.ndarray) -> np.ndarray:
        return self.find(query, target, xy).xy

    def _pair_looks(self, query: int, target: int) -> list[tuple[Levels, Levels]]:
        size = self.encoder.spec.img_size
        images = self.base.images
        scales = [set(look_scales(images[i].width, images[i].height, size)) for i in (query, target)]
        return [(self.looks[s].levels[query], self.looks[s].levels[target])
                for s in sorted(scales[0] & scales[1]) if s in self.looks]


def grey_pixels(image: DecodedImage) -> np.ndarray:
    """(H, W) float32 writable grey levels (the mean of the channels of a colour image)."""
    values = image.as_float()
    pixels = values[:, :, 0] if is_grey(values) else values.mean(axis=2)
    return np.array(pixels, dtype=np.float32)


def template_at(image: np.ndarray, col: int, row: int, side: int) -> np.ndarray:
    """The side x side square (side odd) centred on pixel (row, col), reflected at the borders."""
    radius = side // 2
    padded = np.pad(image, radius, mode="reflect")
    return padded[row : row + 2 * radius + 1, col : col + 2 * radius + 1]


def textured(image: np.ndarray, side: int, min_std: float = 1e-3) -> torch.Tensor:
    """(H, W) bool: the side x side window centred on each pixel is not flat (std above min_std of
    the image's range). NCC is undefined on flat windows; in floating point it is noise there,
    which can beat every true match (large black areas of ultrasound or letterbox padding)."""
    values = image.astype(np.float64)
    mean = uniform_filter(values, side, mode="reflect")
    variance = uniform_filter(values**2, side, mode="reflect") - mean**2
    spread = float(values.max() - values.min()) or 1.0
    return torch.from_numpy(variance > (min_std * spread) ** 2)


def ncc_peak(target: np.ndarray, template: np.ndarray, valid: torch.Tensor | None = None) -> np.ndarray:
    """Sub-pixel (x, y) of the best normalised cross-correlation of `template` centred on a target
    pixel (pixel centres at integers) among `valid` ones, by the same quadratic peak fit as the
    encoder's. Computed in float64 (float32 cross-correlation is too noisy on large images)."""
    ncc = match_template(target.astype(np.float64), template.astype(np.float64), pad_input=True,
                         mode="reflect")
    sim = torch.from_numpy(np.clip(np.nan_to_num(ncc, nan=-1.0), -1.0, 1.0)).float()[None]
    if valid is not None:
        sim = sim.masked_fill(~valid[None], -2.0)
    rows, cols = argmax_2d(sim)
    return refine_peak(sim, rows, cols).numpy()[0]


@dataclass
class NCCMethod:
    """Normalised cross-correlation template matching on the same letterboxed model-size images.

    The template is a `template_px` square (model pixels) centred on the query point, searched
    over the whole target; the correlation peak is refined by the same quadratic fit as ACE's.
    """

    size: int
    template_px: int = 33
    name: str = "ncc"
    images: list[np.ndarray] = field(init=False, repr=False)  # (size, size) grey
    coords: list[CoordinateMap] = field(init=False, repr=False)

    def fit(self, images: Sequence[DecodedImage]) -> None:
        # grid == size: "grid" coordinates are model pixels with pixel centres at integers
        self.coords = [CoordinateMap.letterbox(i.width, i.height, self.size, self.size) for i in images]
        self.images = [letterbox_tensor(image, self.size).float().mean(0).div_(255).numpy()
                       for image in images]

    def locate(self, query: int, target: int, xy: np.ndarray) -> np.ndarray:
        query_xy = self.coords[query].to_grid(xy)
        centres = np.rint(query_xy).astype(int)
        valid = torch.from_numpy(self.coords[target].valid_patches()).view(self.size, self.size)
        valid &= textured(self.images[target], self.template_px)
        peaks = np.array([ncc_peak(self.images[target], template_at(self.images[query], col, row,
                                                                    self.template_px), valid)
                          for col, row in centres]).reshape(-1, 2)
        # the template was centred on the rounded point: carry the rounding over to the match
        return self.coords[target].from_grid(peaks + (query_xy - centres))


@dataclass
class FullResolutionNCC:
    """NCC template matching on the original-resolution grey images: the template covers the same
    share of the image as the model-size NCC's (`fraction` of the query's longer side) and is
    searched over the whole target, so it sees every original pixel the encoder's input lost."""

    fraction: float = 33 / 224
    name: str = "ncc-full"
    images: list[np.ndarray] = field(init=False, repr=False)  # (H, W) grey, original pixels

    def fit(self, images: Sequence[DecodedImage]) -> None:
        self.images = [grey_pixels(image) for image in images]

    def template_side(self, image: np.ndarray) -> int:
        return 2 * int(round(self.fraction * max(image.shape) / 2)) + 1

    def locate(self, query: int, target: int, xy: np.ndarray) -> np.ndarray:
        source = self.images[query]
        grid_xy = np.asarray(xy, float).reshape(-1, 2) - 0.5  # pixel centres at integers
        height, width = source.shape
        centres = np.clip(np.rint(grid_xy).astype(int), 0, [width - 1, height - 1])
        side = self.template_side(source)
        valid = textured(self.images[target], side)
        peaks = np.array([ncc_peak(self.images[target], template_at(source, col, row, side), valid)
                          for col, row in centres]).reshape(-1, 2)
        return peaks + (grid_xy - centres) + 0.5


@dataclass
class IdentityMethod:
    """Predicts the query point at the same relative position (x / width, y / height) of the target:
    what any method must beat when the images are roughly aligned, as radiographs are."""

    name: str = "same-position"
    sizes: list[tuple[int, int]] = field(init=False, repr=False)  # (width, height) per image

    def fit(self, images: Sequence[DecodedImage]) -> None:
        self.sizes = [(image.width, image.height) for image in images]

    def locate(self, query: int, target: int, xy: np.ndarray) -> np.ndarray:
        return np.asarray(xy, float) / self.sizes[query] * self.sizes[target]


def fit_timed(method: Method, images: Sequence[DecodedImage]) -> float:
    """Fit and return the seconds the fit costs (an encoder's embedding, also when shared)."""
    start = perf_counter()
    method.fit(images)
    return method.fit_seconds if isinstance(method, EncoderMethod) else perf_counter() - start


def random_encoder(spec: EncoderSpec, seed: int = 0) -> Encoder:
    """The same architecture as `spec` (timm's or the pyramid's random initialisation, seeded)."""
    torch.manual_seed(seed)
    random_spec = EncoderSpec(spec.backbone, spec.img_size, spec.pixel_mean, spec.pixel_std,
                              {"init": "random", "seed": seed}, dict(spec.options))
    return Encoder(random_spec)


def describe(method: Method) -> dict[str, Any]:
    if isinstance(method, EncoderMethod):
        spec = method.encoder.spec
        return {"name": method.name, "kind": "encoder", "backbone": spec.backbone,
                "img_size": spec.img_size, "grid": method.encoder.grid, "mode": method.options.mode,
                "coarse_weight": method.options.coarse_weight, "refine": method.options.refine,
                "second_look": method.second_look, "ablation": method.ablation,
                "fingerprint": method.encoder.fingerprint or "(random init, not saved)"}
    if isinstance(method, NCCMethod):
        return {"name": method.name, "kind": "ncc", "img_size": method.size,
                "template_px": method.template_px}
    if isinstance(method, FullResolutionNCC):
        return {"name": method.name, "kind": "ncc, original resolution", "img_size": "original",
                "template_fraction": method.fraction}
    if isinstance(method, IdentityMethod):
        return {"name": method.name, "kind": "same relative position"}
    return {"name": method.name, "kind": type(method).__name__}
