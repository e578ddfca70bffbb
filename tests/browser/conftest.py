"""Fixtures for the viewer: a phantom corpus, a tiny published index, the live service on
127.0.0.1 and headless Debian Chromium driven by Playwright (never a downloaded browser).

The encoder is an untrained tiny ViT: the tests check that what the page draws is exactly what the
API answered, not that the matches are anatomically right (the service tests do that).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image

from ace_model.encoder import Encoder, EncoderSpec
from ace_model.index import ImageRecord, Segment, create_version, publish
from ace_model.preprocess import load_image, normalise, prepare
from service.config import Settings
from service.main import create_app
from tests.browser.helpers import PHANTOM_SIZE, Corpus
from training.phantoms import PhantomConfig, generate_phantom

CHROMIUM = os.environ.get("ACE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
IMG_SIZE = 112  # encoder input side: a 7 x 7 patch grid, enough to see a heatmap
INDEXED_SUBJECTS = 4  # subjects 0..3, two views each, make the index
QUERY_SUBJECT = 5  # not indexed
TARGET_SUBJECT = 4  # not indexed
UNSTORED_ID = "more/subject 3 #view1"  # the last indexed image: no stored thumbnail
ARTIFACTS = Path(os.environ.get("ACE_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "browser: drives headless Chromium against the live service")


def _phantom_png(path: Path, subject: int, view: int) -> dict[str, tuple[float, float]]:
    phantom = generate_phantom(subject, seed=0, config=PhantomConfig(size=PHANTOM_SIZE), view=view)
    Image.fromarray(phantom.image).save(path)
    return phantom.landmarks


def _build_index(root: Path, work: Path, encoder: Encoder, images: dict[str, Path]) -> None:
    """Embed `images` (id -> file), store thumbnails for all but the last, write and publish."""
    tensors, records = [], []
    for position, (image_id, path) in enumerate(images.items()):
        decoded = load_image(path)
        tensor, coords = prepare(decoded, encoder.spec.img_size, encoder.grid)
        tensors.append(tensor)
        patient = path.stem.split("-view")[0]
        records.append(ImageRecord(image_id, patient, str(path), decoded.width, decoded.height, coords,
                                   position))
    with torch.no_grad():
        grids = encoder(normalise(torch.stack(tensors))).patches.numpy().astype(np.float16)
    np.save(work / "grid.npy", grids)
    thumbnails = work / "thumbnails"
    thumbnails.mkdir()
    for position, path in enumerate(list(images.values())[:-1]):
        with Image.open(path) as image:
            image.thumbnail((128, 128))
            image.save(thumbnails / f"{position}.png")
    segment = Segment(work / "grid.npy", 0, tuple(records), thumbnails)
    publish(root, create_version(root, [segment], encoder.fingerprint))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    base = tmp_path_factory.mktemp("viewer")
    images = base / "images"
    images.mkdir()
    indexed = {}
    for subject in range(INDEXED_SUBJECTS):
        for view in range(2):
            path = images / f"subject{subject}-view{view}.png"
            _phantom_png(path, subject, view)
            indexed[path.stem] = path
    indexed[UNSTORED_ID] = indexed.pop(path.stem)  # an id that needs URL encoding
    landmarks = _phantom_png(base / "query.png", QUERY_SUBJECT, 0)
    _phantom_png(base / "target.png", TARGET_SUBJECT, 0)
    torch.manual_seed(0)
    encoder = Encoder(EncoderSpec("vit_tiny_patch16_224", IMG_SIZE))
    encoder.save(base / "encoder")
    _build_index(base / "index", base, encoder, indexed)
    return Corpus(base / "encoder", base / "index", base / "query.png", landmarks, base / "target.png",
                  list(indexed), UNSTORED_ID)


def _free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="session")
def service_url(corpus: Corpus) -> Iterator[str]:
    """The real app (create_app) served by uvicorn on a free 127.0.0.1 port."""
    settings = Settings(encoder=corpus.encoder_dir, index_root=corpus.index_root, poll_interval_s=0,
                        max_batch_size=4, threads=1)
    sock = _free_socket()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning", lifespan="on",
                                           http="service.protocol:ConnectionLimitsProtocol"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the service did not start; see the log above")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def _require_chromium() -> None:
    if shutil.which(CHROMIUM) is None and not Path(CHROMIUM).is_file():
        message = (f"no Chromium at {CHROMIUM}: run tests/browser/ensure_chromium.sh "
                   "(Debian package `chromium`) or set ACE_CHROMIUM")
        if os.environ.get("ACE_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Headless system Chromium with a fresh profile directory."""
    _require_chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (dev extra)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1366, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
