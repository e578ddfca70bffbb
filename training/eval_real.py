"""Real medical images under known warps, a protocol of `ace eval`.

Images: every DICOM that the installed pydicom test files and pydicom-data ship which holds a real
acquisition, at least 64 x 64 px, decodable here (one image per acquisition: other encodings and
crops of the same image are left out; of a multi-frame file the first frame is used), and
scikit-image's retina fundus photograph. `real_images` lists what it skipped and why.

Warps: each image is warped by a known forward map F (output px -> source px, pixel centres at
i + 0.5) and resampled with scipy.ndimage.map_coordinates: W(q) = I(F(q)). "affine": F is an
affine map (rotation +-10 deg, scale 0.9-1.1, shear +-0.05 rad about the centre, shift +-5 %);
"elastic": a milder affine plus a smooth random displacement field (a few low-frequency sinusoids,
at most ~4 % of the shorter side). The points are chosen on a grid in the warped image and mapped
back through F, so every truth is exact and no inversion is needed; points on blank background
(no texture around them in the original) are left out.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

import numpy as np
from scipy.ndimage import map_coordinates
from skimage.feature import match_template
from tqdm import tqdm

from ace_model.preprocess import DecodedImage, ImageDecodeError, decode_image, grey_to_rgb, is_grey
from training.eval_methods import EncoderMethod, Method, fit_timed, grey_pixels
from training.evaluate import calibration, image_diagonal, pair_timing, radial_errors, summarize

KINDS = ("affine", "elastic")
MIN_SIDE = 64
ACQUISITIONS = {"CR", "DX", "CT", "MR", "US", "NM", "PT", "MG", "XA", "RF", "OP", "ES", "XC", "IO", "PX",
                "OCT", "SM", "DG", "RG"}  # DICOM modalities that are image acquisitions
ENCODING_FAMILY = re.compile(r"^(?P<stem>.+)_(?P<code>J2KI|J2KR|UNCI|UNCR)\.dcm$")  # pydicom-data's sets
ELASTIC_AMPLITUDE = 0.03  # per-axis sum of the field's mode amplitudes, a share of the shorter side
ELASTIC_MODES = 3


# ---------------------------------------------------------------------------------------------
# Images


@dataclass(frozen=True)
class RealImage:
    name: str  # file name
    image: DecodedImage
    source: str  # pydicom | pydicom-data | scikit-image
    modality: str
    note: str = ""  # e.g. "first of 10 frames"


def dicom_files() -> list[tuple[Path, str]]:
    """(path, package) of every file pydicom's test data and pydicom-data ship, sorted by name."""
    from pydicom.data import get_testdata_files

    files = {Path(p) for p in get_testdata_files()}
    try:
        import data_store  # pydicom-data's package

        files |= set((Path(data_store.__file__).parent / "data").glob("*.dcm"))
    except ImportError:
        pass
    return sorted(((p, "pydicom-data" if "data_store" in p.parts else "pydicom") for p in files
                   if p.is_file()), key=lambda f: (f[0].name, f[1]))


def first_frame(path: Path) -> tuple[DecodedImage, int]:
    """Decode a DICOM through the service's decoder; a multi-frame one as its first frame alone."""
    import pydicom
    from pydicom.pixels import pixel_array

    data = path.read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames == 1:
        return decode_image(data), 1
    frame = pixel_array(ds, index=0)  # colour comes back as RGB
    photometric = "RGB" if frame.ndim == 3 else str(ds.PhotometricInterpretation)
    ds.set_pixel_data(frame, photometric, 8 if frame.ndim == 3 else int(ds.BitsStored))
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return decode_image(out.getvalue()), frames


def header_reason(ds: Any, name: str, kept_families: set[str]) -> str | None:
    """Why a DICOM is skipped before decoding, or None."""
    modality = str(ds.get("Modality", "") or "none")
    if modality not in ACQUISITIONS:
        return f"modality {modality}: not an image acquisition (a test pattern, mask, dose grid ...)"
    if min(int(ds.Rows), int(ds.Columns)) < MIN_SIDE:
        return f"smaller than {MIN_SIDE} px ({ds.Columns}x{ds.Rows})"
    family = ENCODING_FAMILY.match(name)
    if family and family["code"] != "UNCR" and family["stem"] in kept_families:
        return f"another encoding of {family['stem']}_UNCR.dcm"
    return None


