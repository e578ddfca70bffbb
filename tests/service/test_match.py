"""/match over real HTTP: correspondence in shifted copies, index matches, boxes, limits."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.config import Settings
from tests.service.helpers import TEST_DEVICE, block_texture, build_index, png_bytes, running_server

HEIGHT, WIDTH = 160, 128  # letterboxed into 64 px: 0.4 model px per pixel, one patch = 40 px
PATCH_PX = 40.0
SHIFT = 40  # whole patches, so shifted patches keep their exact content


@pytest.fixture(scope="module")
def texture() -> np.ndarray:
    return block_texture(3, HEIGHT + 2 * SHIFT, WIDTH + 2 * SHIFT)


@pytest.fixture(scope="module")
def images(texture: np.ndarray) -> dict[str, bytes]:
    """`base` and `shifted` (base content moved up-left by SHIFT px) plus an unrelated image."""
    return {
        "base": png_bytes(texture[:HEIGHT, :WIDTH]),
        "shifted": png_bytes(texture[SHIFT : SHIFT + HEIGHT, SHIFT : SHIFT + WIDTH]),
        "other": png_bytes(block_texture(99, HEIGHT, WIDTH)),
    }


@pytest.fixture(scope="module")
def index_root(tmp_path_factory: pytest.TempPathFactory, encoder_dir: Path,
               images: dict[str, bytes]) -> Path:
    root = tmp_path_factory.mktemp("index")
    build_index(root, encoder_dir, images, root.parent / "work")
    return root


@pytest.fixture(scope="module")
def base_url(encoder_dir: Path, index_root: Path) -> Iterator[str]:
    settings = Settings(encoder=encoder_dir, index_root=index_root, device=TEST_DEVICE, poll_interval_s=0)
    with running_server(settings) as url:
        yield url


@pytest.fixture
def post(base_url: str) -> Iterator[Callable[..., httpx.Response]]:
    with httpx.Client(base_url=base_url, timeout=60) as client:
        def send(image: bytes, targets: list[bytes] = (), **fields: object) -> httpx.Response:
            files = [("image", ("q.png", image, "image/png"))]
            files += [("targets", (f"t{i}.png", t, "image/png")) for i, t in enumerate(targets)]
            data = {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}
            return client.post("/match", files=files, data=data)
        yield send


POINTS = [[60.0, 100.0], [100.0, 140.0], [70.0, 60.0]]  # away from the shifted image's border


def test_targets_find_shifted_points_within_a_patch(post, images) -> None:
    response = post(images["base"], [images["shifted"], images["base"]], points=POINTS)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["index_version"] is not None and len(body["results"]) == len(POINTS)
    for point, result in zip(POINTS, body["results"], strict=True):
        shifted, same = result["correspondences"]
        assert (shifted["target"], same["target"]) == (0, 1)
        assert abs(shifted["x"] - (point[0] - SHIFT)) <= PATCH_PX
        assert abs(shifted["y"] - (point[1] - SHIFT)) <= PATCH_PX
        assert abs(same["x"] - point[0]) <= PATCH_PX and abs(same["y"] - point[1]) <= PATCH_PX
        assert same["mutual"] and -1.0 <= same["score"] <= 1.0


def test_index_matches_are_real_images_in_bounds_and_exclude_the_query(post, images) -> None:
    body = post(images["base"], points=POINTS, k=4).json()
    for result in body["results"]:
        assert 1 <= len(result["matches"]) <= 4
        for hit in result["matches"]:
            assert hit["image_id"] in {"shifted", "other"}  # `base` is the query itself
            assert 0 <= hit["x"] <= WIDTH and 0 <= hit["y"] <= HEIGHT
            assert hit["patient_id"] == f"patient-{hit['image_id']}"
    top = body["results"][0]["matches"][0]
    assert top["image_id"] == "shifted"
    assert abs(top["x"] - (POINTS[0][0] - SHIFT)) <= PATCH_PX


def test_image_ids_restrict_search_and_give_correspondences(post, images) -> None:
    body = post(images["base"], points=POINTS[:1], image_ids=["shifted"], k=2).json()
    result = body["results"][0]
    assert {hit["image_id"] for hit in result["matches"]} == {"shifted"}
    (found,) = result["correspondences"]
    assert found["target"] == "shifted"
    assert abs(found["x"] - (POINTS[0][0] - SHIFT)) <= PATCH_PX


def test_boxes_are_located_and_reported(post, images) -> None:
    box = [40.0, 80.0, 100.0, 140.0]
    body = post(images["base"], [images["shifted"]], boxes=[box]).json()
    (result,) = body["results"]
    assert result["box"] == box and result["point"] == [70.0, 110.0]
    found = result["correspondences"][0]
    assert abs(found["x"] - (70.0 - SHIFT)) <= PATCH_PX and abs(found["y"] - (110.0 - SHIFT)) <= PATCH_PX


def test_timing_is_reported(post, images) -> None:
    timing = post(images["base"], points=POINTS[:1]).json()["timing_ms"]
    assert set(timing) == {"queue", "inference", "search", "total"}
    assert timing["total"] >= timing["inference"] >= 0
