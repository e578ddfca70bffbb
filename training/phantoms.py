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
"""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from math import comb
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage import draw
from skimage.feature import match_template
from skimage.measure import points_in_poly
from tqdm import tqdm

from training.landmarks import write_landmarks_csv, write_metadata_csv

LANDMARK_NAMES = (
    "clavicle_head_left",
    "clavicle_head_right",
    "lung_apex_left",
    "lung_apex_right",
    "aortic_knob",
    "carina",
    "hilum_left",
    "hilum_right",
    "heart_border_left",
    "heart_border_right",
    "hemidiaphragm_dome_left",
    "hemidiaphragm_dome_right",
    "costophrenic_angle_left",
    "costophrenic_angle_right",
)
# Bumped whenever the images of a given (seed, subject, view) change: train and eval sets should
# come from the same version (recorded in DIR/phantoms.json).
GENERATOR_VERSION = 2
# Patient's side -> direction on the image in a PA view (patient's left appears on the right).
SIDES = {"right": -1.0, "left": 1.0}
DIFFICULTIES = ("standard", "hard")


@dataclass(frozen=True)
class PhantomConfig:
    size: int = 512  # image width = height in pixels
    bit_depth: int = 8  # 8 or 16 (PNG grey levels)
    max_rotation_deg: float = 7.0  # pose rotation drawn from +-this (x2 when hard)
    max_shift: float = 0.07  # pose shift drawn from +-this fraction of the size, per axis (x1.6 when hard)
    scale_range: tuple[float, float] = (0.86, 1.1)  # pose zoom range (widened when hard)
    noise: bool = True  # quantum noise; off gives the expected image (tests)
    difficulty: str = "standard"  # "hard": more varied patients, findings, devices (docs/data.md)

    def __post_init__(self) -> None:
        if self.size < 64:
            raise ValueError(f"phantom size must be at least 64 pixels, got {self.size}")
        if self.bit_depth not in (8, 16):
            raise ValueError(f"bit_depth must be 8 or 16, got {self.bit_depth}")
        if self.difficulty not in DIFFICULTIES:
            raise ValueError(f"difficulty must be one of {', '.join(DIFFICULTIES)}, got {self.difficulty!r}")


@dataclass(frozen=True)
class Pose:
    rotation_deg: float = 0.0  # counter-clockwise on screen, about the image centre
    scale: float = 1.0  # zoom about the image centre
    shift_x: float = 0.0  # pixels, applied after rotation and zoom
    shift_y: float = 0.0

    def matrix(self, size: int) -> np.ndarray:
        """(3, 3) affine from canonical pixel coordinates (x, y, 1) to image pixel coordinates."""
        theta = np.deg2rad(self.rotation_deg)
        # y points down, so a counter-clockwise turn on screen is a negative angle in (x, y).
        rot = self.scale * np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])
        centre = np.array([size / 2, size / 2])
        out = np.eye(3)
        out[:2, :2] = rot
        out[:2, 2] = centre - rot @ centre + [self.shift_x, self.shift_y]
        return out

    def apply(self, xy: np.ndarray, size: int) -> np.ndarray:
        """Move canonical pixel points (N, 2) into the image."""
        return xy @ self.matrix(size)[:2, :2].T + self.matrix(size)[:2, 2]


@dataclass(frozen=True)
class LungShape:
    apex_y: float  # top of the lung
    apex_off: float  # |x - midline| of the apex
    lateral_off: float  # widest lateral extent
    medial_off: float  # medial border behind the mediastinum
    dome_y: float  # top of the hemidiaphragm
    dome_off: float  # |x - midline| of the dome top
    cp_depth: float  # costophrenic angle below the dome top
    medial_drop: float  # medial end of the diaphragm below the dome top

    @property
    def cp_y(self) -> float:
        return self.dome_y + self.cp_depth

    @property
    def cp_off(self) -> float:
        return self.lateral_off - 0.025


@dataclass(frozen=True)
class Densities:
    soft: float  # soft-tissue thickness scale of the body
    lung_air: float  # fraction of the body density removed inside the lungs
    mediastinum: float
    heart: float
    spine: float
    rib: float
    clavicle: float
    vessel: float
    hilum: float
    liver: float
    gas: float  # gastric bubble under the left hemidiaphragm


Vessel = tuple[np.ndarray, float, float]  # centreline (K, 2) in unit coordinates, start / end width
Nodule = tuple[float, float, float, float]  # centre x, y, radius (unit coordinates), peak density
Wire = tuple[np.ndarray, float, float]  # centreline (K, 2) in unit coordinates, width, density
Blade = tuple[int, float, float]  # image edge (0 left, 1 top, 2 right, 3 bottom), depth (px), slope


@dataclass(frozen=True)
class Effusion:
    side: str  # patient's side
    height: float  # of the fluid at the lateral chest wall above the costophrenic angle


@dataclass(frozen=True, eq=False)
class Anatomy:
    midline: float
    size: float  # overall thorax scale of this subject
    lungs: dict[str, LungShape]
    heart: tuple[float, float, float, float, float]  # centre x, centre y, rx, ry, tilt (deg)
    mediastinum: tuple[float, float, float, float, float]  # top/bottom half-width, knob y, bulge, sigma
    trachea: tuple[float, float, float]  # x, carina y, width
    hila: dict[str, tuple[float, float]]
    clavicles: dict[str, tuple[float, float, float, float]]  # head y, head off, rise, lateral off
    ribs: tuple[float, float, float, float, float]  # top y, spacing, rise, drop, width
    spine: tuple[float, float, float]  # width, vertebra spacing, phase
    vessels: dict[str, list[Vessel]]
    densities: Densities
    texture_seed: int  # parenchymal texture, fixed per subject
    wall: float = 0.07  # chest-wall soft tissue lateral of the lungs, in thorax units
    effusion: Effusion | None = None
    nodules: tuple[Nodule, ...] = ()


@dataclass(frozen=True, eq=False)
class ViewExtras:
    """What a hard view adds: tubes and wires (canonical frame: they move with the patient) and
    collimator blades (image frame: they belong to the machine)."""

    wires: tuple[Wire, ...]
    electrodes: tuple[tuple[float, float, float], ...]  # ECG electrode centre x, y, radius
    blades: tuple[Blade, ...]
    dark_shutter: bool  # blades blacked out on the display instead of blocking the beam (white)


@dataclass(frozen=True)
class Acquisition:
    photons: float  # mean quanta per pixel behind air (sets the noise level)
    mu: float  # attenuation per density unit
    gamma: float  # display gamma
    window: tuple[float, float]  # jitter of the low / high display window (density units)
    blur: float  # detector blur sigma at 512 px
    heel: float  # linear exposure gradient across the field (anode heel effect)
    scatter: float  # scattered radiation, as a fraction of the mean primary transmission


@dataclass(frozen=True, eq=False)
class Phantom:
    image: np.ndarray  # (size, size) uint8 or uint16
    landmarks: dict[str, tuple[float, float]]  # name -> (x, y) continuous image pixels
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (size, size) bool, on request


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


def image_landmarks(anatomy: Anatomy, pose: Pose, size: int) -> dict[str, tuple[float, float]]:
    """Landmarks in image pixels: the canonical points moved by the pose matrix of the pixels."""
    canonical = canonical_landmarks(anatomy)
    moved = pose.apply(np.array(list(canonical.values())) * size, size)
    return {name: (float(x), float(y)) for name, (x, y) in zip(canonical, moved, strict=True)}


# ---------------------------------------------------------------------------------------------
# Sampling


def pose_limits(config: PhantomConfig) -> tuple[float, float, tuple[float, float]]:
    """Rotation (deg), shift (fraction of the size) and zoom range: hard patients are positioned worse."""
    if config.difficulty == "standard":
        return config.max_rotation_deg, config.max_shift, config.scale_range
    low, high = config.scale_range
    return 2.0 * config.max_rotation_deg, 1.6 * config.max_shift, (0.93 * low, 1.04 * high)


def sample_pose(rng: np.random.Generator, config: PhantomConfig) -> Pose:
    rotation, shift, zoom = pose_limits(config)
    shift = shift * config.size
    return Pose(
        rotation_deg=rng.uniform(-rotation, rotation),
        scale=rng.uniform(*zoom),
        shift_x=rng.uniform(-shift, shift),
        shift_y=rng.uniform(-shift, shift),
    )


def sample_fitting_pose(rng: np.random.Generator, config: PhantomConfig, anatomy: Anatomy,
                        margin: float = 0.03) -> Pose:
    """A pose that keeps every landmark at least `margin` (fraction of the size) inside the image."""
    points = np.array(list(canonical_landmarks(anatomy).values())) * config.size
    low, high = margin * config.size, (1 - margin) * config.size
    for _ in range(50):
        pose = sample_pose(rng, config)
        moved = pose.apply(points, config.size)
        if np.all((moved >= low) & (moved <= high)):
            return pose
    return Pose()  # the canonical frame keeps all landmarks well inside


def sample_acquisition(rng: np.random.Generator) -> Acquisition:
    return Acquisition(
        photons=float(np.exp(rng.uniform(np.log(300), np.log(5000)))),
        mu=rng.uniform(1.4, 2.0),
        gamma=rng.uniform(0.6, 1.3),
        window=(rng.uniform(-0.08, 0.08), rng.uniform(-0.15, 0.1)),
        blur=rng.uniform(0.4, 1.2),
        heel=rng.uniform(-0.15, 0.15),
        scatter=rng.uniform(0.05, 0.25),
    )


def sample_anatomy(rng: np.random.Generator, thorax: float = 1.0) -> Anatomy:
    """thorax: factor on the subject's thorax scale (hard subjects vary it)."""
    midline, scale = 0.5 + rng.uniform(-0.015, 0.015), rng.uniform(0.9, 1.08) * thorax
    apex_y = 0.45 - scale * rng.uniform(0.29, 0.34)
    dome_right = 0.45 + scale * rng.uniform(0.17, 0.25)
    dome_left = dome_right + scale * rng.uniform(0.01, 0.045)
    heart = _sample_heart(rng, midline, scale, dome_left)
    heart_reach = float(heart_outline(heart)[:, 0].max()) - midline
    lungs = {
        "right": _sample_lung(rng, scale, apex_y, dome_right, min_dome_off=0.0),
        "left": _sample_lung(rng, scale, apex_y, dome_left, min_dome_off=heart_reach + 0.03),
    }
    mediastinum = _sample_mediastinum(rng, scale, apex_y)
    carina_y = mediastinum[2] + scale * rng.uniform(0.03, 0.06)
    hila = _sample_hila(rng, midline, scale, carina_y)
    ribs = _sample_ribs(rng, scale, lungs)
    return Anatomy(
        midline=midline, size=scale, lungs=lungs, heart=heart, mediastinum=mediastinum,
        trachea=(midline + rng.uniform(-0.012, 0.004), carina_y, scale * rng.uniform(0.024, 0.032)),
        hila=hila, clavicles=_sample_clavicles(rng, scale, apex_y), ribs=ribs,
        spine=(scale * rng.uniform(0.065, 0.08), ribs[1] * rng.uniform(0.95, 1.05), rng.uniform(0, 1)),
        vessels={side: _sample_vessels(rng, hila[side], lungs[side], midline, SIDES[side]) for side in SIDES},
        densities=_sample_densities(rng),
        texture_seed=int(rng.integers(2**31)),
    )


