"""The pixel <-> patch-grid coordinate mapping shared by training and service, on decoded images.

Decoding lives in ace_model.decode (re-exported here, so `from ace_model.preprocess import
decode_image` keeps working): every image becomes float32 (H, W, 3) in [0, 1], possibly reduced
while decoding, with `width` / `height` always the original image's size. For the encoder an image
is letterboxed: resized to fit `size x size` with its aspect ratio kept, then centred on a zero
canvas. `CoordinateMap` records that transform in original pixels, so coordinates move exactly
between original pixels, model pixels and the grid whatever resolution the pixels were decoded at.

Coordinates are continuous (x right, y down): pixel column i spans [i, i + 1). Grid coordinates
put patch (r, c)'s centre at (x=c, y=r).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ace_model.config import PIXEL_MEAN, PIXEL_STD
from ace_model.decode import (
    DEFAULT_MAX_PIXELS,
    DecodedImage,
    ImageDecodeError,
    ImageHeader,
    decode_image,
    grey_to_rgb,
    inflated_bytes,
    load_image,
    peek_image,
    reduction_factor,
)
from ace_model.decode_memory import decode_memory_bytes

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DICOM_SUFFIXES",
    "IMAGE_SUFFIXES",
    "THUMBNAIL_QUALITY",
    "THUMBNAIL_SIDE",
    "CoordinateMap",
    "DecodedImage",
    "ImageDecodeError",
    "ImageHeader",
    "decode_image",
    "decode_memory_bytes",
    "decode_side",
    "grey_to_rgb",
    "inflated_bytes",
    "is_grey",
    "letterbox_tensor",
    "load_image",
    "peek_image",
    "prepare",
    "reduction_factor",
    "thumbnail_jpeg",
    "to_pil",
]

THUMBNAIL_SIDE = 512  # longest side of the viewer's previews of indexed images
THUMBNAIL_QUALITY = 90
LOOK_HEADROOM = 4  # the largest second look (ACE_MAX_LOOK) is 4x the encoder's input
DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", *DICOM_SUFFIXES)


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
    """(H, W, 3) [0,1] -> (3, size, size) normalised model input, content centred. The content
    size comes from the original size; the pixels (reduced while decoding or not) are resized to it."""
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
    """Model input (3, size, size) and the coordinate map (in original pixels) for one decoded image."""
    mapping = CoordinateMap.letterbox(image.width, image.height, size, grid)
    return letterbox_tensor(image, size), mapping


def to_pil(image: DecodedImage) -> Image.Image:
    """8-bit PIL image for display of the pixels it has (reduced ones stay reduced): mode L for grey
    images (one channel encoded), else RGB."""
    grey = is_grey(image.pixels)
    pixels = image.pixels[:, :, 0] if grey else image.pixels
    return Image.fromarray(np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8), "L" if grey else "RGB")


def decode_side(img_size: int) -> int:
    """The longest side an image is decoded at before it becomes the input of an img_size encoder
    (decode_image reduces by an integer factor while decoding, never below it). The index and the
    service's /match and /heatmap decode at this side, so an image embeds alike whichever of them it
    goes through; it leaves room for the 4x second look and the 512 px thumbnail. (`ace eval` warps
    full-size images in memory and does not decode through it.)"""
    return max(LOOK_HEADROOM * img_size, THUMBNAIL_SIDE)


def thumbnail_jpeg(image: DecodedImage, max_side: int = THUMBNAIL_SIDE) -> bytes:
    """A JPEG preview no larger than max_side (grey images stay one channel).

    JPEG, not PNG: encoding a 512 px PNG cost as much CPU as the vit_tiny forward pass of the same
    image in an index build; at quality 90 a preview looks the same and encodes ~10x faster."""
    picture = to_pil(image)
    picture.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)
    return buffer.getvalue()
