"""Rendering a phantom view: the subject rasterised into a projected density map in its canonical
frame (soft tissue, air in the lungs, mediastinum, heart, bones, vessels), warped into the image
by the view's Pose, and exposed by the Acquisition: Beer-Lambert transmission, Poisson quantum
noise, log transform, window, gamma, detector blur."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage import draw

from training.phantom_shapes import (
    abdomen_outline,
    band_outline,
    body_outline,
    clavicle_centreline,
    edge_coordinates,
    heart_outline,
    image_landmarks,
    lung_outline,
    mediastinum_outline,
    rib_centrelines,
)
from training.phantom_types import (
    SIDES,
    Acquisition,
    Anatomy,
    Blade,
    Nodule,
    Phantom,
    PhantomConfig,
    Pose,
    ViewExtras,
)

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
# Devices and collimation of a hard view (image frame)


def collimator_mask(blades: tuple[Blade, ...], size: int) -> np.ndarray:
    """Fraction of each image pixel behind a blade (a one-pixel penumbra)."""
    centres = np.arange(size) + 0.5
    covered = np.zeros((size, size))
    for edge, depth, slope in blades:
        inward, along = edge_coordinates(edge, centres[None, :], centres[:, None], size)
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