def _sample_lung(
    rng: np.random.Generator, scale: float, apex_y: float, dome_y: float, min_dome_off: float
) -> LungShape:
    lateral_off = scale * rng.uniform(0.33, 0.39)
    dome_off = max(scale * rng.uniform(0.16, 0.23), min_dome_off)
    cp_depth = scale * rng.uniform(0.05, 0.09)
    return LungShape(
        apex_y=apex_y + scale * rng.uniform(-0.012, 0.012),
        apex_off=scale * rng.uniform(0.13, 0.17),
        lateral_off=lateral_off,
        medial_off=scale * rng.uniform(0.025, 0.04),
        dome_y=dome_y,
        dome_off=min(dome_off, lateral_off - 0.025 - 0.06 * scale),
        cp_depth=cp_depth,
        medial_drop=min(scale * rng.uniform(0.03, 0.06), 0.9 * cp_depth),
    )


def _sample_heart(
    rng: np.random.Generator, midline: float, scale: float, left_dome_y: float
) -> tuple[float, float, float, float, float]:
    return (
        midline + scale * rng.uniform(0.02, 0.06),
        left_dome_y - scale * rng.uniform(0.08, 0.11),
        scale * rng.uniform(0.12, 0.155),
        scale * rng.uniform(0.095, 0.12),
        rng.uniform(20.0, 40.0),
    )


def _sample_mediastinum(
    rng: np.random.Generator, scale: float, apex_y: float
) -> tuple[float, float, float, float, float]:
    return (
        scale * rng.uniform(0.055, 0.075),
        scale * rng.uniform(0.065, 0.085),
        apex_y + scale * rng.uniform(0.13, 0.18),
        scale * rng.uniform(0.02, 0.04),
        scale * rng.uniform(0.025, 0.035),
    )


