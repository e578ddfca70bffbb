"""The shipped encoder through the service: phantom landmarks of held-out subjects found in other
subjects, both in uploaded targets and among index hits. A gate: the shipped encoder is part of the
repository, so nothing here is skipped or expected to fail.

The service's answer must equal the library's (decode, letterbox, both levels, the second look,
`match.match_points`) for the same images, and be accurate: these are the product's figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from ace_model.encoder import Encoder, load_encoder
from ace_model.match import Levels, common_looks, look_scales, match_points
from ace_model.preprocess import CoordinateMap, DecodedImage, load_image, normalise, prepare
from service.config import Settings
from tests.service.helpers import running_server
from training.landmarks import LandmarkImage, read_landmark_set

SHIPPED = Path(__file__).resolve().parents[2] / "artifacts" / "ace-dense-phantoms"
HELD_OUT = 5000  # subject ids far from any training subject (training: seed 1, subjects 0-1199)
SIZE = 512


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> list[LandmarkImage]:
    from training.phantoms import PhantomConfig, write_phantom_set

    out = write_phantom_set(tmp_path_factory.mktemp("held-out"), 8, seed=7, config=PhantomConfig(size=SIZE),
                            start_id=HELD_OUT)
    return read_landmark_set(out)


def embed_all(encoder: Encoder, image: DecodedImage) -> tuple[Levels, list[Levels], CoordinateMap]:
    size, grid = encoder.spec.img_size, encoder.grid
    inputs = [prepare(image, size, grid)]
    inputs += [prepare(image, s * size, s * grid) for s in look_scales(image.width, image.height, size)]
    levels = []
    with torch.inference_mode():
        for tensor, coords in inputs:
            out = encoder(normalise(tensor[None]))
            levels.append(Levels.of(out.patches[0], None if out.fine is None else out.fine[0], coords))
    return levels[0], levels[1:], inputs[0][1]


def library_answer(query: Path, target: Path, points: np.ndarray) -> np.ndarray:
    encoder = load_encoder(SHIPPED)
    (q, q_looks, q_map), (t, t_looks, t_map) = (embed_all(encoder, load_image(p)) for p in (query, target))
    found = match_points(q, q_map.to_model(points), t, second_look=common_looks(q_looks, t_looks))
    return t_map.to_original(found.xy)


def correspondences(query: LandmarkImage, target: LandmarkImage, form: dict[str, str]) -> list[dict]:
    """POST /match of the shipped encoder with `target` uploaded; each query's answer in it."""
    settings = Settings(encoder=SHIPPED, device="cpu", poll_interval_s=0)
    with running_server(settings) as url, httpx.Client(base_url=url, timeout=120) as client:
        files = [("image", ("q.png", query.path.read_bytes(), "image/png")),
                 ("targets", ("t.png", target.path.read_bytes(), "image/png"))]
        response = client.post("/match", files=files, data=form)
    assert response.status_code == 200, response.text
    return [r["correspondences"][0] for r in response.json()["results"]]


def test_the_shipped_artifact_is_a_two_level_encoder() -> None:
    encoder = load_encoder(SHIPPED)
    assert encoder.spec.is_dense and encoder.levels()["fine"] is not None
    assert sum(f.stat().st_size for f in SHIPPED.iterdir()) < 20 * 2**20


@pytest.mark.slow
def test_phantom_landmarks_are_found_in_another_subject(phantoms: list[LandmarkImage]) -> None:
    query, target = phantoms[0], phantoms[1]
    names = sorted(query.points)
    points = np.array([query.points[name] for name in names])
    answers = correspondences(query, target, {"points": json.dumps(points.tolist())})
    found = np.array([[a["x"], a["y"]] for a in answers])
    np.testing.assert_allclose(found, library_answer(query.path, target.path, points), atol=0.5)
    truth = np.array([target.points[name] for name in names])
    errors = np.hypot(*(found - truth).T) / float(np.hypot(SIZE, SIZE))
    report = dict(zip(names, errors.round(4).tolist(), strict=True))
    assert float(np.median(errors)) < 0.01, report
    assert float(np.max(errors)) < 0.05, report
    assert all(0.0 <= a["confidence"] <= 1.0 for a in answers)


@pytest.mark.slow
def test_index_hits_are_located_on_the_same_landmark(phantoms: list[LandmarkImage], tmp_path: Path) -> None:
    from training.build_index import build_index

    build_index(SHIPPED, [p.path.parent.parent for p in phantoms[:1]], tmp_path / "index", publish=True)
    query = phantoms[0]
    names = ["carina", "hemidiaphragm_dome_left", "aortic_knob", "costophrenic_angle_right"]
    points = np.array([query.points[name] for name in names])
    settings = Settings(encoder=SHIPPED, index_root=tmp_path / "index", device="cpu", poll_interval_s=0)
    with running_server(settings) as url, httpx.Client(base_url=url, timeout=120) as client:
        files = [("image", ("q.png", query.path.read_bytes(), "image/png"))]
        response = client.post("/match", files=files, data={"points": json.dumps(points.tolist()), "k": "5"})
    assert response.status_code == 200, response.text
    by_id = {p.image_id: p for p in phantoms}
    results = response.json()["results"]
    hits = [(name, m) for name, r in zip(names, results, strict=True) for m in r["matches"]]
    other = [(name, m) for name, m in hits if m["image_id"] != query.image_id]
    assert other and all(m["located"] for _, m in other)
    truth = [by_id[m["image_id"]].points[name] for name, m in other]
    errors = [np.hypot(m["x"] - x, m["y"] - y) / np.hypot(SIZE, SIZE)
              for (_, m), (x, y) in zip(other, truth, strict=True)]
    assert float(np.mean(np.asarray(errors) < 0.05)) >= 0.9, errors


@pytest.mark.slow
def test_boxes_around_landmarks_are_found_in_another_subject(phantoms: list[LandmarkImage]) -> None:
    query, target = phantoms[2], phantoms[3]
    names = sorted(query.points)
    centres = np.array([query.points[name] for name in names])
    boxes = np.concatenate([centres - 12, centres + 12], axis=1).clip(0, SIZE)
    answers = correspondences(query, target, {"boxes": json.dumps(boxes.tolist())})
    found = np.array([[a["x"], a["y"]] for a in answers])
    truth = np.array([target.points[name] for name in names])
    errors = np.hypot(*(found - truth).T) / float(np.hypot(SIZE, SIZE))
    assert float(np.median(errors)) < 0.015 and float(np.max(errors)) < 0.05, errors.round(4)
