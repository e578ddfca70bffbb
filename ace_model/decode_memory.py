"""Upper bounds of the memory decode_image needs, read from an image's header before decoding:
what the service's memory budget reserves for an upload (service/pipeline.py)."""

from __future__ import annotations

from ace_model.decode import BAND_PIXELS, GREY_MODES, WIDE_MODES, ImageHeader, band_pixels, reduction_factor

OVERHEAD_BYTES = 2 << 20  # parsers' objects, read buffers and allocator slack, whatever the image size
TABLE_ENTRY_BYTES = 16  # per stored value a grey table covers, after its LUTs: the float32 values, the
# counts of the values present (int64, then bool), the table's float32 temporaries and the table


def decode_memory_bytes(header: ImageHeader, max_side: int | None) -> int:
    """Upper bound of the peak working memory decode_image(data, ..., max_side) needs for the
    image `header` describes, the DecodedImage it returns included (the input bytes not)."""
    factor = reduction_factor(header.width, header.height, max_side)
    work = _dicom_memory(header, factor) if header.format == "dicom" else _pil_memory(header, factor)
    return OVERHEAD_BYTES + (header.codec_bytes + work) * 9 // 8  # 1/8: allocator and library slack


def _pixels(width: int, height: int, factor: int) -> int:
    return -(-width // factor) * -(-height // factor)


def _pil_memory(header: ImageHeader, factor: int) -> int:
    """The decoded image, its conversion and reduction, tobytes() (chunks and join: 8-bit pixels are a
    view of it), and for wide modes their float32 values and the uint8 result."""
    width, height, mode = header.width, header.height, header.mode
    packed = header.channels * header.bytes_per_sample
    stored = packed if header.channels == 1 else 4
    if mode in WIDE_MODES:  # the whole array, or one band of rows at a time
        work = width * height * (2 * packed + 4) if factor == 1 else (
            _pixels(width, height, factor) * (4 + 1)
            + band_pixels(width, height, factor) * (stored + 2 * packed + 16))
        return width * height * stored + work
    grey = mode in GREY_MODES
    drafted = _jpeg_draft_scale(width, height, factor) if header.format == "jpeg" and factor > 1 else 1
    loaded = _pixels(width, height, drafted)  # what libjpeg (DCT-scaled) or the codec decodes into
    target = 1 if grey else 4  # bytes per pixel of the L or RGB image
    converted = 0 if mode == ("L" if grey else "RGB") else loaded * target
    final = _pixels(width, height, drafted * (factor // drafted))
    reduced = final * target if factor // drafted > 1 else 0
    return loaded * stored + converted + reduced + final * (1 if grey else 3) * 2


def _dicom_memory(header: ImageHeader, factor: int) -> int:
    """Block means (_block_mean_memory), then the uint8 image: see _colour_memory,
    _grey_table_memory and _grey_band_memory."""
    item = header.bytes_per_sample
    final = _pixels(header.width, header.height, factor)
    work = 0 if factor == 1 else _block_mean_memory(header, factor, final)
    if header.channels == 3:
        return work + _colour_memory(final, item, header.signed)
    if item <= 2:  # the table's phases start once the block means are made: only the means overlap
        means = 0 if factor == 1 else final * item
        return max(work, means + _grey_table_memory(header, final))
    return work + _grey_band_memory(header, final)


def _block_mean_memory(header: ImageHeader, factor: int, final: int) -> int:
    """The means in the stored dtype, and for one band of rows at a time: its stored values with the
    unused bits cleared (a copy), the float64 sums of every factor-th row, then float64 sums, int64
    counts, means and rounded means of its blocks."""
    width, samples, item = header.width, header.channels, header.bytes_per_sample
    band = band_pixels(width, header.height, factor)  # stored pixels averaged at once
    block_rows = -(-(band // width) // factor)
    row_sums, blocks = block_rows * width, block_rows * -(-width // factor)
    return samples * (final * item + band * item + row_sums * 8 + blocks * 32)


def _colour_memory(final: int, item: int, signed: bool) -> int:
    """uint8 colour is returned as stored (nothing beyond the block means); other colour goes
    through floats: its stored values with the unused bits cleared (a copy), their float32 copy, the
    uint8 result."""
    return 0 if item == 1 and not signed else final * 3 * (item + 4)


def _grey_table_memory(header: ImageHeader, final: int) -> int:
    """8 and 16-bit grey go through a table of every stored value, in two phases that do not
    overlap: the LUTs on the table's domain (the domain, its copy with the unused bits cleared, the
    LUTs' temporaries or the table's: TABLE_ENTRY_BYTES per value), then per pixel the keys (a copy
    when signed) and the uint8 result (the keys index the table directly), beside the table's
    float32 values, the counts of the values present (int64) and one band of bincount's intp copy."""
    item = header.bytes_per_sample
    domain = 1 << (8 * item)
    lut_phase = domain * (2 * item + max(header.lut_bytes, TABLE_ENTRY_BYTES))
    pixel_phase = final * (item * header.signed + 1) + domain * (4 + 8 + 1) + BAND_PIXELS * 8
    return max(lut_phase, pixel_phase)


def _grey_band_memory(header: ImageHeader, final: int) -> int:
    """Wider grey: the float32 values, the LUTs' copies of one band of rows, the uint8 result."""
    return final * (4 + 1) + min(final, max(BAND_PIXELS, header.width)) * header.lut_bytes


def _jpeg_draft_scale(width: int, height: int, factor: int) -> int:
    """The DCT scale (1, 2, 4 or 8, <= factor) Pillow's draft picks for decode_image's request."""
    scale = min(width // -(-width // factor), height // -(-height // factor))
    return next(s for s in (8, 4, 2, 1) if s <= scale)
