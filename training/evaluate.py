"""Evaluation of encoders: landmark correspondence metrics (pure functions), the methods compared
(trained encoders, the same architecture at random initialisation, NCC template matching), and the
three protocols of `ace eval`:

1. cross-subject landmarks: every landmark of a query image is located in every other image;
2. crop retrieval (spec 6.1): find an image among N from a random 30-80 % crop, global embedding;
3. real images under known affine warps: a chest CR (pydicom-data) and a fundus photograph
   (scikit-image), a grid of points located in a warped copy.

Errors are radial distances in the target's original pixels, also as % of its diagonal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from skimage.feature import match_template
from skimage.transform import AffineTransform, warp
from tqdm import tqdm

from ace_model.encoder import Embeddings, Encoder, EncoderSpec
from ace_model.match import Refinement, argmax_2d, locate, refine_peak
from ace_model.preprocess import (
    CoordinateMap,
    DecodedImage,
    grey_to_rgb,
    is_grey,
    letterbox_tensor,
    load_image,
    prepare,
)
from training.landmarks import LandmarkImage, read_landmark_set

SUCCESS_THRESHOLDS_PCT = (2.0, 5.0)  # success = radial error within this % of the diagonal


# ---------------------------------------------------------------------------------------------
# Metrics (pure functions)


def radial_errors(predicted: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(N, 2) predicted and true (x, y) -> (N,) Euclidean distances."""
    return np.linalg.norm(np.asarray(predicted, float) - np.asarray(true, float), axis=-1)


def image_diagonal(width: float, height: float) -> float:
    return float(np.hypot(width, height))


def summarize(errors_px: np.ndarray, diagonals: np.ndarray) -> dict[str, float]:
    """Mean / median radial error in px and in % of the diagonal, success rates at 2 % and 5 %."""
    errors = np.asarray(errors_px, float)
    if errors.size == 0:
        raise ValueError("no errors to summarize: the evaluation produced no predictions")
    pct = 100.0 * errors / np.asarray(diagonals, float)
    summary = {"n": float(errors.size), "mean_px": float(errors.mean()),
               "median_px": float(np.median(errors)), "mean_pct": float(pct.mean()),
               "median_pct": float(np.median(pct))}
    for threshold in SUCCESS_THRESHOLDS_PCT:
        summary[f"success_{threshold:g}pct"] = float((pct <= threshold).mean())
    return summary


def summarize_by_landmark(
    names: Sequence[str], errors_px: np.ndarray, diagonals: np.ndarray
) -> dict[str, dict[str, float]]:
    """Per-landmark summaries, landmarks in first-seen order."""
    labels = np.asarray(names)
    errors, diags = np.asarray(errors_px, float), np.asarray(diagonals, float)
    return {name: summarize(errors[labels == name], diags[labels == name])
            for name in dict.fromkeys(names)}


# ---------------------------------------------------------------------------------------------
# Methods: fit on a list of images, then locate points of image `query` in image `target`


class Method(Protocol):
    name: str

    def fit(self, images: Sequence[DecodedImage]) -> None: ...

    def locate(self, query: int, target: int, xy: np.ndarray) -> np.ndarray:
        """(N, 2) original px in `query` -> (N, 2) original px in `target`."""
        ...


def embed_tensors(encoder: Encoder, tensors: Sequence[torch.Tensor], batch_size: int = 8,
                  desc: str = "embed") -> Embeddings:
    """One forward pass per image, batched: (3, S, S) tensors -> Embeddings of all of them."""
    patches, globals_ = [], []
    with torch.inference_mode():
        for start in tqdm(range(0, len(tensors), batch_size), desc=desc, leave=False, unit="batch"):
            out = encoder(torch.stack(list(tensors[start : start + batch_size])))
            patches.append(out.patches)
            globals_.append(out.global_)
    return Embeddings(torch.cat(patches), torch.cat(globals_))


