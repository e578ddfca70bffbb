"""`ace train`, `ace export` and `ace init-encoder`.

Config resolution for `ace train` (training.run_config): preset (--preset, or the config file's
"preset" key, default cpu) <- JSON config file (nested, partial) <- `--section.key=value`
overrides. With --resume and no config arguments the run directory's own config.json is used.
"""

from __future__ import annotations

import argparse
import json

from ace_model.config import PRESETS, ACEConfig
from training.cmd_options import DEVICES
from training.run_config import (
    AMP_DTYPE_NAMES,
    DEFAULT_PRESET,
    override_fields,
    read_run_config,
    resolve_config,
    typed_overrides,
)

OVERRIDE_PREFIX = "cfg:"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _register_train(subparsers)
    export = subparsers.add_parser("export", help="turn a training checkpoint into an encoder artifact")
    export.add_argument("--checkpoint", required=True, help="checkpoint file or run directory (latest)")
    export.add_argument("--out", required=True, help="artifact directory to write")
    export.set_defaults(func=cmd_export)
    init = subparsers.add_parser("init-encoder", help="write a randomly initialised encoder artifact")
    init.add_argument("--preset", choices=sorted(PRESETS), default=None, help="architecture (default cpu)")
    init.add_argument("--config", help="JSON config file (e.g. a run's config.json) for the architecture")
    init.add_argument("--out", required=True, help="artifact directory to write")
    init.add_argument("--seed", type=int, default=0, help="initialisation seed")
    init.set_defaults(func=cmd_init_encoder)


def _register_train(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "train", help="pretrain an ACE encoder (single process, or under torchrun for DDP)",
        description="Pretrain ACE. Under `torchrun --nproc_per_node=N` every process runs this.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="base preset (default cpu)")
    parser.add_argument("--config", help="JSON config file (nested, partial) applied on the preset")
    parser.add_argument("--data", help="image folder (recursive) or landmark data set dir (images/)")
    parser.add_argument("--list", help="list file of image paths relative to --root (ChestX-ray14 splits)")
    parser.add_argument("--root", help="folder the --list paths are relative to")
    parser.add_argument("--out", required=True, help="run directory (checkpoints, config, metrics)")
    parser.add_argument("--resume", action="store_true", help="continue the latest checkpoint in --out")
    parser.add_argument("--max-steps", type=int, default=None, help="run length in steps (schedules span it)")
    parser.add_argument("--stop-after", type=int, default=None, help="stop at this step; --resume later")
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--amp-dtype", choices=sorted(AMP_DTYPE_NAMES), default="float16",
                        help="autocast dtype on GPU when train.amp is on")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (CPU; 1 avoids spin-waiting on busy machines)")
    add_override_arguments(parser)
    parser.set_defaults(func=cmd_train)


def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        f"config overrides (--section.key=value; shown: the {DEFAULT_PRESET} preset)")
    for key, value in override_fields().items():
        group.add_argument(f"--{key}", dest=OVERRIDE_PREFIX + key, default=argparse.SUPPRESS,
                           metavar=type(value).__name__.upper(), help=f"({DEFAULT_PRESET}: {value})")


def override_texts(args: argparse.Namespace) -> dict[str, str]:
    """The `--section.key=value` arguments given, as {"section.key": "value"}."""
    return {dest[len(OVERRIDE_PREFIX):]: text for dest, text in vars(args).items()
            if dest.startswith(OVERRIDE_PREFIX)}


def resolve_args_config(args: argparse.Namespace) -> ACEConfig:
    """The run's config: the run directory's own on a bare --resume, else preset <- file <- overrides."""
    overrides = typed_overrides(override_texts(args))
    if getattr(args, "resume", False) and not (args.preset or args.config or overrides):
        own = read_run_config(getattr(args, "out", None) or ".")
        if own is not None:
            return own
    return resolve_config(args.preset, args.config, overrides)


# ---------------------------------------------------------------------------------------------
# Commands (torch is imported here, not at parser building: `ace --help` stays fast)


def cmd_train(args: argparse.Namespace) -> int:
    from training import engine
    from training.data import resolve_images
    from training.distributed import is_main_process

    config = resolve_args_config(args)
    images = resolve_images(args.data, args.list, args.root)
    checkpoint = engine.train(
        config, images, args.out, args.max_steps, resume=args.resume, device=args.device,
        stop_after=args.stop_after, amp_dtype=args.amp_dtype, show_progress=not args.no_progress,
        threads=args.threads,
    )
    if is_main_process():
        print(f"checkpoint: {checkpoint}")
        print(f"last step: {json.dumps(engine.last_record(args.out))}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from training.export import export_encoder

    encoder = export_encoder(args.checkpoint, args.out)
    print(f"encoder artifact {args.out} (fingerprint {encoder.fingerprint}, grid {encoder.grid}, "
          f"dim {encoder.dim}) from step {encoder.spec.provenance['step']}")
    return 0


def cmd_init_encoder(args: argparse.Namespace) -> int:
    from training.export import init_encoder

    config = resolve_config(args.preset, args.config)
    encoder = init_encoder(config, args.out, args.seed)
    print(f"random-init encoder {args.out} ({config.model.backbone}, seed {args.seed}, "
          f"fingerprint {encoder.fingerprint})")
    return 0
