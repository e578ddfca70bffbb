"""`ace train`, `ace export` and `ace init-encoder`.

Config resolution for `ace train`: preset (--preset, or the config file's "preset" key, default
cpu) <- JSON config file (nested, partial) <- `--section.key=value` overrides. With --resume and
no config arguments the run directory's own config.json is used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ace_model.config import PRESETS, ACEConfig, preset
from ace_model.encoder import ArtifactError
from training import engine
from training.data import resolve_images

OVERRIDE_PREFIX = "cfg:"
TRUE_WORDS = {"true", "1", "yes", "on"}
FALSE_WORDS = {"false", "0", "no", "off"}


def parse_value(text: str, default: Any) -> Any:
    """A command-line string typed like the config field's default."""
    if isinstance(default, bool):
        word = text.strip().lower()
        if word not in TRUE_WORDS | FALSE_WORDS:
            raise ValueError(f"expected true or false, got {text!r}")
        return word in TRUE_WORDS
    if isinstance(default, tuple):
        return tuple(type(default[0])(part) for part in text.strip("()[] ").split(","))
    return type(default)(text)


def add_override_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("config overrides (--section.key=value; shown: the cpu preset)")
    for key, value in engine.flatten(preset("cpu").to_dict()).items():
        group.add_argument(f"--{key}", dest=OVERRIDE_PREFIX + key, default=argparse.SUPPRESS,
                           metavar=type(value).__name__.upper(), help=f"(cpu: {value})")


def typed_overrides(args: argparse.Namespace) -> dict[str, Any]:
    defaults = engine.flatten(preset("cpu").to_dict())
    overrides: dict[str, Any] = {}
    for dest, text in vars(args).items():
        if dest.startswith(OVERRIDE_PREFIX):
            key = dest[len(OVERRIDE_PREFIX):]
            try:
                overrides[key] = parse_value(text, defaults[key])
            except ValueError as err:
                raise ValueError(f"--{key}={text}: {err}") from err
    return overrides


def load_config_file(path: str | Path) -> tuple[str | None, dict[str, Any]]:
    """(preset named in the file or None, flattened settings)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read config file {path}: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a JSON object")
    named = data.pop("preset", None)
    return named, engine.flatten(data)


def resolve_config(args: argparse.Namespace) -> ACEConfig:
    overrides = typed_overrides(args)
    own_config = Path(getattr(args, "out", "") or ".") / engine.CONFIG_FILE
    wants_own = getattr(args, "resume", False) and not (args.preset or args.config or overrides)
    if wants_own and own_config.is_file():
        return ACEConfig.from_dict(json.loads(own_config.read_text()))
    file_preset, file_settings = load_config_file(args.config) if args.config else (None, {})
    config = preset(args.preset or file_preset or "cpu")
    return config.override(file_settings).override(overrides)


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_train(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    images = resolve_images(args.data, args.list, args.root)
    checkpoint = engine.train(
        config, images, args.out, args.max_steps, resume=args.resume, device=args.device,
        stop_after=args.stop_after, amp_dtype=args.amp_dtype, show_progress=not args.no_progress,
        threads=args.threads,
    )
    if engine.is_main_process():
        print(f"checkpoint: {checkpoint}")
        print(f"last step: {json.dumps(engine.last_record(args.out))}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    encoder = engine.export_encoder(args.checkpoint, args.out)
    print(f"encoder artifact {args.out} (fingerprint {encoder.fingerprint}, grid {encoder.grid}, "
          f"dim {encoder.dim}) from step {encoder.spec.provenance['step']}")
    return 0


def cmd_init_encoder(args: argparse.Namespace) -> int:
    file_preset, file_settings = load_config_file(args.config) if args.config else (None, {})
    config = preset(args.preset or file_preset or "cpu").override(file_settings)
    encoder = engine.init_encoder(config, args.out, args.seed)
    print(f"random-init encoder {args.out} ({config.model.backbone}, seed {args.seed}, "
          f"fingerprint {encoder.fingerprint})")
    return 0


def _guarded(command: Any) -> Any:
    """User mistakes end with one clear line and exit status 2, not a traceback."""
    def run(args: argparse.Namespace) -> int:
        try:
            return int(command(args))
        except (ValueError, FileNotFoundError, ArtifactError) as err:
            print(f"ace {args.command}: error: {err}", file=sys.stderr)
            return 2
    return run


# ---------------------------------------------------------------------------------------------
# Parsers


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    _register_train(subparsers)
    export = subparsers.add_parser("export", help="turn a training checkpoint into an encoder artifact")
    export.add_argument("--checkpoint", required=True, help="checkpoint file or run directory (latest)")
    export.add_argument("--out", required=True, help="artifact directory to write")
    export.set_defaults(func=_guarded(cmd_export))
    init = subparsers.add_parser("init-encoder", help="write a randomly initialised encoder artifact")
    init.add_argument("--preset", choices=sorted(PRESETS), default=None, help="architecture (default cpu)")
    init.add_argument("--config", help="JSON config file (e.g. a run's config.json) for the architecture")
    init.add_argument("--out", required=True, help="artifact directory to write")
    init.add_argument("--seed", type=int, default=0, help="initialisation seed")
    init.set_defaults(func=_guarded(cmd_init_encoder))


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
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--amp-dtype", choices=sorted(engine.AMP_DTYPES), default="float16",
                        help="autocast dtype on GPU when train.amp is on")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (CPU; 1 avoids spin-waiting on busy machines)")
    add_override_arguments(parser)
    parser.set_defaults(func=_guarded(cmd_train))
