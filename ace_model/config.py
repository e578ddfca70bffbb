"""Configuration: frozen dataclasses with presets `tiny`, `cpu` and `full` (docs/model.md, "Presets").

Every field carries one comment. A resolved config round-trips through `to_dict` / `from_dict`
so that it can be written next to every checkpoint, encoder artifact and index version.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, TypeVar

from ace_model.errors import InputError
from ace_model.geometry import check_geometry

T = TypeVar("T")

# Normalisation statistics of the reference pretraining (chest X-rays, per channel).
PIXEL_MEAN = 0.5056
PIXEL_STD = 0.252


@dataclass(frozen=True)
class GeometryConfig:
    n: int = 14  # tokens per side of a view; even so that 2x2 composition tiles the grid
    cell: int = 16  # pixels per cell = backbone stride in view pixels
    grid: int = 32  # base image side in cells; 2n <= G < 3n keeps the views overlapping
    base_scale: tuple[float, float] = (0.85, 1.0)  # random-resized-crop area range for the base

    def __post_init__(self) -> None:
        check_geometry(self.grid, self.n)
        if self.cell < 1:
            raise InputError(f"cell (pixels per cell) must be at least 1, got {self.cell}")
        low, high = self.base_scale
        if not 0 < low <= high <= 1:
            raise InputError(f"base_scale must satisfy 0 < low <= high <= 1, got {self.base_scale}")

    @property
    def view_px(self) -> int:
        """Side of both views fed to the backbone (S as cut, L after the 1/2 resize)."""
        return self.n * self.cell

    @property
    def base_px(self) -> int:
        return self.grid * self.cell


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "vit_tiny_patch16_224"  # any timm ViT / Swin / ConvNeXt name
    img_size: int = 224  # backbone input side in pixels
    drop_path: float = 0.1  # stochastic depth of the student (teacher always 0)
    dino_hidden: int = 512  # DINO head MLP width
    dino_bottleneck: int = 128  # DINO head bottleneck (L2-normalised) width
    dino_out: int = 4096  # K, the number of DINO prototypes
    dense_blocks: int = 3  # 1x1 conv + BN + ReLU blocks in the dense head


@dataclass(frozen=True)
class LossConfig:
    student_temp: float = 0.1  # tau_s of the global loss
    teacher_temp: float = 0.04  # tau_t of the global loss
    center_momentum: float = 0.9  # EMA momentum of the DINO center
    global_weight: float = 0.1  # weight of L_glob in the total loss
    alpha_dec: float = 0.99  # alpha of the decomposition BCE
    alpha_comp: float = 0.9  # alpha of the composition BCE
    logit_scale: float = 1 / 0.07  # multiplier of the matching similarities
    learn_logit_scale: bool = False  # reference code never optimises it (docs/model.md, bug Q7)
    normalize_student_local: bool = False  # L2-normalise up/down outputs (docs/model.md, bug Q8)
    mask_nonoverlap_rows: bool = False  # drop all-zero target rows from the BCE (docs/model.md, bug Q9)
    local_form: str = "focal"  # "focal": the paper's element-wise BCE; "softmax": cross-entropy
    # over target rows, the form that learns in CPU budgets (docs/correspondence.md)
    use_global: bool = True  # ablation switch for the global branch
    use_matching: bool = True  # ablation switch for the composition/decomposition branch


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 8  # per process
    epochs: int = 10  # passes over the dataset
    steps_per_epoch: int = 0  # 0 = len(dataset) // (batch_size * world_size)
    lr: float = 5e-4  # peak lr per 256 images (linear scaling with the global batch)
    min_lr: float = 1e-6  # final lr of the cosine schedule
    warmup_epochs: float = 1.0  # linear warm-up length
    weight_decay: float = 0.04  # start of the cosine weight-decay schedule
    weight_decay_end: float = 0.4  # end of the cosine weight-decay schedule
    ema_momentum: float = 0.996  # teacher EMA start (cosine to 1)
    clip_grad: float = 0.8  # per-parameter gradient norm clip (DINO style), 0 = off
    freeze_last_layer_epochs: int = 1  # DINO head last layer frozen this long
    amp: bool = True  # mixed precision when on a GPU
    seed: int = 0  # global seed
    num_workers: int = 2  # data loader worker processes
    checkpoint_every: int = 200  # steps between checkpoints


@dataclass(frozen=True)
class ACEConfig:
    name: str = "cpu"  # preset this config started from
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.geometry.view_px != self.model.img_size:
            raise InputError(
                f"view side n*cell = {self.geometry.view_px} px must equal the backbone input "
                f"img_size = {self.model.img_size} px"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ACEConfig:
        return _from_dict(cls, data)

    def override(self, dotted: dict[str, Any]) -> ACEConfig:
        """Return a copy with `{"train.lr": 1e-4, ...}` applied (values already typed)."""
        data = self.to_dict()
        for key, value in dotted.items():
            _set_dotted(data, key, value)
        return ACEConfig.from_dict(data)


def _from_dict(cls: type[T], data: dict[str, Any]) -> T:
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - set(known)
    if unknown:
        raise InputError(f"unknown config keys for {cls.__name__}: {sorted(unknown)}")
    defaults = cls()
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        default = getattr(defaults, name)
        if is_dataclass(default) and isinstance(value, dict):
            value = _from_dict(type(default), value)
        elif isinstance(default, tuple):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}: the dotted keys `ACEConfig.override` takes."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        if part not in node or not isinstance(node[part], dict):
            raise InputError(f"unknown config section {part!r} in {key!r}")
        node = node[part]
    if parts[-1] not in node:
        raise InputError(f"unknown config key {key!r}")
    node[parts[-1]] = value


def tiny() -> ACEConfig:
    """Unit-test scale: 64 px views, 4x4 tokens, seconds per step."""
    return ACEConfig(
        name="tiny",
        geometry=GeometryConfig(n=4, cell=16, grid=10),
        model=ModelConfig(
            backbone="vit_tiny_patch16_224", img_size=64, drop_path=0.0,
            dino_hidden=256, dino_bottleneck=256, dino_out=512,
        ),
        train=TrainConfig(batch_size=2, epochs=2, warmup_epochs=1.0, num_workers=0),
    )


def cpu() -> ACEConfig:
    """CPU smoke-training scale: vit_tiny at 224, 14x14 tokens."""
    return ACEConfig(name="cpu")


def full() -> ACEConfig:
    """Faithful scale: Swin-B at 448 px, 14x14x1024 tokens, K = 65536."""
    return ACEConfig(
        name="full",
        geometry=GeometryConfig(n=14, cell=32, grid=32),
        model=ModelConfig(
            backbone="swin_base_patch4_window7_224", img_size=448, drop_path=0.2,
            dino_hidden=2048, dino_bottleneck=256, dino_out=65536,
        ),
        train=TrainConfig(batch_size=8, epochs=302, warmup_epochs=10.0, num_workers=4),
    )


PRESETS = {"tiny": tiny, "cpu": cpu, "full": full}


def preset(name: str) -> ACEConfig:
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
