"""Two-process data-parallel training on CPU (torchrun + gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import write_images
from training import engine
from training.checkpoints import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_torchrun_two_processes_keep_identical_teachers(tmp_path: Path) -> None:
    write_images(tmp_path / "images", count=8)
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "training.cli", "train", "--preset", "tiny", "--data", str(tmp_path / "images"),
        "--out", str(run_dir), "--max-steps", "3", "--device", "cpu", "--no-progress", "--threads", "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    hashes = json.loads((run_dir / engine.REPLICAS_FILE).read_text())["teacher_sha256"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    plan = json.loads((run_dir / engine.RUN_FILE).read_text())["plan"]
    assert plan["world_size"] == 2 and plan["global_batch"] == 2 * 2
    assert load_checkpoint(run_dir)["step"] == 3
    assert len((run_dir / engine.METRICS_FILE).read_text().splitlines()) == 3
