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

from training.cli import build_parser, main
from training.cmd_serve import export_environment


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
    assert main(["serve"]) == 2
    assert "--encoder" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_ace_serve_answers_on_loopback(encoder_dir: Path, workers: int) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "training.cli", "serve", "--encoder", str(encoder_dir),
               "--port", str(port), "--poll-interval", "0", "--log-level", "warning",
               "--workers", str(workers)]
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
        infos = [httpx.get(f"http://127.0.0.1:{port}/info").json() for _ in range(4 * workers)]
        assert all(i["index"] is None and i["encoder"]["img_size"] == 64 for i in infos)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_demo_index_covers_phantoms_and_samples(tmp_path: Path, encoder_dir: Path) -> None:
    from ace_model.index import PatchIndex
    from tests.service.helpers import block_texture, png_bytes
    from training.cmd_serve import _demo_index

    phantoms, samples = tmp_path / "phantoms", tmp_path / "samples"
    (phantoms / "images").mkdir(parents=True)
    samples.mkdir()
    (phantoms / "images" / "p0.png").write_bytes(png_bytes(block_texture(1, 90, 70)))
    (phantoms / "metadata.csv").write_text("image,image_id,patient_id\nimages/p0.png,phantom_0,S0\n")
    (samples / "real.png").write_bytes(png_bytes(block_texture(2, 80, 80)))
    (samples / "metadata.csv").write_text("image,image_id,patient_id\nreal.png,sample_real,P9\n")
    _demo_index(encoder_dir, tmp_path / "index", phantoms, samples)
    with PatchIndex.open(tmp_path / "index") as index:
        assert sorted(index.image_ids()) == ["phantom_0", "sample_real"]
        assert index.record("sample_real").patient_id == "P9"
