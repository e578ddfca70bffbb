"""HTTP checks for docker/smoke.sh against a running ACE container (standard library only, so it
runs with any host Python 3).

    smoke_client.py ready   URL TIMEOUT_S
    smoke_client.py match   URL DATASET_DIR        POST /match with a phantom and its landmarks
    smoke_client.py version URL                    print the served index version
    smoke_client.py swapped URL OLD_VERSION TIMEOUT_S   wait until /info serves another version
    smoke_client.py encoder URL ENCODER_JSON       /info and /match name the encoder exported there
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
    """The query image uploaded again as the target: whatever the encoder's weights, a point at a
    patch centre finds its own patch (cosine 1) and lands within one patch stride (sub-patch
    refinement may move it inside the patch); landmarks land there at least in the median."""
    image, points = landmarks(dataset)
    data = image.read_bytes()
    status, info = get(f"{url}/info")
    check(status == 200, f"/info answered {status}")
    indexed = info.get("index") is not None
    width, height = _png_size(data)
    stride = max(width, height) / info["encoder"]["grid"]
    centres = [[(i + 0.5) * stride, (j + 0.5) * stride] for i, j in ((1, 1), (3, 7), (7, 7), (5, 11))
               if (i + 0.5) * stride < width and (j + 0.5) * stride < height]
    found = _correspondences(url, data, image.name, centres, 1)
    for point, hit in zip(centres, found, strict=True):
        check(hit["score"] > 0.99 and math.dist(point, (hit["x"], hit["y"])) <= stride,
              f"patch centre {point} matched to {hit} in the same image")
    k = 3
    body = _post_match(url, data, image.name, points, k)
    served = info["index"]["version"] if indexed else None
    check(body.get("index_version") == served, "the answer names another index version than /info")
    results = body.get("results", [])
    check(len(results) == len(points), f"{len(results)} results for {len(points)} points")
    for result in results:
        check(len(result["matches"]) == (k if indexed else 0), f"{len(result['matches'])} index matches")
        for hit in result["matches"]:
            check(bool(hit["image_id"]) and -1.001 <= hit["score"] <= 1.001, f"bad match {hit}")
    errors = sorted(math.dist(point, (r["correspondences"][0]["x"], r["correspondences"][0]["y"]))
                    for point, r in zip(points, results, strict=True))
    median = errors[len(errors) // 2]
    check(median <= stride, f"median landmark self-correspondence error {median:.1f} px > {stride:.1f} px")
    hits = {hit["image_id"] for result in results for hit in result["matches"]}
    print(f"smoke_client: /match ok: {len(centres)} patch centres found themselves; {len(points)} landmarks, "
          f"median self-correspondence error {median:.1f} px (stride {stride:.1f}); index {served} "
          f"answered with {len(hits)} images; timing {body.get('timing_ms')}")


def _post_match(url: str, data: bytes, name: str, points: list[list[float]], k: int) -> dict:
    return post_multipart(f"{url}/match", {"points": json.dumps(points), "k": str(k)},
                          [("image", name, data), ("targets", name, data)])


def _correspondences(url: str, data: bytes, name: str, points: list[list[float]], k: int) -> list[dict]:
    results = _post_match(url, data, name, points, k)["results"]
    return [result["correspondences"][0] for result in results]


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


def serves_encoder(url: str, encoder_json: Path) -> None:
    """After a retrain, the api must serve the exported encoder together with its new index."""
    exported = json.loads(encoder_json.read_text())["fingerprint"]
    status, info = get(f"{url}/info")
    check(status == 200, f"/info answered {status}")
    check(info["encoder"]["fingerprint"] == exported,
          f"/info names encoder {info['encoder']['fingerprint']}, the exported one is {exported}")
    version = info["index"]["version"]
    print(f"smoke_client: the api serves the retrained encoder {exported} with index {version}")


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
    elif command == "encoder":
        serves_encoder(url, Path(rest[0]))
    else:
        fail(f"unknown command {command}")


if __name__ == "__main__":
    main(sys.argv[1:])
