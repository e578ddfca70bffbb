"""Inference encoder: images -> L2-normalised coarse patch grid, fine dense grid and global
embedding; artifact save/load.

Two kinds of network sit behind one interface: the two-level dense pyramid (`ace_model.dense`,
the served default: a coarse stride-16 grid and a fine stride-4 grid from one forward pass) and
any timm backbone (the ACE ViT/Swin presets: the coarse grid only, `fine` is None).

An artifact is a directory:
    encoder.json          architecture, levels, preprocessing, provenance and the fingerprint
    weights.safetensors   network weights (the teacher's, for a trained ACE model)
The fingerprint is a SHA-256 over the weights file and the architecture fields, so an index can
refuse to be read by any other encoder, and a corrupted weights file is detected on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ace_model.backbone import Backbone
from ace_model.config import PIXEL_MEAN, PIXEL_STD
from ace_model.dense import COARSE_STRIDE, DENSE_BACKBONE, FINE_STRIDE, DensePyramid, PyramidConfig
from ace_model.errors import InputError, UserError

ARTIFACT_FORMAT = 2  # 2: levels recorded (coarse + fine); 1: a single ViT grid, refused
CONFIG_FILE = "encoder.json"
WEIGHTS_FILE = "weights.safetensors"
REQUIRED_KEYS = ("backbone", "img_size", "pixel_mean", "pixel_std", "fingerprint", "levels")
ENCODER_STORE = "encoders"  # folder of an index root: <fingerprint>/ for each encoder that built it


class ArtifactError(UserError, RuntimeError):
    """A missing, corrupt or mismatched encoder artifact."""


@dataclass(frozen=True)
class EncoderSpec:
    backbone: str  # timm model name
    img_size: int  # model input side in pixels
    pixel_mean: float = PIXEL_MEAN  # input normalisation mean (all channels)
    pixel_std: float = PIXEL_STD  # input normalisation std (all channels)
    provenance: dict[str, Any] = field(default_factory=dict)  # training config, step, source
    options: dict[str, Any] = field(default_factory=dict)  # network options (dense: PyramidConfig)

    def architecture(self) -> dict[str, Any]:
        arch = {"backbone": self.backbone, "img_size": self.img_size,
                "pixel_mean": self.pixel_mean, "pixel_std": self.pixel_std}
        return {**arch, "options": self.options} if self.options else arch

    @property
    def is_dense(self) -> bool:
        return self.backbone == DENSE_BACKBONE

    @property
    def reads_grey(self) -> bool:
        """The encoder averages its input channels first (ace_model.dense): a colour image can be
        made grey before it is resized, a third of the work."""
        return self.is_dense


@dataclass
class Embeddings:
    patches: torch.Tensor  # (B, h, w, D) unit-norm coarse patch embeddings (the indexed grid)
    global_: torch.Tensor  # (B, D) unit-norm mean of the patch tokens
    fine: torch.Tensor | None = None  # (B, H, W, d) unit-norm fine grid; None for timm backbones


class Encoder(nn.Module):
    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        self.spec = spec
        self.backbone: nn.Module = _network(spec)
        self.fingerprint = ""  # set when saved or loaded
        self.eval()

    @property
    def grid(self) -> int:
        """Coarse cells per side at the artifact's img_size."""
        if isinstance(self.backbone, DensePyramid):
            return self.spec.img_size // COARSE_STRIDE
        return int(self.backbone.grid_size[0])  # type: ignore[index]

    @property
    def dim(self) -> int:
        if isinstance(self.backbone, DensePyramid):
            return self.backbone.config.coarse_dim
        return int(self.backbone.dim)  # type: ignore[arg-type]

    def levels(self) -> dict[str, dict[str, int] | None]:
        """What the artifact records: each level's stride (input px per cell) and width."""
        coarse = {"stride": self.spec.img_size // self.grid, "dim": self.dim, "grid": self.grid}
        if not isinstance(self.backbone, DensePyramid):
            return {"coarse": coarse, "fine": None}
        fine_dim = self.backbone.config.fine_dim
        return {"coarse": coarse, "fine": {"stride": FINE_STRIDE, "dim": fine_dim,
                                           "grid": self.spec.img_size // FINE_STRIDE}}

    def forward(self, images: torch.Tensor, valid: torch.Tensor | None = None) -> Embeddings:
        """images (B, 3, S, S) normalised; valid (B, h*w) bool restricts the global mean."""
        fine: torch.Tensor | None = None
        if isinstance(self.backbone, DensePyramid):
            tokens, fine = self.backbone(images)  # (B, h, w, D), (B, 4h, 4w, d)
        else:
            tokens = self.backbone(images).float()  # (B, h, w, D)
        flat = tokens.flatten(1, 2)  # (B, h*w, D)
        if valid is None:
            pooled = flat.mean(1)
        else:
            weights = valid.to(flat.dtype).unsqueeze(-1)
            pooled = (flat * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return Embeddings(F.normalize(tokens, dim=-1), F.normalize(pooled, dim=-1), fine)

    def save(self, directory: str | Path) -> str:
        """Write the artifact; returns its fingerprint."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.backbone.state_dict().items()}
        weights, config = out / f".{WEIGHTS_FILE}.tmp", out / f".{CONFIG_FILE}.tmp"
        save_file(state, str(weights))
        self.fingerprint = _fingerprint(weights, self.spec)
        meta = {"format": ARTIFACT_FORMAT, **asdict(self.spec), "fingerprint": self.fingerprint,
                "grid": self.grid, "dim": self.dim, "levels": self.levels()}
        config.write_text(json.dumps(meta, indent=2, sort_keys=True))
        # Replacing, not rewriting, means a reader (a running service) never sees a half-written
        # file; between the two renames the fingerprint check makes it refuse the mixed pair.
        os.replace(weights, out / WEIGHTS_FILE)
        os.replace(config, out / CONFIG_FILE)
        return self.fingerprint


def _network(spec: EncoderSpec) -> nn.Module:
    if spec.is_dense:
        if spec.img_size % 32:
            raise InputError(f"the dense encoder needs img_size a multiple of 32, got {spec.img_size}")
        return DensePyramid(PyramidConfig.from_dict(spec.options))
    return Backbone(spec.backbone, spec.img_size, drop_path=0.0)


def _fingerprint(weights: Path, spec: EncoderSpec) -> str:
    digest = hashlib.sha256()
    with weights.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    digest.update(json.dumps(spec.architecture(), sort_keys=True).encode())
    return digest.hexdigest()[:16]


def read_artifact_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ArtifactError(
            f"no encoder artifact at {directory}: {CONFIG_FILE} is missing "
            "(create one with `ace export` or `ace init-encoder`)"
        )
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path} must hold a JSON object, found {type(meta).__name__}")
    if meta.get("format") == 1:
        raise ArtifactError(
            f"{path}: artifact format 1 (a single-level ViT grid, before the two-level encoder) is no "
            "longer loaded: use the shipped encoder (artifacts/ace-dense-phantoms), train one with "
            "`ace train-dense`, or re-export an ACE checkpoint with `ace export`"
        )
    if meta.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{path}: artifact format {meta.get('format')!r}, expected {ARTIFACT_FORMAT}")
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise ArtifactError(f"{path} lacks the fields {missing}; re-export the encoder")
    return dict(meta)


def store_artifact(directory: str | Path, store: str | Path) -> Path:
    """Copy an artifact to store/<fingerprint>/ unless it is there; returns that folder.

    An index root keeps the encoders that built its versions in such a store (`ENCODER_STORE`),
    so a reader can always load the encoder a published version needs, also after the artifact
    at the deployment's encoder path was replaced by a retrain. The copy appears by one rename.
    """
    fingerprint = str(read_artifact_meta(directory)["fingerprint"])
    target = Path(store) / fingerprint
    if (target / CONFIG_FILE).is_file():
        return target
    staging = Path(store) / f".{fingerprint}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        shutil.copy2(Path(directory) / name, staging / name)
    try:
        os.replace(staging, target)
    except OSError:  # another writer stored the same encoder first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _spec_from_meta(meta: dict[str, Any], directory: str | Path) -> EncoderSpec:
    try:
        return EncoderSpec(str(meta["backbone"]), int(meta["img_size"]), float(meta["pixel_mean"]),
                           float(meta["pixel_std"]), dict(meta.get("provenance") or {}),
                           dict(meta.get("options") or {}))
    except (TypeError, ValueError) as err:
        raise ArtifactError(f"encoder artifact {directory} has an invalid field: {err}") from err


def load_encoder(directory: str | Path, expected_fingerprint: str | None = None) -> Encoder:
    """Load and verify an artifact. Raises ArtifactError with the reason on any problem."""
    meta = read_artifact_meta(directory)
    spec = _spec_from_meta(meta, directory)
    weights = Path(directory) / WEIGHTS_FILE
    if not weights.is_file():
        raise ArtifactError(f"encoder artifact {directory} has no {WEIGHTS_FILE}")
    actual = _fingerprint(weights, spec)
    if actual != meta["fingerprint"]:
        raise ArtifactError(
            f"encoder artifact {directory} is corrupt: weights fingerprint {actual} does not match "
            f"the recorded {meta['fingerprint']}"
        )
    if expected_fingerprint is not None and actual != expected_fingerprint:
        raise ArtifactError(f"encoder {actual} is not the expected encoder {expected_fingerprint}")
    encoder = _build_encoder(spec, directory)
    _load_state(encoder, weights)
    _check_shape(encoder, meta, directory)
    encoder.fingerprint = actual
    return encoder


def _build_encoder(spec: EncoderSpec, directory: str | Path) -> Encoder:
    try:
        return Encoder(spec)
    except (ValueError, TypeError) as err:  # TypeError: malformed options
        raise ArtifactError(f"encoder artifact {directory} cannot be built here: {err}") from err


def _check_shape(encoder: Encoder, meta: dict[str, Any], directory: str | Path) -> None:
    """The grid and width recorded at export must be what this installation's timm builds."""
    if meta.get("levels") != encoder.levels():
        raise ArtifactError(f"encoder artifact {directory} records the levels {meta.get('levels')}, but "
                            f"{encoder.spec.backbone} builds {encoder.levels()} here")
    recorded = (meta.get("grid", encoder.grid), meta.get("dim", encoder.dim))
    if recorded != (encoder.grid, encoder.dim):
        raise ArtifactError(
            f"encoder artifact {directory} was exported with a {recorded[0]}x{recorded[0]}x{recorded[1]} "
            f"patch grid, but {encoder.spec.backbone} builds {encoder.grid}x{encoder.grid}x{encoder.dim} here"
        )


def _load_state(encoder: Encoder, weights: Path) -> None:
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise ArtifactError(f"cannot read {weights}: {err}") from err
    try:
        encoder.backbone.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ArtifactError(
            f"{weights} does not fit backbone {encoder.spec.backbone} at {encoder.spec.img_size} px: "
            f"{str(err).splitlines()[0]}"
        ) from err


def encoder_from_backbone(backbone: Backbone, provenance: dict[str, Any] | None = None) -> Encoder:
    """An inference encoder holding a copy of `backbone`'s weights (e.g. the ACE teacher's)."""
    encoder = Encoder(EncoderSpec(backbone.name, backbone.img_size, provenance=provenance or {}))
    encoder.backbone.load_state_dict(backbone.state_dict())
    return encoder
