"""The phantom generator's data: the landmark names, the config, and the dataclasses of a subject
(Anatomy in a canonical frame of unit coordinates), a view (Pose, Acquisition, ViewExtras) and a
rendered Phantom. Numpy only, so `ace data --help` can show the config's choices."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ace_model.errors import InputError

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
            raise InputError(f"phantom size must be at least 64 pixels, got {self.size}")
        if self.bit_depth not in (8, 16):
            raise InputError(f"bit_depth must be 8 or 16, got {self.bit_depth}")
        if self.difficulty not in DIFFICULTIES:
            raise InputError(f"difficulty must be one of {', '.join(DIFFICULTIES)}, got {self.difficulty!r}")


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
