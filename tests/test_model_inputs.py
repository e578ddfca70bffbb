"""Model inputs as uint8 (issue 15): DICOM values through a lookup table, colour made grey before
resizing for encoders that read grey, normalisation in the batched forward pass, and batches formed
by input size wherever the images wait in the queue."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRBigEndian

from ace_model.config import PIXEL_MEAN, PIXEL_STD
from ace_model.embedding import EmbeddingPolicy
from ace_model.encoder import DENSE_BACKBONE, Embeddings, Encoder, EncoderSpec
from ace_model.preprocess import (
    DecodedImage,
    decode_image,
    decode_side,
    encoder_view,
    normalise,
    prepare,
)
from service.batcher import Batcher, BatcherConfig
from tests.decode_fuzz_corpus import dicom_image, texture

WIDE = (texture(48, 40, 3) * 3000 + 100).astype(np.uint16)  # 12-bit-ish values


def voi_lut_sequence(ds: Dataset) -> None:
    """A non-linear VOI LUT (a square root curve) over stored values 0..4095, 12-bit output."""
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.LUTData = (np.sqrt(np.linspace(0, 1, 4096)) * 4095).astype(np.uint16).tobytes()
    ds.VOILUTSequence = [item]


def signed(pixels: np.ndarray) -> bytes:
    data = dicom_image(pixels.astype(np.int16).view(np.uint16), RescaleSlope=2, RescaleIntercept=-1024,
                       WindowCenter=1500, WindowWidth=3000)
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    ds.PixelRepresentation = 1
    ds.PixelData = pixels.astype(np.int16).tobytes()
    return _saved(ds)


def high_bits_set(pixels: np.ndarray) -> bytes:
    """12 bits stored in 16 with garbage in the 4 unused high bits (pydicom clears them)."""
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(dicom_image(pixels)))
    ds.BitsStored, ds.HighBit = 12, 11
    ds.PixelData = (pixels.astype(np.uint16) & 0x0FFF | 0xA000).tobytes()
    ds.WindowCenter, ds.WindowWidth = 1500, 2500
    return _saved(ds)


def with_voi_lut(pixels: np.ndarray) -> bytes:
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(dicom_image(pixels)))
    voi_lut_sequence(ds)
    return _saved(ds)


def big_endian(pixels: np.ndarray, **elements: object) -> bytes:
    """Explicit VR Big Endian (pixel data viewed as stored, byte-swapped relative to the machine)."""
    read = pydicom.dcmread(pydicom.filebase.DicomBytesIO(dicom_image(pixels.astype(np.uint16))))
    ds = Dataset()  # a new dataset: pydicom will not re-encode a read one in the other byte order
    for element in read:
        ds.add(element)
    ds.file_meta = read.file_meta
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder(">")).tobytes()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return _saved(ds)


def _saved(ds: Dataset) -> bytes:
    out = pydicom.filebase.DicomBytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


DICOMS: dict[str, Callable[[], bytes]] = {
    "16-bit, window": lambda: dicom_image(WIDE, WindowCenter=1600, WindowWidth=2000),
    "16-bit, no VOI (its range)": lambda: dicom_image(WIDE),
    "16-bit, rescaled, MONOCHROME1": lambda: dicom_image(WIDE, RescaleSlope=0.5, RescaleIntercept=10,
                                                         PhotometricInterpretation="MONOCHROME1"),
    "signed, rescaled, window": lambda: signed(WIDE.astype(np.int32) - 1500),
    "12 of 16 bits, high bits set": lambda: high_bits_set(WIDE),
    "VOI LUT sequence": lambda: with_voi_lut(WIDE),
    "big endian, no VOI": lambda: big_endian(WIDE),
    "big endian, signed, window": lambda: big_endian(WIDE.astype(np.int16) - 1500, WindowCenter=0,
                                                     WindowWidth=2500),
    "8-bit grey, window": lambda: dicom_image((texture(30, 50, 4) * 255).astype(np.uint8),
                                              WindowCenter=100, WindowWidth=120),
}


def reference_grey(data: bytes) -> np.ndarray:
    """pydicom's own per-pixel LUTs on its pixel_array, to 8 bits as documented in ace_model.decode."""
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))
    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        values = apply_voi_lut(values, ds).astype(np.float64)
        low, high = sorted(apply_voi_lut(np.array([-(2.0**31), 2.0**31 - 1]), ds).tolist())
    else:
        low, high = values.min(), values.max()
    scaled = np.clip((values - low) / (high - low), 0, 1)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        scaled = 1 - scaled
    return scaled * 255


@pytest.mark.parametrize("name", list(DICOMS))
def test_the_lookup_table_gives_what_pydicoms_per_pixel_luts_give(name: str) -> None:
    data = DICOMS[name]()
    decoded = decode_image(data).pixels[:, :, 0].astype(np.float64)
    expected = reference_grey(data)
    assert np.abs(decoded - expected).max() <= 0.5 + 1e-3  # rounding to 8 bits only
    assert expected.max() - expected.min() > 100  # the case has contrast to get wrong
    reduced = decode_image(data, max_side=20).pixels[:, :, 0].astype(np.float64)  # 2x2 block means first
    rows, cols = expected.shape[0] // 2, expected.shape[1] // 2
    means = expected[: 2 * rows, : 2 * cols].reshape(rows, 2, cols, 2).mean(axis=(1, 3))
    assert np.corrcoef(reduced[:rows, :cols].ravel(), means.ravel())[0, 1] > 0.95  # the same picture


