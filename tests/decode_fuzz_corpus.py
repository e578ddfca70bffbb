"""A seeded corpus of damaged images for the decoder fuzz tests (tests/test_decode_fuzz.py and
tests/service/test_decode_http_fuzz.py).

Bases: the DICOM files pydicom ships in its test data that decode today (small ones only, so the run
stays fast), generated PNG / JPEG / TIFF / BMP / DICOM images and the skimage fundus. Each case takes
one base and applies 1-3 mutations: bit flips, truncation, random byte-range overwrites, insertions,
deletions and, for DICOM, element edits through pydicom (garbage or wrongly typed values, changed
VRs, deleted elements, bad transfer syntaxes, broken LUTs).

`fuzz_case(i)` is a pure function of i (seeded by SEED and i), so a failure that names its index
can be rebuilt with `fuzz_case(i)` and its `mutations` say what was done, in order.
"""

from __future__ import annotations

import functools
import io
import os
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_files
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

SEED = 1301  # issue 13
MAX_PIXELS = 1 << 19  # fuzz decodes use a small limit: headers that lie about the size are refused fast
MAX_BASE_PIXELS = 320_000  # pydicom test files larger than this are left out (slow codecs)
MAX_BASE_BYTES = 160_000

# Elements the decoder reads, by tag, with their usual VR.
DICOM_TARGETS: dict[str, tuple[int, str]] = {
    "SamplesPerPixel": (0x00280002, "US"), "PhotometricInterpretation": (0x00280004, "CS"),
    "PlanarConfiguration": (0x00280006, "US"), "NumberOfFrames": (0x00280008, "IS"),
    "Rows": (0x00280010, "US"), "Columns": (0x00280011, "US"), "BitsAllocated": (0x00280100, "US"),
    "BitsStored": (0x00280101, "US"), "HighBit": (0x00280102, "US"),
    "PixelRepresentation": (0x00280103, "US"), "WindowCenter": (0x00281050, "DS"),
    "WindowWidth": (0x00281051, "DS"), "RescaleIntercept": (0x00281052, "DS"),
    "RescaleSlope": (0x00281053, "DS"), "VOILUTFunction": (0x00281056, "CS"),
    "PatientID": (0x00100020, "LO"), "PixelData": (0x7FE00010, "OW"),
}
GARBAGE = (b"abc ", b"", b"0 ", b"-1", b"1e308 ", b"nan ", b"inf ", b"-inf", b"65535 ", b"\x00\xff",
           b"1\\2\\3 ", b"9" * 64, b"\xff\xff\xff", b"MONOCHROME3 ", b"1.2.3.4 ", b"\x00" * 8, b"-0 ",
           b"PALETTE COLOR ", b"YBR_FULL", b"RGB ", b"MONOCHROME1 ", b"\x01\x00", b"\x00\x80", b"1.5 ")
VRS = ("AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD", "OF", "OL",
       "OW", "OV", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US",
       "UT", "UV", "ZZ", "\x00\x00")
# A computed-radiography-like grey DICOM: 12 of 16 bits stored, MONOCHROME1, rescaled and windowed.
CR_ELEMENTS = {"PhotometricInterpretation": "MONOCHROME1", "BitsStored": 12, "HighBit": 11,
               "RescaleSlope": 1.5, "RescaleIntercept": -100, "WindowCenter": 2000, "WindowWidth": 3000}
TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5",
    "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "abc", "", "1.2.840.10008.1.2.4.201",
)


@dataclass(frozen=True)
class FuzzCase:
    index: int
    base: str  # the corpus file it was made from
    mutations: tuple[str, ...]  # what was done to it, in order
    data: bytes

    def describe(self) -> str:
        steps = "; ".join(self.mutations)
        return f"case {self.index} ({self.base}: {steps}); rebuild with fuzz_case({self.index})"


def fuzz_case(index: int) -> FuzzCase:
    bases = corpus()
    name, data = bases[index % len(bases)]
    rng = random.Random(f"{SEED}:{index}")
    mutations: list[str] = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        if data[128:132] == b"DICM" and rng.random() < 0.5:
            data, what = dicom_edit(data, rng)
        else:
            data, what = byte_mutation(data, rng)
        mutations.append(what)
    return FuzzCase(index, name, tuple(mutations), data)


# --- byte-level mutations ----------------------------------------------------------------------

