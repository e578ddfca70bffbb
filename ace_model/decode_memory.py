"""Upper bounds of the memory decode_image needs, read from an image's header before decoding:
what the service's memory budget reserves for an upload (service/pipeline.py)."""

from __future__ import annotations

from ace_model.decode import BAND_PIXELS, GREY_MODES, WIDE_MODES, ImageHeader, band_pixels, reduction_factor

OVERHEAD_BYTES = 2 << 20  # parsers' objects, read buffers and allocator slack, whatever the image size


def decode_memory_bytes(header: ImageHeader, max_side: int | None) -> int:
    """Upper bound of the peak working memory decode_image(data, ..., max_side) needs for the
    image `header` describes, the DecodedImage it returns included (the input bytes not)."""
    factor = reduction_factor(header.width, header.height, max_side)
    work = _dicom_memory(header, factor) if header.format == "dicom" else _pil_memory(header, factor)
    return OVERHEAD_BYTES + (header.codec_bytes + work) * 9 // 8  # 1/8: allocator and library slack


def _pixels(width: int, height: int, factor: int) -> int:
    return -(-width // factor) * -(-height // factor)


def _pil_memory(header: ImageHeader, factor: int) -> int:
    """The decoded image, its conversion and reduction, tobytes() (chunks and join) and floats."""
    width, height, mode = header.width, header.height, header.mode
    packed = header.channels * header.bytes_per_sample
    stored = packed if header.channels == 1 else 4
    if mode in WIDE_MODES:  # the whole array, or one band of rows at a time
        work = width * height * (2 * packed + 4) if factor == 1 else (
            _pixels(width, height, factor) * 4
            + band_pixels(width, height, factor) * (stored + 2 * packed + 16))
        return width * height * stored + work
    grey = mode in GREY_MODES
    drafted = _jpeg_draft_scale(width, height, factor) if header.format == "jpeg" and factor > 1 else 1
    loaded = _pixels(width, height, drafted)  # what libjpeg (DCT-scaled) or the codec decodes into
    target = 1 if grey else 4  # bytes per pixel of the L or RGB image
    converted = 0 if mode == ("L" if grey else "RGB") else loaded * target
    final = _pixels(width, height, drafted * (factor // drafted))
    reduced = final * target if factor // drafted > 1 else 0
    return loaded * stored + converted + reduced + final * (1 if grey else 3) * (2 + 4)


def _dicom_memory(header: ImageHeader, factor: int) -> int:
    """Block means (a band of rows in float64), the float32 result, the LUTs' copies of one band."""
    width, samples, item = header.width, header.channels, header.bytes_per_sample
    final = _pixels(width, header.height, factor)
    band = band_pixels(width, header.height, factor)  # stored pixels averaged at once
    work = 0 if factor == 1 else final * samples * item + band * samples * (item + 24)
    if samples == 3:  # a copy of the stored values, then the float32 result
        return work + final * (item + 12)
    return work + final * 4 + min(final, max(BAND_PIXELS, width)) * header.lut_bytes


def _jpeg_draft_scale(width: int, height: int, factor: int) -> int:
    """The DCT scale (1, 2, 4 or 8, <= factor) Pillow's draft picks for decode_image's request."""
    scale = min(width // -(-width // factor), height // -(-height // factor))
    return next(s for s in (8, 4, 2, 1) if s <= scale)