def _sample_hila(
    rng: np.random.Generator, midline: float, scale: float, carina_y: float
) -> dict[str, tuple[float, float]]:
    right_y = carina_y + scale * rng.uniform(0.06, 0.10)
    return {
        "right": (midline - scale * rng.uniform(0.09, 0.115), right_y),
        "left": (midline + scale * rng.uniform(0.085, 0.11), right_y - scale * rng.uniform(0.0, 0.03)),
    }


def _sample_clavicles(
    rng: np.random.Generator, scale: float, apex_y: float
) -> dict[str, tuple[float, float, float, float]]:
    head_y, head_off = apex_y + scale * rng.uniform(0.03, 0.07), scale * rng.uniform(0.045, 0.065)
    rise, lateral = scale * rng.uniform(0.02, 0.07), scale * rng.uniform(0.3, 0.36)
    return {
        side: (head_y + scale * rng.uniform(-0.01, 0.01), head_off + scale * rng.uniform(-0.005, 0.005),
               rise + scale * rng.uniform(-0.01, 0.01), lateral)
        for side in SIDES
    }


def _sample_ribs(
    rng: np.random.Generator, scale: float, lungs: dict[str, LungShape]
) -> tuple[float, float, float, float, float]:
    top = lungs["right"].apex_y + scale * rng.uniform(-0.01, 0.02)
    bottom = 0.5 * (lungs["right"].cp_y + lungs["left"].cp_y)
    return (top, (bottom - top) / rng.uniform(9.0, 10.0), scale * rng.uniform(0.015, 0.03),
            scale * rng.uniform(0.04, 0.08), scale * rng.uniform(0.018, 0.024))


def _sample_vessels(
    rng: np.random.Generator, hilum: tuple[float, float], lung: LungShape, midline: float, sign: float
) -> list[Vessel]:
    """Vessel trees growing out of the hilum towards random points of the lung."""
    vessels: list[Vessel] = []
    for _ in range(9):
        start = np.asarray(hilum) + rng.normal(0, 0.012, 2)
        target = np.array([midline + sign * rng.uniform(lung.medial_off + 0.06, lung.lateral_off * 0.9),
                           rng.uniform(lung.apex_y + 0.05, lung.dome_y - 0.01)])
        reach = float(np.linalg.norm(target - start))
        heading = float(np.arctan2(*(target - start)[::-1]))
        length, width = reach * rng.uniform(0.35, 0.5), rng.uniform(0.008, 0.012)
        _grow_vessel(rng, vessels, start, heading, length, width, 0)
    return vessels


def _grow_vessel(rng: np.random.Generator, out: list[Vessel], start: np.ndarray, heading: float,
                 length: float, width: float, depth: int) -> None:
    """A gently curving, tapering segment, then two thinner branches (three generations)."""
    angles = heading + rng.normal(0, 0.25) * np.linspace(0, 1, 8)
    steps = np.stack([np.cos(angles), np.sin(angles)], 1) * length / 7
    points = start + np.concatenate([[[0.0, 0.0]], np.cumsum(steps[:-1], axis=0)])
    out.append((points, width, 0.65 * width))
    if depth < 2:
        for turn in (rng.uniform(0.2, 0.6), -rng.uniform(0.2, 0.6)):
            _grow_vessel(rng, out, points[-1], angles[-1] + turn, length * rng.uniform(0.55, 0.8),
                         0.55 * width, depth + 1)


def _sample_densities(rng: np.random.Generator) -> Densities:
    return Densities(
        soft=rng.uniform(0.9, 1.1), lung_air=rng.uniform(0.52, 0.72), mediastinum=rng.uniform(0.12, 0.22),
        heart=rng.uniform(0.02, 0.08), spine=rng.uniform(0.08, 0.16), rib=rng.uniform(0.1, 0.18),
        clavicle=rng.uniform(0.15, 0.25), vessel=rng.uniform(0.12, 0.25), hilum=rng.uniform(0.25, 0.4),
        liver=rng.uniform(0.05, 0.15), gas=rng.uniform(0.0, 0.35),
    )


# ---------------------------------------------------------------------------------------------
# Hard difficulty: habitus and findings per subject (stream 4), devices and collimation per view
# (stream 5). Habitus and findings change the Anatomy itself, so the landmarks follow them.


def with_habitus(anatomy: Anatomy, rng: np.random.Generator) -> Anatomy:
    """Inspiration depth, build (soft-tissue thickness, chest-wall width) and cardiomegaly."""
    anatomy = _inspire(anatomy, anatomy.size * rng.uniform(-0.06, 0.045))
    build = rng.uniform(0.0, 1.0)
    densities = replace(anatomy.densities, soft=anatomy.densities.soft * (0.85 + 0.65 * build))
    anatomy = replace(anatomy, densities=densities, wall=0.05 + 0.09 * build)
    cardiomegaly = rng.uniform(1.2, 1.5)
    return _enlarge_heart(anatomy, cardiomegaly) if rng.random() < 0.3 else anatomy


def _inspire(anatomy: Anatomy, delta: float) -> Anatomy:
    """Both domes move by `delta` (down = deeper breath). The heart rests on the diaphragm and the
    vessels below the hila stretch with the lungs; the ribs stay, so more or fewer of them show."""
    lungs = {side: replace(lung, dome_y=lung.dome_y + delta) for side, lung in anatomy.lungs.items()}
    cx, cy, rx, ry, tilt = anatomy.heart
    vessels = {}
    for side, trees in anatomy.vessels.items():
        hilum_y, dome_y = anatomy.hila[side][1], anatomy.lungs[side].dome_y
        stretch = (dome_y + delta - hilum_y) / (dome_y - hilum_y)
        vessels[side] = [(_stretch_below(centre, hilum_y, stretch), w0, w1) for centre, w0, w1 in trees]
    return replace(anatomy, lungs=lungs, heart=(cx, cy + delta, rx, ry, tilt), vessels=vessels)


def _stretch_below(points: np.ndarray, top: float, factor: float) -> np.ndarray:
    y = points[:, 1]
    return np.stack([points[:, 0], np.where(y > top, top + (y - top) * factor, y)], 1)


