"""Helpers for the service tests: tiny encoders, textured images, indexes and a live uvicorn server.

The "identity" encoder is a tiny ViT whose position embeddings and residual branches are zeroed:
every patch token then depends on that patch's pixels only, so the same content shifted by whole
patches is found exactly where it moved. That tests the service's coordinate plumbing without
any training.
"""

from __future__ import annotations

import io
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import uvicorn
from PIL import Image

from ace_model.encoder import Encoder, EncoderSpec, load_encoder
from ace_model.index import ImageRecord, Segment, create_version, publish
from ace_model.preprocess import decode_image, normalise, prepare
from service.config import Settings
from service.main import create_app

IMG_SIZE = 64  # model input side: a 4 x 4 patch grid with vit_tiny's 16 px patches
# The inference worker's device for the HTTP tests; on a GPU host `ACE_TEST_DEVICE=cuda` runs the
# same tests with batched inference on the GPU (benchmarks/gpu_check.sh).
TEST_DEVICE = os.environ.get("ACE_TEST_DEVICE", "cpu")
ADMIN_KEY = "test-admin-key"  # settings_for's API key (admin routes answer 403 without one)
ADMIN = {"X-API-Key": ADMIN_KEY}


def identity_encoder(seed: int) -> Encoder:
    torch.manual_seed(seed)
    encoder = Encoder(EncoderSpec("vit_tiny_patch16_224", IMG_SIZE))
    model = encoder.backbone.model
    with torch.no_grad():
        model.pos_embed.zero_()
        for block in model.blocks:
            for layer in (block.attn.proj, block.mlp.fc2):
                layer.weight.zero_()
                layer.bias.zero_()
    return encoder


def block_texture(seed: int, height: int, width: int, block: int = 8) -> np.ndarray:
    """(height, width) float in [0, 1]: random grey blocks, distinct everywhere."""
    rng = np.random.default_rng(seed)
    cells = rng.random((height // block + 2, width // block + 2))
    return np.kron(cells, np.ones((block, block)))[:height, :width]


def png_bytes(grey: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray((np.clip(grey, 0, 1) * 255).astype(np.uint8), mode="L").save(out, format="PNG")
    return out.getvalue()


def build_index(root: Path, encoder_path: Path, images: dict[str, bytes], work: Path) -> str:
    """Embed `images` (id -> encoded bytes) with the encoder, write and publish a version."""
    encoder = load_encoder(encoder_path)
    records, tensors = [], []
    for position, (image_id, data) in enumerate(images.items()):
        decoded = decode_image(data)
        tensor, coords = prepare(decoded, encoder.spec.img_size, encoder.grid)
        tensors.append(tensor)
        records.append(ImageRecord(image_id, f"patient-{image_id}", f"mem://{image_id}",
                                   decoded.width, decoded.height, coords, position))
    with torch.no_grad():
        grids = encoder(normalise(torch.stack(tensors))).patches.numpy().astype(np.float16)
    work.mkdir(parents=True, exist_ok=True)
    grid_file = work / f"grid-{time.monotonic_ns()}.npy"
    np.save(grid_file, grids)
    version = create_version(root, [Segment(grid_file, 0, tuple(records))], encoder.fingerprint)
    publish(root, version)
    return version


def wait_for(condition: Callable[[], bool], seconds: float = 30, what: str = "condition not met") -> None:
    """Poll `condition` until it holds; fail with `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {seconds:.0f} s"
        time.sleep(0.05)


@contextmanager
def running_server(settings: Settings) -> Iterator[str]:
    """Serve create_app(settings) with uvicorn on a free loopback port; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(settings), log_level="warning", lifespan="on",
                            http="service.protocol:ConnectionLimitsProtocol")  # as `ace serve` runs it
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        _wait_started(server, thread)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def _wait_started(server: uvicorn.Server, thread: threading.Thread) -> None:
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
