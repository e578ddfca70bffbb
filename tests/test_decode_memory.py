"""Memory of decoding: a reduced decode peaks far below a full one, and decode_memory_bytes (from
peek_image's header) bounds the measured peak without being uselessly loose.

Two measures: tracemalloc sees numpy and Python allocations; Pillow's and the codecs' own buffers
are native, so the resident set's high-water mark (Linux: reset through /proc/self/clear_refs)
measures them too. Transparent huge pages are off while measuring: numpy asks for them on large
arrays, which would round the resident set up by up to 2 MiB at random.
"""

from __future__ import annotations

import ctypes
import gc
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ace_model.decode_memory import OVERHEAD_BYTES
from ace_model.preprocess import decode_image, decode_memory_bytes, peek_image
from tests.decode_fuzz_corpus import FORMATS, sample_image

pytestmark = pytest.mark.filterwarnings("ignore")
MB = 1e6
PR_SET_THP_DISABLE = 41
SIZES = ((512, 384), (1600, 1200))
MAX_SIDES = (None, 200)


def traced_peak(run: Callable[[], object]) -> int:
    assert not tracemalloc.is_tracing(), "tracemalloc is already on: this test measures with it itself"
    gc.collect(1)  # a full collection costs 0.2 s in a process with torch loaded
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


@contextmanager
def no_huge_pages(libc: ctypes.CDLL) -> Iterator[None]:
    libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)
    try:
        yield
    finally:
        libc.prctl(PR_SET_THP_DISABLE, 0, 0, 0, 0)


@pytest.fixture(scope="module")
def resident_peak() -> Callable[[Callable[[], object]], int]:
    """Measures the rise of the resident set's high-water mark during run() (Linux, glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        Path("/proc/self/clear_refs").write_text("5")
        _status_bytes("VmHWM:")
    except (OSError, KeyError) as err:
        pytest.skip(f"no resettable resident-set peak here: {err}")

    def measure(run: Callable[[], object]) -> int:
        with no_huge_pages(libc):
            gc.collect(1)
            libc.malloc_trim(0)  # freed heap pages go back, so reusing them cannot hide a peak
            Path("/proc/self/clear_refs").write_text("5")
            base = _status_bytes("VmRSS:")
            run()
            return _status_bytes("VmHWM:") - base

    return measure


@pytest.mark.slow
@pytest.mark.parametrize("image_format", FORMATS)
def test_the_estimate_bounds_the_peak_and_is_a_useful_bound(
    image_format: str, resident_peak: Callable[[Callable[[], object]], int]
) -> None:
    """measured <= estimate <= 4 x measured, where measured is the larger of the two measures;
    below OVERHEAD_BYTES (parsers, buffers, allocator slack) a peak counts as OVERHEAD_BYTES."""
    failures = []
    for width, height in SIZES:
        data = sample_image(image_format, width, height)
        header = peek_image(data)
        for max_side in MAX_SIDES:
            decode_image(data, 64_000_000, max_side)  # the first decode loads codecs, fills caches
            resident = resident_peak(lambda: decode_image(data, 64_000_000, max_side))  # noqa: B023
            traced = traced_peak(lambda: decode_image(data, 64_000_000, max_side))  # noqa: B023
            estimate = decode_memory_bytes(header, max_side)
            measured = max(resident, traced)
            line = (f"{image_format} {width}x{height} max_side={max_side}: estimate {estimate / MB:.2f} MB, "
                    f"resident {resident / MB:.2f} MB, traced {traced / MB:.2f} MB")
            if not measured <= estimate <= 4 * max(measured, OVERHEAD_BYTES):
                failures.append(line)
    assert not failures, "\n".join(failures)


@pytest.mark.slow
@pytest.mark.parametrize(("image_format", "width", "height"), [
    ("png8", 3000, 2000), ("jpeg", 2400, 1600), ("dicom16", 3000, 2000),
])
def test_a_reduced_decode_peaks_far_below_a_full_one(image_format: str, width: int, height: int) -> None:
    """Reduced by 8 (max_side 375 / 300): tracemalloc's peak at least 3x lower (measured: 3.4x for the
    16-bit DICOM, whose full decode is now the uint8 result beside a fixed ~1.5 MB for its LUT table;
    29-64x for the others); the estimate at least 1.5x: Pillow decodes a PNG whole before reducing
    it, a third of what the full decode needs now that 8-bit pixels stay uint8 (resident: 6.3 vs 18
    MB), and the DICOM's LUT table and the fixed overhead (~5 MB together) do not shrink."""
    data = sample_image(image_format, width, height)
    max_side = max(width, height) // 8
    decode_image(data, 64_000_000, max_side)
    full = traced_peak(lambda: decode_image(data, 64_000_000))
    reduced = traced_peak(lambda: decode_image(data, 64_000_000, max_side))
    assert reduced * 3 < full, f"reduced {reduced / MB:.1f} MB vs full {full / MB:.1f} MB"
    header = peek_image(data)
    assert decode_memory_bytes(header, max_side) * 1.5 < decode_memory_bytes(header, None)