def _enlarge_heart(anatomy: Anatomy, factor: float) -> Anatomy:
    """A wider heart, grown mostly to the patient's left, shrunk back until the left dome (which
    sampling keeps lateral of the heart) still fits between heart and chest wall."""
    lung = anatomy.lungs["left"]
    room = lung.cp_off - 0.035 * anatomy.size - 0.02
    cx, cy, rx, ry, tilt = anatomy.heart
    for grow in np.linspace(factor - 1, 0, 7)[:-1]:
        heart = (cx + 0.5 * grow * rx, cy, (1 + grow) * rx, (1 + 0.5 * grow) * ry, tilt)
        reach = float(heart_outline(heart)[:, 0].max()) - anatomy.midline
        if reach <= room:
            left = replace(lung, dome_off=max(lung.dome_off, reach + 0.02))
            return replace(anatomy, heart=heart, lungs={**anatomy.lungs, "left": left})
    return anatomy


def add_findings(anatomy: Anatomy, rng: np.random.Generator) -> Anatomy:
    """Sometimes a pleural effusion on one side; 0-3 lung nodules."""
    side, height = ("right", "left")[int(rng.integers(2))], rng.uniform(0.5, 1.2)
    effusion = Effusion(side, height * anatomy.lungs[side].cp_depth) if rng.random() < 0.3 else None
    return replace(anatomy, effusion=effusion, nodules=_sample_nodules(rng, anatomy))


def _sample_nodules(rng: np.random.Generator, anatomy: Anatomy) -> tuple[Nodule, ...]:
    """Round densities wholly inside a lung field (not behind the heart, mediastinum or diaphragm)."""
    count = int(rng.choice([0, 0, 1, 1, 2, 3]))
    fields = {side: lung_outline(anatomy.lungs[side], anatomy.midline, sign) for side, sign in SIDES.items()}
    hidden = [heart_outline(anatomy.heart), mediastinum_outline(anatomy), abdomen_outline(anatomy)]
    rim = np.array([[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1]])
    nodules: list[Nodule] = []
    for _ in range(30 * count):
        side = ("right", "left")[int(rng.integers(2))]
        lung = anatomy.lungs[side]
        centre = (anatomy.midline + SIDES[side] * rng.uniform(lung.medial_off, lung.lateral_off),
                  rng.uniform(lung.apex_y, lung.cp_y))
        radius, value = anatomy.size * rng.uniform(0.006, 0.018), rng.uniform(0.2, 0.45)
        disc = centre + rim * radius
        covered = any(points_in_poly(disc, outline).any() for outline in hidden)
        if points_in_poly(disc, fields[side]).all() and not covered:
            nodules.append((*centre, radius, value))
        if len(nodules) == count:
            break
    return tuple(nodules)


def pleural_fluid(anatomy: Anatomy, unit: np.ndarray) -> np.ndarray | float:
    """Fraction of the lung air column replaced by fluid: a meniscus rising towards the chest wall,
    filling the costophrenic recess (the angle landmark stays at the recess, now hidden)."""
    if anatomy.effusion is None:
        return 0.0
    lung, sign = anatomy.lungs[anatomy.effusion.side], SIDES[anatomy.effusion.side]
    off = sign * (unit[None, :] - anatomy.midline)
    lateral = np.clip((off - lung.dome_off) / (lung.cp_off - lung.dome_off), 0, None)
    surface = lung.cp_y - anatomy.effusion.height * lateral**1.5
    return np.clip((unit[:, None] - surface) / 0.02, 0, 1) * (lateral > 0)


def _nodules(nodules: tuple[Nodule, ...], unit: np.ndarray) -> np.ndarray | float:
    """Projected thickness of spheres."""
    total: np.ndarray | float = 0.0
    for x, y, radius, value in nodules:
        r2 = ((unit[None, :] - x) ** 2 + (unit[:, None] - y) ** 2) / radius**2
        total = total + value * np.sqrt(np.clip(1 - r2, 0, None))
    return total


def sample_view_extras(rng: np.random.Generator, anatomy: Anatomy, pose: Pose, size: int) -> ViewExtras:
    """Each view: maybe a nasogastric tube, a central line, ECG leads; collimator blades that
    stop short of every landmark."""
    wires = [_nasogastric_tube(rng, anatomy), _central_line(rng, anatomy)]
    wires = [wire for wire, p in zip(wires, (0.5, 0.4), strict=True) if rng.random() < p]
    electrodes, leads = _ecg_leads(rng, anatomy)
    if rng.random() < 0.5:
        electrodes, leads = (), []
    blades = _sample_blades(rng, image_landmarks(anatomy, pose, size), size)
    return ViewExtras(tuple(wires + leads), electrodes, blades, dark_shutter=bool(rng.random() < 0.4))


def _bezier(control: list[tuple[float, float]], n: int = 48) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    k = len(control) - 1
    return sum(comb(k, i) * t**i * (1 - t) ** (k - i) * np.asarray(p) for i, p in enumerate(control))


def _nasogastric_tube(rng: np.random.Generator, anatomy: Anatomy) -> Wire:
    """Down the oesophagus, left of the spine, through the hiatus into the stomach."""
    m, carina_y, lung = anatomy.midline, anatomy.trachea[1], anatomy.lungs["left"]
    path = [(m + rng.uniform(-0.01, 0.01), -0.3), (m + rng.uniform(0.0, 0.03), carina_y),
            (m + rng.uniform(0.02, 0.06), lung.dome_y + 0.03),
            (m + 0.8 * lung.dome_off + rng.uniform(-0.04, 0.04), lung.dome_y + rng.uniform(0.06, 0.12))]
    return _bezier(path), rng.uniform(0.003, 0.005), rng.uniform(0.3, 0.5)


def _central_line(rng: np.random.Generator, anatomy: Anatomy) -> Wire:
    """From beyond the field through a subclavian vein to a tip in the superior vena cava."""
    sign, m = (-1.0, 1.0)[int(rng.integers(2))], anatomy.midline
    head_y = anatomy.clavicles["right" if sign < 0 else "left"][0]
    tip = (m - rng.uniform(0.02, 0.05), anatomy.trachea[1] + rng.uniform(0, 0.06))
    path = [(m + sign * rng.uniform(0.3, 0.45), -0.3), (m + sign * rng.uniform(0.2, 0.28), head_y + 0.04),
            (m + sign * 0.06, head_y + 0.03), tip]
    return _bezier(path), rng.uniform(0.003, 0.005), rng.uniform(0.3, 0.5)


