"""Service throughput and latency on loopback, as ratios measured side by side in one run.

Measures, in this order (the raw encoder twice, before and after, to bracket machine noise):
  raw encoder images/s at batch B (no HTTP, same process settings),
  /match images/s at saturation (C concurrent clients) with the batched configuration,
  /match p50/p99 latency with 1 client (batched configuration),
  /match images/s and latency with max_batch_size=1 under C clients.
Each server is a separate `uvicorn service.main:create_app_from_env` process on 127.0.0.1.

    .venv/bin/python benchmarks/service.py [--seconds 8] [--clients 16] [--encoder DIR]
"""

from __future__ import annotations

import argparse
import asyncio
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


def raw_images_per_s(encoder: Encoder, batch: int, seconds: float) -> float:
    images = torch.randn(batch, 3, encoder.spec.img_size, encoder.spec.img_size)
    with torch.inference_mode():
        encoder(images)  # warm-up
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            encoder(images)
            done += batch
    return done / (time.perf_counter() - started)


class Server:
    def __init__(self, encoder_dir: Path, threads: int, **settings: object) -> None:
        self.port = free_port()
        env = {**os.environ, "ACE_ENCODER": str(encoder_dir), "ACE_DEVICE": "cpu",
               "ACE_THREADS": str(threads), "ACE_POLL_INTERVAL_S": "0", "ACE_LOG_LEVEL": "warning"}
        env.update({f"ACE_{k.upper()}": str(v) for k, v in settings.items()})
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "service.main:create_app_from_env", "--factory",
             "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"], env=env)
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


async def load(url: str, image: bytes, clients: int, seconds: float) -> dict[str, float]:
    """`clients` closed-loop clients for `seconds` (after a short warm-up); images/s, p50, p99."""
    latencies: list[float] = []
    errors = 0
    async with httpx.AsyncClient(base_url=url, timeout=120,
                                 limits=httpx.Limits(max_connections=clients)) as client:

        async def one() -> float:
            nonlocal errors
            started = time.perf_counter()
            response = await client.post("/match", files={"image": ("q.png", image, "image/png")},
                                         data={"points": "[[100, 120]]", "k": "5"})
            errors += response.status_code != 200
            return time.perf_counter() - started

        async def worker(until: float, record: bool) -> None:
            while time.perf_counter() < until:
                took = await one()
                if record:
                    latencies.append(took)

        await asyncio.gather(*(worker(time.perf_counter() + 1.0, False) for _ in range(clients)))
        started = time.perf_counter()
        await asyncio.gather(*(worker(started + seconds, True) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"images_per_s": len(latencies) / elapsed, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "requests": len(latencies), "errors": errors}


def batch_histogram(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    lines = [line for line in text.splitlines() if line.startswith("ace_batch_size_")]
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in lines}
    count = values.get("ace_batch_size_count", 0.0)
    return {"batches": count, "mean_batch": values.get("ace_batch_size_sum", 0.0) / max(count, 1.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", type=Path, help="encoder artifact (default: random vit_tiny at 224)")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per phase")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8, help="max_batch_size of the batched config")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-side", type=int, default=256, help="query PNG side in pixels")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        encoder_dir = args.encoder or Path(tmp) / "encoder"
        if args.encoder is None:
            torch.manual_seed(0)
            Encoder(EncoderSpec("vit_tiny_patch16_224", 224)).save(encoder_dir)
        print(json.dumps(run(load_encoder(encoder_dir), encoder_dir, args), indent=2))


def run(encoder: Encoder, encoder_dir: Path, args: argparse.Namespace) -> dict[str, object]:
    image = query_png(args.image_side)
    raw_before = raw_images_per_s(encoder, args.batch, args.seconds)
    with Server(encoder_dir, args.threads, max_batch_size=args.batch, max_wait_ms=5) as server:
        batched = asyncio.run(load(server.url, image, args.clients, args.seconds))
        batched.update(batch_histogram(server.url))
        single_client = asyncio.run(load(server.url, image, 1, args.seconds))
    with Server(encoder_dir, args.threads, max_batch_size=1, max_wait_ms=0) as server:
        unbatched = asyncio.run(load(server.url, image, args.clients, args.seconds))
        unbatched_single = asyncio.run(load(server.url, image, 1, args.seconds))
    raw_after = raw_images_per_s(encoder, args.batch, args.seconds)
    raw = (raw_before + raw_after) / 2
    return {
        "encoder": f"{encoder.spec.backbone}@{encoder.spec.img_size}", "threads": args.threads,
        "clients": args.clients, "image_side": args.image_side,
        "raw_encoder_images_per_s": {"before": raw_before, "after": raw_after, "batch": args.batch},
        "batched": {"clients": batched, "one_client": single_client},
        "max_batch_size_1": {"clients": unbatched, "one_client": unbatched_single},
        "ratio_service_to_raw": batched["images_per_s"] / raw,
        "ratio_batched_to_unbatched": batched["images_per_s"] / unbatched["images_per_s"],
    }


if __name__ == "__main__":
    main()
