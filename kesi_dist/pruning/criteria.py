"""What to prune: pure scoring and selection, no model mutation (Torch-Pruning's "importance").

Structured: rank the output filters of one conv by L1 norm (PFEC, Li et al. 2017). Unstructured:
one magnitude threshold over many weight tensors pooled (MWP, Han et al. 2015). Both return which
entries to keep; cutting (`surgery`) and masking (`masks`) are someone else's job.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["l1_filter_norms", "l1_keep_indices", "global_magnitude_keep"]


def l1_filter_norms(weight: torch.Tensor) -> torch.Tensor:
    """L1 norm of every output filter of a conv weight: sum of |w| over in x kh x kw."""
    return weight.detach().abs().flatten(1).sum(1)


def l1_keep_indices(weight: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices (ascending) of the `n_keep` output filters of a conv weight with the largest L1 norm."""
    # Stable, so equal norms keep the lower index: the same filters on every run and device.
    order = torch.argsort(l1_filter_norms(weight), descending=True, stable=True)
    return order[:n_keep].sort().values


def global_magnitude_keep(
    weights: Sequence[torch.Tensor], sparsity: float, kept: Sequence[torch.Tensor | None] | None = None,
) -> list[torch.Tensor]:
    """Keep flags (bool, shaped like each weight) that drop the smallest |w| of all `weights` pooled.

    Args:
        weights: the tensors pruned together, with one threshold for all of them.
        sparsity: fraction of all their entries dropped, in [0, 1); exactly `round(sparsity * N)`
            go (or more, when `kept` already drops more).
        kept: per weight, the previous keep flags or masks (non-zero = kept) or None; whatever
            they dropped stays dropped.
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    kept = list(kept) if kept is not None else [None] * len(weights)
    if len(kept) != len(weights):
        raise ValueError(f"kept has {len(kept)} entries for {len(weights)} weights")
    scores = []
    for w, k in zip(weights, kept):
        s = w.detach().abs().flatten().float()
        if k is not None:
            s = torch.where(k.flatten().to(s.device) > 0, s, torch.full_like(s, -1.0))
        scores.append(s)
    flat = torch.cat(scores)
    n_prune = max(int((flat < 0).sum()), round(sparsity * flat.numel()))
    keep = torch.ones_like(flat, dtype=torch.bool)
    if n_prune:
        # Previously dropped entries score -1 and always go first. Ties at the threshold are broken
        # by position, so exactly n_prune entries go even when many magnitudes are equal.
        threshold = flat.kthvalue(n_prune).values
        pruned = flat < threshold
        ties = torch.nonzero(flat == threshold).flatten()
        pruned[ties[: n_prune - int(pruned.sum())]] = True
        keep[pruned] = False
    return [part.view_as(w) for part, w in zip(keep.split([w.numel() for w in weights]), weights)]
