"""Evaluation of encoders: landmark correspondence metrics (pure functions) and one `ace eval` run
of the methods compared (training.eval_methods: trained encoders through match_points, the same
architecture at random initialisation, NCC at the model size and at full resolution, the same
relative position):

1. cross-subject landmarks: every landmark of a query image is located in every other image, with
   the error against the matcher's confidence and the time per (query, target) pair;
2. crop retrieval (the ACE paper's protocol) and landmark retrieval over an index (training.eval_retrieval);
3. real medical images under known affine and elastic warps (training.eval_real).

Errors are radial distances in the target's original pixels, also as % of its diagonal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any

import numpy as np
from tqdm import tqdm

from ace_model.embedding import EmbeddingPolicy
from ace_model.encoder import Encoder
from ace_model.errors import InputError
from ace_model.match import MatchOptions, Mode, Refinement
from ace_model.preprocess import DecodedImage
from training.data import read_image
from training.eval_methods import (
    Embedded,
    EncoderMethod,
    FullResolutionNCC,
    IdentityMethod,
    Method,
    NCCMethod,
    describe,
    fit_timed,
    random_encoder,
)
from training.landmarks import LandmarkImage, read_landmark_set

SUCCESS_THRESHOLDS_PCT = (2.0, 5.0)  # success = radial error within this % of the diagonal
CONFIDENCE_EDGES = (0.0, 0.25, 0.5, 0.75, 1.0)  # fixed confidence bins of the calibration tables


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


def mutual_metrics(mutual: np.ndarray, errors: np.ndarray, diagonals: np.ndarray) -> dict[str, float]:
    """How often matches are mutual nearest neighbours, and the mean error (% diag) of each kind."""
    pct = 100.0 * errors / diagonals
    nan = float("nan")
    return {"rate": float(mutual.mean()),
            "mean_pct_mutual": float(pct[mutual].mean()) if mutual.any() else nan,
            "mean_pct_not_mutual": float(pct[~mutual].mean()) if (~mutual).any() else nan}


def error_bins(confidence: np.ndarray, errors_pct: np.ndarray, edges: Sequence[float]
               ) -> list[dict[str, Any]]:
    """Errors (% diag) grouped by confidence in [edges[i], edges[i+1]) (the last bin closed):
    count, median error and the shares within 2 % and 5 %; None where a bin is empty."""
    conf, pct = np.asarray(confidence, float), np.asarray(errors_pct, float)
    index = np.clip(np.searchsorted(np.asarray(edges), conf, side="right") - 1, 0, len(edges) - 2)
    bins = []
    for b in range(len(edges) - 1):
        sel = pct[index == b]
        empty = sel.size == 0
        bins.append({"low": float(edges[b]), "high": float(edges[b + 1]), "n": int(sel.size),
                     "median_pct": None if empty else float(np.median(sel)),
                     "success_2pct": None if empty else float((sel <= 2.0).mean()),
                     "success_5pct": None if empty else float((sel <= 5.0).mean())})
    return bins


def calibration(confidence: np.ndarray, errors_pct: np.ndarray) -> dict[str, Any]:
    """Error against confidence: fixed bins (comparable between methods) and quartiles by rank
    (equal counts, ties split by order: they show whether the confidence ranks the errors even
    where it clusters near one value)."""
    conf, pct = np.asarray(confidence, float), np.asarray(errors_pct, float)
    quartiles = []
    for part in np.array_split(np.argsort(conf, kind="stable"), 4):
        if part.size:
            edges = (float(conf[part].min()), float(conf[part].max()))
            quartiles.append(error_bins(conf[part], pct[part], edges)[0])
    return {"fixed": error_bins(conf, pct, CONFIDENCE_EDGES), "quartiles": quartiles}


def pair_timing(fit_seconds: float, n_images: int, locate_seconds: float, n_pairs: int) -> dict[str, float]:
    """Seconds per (query, target) pair with all its points: the share of one image's preparation
    (an encoder's embedding at every size it uses) plus the matching of the pair."""
    per_image = fit_seconds / max(n_images, 1)
    per_match = locate_seconds / max(n_pairs, 1)
    return {"fit_seconds_per_image": per_image, "locate_seconds_per_pair": per_match,
            "seconds_per_pair": per_image + per_match, "n_images": float(n_images), "n_pairs": float(n_pairs)}


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
    confidence: dict[str, np.ndarray] = field(default_factory=dict)  # encoder method name -> (N,)


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


def predict_pair(methods: Sequence[Method], q: int, t: int, names: tuple[str, ...], query_xy: np.ndarray,
                 true_xy: np.ndarray, seconds: dict[str, float]) -> PairPrediction:
    """Every (fitted) method on one pair; adds each method's matching time to `seconds`."""
    predicted, mutual, confidence = {}, {}, {}
    for method in methods:
        start = perf_counter()
        if isinstance(method, EncoderMethod):
            found = method.find(q, t, query_xy)
            predicted[method.name] = found.xy
            mutual[method.name], confidence[method.name] = found.mutual, found.confidence
        else:
            predicted[method.name] = method.locate(q, t, query_xy)
        seconds[method.name] = seconds.get(method.name, 0.0) + perf_counter() - start
    return PairPrediction(q, t, names, query_xy, true_xy, predicted, mutual, confidence)


def predict_pairs(methods: Sequence[Method], items: Sequence[LandmarkImage], pairs: Sequence[tuple[int, int]]
                  ) -> tuple[list[PairPrediction], dict[str, float]]:
    """Locate every shared landmark of each pair with every (already fitted) method; also returns
    each method's total matching seconds."""
    results, seconds = [], {m.name: 0.0 for m in methods}
    for q, t in tqdm(pairs, desc="landmark pairs", unit="pair"):
        names = pair_landmarks(items[q], items[t])
        if names:
            query_xy = np.array([items[q].points[n] for n in names])
            true_xy = np.array([items[t].points[n] for n in names])
            results.append(predict_pair(methods, q, t, names, query_xy, true_xy, seconds))
    return results, seconds


def landmark_metrics(predictions: Sequence[PairPrediction], diagonals: Sequence[float],
                     method: str) -> dict[str, Any]:
    """Overall and per-landmark summaries of one method over all pairs; for an encoder also the
    mutual-NN split and the error against the matcher's confidence."""
    names = [n for p in predictions for n in p.names]
    errors = np.concatenate([radial_errors(p.predicted[method], p.true_xy) for p in predictions])
    diags = np.concatenate([np.full(len(p.names), diagonals[p.target]) for p in predictions])
    metrics: dict[str, Any] = {"overall": summarize(errors, diags),
                               "per_landmark": summarize_by_landmark(names, errors, diags)}
    if all(method in p.mutual for p in predictions):
        mutual = np.concatenate([p.mutual[method] for p in predictions])
        metrics["mutual"] = mutual_metrics(mutual, errors, diags)
    if all(method in p.confidence for p in predictions):
        confidence = np.concatenate([p.confidence[method] for p in predictions])
        metrics["calibration"] = calibration(confidence, 100.0 * errors / diags)
    return metrics


# ---------------------------------------------------------------------------------------------
# One `ace eval` run


@dataclass(frozen=True)
class EvalOptions:
    data: Path  # landmark data set directory
    encoders: tuple[tuple[str, Path], ...]  # (method name, artifact dir); the first sets the size
    random_baseline: bool = False  # add the first encoder's architecture at random initialisation
    identity_baseline: bool = False  # add "same relative position" as a floor every method must beat
    ncc: bool = False  # add NCC template matching at the model size and at full resolution
    real: bool = False  # add the real-image warp protocol
    max_images: int | None = None  # use only the first N images (sorted by path)
    max_pairs: int | None = None  # seeded random subset of the ordered (query, target) pairs
    crop_group: int = 16  # N of the crop-retrieval protocol (chance = 1/N)
    ncc_template: int = 33  # NCC template side in model pixels (full resolution: the same share)
    real_transforms: int = 3  # random warps per real image and kind (affine, elastic)
    refine_ablation: bool = False  # add the first encoder without sub-cell refinement
    match_ablation: bool = False  # add the first encoder with coarse / fine / both / both + second look
    retrieval: bool = False  # add landmark retrieval over an index of the other subjects
    retrieval_k: int = 10  # hits per landmark query
    seed: int = 0
    batch_size: int = 8
    device: str = "auto"  # auto | cpu | cuda: where the encoders run (ace_model.embedding)
    fp32: bool = False  # keep float32 on CUDA (default: bf16/fp16 autocast there, as the service)


@dataclass
class EvalResult:
    report: dict[str, Any]
    items: list[LandmarkImage]
    images: list[DecodedImage]
    predictions: list[PairPrediction]


def encoder_methods_of(name: str, encoder: Encoder, options: EvalOptions, policy: EmbeddingPolicy,
                       ablations: bool) -> list[EncoderMethod]:
    """The method `name` (both levels, + second look when the encoder is dense) and, for the first
    encoder, the requested ablations; all share one embedding cache."""
    dense, cache = encoder.spec.is_dense, dict[int, Embedded]()

    def variant(label: str, mode: Mode = "both", second: bool = False, refine: Refinement = "quadratic",
                ablation: bool = True) -> EncoderMethod:
        return EncoderMethod(label, encoder, options.batch_size, MatchOptions(mode=mode, refine=refine),
                             second, ablation, cache, policy)

    methods = [variant(name, second=dense, ablation=False)]
    if ablations and options.match_ablation:
        methods += [variant(f"{name} coarse", "coarse"), variant(f"{name} both")]
        if dense:
            methods[-1:-1] = [variant(f"{name} fine", "fine")]
            methods.append(variant(f"{name} both+2nd look", second=True))
    if ablations and options.refine_ablation:
        methods.append(variant(f"{name} (no sub-patch)", second=dense, refine="none"))
    return methods


def build_methods(options: EvalOptions, encoders: Sequence[tuple[str, Encoder]], policy: EmbeddingPolicy
                  ) -> tuple[list[Method], list[EncoderMethod]]:
    """All compared methods, and the encoder-based subset."""
    encoder_methods: list[EncoderMethod] = []
    for i, (name, encoder) in enumerate(encoders):
        encoder_methods += encoder_methods_of(name, encoder, options, policy, ablations=i == 0)
    if options.random_baseline:
        spec = encoders[0][1].spec
        random_init = random_encoder(spec, options.seed)
        encoder_methods += encoder_methods_of("random-init", random_init, options, policy, ablations=False)
    methods: list[Method] = list(encoder_methods)
    if options.ncc:
        size = encoders[0][1].spec.img_size
        methods += [NCCMethod(size, options.ncc_template), FullResolutionNCC(options.ncc_template / size)]
    if options.identity_baseline:
        methods.append(IdentityMethod())
    return methods, encoder_methods


def load_landmark_images(options: EvalOptions) -> tuple[list[LandmarkImage], list[DecodedImage]]:
    items = read_landmark_set(options.data)[: options.max_images]
    if len(items) < 2:
        raise InputError(f"{options.data} has {len(items)} image(s) with landmarks; need at least 2")
    images = [read_image(item.path) for item in tqdm(items, desc="load images", unit="img")]
    return items, images


def run_evaluation(options: EvalOptions, encoders: Sequence[tuple[str, Encoder]]) -> EvalResult:
    """Run every protocol for every method; `encoders` are the loaded (name, artifact) pairs."""
    from training.eval_real import real_evaluation
    from training.eval_retrieval import crop_retrieval, landmark_retrieval

    if not encoders:
        raise InputError("ace eval needs at least one encoder (--encoder ARTIFACT_DIR)")
    policy = EmbeddingPolicy.resolve(options.device, autocast=not options.fp32)
    items, images = load_landmark_images(options)
    methods, encoder_methods = build_methods(options, encoders, policy)
    fit_seconds = {m.name: fit_timed(m, images) for m in methods}
    pairs = choose_pairs([item.patient_id for item in items], options.max_pairs, options.seed)
    predictions, locate_seconds = predict_pairs(methods, items, pairs)
    diagonals = [image_diagonal(image.width, image.height) for image in images]
    if not predictions:
        raise InputError(f"{options.data}: no two images of different patients share a landmark name")
    main = [m for m in encoder_methods if not m.ablation]
    report: dict[str, Any] = {
        "data": str(options.data), "n_images": len(items), "n_pairs": len(predictions),
        "methods": [describe(m) for m in methods],
        "landmarks": {m.name: landmark_metrics(predictions, diagonals, m.name) for m in methods},
        "timing": {m.name: pair_timing(fit_seconds[m.name], len(images), locate_seconds[m.name],
                                       len(predictions)) for m in methods},
        "crop_retrieval": {m.name: crop_retrieval(m.encoder, images, options.crop_group, options.seed,
                                                  policy, options.batch_size) for m in main},
        "embedding": policy.describe(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(options).items()
                     if k != "encoders"},
    }
    if options.retrieval:
        report["landmark_retrieval"] = {m.name: landmark_retrieval(m, items, images, options.retrieval_k)
                                        for m in main}
    if options.real:
        report["real"] = real_evaluation(methods, options.real_transforms, options.seed)
    return EvalResult(report, items, images, predictions)
