"""KESI's pruning step and LR-restart search space: which pruning each iteration applies, and the
hyper-parameters of each retraining branch."""

from __future__ import annotations

import copy
import functools
import itertools
import random

from torch import nn

from kesi_dist.budget import Budget, run_budget
from kesi_dist.errors import UsageError
from kesi_dist.models import default_widths, model_units
from kesi_dist.pruning import aligned_count, apply_masks, mwp_masks, pfec_prune, sparsity_target, unit_ratios

__all__ = ["prune_iteration", "check_schedule", "restart_grid", "chain_widths", "resolve_prune"]

# The largest ratio a scaled schedule may ask of a unit in one iteration.
_MAX_RATIO = 0.95
_SCALES = 400


@functools.lru_cache(maxsize=8)
def _units(arch: str):
    return tuple(model_units(arch)), tuple(int(c) for c in default_widths(arch))


def chain_widths(arch: str, prune, scale: float = 1.0) -> list[list[int]]:
    """The widths of every iteration of a PFEC chain (index 0 unpruned) with its ratios times `scale`,
    from the counts alone (PFEC's counts do not depend on the weights)."""
    units, full = _units(arch)
    ratios = unit_ratios(units, [min(_MAX_RATIO, r * scale) for r in prune.stage_ratios], prune.skip,
                         {k: min(_MAX_RATIO, r * scale) for k, r in prune.layer_ratios.items()}, prune.stream)
    chain = [list(full)]
    for it in range(1, prune.iterations + 1):
        chain.append([aligned_count(c, w, ratios[u.name], it, prune.round_to)
                      for u, c, w in zip(units, full, chain[-1])])
    return chain


def resolve_prune(cfg, budget: Budget | None = None) -> tuple:
    """(the PruneCfg to apply, what the budget chose or None) for the root config `cfg`; `budget` is the
    run's (`run_budget(cfg)`, built here when not given).

    Without a budget (`prune.target`) the schedule is applied as written. With one, its stage and layer
    ratios are multiplied by the least factor (on a grid of 400 up to where a ratio reaches 0.95) whose
    last iteration's cost (a latency budget: the table's prediction, from the widths alone) is within
    `budget.ratio` of the unpruned network's: the paper's shape of schedule, pruned no further than the
    budget needs, so PFEC's own criterion (L1 norms) still decides which filters go.
    """
    prune, arch = cfg.method.prune, cfg.model.arch
    budget = budget or run_budget(cfg)
    if budget is None:
        return prune, None
    cost = budget.cost()
    full = cost(chain_widths(arch, prune, 0.0)[0])
    limit = budget.ratio * full
    top = max([*prune.stage_ratios, *prune.layer_ratios.values(), 1e-9])
    best = None
    for i in range(1, _SCALES + 1):
        scale = i / _SCALES * _MAX_RATIO / top
        widths = chain_widths(arch, prune, scale)[-1]
        ms = cost(widths)
        if ms <= limit:
            best = (scale, widths, ms)
            break
    if best is None:
        ms = cost(chain_widths(arch, prune, _MAX_RATIO / top)[-1])
        raise UsageError(f"{budget.key}.{budget.kind}_ratio={budget.ratio}: unreachable with this schedule in "
                         f"{prune.iterations} iterations (at most {ms / full:.2f} of "
                         f"{budget.amount(full)}); raise it, add iterations or prune more units")
    scale, widths, ms = best
    resolved = prune.model_copy(update={"target": None,
        "stage_ratios": [min(_MAX_RATIO, r * scale) for r in prune.stage_ratios],
        "layer_ratios": {k: min(_MAX_RATIO, r * scale) for k, r in prune.layer_ratios.items()}})
    return resolved, {"scale": scale, "table": budget.table_path, "latency_ratio": budget.ratio,
                      "predicted_ms": round(ms, 3), "baseline_predicted_ms": full,
                      "stage_ratios": [round(r, 4) for r in resolved.stage_ratios], "widths": widths}


def prune_iteration(model: nn.Module, masks: dict | None, prune, iteration: int) -> tuple[nn.Module, dict | None]:
    """Iteration `iteration` (1-based) of `prune` (the method's PruneCfg) applied to a copy of `model`.

    Returns:
        pfec: (a physically smaller model, None). mwp: (a copy with the masks applied, the masks for the
        iteration's cumulative sparsity target, extending `masks`).
    """
    if prune.method == "pfec":
        if prune.target is not None:
            raise ValueError("prune_iteration takes the resolved schedule: pass resolve_prune(cfg)[0]")
        return pfec_prune(model, list(prune.stage_ratios), prune.skip, prune.layer_ratios,
                          round_to=prune.round_to, iteration=iteration, stream=prune.stream), None
    target = sparsity_target(list(prune.targets), iteration)
    new = copy.deepcopy(model)
    new_masks = mwp_masks(new, target, masks)
    apply_masks(new, new_masks)
    return new, new_masks


def check_schedule(arch: str, prune) -> None:
    """BadValue when the schedule does not fit `arch` (ratios per stage, names in skip/layer_ratios)."""
    if prune.method == "pfec":
        unit_ratios(model_units(arch), list(prune.stage_ratios), prune.skip, prune.layer_ratios, prune.stream)
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
