"""`ace train-dense`: train the two-level dense encoder on pairs of views with known geometry.

Per step, P source images (distinct subjects) each give two views under random affine + elastic
warps and photometric changes (training/dense_views.py). Terms (ace_model/dense_losses.py):
    fine     pixel InfoNCE at stride 4 between the two views, ignore radius, all cells of the other
             view as candidates (the hardest negatives included)
    coarse   InfoNCE at stride 16, candidates: the other view's cells + other images' cells
    xsubj    landmarks (when the source set has them): a landmark's cell in one subject's view
             must find the same landmark's cell in another subject's view, at both levels
    global   ACE's global consistency in softmax form: the overlap-pooled coarse embedding of one
             view must pick its partner view among all views of the batch
Each term's content-blind floor (ln of its candidate count) is printed beside it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ace_model.dense import COARSE_STRIDE, DENSE_BACKBONE, FINE_STRIDE, DensePyramid, PyramidConfig
from ace_model.dense_losses import Term, gather_rows, ignore_zone, info_nce, nearest
from ace_model.encoder import Encoder, EncoderSpec
from ace_model.errors import InputError
from training.data import find_images, read_image
from training.dense_config import DenseTrainConfig, WarpConfig
from training.dense_views import Views, cell_centres, make_view_pair
from training.landmarks import read_landmark_set

CHECKPOINT = "dense-checkpoint.pt"


@dataclass
class Sources:
    images: torch.Tensor  # (N, 1, H, W) grey in [0, 1]
    landmarks: torch.Tensor  # (N, L, 2) source px, NaN where unknown
    subjects: list[str]  # patient / subject id per image


def load_sources(folders: list[Path], side: int) -> Sources:
    """Landmark sets (images + landmarks.csv) or plain image folders, as square grey tensors."""
    images, points, subjects, names = [], [], [], _landmark_names(folders)
    for folder in folders:
        for item in _items(folder):
            image, scale = _grey_square(item[0], side)
            images.append(image)
            points.append([[v * scale for v in item[1].get(n, (math.nan, math.nan))] for n in names])
            subjects.append(item[2])
    if not images:
        raise InputError(f"no images found in {[str(f) for f in folders]}")
    marks = torch.tensor(points, dtype=torch.float32).view(len(images), len(names), 2)
    return Sources(torch.stack(images), marks, subjects)


def _landmark_names(folders: list[Path]) -> list[str]:
    names: dict[str, None] = {}
    for folder in folders:
        if (folder / "landmarks.csv").is_file() or (folder / "landmarks.json").is_file():
            for item in read_landmark_set(folder, check_images=False):
                names.update(dict.fromkeys(item.points))
    return list(names)


def _items(folder: Path) -> list[tuple[Path, dict[str, tuple[float, float]], str]]:
    if (folder / "landmarks.csv").is_file() or (folder / "landmarks.json").is_file():
        return [(i.path, i.points, i.patient_id or i.image_id) for i in read_landmark_set(folder)]
    return [(path, {}, str(path)) for path in find_images(folder)]


def _grey_square(path: Path, side: int) -> tuple[torch.Tensor, float]:
    """Load, take the grey level, pad to a square at the top-left, resize to `side` -> (1, side, side)."""
    pixels = read_image(path).as_float()[:, :, 0]
    h, w = pixels.shape
    canvas = np.zeros((max(h, w), max(h, w)), np.float32)
    canvas[:h, :w] = pixels
    scale = side / max(h, w)
    tensor = torch.from_numpy(canvas)[None, None]
    return F.interpolate(tensor, size=(side, side), mode="area")[0], scale


def cell_sources(views: Views, stride: int) -> torch.Tensor:
    """(B, M, 2) source px of each cell centre of a stride-`stride` grid of the views."""
    side = views.images.shape[-1]
    centres = cell_centres(side, stride).expand(views.images.shape[0], -1, -1)
    return views.to_source(centres)


def cell_spacing(views: Views, stride: int) -> torch.Tensor:
    """(B,) source px between neighbouring cells (the affine's zoom times the stride)."""
    return views.affine[:, :, :2].det().abs().sqrt() * stride


def inside_source(xy: torch.Tensor, views: Views) -> torch.Tensor:
    size = views.source_size[:, None, :]
    return ((xy >= 0) & (xy <= size)).all(-1)


def same_image_term(grid1: torch.Tensor, grid2: torch.Tensor, views: tuple[Views, Views], stride: int,
                    sources: tuple[torch.Tensor, torch.Tensor], ignore_cells: float, tau: float,
                    queries: torch.Tensor | None, extra: torch.Tensor | None = None,
                    extra_ignore: torch.Tensor | None = None) -> Term:
    """Each query cell of view 1 must find its true cell in view 2 (grids (B, M, D)).
    sources: both views' cell_sources at this stride; queries: (B, Q) cell indices of view 1,
    None = all cells; extra: more candidates (B, E, D)."""
    src1, src2 = sources
    if queries is not None:
        src1, grid1 = gather_rows(src1, queries), gather_rows(grid1, queries)
    positive, dist = nearest(src1, src2)
    spacing = cell_spacing(views[1], stride)
    valid = (dist < 0.75 * spacing[:, None]) & inside_source(src1, views[0])
    ignore = ignore_zone(gather_rows(src2, positive), src2, positive, ignore_cells * spacing)
    candidates = grid2
    if extra is not None and extra_ignore is not None:
        candidates = torch.cat([grid2, extra], 1)
        ignore = torch.cat([ignore, extra_ignore], -1)
    return info_nce(grid1, candidates, positive, ignore, valid, tau)


def other_images(grid2: torch.Tensor, src1: torch.Tensor, src2: torch.Tensor, size: torch.Tensor,
                 radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates from the other images of the batch: (B, (B-1) M, D) and their ignore mask
    (B, Q, (B-1) M): cells near the query's relative position (aligned anatomy) are left out."""
    b, m, d = grid2.shape
    keep = ~torch.eye(b, dtype=torch.bool)
    others = grid2[None].expand(b, -1, -1, -1)[keep].reshape(b, (b - 1) * m, d)
    rel1 = src1 / size[:, None, :]  # (B, Q, 2)
    rel2 = (src2 / size[:, None, :])[None].expand(b, -1, -1, -1)[keep].reshape(b, (b - 1) * m, 2)
    return others, torch.cdist(rel1, rel2) < radius


def coarse_term(c1: torch.Tensor, c2: torch.Tensor, views: tuple[Views, Views],
                cfg: DenseTrainConfig) -> Term:
    src1, src2 = cell_sources(views[0], COARSE_STRIDE), cell_sources(views[1], COARSE_STRIDE)
    extra, extra_ignore = other_images(c2, src1, src2, views[1].source_size, cfg.other_ignore)
    return same_image_term(c1, c2, views, COARSE_STRIDE, (src1, src2), cfg.coarse_ignore, cfg.tau, None,
                           extra, extra_ignore)


def fine_term(f1: torch.Tensor, f2: torch.Tensor, views: tuple[Views, Views], cfg: DenseTrainConfig,
              gen: torch.Generator) -> Term:
    src1, src2 = cell_sources(views[0], FINE_STRIDE), cell_sources(views[1], FINE_STRIDE)
    weights = inside_source(src1, views[0]).float() + 1e-6
    queries = torch.multinomial(weights, cfg.fine_queries, replacement=False, generator=gen)
    return same_image_term(f1, f2, views, FINE_STRIDE, (src1, src2), cfg.fine_ignore, cfg.tau, queries)


def xsubj_term(grid1: torch.Tensor, grid2: torch.Tensor, views: tuple[Views, Views], marks: torch.Tensor,
               stride: int, ignore_cells: float, tau: float) -> Term:
    """Landmark l of subject b (view 1) must find landmark l of subject b+1 (its view 2)."""
    src1, src2 = cell_sources(views[0], stride), cell_sources(views[1], stride)
    partner = torch.roll(torch.arange(marks.shape[0]), -1)
    known = ~marks.isnan().any(-1) & ~marks[partner].isnan().any(-1)  # (B, L)
    query, dist1 = nearest(marks.nan_to_num(), src1)
    positive, dist2 = nearest(marks[partner].nan_to_num(), src2[partner])
    spacing1, spacing2 = cell_spacing(views[0], stride), cell_spacing(views[1], stride)[partner]
    valid = known & (dist1 < 0.75 * spacing1[:, None]) & (dist2 < 0.75 * spacing2[:, None])
    ignore = ignore_zone(gather_rows(src2[partner], positive), src2[partner], positive,
                         ignore_cells * spacing2)
    return info_nce(gather_rows(grid1, query), grid2[partner], positive, ignore, valid, tau)


def global_term(c1: torch.Tensor, c2: torch.Tensor, views: tuple[Views, Views], tau: float) -> Term:
    """Overlap-pooled coarse embeddings: view 1 of image b must pick view 2 of image b in the batch."""
    pooled = []
    for mine, other, grid in ((views[0], views[1], c1), (views[1], views[0], c2)):
        src = cell_sources(mine, COARSE_STRIDE)
        _, dist = nearest(src, cell_sources(other, COARSE_STRIDE))
        overlap = (dist < 0.75 * cell_spacing(other, COARSE_STRIDE)[:, None]).float()[..., None]
        pooled.append(F.normalize((grid * overlap).sum(1) / overlap.sum(1).clamp(min=1), dim=-1))
    b = c1.shape[0]
    ignore = torch.zeros(1, b, b, dtype=torch.bool)
    return info_nce(pooled[0][None], pooled[1][None], torch.arange(b)[None], ignore,
                    torch.ones(1, b, dtype=torch.bool), tau)


def step_terms(model: DensePyramid, sources: Sources, index: torch.Tensor, cfg: DenseTrainConfig,
               warp: WarpConfig, gen: torch.Generator) -> dict[str, Term]:
    views = make_view_pair(sources.images[index], warp, gen)
    coarse, fine = model(torch.cat([views[0].images, views[1].images]))
    b = index.shape[0]
    c1, c2 = coarse[:b].flatten(1, 2), coarse[b:].flatten(1, 2)  # (B, M, D)
    f1, f2 = fine[:b].flatten(1, 2), fine[b:].flatten(1, 2)
    w, terms = cfg.weights, {}
    if w.get("fine", 0):
        terms["fine"] = fine_term(f1, f2, views, cfg, gen)
    if w.get("coarse", 0):
        terms["coarse"] = coarse_term(c1, c2, views, cfg)
    marks = sources.landmarks[index]
    if w.get("xsubj", 0) and not bool(marks.isnan().all()):
        terms["xsubj_c"] = xsubj_term(c1, c2, views, marks, COARSE_STRIDE, cfg.coarse_ignore, cfg.tau)
        terms["xsubj_f"] = xsubj_term(f1, f2, views, marks, FINE_STRIDE, cfg.fine_ignore, cfg.tau)
    if w.get("global", 0):
        terms["global"] = global_term(c1, c2, views, cfg.tau)
    return terms


def total_loss(terms: dict[str, Term], weights: dict[str, float]) -> torch.Tensor:
    return sum((weights[name.split("_")[0]] * term.loss for name, term in terms.items()),
               torch.zeros(()))


def lr_at(step: int, cfg: DenseTrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    low = cfg.lr / 50
    return low + (cfg.lr - low) * 0.5 * (1 + math.cos(math.pi * progress))


def sample_index(subjects: list[str], pairs: int, gen: torch.Generator) -> torch.Tensor:
    """`pairs` images of distinct subjects (fewer if the set has fewer subjects)."""
    order = torch.randperm(len(subjects), generator=gen).tolist()
    chosen: dict[str, int] = {}
    for i in order:
        chosen.setdefault(subjects[i], i)
        if len(chosen) == pairs:
            break
    return torch.tensor(list(chosen.values()))


@dataclass
class TrainState:
    model: DensePyramid
    optimizer: torch.optim.Optimizer
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def new_state(cfg: DenseTrainConfig, pyramid: PyramidConfig) -> TrainState:
    torch.manual_seed(cfg.seed)
    model = DensePyramid(pyramid)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    other = [p for n, p in model.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": other, "weight_decay": 0.0}], lr=cfg.lr)
    return TrainState(model, optimizer)


def save_checkpoint(state: TrainState, out: Path, cfg: DenseTrainConfig, pyramid: PyramidConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    payload = {"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
               "step": state.step, "history": state.history, "config": asdict(cfg),
               "pyramid": pyramid.to_dict()}
    torch.save(payload, out / f".{CHECKPOINT}.tmp")
    (out / f".{CHECKPOINT}.tmp").replace(out / CHECKPOINT)


def load_checkpoint(out: Path, cfg: DenseTrainConfig) -> TrainState | None:
    path = out / CHECKPOINT
    if not path.is_file():
        return None
    payload = torch.load(path, weights_only=True)
    state = new_state(cfg, PyramidConfig.from_dict(payload["pyramid"]))
    state.model.load_state_dict(payload["model"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.step, state.history = int(payload["step"]), list(payload["history"])
    return state


def train_step(state: TrainState, sources: Sources, cfg: DenseTrainConfig, warp: WarpConfig,
               gen: torch.Generator) -> dict[str, Term]:
    state.model.train()
    for group in state.optimizer.param_groups:
        group["lr"] = lr_at(state.step, cfg)
    terms = step_terms(state.model, sources, sample_index(sources.subjects, cfg.pairs, gen), cfg, warp, gen)
    loss = total_loss(terms, cfg.weights)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(state.model.parameters(), 3.0)
    state.optimizer.step()
    state.step += 1
    return terms


def describe(terms: dict[str, Term]) -> dict[str, str]:
    """Loss / content-blind floor per term, for the progress bar."""
    return {name: f"{float(t.loss.detach()):.2f}/{t.chance:.2f}" for name, t in terms.items()}


def train_dense(folders: list[Path], out: Path, cfg: DenseTrainConfig, warp: WarpConfig | None = None,
                pyramid: PyramidConfig | None = None, resume: bool = True,
                progress: bool = True) -> TrainState:
    """Train (resuming from out/ when a checkpoint is there); returns the final state."""
    warp, pyramid = warp or WarpConfig(), pyramid or PyramidConfig()
    sources = load_sources(folders, cfg.source_px)
    state = (load_checkpoint(out, cfg) if resume else None) or new_state(cfg, pyramid)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + state.step)
    bar = tqdm(range(state.step, cfg.steps), initial=state.step, total=cfg.steps, desc="train-dense",
               unit="step", disable=not progress)
    started = time.perf_counter()
    for _ in bar:
        terms = train_step(state, sources, cfg, warp, gen)
        state.history.append({name: float(t.loss.detach()) for name, t in terms.items()})
        bar.set_postfix(describe(terms), refresh=False)
        if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps:
            save_checkpoint(state, out, cfg, state.model.config)
    _write_log(out, state, cfg, warp, time.perf_counter() - started)
    return state


def _write_log(out: Path, state: TrainState, cfg: DenseTrainConfig, warp: WarpConfig, seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tail = state.history[-100:]
    keys = dict.fromkeys(k for h in tail for k in h)  # a term may be missing from some steps
    means = {k: float(np.mean([h[k] for h in tail if k in h])) for k in keys}
    record = {"steps": state.step, "seconds_this_run": round(seconds, 1), "loss_last_100": means,
              "config": asdict(cfg), "warp": asdict(warp)}
    (out / "train-dense.json").write_text(json.dumps(record, indent=2) + "\n")


def export_dense(state: TrainState, directory: Path, img_size: int, provenance: dict[str, Any]) -> Encoder:
    """Write the trained pyramid as an encoder artifact (format 2, both levels recorded)."""
    spec = EncoderSpec(DENSE_BACKBONE, img_size, provenance=provenance,
                       options=state.model.config.to_dict())
    encoder = Encoder(spec)
    encoder.backbone.load_state_dict(state.model.state_dict())
    encoder.save(directory)
    return encoder
