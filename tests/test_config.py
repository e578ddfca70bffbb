"""Config presets, validation and dict round trips."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from ace_model.config import PRESETS, ACEConfig, GeometryConfig, cpu, flatten, full, preset, tiny
from training.run_config import load_config_file, resolve_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_round_trips_through_json(name: str) -> None:
    config = preset(name)
    assert config.name == name
    restored = ACEConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config


def test_preset_scales_follow_the_spec() -> None:
    small, middle, big = tiny(), cpu(), full()

    def sizes(config: ACEConfig) -> tuple[int, int, int, int]:
        geo = config.geometry
        return geo.n, geo.cell, geo.grid, config.model.img_size

    assert sizes(small) == (4, 16, 10, 64)
    assert sizes(middle) == (14, 16, 32, 224)
    assert sizes(big) == (14, 32, 32, 448)
    assert big.model.backbone == "swin_base_patch4_window7_224" and big.model.dino_out == 65536
    for config in (small, middle, big):
        assert config.loss.logit_scale == pytest.approx(1 / 0.07)
        assert not config.loss.learn_logit_scale


def test_unknown_preset_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="cpu"):
        preset("huge")


def test_override_applies_dotted_keys_and_keeps_the_rest() -> None:
    config = tiny().override({"train.lr": 1e-3, "loss.learn_logit_scale": True})
    assert config.train.lr == 1e-3 and config.loss.learn_logit_scale
    assert config.geometry == tiny().geometry


@pytest.mark.parametrize("key", ["train.nope", "nosection.lr", "train.lr.deeper"])
def test_override_rejects_unknown_keys(key: str) -> None:
    with pytest.raises(ValueError, match="unknown config"):
        tiny().override({key: 1})


def test_from_dict_rejects_unknown_fields() -> None:
    data = tiny().to_dict()
    data["model"]["widht"] = 3
    with pytest.raises(ValueError, match="widht"):
        ACEConfig.from_dict(data)


def test_configs_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny().geometry.n = 6  # type: ignore[misc]


@pytest.mark.parametrize("scale", [(0.0, 1.0), (0.9, 0.8), (0.5, 1.5)])
def test_base_scale_is_validated(scale: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match="base_scale"):
        GeometryConfig(base_scale=scale)


def test_geometry_derived_sizes() -> None:
    geo = full().geometry
    assert (geo.view_px, geo.base_px) == (448, 1024)


# ---------------------------------------------------------------------------------------------
# configs/*.json: diffs against their preset (training.run_config resolves them)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# sha256 of each file's resolved config (sorted JSON) when the files were reduced to their
# differences: the reduction changed no setting. A deliberate change of a file or of a preset
# updates these.
RESOLVED = {"cpu-phantoms-30min.json": "f8dd83e71a8298d5", "cpu-phantoms.json": "f373a682b1a2a094",
            "full-chestxray14.json": "d2c62a3bf1825af2"}


def test_config_files_resolve_as_pinned() -> None:
    assert sorted(p.name for p in CONFIGS.glob("*.json")) == sorted(RESOLVED)
    for name, digest in RESOLVED.items():
        resolved = json.dumps(resolve_config(None, CONFIGS / name).to_dict(), sort_keys=True)
        assert hashlib.sha256(resolved.encode()).hexdigest()[:16] == digest, f"{name}: {resolved}"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.json")), ids=lambda p: p.name)
def test_config_files_hold_only_their_differences(path: Path) -> None:
    named, settings = load_config_file(path)
    assert named in PRESETS, f"{path.name} must name its preset"
    base = flatten(json.loads(json.dumps(preset(named).to_dict())))
    restated = {key: value for key, value in settings.items() if base[key] == value}
    assert not restated, f"{path.name} restates its preset's defaults: {restated}"


def test_overrides_apply_after_the_file_and_the_file_after_its_preset(tmp_path: Path) -> None:
    path = tmp_path / "diff.json"
    path.write_text(json.dumps({"preset": "tiny", "train": {"lr": 0.01, "seed": 3}}))
    config = resolve_config(None, path, {"train.seed": 4})
    assert (config.name, config.train.lr, config.train.seed) == ("tiny", 0.01, 4)
    assert config.model == tiny().model
    assert resolve_config("cpu", path).name == "cpu"  # --preset wins over the file's
    with pytest.raises(ValueError, match="cannot read config file"):
        resolve_config(None, tmp_path / "missing.json")
