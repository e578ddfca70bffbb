"""A trained encoder through the service: phantom landmarks found in another subject via `targets`.

The service's answer must equal the library's (decode, letterbox, encode, `match.locate`) for the
same images, and land within 5 % of the diagonal of the truth (median over the 14 landmarks).
When the encoder itself misses that bar through the library too, the accuracy part is an xfail
naming the encoder's error: that is a model-quality result, not a service fault.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from ace_model.encoder import load_encoder
from ace_model.match import locate
from ace_model.preprocess import load_image, prepare
from service.config import Settings
from tests.service.conftest import running_server

TRAINED = Path(__file__).resolve().parents[2] / "artifacts" / "ace-cpu-phantoms"
HELD_OUT = 5000  # subject ids far from any training subject
SIZE = 512
BAR = 0.05  # fraction of the image diagonal


def library_answer(query_path: Path, target_path: Path, points: np.ndarray) -> np.ndarray:
    encoder = load_encoder(TRAINED)
    (q_tensor, q_map), (t_tensor, t_map) = (
        prepare(load_image(path), encoder.spec.img_size, encoder.grid) for path in (query_path, target_path)
    )
    with torch.inference_mode():
        grids = encoder(torch.stack([q_tensor, t_tensor])).patches
    valid = torch.from_numpy(t_map.valid_patches()).view(encoder.grid, encoder.grid)
    return t_map.from_grid(locate(grids[0], q_map.to_grid(points), grids[1], valid).xy)


@pytest.mark.slow
@pytest.mark.skipif(not (TRAINED / "encoder.json").is_file(),
                    reason=f"needs the trained encoder artifact {TRAINED} (train it with `ace train "
                           "--preset cpu` on phantoms and `ace export`)")
def test_phantom_landmarks_land_within_5_percent_of_the_diagonal(tmp_path: Path) -> None:
    from training.landmarks import read_landmark_set
    from training.phantoms import PhantomConfig, write_phantom_set

    out = write_phantom_set(tmp_path / "phantoms", 2, seed=0, config=PhantomConfig(size=SIZE),
                            start_id=HELD_OUT)
    query, target = read_landmark_set(out)
    names = sorted(query.points)
    points = np.array([query.points[name] for name in names])
    settings = Settings(encoder=TRAINED, device="cpu", poll_interval_s=0)
    with running_server(settings) as url, httpx.Client(base_url=url, timeout=120) as client:
        files = [("image", ("q.png", query.path.read_bytes(), "image/png")),
                 ("targets", ("t.png", target.path.read_bytes(), "image/png"))]
        response = client.post("/match", files=files, data={"points": json.dumps(points.tolist())})
    assert response.status_code == 200, response.text
    found = np.array([[r["correspondences"][0]["x"], r["correspondences"][0]["y"]]
                      for r in response.json()["results"]])
    np.testing.assert_allclose(found, library_answer(query.path, target.path, points), atol=0.5)
    truth = np.array([target.points[name] for name in names])
    errors = np.hypot(*(found - truth).T) / float(np.hypot(SIZE, SIZE))
    report = dict(zip(names, errors.round(3).tolist(), strict=True))
    if float(np.median(errors)) >= BAR:
        pytest.xfail(f"encoder {TRAINED.name} misses the 5% bar through the library as well "
                     f"(median {np.median(errors):.1%} of the diagonal): {report}")
    assert float(np.median(errors)) < BAR, report
