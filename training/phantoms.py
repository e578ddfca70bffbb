"""Synthetic frontal (PA) chest radiograph phantoms with exact landmark coordinates.

A subject is an `Anatomy`: shapes in a canonical frame of unit coordinates (x right, y down,
[0, 1] spans the image; patient's right = image left). It is rasterised into a density map
(soft tissue, air in the lungs, mediastinum, heart, bones, vessels), warped into the image by the
view's `Pose` (rotation, scale, shift), and exposed by the `Acquisition`: Beer-Lambert
transmission, Poisson quantum noise, log transform, window, gamma, detector blur.
Landmarks are points of the same shapes, moved by the same pose matrix as the pixels, so they
are exact to the interpolation of the warp.

Random streams are separated per subject and per part (anatomy / pose / acquisition / noise), so
subject k of seed s is the same patient whatever else is generated, and extra views of one
subject differ only in pose and exposure.

`PhantomConfig(difficulty="hard")` widens the pose and adds body habitus, inspiration depth,
cardiomegaly, pleural effusion and nodules (per subject, stream 4) and tubes, wires and
collimation (per view, stream 5). Those streams are new, so "standard" images are unchanged.

This module draws and writes phantoms; its parts: training/phantom_types.py (config and
dataclasses), phantom_shapes.py (outlines and landmarks), phantom_sampling.py (random subjects
and views), phantom_render.py (density, warp, exposure).
"""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.feature import match_template
from tqdm import tqdm

from ace_model.errors import InputError
from training.landmarks import write_landmarks_csv, write_metadata_csv
from training.phantom_render import render_phantom
from training.phantom_sampling import (
    add_findings,
    sample_acquisition,
    sample_anatomy,
    sample_fitting_pose,
    sample_view_extras,
    with_habitus,
)
from training.phantom_types import (
    DIFFICULTIES,
    GENERATOR_VERSION,
    LANDMARK_NAMES,
    Anatomy,
    Phantom,
    PhantomConfig,
    Pose,
)

__all__ = [  # the generator's entry points; the parts live in training/phantom_*.py
    "DIFFICULTIES", "LANDMARK_NAMES", "Phantom", "PhantomConfig", "generate_phantom", "shifted",
    "subject_geometry", "subject_rng", "template_matching_errors", "write_phantom_set",
]


def subject_rng(seed: int, subject: int, stream: int, view: int = 0) -> np.random.Generator:
    """Independent stream per (seed, subject, view, part): 0 anatomy, 1 pose, 2 acquisition, 3 noise,
    4 hard subject (habitus, findings; view 0), 5 hard view (devices, collimation)."""
    return np.random.default_rng(np.random.SeedSequence([seed, subject, view, stream]))


def generate_phantom(
    subject: int, seed: int = 0, config: PhantomConfig | None = None, view: int = 0, with_masks: bool = False
) -> Phantom:
    """Subject `subject` of seed `seed`, seen in view `view` (same anatomy, own pose and exposure)."""
    config = config or PhantomConfig()
    anatomy, pose = subject_geometry(subject, seed, config, view)
    acquisition = sample_acquisition(subject_rng(seed, subject, 2, view))
    extras = None
    if config.difficulty == "hard":
        extras = sample_view_extras(subject_rng(seed, subject, 5, view), anatomy, pose, config.size)
    rng = subject_rng(seed, subject, 3, view)
    return render_phantom(anatomy, pose, acquisition, config, rng, with_masks, extras)


def subject_geometry(subject: int, seed: int, config: PhantomConfig, view: int = 0) -> tuple[Anatomy, Pose]:
    """The anatomy and pose of a view, without rendering it (cheap)."""
    anatomy = sample_subject(subject, seed, config)
    return anatomy, sample_fitting_pose(subject_rng(seed, subject, 1, view), config, anatomy)


def sample_subject(subject: int, seed: int, config: PhantomConfig) -> Anatomy:
    """Stream 0 draws the standard patient; a hard one gets habitus and findings from stream 4."""
    if config.difficulty == "standard":
        return sample_anatomy(subject_rng(seed, subject, 0))
    rng = subject_rng(seed, subject, 4)
    anatomy = sample_anatomy(subject_rng(seed, subject, 0), thorax=rng.uniform(0.85, 1.08))
    return add_findings(with_habitus(anatomy, rng), rng)


