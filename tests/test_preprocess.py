"""Decoding (PNG, 16-bit PNG, JPEG, DICOM), reduced decoding, peeking and the pixel <-> model <->
grid coordinate mapping."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels.decoders.base import get_decoder

from ace_model.preprocess import (
    CoordinateMap,
    DecodedImage,
    ImageDecodeError,
    decode_image,
    letterbox_tensor,
    load_image,
    peek_image,
    prepare,
    reduction_factor,
    thumbnail_jpeg,
    to_pil,
)
from tests.decode_fuzz_corpus import FORMATS, dicom_image, pil_bytes, sample_image

SIZES = st.sampled_from([(64, 4), (224, 14), (448, 14)])
HALF_LEVEL = 0.5 / 255 + 1e-5  # 8-bit rounding, in [0, 1] units (float32 arithmetic before it: 1e-5)


def assert_8bit_close(pixels: np.ndarray, expected: np.ndarray) -> None:
    """uint8 `pixels` are `expected` ([0, 1]) rounded to 8 bits."""
    assert pixels.dtype == np.uint8
    np.testing.assert_allclose(pixels / 255.0, expected, rtol=0, atol=HALF_LEVEL)


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def dicom_bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def chest_cr_path() -> str:
    path = get_testdata_file("RG1_UNCR.dcm")  # real chest CR from pydicom-data, MONOCHROME1
    assert path is not None, "pydicom-data is not installed"
    return str(path)


@pytest.fixture
def chest_cr(chest_cr_path: str) -> pydicom.Dataset:
    return pydicom.dcmread(chest_cr_path)


@pytest.fixture(scope="module")
def chest_cr_decoded(chest_cr_path: str) -> DecodedImage:
    return load_image(chest_cr_path)


# --- coordinates -----------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(width=st.integers(2, 5000), height=st.integers(2, 5000), size_grid=SIZES,
       fx=st.floats(0, 1), fy=st.floats(0, 1))
def test_pixel_grid_round_trip(
    width: int, height: int, size_grid: tuple[int, int], fx: float, fy: float
) -> None:
    size, grid = size_grid
    mapping = CoordinateMap.letterbox(width, height, size, grid)
    xy = np.array([fx * width, fy * height])
    np.testing.assert_allclose(mapping.from_grid(mapping.to_grid(xy)), xy, atol=1e-6 * max(width, height))
    np.testing.assert_allclose(mapping.to_original(mapping.to_model(xy)), xy, atol=1e-6 * max(width, height))
    model_xy = mapping.to_model(xy)
    assert (model_xy >= -1e-9).all() and (model_xy <= size + 1e-9).all()
    row, col = mapping.patch_of(xy)
    grid_x, grid_y = mapping.to_grid(xy)
    assert abs(col - grid_x) <= 0.5 + 1e-9 or col in (0, grid - 1)
    assert abs(row - grid_y) <= 0.5 + 1e-9 or row in (0, grid - 1)


def test_grid_convention_patch_centres() -> None:
    mapping = CoordinateMap.letterbox(640, 640, 64, 4)  # 10 original px per model px, stride 16
    np.testing.assert_allclose(mapping.to_grid(np.array([80.0, 240.0])), [0.0, 1.0])
    np.testing.assert_allclose(mapping.patch_centres()[:2], [[80, 80], [240, 80]])  # row-major
    np.testing.assert_array_equal(mapping.patch_of(np.array([639.0, 0.0])), [0, 3])  # (row, col)


@pytest.mark.parametrize(
    ("width", "height", "dots"),
    [
        (300, 200, [(213, 57), (20, 180), (150, 100)]),  # landscape: bars above and below
        (90, 160, [(10, 150), (77, 12)]),  # portrait: bars left and right
        (257, 257, [(200, 31)]),
    ],
)
def test_bright_dot_lands_where_the_mapping_says(
    width: int, height: int, dots: list[tuple[int, int]]
) -> None:
    """Away from the borders (where the resize filter is clipped) the dot's centroid is exact."""
    size, grid = 64, 4
    for x, y in dots:
        image = np.zeros((height, width), dtype=np.uint8)
        image[y, x] = 255
        tensor, mapping = prepare(decode_image(png_bytes(image)), size, grid)
        intensity = tensor[0].numpy().astype(np.float64)  # (size, size), padding 0
        rows, cols = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
        centroid = np.array([(cols * intensity).sum(), (rows * intensity).sum()]) / intensity.sum()
        predicted = mapping.to_model(np.array([x + 0.5, y + 0.5]))
        np.testing.assert_allclose(centroid, predicted, atol=0.3)
        brightest = np.unravel_index(intensity.argmax(), intensity.shape)
        patch = mapping.patch_of(np.array([x + 0.5, y + 0.5]))
        assert tuple(patch) == (brightest[0] // 16, brightest[1] // 16)


def test_letterbox_padding_is_black_and_marked_invalid() -> None:
    image = np.full((100, 300), 255, dtype=np.uint8)  # wide: 64 x 21 content, 21 px bars above/below
    tensor, mapping = prepare(decode_image(png_bytes(image)), 64, 4)
    assert tensor.shape == (3, 64, 64) and tensor.dtype == torch.uint8
    content = tensor[0].numpy()
    assert mapping.content_size == (64, 21) and mapping.pad_y == 21
    assert (content[:21] == 0).all() and (content[42:] == 0).all()
    assert (content[22:41] == 255).all()
    np.testing.assert_array_equal(mapping.valid_patches().reshape(4, 4).any(1), [False, True, True, False])


# --- decoding --------------------------------------------------------------------------------

def test_png_8bit_grey_and_rgb() -> None:
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    decoded = decode_image(png_bytes(grey))
    assert decoded.format == "png" and decoded.pixels.shape == (16, 16, 3)
    np.testing.assert_array_equal(decoded.pixels[..., 1], grey)  # 8-bit data as stored
    assert decoded.pixels.dtype == np.uint8 and decoded.as_float().dtype == np.float32
    np.testing.assert_allclose(decoded.as_float()[..., 1], grey / 255.0, atol=1e-7)
    rgb = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(png_bytes(rgb)).pixels, rgb)


