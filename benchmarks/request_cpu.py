"""Request-path CPU per image: this checkout's service beside an older revision's, in one run.

    python benchmarks/request_cpu.py --revision 2a9f825 --requests 12

Both services run at once (the older one from a temporary `git worktree`), with the shipped
encoder, ACE_THREADS=1 and one client sending each kind of request in turn to both. CPU time is
read per thread from /proc: the inference worker thread ("ace-batcher", which runs every forward
pass when torch has one thread) is the model; every other thread of the process (event loop,
decode and preprocessing threads, matching) is the request path. Reported per kind: request-path
and model CPU milliseconds per image, and the ratio old / new of the request path.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from serving import free_port  # a sibling script

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "artifacts" / "ace-dense-phantoms"
WORKER = "ace-batcher"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Names every Python thread at the OS level (prctl PR_SET_NAME), so /proc tells the worker apart
# in either revision without changing its code; then runs uvicorn's command line.
BOOT = """
import ctypes, threading, uvicorn
libc = ctypes.CDLL(None)
inner = threading.Thread._bootstrap_inner
def named(self):
    libc.prctl(15, self.name.encode()[:15], 0, 0, 0)
    inner(self)
threading.Thread._bootstrap_inner = named
uvicorn.main()
"""
Upload = list[tuple[str, tuple[str, bytes, str]]]


class Service:
    """A service process of the code in `tree`; CPU seconds per thread from /proc."""

    def __init__(self, tree: Path, encoder: Path) -> None:
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(tree), "ACE_ENCODER": str(encoder), "ACE_DEVICE": "cpu",
               "ACE_THREADS": "1", "ACE_POLL_INTERVAL_S": "0", "ACE_LOG_LEVEL": "warning",
               "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-c", BOOT, "service.main:create_app_from_env", "--factory",
             "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"], cwd=tree, env=env)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.3)
        raise RuntimeError(f"the service at {self.url} did not become ready")

    def cpu_s(self) -> tuple[float, float]:
        """(worker thread, the rest of the process) CPU seconds so far. The process's own counters
        keep the time of threads that have ended (idle decode threads exit)."""
        worker = 0.0
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):  # a thread that has just ended
                if (task / "comm").read_text().strip() == WORKER:
                    worker += _cpu_seconds(task / "stat")
        return worker, _cpu_seconds(Path(f"/proc/{self.process.pid}/stat")) - worker

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def _cpu_seconds(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def request_kinds() -> dict[str, tuple[Upload, dict[str, str]]]:
    """kind -> (files, form): a query with one target, three points, as a user sends them."""
    import pydicom
    from skimage.data import retina

    from training.eval_real import dicom_files

    found = {p.name: p for p, _ in dicom_files()}
    cr1, cr3 = found["RG1_UNCR.dcm"].read_bytes(), found["RG3_UNCR.dcm"].read_bytes()
    png16 = [encode(Image.fromarray(pydicom.dcmread(io.BytesIO(d)).pixel_array.astype(np.uint16)), "PNG")
             for d in (cr1, cr3)]
    fundus = Image.fromarray(retina())
    jpegs = [encode(fundus, "JPEG", quality=90), encode(fundus.rotate(5), "JPEG", quality=90)]
    small = [encode(fundus.convert("L").resize((512, 512)), "PNG"),
             encode(fundus.rotate(5).convert("L").resize((512, 512)), "PNG")]
    points = {"points": json.dumps([[600, 700], [900, 1000], [1200, 800]])}

    def pair(query: bytes, target: bytes, kind: str) -> Upload:
        return [("image", (f"q.{kind}", query, "application/octet-stream")),
                ("targets", (f"t.{kind}", target, "application/octet-stream"))]

    return {
        "chest CR DICOM 1955x1841 + 1760x1760": (pair(cr1, cr3, "dcm"), points),
        "same pixels as 16-bit PNG": (pair(*png16, "png"), points),
        "fundus JPEG 1411x1411 RGB, both": (pair(*jpegs, "jpg"), points),
        "512x512 8-bit PNG, both": (pair(*small, "png"), {"points": json.dumps([[200, 200], [300, 260]])}),
    }


def measure(service: Service, send: Callable[[httpx.Client], httpx.Response], count: int,
            images: int) -> tuple[float, float]:
    """(request path, model) CPU ms per image over `count` requests."""
    with httpx.Client(base_url=service.url, timeout=300) as client:
        assert send(client).status_code == 200  # warm: shapes, allocator pools
        worker0, other0 = service.cpu_s()
        for _ in range(count):
            response = send(client)
            assert response.status_code == 200, response.text
        worker1, other1 = service.cpu_s()
    per_image = 1000 / (count * images)
    return (other1 - other0) * per_image, (worker1 - worker0) * per_image


@contextlib.contextmanager
def worktree(revision: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ace-old-") as parent:
        tree = Path(parent) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), revision],
                       check=True, capture_output=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--revision", default="2a9f825", help="the older revision (default: before issue 13)")
    parser.add_argument("--requests", type=int, default=12, help="timed requests per kind and service")
    parser.add_argument("--encoder", type=Path, default=SHIPPED)
    args = parser.parse_args()
    kinds = request_kinds()
    with worktree(args.revision) as old_tree:
        services = {"old": Service(old_tree, args.encoder), "new": Service(ROOT, args.encoder)}
        try:
            for service in services.values():
                service.wait_ready()
            rows = []
            for kind, (files, form) in kinds.items():
                def send(client: httpx.Client, files: Upload = files, form: dict[str, str] = form
                         ) -> httpx.Response:
                    return client.post("/match", files=files, data=form)

                old = measure(services["old"], send, args.requests, len(files))
                new = measure(services["new"], send, args.requests, len(files))
                rows.append((kind, old, new))
        finally:
            for service in services.values():
                service.stop()
    print(f"CPU ms per image, {args.requests} requests per kind "
          f"(revision {args.revision} vs this checkout)\n")
    print("| request (query + 1 target) | request path old | new | old / new | model old | model new |")
    print("|---|---|---|---|---|---|")
    for kind, (path_old, model_old), (path_new, model_new) in rows:
        print(f"| {kind} | {path_old:.0f} | {path_new:.0f} | {path_old / path_new:.2f} | "
              f"{model_old:.0f} | {model_new:.0f} |")


if __name__ == "__main__":
    main()
