"""Config resolution for `ace train`: preset <- JSON config file <- `--section.key=value` overrides.

A config file is a diff against its preset (as in dinov2): `{"preset": "cpu", "train": {"lr": 0.02}}`
holds only what differs (configs/*.json); the preset is --preset, else the file's "preset" key,
else cpu. A run directory keeps the resolved config in config.json, usable again as --config and
what `--resume` without config arguments continues with. No torch here: `ace --help` reads the
presets' fields to list the overrides.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ace_model.config import ACEConfig, flatten, preset
from ace_model.errors import InputError

CONFIG_FILE = "config.json"  # the resolved config in a run directory
DEFAULT_PRESET = "cpu"
AMP_DTYPE_NAMES = ("bfloat16", "float16")  # autocast dtypes of GPU training (training.run_state)
TRUE_WORDS = {"true", "1", "yes", "on"}
FALSE_WORDS = {"false", "0", "no", "off"}


def override_fields() -> dict[str, Any]:
    """Every overridable dotted key with the default preset's value (which also gives its type)."""
    return flatten(preset(DEFAULT_PRESET).to_dict())


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


def typed_overrides(texts: dict[str, str]) -> dict[str, Any]:
    """{"train.lr": "1e-4"} -> {"train.lr": 0.0001}, typed by the config fields."""
    fields = override_fields()
    overrides: dict[str, Any] = {}
    for key, text in texts.items():
        try:
            overrides[key] = parse_value(text, fields[key])
        except ValueError as err:
            raise InputError(f"--{key}={text}: {err}") from err
    return overrides


def load_config_file(path: str | Path) -> tuple[str | None, dict[str, Any]]:
    """(preset named in the file or None, its flattened settings)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read config file {path}: {err}") from err
    if not isinstance(data, dict):
        raise InputError(f"config file {path} must hold a JSON object")
    named = data.pop("preset", None)
    return named, flatten(data)


def resolve_config(preset_name: str | None = None, config_file: str | Path | None = None,
                   overrides: dict[str, Any] | None = None) -> ACEConfig:
    """The preset (given, else the file's, else cpu) with the file's settings, then the overrides."""
    file_preset, file_settings = load_config_file(config_file) if config_file else (None, {})
    config = preset(preset_name or file_preset or DEFAULT_PRESET)
    return config.override(file_settings).override(overrides or {})


def compare(saved: dict[str, Any], config: ACEConfig) -> list[str]:
    """Dotted keys where a saved config dict (a checkpoint's) and `config` differ."""
    old, new = flatten(json.loads(json.dumps(saved))), _plain(config)
    return sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))


def write_run_config(run_dir: Path, config: ACEConfig) -> None:
    (run_dir / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))


def read_run_config(run_dir: str | Path) -> ACEConfig | None:
    """The resolved config a run directory holds, or None."""
    path = Path(run_dir) / CONFIG_FILE
    return ACEConfig.from_dict(json.loads(path.read_text())) if path.is_file() else None


def _plain(config: ACEConfig) -> dict[str, Any]:
    """Flattened, JSON-normalised (tuples as lists, as a saved config reads back)."""
    return flatten(json.loads(json.dumps(config.to_dict())))