def test_grey_is_one_channel_seen_three_times_and_letterboxes_like_a_copy() -> None:
    grey = np.random.default_rng(1).integers(0, 256, size=(40, 30), dtype=np.uint8)
    decoded = decode_image(png_bytes(grey))
    assert decoded.pixels.strides[2] == 0 and not decoded.pixels.flags.writeable  # a view, no copies
    copy = DecodedImage(np.repeat(grey[:, :, None], 3, axis=2), "png")
    torch.testing.assert_close(letterbox_tensor(decoded, 32), letterbox_tensor(copy, 32), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_thumbnail_is_a_jpeg_that_keeps_aspect_and_pixels(mode: str) -> None:
    ramp = np.tile(np.linspace(0, 255, 900).astype(np.uint8), (300, 1))  # 900 x 300, smooth
    pixels = ramp if mode == "L" else np.stack([ramp, ramp[:, ::-1], np.full_like(ramp, 128)], axis=2)
    preview = Image.open(io.BytesIO(thumbnail_jpeg(decode_image(png_bytes(pixels)), 300)))
    assert preview.format == "JPEG" and preview.mode == mode and preview.size == (300, 100)
    expected = np.asarray(Image.fromarray(pixels).resize((300, 100), Image.Resampling.BICUBIC), dtype=float)
    assert np.abs(np.asarray(preview, dtype=float) - expected).mean() < 2.0  # quality 90: near-lossless


def test_png_16bit_uses_its_full_range() -> None:
    values = np.linspace(1000, 50000, 64).astype(np.uint16).reshape(8, 8)
    decoded = decode_image(png_bytes(values))
    assert_8bit_close(decoded.pixels[..., 0], (values.astype(np.float64) - 1000) / 49000)
    assert decoded.pixels.min() == 0 and decoded.pixels.max() == 255


def test_jpeg() -> None:
    grey = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (32, 1))
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="JPEG", quality=95)
    decoded = decode_image(buffer.getvalue())
    assert decoded.format == "jpeg" and decoded.width == 64 and decoded.height == 32
    np.testing.assert_allclose(decoded.as_float()[..., 0], grey / 255.0, atol=0.03)


