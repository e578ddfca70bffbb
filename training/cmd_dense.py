"""`ace train-dense`: train the two-level dense encoder (training/dense_train.py) and export it."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from ace_model.errors import InputError
from training.dense_config import DenseTrainConfig, WarpConfig

TERMS = ("fine", "coarse", "xsubj", "global")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "train-dense", help="train the two-level dense encoder on warped view pairs and export it",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train the served default encoder: pixel InfoNCE between views with known warps "
                    "(fine, stride 4), coarse InfoNCE with negatives from other images (stride 16), "
                    "cross-subject landmark terms and ACE's global term (docs/training.md).")
    parser.add_argument("--data", type=Path, action="append", required=True,
                        help="landmark data set or image folder; repeat for several")
    parser.add_argument("--out", type=Path, required=True, help="run directory (checkpoint, log)")
    parser.add_argument("--export", type=Path, help="write the encoder artifact here at the end")
    parser.add_argument("--steps", type=int, default=DenseTrainConfig.steps, help="optimiser steps")
    parser.add_argument("--pairs", type=int, default=DenseTrainConfig.pairs, help="images per step")
    parser.add_argument("--lr", type=float, default=DenseTrainConfig.lr, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, views and sampling")
    parser.add_argument("--img-size", type=int, default=224, help="view side = encoder input (x32)")
    for term in TERMS:
        parser.add_argument(f"--w-{term}", type=float, default=None,
                            help=f"weight of the {term} term (0 switches it off)")
    parser.add_argument("--fresh", action="store_true", help="ignore a checkpoint in --out")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> DenseTrainConfig:
    base = DenseTrainConfig()
    weights = dict(base.weights)
    for term in TERMS:
        value = getattr(args, f"w_{term}")
        if value is not None:
            weights[term] = value
    if args.steps < 1 or args.pairs < 2:
        raise InputError("--steps must be >= 1 and --pairs >= 2 (other images give the negatives)")
    return replace(base, steps=args.steps, pairs=args.pairs, lr=args.lr, seed=args.seed, weights=weights)


def run(args: argparse.Namespace) -> int:
    import torch

    from training.dense_train import export_dense, train_dense

    cfg = config_from_args(args)
    if args.img_size % 32:
        raise InputError(f"--img-size must be a multiple of 32, got {args.img_size}")
    missing = [str(d) for d in args.data if not d.is_dir()]
    if missing:
        raise FileNotFoundError(f"no such data folder: {', '.join(missing)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    state = train_dense(args.data, args.out, cfg, WarpConfig(view_px=args.img_size),
                        resume=not args.fresh, progress=not args.no_progress)
    if args.export:
        provenance = {"method": "train-dense", "step": state.step, "data": [str(d) for d in args.data],
                      "command": "ace " + shlex.join(sys.argv[1:]), "run": str(args.out)}
        encoder = export_dense(state, args.export, args.img_size, provenance)
        print(f"encoder artifact {args.export} (fingerprint {encoder.fingerprint})")
    print(json.dumps(json.loads((args.out / "train-dense.json").read_text())["loss_last_100"]))
    return 0