@dataclass
class EncoderMethod:
    """An encoder's patch grids + ace_model.match.locate (cosine, quadratic sub-patch peak)."""

    name: str
    encoder: Encoder
    batch_size: int = 8
    refine: Refinement = "quadratic"
    grids: torch.Tensor = field(init=False, repr=False)  # (n, h, w, D)
    valid: torch.Tensor = field(init=False, repr=False)  # (n, h, w) bool, False on padding
    coords: list[CoordinateMap] = field(init=False, repr=False)

    def fit(self, images: Sequence[DecodedImage]) -> None:
        prepared = [prepare(image, self.encoder.spec.img_size, self.encoder.grid) for image in images]
        self.coords = [coords for _, coords in prepared]
        embedded = embed_tensors(self.encoder, [t for t, _ in prepared], self.batch_size,
                                 f"embed {self.name}")
        self.grids = embedded.patches
        side = self.encoder.grid
        self.valid = torch.stack([torch.from_numpy(c.valid_patches()).view(side, side)
                                  for c in self.coords])

    def locate(self, query: int, target: int, xy: np.ndarray) -> np.ndarray:
        return self.locate_with_mutual(query, target, xy)[0]

    def locate_with_mutual(self, query: int, target: int, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 2) target original px and (N,) bool mutual-nearest-neighbour flags."""
        query_xy = self.coords[query].to_grid(xy)
        found = locate(self.grids[query], query_xy, self.grids[target], self.valid[target], self.refine)
        return self.coords[target].from_grid(found.xy), found.mutual


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
        self.images = [letterbox_tensor(image, self.size)[0].numpy() for image in images]

    def template(self, image: np.ndarray, col: int, row: int) -> np.ndarray:
        """The template_px square centred on pixel (row, col), reflected at the borders."""
        radius = self.template_px // 2
        padded = np.pad(image, radius, mode="reflect")
        return padded[row : row + 2 * radius + 1, col : col + 2 * radius + 1]

    def locate(self, query: int, target: int, xy: np.ndarray) -> np.ndarray:
        query_xy = self.coords[query].to_grid(xy)
        centres = np.rint(query_xy).astype(int)
        maps = [match_template(self.images[target], self.template(self.images[query], col, row),
                               pad_input=True, mode="reflect") for col, row in centres]
        sim = torch.from_numpy(np.nan_to_num(np.stack(maps), nan=-1.0)).float()  # (N, size, size)
        valid = torch.from_numpy(self.coords[target].valid_patches()).view(self.size, self.size)
        sim = sim.masked_fill(~valid[None], -2.0)
        rows, cols = argmax_2d(sim)
        peak = refine_peak(sim, rows, cols).numpy()
        # the template was centred on the rounded point: carry the rounding over to the match
        return self.coords[target].from_grid(peak + (query_xy - centres))


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


def random_encoder(spec: EncoderSpec, seed: int = 0) -> Encoder:
    """The same architecture as `spec` with timm's random initialisation (seeded)."""
    torch.manual_seed(seed)
    random_spec = EncoderSpec(spec.backbone, spec.img_size, spec.pixel_mean, spec.pixel_std,
                              {"init": "random", "seed": seed})
    return Encoder(random_spec)


# ---------------------------------------------------------------------------------------------
# Protocol 1: cross-subject landmark localisation


@dataclass(frozen=True)
class PairPrediction:
    query: int
    target: int
    names: tuple[str, ...]
    query_xy: np.ndarray  # (N, 2) original px in the query
    true_xy: np.ndarray  # (N, 2) original px in the target
    predicted: dict[str, np.ndarray]  # method name -> (N, 2) original px in the target
    mutual: dict[str, np.ndarray]  # encoder method name -> (N,) bool mutual-NN flags


def choose_pairs(patients: Sequence[str | None], max_pairs: int | None, seed: int) -> list[tuple[int, int]]:
    """Ordered (query, target) pairs of distinct subjects (images of one patient are never paired;
    None = unknown patient, a subject of its own), all or a seeded random subset."""
    n = len(patients)
    pairs = [(q, t) for q in range(n) for t in range(n)
             if q != t and (patients[q] is None or patients[q] != patients[t])]
    if max_pairs is not None and max_pairs < len(pairs):
        keep = np.random.default_rng(seed).choice(len(pairs), size=max_pairs, replace=False)
        pairs = [pairs[i] for i in sorted(keep)]
    return pairs


def pair_landmarks(query: LandmarkImage, target: LandmarkImage) -> tuple[str, ...]:
    return tuple(name for name in query.points if name in target.points)


def predict_pairs(methods: Sequence[Method], items: Sequence[LandmarkImage],
                  pairs: Sequence[tuple[int, int]]) -> list[PairPrediction]:
    """Locate every shared landmark of each pair with every (already fitted) method."""
    results = []
    for q, t in tqdm(pairs, desc="landmark pairs", unit="pair"):
        names = pair_landmarks(items[q], items[t])
        if not names:
            continue
        query_xy = np.array([items[q].points[n] for n in names])
        true_xy = np.array([items[t].points[n] for n in names])
        predicted, mutual = {}, {}
        for method in methods:
            if isinstance(method, EncoderMethod):
                predicted[method.name], mutual[method.name] = method.locate_with_mutual(q, t, query_xy)
            else:
                predicted[method.name] = method.locate(q, t, query_xy)
        results.append(PairPrediction(q, t, names, query_xy, true_xy, predicted, mutual))
    return results


