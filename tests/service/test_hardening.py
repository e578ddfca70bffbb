"""Issue 13's failures, each as a test: one error format, admin off without a key, paths hidden,
/ready following the worker, warm-up on the worker, the memory budget and request pixel limit."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from ace_model.encoder import Embeddings, Encoder
from service.batcher import Batcher
from service.budget import MB, MemoryBudget
from service.config import Settings
from service.errors import ApiError
from service.main import create_app
from tests.service.helpers import ADMIN, block_texture, build_index, png_bytes, running_server, wait_for

IMAGE = png_bytes(block_texture(3, 96, 80))


def match(client: httpx.Client | TestClient, image: bytes = IMAGE, **data: str) -> httpx.Response:
    return client.post("/match", files=[("image", ("q.png", image, "image/png"))],
                       data=data or {"points": "[[10, 10]]"})


@pytest.fixture
def served(settings_for: Callable[..., Settings]) -> Iterator[httpx.Client]:
    with running_server(settings_for()) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


# ----------------------------------------------------------------------------- one error format


def test_validation_errors_are_one_string_naming_the_field_without_echoing_it(served: httpx.Client) -> None:
    missing = served.post("/match", data={"points": "[[1, 1]]"})
    assert missing.status_code == 422
    assert missing.json()["detail"] == "form field `image`: is required"
    secret = "patient-name-Jane-Doe"
    mistyped = match(served, points="[[1, 1]]", k=secret)
    assert mistyped.status_code == 422 and "`k`" in mistyped.json()["detail"]
    assert secret not in mistyped.text
    bad_query = served.get("/images", params={"limit": secret})
    assert bad_query.status_code == 422 and "`limit`" in bad_query.json()["detail"]
    assert secret not in bad_query.text


def test_every_error_carries_a_request_id_header_and_field(served: httpx.Client) -> None:
    for response in (served.get("/nope"), served.delete("/match"), match(served, image=b"text" * 40),
                     served.post("/match", content=b"--broken",
                                 headers={"Content-Type": "multipart/form-data"})):
        assert 400 <= response.status_code < 500, response.text
        body = response.json()
        assert isinstance(body["detail"], str) and body["request_id"]
        assert response.headers["x-request-id"] == body["request_id"]
    sent = served.get("/nope", headers={"X-Request-ID": "client-id-42"})
    assert sent.json()["request_id"] == "client-id-42"
    forged = served.get("/nope", headers={"X-Request-ID": "a\tb" * 40})
    assert forged.json()["request_id"] != "a\tb" * 40


def test_a_crash_is_a_json_500_with_its_request_id_and_a_logged_traceback(
        settings_for: Callable[..., Settings], caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(settings_for())

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals /etc/passwd")

    with TestClient(app, raise_server_exceptions=False) as client, caplog.at_level(logging.ERROR):
        response = client.get("/boom")
    assert response.status_code == 500 and response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["request_id"] in body["detail"] and "secret internals" not in response.text
    assert "secret internals" in caplog.text and body["request_id"] in caplog.text


def test_openapi_documents_every_error_with_the_one_error_model(served: httpx.Client) -> None:
    spec = served.get("/openapi.json").json()
    paths = spec["paths"]
    for path, operations in paths.items():
        for method, operation in operations.items():
            responses = operation["responses"]
            has_inputs = bool(operation.get("parameters") or operation.get("requestBody"))
            for code in ("422", "500") if has_inputs else ("500",):
                schema = responses[code]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path, code)
    assert "HTTPValidationError" not in spec["components"]["schemas"]  # FastAPI's default, never sent
    assert {"400", "413", "415", "429"} <= set(paths["/match"]["post"]["responses"])


# ----------------------------------------------------------------------------- secure defaults


def test_admin_is_off_without_a_key_even_for_a_cross_origin_simple_post(
        settings_for: Callable[..., Settings]) -> None:
    with running_server(settings_for(api_key=None)) as url, httpx.Client(base_url=url) as client:
        # what any web page can send without a preflight: a text/plain POST
        response = client.post("/admin/reload?force=true", content=b"x",
                               headers={"Origin": "http://evil.example", "Content-Type": "text/plain"})
        assert response.status_code == 403 and "ACE_API_KEY" in response.json()["detail"]
        assert "access-control-allow-origin" not in response.headers
        assert client.post("/admin/reload", headers={"X-API-Key": "anything"}).status_code == 403


def test_info_shows_paths_only_with_the_key(settings_for: Callable[..., Settings], tmp_path: Path,
                                            encoder_dir: Path) -> None:
    root = tmp_path / "index"
    build_index(root, encoder_dir, {"a": IMAGE}, tmp_path / "work")
    with running_server(settings_for(index_root=root)) as url, httpx.Client(base_url=url) as client:
        assert client.get("/info").json()["index_root"] is None
        assert client.get("/info", headers={"X-API-Key": "wrong"}).json()["index_root"] is None
        assert client.get("/info", headers=ADMIN).json()["index_root"] == str(root)
        assert str(tmp_path) not in client.get("/info").text


# ----------------------------------------------------------------------------- the worker


def _state(app: FastAPI):  # type: ignore[no-untyped-def]
    return app.state.ace


def test_ready_turns_503_when_the_worker_thread_dies(settings_for: Callable[..., Settings]) -> None:
    app = create_app(settings_for())
    with TestClient(app) as client:
        assert client.get("/ready").status_code == 200
        _state(app).batcher.stop()  # the thread ends, as a crash in it would end it
        ready = client.get("/ready")
        assert ready.status_code == 503 and "not running" in ready.json()["detail"]
        refused = match(client)
        assert refused.status_code == 503 and "shutting down" in refused.json()["detail"]


def stick(batcher: Batcher) -> threading.Event:
    """Make the worker's next forward passes wait until the returned event is set."""
    release = threading.Event()
    forward = batcher.forward

    def stuck(images: torch.Tensor, encoder: Encoder) -> Embeddings:
        release.wait(30)
        return forward(images, encoder)

    batcher.forward = stuck  # type: ignore[method-assign]
    return release


