"""`ace eval`: landmark correspondence (with confidence calibration and time per pair), crop and
landmark retrieval, and real medical images under known warps, with baselines and ablations."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ace_model.errors import InputError
from training.cmd_options import add_device_arguments

if TYPE_CHECKING:
    from ace_model.encoder import Encoder
    from training.evaluate import EvalOptions


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate encoders on a landmark data set against baselines",
        description="Locate every landmark of each image in every other image with each encoder "
        "(and baselines), run the crop-retrieval protocol, optionally landmark retrieval over an "
        "index and real medical images under known warps, and write report.md, report.json and PNG "
        "plots to --out.")
    parser.add_argument("--encoder", type=Path, required=True, help="encoder artifact directory")
    parser.add_argument("--name", default="ace", help="method name of --encoder in the report")
    parser.add_argument("--encoder-b", type=Path, help="a second artifact to compare (e.g. an ablation)")
    parser.add_argument("--name-b", default="encoder-b", help="method name of --encoder-b")
    parser.add_argument("--random-baseline", action="store_true",
                        help="add the same architecture with random initialisation")
    parser.add_argument("--refine-ablation", action="store_true",
                        help="add --encoder without sub-cell refinement (integer peak)")
    parser.add_argument("--match-ablation", action="store_true",
                        help="add --encoder matched with the coarse level only, the fine level only, "
                        "both, and both + the second looks at 2x/4x the size as far as the images' "
                        "resolution goes (dense encoders)")
    parser.add_argument("--ncc", action="store_true",
                        help="add NCC template matching at the model size and at full resolution")
    parser.add_argument("--identity-baseline", action="store_true",
                        help="add the same relative position in the target (no matching at all)")
    parser.add_argument("--ncc-template", type=int, default=33,
                        help="NCC template side in model pixels (default 33)")
    parser.add_argument("--real", action="store_true",
                        help="add the real medical images pydicom(-data) and scikit-image ship, under "
                        "random affine and elastic warps")
    parser.add_argument("--real-transforms", type=int, default=3,
                        help="warps per real image and kind (affine, elastic)")
    parser.add_argument("--retrieval", action="store_true",
                        help="add landmark retrieval over an index of the other subjects' images")
    parser.add_argument("--retrieval-k", type=int, default=10, help="hits per landmark query (default 10)")
    parser.add_argument("--data", type=Path, required=True,
                        help="landmark data set: images/, landmarks.csv[, metadata.csv]")
    parser.add_argument("--max-images", type=int, help="use only the first N images")
    parser.add_argument("--max-pairs", type=int, help="random subset of (query, target) pairs")
    parser.add_argument("--crop-group", type=int, default=16, help="N of crop retrieval (chance 1/N)")
    parser.add_argument("--batch-size", type=int, default=8)
    add_device_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="report directory")
    parser.set_defaults(func=run)


def load_encoders(args: argparse.Namespace) -> list[tuple[str, Encoder]]:
    from ace_model.encoder import load_encoder

    encoders = [(args.name, load_encoder(args.encoder))]
    if args.encoder_b is not None:
        encoders.append((args.name_b, load_encoder(args.encoder_b)))
    return encoders


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    from training.evaluate import EvalOptions

    artifacts = [(args.name, args.encoder), (args.name_b, args.encoder_b)]
    return EvalOptions(
        data=args.data, encoders=tuple((name, Path(path)) for name, path in artifacts if path),
        random_baseline=args.random_baseline, refine_ablation=args.refine_ablation,
        match_ablation=args.match_ablation, retrieval=args.retrieval, retrieval_k=args.retrieval_k,
        ncc=args.ncc, identity_baseline=args.identity_baseline, real=args.real,
        max_images=args.max_images, max_pairs=args.max_pairs,
        crop_group=args.crop_group, ncc_template=args.ncc_template,
        real_transforms=args.real_transforms, seed=args.seed, batch_size=args.batch_size,
        device=args.device, fp32=args.fp32)


def command_line(args: argparse.Namespace) -> str:
    """The `ace eval` command line these arguments stand for (when not started as `ace`)."""
    parts = ["ace", "eval"]
    for key, value in vars(args).items():
        if key in ("command", "func") or value is None or value is False:
            continue
        parts.append("--" + key.replace("_", "-"))
        if value is not True:
            parts.append(str(value))
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    from training.eval_report import write_report
    from training.evaluate import run_evaluation

    if args.name == args.name_b and args.encoder_b is not None:
        raise InputError("--name and --name-b must differ")
    result = run_evaluation(options_from_args(args), load_encoders(args))
    command = "ace " + shlex.join(sys.argv[1:]) if sys.argv[0].endswith("ace") else command_line(args)
    report = write_report(result, args.out, command)
    print(f"report written to {report}")
    return 0
