"""Drawing a phantom subject and its views from random streams: anatomy, pose and acquisition;
for the hard difficulty also habitus and findings per subject (stream 4) and devices and
collimation per view (stream 5). Habitus and findings change the Anatomy itself, so the
landmarks follow them."""

from __future__ import annotations

from dataclasses import replace
from math import comb

import numpy as np
from skimage.measure import points_in_poly

from training.phantom_shapes import (
    abdomen_outline,
    canonical_landmarks,
    edge_coordinates,
    heart_outline,
    image_landmarks,
    lung_outline,
    mediastinum_outline,
)
from training.phantom_types import (
    SIDES,
    Acquisition,
    Anatomy,
    Blade,
    Densities,
    Effusion,
    LungShape,
    Nodule,
    PhantomConfig,
    Pose,
    Vessel,
    ViewExtras,
    Wire,
)


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
# Hard difficulty


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
        inward, along = edge_coordinates(edge, points[:, 0], points[:, 1], size)
        room = float(np.min(inward - slope * along)) - 0.02 * size
        if present and room > 2:
            blades.append((edge, min(depth, room), slope))
    return tuple(blades)
