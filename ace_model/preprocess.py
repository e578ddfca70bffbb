"""The pixel <-> patch-grid coordinate mapping shared by training and service, on decoded images.

Decoding lives in ace_model.decode (re-exported here, so `from ace_model.preprocess import
decode_image` keeps working): every image becomes uint8 (H, W, 3), possibly reduced while decoding,
with `width` / `height` always the original image's size. For the encoder an image is letterboxed:
resized to fit `size x size` with its aspect ratio kept, then centred on a zero canvas, still uint8;
`normalise` turns a batch of those into the encoder's float input. `CoordinateMap` records that
transform in original pixels, so coordinates move exactly between original pixels, model pixels and
the grid whatever resolution the pixels were decoded at.

Coordinates are continuous (x right, y down): pixel column i spans [i, i + 1). Grid coordinates put
patch (r, c)'s centre at (x=c, y=r).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
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
    "encoder_view",
    "grey_to_rgb",
    "inflated_bytes",
    "is_grey",
    "letterbox_tensor",
    "load_image",
    "normalise",
    "peek_image",
    "prepare",
    "reduction_factor",
    "thumbnail_jpeg",
    "to_pil",
]

THUMBNAIL_SIDE = 512  # longest side of the viewer's previews of indexed images
THUMBNAIL_QUALITY = 90
# Pillow box-reduces by an integer factor first while that leaves 2x to resample: 3x cheaper for the
# 224 px input of a 1411 px image, within 3 grey levels (mean 0.2) of the plain antialiased resize
REDUCING_GAP = 2.0
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
    """(H, W, 3) uint8 -> (3, size, size) uint8 model input, content centred on black; `normalise`
    makes it the encoder's float input (the inference worker does, batched, on its device). The
    content size comes from the original size; the pixels (reduced while decoding or not) are
    resized to it by Pillow's antialiased bilinear filter on 8 bits, several times cheaper than
    resizing floats."""
    new_w, new_h = _fit(image.width, image.height, size)
    grey = is_grey(image.pixels)
    pixels = np.ascontiguousarray(image.pixels[:, :, 0] if grey else image.pixels)  # grey: one channel
    resized = np.asarray(Image.fromarray(pixels).resize((new_w, new_h), Image.Resampling.BILINEAR,
                                                        reducing_gap=REDUCING_GAP))
    canvas = np.zeros((size, size) if grey else (size, size, 3), np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = resized
    tensor = torch.from_numpy(canvas)
    return tensor.expand(3, size, size) if grey else tensor.permute(2, 0, 1)  # views: stacking copies


MEAN_OF_CHANNELS = (1 / 3, 1 / 3, 1 / 3, 0)  # Pillow's RGB -> L matrix: what the dense encoder averages


def encoder_view(image: DecodedImage, img_size: int, reads_grey: bool) -> DecodedImage:
    """What every model input of the image (the base size and each look) is made from: for an
    encoder that `reads_grey`, a colour image as the mean of its channels (resizing one channel
    costs a third of three); then fitted within decode_side(img_size), so no input is resized from
    more than that side (the integer reduction of decoding leaves up to twice it). The index and
    the service make every input from this view of the image decoded at decode_side, so an image
    embeds alike through either; `ace eval` from the view of the full-size image, within a few grey
    levels of it (no integer reduction first). Coordinates are unaffected: `width`, `height` stay
    the original's."""
    height, width = image.pixels.shape[:2]
    side = decode_side(img_size)
    averaged = reads_grey and not is_grey(image.pixels)
    if not averaged and max(width, height) <= side:
        return image
    picture = to_pil(image)  # one copy, then Pillow all the way
    if averaged:
        picture = picture.convert("L", matrix=MEAN_OF_CHANNELS)
    if max(width, height) > side:
        new_w, new_h = _fit(width, height, side)
        picture = picture.resize((max(2, new_w), max(2, new_h)), Image.Resampling.BILINEAR,
                                 reducing_gap=REDUCING_GAP)
    pixels = np.asarray(picture)
    return replace(image, pixels=grey_to_rgb(pixels) if pixels.ndim == 2 else pixels,
                   original_size=(image.width, image.height))


def normalise(images: torch.Tensor, mean: float = PIXEL_MEAN, std: float = PIXEL_STD) -> torch.Tensor:
    """(B, 3, S, S) uint8 letterboxed pixels -> float32 encoder input, (pixels / 255 - mean) / std."""
    if images.dtype != torch.uint8:
        raise TypeError(f"model inputs are uint8 letterboxed pixels (letterbox_tensor), got {images.dtype}")
    return images.float().mul_(1 / (255 * std)).sub_(mean / std)


def is_grey(pixels: np.ndarray) -> bool:
    """(H, W, 3) pixels whose channels are equal (decoded grey images: checked by the stride)."""
    if pixels.strides[2] == 0:  # decoded grey: one channel seen 3 times
        return True
    return bool(np.array_equal(pixels[:, :, 0], pixels[:, :, 1])
                and np.array_equal(pixels[:, :, 0], pixels[:, :, 2]))


def prepare(image: DecodedImage, size: int, grid: int) -> tuple[torch.Tensor, CoordinateMap]:
    """Model input (3, size, size) uint8 and the coordinate map (in original pixels) for one decoded
    image (for an encoder: its `encoder_view`)."""
    mapping = CoordinateMap.letterbox(image.width, image.height, size, grid)
    return letterbox_tensor(image, size), mapping


def to_pil(image: DecodedImage) -> Image.Image:
    """8-bit PIL image for display of the pixels it has (reduced ones stay reduced): mode L for grey
    images (one channel encoded), else RGB."""
    grey = is_grey(image.pixels)
    pixels = np.ascontiguousarray(image.pixels[:, :, 0] if grey else image.pixels)
    return Image.fromarray(pixels, "L" if grey else "RGB")


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
