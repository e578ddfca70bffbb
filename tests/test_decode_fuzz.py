"""Decoding cannot crash: crafted files that used to escape as other exceptions, and a seeded fuzz
of damaged files (tests/decode_fuzz_corpus.py). Every input either decodes to a valid image, or
raises ImageDecodeError with a known kind; peeking at it likewise."""

from __future__ import annotations

import io
import time
from collections import Counter
from collections.abc import Callable

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from ace_model.decode_arrays import BAND_PIXELS
from ace_model.preprocess import (
    DecodedImage,
    ImageDecodeError,
    ImageHeader,
    decode_image,
    decode_memory_bytes,
    peek_image,
)
from tests.decode_fuzz_corpus import MAX_PIXELS, corpus, fuzz_case, set_raw, write_dicom

pytestmark = pytest.mark.filterwarnings("ignore")  # pydicom and Pillow warn about every odd element

KINDS = {"unsupported", "corrupt", "multiframe", "too_large"}
FUZZ_CASES = 3000  # about 30 per corpus file
MAX_SIDE = 16  # the reduced decode of every case: smaller than almost every corpus image
SLOW_CASE_S = 5.0  # a decoder that loops on a crafted file shows up as one slow case


def assert_valid(image: DecodedImage) -> None:
    """What decode_image promises about any image it returns."""
    pixels = image.pixels
    assert isinstance(image, DecodedImage) and pixels.dtype == np.uint8
    assert pixels.ndim == 3 and pixels.shape[2] == 3 and min(pixels.shape[:2]) >= 2
    assert image.width >= pixels.shape[1] and image.height >= pixels.shape[0]
    assert pixels.strides[2] != 0 or not pixels.flags.writeable  # grey: a read-only view of one channel
    floats = image.as_float()
    assert floats.dtype == np.float32 and floats.shape == pixels.shape
    assert floats.min() >= 0 and floats.max() <= 1


def peeked(data: bytes) -> ImageHeader | ImageDecodeError:
    try:
        header = peek_image(data, MAX_PIXELS)
    except ImageDecodeError as err:
        assert err.kind in KINDS and str(err)
        return err
    reduced, full = decode_memory_bytes(header, MAX_SIDE), decode_memory_bytes(header, None)
    # a reduced decode adds its block means (a band of at most BAND_PIXELS rows' float64 sums at a
    # time) to work that shrinks with the image: a few KB more than a full decode for tiny images
    assert 0 < reduced <= full + BAND_PIXELS * header.channels * 64
    return header


def outcome(data: bytes, max_side: int | None = None) -> DecodedImage | ImageDecodeError:
    """The decoded image (checked) or the ImageDecodeError; any other exception propagates."""
    try:
        image = decode_image(data, MAX_PIXELS, max_side)
    except ImageDecodeError as err:
        assert err.kind in KINDS and str(err)
        return err
    assert_valid(image)
    return image


# --- crafted files (each escaped as another exception, an HTTP 500, before) --------------------

def ct_small() -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file("CT_small.dcm"))


def frames_abc() -> bytes:
    ds = ct_small()
    set_raw(ds, 0x00280008, "IS", b"abc ")  # NumberOfFrames
    return write_dicom(ds)


def slope_abc() -> bytes:
    ds = ct_small()
    del ds.RescaleSlope
    ds.add_new(0x00281053, "LO", "abc")
    return write_dicom(ds)


def transfer_syntax(uid: str) -> Callable[[], bytes]:
    def build() -> bytes:
        ds = ct_small()
        set_raw(ds, 0x00020010, "UI", uid.encode() + b"\x00" * (len(uid) % 2))
        return write_dicom(ds)

    return build


def retyped(tag: int, vr: str, value: bytes) -> Callable[[], bytes]:
    """CT_small with element `tag` written as `value` under the VR `vr`: a wrongly typed element."""
    def build() -> bytes:
        ds = ct_small()
        set_raw(ds, tag, vr, value)
        return write_dicom(ds)

    return build


def unknown_vr_patient_id() -> bytes:
    """An explicit-VR file whose PatientID has the unknown VR 'ZZ' (pydicom: NotImplementedError)."""
    data = bytearray(write_dicom(ct_small()))
    at = data.find(b"\x10\x00\x20\x00LO")  # (0010,0020) LO
    data[at + 4 : at + 6] = b"ZZ"
    return bytes(data)


def tiff_16bit_with(offset: int, value: int) -> Callable[[], bytes]:
    def build() -> bytes:
        out = io.BytesIO()
        Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)).save(out, format="TIFF")
        data = bytearray(out.getvalue())
        data[offset] = value
        return bytes(data)

    return build