def _ecg_leads(
    rng: np.random.Generator, anatomy: Anatomy
) -> tuple[tuple[tuple[float, float, float], ...], list[Wire]]:
    """Electrodes on the shoulders and lower chest, each with a wire curling off the field."""
    spots = [(-1.0, 0.1, 0.22), (1.0, 0.1, 0.22), (1.0, 0.65, 0.85), (-1.0, 0.65, 0.85)]  # (side, y range)
    electrodes, wires = [], []
    for sign, top, bottom in spots[: int(rng.integers(3, 5))]:
        x, y = anatomy.midline + sign * rng.uniform(0.18, 0.35), rng.uniform(top, bottom)
        bend = (x + rng.uniform(-0.2, 0.2), y + rng.uniform(-0.2, 0.2))
        off_field = ((-0.4, 1.4)[int(rng.integers(2))], y + rng.uniform(-0.3, 0.3))
        electrodes.append((x, y, rng.uniform(0.011, 0.016)))
        wires.append((_bezier([(x, y), bend, off_field]), rng.uniform(0.0015, 0.003), rng.uniform(0.6, 1.0)))
    return tuple(electrodes), wires


def _sample_blades(
    rng: np.random.Generator, landmarks: dict[str, tuple[float, float]], size: int
) -> tuple[Blade, ...]:
    points = np.array(list(landmarks.values()))
    blades = []
    for edge in range(4):
        depth, slope, present = rng.uniform(0.02, 0.15) * size, rng.uniform(-0.05, 0.05), rng.random() < 0.5
        inward, along = _edge_coordinates(edge, points[:, 0], points[:, 1], size)
        room = float(np.min(inward - slope * along)) - 0.02 * size
        if present and room > 2:
            blades.append((edge, min(depth, room), slope))
    return tuple(blades)


