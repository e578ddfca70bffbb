"""Correspondence accuracy through the running service, as a user reaches it: the service with the
shipped encoder on 127.0.0.1 (uvicorn on the app factory, as `ace serve` runs it), every answer
from POST /match over HTTP.

    python benchmarks/service_accuracy.py --data data/phantoms-eval --data data/phantoms-eval-hard \
        --pairs 200 --real

Per data set: the same seeded (query, target) pairs of different subjects as `ace eval`
(training.evaluate.choose_pairs, seed 0), all shared landmarks sent as `points` with the target
uploaded as `targets`; with --real, every real image of `ace eval --real` under one affine and
one elastic warp (seed 0), the original as query, the warped copy as target. Prints median error
(% of the diagonal) and the shares within 2 % and 5 %.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from ace_model.preprocess import DecodedImage, to_pil
from training.evaluate import choose_pairs, pair_landmarks
from training.landmarks import read_landmark_set

sys.path.insert(0, str(Path(__file__).parent))
from serving import Server  # a sibling script

SHIPPED = Path(__file__).resolve().parents[1] / "artifacts" / "ace-dense-phantoms"


def png(image: DecodedImage) -> bytes:
    """8-bit PNG, grey or RGB: the decoded pixels exactly (they are 8-bit)."""
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG")
    return buffer.getvalue()


def match(client: httpx.Client, query: bytes, target: bytes, points: np.ndarray) -> np.ndarray:
    files = [("image", ("q.png", query, "image/png")), ("targets", ("t.png", target, "image/png"))]
    response = client.post("/match", files=files, data={"points": json.dumps(points.tolist()), "k": "1"})
    response.raise_for_status()
    return np.array([[r["correspondences"][0]["x"], r["correspondences"][0]["y"]]
                     for r in response.json()["results"]])


def phantom_errors(client: httpx.Client, data: Path, pairs: int) -> np.ndarray:
    items = read_landmark_set(data)
    errors = []
    for q, t in choose_pairs([i.patient_id for i in items], pairs, seed=0):
        names = pair_landmarks(items[q], items[t])
        points = np.array([items[q].points[n] for n in names])
        found = match(client, items[q].path.read_bytes(), items[t].path.read_bytes(), points)
        truth = np.array([items[t].points[n] for n in names])
        size = Image.open(items[t].path).size
        errors.append(np.hypot(*(found - truth).T) / np.hypot(*size) * 100)
    return np.concatenate(errors)


def real_errors(client: httpx.Client) -> np.ndarray:
    from training.eval_real import cases, real_images

    errors = []
    for case in cases(real_images()[0], per_kind=1, seed=0):
        found = match(client, png(case.original), png(case.warped), case.points)
        diagonal = np.hypot(case.warped.width, case.warped.height)
        errors.append(np.hypot(*(found - case.truth).T) / diagonal * 100)
    return np.concatenate(errors)


def row(name: str, pct: np.ndarray) -> str:
    return (f"| {name} | {len(pct)} | {np.median(pct):.2f} | {100 * np.mean(pct <= 2):.1f} | "
            f"{100 * np.mean(pct <= 5):.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", type=Path, default=SHIPPED)
    parser.add_argument("--data", type=Path, action="append", default=[])
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--real", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    # the service as `ace serve` runs it (uvicorn on the app factory), on 127.0.0.1
    with Server(args.encoder, args.threads, "cpu") as server, \
            httpx.Client(base_url=server.url, timeout=300) as client:
        rows = [row(f"phantoms {d.name}", phantom_errors(client, d, args.pairs)) for d in args.data]
        if args.real:
            rows.append(row("real images (affine + elastic)", real_errors(client)))
    print("| through /match | points | median % diag | ≤2 % (%) | ≤5 % (%) |\n|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
