"""ACE: student + EMA teacher with a global (overlap DINO) and a local (matrix matching) branch.

Forward pass (docs/model.md, "Method") on one grid-aligned pair of views per sample:
    tokens    = backbone([x_L; x_S])                       (2B, n, n, D)
    global    = DINO(masked_mean(tokens, [M_L; M_S]))      teacher S -> student L and vice versa
    dense     = dense_head(tokens)                         (2B, n*n, D), unit norm
    A_dec     = s * teacher_dense[S] @ up(student_dense[L])^T     (B, n*n, 4*n*n)
    A_comp    = s * teacher_dense[L] @ down(student_dense[S])^T   (B, n*n, n*n/4)
    loss      = w_g * L_glob + (BCE_0.99(A_dec, T_dec) + BCE_0.9(A_comp, T_comp)) / 2
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ace_model.backbone import Backbone
from ace_model.config import ACEConfig, ModelConfig
from ace_model.errors import InputError
from ace_model.heads import ComposeMLP, DecomposeMLP, DenseHead, DINOHead
from ace_model.losses import OverlapDINOLoss, alpha_balanced_bce, masked_mean, soft_target_cross_entropy


@dataclass
class ACEBatch:
    view_l: torch.Tensor  # (B, 3, H, W) large view, downsampled by 2
    view_s: torch.Tensor  # (B, 3, H, W) small view
    mask_l: torch.Tensor  # (B, n*n) bool, L tokens inside the overlap
    mask_s: torch.Tensor  # (B, n*n) bool, S tokens inside the overlap
    target_dec: torch.Tensor  # (B, n*n, 4*n*n) soft correspondence S token -> L fine
    target_comp: torch.Tensor  # (B, n*n, n*n/4) soft correspondence L token -> S coarse

    def to(self, device: torch.device | str) -> ACEBatch:
        return ACEBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


class Branch(nn.Module):
    """What student and teacher share: backbone, DINO head, dense head."""

    def __init__(self, cfg: ModelConfig, drop_path: float) -> None:
        super().__init__()
        self.backbone = Backbone(cfg.backbone, cfg.img_size, drop_path)
        dim = self.backbone.dim
        self.dino_head = DINOHead(dim, cfg.dino_hidden, cfg.dino_bottleneck, cfg.dino_out)
        self.dense_head = DenseHead(dim, cfg.dense_blocks)


class ACE(nn.Module):
    log_scale: torch.Tensor

    def __init__(self, config: ACEConfig) -> None:
        super().__init__()
        self.config = config
        if config.loss.local_form not in ("focal", "softmax"):
            raise InputError(f"loss.local_form must be 'focal' or 'softmax', got {config.loss.local_form!r}")
        if not (config.loss.use_global or config.loss.use_matching):
            raise InputError("both loss branches are switched off; enable use_global or use_matching")
        self.student = Branch(config.model, config.model.drop_path)
        self.teacher = Branch(config.model, drop_path=0.0)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self._check_grid()
        dim = self.student.backbone.dim
        self.decompose = DecomposeMLP(dim)
        self.compose = ComposeMLP(dim)
        scale = torch.tensor(math.log(config.loss.logit_scale))
        if config.loss.learn_logit_scale:
            self.log_scale = nn.Parameter(scale)
        else:
            self.register_buffer("log_scale", scale)
        lc = config.loss
        self.dino_loss = OverlapDINOLoss(
            config.model.dino_out, lc.student_temp, lc.teacher_temp, lc.center_momentum
        )

    def _check_grid(self) -> None:
        n = self.config.geometry.n
        grid = self.student.backbone.grid_size
        if grid != (n, n):
            raise InputError(
                f"backbone {self.config.model.backbone} at {self.config.model.img_size} px gives a "
                f"{grid[0]}x{grid[1]} token grid, but the geometry needs {n}x{n}"
            )

    def trainable_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Student modules (+ logit scale when learnable): what the optimizer owns."""
        for name, param in self.named_parameters():
            if param.requires_grad and not name.startswith("teacher."):
                yield name, param

    def forward(self, batch: ACEBatch) -> dict[str, torch.Tensor]:
        images = torch.cat([batch.view_l, batch.view_s])  # (2B, 3, H, W)
        with torch.no_grad():
            teacher_grid = self.teacher.backbone(images)  # (2B, n, n, D)
        student_grid = self.student.backbone(images)
        parts: dict[str, torch.Tensor] = {}
        if self.config.loss.use_global:
            parts["global"] = self._global_loss(student_grid, teacher_grid, batch)
        if self.config.loss.use_matching:
            parts.update(self._matching_losses(student_grid, teacher_grid, batch))
        loss = self.config.loss.global_weight * parts.get("global", torch.zeros(()))
        if self.config.loss.use_matching:
            loss = loss + (parts["dec"] + parts["comp"]) / 2
        return {"loss": loss, **{k: v.detach() for k, v in parts.items()}}

    def _global_loss(
        self, student_grid: torch.Tensor, teacher_grid: torch.Tensor, batch: ACEBatch
    ) -> torch.Tensor:
        masks = torch.cat([batch.mask_l, batch.mask_s])  # (2B, n*n)
        with torch.no_grad():
            teacher_logits = self.teacher.dino_head(masked_mean(teacher_grid.flatten(1, 2), masks))
        student_logits = self.student.dino_head(masked_mean(student_grid.flatten(1, 2), masks))
        return self.dino_loss(student_logits, teacher_logits)

    def _matching_losses(
        self, student_grid: torch.Tensor, teacher_grid: torch.Tensor, batch: ACEBatch
    ) -> dict[str, torch.Tensor]:
        b = batch.view_l.shape[0]
        with torch.no_grad():
            teacher_dense = self.teacher.dense_head(teacher_grid)  # (2B, n*n, D)
        student_dense = self.student.dense_head(student_grid)
        fine = self.decompose(student_dense[:b])  # (B, 4*n*n, D): student decomposes L
        coarse = self.compose(student_dense[b:])  # (B, n*n/4, D): student composes S
        if self.config.loss.normalize_student_local:
            fine, coarse = F.normalize(fine, dim=-1), F.normalize(coarse, dim=-1)
        scale = self.log_scale.exp()
        a_dec = scale * teacher_dense[b:] @ fine.transpose(1, 2)  # (B, n*n, 4*n*n)
        a_comp = scale * teacher_dense[:b] @ coarse.transpose(1, 2)  # (B, n*n, n*n/4)
        lc = self.config.loss
        if lc.local_form == "softmax":
            return {"dec": soft_target_cross_entropy(a_dec, batch.target_dec),
                    "comp": soft_target_cross_entropy(a_comp, batch.target_comp)}
        mask_dec = batch.mask_s if lc.mask_nonoverlap_rows else None
        mask_comp = batch.mask_l if lc.mask_nonoverlap_rows else None
        return {
            "dec": alpha_balanced_bce(a_dec, batch.target_dec, lc.alpha_dec, mask_dec),
            "comp": alpha_balanced_bce(a_comp, batch.target_comp, lc.alpha_comp, mask_comp),
        }

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """theta_t <- m theta_t + (1 - m) theta_s, parameters paired by name (docs/model.md, bug Q11)."""
        student = dict(self.student.named_parameters())
        for name, teacher_param in self.teacher.named_parameters():
            teacher_param.mul_(momentum).add_(student[name].detach(), alpha=1 - momentum)