def expected_cr_grey(ds: pydicom.Dataset) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 LINEAR window to [0, 1], then MONOCHROME1 inversion."""
    centre, width = float(ds.WindowCenter), float(ds.WindowWidth)
    linear = np.clip((ds.pixel_array.astype(np.float64) - (centre - 0.5)) / (width - 1) + 0.5, 0, 1)
    return 1 - linear if ds.PhotometricInterpretation == "MONOCHROME1" else linear


def test_real_chest_cr_dicom(chest_cr_decoded: DecodedImage, chest_cr: pydicom.Dataset) -> None:
    decoded = chest_cr_decoded
    assert decoded.format == "dicom" and (decoded.height, decoded.width) == (1955, 1841)
    assert decoded.patient_id == str(chest_cr.PatientID)
    assert np.array_equal(decoded.pixels[..., 0], decoded.pixels[..., 2])
    assert_8bit_close(decoded.pixels[..., 0], expected_cr_grey(chest_cr))
    centre = decoded.pixels[700:1100, 500:1300, 0].mean()  # lungs and mediastinum
    assert centre < decoded.pixels[-150:, :, 0].mean()  # abdomen/diaphragm below is brighter


def test_monochrome1_is_inverted(chest_cr_decoded: DecodedImage, chest_cr: pydicom.Dataset) -> None:
    original = chest_cr_decoded.pixels
    chest_cr.PhotometricInterpretation = "MONOCHROME2"
    flipped = decode_image(dicom_bytes(chest_cr)).pixels
    np.testing.assert_array_equal(flipped, 255 - original)


def test_voi_window_is_applied(chest_cr: pydicom.Dataset) -> None:
    chest_cr.WindowCenter, chest_cr.WindowWidth = 6000, 4000
    decoded = decode_image(dicom_bytes(chest_cr)).pixels[..., 0]
    assert_8bit_close(decoded, expected_cr_grey(chest_cr))
    assert (decoded == 0).mean() > 0.1 and (decoded == 255).mean() > 0.05  # saturated outside the window


def test_dicom_without_voi_uses_its_actual_range(chest_cr: pydicom.Dataset) -> None:
    del chest_cr.WindowCenter, chest_cr.WindowWidth
    decoded = decode_image(dicom_bytes(chest_cr)).pixels[..., 0]
    raw = chest_cr.pixel_array.astype(np.float64)
    assert_8bit_close(decoded, 1 - (raw - raw.min()) / (raw.max() - raw.min()))


def test_multiframe_dicom_is_refused() -> None:
    path = get_testdata_file("emri_small.dcm")  # 10 frames
    with pytest.raises(ImageDecodeError, match="multi-frame DICOM") as info:
        load_image(str(path))
    assert info.value.kind == "multiframe"


def test_multiframe_tiff_is_refused() -> None:
    frames = [Image.fromarray(np.full((8, 8), v, dtype=np.uint8)) for v in (0, 255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="TIFF", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageDecodeError) as info:
        decode_image(buffer.getvalue())
    assert info.value.kind == "multiframe"


def test_dicom_needing_a_missing_codec_is_unsupported_not_corrupt() -> None:
    ds = pydicom.dcmread(get_testdata_file("JPEG-LL.dcm"))  # JPEG Lossless, common for CR/DX
    decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
    if decoder.is_available:
        assert load_image(str(get_testdata_file("JPEG-LL.dcm"))).format == "dicom"
        return
    with pytest.raises(ImageDecodeError, match="needs a decoder that is not installed") as info:
        load_image(str(get_testdata_file("JPEG-LL.dcm")))
    assert info.value.kind == "unsupported"


def test_truncated_dicom_is_corrupt(chest_cr_path: str) -> None:
    with open(chest_cr_path, "rb") as fh:
        data = fh.read()
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data[: len(data) // 2])
    assert info.value.kind == "corrupt"


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_truncated_png_and_jpeg_are_corrupt(image_format: str) -> None:
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format=image_format)
    data = buffer.getvalue()
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data[: len(data) // 2])
    assert info.value.kind == "corrupt"


@pytest.mark.parametrize("data", [b"", b"hello, this is not an image", b"%PDF-1.4\n" + bytes(300)])
def test_non_images_are_unsupported(data: bytes) -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data)
    assert info.value.kind == "unsupported"


def test_too_large_and_too_small_images() -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(png_bytes(np.zeros((100, 100), dtype=np.uint8)), max_pixels=5000)
    assert info.value.kind == "too_large"
    with pytest.raises(ImageDecodeError) as info:
        decode_image(png_bytes(np.zeros((1, 40), dtype=np.uint8)))
    assert info.value.kind == "corrupt"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float_images_with_non_finite_pixels_are_refused(bad: float) -> None:
    values = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    values[10, 20] = bad
    buffer = io.BytesIO()
    Image.fromarray(values, mode="F").save(buffer, format="TIFF")
    with pytest.raises(ImageDecodeError, match="NaN or infinite") as caught:
        decode_image(buffer.getvalue())
    assert caught.value.kind == "corrupt"


def test_an_image_past_pillows_bomb_limit_is_too_large_not_corrupt() -> None:
    buffer = io.BytesIO()
    Image.new("1", (16000, 12000)).save(buffer, format="PNG")  # 192 Mpx, a few kB compressed
    with pytest.raises(ImageDecodeError, match="too large") as caught:
        decode_image(buffer.getvalue(), max_pixels=10**9)
    assert caught.value.kind == "too_large"


# --- reduced while decoding ------------------------------------------------------------------

BLOB_SIZE = (1203, 905)  # not a multiple of any factor: the last block of each row is partial
BLOB_CENTRE = np.array([703.3, 411.7])  # original pixels


def blob_image(image_format: str) -> bytes:
    """A bright Gaussian blob (sigma 9 px) on a dark background."""
    width, height = BLOB_SIZE
    y, x = np.mgrid[0:height, 0:width] + 0.5
    grey = 0.05 + 0.9 * np.exp(-((x - BLOB_CENTRE[0]) ** 2 + (y - BLOB_CENTRE[1]) ** 2) / (2 * 9.0**2))
    if image_format == "dicom":
        return dicom_image((grey * 4000).astype(np.uint16))
    if image_format == "tiff16":
        return pil_bytes(Image.fromarray((grey * 60000).astype(np.uint16)), "TIFF")
    grey8 = (grey * 255).astype(np.uint8)
    if image_format == "jpeg":
        return pil_bytes(Image.fromarray(np.stack([grey8] * 3, axis=2)), "JPEG", quality=95)
    return pil_bytes(Image.fromarray(grey8), "PNG")


def blob_centroid(image: DecodedImage) -> np.ndarray:
    """The blob's intensity centroid in original pixels, measured on the pixels the image has."""
    values = np.clip(image.as_float()[:, :, 0].astype(np.float64) - 0.2, 0, None)
    rows, cols = np.mgrid[0 : values.shape[0], 0 : values.shape[1]] + 0.5
    centroid = np.array([(cols * values).sum(), (rows * values).sum()]) / values.sum()
    return centroid / np.array(image.pixel_scale)