def _edge_coordinates(edge: int, x: np.ndarray, y: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(distance inwards from the image edge, position along it from its middle)."""
    return [(x, y - size / 2), (y, x - size / 2), (size - x, y - size / 2), (size - y, x - size / 2)][edge]


def collimator_mask(blades: tuple[Blade, ...], size: int) -> np.ndarray:
    """Fraction of each image pixel behind a blade (a one-pixel penumbra)."""
    centres = np.arange(size) + 0.5
    covered = np.zeros((size, size))
    for edge, depth, slope in blades:
        inward, along = _edge_coordinates(edge, centres[None, :], centres[:, None], size)
        covered = np.maximum(covered, np.clip(depth + slope * along - inward + 0.5, 0, 1))
    return covered


def device_density(extras: ViewExtras, pose: Pose, size: int) -> np.ndarray:
    """Attenuation of the tubes, wires and ECG electrodes, drawn straight into the image through the
    pose: warping them would smear wires that leave the canonical frame along its edge."""
    canvas = np.zeros((size, size), dtype=np.float32)
    circle = np.stack([np.cos(np.linspace(0, 2 * np.pi, 24)), np.sin(np.linspace(0, 2 * np.pi, 24))], 1)
    for x, y, radius in extras.electrodes:
        centre = pose.apply(np.array([[x, y]]) * size, size) / size
        _add_fill(canvas, circle * radius * pose.scale + centre, 0.25)
        _add_fill(canvas, circle * 0.3 * radius * pose.scale + centre, 1.0)  # the metal snap
    for centre, width, value in extras.wires:
        _add_wire(canvas, pose.apply(centre * size, size) / size, width * pose.scale, value)
    return ndimage.gaussian_filter(canvas, 0.5 * size / 512)


def _add_wire(canvas: np.ndarray, centre: np.ndarray, width: float, value: float) -> None:
    """Below ~1.5 px wide, a one-pixel line carrying the same attenuation per unit length."""
    size = canvas.shape[0]
    if width * size >= 1.5:
        _add_fill(canvas, band_outline(centre, width), value)
    else:
        _add_polyline(canvas, centre, value * width * size)


# ---------------------------------------------------------------------------------------------
# Shapes in unit coordinates; landmarks are points of these outlines


def _ease(t: np.ndarray, reach: float) -> np.ndarray:
    """0 -> 1 over [0, reach], leaving t = 0 with a vertical tangent (a rounded apex)."""
    return np.sin(0.5 * np.pi * np.clip(t / reach, 0.0, 1.0)) ** 0.5


def lung_outline(lung: LungShape, midline: float, sign: float) -> np.ndarray:
    """Closed outline (N, 2): apex -> lateral wall -> costophrenic angle -> dome -> medial wall."""
    t = np.linspace(0.0, 1.0, 48)
    taper = 0.025 * np.clip((t - 0.7) / 0.3, 0, 1) ** 2
    lateral = np.stack([lung.apex_off + (lung.lateral_off - lung.apex_off) * _ease(t, 0.7) - taper,
                        lung.apex_y + t * (lung.cp_y - lung.apex_y)], axis=1)
    offsets = np.linspace(lung.medial_off, lung.cp_off, 48)
    offsets = np.unique(np.concatenate([offsets, [lung.dome_off]]))[::-1]
    dome = np.stack([offsets, _diaphragm_y(lung, offsets)], axis=1)[1:]
    medial_end_y = lung.dome_y + lung.medial_drop
    medial = np.stack([lung.apex_off - (lung.apex_off - lung.medial_off) * _ease(t, 0.2),
                       lung.apex_y + t * (medial_end_y - lung.apex_y)], axis=1)[::-1][1:-1]
    outline = np.concatenate([lateral, dome, medial])
    return np.stack([midline + sign * outline[:, 0], outline[:, 1]], axis=1)


def _diaphragm_y(lung: LungShape, off: np.ndarray) -> np.ndarray:
    """Height of the hemidiaphragm at |x - midline| = off: a dome peaking at dome_off."""
    lateral = (off - lung.dome_off) / (lung.cp_off - lung.dome_off)
    medial = (lung.dome_off - off) / (lung.dome_off - lung.medial_off)
    return np.where(off >= lung.dome_off,
                    lung.dome_y + lung.cp_depth * np.clip(lateral, 0, None) ** 1.8,
                    lung.dome_y + lung.medial_drop * np.clip(medial, 0, None) ** 1.6)


def heart_outline(heart: tuple[float, float, float, float, float]) -> np.ndarray:
    cx, cy, rx, ry, tilt = heart
    phi = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    theta = np.deg2rad(tilt)  # long axis tilted down towards the patient's left (image right)
    x, y = rx * np.cos(phi), ry * np.sin(phi)
    cos, sin = np.cos(theta), np.sin(theta)
    return np.stack([cx + x * cos - y * sin, cy + x * sin + y * cos], 1)


def mediastinum_outline(anatomy: Anatomy) -> np.ndarray:
    top_half, bottom_half, knob_y, bulge, sigma = anatomy.mediastinum
    y = np.linspace(-0.05, anatomy.heart[1], 64)
    half = top_half + (bottom_half - top_half) * (y - y[0]) / (y[-1] - y[0])
    knob = bulge * np.exp(-(((y - knob_y) / sigma) ** 2))
    right_edge = np.stack([anatomy.midline - half, y], 1)
    left_edge = np.stack([anatomy.midline + half + knob, y], 1)[::-1]
    return np.concatenate([right_edge, left_edge])


def aortic_knob_point(anatomy: Anatomy) -> tuple[float, float]:
    top_half, bottom_half, knob_y, bulge, _ = anatomy.mediastinum
    frac = (knob_y + 0.05) / (anatomy.heart[1] + 0.05)
    return anatomy.midline + top_half + (bottom_half - top_half) * frac + bulge, knob_y


def abdomen_outline(anatomy: Anatomy) -> np.ndarray:
    """Everything below both hemidiaphragms (liver, stomach), closed across the midline."""
    parts = []
    for side, sign in (("right", -1.0), ("left", 1.0)):
        lung = anatomy.lungs[side]
        off = np.linspace(lung.medial_off, lung.cp_off, 40)
        dome = np.stack([anatomy.midline + sign * off, _diaphragm_y(lung, off)], 1)
        wall = [[anatomy.midline + sign * (lung.cp_off + 0.3), lung.cp_y + 0.25]]
        parts.append(np.concatenate([dome, wall]) if sign > 0 else np.concatenate([wall, dome[::-1]]))
    floor = [[1.5, 1.5], [-0.5, 1.5]]
    return np.concatenate([parts[0], parts[1], floor])


def body_outline(anatomy: Anatomy) -> np.ndarray:
    """Neck, shoulders and chest wall; the arms leave the field at the top corners."""
    lungs = anatomy.lungs
    wall = 0.5 * (lungs["right"].lateral_off + lungs["left"].lateral_off) + anatomy.wall * anatomy.size
    half = np.array([[0.085, -0.1], [0.085, 0.02], [0.13, 0.05], [0.25, 0.075], [0.38, 0.095],
                     [0.46, 0.12], [0.52, 0.17], [0.56, 0.25], [0.62, 0.33], [wall + 0.03, 0.40],
                     [wall, 0.48], [wall + 0.01, 0.7], [wall + 0.03, 1.2]])
    right = np.stack([anatomy.midline - half[:, 0], half[:, 1]], 1)
    left = np.stack([anatomy.midline + half[::-1, 0], half[::-1, 1]], 1)
    return np.concatenate([right, left])


def band_outline(centre: np.ndarray, width: np.ndarray | float) -> np.ndarray:
    """Closed outline (2N, 2) of a band of `width` around the polyline `centre` (N, 2)."""
    tangent = np.gradient(centre, axis=0)
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], 1) / np.linalg.norm(tangent, axis=1, keepdims=True)
    offset = normal * (np.asarray(width).reshape(-1, 1) / 2)
    return np.concatenate([centre + offset, (centre - offset)[::-1]])


def rib_centrelines(anatomy: Anatomy, sign: float) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(posterior, anterior) centrelines per rib: posterior arcs from the spine, anterior ribs
    sloping down towards the sternum."""
    top, spacing, rise, drop, _ = anatomy.ribs
    lung = anatomy.lungs["right" if sign < 0 else "left"]
    t = np.linspace(0, 1, 32)[:, None]
    ribs = []
    for k in range(11):
        y0 = top + k * spacing
        reach = (lung.lateral_off + 0.02) * (0.5 + 0.5 * min(1.0, (k + 1) / 4)) * (0.8 if k > 8 else 1.0)
        posterior = np.concatenate([anatomy.midline + sign * (0.035 + t * reach),
                                    y0 - rise * np.sin(np.pi * t * 0.85) + drop * t**2], 1)
        end = posterior[-1]
        # Anterior ends fade into costal cartilage (invisible) well before the sternum.
        anterior = np.concatenate([end[0] - sign * t * (reach - 0.13),
                                   end[1] + 0.015 + 0.13 * np.sin(0.5 * np.pi * t)], 1)
        ribs.append((posterior, anterior if k < 7 else None))
    return ribs


def clavicle_centreline(anatomy: Anatomy, side: str) -> np.ndarray:
    """From just medial of the head (t < 0, so the head landmark is inside the bone) to the shoulder."""
    head_y, head_off, rise, lateral = anatomy.clavicles[side]
    t = np.linspace(-0.04, 1, 34)[:, None]
    x = anatomy.midline + SIDES[side] * (head_off + t * (lateral - head_off))
    return np.concatenate([x, head_y - rise * t + 0.012 * anatomy.size * np.sin(2 * np.pi * t)], 1)


def canonical_landmarks(anatomy: Anatomy) -> dict[str, tuple[float, float]]:
    """Landmark points in unit coordinates, taken from the same shapes that are drawn."""
    points: dict[str, tuple[float, float]] = {}
    for side, sign in SIDES.items():
        lung = anatomy.lungs[side]
        head_y, head_off, _, _ = anatomy.clavicles[side]
        points[f"clavicle_head_{side}"] = (anatomy.midline + sign * head_off, head_y)
        points[f"lung_apex_{side}"] = (anatomy.midline + sign * lung.apex_off, lung.apex_y)
        points[f"hilum_{side}"] = anatomy.hila[side]
        points[f"hemidiaphragm_dome_{side}"] = (anatomy.midline + sign * lung.dome_off, lung.dome_y)
        points[f"costophrenic_angle_{side}"] = (anatomy.midline + sign * lung.cp_off, lung.cp_y)
    heart = heart_outline(anatomy.heart)
    points["heart_border_right"] = tuple(heart[heart[:, 0].argmin()])
    points["heart_border_left"] = tuple(heart[heart[:, 0].argmax()])
    points["aortic_knob"] = aortic_knob_point(anatomy)
    points["carina"] = (anatomy.trachea[0], anatomy.trachea[1])
    return {name: (float(points[name][0]), float(points[name][1])) for name in LANDMARK_NAMES}


# ---------------------------------------------------------------------------------------------
# Rasterising (canonical frame, pixels of the output size)


def _fill(outline: np.ndarray, size: int) -> np.ndarray:
    """Boolean mask of the pixels whose centres lie inside `outline` (unit coordinates)."""
    canvas = Image.new("1", (size, size))
    # PIL puts pixel centres at integer coordinates; ours sit at i + 0.5.
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in (outline * size - 0.5).tolist()], fill=1)
    return np.asarray(canvas)