def landmark_metrics(predictions: Sequence[PairPrediction], diagonals: Sequence[float],
                     method: str) -> dict[str, Any]:
    """Overall and per-landmark summaries of one method over all pairs."""
    names = [n for p in predictions for n in p.names]
    errors = np.concatenate([radial_errors(p.predicted[method], p.true_xy) for p in predictions])
    diags = np.concatenate([np.full(len(p.names), diagonals[p.target]) for p in predictions])
    metrics: dict[str, Any] = {"overall": summarize(errors, diags),
                               "per_landmark": summarize_by_landmark(names, errors, diags)}
    if all(method in p.mutual for p in predictions):
        mutual = np.concatenate([p.mutual[method] for p in predictions])
        metrics["mutual"] = mutual_metrics(mutual, errors, diags)
    return metrics


def mutual_metrics(mutual: np.ndarray, errors: np.ndarray, diagonals: np.ndarray) -> dict[str, float]:
    """How often matches are mutual nearest neighbours, and the mean error (% diag) of each kind."""
    pct = 100.0 * errors / diagonals
    nan = float("nan")
    return {"rate": float(mutual.mean()),
            "mean_pct_mutual": float(pct[mutual].mean()) if mutual.any() else nan,
            "mean_pct_not_mutual": float(pct[~mutual].mean()) if (~mutual).any() else nan}


# ---------------------------------------------------------------------------------------------
# Protocol 2: crop retrieval (spec 6.1)


def random_crop(tensor: torch.Tensor, rng: np.random.Generator, low: float = 0.3,
                high: float = 0.8) -> torch.Tensor:
    """A square crop whose side is U(low, high) of the image side, resized back to the image size."""
    size = tensor.shape[-1]
    side = max(2, int(round(rng.uniform(low, high) * size)))
    top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    crop = tensor[None, :, top : top + side, left : left + side]
    return F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0]


def retrieval_top1(image_global: torch.Tensor, crop_global: torch.Tensor,
                   groups: Sequence[Sequence[int]]) -> float:
    """Mean over groups of the fraction of images whose most similar crop in the group is their own."""
    scores = []
    for group in groups:
        index = torch.as_tensor(list(group))
        sim = image_global[index] @ crop_global[index].T  # (n, n)
        scores.append((sim.argmax(1) == torch.arange(len(group))).float().mean().item())
    return float(np.mean(scores))


def retrieval_groups(n_images: int, group_size: int, seed: int) -> list[list[int]]:
    """Shuffled groups of `group_size` images; a last group smaller than 2 is dropped."""
    order = np.random.default_rng(seed).permutation(n_images).tolist()
    groups = [order[i : i + group_size] for i in range(0, n_images, group_size)]
    return [g for g in groups if len(g) >= 2]


def crop_retrieval(encoder: Encoder, images: Sequence[DecodedImage], group_size: int, seed: int,
                   batch_size: int = 8) -> dict[str, float]:
    tensors = [prepare(image, encoder.spec.img_size, encoder.grid)[0] for image in images]
    rng = np.random.default_rng(seed)
    crops = [random_crop(tensor, rng) for tensor in tensors]
    groups = retrieval_groups(len(images), group_size, seed)
    if not groups:
        raise ValueError("crop retrieval needs at least 2 images")
    image_global = embed_tensors(encoder, tensors, batch_size, "embed images").global_
    crop_global = embed_tensors(encoder, crops, batch_size, "embed crops").global_
    return {"top1": retrieval_top1(image_global, crop_global, groups),
            "chance": float(np.mean([1 / len(g) for g in groups])),
            "groups": float(len(groups)), "group_size": float(max(len(g) for g in groups))}


# ---------------------------------------------------------------------------------------------
# Protocol 3: real images under known affine warps


@dataclass(frozen=True)
class WarpCase:
    name: str
    original: DecodedImage
    warped: DecodedImage
    points: np.ndarray  # (N, 2) original px in `original`
    truth: np.ndarray  # (N, 2) where those points went, original px in `warped`


