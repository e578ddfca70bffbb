"""Retrieval protocols of `ace eval`.

Crop retrieval (the ACE paper's protocol, docs/eval.md): find an image among N from a random 30-80 %
crop, global embeddings.

Landmark retrieval over an index: a landmark of a query image is searched, by exact cosine search
of its coarse vector over every coarse cell of every image of the other subjects (the best cell
per image, the top k images by that score: what the FAISS patch index answers); each hit is then
located at fine precision in its image with match_points, and counts when that position lies
within 5 % of the image diagonal of the same landmark there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ace_model.embedding import EmbeddingPolicy
from ace_model.encoder import Encoder
from ace_model.errors import InputError
from ace_model.match import MASKED, sample_at
from ace_model.preprocess import DecodedImage, encoder_view, prepare
from training.eval_methods import EncoderMethod
from training.evaluate import image_diagonal, radial_errors
from training.landmarks import LandmarkImage

RETRIEVAL_THRESHOLD_PCT = 5.0


# ---------------------------------------------------------------------------------------------
# Crop retrieval


def random_crop(tensor: torch.Tensor, rng: np.random.Generator, low: float = 0.3,
                high: float = 0.8) -> torch.Tensor:
    """A square crop whose side is U(low, high) of the image side, resized back to the image size."""
    size = tensor.shape[-1]
    side = max(2, int(round(rng.uniform(low, high) * size)))
    top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    crop = tensor[None, :, top : top + side, left : left + side].float()  # uint8 model input
    resized = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0]
    return resized.round_().clamp_(0, 255).to(torch.uint8)


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
                   policy: EmbeddingPolicy, batch_size: int = 8) -> dict[str, float]:
    size, grey = encoder.spec.img_size, encoder.spec.reads_grey
    tensors = [prepare(encoder_view(image, size, grey), size, encoder.grid)[0] for image in images]
    rng = np.random.default_rng(seed)
    crops = [random_crop(tensor, rng) for tensor in tensors]
    groups = retrieval_groups(len(images), group_size, seed)
    if not groups:
        raise InputError("crop retrieval needs groups of at least 2 images (--crop-group >= 2)")
    image_global = policy.embed(encoder, tensors, batch_size, "embed images").global_
    crop_global = policy.embed(encoder, crops, batch_size, "embed crops").global_
    return {"top1": retrieval_top1(image_global, crop_global, groups),
            "chance": float(np.mean([1 / len(g) for g in groups])),
            "groups": float(len(groups)), "group_size": float(max(len(g) for g in groups))}


# ---------------------------------------------------------------------------------------------
# Landmark retrieval over an index (pure functions, then the protocol)


def best_cells(queries: torch.Tensor, grids: torch.Tensor, valid: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact cosine search of unit queries (N, D) over every valid cell of grids (n, h, w, D):
    each query's best score per image (N, n) and that cell's (row, col) (N, n, 2)."""
    w = grids.shape[2]
    sim = torch.einsum("qd,ihwd->qihw", queries.float(), grids.float())
    sim = sim.masked_fill(~valid[None].bool(), MASKED).flatten(2)  # (N, n, h*w)
    scores, best = sim.max(dim=2)
    return scores, torch.stack([best // w, best % w], dim=-1)


def top_images(scores: torch.Tensor, allowed: np.ndarray, k: int) -> list[int]:
    """The (at most) k allowed images of highest score (n,), best first."""
    masked = scores.float().masked_fill(~torch.as_tensor(allowed, dtype=torch.bool), float("-inf"))
    order = torch.argsort(masked, descending=True, stable=True)[: min(k, int(np.sum(allowed)))]
    return order.tolist()


def within(found_xy: np.ndarray, true_xy: np.ndarray, diagonals: np.ndarray,
           threshold_pct: float = RETRIEVAL_THRESHOLD_PCT) -> np.ndarray:
    """(M,) bool: each found position lies within threshold_pct of its image diagonal of the truth."""
    return 100.0 * radial_errors(found_xy, true_xy) / np.asarray(diagonals, float) <= threshold_pct


def retrieval_share(success: Sequence[bool], names: Sequence[str]) -> dict[str, Any]:
    """Share of successful hits overall and per landmark (first-seen order)."""
    ok, labels = np.asarray(success, bool), np.asarray(names)
    return {"share": float(ok.mean()) if ok.size else float("nan"), "n_hits": int(ok.size),
            "per_landmark": {name: {"share": float(ok[labels == name].mean()),
                                    "n_hits": int((labels == name).sum())}
                             for name in dict.fromkeys(names)}}


def landmark_retrieval(method: EncoderMethod, items: Sequence[LandmarkImage],
                       images: Sequence[DecodedImage], k: int = 10,
                       threshold_pct: float = RETRIEVAL_THRESHOLD_PCT) -> dict[str, Any]:
    """Every landmark of every image retrieved among the other subjects' images (a fitted method).

    Also reported: the share when a hit is placed at its retrieved coarse cell's centre (what the
    index alone gives), to show what the fine localisation adds."""
    levels = method.levels
    grids = torch.stack([lv.coarse for lv in levels]).float()
    valid = torch.stack([lv.valid(lv.coarse) for lv in levels])
    subjects = np.array([item.patient_id or f"image {i}" for i, item in enumerate(items)], dtype=object)
    diagonals = [image_diagonal(image.width, image.height) for image in images]
    fine_ok, cell_ok, hit_names, n_queries = [], [], [], 0
    for q, item in enumerate(items):
        names = list(item.points)
        xy = np.array([item.points[n] for n in names], float)
        query_px = torch.as_tensor(method.coords[q].to_model(xy), dtype=torch.float32)
        vectors = sample_at(levels[q].coarse, query_px, levels[q].side)
        scores, cells = best_cells(vectors, grids, valid)
        allowed = subjects != subjects[q]
        by_target: dict[int, list[int]] = {}
        for i, name in enumerate(names):
            n_queries += 1
            for t in top_images(scores[i], allowed, k):
                if name in items[t].points:  # a hit whose image lacks the landmark cannot be judged
                    by_target.setdefault(t, []).append(i)
        for t, rows in by_target.items():
            truth = np.array([items[t].points[names[i]] for i in rows])
            diag = np.full(len(rows), diagonals[t])
            fine_ok += within(method.find(q, t, xy[rows]).xy, truth, diag, threshold_pct).tolist()
            rc = cells[rows, t].numpy().astype(float)
            centre_grid = np.stack([rc[:, 1], rc[:, 0]], axis=-1)
            cell_ok += within(method.coords[t].from_grid(centre_grid), truth, diag, threshold_pct).tolist()
            hit_names += [names[i] for i in rows]
    result = retrieval_share(fine_ok, hit_names)
    order = dict.fromkeys(name for item in items for name in item.points)  # the data set's order
    result["per_landmark"] = {n: result["per_landmark"][n] for n in order if n in result["per_landmark"]}
    return {"k": k, "threshold_pct": threshold_pct, "n_queries": n_queries, **result,
            "share_cell_centre": float(np.mean(cell_ok)) if cell_ok else float("nan")}
