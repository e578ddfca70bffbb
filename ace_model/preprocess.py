"""Image decoding and the pixel <-> patch-grid coordinate mapping, shared by training and service.

Every image becomes float32 (H, W, 3) in [0, 1]: 8-bit data / 255, 16-bit PNG and DICOM
min-max scaled over their actual range (after the DICOM modality and VOI LUTs, MONOCHROME1
inverted), grey repeated to 3 channels. For the encoder an image is letterboxed: resized to fit
`size x size` with its aspect ratio kept, then centred on a zero canvas. `CoordinateMap` records
that transform, so coordinates move exactly between original pixels, model pixels and the grid.

Coordinates are continuous (x right, y down): pixel column i spans [i, i + 1). Grid coordinates
put patch (r, c)'s centre at (x=c, y=r).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from pydicom.errors import InvalidDicomError
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

from ace_model.config import PIXEL_MEAN, PIXEL_STD

THUMBNAIL_SIDE = 512  # longest side of the viewer's previews of indexed images
THUMBNAIL_QUALITY = 90
DEFAULT_MAX_PIXELS = 64_000_000  # refuse decompression bombs beyond 8k x 8k
DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", *DICOM_SUFFIXES)


class ImageDecodeError(ValueError):
    """Input that is not a usable image.

    kind: unsupported | corrupt | multiframe | too_large (the service maps it to a status code).
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # (H, W, 3) float32 in [0, 1]; grey: read-only view, channel stride 0
    format: str  # png | jpeg | dicom | ...
    patient_id: str | None = None  # DICOM PatientID when present

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


def _is_dicom(data: bytes) -> bool:
    return len(data) > 132 and data[128:132] == b"DICM"


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode PNG / JPEG / 16-bit PNG / TIFF / DICOM bytes into a DecodedImage."""
    if not data:
        raise ImageDecodeError("unsupported", "the file is empty")
    image = _decode_dicom(data, max_pixels) if _is_dicom(data) else _decode_pil(data, max_pixels)
    _check_finite(image.pixels)
    return image


def _check_finite(pixels: np.ndarray) -> None:
    """NaN or infinite values (float TIFF, bad rescale) would make every similarity NaN."""
    values = pixels[:, :, 0] if pixels.strides[2] == 0 else pixels
    if not bool(np.isfinite(values).all()):
        raise ImageDecodeError("corrupt", "the image holds NaN or infinite pixel values")


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    return decode_image(Path(path).read_bytes(), max_pixels)


def _check_size(height: int, width: int, max_pixels: int) -> None:
    if height * width > max_pixels:
        raise ImageDecodeError(
            "too_large", f"image is {width}x{height} pixels; the limit is {max_pixels} pixels"
        )
    if height < 2 or width < 2:
        raise ImageDecodeError("corrupt", f"image is {width}x{height} pixels; need at least 2x2")


def _decode_pil(data: bytes, max_pixels: int) -> DecodedImage:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_size(image.height, image.width, max_pixels)
            image.load()
    except UnidentifiedImageError as err:
        raise ImageDecodeError("unsupported", "not a PNG, JPEG, TIFF, BMP or DICOM image") from err
    except Image.DecompressionBombError as err:  # raised on opening, before our size check
        message = f"image too large ({err}); the limit is {max_pixels} pixels"
        raise ImageDecodeError("too_large", message) from err
    except (OSError, SyntaxError, ValueError) as err:
        if isinstance(err, ImageDecodeError):
            raise
        raise ImageDecodeError("corrupt", f"the image file is corrupt or truncated: {err}") from err
    if getattr(image, "n_frames", 1) > 1:
        raise ImageDecodeError("multiframe", "multi-frame images are not supported; send one frame")
    return DecodedImage(_pil_to_float(image), (image.format or "unknown").lower())


def _pil_to_float(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return grey_to_rgb(_minmax(np.asarray(image, dtype=np.float32)))
    if image.mode in ("L", "LA", "P", "1"):
        return grey_to_rgb(_bytes_to_float(image if image.mode == "L" else image.convert("L")))
    return _bytes_to_float(image.convert("RGB"))


def _bytes_to_float(image: Image.Image) -> np.ndarray:
    values = np.asarray(image, dtype=np.float32)  # a new array: scaled in place
    values *= np.float32(1 / 255)
    return values


def _minmax(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros_like(values, dtype=np.float32)
    return ((values - low) / (high - low)).astype(np.float32)


def grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    """(H, W) -> (H, W, 3) read-only view of the one channel (channel stride 0), not a 3x copy.
    Code that needs a writable array (skimage's Cython, in-place ops) copies the channel it uses."""
    grey = grey.astype(np.float32, copy=False)
    return np.broadcast_to(grey[:, :, None], (*grey.shape, 3))


def _decode_dicom(data: bytes, max_pixels: int) -> DecodedImage:
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, OSError, ValueError, EOFError) as err:
        raise ImageDecodeError("corrupt", f"the DICOM file is corrupt or truncated: {err}") from err
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise ImageDecodeError(
            "multiframe", f"multi-frame DICOM ({ds.NumberOfFrames} frames) is not supported"
        )
    if "PixelData" not in ds or "Rows" not in ds or "Columns" not in ds:
        raise ImageDecodeError("corrupt", "the DICOM file has no pixel data (or no Rows/Columns)")
    _check_size(int(ds.Rows), int(ds.Columns), max_pixels)
    _check_decoder(ds)
    pixels = _dicom_pixels(ds)
    patient = str(ds.get("PatientID", "") or "") or None
    return DecodedImage(pixels, "dicom", patient)


