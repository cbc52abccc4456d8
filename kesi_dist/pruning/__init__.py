"""Pruning: PFEC (structured, physically smaller nets), MWP (unstructured masks), and counting.

`prune` is the one entry the pipeline calls per iteration; it never modifies its input model.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

from torch import nn

from kesi_dist.errors import UsageError
from kesi_dist.pruning.counting import count_macs, count_nonzero_params, count_params
from kesi_dist.pruning.mwp import apply_masks, mask_gradients, mwp_masks, sparsity
from kesi_dist.pruning.pfec import pfec_prune

__all__ = [
    "prune", "pfec_prune", "mwp_masks", "apply_masks", "mask_gradients", "sparsity",
    "count_params", "count_nonzero_params", "count_macs", "METHODS",
]

METHODS = ("pfec", "mwp")


def prune(
    model: nn.Module,
    masks: dict | None,
    *,
    method: str,
    iteration: int,
    stage_ratios: list[float] = (),
    skip: Iterable[str] = (),
    layer_ratios: Mapping[str, float] = {},
    targets: list[float] = (),
) -> tuple[nn.Module, dict | None]:
    """Apply pruning iteration `iteration` (1-based) to a copy of `model`.

    Returns:
        pfec: (a physically smaller model, None). mwp: (a copy of `model` with the masks applied,
        the masks for cumulative sparsity `targets[iteration - 1]`, extending `masks`).
    """
    if iteration < 1:
        raise ValueError(f"iteration is 1-based, got {iteration}")
    if method == "pfec":
        return pfec_prune(model, list(stage_ratios), skip, layer_ratios), None
    if method == "mwp":
        if iteration > len(targets):
            raise UsageError(
                f"prune.targets: iteration {iteration} needs a target, only {len(targets)} given {list(targets)}"
            )
        new = copy.deepcopy(model)
        new_masks = mwp_masks(new, targets[iteration - 1], masks)
        apply_masks(new, new_masks)
        return new, new_masks
    raise UsageError(f"prune.method: unknown method {method!r}; choose one of {', '.join(METHODS)}")