def byte_mutation(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    buffer = bytearray(data)
    # Half of them hit the first 1 kB, where the headers the parsers trust are.
    span = min(len(buffer), 1024) if rng.random() < 0.5 else len(buffer)
    kind = rng.choice(("flip", "flip", "truncate", "overwrite", "overwrite", "insert", "delete"))
    if kind == "flip":
        bits = [rng.randrange(span * 8) for _ in range(rng.randint(1, 8))]
        for bit in bits:
            buffer[bit // 8] ^= 1 << (bit % 8)
        return bytes(buffer), f"flip bits {bits}"
    start = rng.randrange(span)
    if kind == "truncate":
        return bytes(buffer[:start]), f"truncate at {start}"
    length = rng.randint(1, 64)
    fill = rng.choice(("random", "zeros", "ones"))
    chunk = {"random": bytes(rng.getrandbits(8) for _ in range(length)),
             "zeros": bytes(length), "ones": b"\xff" * length}[fill]
    if kind == "overwrite":
        buffer[start : start + length] = chunk[: len(buffer) - start]
        return bytes(buffer), f"overwrite {length} bytes at {start} with {fill}"
    if kind == "insert":
        return bytes(buffer[:start] + chunk + buffer[start:]), f"insert {length} {fill} bytes at {start}"
    return bytes(buffer[:start] + buffer[start + length :]), f"delete {length} bytes at {start}"


# --- DICOM-aware edits -------------------------------------------------------------------------

def dicom_edit(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One element edit through pydicom; a file pydicom cannot read or write again gets a byte
    mutation instead (still deterministic)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            what = rng.choice(EDITS)(ds, rng)
            return write_dicom(ds), what
    except Exception:
        return byte_mutation(data, rng)


def write_dicom(ds: Dataset) -> bytes:
    out = io.BytesIO()
    implicit, little = ds.original_encoding
    pydicom.dcmwrite(out, ds, implicit_vr=bool(implicit), little_endian=little is not False,
                     force_encoding=True)
    return out.getvalue()


def set_raw(ds: Dataset, tag: int, vr: str | None, value: bytes) -> None:
    """Put `value` in the file as is: a RawDataElement is written without validation."""
    implicit, little = ds.original_encoding
    element = RawDataElement(Tag(tag), vr, len(value), value, 0, bool(implicit), little is not False)
    (ds.file_meta if tag >> 16 == 2 else ds)[Tag(tag)] = element


def _target(rng: random.Random) -> tuple[str, int, str]:
    keyword = rng.choice(sorted(DICOM_TARGETS))
    tag, vr = DICOM_TARGETS[keyword]
    return keyword, tag, vr


def edit_garbage_value(ds: Dataset, rng: random.Random) -> str:
    keyword, tag, vr = _target(rng)
    value = rng.choice(GARBAGE)
    set_raw(ds, tag, vr, value)
    return f"{keyword} = {value!r} as {vr}"


def edit_wrong_vr(ds: Dataset, rng: random.Random) -> str:
    """A new VR over the element's own bytes (or garbage): a wrongly typed value."""
    keyword, tag, _ = _target(rng)
    vr = rng.choice(VRS)
    element = ds.get_item(Tag(tag)) if Tag(tag) in ds else None
    value = getattr(element, "value", None)
    raw = value if isinstance(value, bytes) else rng.choice(GARBAGE)
    if keyword == "PixelData" and isinstance(value, bytes):
        raw = value[: rng.choice((0, 1, 3, len(value) // 2, len(value)))]
    set_raw(ds, tag, vr, raw)
    return f"{keyword} with VR {vr!r} over {len(raw)} bytes"


def edit_typed_value(ds: Dataset, rng: random.Random) -> str:
    """Plausible-looking but wrong values, written through pydicom's own encoder."""
    keyword, value = rng.choice((
        ("Rows", 0), ("Rows", 1), ("Rows", 65535), ("Columns", 0), ("Columns", 65535), ("Columns", 3),
        ("BitsAllocated", 1), ("BitsAllocated", 12), ("BitsAllocated", 32), ("BitsAllocated", 0),
        ("BitsStored", 0), ("BitsStored", 40), ("HighBit", 99), ("PixelRepresentation", 1),
        ("PixelRepresentation", 7), ("SamplesPerPixel", 3), ("SamplesPerPixel", 4),
        ("SamplesPerPixel", 0), ("PlanarConfiguration", 1), ("PlanarConfiguration", 5),
        ("PhotometricInterpretation", "YBR_FULL_422"), ("PhotometricInterpretation", "PALETTE COLOR"),
        ("PhotometricInterpretation", "RGB"), ("PhotometricInterpretation", "MONOCHROME1"),
        ("PhotometricInterpretation", "HSV"), ("NumberOfFrames", 0), ("NumberOfFrames", 2),
        ("NumberOfFrames", 100000), ("RescaleSlope", 0), ("RescaleSlope", -1e30), ("RescaleIntercept", 1e300),
        ("WindowCenter", [1, 2, 3]), ("WindowWidth", 0), ("WindowWidth", -5), ("WindowWidth", 1e-300),
        ("VOILUTFunction", "SIGMOID"), ("VOILUTFunction", "LINEAR_EXACT"), ("PatientID", "x" * 200),
    ))
    setattr(ds, keyword, value)
    return f"{keyword} = {value!r}"


def edit_delete(ds: Dataset, rng: random.Random) -> str:
    keyword, tag, _ = _target(rng)
    if Tag(tag) in ds:
        del ds[Tag(tag)]
    return f"delete {keyword}"


def edit_transfer_syntax(ds: Dataset, rng: random.Random) -> str:
    uid = rng.choice(TRANSFER_SYNTAXES)
    set_raw(ds, 0x00020010, "UI", uid.encode() + b"\x00" * (len(uid) % 2))
    return f"TransferSyntaxUID = {uid!r}"


def edit_lut(ds: Dataset, rng: random.Random) -> str:
    """A VOI or modality LUT sequence whose descriptor, data or both are broken."""
    item = Dataset()
    descriptor = rng.choice(([4, 0, 16], [0, 0, 16], [65535, 0, 8], [4, 0, 99], [2], [4, 40000, 16]))
    data = rng.choice(([0, 10, 20, 30], [], [1], list(range(0, 65536, 219))))
    item.add_new(0x00283002, "US", descriptor)  # LUTDescriptor, its ambiguous VR made explicit
    item.add_new(0x00283006, "US", data)  # LUTData
    name = rng.choice(("VOILUTSequence", "ModalityLUTSequence"))
    if name == "ModalityLUTSequence":
        item.ModalityLUTType = "HU"
    setattr(ds, name, [item])
    return f"{name} with LUTDescriptor {descriptor} and {len(data)} entries"


def edit_pixel_data_length(ds: Dataset, rng: random.Random) -> str:
    if "PixelData" not in ds or ds["PixelData"].is_undefined_length:
        return edit_garbage_value(ds, rng)
    data = ds.PixelData
    size = rng.choice((0, 2, len(data) // 2, len(data) - 2, len(data) + 2, len(data) * 2))
    ds.PixelData = (data * 3)[:size]
    return f"PixelData resized {len(data)} -> {size} bytes"


EDITS: tuple[Callable[[Dataset, random.Random], str], ...] = (
    edit_garbage_value, edit_garbage_value, edit_wrong_vr, edit_wrong_vr, edit_typed_value, edit_typed_value,
    edit_delete, edit_transfer_syntax, edit_lut, edit_pixel_data_length,
)


# --- the bases ---------------------------------------------------------------------------------

@functools.cache
def corpus() -> tuple[tuple[str, bytes], ...]:
    return (*generated_images(), *pydicom_test_files())


def pydicom_test_files() -> list[tuple[str, bytes]]:
    """pydicom's test data files that decode today (single-frame, small)."""
    from ace_model.preprocess import ImageDecodeError, decode_image

    files = sorted((f for f in get_testdata_files() if os.path.isfile(f)), key=os.path.basename)
    kept = []
    for path in files:
        if os.path.getsize(path) > MAX_BASE_BYTES:
            continue
        with open(path, "rb") as fh:
            data = fh.read()
        if data[128:132] != b"DICM":
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                decoded = decode_image(data, MAX_PIXELS)
        except ImageDecodeError:
            continue
        if decoded.width * decoded.height <= MAX_BASE_PIXELS:
            kept.append((os.path.basename(path), data))
    return kept


@functools.lru_cache(maxsize=8)
def texture(height: int, width: int, seed: int) -> np.ndarray:
    """(height, width) float in [0, 1], read-only: a smooth gradient, a few blobs and some noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    image = 0.4 * x + 0.2 * y
    for cx, cy, r in rng.random((4, 3)):
        image += 0.5 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (0.01 + 0.02 * r))
    image = np.clip(image / image.max() + 0.05 * rng.standard_normal(image.shape), 0, 1)
    image.flags.writeable = False
    return image


def pil_bytes(image: Image.Image, image_format: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=image_format, **options)
    return out.getvalue()


def dicom_image(pixels: np.ndarray, **elements: object) -> bytes:
    """An uncompressed single-frame DICOM of `pixels` (uint8/uint16 grey, or uint8 RGB)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["ace-fuzz", str(pixels.shape)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID = "FUZZ-1"
    ds.Rows, ds.Columns = pixels.shape[:2]
    colour = pixels.ndim == 3
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = "RGB" if colour else "MONOCHROME2"
    if colour:
        ds.PlanarConfiguration = 0
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def jpeg_dicom(grey: np.ndarray) -> bytes:
    """A JPEG Baseline (encapsulated) grey DICOM, the JPEG made by Pillow."""
    data = dicom_image(grey)
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([pil_bytes(Image.fromarray(grey), "JPEG", quality=90)])
    ds["PixelData"].is_undefined_length = True
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def generated_images() -> list[tuple[str, bytes]]:
    grey = (texture(40, 48, 1) * 255).astype(np.uint8)
    rgb = np.stack([(texture(32, 40, s) * 255).astype(np.uint8) for s in (2, 3, 4)], axis=2)
    wide = (texture(40, 36, 5) * 60000 + 1000).astype(np.uint16)
    floats = texture(24, 32, 6).astype(np.float32)
    images = [
        ("grey.png", pil_bytes(Image.fromarray(grey), "PNG")),
        ("rgb.png", pil_bytes(Image.fromarray(rgb), "PNG")),
        ("rgba.png", pil_bytes(Image.fromarray(rgb).convert("RGBA"), "PNG")),
        ("palette.png", pil_bytes(Image.fromarray(rgb).convert("P"), "PNG")),
        ("16bit.png", pil_bytes(Image.fromarray(wide), "PNG")),
        ("grey.jpg", pil_bytes(Image.fromarray(grey), "JPEG", quality=90)),
        ("rgb.jpg", pil_bytes(Image.fromarray(rgb), "JPEG", quality=90)),
        ("progressive.jpg", pil_bytes(Image.fromarray(rgb), "JPEG", progressive=True)),
        ("cmyk.jpg", pil_bytes(Image.fromarray(rgb).convert("CMYK"), "JPEG")),
        ("16bit.tif", pil_bytes(Image.fromarray(wide), "TIFF")),
        ("float32.tif", pil_bytes(Image.fromarray(floats, mode="F"), "TIFF")),
        ("deflate.tif", pil_bytes(Image.fromarray(grey), "TIFF", compression="tiff_adobe_deflate")),
        ("rgb.bmp", pil_bytes(Image.fromarray(rgb), "BMP")),
        ("cr.dcm", dicom_image((texture(48, 40, 7) * 4095).astype(np.uint16), **CR_ELEMENTS)),
        ("rgb.dcm", dicom_image(rgb)),
        ("jpeg.dcm", jpeg_dicom(grey)),
    ]
    return images + fundus_images()


def fundus_images() -> list[tuple[str, bytes]]:
    """skimage's retina photograph (a real fundus image), small, as JPEG and PNG."""
    try:
        from skimage import data as skimage_data

        retina = Image.fromarray(skimage_data.retina()).resize((64, 64), Image.Resampling.BILINEAR)
    except Exception:  # skimage or its data file missing: the corpus is complete without it
        return []
    return [("fundus.jpg", pil_bytes(retina, "JPEG", quality=90)), ("fundus.png", pil_bytes(retina, "PNG"))]


# --- one image of each corpus format at any size (reduction and memory tests) ------------------

FORMATS = ("png8", "png_rgb", "png16", "jpeg", "jpeg_grey", "jpeg_progressive", "tiff16", "tiff_float",
           "tiff_deflate", "bmp", "dicom16", "dicom16_plain", "dicom_rgb", "dicom_jpeg")


def sample_image(image_format: str, width: int, height: int, seed: int = 1) -> bytes:
    """A smooth textured image (see texture()) of `width` x `height` in one of FORMATS."""
    grey = texture(height, width, seed)
    grey8, wide = (grey * 255).astype(np.uint8), (grey * 60000).astype(np.uint16)
    rgb = np.stack([grey8, grey8[::-1], (grey * 128).astype(np.uint8)], axis=2)
    build: dict[str, Callable[[], bytes]] = {
        "png8": lambda: pil_bytes(Image.fromarray(grey8), "PNG", compress_level=1),
        "png_rgb": lambda: pil_bytes(Image.fromarray(rgb), "PNG", compress_level=1),
        "png16": lambda: pil_bytes(Image.fromarray(wide), "PNG", compress_level=1),
        "jpeg": lambda: pil_bytes(Image.fromarray(rgb), "JPEG", quality=90),
        "jpeg_grey": lambda: pil_bytes(Image.fromarray(grey8), "JPEG", quality=90),
        "jpeg_progressive": lambda: pil_bytes(Image.fromarray(rgb), "JPEG", quality=90, progressive=True),
        "tiff16": lambda: pil_bytes(Image.fromarray(wide), "TIFF"),
        "tiff_float": lambda: pil_bytes(Image.fromarray(grey.astype(np.float32), mode="F"), "TIFF"),
        "tiff_deflate": lambda: pil_bytes(Image.fromarray(wide), "TIFF", compression="tiff_adobe_deflate"),
        "bmp": lambda: pil_bytes(Image.fromarray(rgb), "BMP"),
        "dicom16": lambda: dicom_image((grey * 4095).astype(np.uint16), **CR_ELEMENTS),
        "dicom16_plain": lambda: dicom_image(wide),
        "dicom_rgb": lambda: dicom_image(rgb),
        "dicom_jpeg": lambda: jpeg_dicom(grey8),
    }
    return build[image_format]()
