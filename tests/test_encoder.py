"""Inference encoder: normalised outputs, artifact round trip, fingerprint, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ace_model.backbone import Backbone
from ace_model.encoder import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ArtifactError,
    Encoder,
    EncoderSpec,
    _fingerprint,
    encoder_from_backbone,
    load_encoder,
)

SPEC = EncoderSpec("vit_tiny_patch16_224", 64, provenance={"preset": "tiny"})


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    torch.manual_seed(0)
    return Encoder(SPEC)


@pytest.fixture(scope="module")
def saved(encoder: Encoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("artifact") / "encoder"
    encoder.save(directory)
    return directory


@pytest.fixture
def artifact(saved: Path, tmp_path: Path) -> Path:
    """A private copy of the saved artifact that a test may damage."""
    return Path(shutil.copytree(saved, tmp_path / "encoder"))


def images(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(5))


def edit_meta(directory: Path, refingerprint: bool = True, **changes: object) -> None:
    """Change encoder.json fields; optionally re-sign it as a careless exporter would."""
    path = directory / CONFIG_FILE
    meta = json.loads(path.read_text()) | changes
    if refingerprint:
        spec = EncoderSpec(meta["backbone"], meta["img_size"], meta["pixel_mean"], meta["pixel_std"])
        meta["fingerprint"] = _fingerprint(directory / WEIGHTS_FILE, spec)
    path.write_text(json.dumps(meta))


def test_embeddings_are_unit_norm_and_global_is_the_normalised_token_mean(encoder: Encoder) -> None:
    batch = images()
    with torch.no_grad():
        out = encoder(batch)
        tokens = encoder.backbone(batch)
    assert out.patches.shape == (3, 4, 4, 192) and out.global_.shape == (3, 192)
    assert (encoder.grid, encoder.dim) == (4, 192)
    torch.testing.assert_close(out.patches.norm(dim=-1), torch.ones(3, 4, 4))
    torch.testing.assert_close(out.global_, torch.nn.functional.normalize(tokens.mean((1, 2)), dim=-1))


def test_valid_mask_restricts_the_global_mean(encoder: Encoder) -> None:
    batch = images(2)
    valid = torch.zeros(2, 16, dtype=torch.bool)
    valid[:, :4] = True  # first grid row only
    with torch.no_grad():
        out = encoder(batch, valid)
        tokens = encoder.backbone(batch)
    expected = torch.nn.functional.normalize(tokens[:, 0].mean(1), dim=-1)
    torch.testing.assert_close(out.global_, expected)


def test_round_trip_gives_identical_embeddings(encoder: Encoder, saved: Path) -> None:
    loaded = load_encoder(saved)
    batch = images()
    with torch.no_grad():
        before, after = encoder(batch), loaded(batch)
    assert torch.equal(before.patches, after.patches) and torch.equal(before.global_, after.global_)
    assert loaded.fingerprint == encoder.fingerprint and len(loaded.fingerprint) == 16
    assert loaded.spec == SPEC
    assert not loaded.training


def test_fingerprint_is_stable_and_content_addressed(encoder: Encoder, saved: Path, tmp_path: Path) -> None:
    assert load_encoder(saved).save(tmp_path / "again") == encoder.fingerprint
    assert load_encoder(saved, expected_fingerprint=encoder.fingerprint).fingerprint == encoder.fingerprint
    other = Encoder(SPEC)
    with torch.no_grad():
        other.backbone.load_state_dict(encoder.backbone.state_dict())
        other.backbone.model.cls_token.add_(1e-3)  # type: ignore[operator]
    assert other.save(tmp_path / "changed") != encoder.fingerprint


def test_export_over_an_artifact_replaces_it_whole(encoder: Encoder, artifact: Path) -> None:
    """A running service reads ACE_ENCODER while `ace export` rewrites it: files are renamed into
    place (no partial file, no leftovers), and a mixed old/new pair fails the fingerprint check."""
    old_config = (artifact / CONFIG_FILE).read_text()
    other = Encoder(SPEC)
    new_fingerprint = other.save(artifact)
    assert sorted(p.name for p in artifact.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    assert load_encoder(artifact).fingerprint == new_fingerprint != encoder.fingerprint
    (artifact / CONFIG_FILE).write_text(old_config)  # the moment between the two renames
    with pytest.raises(ArtifactError, match="corrupt"):
        load_encoder(artifact)


def test_encoder_from_backbone_copies_the_weights() -> None:
    source = Backbone("vit_tiny_patch16_224", 64).eval()
    encoder = encoder_from_backbone(source, {"step": 3})
    batch = images(1)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(source(batch), dim=-1)
        torch.testing.assert_close(encoder(batch).patches, expected)
    assert encoder.spec.provenance == {"step": 3}


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"no encoder artifact .* encoder\.json is missing"):
        load_encoder(tmp_path / "nowhere")


def test_missing_weights(artifact: Path) -> None:
    (artifact / WEIGHTS_FILE).unlink()
    with pytest.raises(ArtifactError, match=r"has no weights\.safetensors"):
        load_encoder(artifact)


def test_flipped_weight_bytes_are_detected(artifact: Path) -> None:
    path = artifact / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="is corrupt: weights fingerprint"):
        load_encoder(artifact)


def test_unreadable_weights_with_a_matching_fingerprint(artifact: Path) -> None:
    (artifact / WEIGHTS_FILE).write_bytes(b"\x00garbage" * 10)
    edit_meta(artifact)
    with pytest.raises(ArtifactError, match="cannot read"):
        load_encoder(artifact)


@pytest.mark.parametrize(
    ("text", "message"),
    [("{not json", "is not valid JSON"), ("[1, 2]", "must hold a JSON object"),
     ('{"format": 99}', "artifact format 99, expected 2"), ('{"format": 1}', "format 1 .*no longer loaded"),
     ('{"format": 2}', "lacks the fields")],
)
def test_bad_json(artifact: Path, text: str, message: str) -> None:
    (artifact / CONFIG_FILE).write_text(text)
    with pytest.raises(ArtifactError, match=message):
        load_encoder(artifact)


def test_invalid_field_value(artifact: Path) -> None:
    edit_meta(artifact, refingerprint=False, img_size="large")
    with pytest.raises(ArtifactError, match="invalid field"):
        load_encoder(artifact)


def test_weights_of_another_backbone(artifact: Path) -> None:
    edit_meta(artifact, backbone="vit_small_patch16_224")
    with pytest.raises(ArtifactError, match="does not fit backbone vit_small_patch16_224 at 64 px"):
        load_encoder(artifact)


def test_backbone_unknown_to_this_installation(artifact: Path) -> None:
    edit_meta(artifact, backbone="vit_from_the_future")
    with pytest.raises(ArtifactError, match="cannot be built here"):
        load_encoder(artifact)


def test_edited_architecture_breaks_the_fingerprint(artifact: Path) -> None:
    edit_meta(artifact, refingerprint=False, img_size=128)
    with pytest.raises(ArtifactError, match="is corrupt"):
        load_encoder(artifact)


def test_recorded_grid_must_match(artifact: Path) -> None:
    edit_meta(artifact, refingerprint=False, grid=7)
    with pytest.raises(ArtifactError, match="7x7x192 patch grid"):
        load_encoder(artifact)


def test_unexpected_encoder(saved: Path) -> None:
    with pytest.raises(ArtifactError, match="is not the expected encoder 0123"):
        load_encoder(saved, expected_fingerprint="0123")
