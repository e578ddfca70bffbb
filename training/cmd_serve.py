"""`ace serve` and `ace demo`: run the correspondence service with uvicorn.

The options become ACE_ environment variables and uvicorn imports the app factory and the HTTP
protocol with the connection limits by name ("service.main:create_app_from_env",
"service.protocol:ConnectionLimitsProtocol"), so this package never imports `service`.
`--demo` (and `ace demo`) first fills $ACE_HOME (default ./var/ace) with whatever is missing:
the bundled demo data, the shipped encoder (artifacts/ace-dense-phantoms), and a published index.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import sys
from pathlib import Path

from ace_model.errors import InputError

APP = "service.main:create_app_from_env"
PROTOCOL = "service.protocol:ConnectionLimitsProtocol"  # header size limit, header and body timeouts
DEFAULT_HOME = "var/ace"
# The shipped default encoder (committed; trained on synthetic phantoms only, see BENCHMARKS.md).
# Demo training runs only when a checkout lacks it.
PRETRAINED = Path(__file__).resolve().parents[1] / "artifacts" / "ace-dense-phantoms"
DEMO_STEPS = 40  # a few minutes on 2 idle CPU cores (~3-5 s per step of the cpu preset)

ENV_OPTIONS = {  # argparse dest -> environment variable read by service.config.Settings
    "encoder": "ACE_ENCODER", "index": "ACE_INDEX_ROOT", "device": "ACE_DEVICE",
    "max_batch_size": "ACE_MAX_BATCH_SIZE", "max_wait_ms": "ACE_MAX_WAIT_MS",
    "queue_size": "ACE_QUEUE_SIZE", "threads": "ACE_THREADS", "api_key": "ACE_API_KEY",
    "cors_origins": "ACE_CORS_ORIGINS", "poll_interval": "ACE_POLL_INTERVAL_S",
    "log_level": "ACE_LOG_LEVEL", "max_header_bytes": "ACE_MAX_HEADER_BYTES",
    "header_timeout_s": "ACE_HEADER_TIMEOUT_S", "body_timeout_s": "ACE_BODY_TIMEOUT_S",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="run the correspondence service (docs/service.md)",
                                  description="Serve POST /match and friends over HTTP with uvicorn.")
    _add_serve_arguments(serve)
    serve.set_defaults(func=run_serve)
    demo = subparsers.add_parser("demo", help="= ace serve --demo: build the demo home, then serve")
    _add_serve_arguments(demo)
    demo.set_defaults(func=run_serve, demo=True)


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--encoder", type=Path, help="encoder artifact directory (ACE_ENCODER)")
    parser.add_argument("--index", type=Path, help="index root with a CURRENT pointer (ACE_INDEX_ROOT)")
    parser.add_argument("--demo", action="store_true",
                        help="build what is missing in $ACE_HOME (data, encoder, index), then serve it")
    parser.add_argument("--home", type=Path, default=None,
                        help=f"demo home (default $ACE_HOME or {DEFAULT_HOME})")
    parser.add_argument("--demo-steps", type=int, default=DEMO_STEPS, help="demo training steps")
    parser.add_argument("--host", default=os.environ.get("ACE_HOST", "127.0.0.1"),
                        help="bind address (ACE_HOST, default 127.0.0.1)")
    parser.add_argument("--workers", type=int, default=os.environ.get("ACE_WORKERS", "1"),
                        help="api processes on this port (ACE_WORKERS); each loads its own encoder and "
                             "batches its own requests: 2-4 keep one GPU busy (docs/deploy.md)")
    parser.add_argument("--port", type=int, default=os.environ.get("ACE_PORT", "8000"),
                        help="port (ACE_PORT, default 8000)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    parser.add_argument("--max-batch-size", type=int, default=None)
    parser.add_argument("--max-wait-ms", type=float, default=None)
    parser.add_argument("--queue-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the worker")
    parser.add_argument("--api-key", default=None, help="required on /admin routes (prefer ACE_API_KEY)")
    parser.add_argument("--cors-origins", default=None, help="comma-separated allowed origins")
    parser.add_argument("--poll-interval", type=float, default=None, help="index pointer poll, seconds")
    parser.add_argument("--log-level", default=None, help="debug | info | warning | error")
    parser.add_argument("--max-header-bytes", type=int, default=None,
                        help="request line + headers, in bytes; more gets 431 (ACE_MAX_HEADER_BYTES, 16384)")
    parser.add_argument("--header-timeout-s", type=float, default=None,
                        help="seconds for request line + headers to arrive (ACE_HEADER_TIMEOUT_S, 10)")
    parser.add_argument("--body-timeout-s", type=float, default=None,
                        help="seconds for a request body to arrive; then 408 (ACE_BODY_TIMEOUT_S, 60)")


def run_serve(args: argparse.Namespace) -> int:
    if args.demo:
        home = Path(args.home or os.environ.get("ACE_HOME", DEFAULT_HOME))
        args.encoder, args.index = prepare_demo_home(home, args.demo_steps)
    if args.encoder is None and "ACE_ENCODER" not in os.environ:
        raise InputError("give --encoder DIR (or ACE_ENCODER), or use --demo")
    if args.workers < 1:
        raise InputError(f"--workers must be at least 1, got {args.workers}")
    export_environment(args)
    warn_if_exposed(args.host, os.environ.get("ACE_API_KEY"))
    import uvicorn  # only the serving path needs it

    print(f"serving on http://{args.host}:{args.port} with {args.workers} worker process(es) "
          "(API docs at /docs)", flush=True)
    uvicorn.run(APP, factory=True, http=PROTOCOL, host=args.host, port=args.port, workers=args.workers,
                log_level=os.environ.get("ACE_LOG_LEVEL", "info").lower())
    return 0


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches: 127.0.0.0/8, ::1, localhost."""
    name = host.strip().strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:  # another host name: it may resolve to any interface
        return False


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The start-up warning for a service reachable beyond this machine without an API key."""
    if is_loopback(host) or api_key:
        return None
    return (f"ace serve: WARNING: binding {host}, reachable beyond this machine, and no API key is "
            "configured.\n"
            "  Admin routes (POST /admin/reload) will be refused with 403; every other route answers "
            "anyone who can reach the port.\n"
            "  To enable admin routes set a key: ACE_API_KEY=$(openssl rand -hex 32) ace serve ... "
            "(or --api-key KEY), and send it as X-API-Key. To serve this machine only: --host 127.0.0.1.")


def warn_if_exposed(host: str, api_key: str | None) -> bool:
    """Print exposure_warning on stderr when it applies; True if it did."""
    warning = exposure_warning(host, api_key)
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)
    return warning is not None


def export_environment(args: argparse.Namespace) -> None:
    for dest, variable in ENV_OPTIONS.items():
        value = getattr(args, dest, None)
        if value is not None:
            os.environ[variable] = str(value)


def prepare_demo_home(home: Path, steps: int) -> tuple[Path, Path]:
    """Fill home/{data,encoder,index} with whatever is missing; returns (encoder dir, index root)."""
    from training.cmd_data import build_demo_data

    encoder_dir, index_root = home / "encoder", home / "index"
    _step(f"demo data in {home / 'data'}")
    data = build_demo_data(home / "data")
    if not (encoder_dir / "encoder.json").is_file():
        _demo_encoder(data["phantoms"], home, encoder_dir, steps)
    if not (index_root / "CURRENT").is_file():
        _demo_index(encoder_dir, index_root, data["phantoms"], data["samples"])
    _step(f"ready: encoder {encoder_dir}, index {index_root}")
    return encoder_dir, index_root


def _demo_encoder(phantoms: Path, home: Path, encoder_dir: Path, steps: int) -> None:
    if (PRETRAINED / "encoder.json").is_file():
        _step(f"using the pretrained encoder {PRETRAINED}")
        shutil.copytree(PRETRAINED, encoder_dir, dirs_exist_ok=True)
        return
    from ace_model.config import preset
    from training import engine
    from training.export import export_encoder

    _step(f"demo training: {steps} steps of the cpu preset on {phantoms} (a few minutes on a CPU)")
    checkpoint = engine.train(preset("cpu"), phantoms, home / "runs" / "demo", steps, resume=_has_run(home),
                              show_progress=True)
    export_encoder(checkpoint, encoder_dir)


def _has_run(home: Path) -> bool:
    from training.checkpoints import latest_checkpoint

    return latest_checkpoint(home / "runs" / "demo") is not None


def _demo_index(encoder_dir: Path, index_root: Path, phantoms: Path, samples: Path) -> None:
    from training.build_index import build_index

    _step(f"indexing {phantoms} and {samples} into {index_root}")
    # samples/ is a plain folder: its metadata.csv names the images and their patients
    build_index(encoder_dir, [phantoms, samples], index_root, metadata=samples / "metadata.csv")


def _step(message: str) -> None:
    print(f"[ace demo] {message}", flush=True)
