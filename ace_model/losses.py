"""ACE losses (docs/model.md, "Losses"). Computed in float32 whatever the autocast state."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of tokens (B, N, D) over mask (B, N) == True; an empty mask gives zeros."""
    weights = mask.to(tokens.dtype).unsqueeze(-1)  # (B, N, 1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class OverlapDINOLoss(nn.Module):
    """Cross-view DINO loss on overlap-pooled embeddings.

    L = 1/2 [ CE(P_S, q_L) + CE(P_L, q_S) ],  P_v = softmax((z_t[v] - c) / tau_t) (no grad),
    log q_v = log_softmax(z_s[v] / tau_s). The center c is an EMA (momentum m_c) of the mean
    teacher output over the rows used in the loss, averaged across ranks when distributed.
    """

    center: torch.Tensor

    def __init__(self, out_dim: int, student_temp: float, teacher_temp: float, momentum: float):
        super().__init__()
        self.student_temp = student_temp
        self.teacher_temp = teacher_temp
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """student, teacher: (2B, K) logits ordered [L; S]."""
        student, teacher = student.float(), teacher.float().detach()
        log_q_l, log_q_s = F.log_softmax(student / self.student_temp, dim=-1).chunk(2)
        p_l, p_s = F.softmax((teacher - self.center) / self.teacher_temp, dim=-1).chunk(2)
        loss_l = -(p_s * log_q_l).sum(-1).mean()
        loss_s = -(p_l * log_q_s).sum(-1).mean()
        self.update_center(teacher)
        return (loss_l + loss_s) / 2

    @torch.no_grad()
    def update_center(self, teacher: torch.Tensor) -> None:
        batch_sum = teacher.sum(0, keepdim=True)
        count = torch.tensor([teacher.shape[0]], device=teacher.device, dtype=torch.float32)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            dist.all_reduce(count)
        batch_mean = batch_sum / count
        self.center.mul_(self.momentum).add_(batch_mean, alpha=1 - self.momentum)


def alpha_balanced_bce(
    logits: torch.Tensor, target: torch.Tensor, alpha: float, row_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """phi_a(x, t) = [a t + (1-a)(1-t)] * BCE(sigmoid(x), t), averaged over entries.

    Product form as in torchvision's sigmoid_focal_loss with gamma = 0. With `row_mask` (B, R)
    the mean runs over kept rows only (the mask_nonoverlap_rows option, docs/model.md bug Q9); by
    default all rows count.
    """
    logits, target = logits.float(), target.float()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    loss = (alpha * target + (1 - alpha) * (1 - target)) * bce  # (B, R, C)
    if row_mask is None:
        return loss.mean()
    weights = row_mask.float().unsqueeze(-1)
    return (loss * weights).sum() / (weights.sum() * loss.shape[-1]).clamp(min=1.0)


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy of each row against its target row normalised to a distribution:
    L = -sum_j (t_ij / sum_j t_ij) log softmax(x_i)_j, averaged over rows with a target (rows
    outside the overlap are all zero and carry no signal). The form of ACE's local terms that
    learns on CPU budgets, where the element-wise BCE stays on its position-only floor."""
    logits, target = logits.float(), target.float()
    mass = target.sum(-1, keepdim=True)  # (B, R, 1)
    keep = mass[..., 0] > 0
    if not bool(keep.any()):
        return logits.sum() * 0.0
    per_row = -(target / mass.clamp(min=1e-12) * F.log_softmax(logits, dim=-1)).sum(-1)  # (B, R)
    return per_row[keep].mean()


def constant_logit_floor(target: torch.Tensor, alpha: float, steps: int = 40) -> float:
    """The alpha-balanced BCE of the best *constant* logit for these targets: what a predictor
    that sees no content reaches (golden-section search over the logit; the loss is convex)."""
    low, high = -20.0, 20.0
    ratio = (5**0.5 - 1) / 2

    def loss(c: float) -> float:
        return float(alpha_balanced_bce(torch.full_like(target, c), target, alpha))

    for _ in range(steps):
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        low, high = (low, b) if loss(a) < loss(b) else (a, high)
    return loss((low + high) / 2)


def content_blind_floors(target_dec: torch.Tensor, target_comp: torch.Tensor, dino_out: int,
                         local_form: str, alpha_dec: float, alpha_comp: float) -> dict[str, float]:
    """Per ACE term, the loss of a content-blind predictor: uniform over the K prototypes for the
    global term; for the local terms uniform over the candidates (softmax form) or the best
    constant logit (focal form). A term that stays at its floor has learned nothing."""
    if local_form == "softmax":
        dec, comp = math.log(target_dec.shape[-1]), math.log(target_comp.shape[-1])
    else:
        dec = constant_logit_floor(target_dec, alpha_dec)
        comp = constant_logit_floor(target_comp, alpha_comp)
    return {"global": math.log(dino_out), "dec": dec, "comp": comp}
