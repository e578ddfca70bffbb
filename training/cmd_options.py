"""Command-line options several `ace` commands share."""

from __future__ import annotations

import argparse
import os

DEVICES = ("auto", "cpu", "cuda")  # ace_model.embedding.DEVICES (not imported: it needs torch)


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """--device and --fp32: the embedding policy the service uses (ace_model.embedding)."""
    parser.add_argument("--device", choices=DEVICES, default=os.environ.get("ACE_DEVICE", "auto"),
                        help="where the encoder runs (ACE_DEVICE; default auto: CUDA when visible); fp32 "
                             "on the CPU, bf16 (or fp16) autocast on CUDA, as the service computes queries")
    parser.add_argument("--fp32", action="store_true",
                        help="keep float32 on CUDA too (as a service run with ACE_AUTOCAST=false)")
