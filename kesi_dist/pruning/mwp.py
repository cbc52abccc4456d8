"""MWP: unstructured global magnitude pruning of conv weights (Han et al. 2015, arXiv 1506.02626).

Masks are `{parameter name: float 0/1 tensor of its shape}` over the weight of every `nn.Conv2d`
(FC and BN are never pruned). To keep pruned weights at exactly zero through training, call
`mask_gradients` before `optimizer.step()` and `apply_masks` after it: the first stops the loss
gradient, the second undoes what weight decay, momentum or Adam state would otherwise revive.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["conv_weights", "mwp_masks", "apply_masks", "mask_gradients", "sparsity"]


def conv_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weight of every Conv2d, keyed by its name in `model.named_parameters()`."""
    return {f"{name}.weight" if name else "weight": m.weight for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d)}


def mwp_masks(model: nn.Module, target_sparsity: float, masks: dict | None = None) -> dict[str, torch.Tensor]:
    """Masks that zero the smallest-magnitude conv weights, with one threshold for all convs pooled.

    Args:
        model: any model with `nn.Conv2d` layers (not modified).
        target_sparsity: cumulative fraction of all conv weights that are zero after this
            iteration, in [0, 1); exactly `round(target * N)` weights are masked (or more, when
            `masks` already masks more).
        masks: the previous iteration's masks; everything they pruned stays pruned.
    """
    if not 0 <= target_sparsity < 1:
        raise ValueError(f"target_sparsity must be in [0, 1), got {target_sparsity}")
    weights = conv_weights(model)
    if not weights:
        raise ValueError(f"{type(model).__name__} has no Conv2d weights to prune")
    scores = []
    for name, w in weights.items():
        s = w.detach().abs().flatten().float()
        if masks is not None and name in masks:
            s = torch.where(masks[name].flatten().to(s.device) > 0, s, torch.full_like(s, -1.0))
        scores.append(s)
    flat = torch.cat(scores)
    already = int((flat < 0).sum())
    n_prune = max(already, round(target_sparsity * flat.numel()))
    keep = torch.ones_like(flat)
    if n_prune:
        # Previously pruned weights score -1 and always go first. Ties at the threshold are broken by
        # position, so exactly n_prune weights go even when many magnitudes are equal.
        threshold = flat.kthvalue(n_prune).values
        pruned = flat < threshold
        ties = torch.nonzero(flat == threshold).flatten()
        pruned[ties[: n_prune - int(pruned.sum())]] = True
        keep[pruned] = 0
    out, start = {}, 0
    for name, w in weights.items():
        out[name] = keep[start:start + w.numel()].view_as(w).to(dtype=w.dtype)
        start += w.numel()
    return out


def _check(params: dict[str, nn.Parameter], masks: dict) -> None:
    missing = [n for n in masks if n not in params]
    if missing:
        raise KeyError(f"masks name parameters the model does not have: {missing[:3]}")


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict) -> None:
    """Zero the masked weights in place (`w *= mask`)."""
    params = dict(model.named_parameters())
    _check(params, masks)
    for name, mask in masks.items():
        params[name].mul_(mask.to(device=params[name].device, dtype=params[name].dtype))


@torch.no_grad()
def mask_gradients(model: nn.Module, masks: dict) -> None:
    """Zero the gradients of masked weights in place (`grad *= mask`); call before `optimizer.step()`."""
    params = dict(model.named_parameters())
    _check(params, masks)
    for name, mask in masks.items():
        g = params[name].grad
        if g is not None:
            g.mul_(mask.to(device=g.device, dtype=g.dtype))


def sparsity(masks: dict) -> float:
    """Fraction of masked-out entries over all masked tensors."""
    total = sum(m.numel() for m in masks.values())
    return float(sum((m == 0).sum().item() for m in masks.values()) / total) if total else 0.0
