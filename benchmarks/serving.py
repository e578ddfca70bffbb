"""Service throughput and latency on loopback, as ratios measured side by side in one run.

Phases, run round-robin (--rounds times, medians reported) so machine noise hits all alike:
  raw encoder images/s at batch B (no HTTP, this process, same thread count),
  /match images/s and p50/p99 latency at C concurrent clients, batched config (max_batch_size=B),
  the same with max_batch_size=1, and both configs with a single client; per phase also the mean
  batch and the CPU ms per request in the model (the worker thread) and outside it (the request
  path), from the server's /metrics.
Each configuration is its own `uvicorn service.main:create_app_from_env` process on 127.0.0.1;
one request = one query image (PNG, decoded by the service) and one point, no index.

    .venv/bin/python benchmarks/serving.py [--seconds 8] [--clients 16] [--encoder DIR]
    python benchmarks/serving.py --device cuda --backbone vit_base_patch16_224 --img-size 448 \
        --batch 32 --clients 64                   # on a GPU host: the same ratios on the GPU
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from ace_model.embedding import EmbeddingPolicy, resolve_device
from ace_model.encoder import Encoder, EncoderSpec, load_encoder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def query_png(side: int) -> bytes:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side] / side
    grey = 0.5 + 0.3 * np.sin(8 * xx) * np.cos(6 * yy) + 0.1 * rng.random((side, side))
    out = io.BytesIO()
    Image.fromarray((np.clip(grey, 0, 1) * 255).astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def raw_images_per_s(encoder: Encoder, device: str, batch: int, seconds: float) -> float:
    """The service's own forward path (uint8 in, normalised on the device, autocast, copy back:
    what its worker runs) without HTTP or queueing."""
    policy = EmbeddingPolicy.resolve(device)
    encoder = policy.place(encoder)
    side = encoder.spec.img_size
    images = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8)  # as the worker gets them
    policy.forward(encoder, images)  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        policy.forward(encoder, images)  # returns CPU tensors: the device has finished
        done += batch
    return done / (time.perf_counter() - started)


class Server:
    def __init__(self, encoder_dir: Path, threads: int, device: str, workers: int = 1,
                 **settings: object) -> None:
        self.port = free_port()
        env = {**os.environ, "ACE_ENCODER": str(encoder_dir), "ACE_DEVICE": device,
               "ACE_THREADS": str(threads), "ACE_POLL_INTERVAL_S": "0", "ACE_LOG_LEVEL": "warning"}
        env.update({f"ACE_{k.upper()}": str(v) for k, v in settings.items()})
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "service.main:create_app_from_env", "--factory",
             "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning",
             "--http", "service.protocol:ConnectionLimitsProtocol",
             "--workers", str(workers)], env=env)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become ready")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


async def load(url: str, image: bytes, clients: int, seconds: float, one_process: bool = True
               ) -> dict[str, float]:
    """`clients` closed-loop clients for `seconds` (after a short warm-up); images/s, p50, p99, and
    from the server's /metrics (one_process: a single api process answers every scrape) the mean
    batch and the CPU per request of the model (its worker thread) and of everything else."""
    latencies: list[float] = []
    errors = 0
    async with httpx.AsyncClient(base_url=url, timeout=120,
                                 limits=httpx.Limits(max_connections=clients)) as client:

        async def one() -> float:
            nonlocal errors
            started = time.perf_counter()
            try:
                response = await client.post("/match", files={"image": ("q.png", image, "image/png")},
                                             data={"points": "[[100, 120]]", "k": "5"})
                errors += response.status_code != 200
            except httpx.TransportError as err:  # counted, and the run goes on
                errors += 1
                print(f"transport error: {err!r}", file=sys.stderr)
            return time.perf_counter() - started

        async def worker(until: float, record: bool) -> None:
            while time.perf_counter() < until:
                took = await one()
                if record:
                    latencies.append(took)

        await asyncio.gather(*(worker(time.perf_counter() + 1.0, False) for _ in range(clients)))
        before, started = scrape(url), time.perf_counter()
        await asyncio.gather(*(worker(started + seconds, True) for _ in range(clients)))
        elapsed, after = time.perf_counter() - started, scrape(url)
    ms = np.array(latencies) * 1000
    result = {"images_per_s": len(latencies) / elapsed, "p50_ms": float(np.percentile(ms, 50)),
              "p99_ms": float(np.percentile(ms, 99)), "requests": len(latencies), "errors": errors}
    return result | (server_side(before, after, len(latencies)) if one_process else {})


METRICS = ("ace_batch_size_count", "ace_batch_size_sum", "ace_worker_cpu_seconds_total",
           "process_cpu_seconds_total")


def scrape(url: str) -> dict[str, float]:
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    values = dict(line.split(" ", 1) for line in lines if line.split(" ", 1)[0] in METRICS)
    return {name: float(values.get(name, "nan")) for name in METRICS}


def server_side(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
    """Mean batch, and CPU ms per request in the model's worker thread and outside it (the
    request path: HTTP, decoding, preprocessing, matching)."""
    delta = {name: after[name] - before[name] for name in METRICS}
    model = delta["ace_worker_cpu_seconds_total"]
    return {"mean_batch": delta["ace_batch_size_sum"] / max(delta["ace_batch_size_count"], 1.0),
            "model_cpu_ms_per_request": 1000 * model / max(requests, 1),
            "outside_model_cpu_ms_per_request":
                1000 * (delta["process_cpu_seconds_total"] - model) / max(requests, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", type=Path, help="encoder artifact (default: random --backbone)")
    parser.add_argument("--backbone", default="vit_tiny_patch16_224", help="timm model without --encoder")
    parser.add_argument("--img-size", type=int, default=224, help="input side without --encoder")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (servers and raw encoder)")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per phase")
    parser.add_argument("--rounds", type=int, default=2, help="round-robin rounds over all phases")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8, help="max_batch_size of the batched config")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1,
                        help="> 1 adds a phase: the batched config with this many api processes")
    parser.add_argument("--image-side", type=int, default=256, help="query PNG side in pixels")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        encoder_dir = args.encoder or Path(tmp) / "encoder"
        if args.encoder is None:
            torch.manual_seed(0)
            Encoder(EncoderSpec(args.backbone, args.img_size)).save(encoder_dir)
        print(json.dumps(run(load_encoder(encoder_dir), encoder_dir, args), indent=2))


def run(encoder: Encoder, encoder_dir: Path, args: argparse.Namespace) -> dict[str, object]:
    """Both servers stay up (idle when not measured); phases run round-robin, medians reported."""
    image = query_png(args.image_side)
    samples: dict[str, list[dict[str, float]]] = {}
    queue = max(64, 2 * args.clients)
    with Server(encoder_dir, args.threads, args.device, max_batch_size=args.batch, max_wait_ms=5,
                queue_size=queue) as batched, \
            Server(encoder_dir, args.threads, args.device, max_batch_size=1, max_wait_ms=0,
                   queue_size=queue) as single, \
            contextlib.ExitStack() as extra:
        phases = {
            "raw_encoder": lambda: {
                "images_per_s": raw_images_per_s(encoder, args.device, args.batch, args.seconds)},
            "batched_clients": lambda: asyncio.run(load(batched.url, image, args.clients, args.seconds)),
            "batch1_clients": lambda: asyncio.run(load(single.url, image, args.clients, args.seconds)),
            "batched_one_client": lambda: asyncio.run(load(batched.url, image, 1, args.seconds)),
            "batch1_one_client": lambda: asyncio.run(load(single.url, image, 1, args.seconds)),
        }
        if args.workers > 1:
            several = extra.enter_context(Server(encoder_dir, args.threads, args.device, args.workers,
                                                 max_batch_size=args.batch, max_wait_ms=5, queue_size=queue))
            phases["batched_workers_clients"] = lambda: asyncio.run(
                load(several.url, image, args.clients, args.seconds, one_process=False))
        for _ in range(args.rounds):
            for name, phase in phases.items():
                samples.setdefault(name, []).append(phase())
    result = {name: _median(runs) for name, runs in samples.items()}
    return {
        "encoder": f"{encoder.spec.backbone}@{encoder.spec.img_size}", "threads": args.threads,
        "device": _device_name(args.device),
        "clients": args.clients, "image_side": args.image_side, "batch": args.batch,
        "rounds": args.rounds, "seconds_per_phase": args.seconds, "phases": result,
        "ratio_service_to_raw": result["batched_clients"]["images_per_s"]
        / result["raw_encoder"]["images_per_s"],
        "ratio_batched_to_batch1": result["batched_clients"]["images_per_s"]
        / result["batch1_clients"]["images_per_s"],
        **_workers_ratio(result, args.workers),
    }


def _workers_ratio(result: dict[str, dict[str, float]], workers: int) -> dict[str, object]:
    if "batched_workers_clients" not in result:
        return {}
    return {"workers": workers,
            "ratio_workers_to_raw": result["batched_workers_clients"]["images_per_s"]
            / result["raw_encoder"]["images_per_s"],
            "ratio_workers_to_one_process": result["batched_workers_clients"]["images_per_s"]
            / result["batched_clients"]["images_per_s"]}


def _device_name(requested: str) -> str:
    device = resolve_device(requested)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.median([run[key] for run in runs])) for key in runs[0]}


if __name__ == "__main__":
    main()
