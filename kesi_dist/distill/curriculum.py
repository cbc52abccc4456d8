"""EKG's memory-bank distillation loss: a curriculum over teachers ranked by their loss (Lee & Song, ECCV 2022).

The bank holds, per training image, the logits of J teachers ordered by ascending loss (teacher 0 is
the best; `kesi_dist.methods.ekg.teacher_pick`). Per batch, a teacher joins the target when it is closer to the
best teacher than the student is, both distances summed over the batch:

    kld_T(t, s) = T * sum_c softmax(t/T)_c (log_softmax(t/T)_c - log_softmax(s/T)_c)     per sample
    curr        = sum_b kld_T(K_b0, mean_v S_bv)        the student: the mean logits of its views
    used_j      = sum_b kld_T(K_b0, K_bj) < curr        (not differentiated)
    target_b    = mean of K_bj over the used teachers (logits; the best one alone when none is used)
    loss        = mean over views and samples of CE(y, S_bv) + kld_T(target_b, S_bv)

Early on the student is far from the best teacher and many teachers are averaged (a softer target);
as it closes in, the target narrows to the best one. The best teacher is used whenever the student
differs from it at all (its own distance is 0); when the student matches it exactly the reference
would average no teacher (all-zero logits, a uniform target), here the target stays the best teacher. The scale is T, not T^2, as the reference code
(sseung0703/EKG op_utils.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kld_t", "curriculum_target", "memory_bank_loss"]


def kld_t(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T * KL(softmax(t/T) || softmax(s/T)) per sample ([B]), computed in float32."""
    t, s = teacher_logits.float() / temperature, student_logits.float() / temperature
    return temperature * (F.softmax(t, 1) * (F.log_softmax(t, 1) - F.log_softmax(s, 1))).sum(1)


@torch.no_grad()
def curriculum_target(bank: torch.Tensor, student_logits: torch.Tensor, temperature: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(target logits [B, C], used [J] bool) for bank logits [B, C, J] (teacher 0 the best) and the
    student's logits [B, C] (the mean over its views)."""
    if bank.dim() != 3 or bank.shape[:2] != student_logits.shape:
        raise ValueError(f"bank logits {tuple(bank.shape)} must be [B, C, J] with [B, C] = student "
                         f"{tuple(student_logits.shape)}")
    best = bank[..., 0]
    curr = kld_t(best, student_logits, temperature).sum()
    dist = torch.stack([kld_t(best, bank[..., j], temperature).sum() for j in range(bank.shape[-1])])
    used = dist < curr
    weights = used.to(bank.dtype)
    target = (bank * weights).sum(-1) / weights.sum().clamp_min(1)
    if not used.any():  # the student is at least as close as every teacher: follow the best one
        target = best
    return target, used


def memory_bank_loss(student_views: torch.Tensor, labels: torch.Tensor, bank: torch.Tensor, *,
                     temperature: float) -> dict[str, torch.Tensor]:
    """EKG's fine-tuning loss for student logits [B, V, C] (V augmented views of each image), labels [B]
    and bank logits [B, C, J]: {"loss", "task_loss", "kd_loss", "teachers_used"} (means over views and
    samples; see the module docstring)."""
    if student_views.dim() != 3:
        raise ValueError(f"student logits {tuple(student_views.shape)} must be [B, V, C]")
    b, v, c = student_views.shape
    target, used = curriculum_target(bank.to(student_views.device), student_views.detach().mean(1), temperature)
    flat = student_views.reshape(b * v, c).float()
    task = F.cross_entropy(flat, labels.repeat_interleave(v))
    kd = kld_t(target.repeat_interleave(v, 0), flat, temperature).mean()
    return {"loss": task + kd, "task_loss": task, "kd_loss": kd, "teachers_used": used.sum().float()}
