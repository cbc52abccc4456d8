"""Knowledge-distillation losses and the compact (top-k) form of a soft-label distribution.

KESI's loss (METHOD.md) is the mean over teachers of KL(softmax(t_i / T) || softmax(s / T)) * T^2.
KL(p || q) is linear in p apart from the entropy of p, which does not depend on the student, so
that mean has the same gradient as KL(p_bar || softmax(s / T)) * T^2 with p_bar the mean of the
teachers' softened probabilities. `kd_loss` takes p_bar: one distribution per sample, which is
what the cached mode stores, and the value differs from the per-teacher mean only by a constant.

Scale: the KL is summed over classes and averaged over the samples of the batch, then multiplied by T^2
(Hinton et al.'s correction, so the soft term's gradient does not shrink as 1/T^2):
    kd = (1/B) sum_b sum_c p_bc (log p_bc - log q_bc) * T^2,    q_b = softmax(s_b / T).
The reference code computes the same value as `F.kl_div(log q, p)` (a mean over B x C elements) times C
times T^2. The scale matters once `alpha` > 0 (it weighs kd against the cross-entropy) or with SGD (it
sets the effective LR); Adam is invariant to it.

Truncation (cached mode keeps the k largest probabilities): `dense_from_topk` spreads the missing
mass r = 1 - sum(top-k) uniformly over the other C - k classes. With p the full and p' the
expanded distribution, both agree on the top k and put mass r on the tail S; per sample

    |KL(p' || q) - KL(p || q)| <= r * (log |S| + max_S log q - min_S log q)

(the entropy part moves by at most r log |S|, the cross part by at most r times the range of
log q over S), multiplied by T^2 for the loss. With k >= C nothing is truncated and it is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kd_loss", "topk_probs", "dense_from_topk", "truncation_bound"]


def kd_loss(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float,
    alpha: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Distillation loss from the ensemble's temperature-softened probabilities.

    Args:
        student_logits: [B, C] raw student outputs (any float dtype; computed in float32).
        teacher_probs: [B, C] mean over teachers of softmax(t_i / T); rows sum to 1.
        labels: [B] hard labels; needed only when `alpha` > 0.
        temperature: T > 0.
        alpha: weight of the hard-label cross-entropy; 0 = soft targets only (the paper).

    Returns:
        {"loss": (1 - alpha) * kd + alpha * ce, "kd_loss": KL(p || softmax(s / T)) * T^2 averaged
        over the batch, "task_loss": CE(s, labels) (0 when labels is None)}.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if student_logits.shape != teacher_probs.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher probabilities "
                         f"{tuple(teacher_probs.shape)} differ in shape (same classes and batch needed)")
    logits = student_logits.float()
    log_q = F.log_softmax(logits / temperature, dim=1)
    # kl_div uses xlogy, so exact zeros in the target (truncated classes) contribute nothing.
    kd = F.kl_div(log_q, teacher_probs.to(log_q), reduction="batchmean") * (temperature**2)
    if labels is not None:
        task = F.cross_entropy(logits, labels)
    elif alpha > 0:
        raise ValueError("alpha > 0 mixes in cross-entropy with the hard labels: pass labels")
    else:
        task = torch.zeros((), device=logits.device)
    loss = kd if alpha == 0 else (1 - alpha) * kd + alpha * task
    return {"loss": loss, "kd_loss": kd, "task_loss": task}


def topk_probs(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` largest probabilities of each row and their class indices, largest first.

    `k` larger than the number of classes keeps them all.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return torch.topk(probs, min(k, probs.shape[-1]), dim=-1)


def dense_from_topk(values: torch.Tensor, indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Expand top-k probabilities back to [B, num_classes] float32 rows that sum to 1.

    The mass the top k do not hold, 1 - sum(values) (clamped at 0), is spread uniformly over the
    num_classes - k classes not listed. With k >= num_classes the result is exact (a scatter).
    """
    values = values.float()
    indices = indices.long()
    k = values.shape[-1]
    if k > num_classes or (indices.numel() and int(indices.max()) >= num_classes):
        raise ValueError(f"top-k of {k} with indices up to {int(indices.max())} does not fit {num_classes} classes")
    rest = num_classes - k
    if rest == 0:
        dense = torch.zeros(values.shape[0], num_classes, dtype=torch.float32, device=values.device)
    else:
        fill = (1.0 - values.sum(-1, keepdim=True)).clamp_min(0.0) / rest
        dense = fill.expand(values.shape[0], num_classes).clone()
    return dense.scatter_(1, indices, values)


def truncation_bound(
    student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, *, temperature: float,
) -> torch.Tensor:
    """Upper bound on |kd_loss(dense_from_topk(...)) - kd_loss(full probs)| for one batch (see module doc).

    Returns a scalar: T^2 * mean over samples of r * (log |S| + range of log q over the tail S).
    """
    num_classes = student_logits.shape[1]
    rest = num_classes - values.shape[1]
    if rest == 0:
        return torch.zeros(())
    log_q = F.log_softmax(student_logits.float() / temperature, dim=1)
    tail = torch.ones_like(log_q, dtype=torch.bool).scatter_(1, indices.long(), False)
    hi = log_q.masked_fill(~tail, float("-inf")).amax(1)
    lo = log_q.masked_fill(~tail, float("inf")).amin(1)
    r = (1.0 - values.float().sum(1)).clamp_min(0.0)
    return (temperature**2) * (r * (torch.log(torch.tensor(float(rest))) + hi - lo)).mean()