def _add_fill(canvas: np.ndarray, outline: np.ndarray, value: float) -> None:
    """canvas[inside outline] += value, rasterised only over the outline's bounding box."""
    size = canvas.shape[0]
    pixels = outline * size - 0.5
    low = np.clip(np.floor(pixels.min(axis=0)).astype(int) - 1, 0, size)
    high = np.clip(np.ceil(pixels.max(axis=0)).astype(int) + 2, 0, size)
    if np.any(high <= low):
        return
    patch = Image.new("1", (int(high[0] - low[0]), int(high[1] - low[1])))
    ImageDraw.Draw(patch).polygon([tuple(p) for p in (pixels - low).tolist()], fill=1)
    canvas[low[1]:high[1], low[0]:high[0]] += value * np.asarray(patch)


def _add_bone(canvas: np.ndarray, centre: np.ndarray, width: np.ndarray | float, value: float) -> None:
    """A band that is denser at its edges (cortex) than in its middle (marrow)."""
    _add_fill(canvas, band_outline(centre, width), value)
    _add_fill(canvas, band_outline(centre, np.asarray(width) * 0.55), -0.45 * value)


def anatomy_masks(anatomy: Anatomy, size: int) -> dict[str, np.ndarray]:
    abdomen = _fill(abdomen_outline(anatomy), size)
    mediastinum = _fill(mediastinum_outline(anatomy), size)
    heart = _fill(heart_outline(anatomy.heart), size) & ~abdomen
    masks = {"body": _fill(body_outline(anatomy), size), "abdomen": abdomen,
             "mediastinum": mediastinum, "heart": heart}
    for side, sign in SIDES.items():
        lung = _fill(lung_outline(anatomy.lungs[side], anatomy.midline, sign), size)
        masks[f"lung_{side}"] = lung & ~mediastinum & ~heart & ~abdomen
        masks[f"clavicle_{side}"] = _fill(band_outline(clavicle_centreline(anatomy, side), 0.026), size)
    return masks


def canonical_density(anatomy: Anatomy, size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Projected attenuation (size, size) float32 of the upright, centred subject, and its masks."""
    masks = anatomy_masks(anatomy, size)
    d = anatomy.densities
    unit = (np.arange(size, dtype=np.float32) + 0.5) / size
    # An elliptical cross-section: thick in the middle, thin at the chest wall.
    across = np.clip(1 - ((unit[None, :] - anatomy.midline) / 0.56) ** 2, 0, 1)
    thickness = d.soft * (0.45 + 0.65 * np.sqrt(across))
    lungs = _lung_air(masks, size) * (1 - pleural_fluid(anatomy, unit))
    density = masks["body"] * thickness
    density += d.mediastinum * (masks["mediastinum"] | masks["heart"]) + d.heart * masks["heart"]
    density += (d.liver * masks["abdomen"] - _gas_bubble(anatomy, unit)) * masks["body"]
    # Soft tissue in front of the lung bases (breasts, diaphragm slopes) lightens them.
    base_fade = 1 - 0.3 * np.clip((unit[:, None] - anatomy.hila["right"][1]) / 0.3, 0, 1)
    density -= thickness * d.lung_air * lungs * base_fade
    density -= 0.22 * thickness * _airways(anatomy, size)
    density += masks["body"] * _skeleton(anatomy, size) + _nodules(anatomy.nodules, unit)
    # One blur for every sharp edge drawn so far (anti-aliasing, ~0.7 px at 512).
    density = ndimage.gaussian_filter(density.astype(np.float32), 0.7 * size / 512)
    density += _lung_markings(anatomy, lungs > 0.3, unit, size)
    return density, masks


def _lung_air(masks: dict[str, np.ndarray], size: int) -> np.ndarray:
    """Air column of the lungs: full in the middle, thinner towards the pleura."""
    lungs = masks["lung_right"] | masks["lung_left"]
    depth = np.clip(ndimage.distance_transform_edt(lungs) / (0.05 * size), 0, 1)
    return lungs * (0.6 + 0.4 * depth)


def _gas_bubble(anatomy: Anatomy, unit: np.ndarray) -> np.ndarray:
    lung = anatomy.lungs["left"]
    cx, cy = anatomy.midline + 0.8 * lung.dome_off, lung.dome_y + 0.06 * anatomy.size
    bubble = ((unit[None, :] - cx) / 0.05) ** 2 + ((unit[:, None] - cy) / 0.028) ** 2
    return anatomy.densities.gas * np.clip(1 - bubble, 0, 1) ** 0.3


def _lung_markings(anatomy: Anatomy, lungs: np.ndarray, unit: np.ndarray, size: int) -> np.ndarray:
    """Vessels fanning from the hila, a faint parenchymal texture, and the hilar shadows."""
    d = anatomy.densities
    canvas = 0.08 * np.random.default_rng(anatomy.texture_seed).standard_normal((size, size), np.float32)
    for vessels in anatomy.vessels.values():
        for centre, start_width, end_width in vessels:
            _add_vessel(canvas, centre, start_width, end_width)
    # Clipped so that the trunks crowding into the hilum do not add up to a bright star.
    canvas = ndimage.gaussian_filter(np.minimum(canvas, 1.3), size / 512)
    hila = sum(np.exp(-(((unit[:, None] - hy) / 0.045) ** 2)) * np.exp(-(((unit[None, :] - hx) / 0.03) ** 2))
               for hx, hy in anatomy.hila.values())
    return d.vessel * lungs * canvas + d.hilum * hila


def _add_vessel(canvas: np.ndarray, centre: np.ndarray, start_width: float, end_width: float) -> None:
    """Attenuation grows with the vessel's diameter; below ~2 px it is drawn as a line."""
    size = canvas.shape[0]
    value = 1.2 * start_width / 0.01
    if end_width * size >= 2:
        _add_fill(canvas, band_outline(centre, np.linspace(start_width, end_width, len(centre))), value)
        return
    _add_polyline(canvas, centre, value)


def _add_polyline(canvas: np.ndarray, centre: np.ndarray, value: float) -> None:
    """An anti-aliased line about one pixel wide through the points (K, 2) in unit coordinates."""
    size = canvas.shape[0]
    for start, end in zip(centre[:-1] * size - 0.5, centre[1:] * size - 0.5, strict=True):
        rows, cols, weight = draw.line_aa(*np.round([start[1], start[0], end[1], end[0]]).astype(int))
        keep = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)
        canvas[rows[keep], cols[keep]] += weight[keep] * value


