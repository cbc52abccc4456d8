"""EKG's `kesi plan`: what can be known before the search: the baseline's size, the budget and the
uniform comparison arm at it (the searched widths depend on the trained weights and the holdout)."""

from __future__ import annotations

from kesi_dist.budget import run_budget
from kesi_dist.methods.ekg.search import uniform_widths
from kesi_dist.models import build_model
from kesi_dist.plan import count_row, random_model

__all__ = ["plan"]


def plan(cfg) -> dict:
    """{"model", "method": "ekg", "iterations": [baseline row, uniform row at the budget], the budget's
    fields (`Budget.plan`: the MACs target, or each row's predicted latency)}."""
    res, budget = cfg.data.resolution, run_budget(cfg)
    shape = (3, res, res)
    model = random_model(cfg)
    cost = budget.cost(model, shape)
    widths = uniform_widths(model, budget.ratio, shape, cfg.method.search.round_to, cost)
    uniform = build_model(cfg.model.arch, model.num_classes, widths, **cfg.model.options())
    out = {"model": cfg.model.arch, "method": "ekg", "iterations": [count_row(0, model, res), count_row(1, uniform, res)],
           "note": f"row 1 is the uniform arm at {100 * budget.ratio:.0f}% of {budget.amount(cost(model.widths))}; "
                   "the EKG sub-network's widths come from the search (same budget, widths chosen per unit)"}
    return budget.plan(out, cost(model.widths))