def real_images() -> list[tuple[str, DecodedImage]]:
    """The chest CR of pydicom-data (RG1_UNCR.dcm) and scikit-image's fundus photograph."""
    from pydicom.data import get_testdata_file
    from skimage.data import retina

    chest_path = get_testdata_file("RG1_UNCR.dcm")
    if chest_path is None:
        raise FileNotFoundError("RG1_UNCR.dcm not found: install pydicom-data (pip install pydicom-data)")
    fundus = DecodedImage(retina().astype(np.float32) / 255.0, "png")
    return [("chest_cr", load_image(str(chest_path))), ("fundus", fundus)]


def random_affine(width: int, height: int, rng: np.random.Generator) -> AffineTransform:
    """Rotation +-10 deg, scale 0.9-1.1, shear +-0.05 rad about the centre, shift +-5 %.

    Works in skimage's convention (pixel centres at integers)."""
    centre = np.array([width, height]) / 2 - 0.5
    shift = rng.uniform(-0.05, 0.05, size=2) * [width, height]
    about_centre = AffineTransform(
        rotation=np.deg2rad(rng.uniform(-10, 10)), scale=rng.uniform(0.9, 1.1),
        shear=rng.uniform(-0.05, 0.05))
    return (AffineTransform(translation=-centre) + about_centre
            + AffineTransform(translation=centre + shift))


def point_grid(width: int, height: int, per_side: int, margin: float = 0.15) -> np.ndarray:
    """(per_side^2, 2) evenly spaced original-pixel points inside the central part of an image."""
    xs = np.linspace(margin * width, (1 - margin) * width, per_side)
    ys = np.linspace(margin * height, (1 - margin) * height, per_side)
    return np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)


def warp_image(image: DecodedImage, tform: AffineTransform) -> DecodedImage:
    """The image resampled so that original point p lands on map_points(tform, p); black outside."""
    grey = is_grey(image.pixels)
    source = np.array(image.pixels[:, :, 0] if grey else image.pixels)  # skimage's Cython needs it writable
    warped = warp(source, tform.inverse, order=1, mode="constant", cval=0.0, preserve_range=True)
    warped = warped.astype(np.float32)
    return DecodedImage(grey_to_rgb(warped) if grey else warped, image.format)


def map_points(tform: AffineTransform, xy: np.ndarray) -> np.ndarray:
    """Our pixel centres are at i + 0.5, skimage's at i."""
    return tform(np.asarray(xy, float) - 0.5) + 0.5


def warp_case(name: str, image: DecodedImage, rng: np.random.Generator, per_side: int = 6) -> WarpCase:
    """One random warp; keeps the grid points that land inside the central 90 % of the copy."""
    tform = random_affine(image.width, image.height, rng)
    points = point_grid(image.width, image.height, per_side)
    truth = map_points(tform, points)
    size = np.array([image.width, image.height])
    inside = ((truth >= 0.05 * size) & (truth <= 0.95 * size)).all(1)
    return WarpCase(name, image, warp_image(image, tform), points[inside], truth[inside])


def warp_cases(transforms_per_image: int, seed: int, per_side: int = 6) -> list[WarpCase]:
    rng = np.random.default_rng(seed)
    return [warp_case(name, image, rng, per_side)
            for name, image in real_images() for _ in range(transforms_per_image)]


def real_metrics(methods: Sequence[Method], cases: Sequence[WarpCase]) -> dict[str, dict[str, Any]]:
    """Per method and image name: summary of errors over all warps of that image."""
    errors: dict[tuple[str, str], list[np.ndarray]] = {}
    for case in tqdm(cases, desc="real-image warps", unit="warp"):
        for method in methods:
            method.fit([case.original, case.warped])
            error = radial_errors(method.locate(0, 1, case.points), case.truth)
            errors.setdefault((method.name, case.name), []).append(error)
    diagonal = {c.name: image_diagonal(c.warped.width, c.warped.height) for c in cases}
    out: dict[str, dict[str, Any]] = {}
    for (method_name, image_name), parts in errors.items():
        flat = np.concatenate(parts)
        diagonals = np.full(flat.size, diagonal[image_name])
        out.setdefault(method_name, {})[image_name] = summarize(flat, diagonals)
    return out


# ---------------------------------------------------------------------------------------------
# One `ace eval` run


