"""A retrained encoder and its index are served together, without a restart (issue 6).

The api reads the encoder artifact at ACE_ENCODER; `ace export` replaces it and `ace index build
--publish` publishes a version built by it. The running api must then serve the new pair, keep
every in-flight request on one consistent (encoder, index) pair, and roll back to the previous
pair without reading the artifact again.
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

from ace_model.encoder import Encoder, load_encoder
from ace_model.index import rollback
from service.batcher import Batcher, BatcherConfig
from service.config import Settings
from tests.service.conftest import block_texture, build_index, identity_encoder, png_bytes, running_server

IMAGE = png_bytes(block_texture(7, 96, 80))
OTHER = png_bytes(block_texture(8, 96, 80))


@pytest.fixture
def deployed_encoder(tmp_path: Path, encoder_dir: Path) -> Path:
    """A writable ACE_ENCODER folder, as on the shared volume, holding encoder 0 at first."""
    path = tmp_path / "encoder"
    shutil.copytree(encoder_dir, path)
    return path


def match(client: httpx.Client) -> httpx.Response:
    files = [("image", ("q.png", IMAGE, "image/png"))]
    return client.post("/match", files=files, data={"points": "[[40, 48]]", "k": "2"})


def served_pair(response: httpx.Response) -> tuple[str, str]:
    assert response.status_code == 200, response.text
    body = response.json()
    return body["encoder"], body["index_version"]


def test_new_encoder_and_its_index_swap_in_together_under_load(
    settings_for: Callable[..., Settings], tmp_path: Path, deployed_encoder: Path,
) -> None:
    root = tmp_path / "index"
    first = build_index(root, deployed_encoder, {"a": IMAGE}, tmp_path / "work")
    old_fp = load_encoder(deployed_encoder).fingerprint
    with running_server(settings_for(encoder=deployed_encoder, index_root=root)) as url, \
            httpx.Client(base_url=url, timeout=120) as client:
        swapped = threading.Event()

        def load() -> list[httpx.Response]:
            return [match(client) for _ in range(5)] + ([match(client)] if swapped.wait(60) else [])

        with ThreadPoolExecutor(4) as pool:
            running = [pool.submit(load) for _ in range(4)]
            new_fp = identity_encoder(1).save(deployed_encoder)  # `ace export` over the volume
            second = build_index(root, deployed_encoder, {"a": IMAGE, "b": OTHER}, tmp_path / "work")
            reload = client.post("/admin/reload")
            swapped.set()
            pairs = {served_pair(r) for future in running for r in future.result()}
        assert reload.json()["status"] == "swapped", reload.text
        assert pairs <= {(old_fp, first), (new_fp, second)} and (new_fp, second) in pairs
        assert client.get("/info").json()["encoder"]["fingerprint"] == new_fp

        rollback(root)  # the previous pair comes back from memory: ACE_ENCODER holds the new one
        assert client.post("/admin/reload").json()["status"] == "swapped"
        assert served_pair(match(client)) == (old_fp, first)


def test_index_waits_for_its_encoder_to_be_exported(
    settings_for: Callable[..., Settings], tmp_path: Path, deployed_encoder: Path, other_encoder_dir: Path,
) -> None:
    root = tmp_path / "index"
    first = build_index(root, deployed_encoder, {"a": IMAGE}, tmp_path / "work")
    with running_server(settings_for(encoder=deployed_encoder, index_root=root)) as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        second = build_index(root, other_encoder_dir, {"a": IMAGE}, tmp_path / "work")
        refused = client.post("/admin/reload")
        assert refused.status_code == 409 and refused.json()["version"] == first
        assert str(deployed_encoder) in refused.json()["detail"]
        assert served_pair(match(client))[1] == first

        shutil.copytree(other_encoder_dir, deployed_encoder, dirs_exist_ok=True)  # the export lands
        assert client.post("/admin/reload").json()["status"] == "swapped"
        assert served_pair(match(client)) == (load_encoder(other_encoder_dir).fingerprint, second)


def test_batches_never_mix_encoders() -> None:
    encoders = [identity_encoder(seed) for seed in (0, 1)]
    images = [torch.randn(3, 64, 64) for _ in range(12)]
    batcher = Batcher(BatcherConfig(8, 50.0, 64, torch.device("cpu"), False), lambda size, depth: None)
    batcher.start()
    try:
        results = asyncio.run(_embed_interleaved(batcher, encoders, images))
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
        return encoder(image.unsqueeze(0)).patches[0]
