"""Settings of `ace train-dense` (training.dense_train) and of its view pairs (training.dense_views),
apart from the code that needs torch: `ace train-dense --help` shows these defaults."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DenseTrainConfig:
    steps: int = 3000  # optimiser steps
    pairs: int = 6  # source images (distinct subjects) per step, two views each
    lr: float = 2e-3  # peak AdamW learning rate (cosine to lr/50 after warm-up)
    warmup: int = 100  # linear warm-up steps
    weight_decay: float = 1e-4
    tau: float = 0.1  # InfoNCE temperature, every term
    fine_queries: int = 256  # fine query cells per pair
    fine_ignore: float = 2.0  # fine ignore radius, in fine cells
    coarse_ignore: float = 1.0  # coarse ignore radius, in coarse cells
    other_ignore: float = 0.15  # other images' cells this close (fraction of the side) to the query's
    # position are not negatives: roughly aligned subjects share anatomy there
    weights: dict[str, float] = field(default_factory=lambda: {
        "fine": 1.0, "coarse": 1.0, "xsubj": 0.5, "global": 0.1})  # 0 switches a term off
    seed: int = 0
    source_px: int = 512  # sources are resized to this side (longer side) when loaded
    checkpoint_every: int = 250


@dataclass(frozen=True)
class WarpConfig:
    view_px: int = 224  # view side in pixels (the encoder's img_size)
    crop: tuple[float, float] = (0.3, 1.1)  # view side as a fraction of the source side (small
    # crops teach the scales of the 2x and 4x second looks)
    centre_jitter: float = 0.12  # view centre offset from the source centre, fraction of the side
    rotation_deg: float = 12.0  # rotation of each view, +-
    pair_scale: tuple[float, float] = (0.8, 1.25)  # second view's extra zoom
    pair_shift: float = 0.1  # second view's extra shift, fraction of the view
    pair_rotation_deg: float = 12.0  # second view's extra rotation, +-
    elastic: float = 0.015  # elastic displacement amplitude, fraction of the source side
    elastic_knots: int = 5  # control points per side of the smooth displacement field