@dataclass(frozen=True)
class EvalOptions:
    data: Path  # landmark data set directory
    encoders: tuple[tuple[str, Path], ...]  # (method name, artifact dir); the first sets the size
    random_baseline: bool = False  # add the first encoder's architecture at random initialisation
    identity_baseline: bool = False  # add "same relative position" as a floor every method must beat
    ncc: bool = False  # add NCC template matching
    real: bool = False  # add the real-image warp protocol
    max_images: int | None = None  # use only the first N images (sorted by path)
    max_pairs: int | None = None  # seeded random subset of the ordered (query, target) pairs
    crop_group: int = 16  # N of the crop-retrieval protocol (chance = 1/N)
    ncc_template: int = 33  # NCC template side in model pixels
    real_transforms: int = 3  # random affine warps per real image
    refine_ablation: bool = False  # add the first encoder without sub-patch refinement
    seed: int = 0
    batch_size: int = 8


@dataclass
class EvalResult:
    report: dict[str, Any]
    items: list[LandmarkImage]
    images: list[DecodedImage]
    predictions: list[PairPrediction]


def build_methods(options: EvalOptions, encoders: Sequence[tuple[str, Encoder]]
                  ) -> tuple[list[Method], list[EncoderMethod]]:
    """All compared methods, and the encoder-based subset (crop retrieval needs an encoder)."""
    # the no-refinement ablation has the same global embedding: it is left out of crop retrieval
    encoder_methods = [EncoderMethod(name, enc, options.batch_size) for name, enc in encoders]
    if options.refine_ablation:
        name, encoder = encoders[0]
        encoder_methods.append(EncoderMethod(f"{name} (no sub-patch)", encoder, options.batch_size, "none"))
    if options.random_baseline:
        spec = encoders[0][1].spec
        encoder_methods.append(EncoderMethod("random-init", random_encoder(spec, options.seed),
                                             options.batch_size))
    methods: list[Method] = list(encoder_methods)
    if options.ncc:
        methods.append(NCCMethod(encoders[0][1].spec.img_size, options.ncc_template))
    if options.identity_baseline:
        methods.append(IdentityMethod())
    return methods, encoder_methods


def describe(method: Method) -> dict[str, Any]:
    if isinstance(method, EncoderMethod):
        spec = method.encoder.spec
        return {"name": method.name, "kind": "encoder", "backbone": spec.backbone,
                "img_size": spec.img_size, "grid": method.encoder.grid, "refine": method.refine,
                "fingerprint": method.encoder.fingerprint or "(random init, not saved)"}
    if isinstance(method, NCCMethod):
        return {"name": method.name, "kind": "ncc", "img_size": method.size,
                "template_px": method.template_px}
    if isinstance(method, IdentityMethod):
        return {"name": method.name, "kind": "same relative position"}
    return {"name": method.name, "kind": type(method).__name__}


def load_landmark_images(options: EvalOptions) -> tuple[list[LandmarkImage], list[DecodedImage]]:
    items = read_landmark_set(options.data)[: options.max_images]
    if len(items) < 2:
        raise ValueError(f"{options.data} has {len(items)} image(s) with landmarks; need at least 2")
    images = [load_image(item.path) for item in tqdm(items, desc="load images", unit="img")]
    return items, images


def run_evaluation(options: EvalOptions, encoders: Sequence[tuple[str, Encoder]]) -> EvalResult:
    """Run the three protocols for every method; `encoders` are the loaded (name, artifact) pairs."""
    if not encoders:
        raise ValueError("ace eval needs at least one encoder (--encoder ARTIFACT_DIR)")
    items, images = load_landmark_images(options)
    methods, encoder_methods = build_methods(options, encoders)
    for method in methods:
        method.fit(images)
    pairs = choose_pairs([item.patient_id for item in items], options.max_pairs, options.seed)
    predictions = predict_pairs(methods, items, pairs)
    diagonals = [image_diagonal(image.width, image.height) for image in images]
    if not predictions:
        raise ValueError(f"{options.data}: no two images of different patients share a landmark name")
    report: dict[str, Any] = {
        "data": str(options.data), "n_images": len(items), "n_pairs": len(predictions),
        "methods": [describe(m) for m in methods],
        "landmarks": {m.name: landmark_metrics(predictions, diagonals, m.name) for m in methods},
        "crop_retrieval": {m.name: crop_retrieval(m.encoder, images, options.crop_group, options.seed,
                                                  options.batch_size)
                           for m in encoder_methods if m.refine != "none"},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(options).items()
                     if k != "encoders"},
    }
    if options.real:
        report["real"] = real_metrics(methods, warp_cases(options.real_transforms, options.seed))
    return EvalResult(report, items, images, predictions)
