"""Shapes of a phantom subject in unit coordinates (x right, y down, [0, 1] spans the image):
outlines of lungs, heart, mediastinum, abdomen and body, bone centrelines, and the landmarks,
which are points of the same outlines that are drawn."""

from __future__ import annotations

import numpy as np

from training.phantom_types import LANDMARK_NAMES, SIDES, Anatomy, LungShape, Pose


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


def image_landmarks(anatomy: Anatomy, pose: Pose, size: int) -> dict[str, tuple[float, float]]:
    """Landmarks in image pixels: the canonical points moved by the pose matrix of the pixels."""
    canonical = canonical_landmarks(anatomy)
    moved = pose.apply(np.array(list(canonical.values())) * size, size)
    return {name: (float(x), float(y)) for name, (x, y) in zip(canonical, moved, strict=True)}


def edge_coordinates(edge: int, x: np.ndarray, y: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(distance inwards from the image edge, position along it from its middle)."""
    return [(x, y - size / 2), (y, x - size / 2), (size - x, y - size / 2), (size - y, x - size / 2)][edge]