def test_ready_turns_503_while_one_forward_pass_is_stuck(settings_for: Callable[..., Settings]) -> None:
    app = create_app(settings_for(worker_stall_s=0.3))
    with TestClient(app) as client:
        release = stick(_state(app).batcher)
        waiting = threading.Thread(target=match, args=(client,))
        waiting.start()
        time.sleep(1.0)
        ready = client.get("/ready")
        release.set()
        waiting.join(30)
        assert ready.status_code == 503 and "forward pass" in ready.json()["detail"]
        wait_for(lambda: client.get("/ready").status_code == 200, 10, "ready again once the pass ends")


def test_a_stuck_forward_pass_answers_503_instead_of_holding_the_request(
        settings_for: Callable[..., Settings]) -> None:
    app = create_app(settings_for(worker_stall_s=0.5))
    with TestClient(app) as client:
        release = stick(_state(app).batcher)
        started = time.monotonic()
        refused = match(client)
        release.set()
        assert refused.status_code == 503 and "ACE_WORKER_STALL_S" in refused.json()["detail"]
        assert time.monotonic() - started < 10
        assert _state(app).budget.reserved == 0  # its memory reservation went with it


def test_warm_up_after_stop_fails_at_once_instead_of_waiting(settings_for: Callable[..., Settings],
                                                             encoder_dir: Path) -> None:
    from ace_model.encoder import load_encoder
    from service.batcher import WorkerDownError

    app = create_app(settings_for())
    with TestClient(app):
        batcher = _state(app).batcher
        batcher.stop()
        started = time.monotonic()
        with pytest.raises(WorkerDownError):
            batcher.prepare(load_encoder(encoder_dir))
        assert time.monotonic() - started < 5


def test_a_new_encoder_is_warmed_up_on_the_worker_thread(settings_for: Callable[..., Settings],
                                                          encoder_dir: Path) -> None:
    from ace_model.encoder import load_encoder

    app = create_app(settings_for())
    with TestClient(app):
        batcher = _state(app).batcher
        threads: list[str] = []
        forward = batcher.forward

        def recording(images: torch.Tensor, encoder: object) -> object:
            threads.append(threading.current_thread().name)
            return forward(images, encoder)

        batcher.forward = recording
        batcher.prepare(load_encoder(encoder_dir))
    assert threads == ["ace-batcher"]


# ----------------------------------------------------------------------------- memory


def test_the_budget_refuses_what_cannot_fit_and_waits_for_what_can() -> None:
    async def scenario() -> list[str]:
        budget, events = MemoryBudget(100 * MB, wait_s=0.3), []
        with pytest.raises(ApiError) as too_big:
            async with budget.reserve(101 * MB, "the images"):
                pass
        assert too_big.value.status_code == 413 and "ACE_MEMORY_BUDGET_MB" in too_big.value.detail

        async def hold(name: str, nbytes: int, seconds: float) -> None:
            async with budget.reserve(nbytes, name):
                events.append(f"{name} in")
                await asyncio.sleep(seconds)
            events.append(f"{name} out")

        await asyncio.gather(hold("a", 60 * MB, 0.1), hold("b", 60 * MB, 0.0))  # b waits for a
        with pytest.raises(ApiError) as busy:
            await asyncio.gather(hold("c", 90 * MB, 0.6), hold("d", 20 * MB, 0.0))
        assert busy.value.status_code == 429
        await asyncio.sleep(0.7)
        assert budget.reserved == 0  # released after errors too
        return events

    with ThreadPoolExecutor(1) as pool:  # a thread of its own: the browser tests keep a loop running here
        events = pool.submit(asyncio.run, scenario()).result()
    assert events[:4] == ["a in", "a out", "b in", "b out"]


