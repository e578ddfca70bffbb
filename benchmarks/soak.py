"""Soak: 16 closed-loop clients for 10 minutes against a real service process, mixing good requests
(/match with a target, /heatmap, /preview) and bad ones (not an image, truncated PNG and DICOM,
NaN coordinates, a missing field, broken JSON, an image past the pixel limit, a header flood).

    python benchmarks/soak.py --seconds 600 --clients 16

Reports per kind the count and statuses, the 5xx count (must be 0), p50/p99 of the good
requests, and the service process's RSS after warm-up, at the end and at its peak (sampled).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file

sys.path.insert(0, str(Path(__file__).parent))
from serving import Server  # a sibling script

SHIPPED = Path(__file__).resolve().parents[1] / "artifacts" / "ace-dense-phantoms"
Request = Callable[[httpx.AsyncClient], "asyncio.Future[httpx.Response]"]


def png(seed: int, side: int = 512) -> bytes:
    ys, xs = np.mgrid[0:side, 0:side]
    rng = np.random.default_rng(seed)
    grey = (np.sin(xs / (9 + seed)) + np.cos(ys / 13) + 0.2 * rng.random((side, side)) + 2) / 4.2
    out = io.BytesIO()
    Image.fromarray((grey * 255).astype(np.uint8)).save(out, "PNG")
    return out.getvalue()


def requests() -> dict[str, tuple[bool, Callable[[httpx.AsyncClient], object]]]:
    """kind -> (good?, a coroutine function sending it)."""
    query, target = png(1), png(2)
    dicom = Path(str(get_testdata_file("CT_small.dcm"))).read_bytes()
    bad_slope = pydicom.dcmread(io.BytesIO(dicom))
    del bad_slope.RescaleSlope
    bad_slope.add_new(0x00281053, "LO", "abc")
    crafted = io.BytesIO()
    bad_slope.save_as(crafted)
    huge = io.BytesIO()
    Image.new("L", (9000, 9000)).save(huge, "PNG")  # 81 Mpx in ~80 kB: past ACE_MAX_PIXELS

    def upload(image: bytes, *targets: bytes) -> list[tuple[str, tuple[str, bytes, str]]]:
        files = [("image", ("q", image, "application/octet-stream"))]
        return files + [("targets", ("t", t, "application/octet-stream")) for t in targets]

    points = {"points": json.dumps([[100, 120], [300, 260], [256, 400]])}
    return {
        "match": (True, lambda c: c.post("/match", files=upload(query, target), data=points)),
        "heatmap": (True, lambda c: c.post("/heatmap", files=upload(query, target),
                                           data={"point": "[200, 200]"})),
        "preview dicom": (True, lambda c: c.post("/preview", files=upload(dicom))),
        "not an image": (False, lambda c: c.post("/match", files=upload(b"hello" * 100), data=points)),
        "truncated png": (False, lambda c: c.post("/match", files=upload(query[:3000]), data=points)),
        "crafted dicom": (False, lambda c: c.post("/preview", files=upload(crafted.getvalue()))),
        "NaN point": (False, lambda c: c.post("/match", files=upload(query), data={"points": "[[NaN, 1]]"})),
        "missing image": (False, lambda c: c.post("/match", data=points)),
        "broken json": (False, lambda c: c.post("/match", files=upload(query), data={"points": "[[1,"})),
        "past pixel limit": (False, lambda c: c.post("/match", files=upload(huge.getvalue()), data=points)),
        "header flood": (False, lambda c: c.get("/health", headers={"X-Flood": "a" * 64_000})),
    }


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def soak(url: str, pid: int, clients: int, seconds: float) -> dict[str, object]:
    kinds = requests()
    order = list(kinds)
    statuses: dict[str, Counter[int]] = {k: Counter() for k in order}
    good_ms: list[float] = []
    rss = {"start": rss_mb(pid), "peak": 0.0}
    deadline = time.monotonic() + seconds

    async def client_loop(offset: int) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            for kind in itertools.islice(itertools.cycle(order), offset, None):
                if time.monotonic() > deadline:
                    return
                good, send = kinds[kind]
                started = time.perf_counter()
                try:
                    response = await send(client)  # type: ignore[misc]
                    statuses[kind][response.status_code] += 1
                except httpx.HTTPError as err:
                    statuses[kind][-1] += 1  # the connection was closed on us
                    if good:
                        print(f"{kind}: {err!r}", file=sys.stderr)
                    continue
                if good and response.status_code == 200:
                    good_ms.append((time.perf_counter() - started) * 1000)

    async def sample_rss() -> None:
        while time.monotonic() < deadline:
            rss["peak"] = max(rss["peak"], rss_mb(pid))
            await asyncio.sleep(1)

    await asyncio.gather(sample_rss(), *(client_loop(n) for n in range(clients)))
    rss["end"] = rss_mb(pid)
    server_errors = sum(n for c in statuses.values() for s, n in c.items() if s >= 500)
    return {"clients": clients, "seconds": seconds, "server_errors": server_errors,
            "good_p50_ms": float(np.percentile(good_ms, 50)),
            "good_p99_ms": float(np.percentile(good_ms, 99)),
            "good_requests": len(good_ms), "rss_mb": rss,
            "statuses": {k: dict(sorted(c.items())) for k, c in statuses.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--encoder", type=Path, default=SHIPPED)
    args = parser.parse_args()
    with Server(args.encoder, args.threads, "cpu") as server:
        asyncio.run(soak(server.url, server.process.pid, args.clients, 20))  # warm-up, not reported
        result = asyncio.run(soak(server.url, server.process.pid, args.clients, args.seconds))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
