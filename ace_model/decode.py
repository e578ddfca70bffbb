"""Image decoding that cannot crash: bytes -> DecodedImage, or ImageDecodeError (a kind the service
maps to a status code, and a message the sender can act on).

Every image becomes uint8 (H, W, 3): 8-bit data as stored; 16-bit, float and DICOM images min-max
scaled over their range (DICOM after its modality and VOI LUTs, MONOCHROME1 inverted) and rounded to
8 bits, grey as a read-only 3-channel view. 8 bits, because that is what a display shows, what
Pillow resizes fastest and the least a request carries to the inference worker (issue 15);
`DecodedImage.as_float()` gives [0, 1] floats where arithmetic needs them. `max_side` reduces while
decoding by an integer factor; `width` and `height` stay the original size. `peek_image` reads
headers only; `ace_model.decode_memory` bounds what decoding will need. Pillow, pydicom and their
codecs raise almost any exception type on crafted files, so both entry points catch `Exception` at
their boundary: a failure refuses the image.
"""

from __future__ import annotations

import contextlib
import io
import math
import operator
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageMode, UnidentifiedImageError
from pydicom.dataelem import RawDataElement
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut
from pydicom.pixels.utils import as_pixel_options
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, RLELossless

from ace_model.decode_arrays import (
    BAND_PIXELS,
    band_pixels,
    block_mean,
    finite_range,
    minmax_u8,
    rows_per_band,
    scale_u8,
    stored_values,
)
from ace_model.errors import ImageDecodeError

__all__ = ["BAND_PIXELS", "DecodedImage", "ImageDecodeError", "ImageHeader", "band_pixels", "decode_image",
           "grey_to_rgb", "inflated_bytes", "load_image", "peek_image", "reduction_factor"]