def test_request_pixels_and_the_budget_are_413s_naming_their_settings(
        settings_for: Callable[..., Settings]) -> None:
    image = png_bytes(block_texture(4, 400, 400))
    target = [("targets", ("t.png", image, "image/png"))]
    settings = settings_for(max_request_pixels=300_000)
    with running_server(settings) as url, httpx.Client(base_url=url) as client:
        alone = client.post("/match", files=[("image", ("q.png", image, "image/png"))],
                            data={"points": "[[1, 1]]"})
        assert alone.status_code == 200, alone.text
        both = client.post("/match", files=[("image", ("q.png", image, "image/png")), *target],
                           data={"points": "[[1, 1]]"})
        assert both.status_code == 413 and "ACE_MAX_REQUEST_PIXELS" in both.json()["detail"]
    with running_server(settings_for(memory_budget_mb=16)) as url, httpx.Client(base_url=url) as client:
        rgb = (np.stack([block_texture(c, 2000, 2000) for c in range(3)], -1) * 255).astype(np.uint8)
        big = io.BytesIO()
        Image.fromarray(rgb, mode="RGB").save(big, format="PNG")  # ~30 MB to decode, budget 16 MB
        refused = client.post("/match", files=[("image", ("q.png", big.getvalue(), "image/png"))],
                              data={"points": "[[1, 1]]"})
        assert refused.status_code == 413 and "ACE_MEMORY_BUDGET_MB" in refused.json()["detail"]



# ----------------------------------------------------------------------------- one embedding policy


def test_an_indexed_image_sent_as_a_query_embeds_as_the_index_embedded_it(
        tmp_path: Path, encoder_dir: Path, settings_for: Callable[..., Settings]) -> None:
    """`ace index build` and /match decode at one side (reduced while decoding) and embed through one
    EmbeddingPolicy, so a query that is an indexed image matches that image's stored grid to float16
    rounding (/heatmap against the stored grid), and /match leaves it out of its own matches.
    Before, /heatmap decoded at the encoder's input size: 0.69 where this asserts 1."""
    from training.build_index import EmbedOptions, build_index

    images = tmp_path / "images"
    images.mkdir()
    for n in range(3):  # 2100 px: decoded at a quarter size for the 64 px test encoder (decode_side 512)
        (images / f"im{n}.png").write_bytes(png_bytes(block_texture(10 + n, 2100, 1800, block=6)))
    build_index(encoder_dir, images, tmp_path / "index",
                options=EmbedOptions(device="cpu", num_workers=0, show_progress=False))
    settings = settings_for(index_root=tmp_path / "index")
    query = (images / "im1.png").read_bytes()
    with running_server(settings) as url, httpx.Client(base_url=url, timeout=60) as client:
        answer = match(client, query, points="[[900, 1000], [150, 1900]]", k="5")
        x0, y0, x1, y1 = heatmap(client, query, [10, 10])["extent"]
        centres = [(row, col, x0 + (col + 0.5) * (x1 - x0) / 4, y0 + (row + 0.5) * (y1 - y0) / 4)
                   for row, col in ((1, 2), (3, 0))]  # patch centres of the 4 x 4 grid
        maps = [heatmap(client, query, [x, y]) for _, _, x, y in centres]
    assert answer.status_code == 200, answer.text
    for result in answer.json()["results"]:
        found = {m["image_id"] for m in result["matches"]}
        assert found and "im1" not in found, result["matches"]
    for (row, col, _, _), one in zip(centres, maps, strict=True):
        assert one["values"][row][col] == pytest.approx(1.0, abs=2e-3)  # float16 storage, 4 decimals


def heatmap(client: httpx.Client, query: bytes, point: list[float]) -> dict:
    response = client.post("/heatmap", files=[("image", ("q.png", query, "image/png"))],
                           data={"point": json.dumps(point), "image_ids": '["im1"]'})
    assert response.status_code == 200, response.text
    return response.json()["maps"][0]


def deflated_dicom(private_mb: int) -> bytes:
    """CT_small.dcm deflated, with a zero-filled private element of `private_mb` MB (a zip bomb:
    pydicom inflates the whole dataset even to read its header)."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
    if private_mb:
        ds.add_new(0x00091010, "OB", bytes(private_mb << 20))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_a_deflated_dicom_is_inflated_within_the_budget(settings_for: Callable[..., Settings]) -> None:
    bomb = deflated_dicom(100)
    assert len(bomb) < 1 << 20  # 100 MB of zeros deflate to ~100 KB
    with running_server(settings_for(memory_budget_mb=64)) as url, httpx.Client(base_url=url) as client:
        fine = client.post("/preview", files=[("image", ("ct.dcm", deflated_dicom(0), "application/dicom"))])
        assert fine.status_code == 200, fine.text
        refused = client.post("/preview", files=[("image", ("ct.dcm", bomb, "application/dicom"))])
        assert refused.status_code == 413 and "ACE_MEMORY_BUDGET_MB" in refused.json()["detail"]
