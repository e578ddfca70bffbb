"""A retrained encoder and its index are served together, without a restart (issue 6).

The api reads the encoder artifact at ACE_ENCODER; `ace export` replaces it and `ace index build
--publish` publishes a version built by it (keeping a copy of the encoder in the index root's
store). The running api must then serve the new pair, keep every request on one consistent
(encoder, index) pair, roll back to the previous pair, and after a restart serve the published
version with the encoder that built it, whatever ACE_ENCODER holds by then.

Consistency is checked on the answers' content, not only their labels: the query image is
indexed as "a", and its point found in "a" scores ~1 only when the query was embedded by the
encoder that built the served index (two identity encoders with different seeds disagree).
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from ace_model.embedding import EmbeddingPolicy
from ace_model.encoder import Encoder, load_encoder
from ace_model.index import rollback
from ace_model.preprocess import normalise
from service.batcher import Batcher, BatcherConfig
from service.config import Settings
from tests.service.helpers import (
    ADMIN,
    block_texture,
    build_index,
    identity_encoder,
    png_bytes,
    running_server,
    wait_for,
)
from training.build_index import EmbedOptions
from training.build_index import build_index as ace_index_build

IMAGE = png_bytes(block_texture(7, 96, 80))
OTHER = png_bytes(block_texture(8, 96, 80))
SELF_SCORE = 0.99  # a patch centre (28, 36) finds its own patch, stored as float16, same encoder


@pytest.fixture
def deployed_encoder(tmp_path: Path, encoder_dir: Path) -> Path:
    """A writable ACE_ENCODER folder, as on the shared volume, holding encoder 0 at first."""
    path = tmp_path / "encoder"
    shutil.copytree(encoder_dir, path)
    return path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(IMAGE)
    (folder / "b.png").write_bytes(OTHER)
    return folder


def index_job(encoder: Path, images: Path, root: Path) -> str:
    """`ace index build --encoder ENC --images DIR --out ROOT --publish`, in process."""
    return ace_index_build(encoder, images, root, options=EmbedOptions(num_workers=0))


def match(client: httpx.Client) -> httpx.Response:
    files = [("image", ("q.png", IMAGE, "image/png"))]
    return client.post("/match", files=files, data={"points": "[[28, 36]]", "k": "2", "image_ids": '["a"]'})


def served_pair(response: httpx.Response) -> tuple[str, str]:
    """(encoder, index version) of a /match answer whose query was embedded by the index's encoder."""
    assert response.status_code == 200, response.text
    body = response.json()
    score = body["results"][0]["correspondences"][0]["score"]
    assert score > SELF_SCORE, f"query embedded by another encoder than index {body['index_version']}'s"
    return body["encoder"], body["index_version"]


@pytest.fixture
def published(tmp_path: Path, deployed_encoder: Path, images: Path) -> tuple[Path, str, str]:
    """(index root, version, encoder fingerprint) after the index job ran with encoder 0."""
    root = tmp_path / "index"
    return root, index_job(deployed_encoder, images, root), load_encoder(deployed_encoder).fingerprint


def test_new_encoder_and_its_index_swap_in_together_under_load(
    settings_for: Callable[..., Settings], deployed_encoder: Path, images: Path,
    published: tuple[Path, str, str],
) -> None:
    root, first, old_fp = published
    with running_server(settings_for(encoder=deployed_encoder, index_root=root)) as url, \
            httpx.Client(base_url=url, timeout=120) as client:
        stop, responses = threading.Event(), []

        def load() -> None:
            while not stop.is_set():
                responses.append(match(client))

        with ThreadPoolExecutor(4) as pool:
            running = [pool.submit(load) for _ in range(4)]
            wait_for(lambda: len(responses) >= 4, 120, "requests flowing before the retrain")
            new_fp = identity_encoder(1).save(deployed_encoder)  # `ace export` over the volume
            second = index_job(deployed_encoder, images, root)
            reload = client.post("/admin/reload", headers=ADMIN)
            wait_for(lambda: _count(responses, second) >= 4, 120, "answers from the new pair")
            stop.set()
            for future in running:
                future.result()
        pairs = [served_pair(r) for r in responses]
        assert reload.json()["status"] == "swapped", reload.text
        assert set(pairs) == {(old_fp, first), (new_fp, second)}
        assert client.get("/info").json()["encoder"]["fingerprint"] == new_fp

        rollback(root)  # the previous pair comes back from memory: ACE_ENCODER holds the new one
        assert client.post("/admin/reload", headers=ADMIN).json()["status"] == "swapped"
        assert served_pair(match(client)) == (old_fp, first)