CRAFTED: dict[str, tuple[Callable[[], bytes], str | None]] = {  # name: (file, kind or None: decodes)
    "NumberOfFrames 'abc'": (frames_abc, "corrupt"),
    "RescaleSlope 'abc' (LO)": (slope_abc, "corrupt"),
    "TransferSyntaxUID is a SOP class": (transfer_syntax("1.2.840.10008.5.1.4.1.1.2"), "unsupported"),
    "TransferSyntaxUID 1.2.3.4": (transfer_syntax("1.2.3.4"), "unsupported"),
    "PatientID with unknown VR ZZ": (unknown_vr_patient_id, None),
    "Rows with unknown VR ZZ": (retyped(0x00280010, "ZZ", b"\x80\x00"), "corrupt"),
    "PatientID typed FD over its 4 bytes of text": (retyped(0x00100020, "FD", b"1CT1"), None),
    "PatientID typed SQ over its text": (retyped(0x00100020, "SQ", b"1CT1"), None),
    "TIFF byte 8 = 0xFF (n_frames: TypeError)": (tiff_16bit_with(8, 0xFF), "corrupt"),
    "TIFF byte 72 = 7 (load: TypeError)": (tiff_16bit_with(72, 7), "corrupt"),
}


@pytest.mark.parametrize("name", list(CRAFTED))
def test_crafted_files_are_refused_or_decoded_never_crash(name: str) -> None:
    build, kind = CRAFTED[name]
    result = outcome(build())
    assert type(outcome(build(), max_side=16)) is type(result)
    if kind is None:
        assert isinstance(result, DecodedImage), result
        assert result.patient_id is None  # the unreadable PatientID is dropped, the image is usable
    else:
        assert isinstance(result, ImageDecodeError) and result.kind == kind, result


def test_every_crafted_file_can_be_peeked_without_a_crash() -> None:
    for name, (build, kind) in CRAFTED.items():
        header = peeked(build())
        if isinstance(header, ImageDecodeError):
            assert header.kind == kind, name


# --- the fuzz ----------------------------------------------------------------------------------

def check_case(data: bytes, outcomes: Counter[str]) -> None:
    """Decode (full and reduced) and peek one file; all must keep their promises and agree."""
    full, reduced, header = outcome(data), outcome(data, MAX_SIDE), peeked(data)
    if isinstance(full, ImageDecodeError):
        outcomes[full.kind] += 1
        return
    outcomes["decoded"] += 1
    assert isinstance(header, ImageHeader), f"peek refused what decodes: {header}"
    assert (header.width, header.height) == (full.width, full.height) == full.pixels.shape[1::-1]
    assert isinstance(reduced, DecodedImage), f"the reduced decode failed: {reduced}"
    assert (reduced.width, reduced.height) == (full.width, full.height)
    longer = max(reduced.pixels.shape[:2])
    assert min(MAX_SIDE, max(full.width, full.height)) <= longer <= max(full.width, full.height)


@pytest.mark.slow
def test_fuzzed_files_decode_or_are_refused_never_crash() -> None:
    """FUZZ_CASES seeded mutations of the corpus; a failure lists the cases, each rebuildable."""
    failures: list[str] = []
    outcomes: Counter[str] = Counter()
    slowest = (0.0, -1)
    for index in range(FUZZ_CASES):
        case = fuzz_case(index)
        started = time.perf_counter()
        try:
            check_case(case.data, outcomes)
        except Exception as err:  # collected, so one run reports every failing case
            failures.append(f"{case.describe()}: {type(err).__name__}: {err}")
        slowest = max(slowest, (time.perf_counter() - started, index))
    assert not failures, f"{len(failures)} of {FUZZ_CASES} cases failed:\n" + "\n".join(failures[:25])
    assert outcomes["decoded"] > FUZZ_CASES // 10 and outcomes["corrupt"] > FUZZ_CASES // 10, outcomes
    assert slowest[0] < SLOW_CASE_S, f"{fuzz_case(slowest[1]).describe()} took {slowest[0]:.1f} s"


def test_the_corpus_has_every_kind_of_base() -> None:
    names = [name for name, _ in corpus()]
    assert len(names) >= 60 and len(names) == len(set(names))
    for suffix in (".png", ".jpg", ".tif", ".bmp", ".dcm"):
        assert any(name.endswith(suffix) for name in names), suffix
    assert all(isinstance(outcome(data), DecodedImage) for _, data in corpus())
