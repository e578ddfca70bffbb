"""A trained encoder through the service: phantom landmarks found in another subject via `targets`."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.config import Settings
from tests.service.conftest import running_server

TRAINED = Path(__file__).resolve().parents[2] / "artifacts" / "ace-cpu-phantoms"
HELD_OUT = 5000  # subject ids far from any training subject


@pytest.mark.slow
@pytest.mark.skipif(not (TRAINED / "encoder.json").is_file(),
                    reason=f"needs the trained encoder artifact {TRAINED} (train it with `ace train "
                           "--preset cpu` on phantoms and `ace export`)")
def test_phantom_landmarks_land_within_5_percent_of_the_diagonal(tmp_path: Path) -> None:
    from training.landmarks import read_landmark_set
    from training.phantoms import PhantomConfig, write_phantom_set

    out = write_phantom_set(tmp_path / "phantoms", 2, seed=0, config=PhantomConfig(size=512),
                            start_id=HELD_OUT)
    query, target = read_landmark_set(out)
    names = sorted(query.points)
    settings = Settings(encoder=TRAINED, device="cpu", poll_interval_s=0)
    with running_server(settings) as url, httpx.Client(base_url=url, timeout=120) as client:
        files = [("image", ("q.png", query.path.read_bytes(), "image/png")),
                 ("targets", ("t.png", target.path.read_bytes(), "image/png"))]
        points = [list(query.points[name]) for name in names]
        response = client.post("/match", files=files, data={"points": json.dumps(points)})
    assert response.status_code == 200, response.text
    found = np.array([[r["correspondences"][0]["x"], r["correspondences"][0]["y"]]
                      for r in response.json()["results"]])
    truth = np.array([target.points[name] for name in names])
    diagonal = float(np.hypot(512, 512))
    errors = np.hypot(*(found - truth).T) / diagonal
    assert float(np.median(errors)) < 0.05, dict(zip(names, errors.round(3).tolist(), strict=True))
