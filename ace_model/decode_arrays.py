"""Array arithmetic of decoding: value ranges to uint8, block means of integer-reduced decodes, DICOM
stored values. Pure NumPy on arrays the decoder owns (ace_model.decode)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ace_model.errors import ImageDecodeError

BAND_PIXELS = 1 << 16  # DICOM LUTs and block means run on bands of rows this large: float64 copies stay small


def finite_range(values: np.ndarray) -> tuple[float, float]:
    """NaN or infinite values (float TIFF, bad rescale) would make every similarity NaN."""
    low, high = float(values.min()), float(values.max())  # NaN propagates through min and max
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ImageDecodeError("corrupt", "the image holds NaN or infinite pixel values")
    return low, high


def minmax_u8(values: np.ndarray) -> np.ndarray:
    """float32 `values` (owned by the caller: scaled in place) -> uint8 over their range, rounded."""
    return scale_u8(values, *finite_range(values))


def scale_u8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """float32 `values` (owned by the caller: scaled in place) -> uint8, low -> 0 and high -> 255,
    rounded and clipped; all 0 when high <= low."""
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    values -= np.float32(low)
    values *= np.float32(255 / (high - low))
    values += np.float32(0.5)
    np.clip(values, 0, 255, out=values)
    return values.astype(np.uint8)


def rows_per_band(width: int) -> int:
    """Rows of a `width` px image in one band of about BAND_PIXELS (at least one row)."""
    return max(1, BAND_PIXELS // max(1, width))


def block_mean(rows: Callable[[int, int], np.ndarray], height: int, width: int, factor: int,
                dtype: np.dtype) -> np.ndarray:
    """Means of factor x factor blocks (partial ones at the right and bottom edges) of an image
    read through `rows(top, bottom)` one band of whole blocks at a time (_band_rows), so the
    float64 sums stay one band's size.
    Integer dtypes get the means rounded, so LUTs meant for the stored values still apply."""
    band_rows = _band_rows(width, height, factor)
    col_counts = np.diff(np.append(np.arange(0, width, factor), width))
    out: np.ndarray | None = None
    for top in range(0, height, band_rows):
        band = rows(top, min(top + band_rows, height))  # (r, W[, C])
        row_counts = np.diff(np.append(np.arange(0, band.shape[0], factor), band.shape[0]))
        sums = _block_sums(band, factor)
        counts = np.outer(row_counts, col_counts)
        means = sums / counts.reshape(*counts.shape, *([1] * (sums.ndim - 2)))
        if out is None:
            out = np.empty((-(-height // factor), *means.shape[1:]), dtype)
        first = top // factor
        out[first : first + len(means)] = np.rint(means) if np.issubdtype(dtype, np.integer) else means
    assert out is not None
    return out


def _block_sums(band: np.ndarray, factor: int) -> np.ndarray:
    """(r, W[, C]) -> float64 sums of its factor x factor blocks, (ceil(r / f), ceil(W / f)[, C]):
    strided adds, ~10x faster than np.add.reduceat casting integers."""
    rows = band[0::factor].astype(np.float64)
    for k in range(1, factor):
        part = band[k::factor]
        rows[: len(part)] += part
    sums = rows[:, 0::factor].copy()
    for k in range(1, factor):
        part = rows[:, k::factor]
        sums[:, : part.shape[1]] += part
    return sums


def _band_rows(width: int, height: int, factor: int) -> int:
    """Rows block_mean reads at once: whole blocks, about BAND_PIXELS, at most 1/32 of the image
    (so its float64 sums stay a small share of what a full decode holds)."""
    return factor * max(1, min(BAND_PIXELS // (factor * width), height // (32 * factor)))


def band_pixels(width: int, height: int, factor: int) -> int:
    return min(height, _band_rows(width, height, factor)) * width


def stored_values(values: np.ndarray, unused: int) -> np.ndarray:
    """`values` with their `unused` high bits cleared (sign-extended if signed), as pydicom does."""
    if not unused:
        return values
    values = values << unused
    np.right_shift(values, unused, out=values)
    return values
