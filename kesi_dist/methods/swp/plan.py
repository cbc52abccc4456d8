"""SWP's `kesi plan`: the baseline, the budget and the uniform arm at it (the searched widths come from
the search), plus the size of the search space per stage."""

from __future__ import annotations

import math

from kesi_dist.budget import run_budget
from kesi_dist.models import build_model
from kesi_dist.models.slimmable import width_choices
from kesi_dist.plan import count_row, random_model
from kesi_dist.pruning import uniform_widths

__all__ = ["plan"]


def plan(cfg) -> dict:
    res, m, budget = cfg.data.resolution, cfg.method, run_budget(cfg)
    model = random_model(cfg)
    cost = budget.cost(model, (3, res, res))
    widths = uniform_widths(model.widths, cost, budget.ratio, m.supernet.round_to)
    uniform = build_model(cfg.model.arch, model.num_classes, widths, **cfg.model.options())
    choices = width_choices(model.widths, m.supernet.ratios, m.supernet.round_to)
    per_stage: dict[int, int] = {}
    for u, c in zip(model.units(), choices):
        per_stage[u.stage] = per_stage.get(u.stage, 1) * len(c)
    whole = math.prod(len(c) for c in choices)
    out = {"model": cfg.model.arch, "method": "swp",
           "iterations": [count_row(0, model, res), count_row(1, uniform, res)],
           "search_space": {"per_stage": [per_stage[s] for s in sorted(per_stage)], "whole_net": whole},
           "note": f"row 1 is the uniform arm at {100 * budget.ratio:.0f}% of {budget.amount(cost(model.widths))}; "
                   f"the search space has {whole:.3g} sub-nets, {' + '.join(f'{n:.3g}' for n in per_stage.values())} "
                   "per stage supernet (what the stage split buys)"}
    return budget.plan(out, cost(model.widths))