def shifted(pose: Pose, dx: float, dy: float) -> Pose:
    return replace(pose, shift_x=pose.shift_x + dx, shift_y=pose.shift_y + dy)


# ---------------------------------------------------------------------------------------------
# Writing a landmark data set


def phantom_image_id(subject: int, view: int, views: int) -> str:
    return f"phantom_{subject:05d}" if views == 1 else f"phantom_{subject:05d}_v{view}"


def _render_job(job: tuple[int, int, int, PhantomConfig]) -> Phantom:
    subject, view, seed, config = job
    return generate_phantom(subject, seed, config, view)


def write_phantom_set(
    out_dir: str | Path, n: int, seed: int = 0, config: PhantomConfig | None = None, start_id: int = 0,
    views: int = 1, force: bool = False, workers: int = 1,
) -> Path:
    """Write subjects start_id .. start_id + n - 1 (`views` images each) as a landmark data set."""
    config = config or PhantomConfig()
    if n < 1 or views < 1 or start_id < 0:
        raise InputError(f"need n >= 1, views >= 1 and start_id >= 0 (got n={n}, views={views}, "
                         f"start_id={start_id})")
    out = _prepare_out_dir(Path(out_dir), force)
    jobs = [(s, v, seed, config) for s in range(start_id, start_id + n) for v in range(views)]
    landmarks, metadata = [], []
    with ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
        rendered = pool.map(_render_job, jobs, chunksize=4) if pool else map(_render_job, jobs)
        for (subject, view, _, _), phantom in tqdm(zip(jobs, rendered, strict=True), total=len(jobs),
                                                    desc="phantoms", unit="img"):
            image_id = phantom_image_id(subject, view, views)
            Image.fromarray(phantom.image).save(out / "images" / f"{image_id}.png")
            landmarks.append((f"images/{image_id}.png", phantom.landmarks))
            metadata.append((f"images/{image_id}.png", image_id, f"phantom_subject_{subject:05d}"))
    write_landmarks_csv(out / "landmarks.csv", landmarks)
    write_metadata_csv(out / "metadata.csv", metadata)
    _write_provenance(out / "phantoms.json", seed, config, start_id, n, views)
    return out


def _write_provenance(
    path: Path, seed: int, config: PhantomConfig, start_id: int, n: int, views: int
) -> None:
    """Record how the set was made: sets from different generator versions differ in appearance."""
    record = {"generator_version": GENERATOR_VERSION, "seed": seed, "subjects": [start_id, start_id + n],
              "views": views, "config": asdict(config)}
    path.write_text(json.dumps(record, indent=2) + "\n")


def _prepare_out_dir(out: Path, force: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} is not empty; choose another --out or pass --force to replace "
                                  "the phantoms in it")
        owned = [out / "landmarks.csv", out / "metadata.csv", out / "phantoms.json"]
        for stale in [*out.glob("images/phantom_*.png"), *owned]:
            stale.unlink(missing_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    return out


def template_matching_errors(source: Phantom, target: Phantom, half: int = 16) -> np.ndarray:
    """(14,) radial error in pixels of locating each landmark of `source` in `target` by NCC
    of a (2*half)^2 patch: the naive baseline the phantoms are meant to defeat often."""
    errors = []
    for name in LANDMARK_NAMES:
        x, y = (int(v) for v in source.landmarks[name])
        padded = np.pad(source.image, half, mode="edge")  # landmarks may sit near the border
        patch = padded[y : y + 2 * half, x : x + 2 * half].astype(np.float32)
        response = match_template(target.image.astype(np.float32), patch, pad_input=True)
        row, col = np.unravel_index(np.argmax(response), response.shape)
        tx, ty = target.landmarks[name]
        errors.append(np.hypot(col + 0.5 - tx, row + 0.5 - ty))
    return np.asarray(errors)
