"""MWP: unstructured global magnitude pruning of conv weights (Han et al. 2015, arXiv 1506.02626).

Only the weights of `nn.Conv2d` layers are pruned (FC and BN never are), with one threshold for all
of them pooled. This returns masks; `masks.apply_masks` and `masks.MaskConstraint` enforce them.
"""

from __future__ import annotations

import torch
from torch import nn

from kesi_dist.pruning.criteria import global_magnitude_keep
from kesi_dist.pruning.masks import conv_weights

__all__ = ["mwp_masks"]


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
    previous = [masks.get(name) for name in weights] if masks is not None else None
    keep = global_magnitude_keep(list(weights.values()), target_sparsity, previous)
    return {name: k.to(dtype=w.dtype) for (name, w), k in zip(weights.items(), keep)}
