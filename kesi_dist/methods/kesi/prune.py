"""KESI's pruning step and LR-restart search space: which pruning each iteration applies, and the
hyper-parameters of each retraining branch."""

from __future__ import annotations

import copy
import itertools
import random

from torch import nn

from kesi_dist.errors import UsageError
from kesi_dist.pruning import apply_masks, mwp_masks, pfec_prune, sparsity_target, unit_ratios

__all__ = ["prune_iteration", "check_schedule", "restart_grid"]


def prune_iteration(model: nn.Module, masks: dict | None, prune, iteration: int) -> tuple[nn.Module, dict | None]:
    """Iteration `iteration` (1-based) of `prune` (the method's PruneCfg) applied to a copy of `model`.

    Returns:
        pfec: (a physically smaller model, None). mwp: (a copy with the masks applied, the masks for the
        iteration's cumulative sparsity target, extending `masks`).
    """
    if prune.method == "pfec":
        return pfec_prune(model, list(prune.stage_ratios), prune.skip, prune.layer_ratios,
                          round_to=prune.round_to, iteration=iteration), None
    target = sparsity_target(list(prune.targets), iteration)
    new = copy.deepcopy(model)
    new_masks = mwp_masks(new, target, masks)
    apply_masks(new, new_masks)
    return new, new_masks


def check_schedule(arch: str, prune) -> None:
    """BadValue when the schedule does not fit `arch` (ratios per stage, names in skip/layer_ratios)."""
    from kesi_dist.models import model_units

    if prune.method == "pfec":
        unit_ratios(model_units(arch), list(prune.stage_ratios), prune.skip, prune.layer_ratios)
    else:
        for k in range(1, prune.iterations + 1):
            sparsity_target(list(prune.targets), k)


def restart_grid(space: dict[str, list[float]], branches: int, search: str, seed: int) -> list[dict]:
    """The LR-restart values of each branch.

    grid: the first `branches` combinations of the grid, in order (all of them when equal);
    random: `branches` combinations drawn without replacement (seeded) when the grid is large enough,
    with replacement otherwise.
    """
    keys = sorted(space)
    combos = [dict(zip(keys, values)) for values in itertools.product(*(space[k] for k in keys))]
    if not combos:
        raise UsageError("method.tune.space: the search space is empty; give at least one value per key")
    if search == "grid":
        if branches > len(combos):
            raise UsageError(
                f"method.tune.branches={branches} but method.tune.space has only {len(combos)} grid "
                "combination(s); add values to tune.space, lower tune.branches, or use tune.search=random"
            )
        return combos[:branches]
    rng = random.Random(seed)
    if branches <= len(combos):
        return rng.sample(combos, branches)
    return [rng.choice(combos) for _ in range(branches)]