def test_a_grey_reading_encoders_view_is_the_mean_of_the_channels() -> None:
    rgb = np.stack([(texture(40, 50, s) * 255).astype(np.uint8) for s in (1, 2, 3)], axis=2)
    grey = encoder_view(DecodedImage(rgb, "png"), 224, reads_grey=True)  # small: averaged, not resized
    assert grey.pixels.strides[2] == 0 and (grey.width, grey.height) == (50, 40)
    assert np.abs(grey.pixels[:, :, 0] - rgb.mean(axis=2)).max() <= 0.5 + 1e-3


def test_normalise_maps_pixels_as_training_does_and_refuses_floats() -> None:
    pixels = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    expected = (torch.tensor([0, 128, 255]) / 255 - PIXEL_MEAN) / PIXEL_STD
    torch.testing.assert_close(normalise(pixels).flatten(), expected.float())
    with pytest.raises(TypeError, match="uint8"):
        normalise(pixels.float())


def test_a_grey_reading_encoder_embeds_a_colour_image_alike_made_grey_first_or_not() -> None:
    """The dense encoder averages its input channels: averaging before the resize changes its
    input by 8-bit rounding only, so the embeddings agree."""
    torch.manual_seed(0)
    policy = EmbeddingPolicy.resolve("cpu")
    encoder = policy.place(Encoder(EncoderSpec(DENSE_BACKBONE, 64)))
    assert encoder.spec.reads_grey
    rgb = np.stack([(texture(90, 70, s) * 255).astype(np.uint8) for s in (4, 5, 6)], axis=2)
    image = DecodedImage(rgb, "png")
    colour, _ = prepare(image, 64, encoder.grid)
    grey, _ = prepare(encoder_view(image, 64, reads_grey=True), 64, encoder.grid)
    assert not torch.equal(colour[0], colour[1]) and torch.equal(grey[0], grey[2])
    both = policy.forward(encoder, torch.stack([colour, grey]))
    cosine = (both.patches[0] * both.patches[1]).sum(-1)
    assert cosine.min() > 0.99


class HeldBatcher(Batcher):
    """Its first forward pass waits for `release`, so the queue fills behind it."""

    release = threading.Event()

    def forward(self, images: torch.Tensor, encoder: Encoder) -> Embeddings:
        self.release.wait(timeout=30)
        return super().forward(images, encoder)


def test_a_batch_takes_its_size_from_anywhere_in_the_queue() -> None:
    """Queued 64, 96, 64, 96, 64 px images run as two batches (3 then 2), not five."""
    batches: list[int] = []
    batcher = HeldBatcher(BatcherConfig(8, 0.0, 64, EmbeddingPolicy.resolve("cpu")),
                          lambda size, depth: batches.append(size))
    encoder = Encoder(EncoderSpec(DENSE_BACKBONE, 64)).eval()
    sizes = [64, 96, 64, 96, 64]
    images = [torch.randint(0, 256, (3, s, s), dtype=torch.uint8) for s in sizes]

    async def embed_all() -> list[tuple[int, ...]]:
        first = asyncio.ensure_future(batcher.embed([images[0][:, :32, :32].contiguous()], encoder))
        while not batches:  # the worker holds the first image
            await asyncio.sleep(0.01)
        calls = [asyncio.ensure_future(batcher.embed([image], encoder)) for image in images]
        await asyncio.sleep(0.05)  # every image is queued while the worker is held
        batcher.release.set()
        await first
        return [tuple(e[0].patches.shape) for e in await asyncio.gather(*calls)]

    batcher.start()
    try:  # a thread of its own: the browser tests' sync Playwright keeps an event loop in this one
        with ThreadPoolExecutor(1) as pool:
            shapes = pool.submit(asyncio.run, embed_all()).result()
    finally:
        batcher.stop()
    assert batches == [1, 3, 2]
    assert [s[0] for s in shapes] == [size // 16 for size in sizes]  # each answer is its own image's


def test_the_encoder_view_fits_the_decode_side_and_keeps_the_original_frame() -> None:
    rgb = np.stack([(texture(1200, 700, s) * 255).astype(np.uint8) for s in (7, 8, 9)], axis=2)
    image = DecodedImage(rgb, "png")
    view = encoder_view(image, 224, reads_grey=True)
    assert max(view.pixels.shape[:2]) == decode_side(224) == 896 and view.pixels.strides[2] == 0
    assert (view.width, view.height) == (700, 1200)  # coordinates stay in the original's pixels
    kept = encoder_view(image, 512, reads_grey=False)  # decode side 2048: nothing to fit
    assert kept is image