def _count(responses: list[httpx.Response], version: str) -> int:
    return sum(r.status_code == 200 and r.json()["index_version"] == version for r in list(responses))


def test_a_restart_serves_the_published_version_with_its_stored_encoder(
    settings_for: Callable[..., Settings], deployed_encoder: Path, published: tuple[Path, str, str],
) -> None:
    root, first, old_fp = published
    identity_encoder(1).save(deployed_encoder)  # retrained and exported; the index job not run yet
    settings = settings_for(encoder=deployed_encoder, index_root=root)
    with running_server(settings) as url, httpx.Client(base_url=url, timeout=120) as client:
        assert client.get("/ready").status_code == 200
        assert served_pair(match(client)) == (old_fp, first)


def test_an_index_without_its_encoder_is_refused_and_match_says_so(
    settings_for: Callable[..., Settings], tmp_path: Path, deployed_encoder: Path, other_encoder_dir: Path,
) -> None:
    root = tmp_path / "index"
    first = build_index(root, deployed_encoder, {"a": IMAGE}, tmp_path / "work")
    with running_server(settings_for(encoder=deployed_encoder, index_root=root)) as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        second = build_index(root, other_encoder_dir, {"a": IMAGE}, tmp_path / "work")  # no store copy
        refused = client.post("/admin/reload", headers=ADMIN)
        assert refused.status_code == 409 and refused.json()["version"] == first
        assert str(deployed_encoder) in refused.json()["detail"]
        assert served_pair(match(client))[1] == first

        shutil.copytree(other_encoder_dir, deployed_encoder, dirs_exist_ok=True)  # the export lands
        assert client.post("/admin/reload", headers=ADMIN).json()["status"] == "swapped"
        assert served_pair(match(client)) == (load_encoder(other_encoder_dir).fingerprint, second)

    identity_encoder(0).save(deployed_encoder)  # a restart with neither copy of encoder 1 around
    with running_server(settings_for(encoder=deployed_encoder, index_root=root)) as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        ready = client.get("/ready")
        assert ready.status_code == 503 and "refused" in ready.json()["detail"]
        response = match(client)
        assert response.status_code == 503 and "no index is served" in response.json()["detail"]


def test_batches_never_mix_encoders() -> None:
    encoders = [identity_encoder(seed) for seed in (0, 1)]
    images = [torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8) for _ in range(12)]
    batcher = Batcher(BatcherConfig(8, 50.0, 64, EmbeddingPolicy.resolve("cpu")), lambda size, depth: None)
    batcher.start()
    try:
        # a thread of its own: the browser tests' sync Playwright keeps an event loop in this one
        with ThreadPoolExecutor(1) as pool:
            results = pool.submit(asyncio.run, _embed_interleaved(batcher, encoders, images)).result()
    finally:
        batcher.stop()
    for n, patches in enumerate(results):
        expected = _direct(encoders[n % 2], images[n])
        assert torch.allclose(patches, expected, atol=1e-5), f"image {n} embedded by the wrong encoder"


async def _embed_interleaved(batcher: Batcher, encoders: list[Encoder], images: list[torch.Tensor]
                             ) -> list[torch.Tensor]:
    calls = [batcher.embed([image], encoders[n % 2]) for n, image in enumerate(images)]
    return [embedded[0].patches for embedded in await asyncio.gather(*calls)]


def _direct(encoder: Encoder, image: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return encoder(normalise(image.unsqueeze(0))).patches[0]
