"""Encoder artifacts from training: a checkpoint's teacher backbone (`ace export`), or the same
architecture at random initialisation (`ace init-encoder`, the random-init baseline)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ace_model.backbone import Backbone
from ace_model.config import ACEConfig
from ace_model.encoder import Encoder, EncoderSpec, encoder_from_backbone
from training.checkpoints import load_checkpoint

TEACHER_BACKBONE = "teacher.backbone."  # prefix of the teacher backbone's weights in a checkpoint


def export_encoder(checkpoint: str | Path, out_dir: str | Path) -> Encoder:
    """The teacher backbone of a checkpoint (file or run dir) as an encoder artifact in out_dir."""
    state = load_checkpoint(checkpoint)
    config = ACEConfig.from_dict(state["config"])
    backbone = Backbone(config.model.backbone, config.model.img_size, drop_path=0.0)
    weights = {k[len(TEACHER_BACKBONE):]: v for k, v in state["model"].items()
               if k.startswith(TEACHER_BACKBONE)}
    backbone.load_state_dict(weights)
    provenance = {"source": "ace train", "checkpoint": str(Path(checkpoint).resolve()),
                  "step": int(state["step"]), "total_steps": int(state["plan"]["total_steps"]),
                  "config": _plain(config)}
    encoder = encoder_from_backbone(backbone, provenance)
    encoder.save(out_dir)
    return encoder


def init_encoder(config: ACEConfig, out_dir: str | Path, seed: int = 0) -> Encoder:
    """A randomly initialised encoder artifact (the random-init baseline)."""
    torch.manual_seed(seed)
    spec = EncoderSpec(config.model.backbone, config.model.img_size,
                       provenance={"source": "random init", "seed": seed, "config": _plain(config)})
    encoder = Encoder(spec)
    encoder.save(out_dir)
    return encoder


def _plain(config: ACEConfig) -> Any:
    return json.loads(json.dumps(config.to_dict()))
