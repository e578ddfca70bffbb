"""HTTP checks for docker/smoke.sh against a running ACE container (standard library only, so it
runs with any host Python 3).

    smoke_client.py ready   URL TIMEOUT_S
    smoke_client.py match   URL DATASET_DIR        POST /match with a phantom and its landmarks
    smoke_client.py version URL                    print the served index version
    smoke_client.py swapped URL OLD_VERSION TIMEOUT_S   wait until /info serves another version
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def post_multipart(url: str, fields: dict[str, str], files: list[tuple[str, str, bytes]]) -> dict:
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
                     .encode())
    for name, filename, data in files:
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n")
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    request = urllib.request.Request(url, data=b"".join(parts), method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.load(response)
    except urllib.error.HTTPError as err:
        fail(f"POST {url} answered {err.code}: {err.read().decode(errors='replace')[:2000]}")
    raise AssertionError("unreachable")


def fail(message: str) -> None:
    print(f"smoke_client: FAIL: {message}", file=sys.stderr)
    raise SystemExit(1)


def check(condition: bool, message: str) -> None:
    if not condition:
        fail(message)


def wait_ready(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            status, body = get(f"{url}/ready")
            if status == 200:
                print(f"smoke_client: ready after {timeout_s - (deadline - time.monotonic()):.0f} s")
                return
            last = f"{status} {body.get('detail', body)}"
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError) as err:
            last = str(err)
        time.sleep(2)
    fail(f"{url}/ready not ready within {timeout_s:.0f} s (last: {last})")


def served_version(url: str) -> str | None:
    status, info = get(f"{url}/info")
    check(status == 200, f"/info answered {status}")
    return (info.get("index") or {}).get("version")


def landmarks(dataset: Path) -> tuple[Path, list[list[float]]]:
    """The first image of a landmark data set and its landmark points."""
    with open(dataset / "landmarks.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    check(bool(rows), f"no landmarks in {dataset / 'landmarks.csv'}")
    first = rows[0]["image"]
    points = [[float(r["x"]), float(r["y"])] for r in rows if r["image"] == first]
    return dataset / first, points


def match(url: str, dataset: Path) -> None:
    image, points = landmarks(dataset)
    data = image.read_bytes()
    status, info = get(f"{url}/info")
    check(status == 200 and info.get("index") is not None, f"/info shows no index: {info}")
    k = 3
    body = post_multipart(f"{url}/match", {"points": json.dumps(points), "k": str(k)},
                          [("image", image.name, data), ("targets", image.name, data)])
    check(body.get("index_version") == info["index"]["version"], "answer names another index version")
    results = body.get("results", [])
    check(len(results) == len(points), f"{len(results)} results for {len(points)} points")
    # An identical upload as the target: every point must come back where it is, within one
    # patch stride (sub-patch refinement), whatever the encoder's weights.
    grid, size = info["encoder"]["grid"], max(_png_size(data))
    tolerance = size / grid
    errors = []
    for point, result in zip(points, results, strict=True):
        check(len(result["matches"]) == k, f"{len(result['matches'])} index matches, asked {k}")
        for hit in result["matches"]:
            check(bool(hit["image_id"]) and -1.001 <= hit["score"] <= 1.001, f"bad match {hit}")
        (found,) = result["correspondences"]
        errors.append(math.dist(point, (found["x"], found["y"])))
    worst = max(errors)
    check(worst <= tolerance, f"self-correspondence off by {worst:.1f} px (> {tolerance:.1f} px)")
    hits = {hit["image_id"] for result in results for hit in result["matches"]}
    print(f"smoke_client: /match ok: {len(points)} landmarks, worst self-correspondence error "
          f"{worst:.1f} px (tolerance {tolerance:.1f}), index hits in {len(hits)} images, "
          f"timing {body.get('timing_ms')}")


def _png_size(data: bytes) -> tuple[int, int]:
    check(data[:8] == b"\x89PNG\r\n\x1a\n", "the phantom is not a PNG")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def wait_swapped(url: str, old: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        version = served_version(url)
        if version not in (None, old):
            print(f"smoke_client: the api now serves index {version} (was {old})")
            return
        time.sleep(1)
    fail(f"the api still serves {old} after {timeout_s:.0f} s")


def main(argv: list[str]) -> None:
    command, url, *rest = argv
    if command == "ready":
        wait_ready(url, float(rest[0]))
    elif command == "match":
        match(url, Path(rest[0]))
    elif command == "version":
        print(served_version(url) or "")
    elif command == "swapped":
        wait_swapped(url, rest[0], float(rest[1]))
    else:
        fail(f"unknown command {command}")


if __name__ == "__main__":
    main(sys.argv[1:])