def _check_decoder(ds: pydicom.Dataset) -> None:
    """A compressed transfer syntax whose codec is not installed is unsupported, not corrupt."""
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if uid is None or not uid.is_compressed:
        return
    try:
        decoder = get_decoder(uid)
    except NotImplementedError as err:
        raise ImageDecodeError("unsupported", f"DICOM transfer syntax {uid.name} cannot be decoded") from err
    if not decoder.is_available:
        raise ImageDecodeError(
            "unsupported",
            f"DICOM transfer syntax {uid.name} needs a decoder that is not installed: "
            f"{'; '.join(decoder.missing_dependencies)}. Re-export the image uncompressed or as PNG.",
        )


def _dicom_pixels(ds: pydicom.Dataset) -> np.ndarray:
    try:
        raw = ds.pixel_array
    except Exception as err:  # pydicom raises many types for bad/unsupported pixel data
        raise ImageDecodeError("corrupt", f"cannot decode the DICOM pixel data: {err}") from err
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if raw.ndim == 3:  # colour (e.g. RGB fundus), samples last
        return _minmax(raw.astype(np.float32)) if raw.dtype != np.uint8 else raw / np.float32(255)
    grey = _dicom_grey(apply_modality_lut(raw, ds), ds)
    if photometric == "MONOCHROME1":  # high values are dark: invert to the usual display
        grey = 1.0 - grey
    return grey_to_rgb(grey)


