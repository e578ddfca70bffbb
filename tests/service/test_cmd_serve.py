"""`ace serve`: options become ACE_ variables, and the command really serves over loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import httpx
import pytest

from training.cli import build_parser
from training.cmd_serve import export_environment, run_serve


def test_options_become_ace_environment_variables() -> None:
    unset = {name: "" for name in ("ACE_ENCODER", "ACE_MAX_BATCH_SIZE", "ACE_INDEX_ROOT", "ACE_API_KEY")}
    with mock.patch.dict(os.environ, unset):  # restores the whole environment afterwards
        for name in unset:
            del os.environ[name]
        args = build_parser().parse_args(["serve", "--encoder", "enc", "--max-batch-size", "4"])
        export_environment(args)
        assert os.environ["ACE_ENCODER"] == "enc" and os.environ["ACE_MAX_BATCH_SIZE"] == "4"
        assert "ACE_INDEX_ROOT" not in os.environ and "ACE_API_KEY" not in os.environ


def test_serve_without_an_encoder_explains_itself(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("ACE_ENCODER", raising=False)
    assert run_serve(build_parser().parse_args(["serve"])) == 2
    assert "--encoder" in capsys.readouterr().err


@pytest.mark.slow
def test_ace_serve_answers_on_loopback(encoder_dir: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "training.cli", "serve", "--encoder", str(encoder_dir),
               "--port", str(port), "--poll-interval", "0", "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "ace serve did not start"
            time.sleep(0.2)
        info = httpx.get(f"http://127.0.0.1:{port}/info").json()
        assert info["index"] is None and info["encoder"]["img_size"] == 64
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_demo_indexing_publishes_a_version_with_thumbnails(tmp_path: Path, encoder_dir: Path) -> None:
    from ace_model.index import PatchIndex
    from tests.service.conftest import block_texture, png_bytes
    from training.cmd_serve import _demo_images, _index_demo_images

    source = tmp_path / "data"
    (source / "images").mkdir(parents=True)
    for name in ("a", "b"):
        (source / "images" / f"{name}.png").write_bytes(png_bytes(block_texture(ord(name), 90, 70)))
    (source / "metadata.csv").write_text("image,image_id,patient_id\nimages/a.png,a,P1\nimages/b.png,b,\n")
    _index_demo_images(encoder_dir, tmp_path / "index", _demo_images([source]))
    with PatchIndex.open(tmp_path / "index") as index:
        assert index.num_images == 2 and index.record("a").patient_id == "P1"
        assert index.record("b").patient_id is None and index.thumbnail_path("b") is not None