DEFAULT_MAX_PIXELS = 64_000_000  # refuse decompression bombs beyond 8k x 8k
PIL_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")  # Pillow's other plugins are attack surface we don't need
GREY_MODES = ("L", "LA", "P", "1")  # 8-bit, read as grey
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # min-max scaled
DEFER_BYTES = 4096  # dcmread leaves larger values unread (uncompressed pixel data is viewed in place)
LUT_BYTES = 48  # per pixel of a band: pydicom's LUTs and the window copy it (measured: up to 32)
PIXEL_DATA = Tag(0x7FE00010)
MAX_SAMPLE_BYTES = 12  # per pixel, the most a supported image holds (3 x 32 bits): the inflate bound


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # (h, w, 3) uint8; grey: read-only view, channel stride 0
    format: str  # png | jpeg | dicom | ...
    patient_id: str | None = None  # DICOM PatientID when present
    # (width, height) of the source when `pixels` were reduced while decoding; None: the pixels' size
    original_size: tuple[int, int] | None = None

    @property
    def width(self) -> int:  # the original image's: the frame users' coordinates refer to
        return self.original_size[0] if self.original_size else int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return self.original_size[1] if self.original_size else int(self.pixels.shape[0])

    def __post_init__(self) -> None:
        if self.pixels.dtype != np.uint8 or self.pixels.ndim != 3 or self.pixels.shape[2] != 3:
            raise TypeError(f"DecodedImage pixels are (h, w, 3) uint8, got {self.pixels.shape} "
                            f"{self.pixels.dtype}")

    def as_float(self) -> np.ndarray:
        """(h, w, 3) float32 in [0, 1] (grey stays a read-only view of one channel)."""
        grey = self.pixels.strides[2] == 0
        values = (self.pixels[:, :, 0] if grey else self.pixels).astype(np.float32)
        values *= np.float32(1 / 255)
        return grey_to_rgb(values) if grey else values

    @property
    def pixel_scale(self) -> tuple[float, float]:
        """(x, y) pixels of `pixels` per original pixel: 1.0 unless reduced while decoding."""
        return self.pixels.shape[1] / self.width, self.pixels.shape[0] / self.height


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, read without decoding its pixels (peek_image)."""

    format: str  # png | jpeg | tiff | bmp | dicom | ...
    width: int
    height: int
    channels: int  # samples per pixel as stored: 1 grey, 2 grey + alpha, 3 colour, 4 RGBA / CMYK
    bytes_per_sample: int  # of the decoded samples: 1 (8-bit), 2 (16-bit), 4 (32-bit int or float)
    mode: str  # Pillow's mode, or the DICOM PhotometricInterpretation
    codec_bytes: int = 0  # working memory of the format's decoder besides the image it decodes into
    lut_bytes: int = 0  # per pixel of one band of rows: the temporaries of the DICOM LUTs
    signed: bool = False  # DICOM PixelRepresentation 1: stored values are signed


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None
                 ) -> DecodedImage:
    """Decode PNG / JPEG / TIFF / BMP / DICOM bytes; with `max_side`, reduced by reduction_factor()."""
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be positive, got {max_side}")
    decode = _decode_dicom if _is_dicom(data) else _decode_pil
    with _refusing(data, max_pixels):
        return decode(data, max_pixels, max_side)


def peek_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """The header of an image, its pixels not decoded; refused with the kinds decode_image uses."""
    with _refusing(data, max_pixels):
        if _is_dicom(data):
            return _dicom_header(*_read_dicom(data, max_pixels, pixels=False), len(data), max_pixels)
        image, header = _open_pil(data, max_pixels)
        image.close()
        return header


def inflated_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """The size of a deflated DICOM's inflated dataset, measured without holding it (pydicom inflates
    it whole, even to read the header: peek_image needs about twice this); 0 for other files."""
    if not (_is_dicom(data) and DeflatedExplicitVRLittleEndian.encode() in data[:65536]):
        return 0
    with _refusing(data, max_pixels):
        return _check_inflated_size(data, max_pixels * MAX_SAMPLE_BYTES + (1 << 20))


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None
               ) -> DecodedImage:
    return decode_image(Path(path).read_bytes(), max_pixels, max_side)


def reduction_factor(width: int, height: int, max_side: int | None) -> int:
    """The integer factor decode_image reduces by: longer side // max_side (1: not reduced)."""
    return 1 if max_side is None else max(1, max(width, height) // max_side)


def grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    """(H, W) -> (H, W, 3) read-only view of the one channel (stride 0): copy a channel to write."""
    return np.broadcast_to(grey[:, :, None], (*grey.shape, 3))


def _is_dicom(data: bytes) -> bool:
    return len(data) > 132 and data[128:132] == b"DICM"


@contextlib.contextmanager
def _refusing(data: bytes, max_pixels: int) -> Iterator[None]:
    """Turn every failure of decoding into ImageDecodeError (see the module docstring)."""
    if not data:
        raise ImageDecodeError("unsupported", "the file is empty")
    try:
        yield
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as err:
        raise ImageDecodeError("unsupported", "not a PNG, JPEG, TIFF, BMP or DICOM image") from err
    except (Image.DecompressionBombError, MemoryError) as err:
        message = f"image too large to decode ({_quote(err)}); the limit is {max_pixels} pixels"
        raise ImageDecodeError("too_large", message) from err
    except Exception as err:  # deliberately broad: crafted files make decoders raise any type
        what = "DICOM file" if _is_dicom(data) else "image file"
        raise ImageDecodeError("corrupt", f"the {what} is corrupt or truncated ({_quote(err)}); "
                                          "re-export or re-send it") from err


def _quote(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:240].rstrip(": ")


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if height * width > max_pixels:
        raise ImageDecodeError("too_large", f"image is {width}x{height} pixels; the limit is {max_pixels}")
    if height < 2 or width < 2:
        raise ImageDecodeError("corrupt", f"image is {width}x{height} pixels; need at least 2x2")


def _check_pixels(pixels: np.ndarray) -> None:
    """The promise every returned image keeps: (H, W, 3) uint8, H, W >= 2."""
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8 or min(pixels.shape[:2]) < 2:
        raise ImageDecodeError("corrupt", f"the image decodes to an unusable {pixels.shape} array")


def _decoded(pixels: np.ndarray, image_format: str, width: int, height: int, patient: str | None = None
             ) -> DecodedImage:
    _check_pixels(pixels)
    original = None if pixels.shape[:2] == (height, width) else (width, height)
    return DecodedImage(pixels, image_format, patient, original)


def _open_pil(data: bytes, max_pixels: int) -> tuple[Image.Image, ImageHeader]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    _check_size(image.width, image.height, max_pixels)
    if getattr(image, "n_frames", 1) > 1:
        raise ImageDecodeError("multiframe", "multi-frame images are not supported; send one frame")
    channels, sample = len(image.getbands()), np.dtype(ImageMode.getmode(image.mode).typestr).itemsize
    # libjpeg keeps every DCT coefficient (int16) of a progressive JPEG; libtiff decodes a strip (up
    # to the whole image) before copying it
    progressive = image.format == "JPEG" and bool(image.info.get("progressive"))
    codec = image.width * image.height * channels * (2 if progressive else sample * (image.format == "TIFF"))
    name = (image.format or "?").lower()
    return image, ImageHeader(name, image.width, image.height, channels, sample, image.mode, codec)


def _decode_pil(data: bytes, max_pixels: int, max_side: int | None) -> DecodedImage:
    image, header = _open_pil(data, max_pixels)
    factor = reduction_factor(header.width, header.height, max_side)
    if factor > 1 and image.format == "JPEG":
        width, height = image.size
        drafted = image.draft(None, (-(-width // factor), -(-height // factor)))  # DCT-scaled decoding
        factor //= 1 if drafted is None else round(width / drafted[1][2])  # what is left for reduce()
    image.load()
    return _decoded(_pil_pixels(image, factor), header.format, header.width, header.height)


def _pil_pixels(image: Image.Image, factor: int) -> np.ndarray:
    if image.mode in WIDE_MODES:
        if factor == 1:
            return grey_to_rgb(minmax_u8(np.require(np.asarray(image, dtype=np.float32), requirements="W")))
        width = image.width
        values = block_mean(lambda top, bottom: np.asarray(image.crop((0, top, width, bottom))),
                             image.height, width, factor, np.dtype(np.float32))
        return grey_to_rgb(minmax_u8(values))
    grey = image.mode in GREY_MODES
    if image.mode != ("L" if grey else "RGB"):
        image = image.convert("L" if grey else "RGB")
    if factor > 1:
        image = image.reduce(factor)
    values = np.asarray(image)
    return grey_to_rgb(values) if grey else values


def _read_dicom(data: bytes, max_pixels: int, pixels: bool) -> tuple[pydicom.Dataset, int]:
    """The dataset and its inflated size (0 unless deflated)."""
    inflated = inflated_bytes(data, max_pixels)
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=not pixels, defer_size=DEFER_BYTES), inflated


def _check_inflated_size(data: bytes, limit: int) -> int:
    """pydicom inflates a deflated dataset whole, however large (a zip bomb): measure it first."""
    group, element, vr, _, meta_length = struct.unpack_from("<HH2sHI", data, 132)
    if (group, element, vr) != (2, 0, b"UL"):
        raise ImageDecodeError("corrupt", "the deflated DICOM file has no file meta group length")
    inflater, size = zlib.decompressobj(-zlib.MAX_WBITS), 0
    pending: bytes | memoryview = memoryview(data)[144 + meta_length :]
    with contextlib.suppress(zlib.error):  # not deflated after all: dcmread judges the file
        while pending and size <= limit and (chunk := inflater.decompress(pending, 1 << 20)):
            size, pending = size + len(chunk), inflater.unconsumed_tail
    if size > limit:
        raise ImageDecodeError("too_large", f"the deflated DICOM data inflates beyond {limit} bytes")
    return size


def _whole(ds: pydicom.Dataset, keyword: str, default: int) -> int:
    """A DICOM integer attribute (absent or empty: default); anything else is a corrupt file."""
    try:
        value = ds.get(keyword)  # pydicom converts lazily: a bad VR or value raises here
        return default if value is None or value == "" else operator.index(value)
    except Exception as err:
        raise ImageDecodeError("corrupt", f"DICOM {keyword} is not one whole number ({_quote(err)})") from err


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    """A DICOM text attribute; None when absent, empty, unreadable or not text (it only loses that)."""
    with contextlib.suppress(Exception):
        value = ds.get(keyword)
        return value if isinstance(value, str) and value else None
    return None


def _dicom_header(ds: pydicom.Dataset, inflated: int, encoded_bytes: int, max_pixels: int) -> ImageHeader:
    frames = _whole(ds, "NumberOfFrames", 1)
    if frames > 1:
        raise ImageDecodeError("multiframe", f"multi-frame DICOM ({frames} frames) is not supported")
    if "Rows" not in ds or "Columns" not in ds:
        raise ImageDecodeError("corrupt", "the DICOM file has no Rows or Columns (truncated or no image)")
    rows, columns = _whole(ds, "Rows", 0), _whole(ds, "Columns", 0)
    _check_size(columns, rows, max_pixels)
    samples, bits = _whole(ds, "SamplesPerPixel", 1), _whole(ds, "BitsAllocated", 16)
    if samples not in (1, 3) or bits not in (1, 8, 16, 32, 64):
        raise ImageDecodeError("unsupported", f"DICOM with {samples} samples of {bits} bits per pixel is "
                                              "not supported; re-export it as 8 or 16-bit grey or RGB")
    uid, sample = _transfer_syntax(ds), max(1, bits // 8)
    raw = rows * columns * samples * sample
    copies = 0 if _viewable(ds, uid) else raw + encoded_bytes  # pydicom's array and its copy of the data
    if uid == RLELossless:
        copies += 65 * encoded_bytes  # its segment decoder expands a segment before checking its size
    elif copies:
        copies += 4 * raw  # the codec's image and bytes, colour conversion or bit unpacking temporaries
    if uid == DeflatedExplicitVRLittleEndian:
        copies += 2 * inflated + raw  # the whole inflated dataset, and pydicom's copy of it
    if not uid.is_little_endian:
        copies += raw  # the stored values in native byte order (viewed big-endian data is converted)
    luts = any(k in ds for k in ("RescaleSlope", "ModalityLUTSequence", "WindowCenter", "VOILUTSequence"))
    photometric = _text(ds, "PhotometricInterpretation") or "MONOCHROME2"
    signed = _whole(ds, "PixelRepresentation", 0) == 1
    return ImageHeader("dicom", columns, rows, samples, sample, photometric, copies, LUT_BYTES if luts else 8,
                       signed)


def _transfer_syntax(ds: pydicom.Dataset) -> UID:
    """A syntax that is not one, or whose codec is not installed, is unsupported, not corrupt."""
    uid, known = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None, False
    with contextlib.suppress(ValueError):  # pydicom cannot tell the type of private UIDs
        known = isinstance(uid, UID) and uid.is_transfer_syntax
    if not isinstance(uid, UID) or not known:
        raise ImageDecodeError("unsupported", f"DICOM transfer syntax {str(uid)[:64]!r} is not one we "
                                              "decode; re-export the image uncompressed or as PNG")
    decoder = get_decoder(uid)  # every transfer syntax pydicom knows has one
    if not decoder.is_available:
        raise ImageDecodeError(
            "unsupported", f"DICOM transfer syntax {uid.name} needs a decoder that is not installed: "
            f"{'; '.join(decoder.missing_dependencies)}. Re-export the image uncompressed or as PNG.")
    return uid


def _viewable(ds: pydicom.Dataset, uid: UID) -> bool:
    """Whether pydicom can give the pixel data as a view of the file's bytes: uncompressed, whole
    bytes per sample, no colour conversion, not byte-swapped 8-bit big endian."""
    bits = _whole(ds, "BitsAllocated", 16)
    ybr = (_text(ds, "PhotometricInterpretation") or "").startswith("YBR")
    return (get_decoder(uid).is_native and uid != DeflatedExplicitVRLittleEndian and bits % 8 == 0
            and (uid.is_little_endian or bits > 8) and not ybr)


def _decode_dicom(data: bytes, max_pixels: int, max_side: int | None) -> DecodedImage:
    ds, inflated = _read_dicom(data, max_pixels, pixels=True)
    header = _dicom_header(ds, inflated, len(data), max_pixels)
    raw, unused = _dicom_raw(ds, data, header)
    factor = reduction_factor(header.width, header.height, max_side)
    if factor > 1:  # before the LUTs: they are meant for stored values, and cost least on few pixels
        rows = lambda top, bottom: stored_values(raw[top:bottom], unused)  # noqa: E731
        raw, unused = block_mean(rows, header.height, header.width, factor, raw.dtype), 0
    pixels = _dicom_u8(raw, unused, ds, header.mode)
    return _decoded(pixels, "dicom", header.width, header.height, _text(ds, "PatientID"))


def _dicom_raw(ds: pydicom.Dataset, data: bytes, header: ImageHeader) -> tuple[np.ndarray, int]:
    """The stored values, (rows, columns[, 3]), and how many unused high bits they still hold.
    Uncompressed pixel data is a read-only view of `data` whose unused bits are cleared one band
    at a time later (pydicom would copy the whole image to do it); the rest goes through pydicom."""
    uid, element = _transfer_syntax(ds), ds.get_item(PIXEL_DATA, keep_deferred=True)
    if element is None:
        raise ImageDecodeError("corrupt", "the DICOM file has no pixel data")
    if isinstance(element, RawDataElement) and element.value is None and _viewable(ds, uid):
        start, end = element.value_tell, element.value_tell + element.length  # deferred: never read
        options = as_pixel_options(ds, pixel_keyword="PixelData", view_only=True, pixel_vr=element.VR,
                                   correct_unused_bits=False)
        raw, _ = get_decoder(uid).as_array(memoryview(data)[start:end], **options)
        unused = max(0, int(options["bits_allocated"]) - int(options["bits_stored"]))
    else:
        raw, unused = ds.pixel_array, 0
    expected = (header.height, header.width) + ((3,) if header.channels == 3 else ())
    if raw.shape != expected:
        raise ImageDecodeError("corrupt", f"the DICOM pixel data decodes to {raw.shape}, not {expected}")
    return raw, unused


def _dicom_u8(raw: np.ndarray, unused: int, ds: pydicom.Dataset, photometric: str) -> np.ndarray:
    if raw.ndim == 3:  # colour (e.g. RGB fundus), samples last; planar data made pixel-interleaved
        if raw.dtype != np.uint8:
            return minmax_u8(stored_values(raw, unused).astype(np.float32, order="C"))
        return raw  # as stored (planar data: a strided view), copied only by whoever needs it so
    small = raw.dtype.kind in "iu" and raw.dtype.itemsize <= 2
    grey = _grey_by_table(raw, unused, ds) if small else _grey_in_bands(raw, unused, ds)
    if photometric == "MONOCHROME1":  # high values are dark: invert to the usual display
        np.subtract(255, grey, out=grey)
    return grey_to_rgb(grey)


def _grey_by_table(raw: np.ndarray, unused: int, ds: pydicom.Dataset) -> np.ndarray:
    """8 or 16-bit stored values through a table of every value they can hold (the LUTs run on
    at most 65,536 values, not on every pixel): the same result as _grey_in_bands, several times
    faster. Keys are the raw bit patterns, unused high bits included."""
    keys_dtype = np.dtype(f"u{raw.dtype.itemsize}")
    native = raw.dtype.newbyteorder("=")  # big-endian files are viewed as stored: keys are by value
    domain = stored_values(np.arange(1 << (8 * raw.dtype.itemsize), dtype=keys_dtype).view(native), unused)
    values, windowed = _grey_values(lambda lut: lut(domain), ds)
    keys = raw.astype(keys_dtype, copy=False)  # signed values wrap to their bit pattern, as in domain
    # windowed: [0, 1]; else the range of the values the image holds, as min-max scaling would see it
    low, high = (0.0, 1.0) if windowed else finite_range(values[_present(keys, len(values))])
    table = scale_u8(values, low, high)
    return table[keys]  # indexing by the small keys directly: np.take would copy them to intp


def _present(keys: np.ndarray, size: int) -> np.ndarray:
    """(size,) bool: which keys occur. Counted a band of rows at a time, since bincount copies what
    it counts to intp (8 bytes per pixel)."""
    rows = rows_per_band(keys.shape[1])
    counts = np.zeros(size, np.int64)
    for top in range(0, keys.shape[0], rows):
        counts += np.bincount(keys[top : top + rows].ravel(), minlength=size)
    return counts > 0


def _grey_in_bands(raw: np.ndarray, unused: int, ds: pydicom.Dataset) -> np.ndarray:
    """Wider stored values (32-bit, float), band by band: pydicom's LUTs make several float64
    copies of what they are given."""
    rows = rows_per_band(raw.shape[1])

    def in_bands(lut: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        out = np.empty(raw.shape, np.float32)
        for top in range(0, raw.shape[0], rows):
            out[top : top + rows] = lut(stored_values(raw[top : top + rows], unused))
        return out

    values, windowed = _grey_values(in_bands, ds)
    return scale_u8(values, 0.0, 1.0) if windowed else minmax_u8(values)


Lut = Callable[[np.ndarray], np.ndarray]  # stored values -> float32 values


def _grey_values(apply: Callable[[Lut], np.ndarray], ds: pydicom.Dataset) -> tuple[np.ndarray, bool]:
    """apply(lut) with the modality LUT, then the VOI window or LUT with its output range scaled to
    [0, 1] (keeps the window's meaning: below it black, above it white) -> (values, True); without a
    usable VOI, or when it fails on this data, the modality values (False) for min-max scaling."""
    voi = _voi_range(ds)
    if voi is not None and voi[1] > voi[0]:
        low, high = voi
        with contextlib.suppress(Exception):  # malformed VOI data: as without a VOI
            return apply(lambda stored: _windowed(stored, ds, low, high)), True
    return apply(lambda stored: apply_modality_lut(stored, ds).astype(np.float32)), False


def _voi_range(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """What the VOI gives far below and far above any input; None without a usable VOI."""
    if "VOILUTSequence" not in ds and not ("WindowCenter" in ds and "WindowWidth" in ds):
        return None
    with contextlib.suppress(Exception):  # malformed VOI attributes: no VOI
        low, high = sorted(apply_voi_lut(np.array([-(2**31), 2**31 - 1], dtype=np.int64), ds).tolist())
        return (low, high) if math.isfinite(low) and math.isfinite(high) else None
    return None


def _windowed(band: np.ndarray, ds: pydicom.Dataset, low: float, high: float) -> np.ndarray:
    windowed = apply_voi_lut(apply_modality_lut(band, ds), ds).astype(np.float64)
    return np.clip((windowed - low) / (high - low), 0.0, 1.0).astype(np.float32)