def _dicom_grey(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Apply the VOI window or LUT and scale its output range to [0, 1].

    Scaling by the VOI output range (not the image's own min/max) keeps the window's meaning:
    values below it are black, above it white. Without a usable VOI the actual range is used.
    """
    if "VOILUTSequence" not in ds and not ("WindowCenter" in ds and "WindowWidth" in ds):
        return _minmax(values.astype(np.float32))
    try:
        windowed = apply_voi_lut(values, ds).astype(np.float64)
        # The VOI output range: what the transform gives far below and far above any input.
        low, high = sorted(apply_voi_lut(np.array([-(2**31), 2**31 - 1], dtype=np.int64), ds).tolist())
    except (ValueError, TypeError, IndexError, AttributeError):  # malformed VOI attributes
        return _minmax(values.astype(np.float32))
    if high <= low:
        return _minmax(windowed.astype(np.float32))
    return np.clip((windowed - low) / (high - low), 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class CoordinateMap:
    """Letterbox transform of one image: original pixels <-> model pixels <-> patch grid."""

    orig_w: int  # original width in pixels
    orig_h: int  # original height in pixels
    size: int  # model input side in pixels
    grid: int  # tokens per side of the encoder output
    scale_x: float  # model pixels per original pixel along x
    scale_y: float  # model pixels per original pixel along y
    pad_x: float  # left padding in model pixels
    pad_y: float  # top padding in model pixels

    @classmethod
    def letterbox(cls, width: int, height: int, size: int, grid: int) -> CoordinateMap:
        new_w, new_h = _fit(width, height, size)
        return cls(
            width, height, size, grid, new_w / width, new_h / height,
            float((size - new_w) // 2), float((size - new_h) // 2),
        )

    @property
    def stride(self) -> float:
        return self.size / self.grid

    @property
    def content_size(self) -> tuple[int, int]:
        return round(self.orig_w * self.scale_x), round(self.orig_h * self.scale_y)

    def to_model(self, xy: np.ndarray) -> np.ndarray:
        xy = np.asarray(xy, dtype=np.float64)
        return np.stack([xy[..., 0] * self.scale_x + self.pad_x,
                         xy[..., 1] * self.scale_y + self.pad_y], axis=-1)

    def to_original(self, model_xy: np.ndarray) -> np.ndarray:
        m = np.asarray(model_xy, dtype=np.float64)
        return np.stack([(m[..., 0] - self.pad_x) / self.scale_x,
                         (m[..., 1] - self.pad_y) / self.scale_y], axis=-1)

    def to_grid(self, xy: np.ndarray) -> np.ndarray:
        """Original pixels -> continuous grid coordinates (patch centres at integers)."""
        return self.to_model(xy) / self.stride - 0.5

    def from_grid(self, grid_xy: np.ndarray) -> np.ndarray:
        return self.to_original((np.asarray(grid_xy, dtype=np.float64) + 0.5) * self.stride)

    def patch_of(self, xy: np.ndarray) -> np.ndarray:
        """(..., 2) original pixels -> (..., 2) integer (row, col) of the covering patch."""
        m = np.floor(self.to_model(xy) / self.stride).astype(np.int64)
        m = np.clip(m, 0, self.grid - 1)
        return np.stack([m[..., 1], m[..., 0]], axis=-1)

    def contains(self, xy: np.ndarray) -> np.ndarray:
        xy = np.asarray(xy, dtype=np.float64)
        inside_x = (xy[..., 0] >= 0) & (xy[..., 0] <= self.orig_w)
        return inside_x & (xy[..., 1] >= 0) & (xy[..., 1] <= self.orig_h)

    def patch_centres(self) -> np.ndarray:
        """(grid*grid, 2) original-pixel (x, y) of every patch centre, row-major."""
        rows, cols = np.divmod(np.arange(self.grid * self.grid), self.grid)
        return self.from_grid(np.stack([cols, rows], axis=-1))

    def valid_patches(self) -> np.ndarray:
        """(grid*grid,) bool: patch centre lies on image content, not on letterbox padding."""
        return self.contains(self.patch_centres())

    def content_box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) model px covered by the image (the rest is letterbox padding)."""
        width, height = self.content_size
        return self.pad_x, self.pad_y, self.pad_x + width, self.pad_y + height

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _fit(width: int, height: int, size: int) -> tuple[int, int]:
    scale = size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def letterbox_tensor(image: DecodedImage, size: int) -> torch.Tensor:
    """(H, W, 3) [0,1] -> (3, size, size) normalised model input, content centred."""
    new_w, new_h = _fit(image.width, image.height, size)
    channels = image.pixels[:, :, :1] if is_grey(image.pixels) else image.pixels  # grey: resize once
    writable = np.require(channels, np.float32, ["C_CONTIGUOUS", "WRITEABLE"])  # torch wants writable
    pixels = torch.from_numpy(writable).permute(2, 0, 1)[None]  # (1, C, H, W)
    resized = F.interpolate(pixels, size=(new_h, new_w), mode="bilinear",
                            align_corners=False, antialias=True)[0]
    canvas = torch.zeros(3, size, size)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[:, top : top + new_h, left : left + new_w] = resized.clamp(0, 1)  # (1|3, h, w) -> 3
    return (canvas - PIXEL_MEAN) / PIXEL_STD


def is_grey(pixels: np.ndarray) -> bool:
    """(H, W, 3) pixels whose channels are equal (decoded grey images: checked by the stride)."""
    if pixels.strides[2] == 0:  # decoded grey: one channel seen 3 times
        return True
    return bool(np.array_equal(pixels[:, :, 0], pixels[:, :, 1])
                and np.array_equal(pixels[:, :, 0], pixels[:, :, 2]))


def prepare(image: DecodedImage, size: int, grid: int) -> tuple[torch.Tensor, CoordinateMap]:
    """Model input (3, size, size) and the coordinate map for one decoded image."""
    mapping = CoordinateMap.letterbox(image.width, image.height, size, grid)
    return letterbox_tensor(image, size), mapping


def to_pil(image: DecodedImage) -> Image.Image:
    """8-bit PIL image for display: mode L for grey images (one channel encoded), else RGB."""
    grey = is_grey(image.pixels)
    pixels = image.pixels[:, :, 0] if grey else image.pixels
    return Image.fromarray(np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8), "L" if grey else "RGB")


def thumbnail_jpeg(image: DecodedImage, max_side: int = THUMBNAIL_SIDE) -> bytes:
    """A JPEG preview no larger than max_side (grey images stay one channel).

    JPEG, not PNG: encoding a 512 px PNG cost as much CPU as the vit_tiny forward pass of the same
    image in an index build; at quality 90 a preview looks the same and encodes ~10x faster."""
    picture = to_pil(image)
    picture.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)
    return buffer.getvalue()
