"""Operations over real HTTP: probes, metrics, batching under concurrency, 429, index hot swap."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app
from tests.service.helpers import ADMIN, block_texture, build_index, png_bytes, running_server, wait_for

IMAGE = png_bytes(block_texture(7, 96, 80))
OTHER = png_bytes(block_texture(8, 96, 80))
KEY = "k3y"


def match(client: httpx.Client, targets: tuple[bytes, ...] = (), image: bytes = IMAGE) -> httpx.Response:
    files = [("image", ("q.png", image, "image/png"))]
    files += [("targets", ("t.png", t, "image/png")) for t in targets]
    return client.post("/match", files=files, data={"points": "[[40, 48], [10, 90]]", "k": "3"})


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} missing from /metrics"
    return float(found.group(1))


def concurrently(count: int, call: Callable[[], httpx.Response], workers: int = 32) -> list[httpx.Response]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda _: call(), range(count)))


def test_probes_info_metrics_and_docs_respond(settings_for: Callable[..., Settings]) -> None:
    with running_server(settings_for()) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/health").json() == {"status": "ok"}
        ready = client.get("/ready")
        assert ready.status_code == 200 and ready.json()["ready"] and ready.json()["warmed_up"]
        info = client.get("/info").json()
        assert info["index"] is None and info["encoder"]["grid"] == 4
        assert info["batching"]["max_batch_size"] == 8 and info["limits"]["max_k"] == 100
        assert "ace_batch_size_count" in client.get("/metrics").text
        assert client.get("/docs").status_code == 200
        assert "/match" in client.get("/openapi.json").json()["paths"]


def test_without_an_index_targets_still_work(settings_for: Callable[..., Settings]) -> None:
    with running_server(settings_for()) as url, httpx.Client(base_url=url, timeout=60) as client:
        body = match(client, targets=(OTHER,)).json()
        assert body["index_version"] is None
        assert all(r["matches"] == [] and len(r["correspondences"]) == 1 for r in body["results"])
        assert client.post("/admin/reload", headers=ADMIN).json()["status"] == "disabled"


def test_ready_waits_for_a_configured_index(settings_for: Callable[..., Settings], tmp_path: Path,
                                            encoder_dir: Path) -> None:
    settings = settings_for(index_root=tmp_path / "index", poll_interval_s=0.2)
    with running_server(settings) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/ready").status_code == 503
        build_index(tmp_path / "index", encoder_dir, {"a": IMAGE}, tmp_path / "work")
        wait_for(lambda: client.get("/ready").status_code == 200)


def test_32_concurrent_requests_succeed_in_batches(settings_for: Callable[..., Settings]) -> None:
    with running_server(settings_for(max_wait_ms=20)) as url, \
            httpx.Client(base_url=url, timeout=120, limits=httpx.Limits(max_connections=32)) as client:
        responses = concurrently(32, lambda: match(client))
        assert [r.status_code for r in responses] == [200] * 32
        text = client.get("/metrics").text
        batches = metric(text, "ace_batch_size_count")
        singles = metric(text, 'ace_batch_size_bucket{le="1.0"}')
        assert batches - singles > 0, "no batch of more than one image ran"
        assert metric(text, 'ace_requests_total{method="POST",route="/match",status="200"}') == 32
        worker = metric(text, "ace_worker_cpu_seconds_total")
        assert 0 < worker < metric(text, "process_cpu_seconds_total")  # the model's share, and the rest


def test_full_queue_answers_429_with_retry_after(settings_for: Callable[..., Settings]) -> None:
    # the worker waits up to a second to fill a batch of 8, so a queue of 4 stays full meanwhile
    settings = settings_for(queue_size=4, max_targets=3, max_wait_ms=1000, max_look=1)
    with running_server(settings) as url, httpx.Client(base_url=url, timeout=60) as client:
        responses = concurrently(6, lambda: match(client, targets=(OTHER, OTHER, OTHER)), workers=6)
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) >= 1 and 429 in codes and set(codes) <= {200, 429}
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.headers["Retry-After"] == "1" and "queue" in refused.json()["detail"]
        assert match(client).status_code == 200


def test_hot_swap_under_load_loses_no_request(settings_for: Callable[..., Settings], tmp_path: Path,
                                              encoder_dir: Path) -> None:
    root = tmp_path / "index"
    first = build_index(root, encoder_dir, {"a": IMAGE}, tmp_path / "work")
    with running_server(settings_for(index_root=root, api_key=KEY)) as url, \
            httpx.Client(base_url=url, timeout=120) as client:
        swapped = threading.Event()

        def load() -> list[httpx.Response]:
            return [match(client) for _ in range(6)] + ([match(client)] if swapped.wait(60) else [])

        with ThreadPoolExecutor(4) as pool:
            running = [pool.submit(load) for _ in range(4)]
            second = build_index(root, encoder_dir, {"a": IMAGE, "b": OTHER}, tmp_path / "work")
            reload = client.post("/admin/reload", headers={"X-API-Key": KEY})
            swapped.set()
            responses = [r for future in running for r in future.result()]
        assert reload.json() == {"status": "swapped", "version": second, "detail": f"now serving {second}"}
        failed = [r.text for r in responses if r.status_code != 200]
        assert not failed, failed
        assert {r.json()["index_version"] for r in responses} <= {first, second}
        assert responses[-1].json()["index_version"] == second
        assert client.get("/info").json()["index"]["num_images"] == 2


def test_index_from_another_encoder_is_refused(settings_for: Callable[..., Settings], tmp_path: Path,
                                               encoder_dir: Path, other_encoder_dir: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "index"
    first = build_index(root, encoder_dir, {"a": IMAGE}, tmp_path / "work")
    with running_server(settings_for(index_root=root)) as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        build_index(root, other_encoder_dir, {"a": IMAGE}, tmp_path / "work")
        response = client.post("/admin/reload", headers=ADMIN)
        assert response.status_code == 409 and response.json()["status"] == "refused"
        assert response.json()["version"] == first
        assert "refused: it was built by encoder" in caplog.text
        assert match(client).json()["index_version"] == first


def test_poller_picks_up_a_new_version(settings_for: Callable[..., Settings], tmp_path: Path,
                                       encoder_dir: Path) -> None:
    root = tmp_path / "index"
    build_index(root, encoder_dir, {"a": IMAGE}, tmp_path / "work")
    with running_server(settings_for(index_root=root, poll_interval_s=0.2)) as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        second = build_index(root, encoder_dir, {"a": IMAGE, "b": OTHER}, tmp_path / "work")
        wait_for(lambda: client.get("/info").json()["index"]["version"] == second)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_worker_with_autocast_matches_cpu_locations(settings_for: Callable[..., Settings]) -> None:
    answers = {}
    for device in ("cpu", "cuda"):
        with running_server(settings_for(device=device)) as url, \
                httpx.Client(base_url=url, timeout=60) as client:
            assert client.get("/info").json()["batching"]["device"].startswith(device)
            answers[device] = match(client, targets=(OTHER,)).json()["results"]
    for cpu, gpu in zip(answers["cpu"], answers["cuda"], strict=True):
        assert abs(cpu["correspondences"][0]["x"] - gpu["correspondences"][0]["x"]) <= 20  # half a patch


def test_cors_allows_only_configured_origins(settings_for: Callable[..., Settings]) -> None:
    allowed = "http://viewer.example"
    with running_server(settings_for(cors_origins=[allowed])) as url, httpx.Client(base_url=url) as client:
        for origin, expected in ((allowed, allowed), ("http://evil.example", None)):
            preflight = client.options("/match", headers={"Origin": origin,
                                                          "Access-Control-Request-Method": "POST"})
            assert preflight.headers.get("access-control-allow-origin") == expected


def test_a_second_lifespan_of_one_app_exports_each_metric_once(settings_for: Callable[..., Settings]) -> None:
    app = create_app(settings_for())
    for _ in range(2):  # e.g. a test client entered twice: the worker restarts, its metric does not repeat
        with TestClient(app) as client:
            text = client.get("/metrics").text
    assert len(re.findall(r"^ace_worker_cpu_seconds_total ", text, re.MULTILINE)) == 1
    assert metric(text, "ace_worker_cpu_seconds_total") > 0  # the running worker's, after its warm-up