def _airways(anatomy: Anatomy, size: int) -> np.ndarray:
    x, carina_y, width = anatomy.trachea
    air = np.zeros((size, size), dtype=np.float32)
    _add_fill(air, band_outline(np.linspace([x, -0.05], [x, carina_y], 16), width), 1.0)
    for hilum in anatomy.hila.values():
        bronchus = np.linspace([x, carina_y], hilum, 16)
        _add_fill(air, band_outline(bronchus, np.linspace(0.6, 0.4, 16) * width), 1.0)
    return np.minimum(air, 1.0)


def _skeleton(anatomy: Anatomy, size: int) -> np.ndarray:
    d, width = anatomy.densities, anatomy.ribs[4]
    bones = np.zeros((size, size), dtype=np.float32)
    _add_spine(bones, anatomy)
    for sign in SIDES.values():
        for posterior, anterior in rib_centrelines(anatomy, sign):
            _add_bone(bones, posterior, width, d.rib)
            if anterior is not None:
                _add_bone(bones, anterior, 1.3 * width, 0.6 * d.rib)
    for side in SIDES:
        centre = clavicle_centreline(anatomy, side)
        _add_bone(bones, centre, np.linspace(0.03, 0.022, len(centre)), d.clavicle)
    return bones


def _add_spine(canvas: np.ndarray, anatomy: Anatomy) -> None:
    """Vertebral column: a faint band, vertebral bodies with disc spaces, paired pedicles."""
    width, spacing, phase = anatomy.spine
    value = anatomy.densities.spine
    box = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    oval = np.stack([np.cos(np.linspace(0, 2 * np.pi, 12)), np.sin(np.linspace(0, 2 * np.pi, 12))], 1)
    _add_fill(canvas, box * [width, 1.2] + [anatomy.midline, 0.5], 0.4 * value)
    for level in np.arange(-1, int(1 / spacing) + 2):
        centre_y = (level + phase) * spacing
        _add_fill(canvas, box * [width, 0.78 * spacing] + [anatomy.midline, centre_y], 0.25 * value)
        for sign in (-1, 1):
            pedicle = [anatomy.midline + sign * 0.3 * width, centre_y - 0.15 * spacing]
            _add_fill(canvas, oval * [0.11 * width, 0.2 * spacing] + pedicle, 0.4 * value)


# ---------------------------------------------------------------------------------------------
# Pose and exposure


def warp(canonical: np.ndarray, pose: Pose, order: int = 1) -> np.ndarray:
    """Resample a canonical-frame array into the image through `pose` (same size)."""
    size = canonical.shape[0]
    inverse = np.linalg.inv(pose.matrix(size))
    swap = np.array([[0, 1], [1, 0]])  # (x, y) <-> (row, col)
    matrix, shift = swap @ inverse[:2, :2] @ swap, swap @ inverse[:2, 2]
    # Pixel centres sit at index + 0.5 in continuous coordinates on both sides.
    offset = matrix @ [0.5, 0.5] + shift - 0.5
    return ndimage.affine_transform(canonical, matrix, offset=offset, order=order, mode="nearest")


def expose(
    density: np.ndarray, window: tuple[float, float], acquisition: Acquisition, config: PhantomConfig,
    rng: np.random.Generator, scatter_base: float = 0.0,
) -> np.ndarray:
    """Transmission plus scatter, with quantum noise -> log -> window and gamma -> detector blur -> integers.

    scatter_base: mean primary transmission of the field (taken from the canonical frame, so that
    the pose never changes grey levels).
    """
    size = density.shape[0]
    gain = 1 + acquisition.heel * ((np.arange(size) + 0.5) / size - 0.5)
    transmission = gain[None, :] * np.exp(-acquisition.mu * density)
    # Scatter is nearly uniform: it lowers the contrast of dense regions (mediastinum, abdomen).
    transmission += acquisition.scatter * scatter_base
    if config.noise:
        quanta = rng.poisson(acquisition.photons * transmission).clip(0.5, None)
        transmission = quanta / acquisition.photons
    measured = -np.log(transmission) / acquisition.mu
    low, high = window[0] + acquisition.window[0], window[1] + acquisition.window[1]
    value = np.clip((measured - low) / (high - low), 0, 1) ** acquisition.gamma
    value = ndimage.gaussian_filter(value, acquisition.blur * size / 512)
    top = 2**config.bit_depth - 1
    return np.round(value * top).astype(np.uint8 if config.bit_depth == 8 else np.uint16)


def _expose_view(
    density: np.ndarray, pose: Pose, extras: ViewExtras, window: tuple[float, float],
    acquisition: Acquisition, config: PhantomConfig, rng: np.random.Generator, scatter_base: float,
) -> np.ndarray:
    """A hard view: devices come after the window was set (metal may saturate); the blades either
    block the beam (white, still noisy) or are blacked out on the display afterwards."""
    projected = warp(density, pose) + device_density(extras, pose, config.size)
    shutter = collimator_mask(extras.blades, config.size)
    if not extras.dark_shutter:
        projected += 3.0 * shutter  # lead: the primary beam is gone, scatter still arrives
    image = expose(projected, window, acquisition, config, rng, scatter_base)
    if extras.dark_shutter:
        image = np.round(image * (1 - shutter)).astype(image.dtype)
    return image


def render_phantom(
    anatomy: Anatomy, pose: Pose, acquisition: Acquisition, config: PhantomConfig,
    rng: np.random.Generator, with_masks: bool = False, extras: ViewExtras | None = None,
) -> Phantom:
    size = config.size
    density, masks = canonical_density(anatomy, size)
    # The window comes from the canonical frame so that the pose never changes grey levels.
    low, high = np.percentile(density[::2, ::2], [1.0, 99.5])
    window = (low, high + 0.15 * (high - low))
    scatter_base = float(np.exp(-acquisition.mu * density[::4, ::4]).mean())
    if extras is None:
        image = expose(warp(density, pose), window, acquisition, config, rng, scatter_base)
    else:
        image = _expose_view(density, pose, extras, window, acquisition, config, rng, scatter_base)
    landmarks = image_landmarks(anatomy, pose, size)
    if not with_masks:
        return Phantom(image=image, landmarks=landmarks)
    image_masks = {name: warp(mask.astype(np.uint8), pose, order=0) > 0 for name, mask in masks.items()}
    return Phantom(image=image, landmarks=landmarks, masks=image_masks)


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
        raise ValueError(f"need n >= 1, views >= 1 and start_id >= 0 (got n={n}, views={views}, "
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