def test_default_decode_is_not_reduced() -> None:
    decoded = decode_image(png_bytes(np.zeros((300, 500), dtype=np.uint8)))
    assert decoded.original_size is None and decoded.pixel_scale == (1.0, 1.0)
    assert decode_image(png_bytes(np.zeros((300, 500), dtype=np.uint8)), max_side=500).original_size is None


@pytest.mark.parametrize(("width", "height", "max_side", "factor"), [
    (4000, 3000, 1000, 4), (3999, 3000, 1000, 3), (100, 50, 1000, 1), (2048, 10, 1024, 2),
    (640, 480, None, 1),
])
def test_reduction_factor_keeps_the_longer_side_at_least_max_side(
    width: int, height: int, max_side: int | None, factor: int
) -> None:
    assert reduction_factor(width, height, max_side) == factor
    assert max_side is None or -(-max(width, height) // factor) >= min(max_side, max(width, height))


@pytest.mark.parametrize("image_format", FORMATS)
def test_reduced_decode_keeps_the_original_size_as_its_frame(image_format: str) -> None:
    data = sample_image(image_format, 401, 300)
    reduced = decode_image(data, max_side=64)  # factor 6 (JPEG: DCT scale 4, nothing left for reduce)
    assert (reduced.width, reduced.height) == (401, 300) == (peek_image(data).width, peek_image(data).height)
    factor = 4 if image_format.startswith("jpeg") else 6
    assert reduced.pixels.shape[:2] == (-(-300 // factor), -(-401 // factor))
    np.testing.assert_allclose(reduced.pixel_scale, (-(-401 // factor) / 401, -(-300 // factor) / 300))
    assert reduced.pixels.dtype == np.uint8


@pytest.mark.parametrize("image_format", ["png", "jpeg", "tiff16", "dicom"])
@pytest.mark.parametrize("max_side", [300, 150, 64])
def test_a_feature_is_found_where_the_full_decode_has_it(image_format: str, max_side: int) -> None:
    """Tolerance: one reduced pixel (the factor, in original pixels). Block means keep a blob's
    mass in place; the reduced grid (ceil(width / factor) pixels) is stretched onto the original
    width, which moves a point by less than one reduced pixel."""
    data = blob_image(image_format)
    full, reduced = decode_image(data), decode_image(data, max_side=max_side)
    factor = reduction_factor(*BLOB_SIZE, max_side)
    np.testing.assert_allclose(blob_centroid(full), BLOB_CENTRE, atol=0.05)
    np.testing.assert_allclose(blob_centroid(reduced), blob_centroid(full), atol=factor)
    _, full_map = prepare(full, 224, 14)
    _, reduced_map = prepare(reduced, 224, 14)
    assert reduced_map == full_map  # the mapping is in original pixels: exactly the same


@pytest.mark.parametrize("image_format", ["png8", "png16", "jpeg", "tiff_float", "dicom16", "dicom_rgb"])
def test_the_letterboxed_tensor_of_a_reduced_decode_is_close_to_the_full_one(image_format: str) -> None:
    data = sample_image(image_format, 1600, 1200)
    full, reduced = decode_image(data), decode_image(data, max_side=448)  # factor 3
    tensor_full, _ = prepare(full, 224, 14)
    tensor_reduced, _ = prepare(reduced, 224, 14)
    difference = (tensor_full.float() - tensor_reduced.float()).abs() / 255  # [0, 1] pixel units
    assert float(difference.mean()) < 0.01 and float(difference.max()) < 0.2


def test_to_pil_shows_the_pixels_it_has() -> None:
    reduced = decode_image(png_bytes(np.zeros((300, 500), dtype=np.uint8)), max_side=100)
    assert to_pil(reduced).size == (100, 60) and (reduced.width, reduced.height) == (500, 300)


# --- peeking -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("image_format", "mode", "channels", "sample"), [
    ("png8", "L", 1, 1), ("png_rgb", "RGB", 3, 1), ("png16", "I;16", 1, 2), ("jpeg", "RGB", 3, 1),
    ("tiff_float", "F", 1, 4), ("bmp", "RGB", 3, 1), ("dicom16", "MONOCHROME1", 1, 2),
    ("dicom_rgb", "RGB", 3, 1), ("dicom_jpeg", "MONOCHROME2", 1, 1),
])
def test_peek_reads_the_header(image_format: str, mode: str, channels: int, sample: int) -> None:
    header = peek_image(sample_image(image_format, 90, 70))
    assert (header.width, header.height, header.mode, header.channels, header.bytes_per_sample) == (
        90, 70, mode, channels, sample)
    assert header.format == image_format.split("_")[0].rstrip("0123456789")


def test_peek_refuses_with_the_kinds_decode_uses(chest_cr_path: str) -> None:
    with pytest.raises(ImageDecodeError) as info:
        peek_image(Path(chest_cr_path).read_bytes(), max_pixels=1000)
    assert info.value.kind == "too_large"
    with pytest.raises(ImageDecodeError) as info:
        peek_image(Path(str(get_testdata_file("emri_small.dcm"))).read_bytes())
    assert info.value.kind == "multiframe"
    for data, kind in [(b"", "unsupported"), (b"GIF89a" + bytes(100), "unsupported"),
                       (png_bytes(np.zeros((1, 40), dtype=np.uint8)), "corrupt")]:
        with pytest.raises(ImageDecodeError) as info:
            peek_image(data)
        assert info.value.kind == kind