def thumbnail(image: DecodedImage, step: int) -> np.ndarray:
    return grey_pixels(image)[::step, ::step]


def duplicate_of(image: DecodedImage, kept: Sequence[RealImage]) -> str | None:
    """The name of a kept image that this one repeats (the same pixels, or a crop of them)."""
    for other in kept:
        a, b = image, other.image
        if a.width != b.width and a.height != b.height:
            continue
        step = max(1, min(a.width, a.height, b.width, b.height) // 128)
        small, big = sorted((thumbnail(a, step), thumbnail(b, step)), key=lambda t: t.size)
        small = small[: big.shape[0], : big.shape[1]]
        if small.std() > 0 and float(match_template(big, small).max()) > 0.98:
            return other.name
    return None


def looks_synthetic(image: DecodedImage) -> str | None:
    grey = grey_pixels(image)
    levels = len(np.unique(np.round(grey * 255)))
    if levels < 32 or grey.std() < 0.02:
        return f"looks synthetic or blank ({levels} grey levels, std {grey.std():.3f})"
    return None


def real_images() -> tuple[list[RealImage], list[dict[str, str]]]:
    """The real images (see the module docstring) and the skipped files with pixel data, with why."""
    from skimage.data import retina

    files = dicom_files()
    families = {m["stem"] for p, _ in files if (m := ENCODING_FAMILY.match(p.name)) and m["code"] == "UNCR"}
    kept: list[RealImage] = []
    skipped: list[dict[str, str]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's test files are full of deliberate oddities
        for path, package in files:
            select(path, package, families, kept, skipped)
    fundus = DecodedImage(np.ascontiguousarray(retina(), dtype=np.uint8), "png")
    kept.append(RealImage("retina (fundus)", fundus, "scikit-image", "OP", "colour photograph"))
    return kept, skipped


def select(path: Path, package: str, families: set[str], kept: list[RealImage],
           skipped: list[dict[str, str]]) -> None:
    """Add one file to `kept` or, if it holds an image, to `skipped` with the reason."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # not DICOM at all (README, JSON, ...)
        return
    if "Rows" not in ds or "Columns" not in ds:
        return  # no image in it (DICOMDIR, SR, RT plan, ...)
    reason = header_reason(ds, path.name, families)
    image, frames = None, 1
    if reason is None:
        try:
            image, frames = first_frame(path)
        except (ImageDecodeError, ValueError, NotImplementedError, RuntimeError) as err:
            reason = f"cannot be decoded here: {str(err).splitlines()[0][:120]}"
    if image is not None and reason is None:
        reason = looks_synthetic(image) or (f"the same image as {dup}" if (dup := duplicate_of(image, kept))
                                            else None)
    if reason is not None or image is None:
        skipped.append({"name": path.name, "source": package, "reason": reason or "?"})
        return
    note = f"first of {frames} frames" if frames > 1 else ""
    kept.append(RealImage(path.name, image, package, str(ds.Modality), note))


# ---------------------------------------------------------------------------------------------
# Warps


@dataclass(frozen=True)
class Warp:
    """Forward map of a warped copy: output px -> source px = affine(q) + field(q)."""

    matrix: np.ndarray  # (3, 3) homogeneous affine, output px -> source px
    modes: np.ndarray  # (K, 5): amplitude x, amplitude y (px), cycles across x, across y, phase
    size: tuple[int, int]  # (width, height) of the images

    def source_of(self, xy: np.ndarray) -> np.ndarray:
        xy = np.asarray(xy, float)
        out = xy @ self.matrix[:2, :2].T + self.matrix[:2, 2]
        if len(self.modes):
            width, height = self.size
            ax, ay, fx, fy, phase = self.modes.T
            angle = 2 * np.pi * (xy[..., :1] * fx / width + xy[..., 1:] * fy / height) + phase
            wave = np.sin(angle)
            out[..., 0] += wave @ ax
            out[..., 1] += wave @ ay
        return out


def affine_matrix(width: int, height: int, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """Output -> source inverse of a forward affine: rotation +-10 deg, scale 0.9-1.1, shear +-0.05
    rad about the centre and a shift of +-5 % (all times `strength`)."""
    rotation = np.deg2rad(rng.uniform(-10, 10) * strength)
    scale = 1 + rng.uniform(-0.1, 0.1) * strength
    shear = rng.uniform(-0.05, 0.05) * strength
    shift = rng.uniform(-0.05, 0.05, size=2) * strength * [width, height]
    linear = scale * np.array([[np.cos(rotation), -np.sin(rotation + shear)],
                               [np.sin(rotation), np.cos(rotation + shear)]])
    centre = np.array([width, height]) / 2
    forward = np.eye(3)
    forward[:2, :2] = linear
    forward[:2, 2] = centre + shift - linear @ centre
    return np.linalg.inv(forward)


def random_warp(width: int, height: int, kind: str, rng: np.random.Generator) -> Warp:
    if kind == "affine":
        return Warp(affine_matrix(width, height, rng), np.zeros((0, 5)), (width, height))
    if kind != "elastic":
        raise ValueError(f"unknown warp kind {kind!r}; choose one of {KINDS}")
    matrix = affine_matrix(width, height, rng, strength=0.5)
    share = rng.dirichlet(np.ones(ELASTIC_MODES), size=2).T  # (K, 2): the amplitude split per axis
    amplitude = share * ELASTIC_AMPLITUDE * min(width, height) * rng.choice([-1, 1], size=share.shape)
    cycles = rng.uniform(-1.5, 1.5, size=(ELASTIC_MODES, 2))
    phase = rng.uniform(0, 2 * np.pi, size=(ELASTIC_MODES, 1))
    return Warp(matrix, np.hstack([amplitude, cycles, phase]), (width, height))


def warp_image(image: DecodedImage, warp: Warp) -> DecodedImage:
    """W(q) = I(F(q)) at every output pixel centre, bilinear, black outside the source."""
    grey = is_grey(image.pixels)
    ys, xs = np.mgrid[0 : image.height, 0 : image.width].astype(np.float64) + 0.5
    source = warp.source_of(np.stack([xs, ys], axis=-1))
    where = [source[..., 1] - 0.5, source[..., 0] - 0.5]  # map_coordinates: pixel centres at i
    channels = [image.pixels[:, :, 0]] if grey else [image.pixels[:, :, c] for c in range(3)]
    out = [np.rint(map_coordinates(np.asarray(c, np.float32), where, order=1, mode="constant", cval=0.0))
           .clip(0, 255).astype(np.uint8) for c in channels]  # decoded images are uint8
    pixels = grey_to_rgb(out[0]) if grey else np.stack(out, axis=-1)
    return DecodedImage(pixels, image.format)


def point_grid(width: int, height: int, per_side: int, margin: float = 0.15) -> np.ndarray:
    """(per_side^2, 2) evenly spaced points inside the central part of an image."""
    xs = np.linspace(margin * width, (1 - margin) * width, per_side)
    ys = np.linspace(margin * height, (1 - margin) * height, per_side)
    return np.stack(np.meshgrid(xs, ys), axis=-1).reshape(-1, 2)


@dataclass(frozen=True)
class WarpCase:
    name: str
    kind: str  # affine | elastic
    original: DecodedImage
    warped: DecodedImage
    points: np.ndarray  # (N, 2) original px in `original` (the queries)
    truth: np.ndarray  # (N, 2) where they are in `warped`


def has_content(grey: np.ndarray, points: np.ndarray, min_std: float = 0.02) -> np.ndarray:
    """(N,) bool: the square of 1/16 of the longer side around each point is not flat (a point on
    blank background or letterbox black has no answer any method could find)."""
    radius = max(2, max(grey.shape) // 32)
    cols, rows = np.clip(points.astype(int), 0, [grey.shape[1] - 1, grey.shape[0] - 1]).T
    return np.array([grey[max(0, r - radius) : r + radius + 1, max(0, c - radius) : c + radius + 1].std()
                     > min_std for c, r in zip(cols, rows, strict=True)], dtype=bool)


def warp_case(name: str, image: DecodedImage, kind: str, rng: np.random.Generator,
              per_side: int = 6) -> WarpCase:
    """One random warp; grid points of the warped image whose source lies in the central 90 % of
    the original, on image content."""
    warp = random_warp(image.width, image.height, kind, rng)
    truth = point_grid(image.width, image.height, per_side)
    points = warp.source_of(truth)
    size = np.array([image.width, image.height])
    inside = ((points >= 0.05 * size) & (points <= 0.95 * size)).all(1)
    inside[inside] = has_content(grey_pixels(image), points[inside])
    return WarpCase(name, kind, image, warp_image(image, warp), points[inside], truth[inside])


def cases(images: Sequence[RealImage], per_kind: int, seed: int) -> Iterator[WarpCase]:
    """Warps made one at a time (a warped 2k x 2k copy is large)."""
    rng = np.random.default_rng(seed)
    for real in images:
        for kind in KINDS:
            for _ in range(per_kind):
                yield warp_case(real.name, real.image, kind, rng)


# ---------------------------------------------------------------------------------------------
# The protocol


@dataclass
class Tally:
    """One method's results: errors (% diag and px), confidences, and its time."""

    errors: dict[tuple[str, str], list[np.ndarray]]
    confidence: list[np.ndarray]
    pct: list[np.ndarray]
    fit_seconds: float = 0.0
    locate_seconds: float = 0.0
    n_cases: int = 0


def run_case(method: Method, case: WarpCase, tally: Tally) -> None:
    tally.fit_seconds += fit_timed(method, [case.original, case.warped])
    start = perf_counter()
    found = method.find(0, 1, case.points) if isinstance(method, EncoderMethod) else None
    predicted = found.xy if found is not None else method.locate(0, 1, case.points)
    tally.locate_seconds += perf_counter() - start
    tally.n_cases += 1
    error = radial_errors(predicted, case.truth)
    tally.errors.setdefault((case.name, case.kind), []).append(error)
    if found is not None:
        tally.confidence.append(found.confidence)
        tally.pct.append(100 * error / image_diagonal(case.warped.width, case.warped.height))


def summarize_tally(tally: Tally, diagonals: dict[str, float]) -> dict[str, Any]:
    def summary(keys: Sequence[tuple[str, str]]) -> dict[str, float]:
        flat = [np.concatenate(tally.errors[key]) for key in keys]
        diags = [np.full(f.size, diagonals[key[0]]) for key, f in zip(keys, flat, strict=True)]
        return summarize(np.concatenate(flat), np.concatenate(diags))

    keys = list(tally.errors)
    out: dict[str, Any] = {
        "overall": summary(keys),
        "per_kind": {kind: summary([k for k in keys if k[1] == kind]) for kind in KINDS
                     if any(k[1] == kind for k in keys)},
        "per_image": {name: {kind: summary([(name, kind)]) for n, kind in keys if n == name}
                      for name in dict.fromkeys(n for n, _ in keys)},
        "timing": pair_timing(tally.fit_seconds, 2 * tally.n_cases, tally.locate_seconds, tally.n_cases),
    }
    if tally.confidence:
        out["calibration"] = calibration(np.concatenate(tally.confidence), np.concatenate(tally.pct))
    return out


def real_evaluation(methods: Sequence[Method], per_kind: int, seed: int,
                    images: Sequence[RealImage] | None = None) -> dict[str, Any]:
    """Every method on every image under `per_kind` affine and elastic warps."""
    skipped: list[dict[str, str]] = []
    if images is None:
        images, skipped = real_images()
    tallies = {m.name: Tally({}, [], []) for m in methods}
    total = len(images) * len(KINDS) * per_kind
    for case in tqdm(cases(images, per_kind, seed), total=total, desc="real-image warps", unit="warp"):
        for method in methods:
            run_case(method, case, tallies[method.name])
    diagonals = {r.name: image_diagonal(r.image.width, r.image.height) for r in images}
    return {
        "images": [{"name": r.name, "source": r.source, "modality": r.modality,
                    "size": [r.image.width, r.image.height], "note": r.note} for r in images],
        "skipped": skipped, "warps_per_kind": per_kind,
        "methods": {name: summarize_tally(t, diagonals) for name, t in tallies.items()},
    }
