"""KESI's `kesi plan`: the pruning chain of `method.prune`, iteration by iteration, on random weights.

PFEC ranks random filters, but the kept *counts* are fixed; MWP's global threshold prunes an exact
fraction of conv weights whatever their values: so the counts are those of a real run.
"""

from __future__ import annotations

from kesi_dist.budget import run_budget
from kesi_dist.methods.kesi.prune import prune_iteration, resolve_prune
from kesi_dist.plan import count_row, random_model, unit_kinds

__all__ = ["plan"]


def plan(cfg) -> dict:
    """{"model": arch, "method": "pfec"|"mwp", "iterations": [{"index", "params", "nonzero_params",
    "macs", "widths"}, ...], "units" (pfec on a graph network: `unit_kinds`)}, index 0 being the unpruned model; MACs at `cfg.data.resolution`."""
    budget = run_budget(cfg)
    (p, chosen), res = resolve_prune(cfg, budget), cfg.data.resolution
    model = random_model(cfg)
    rows = [count_row(0, model, res)]
    masks = None
    for it in range(1, p.iterations + 1):
        model, masks = prune_iteration(model, masks, p, it)
        rows.append(count_row(it, model, res))
    out = {"model": cfg.model.arch, "method": p.method, "iterations": rows}
    kinds = unit_kinds(model.units(), p.stream)
    if p.method == "pfec" and set(kinds["kinds"]) != {"inner"}:  # a graph network (every zoo unit is inner)
        out["units"] = kinds
    if chosen is not None:
        out["latency_target"] = chosen
        out["note"] = (f"latency budget {chosen['latency_ratio']:.2f} of the baseline's predicted "
                       f"{chosen['baseline_predicted_ms']:.2f} ms ({chosen['table']}): the schedule's ratios x"
                       f"{chosen['scale']:.3f} -> stage_ratios {chosen['stage_ratios']}, predicted "
                       f"{chosen['predicted_ms']:.2f} ms")
        out = budget.plan(out, chosen["baseline_predicted_ms"])
    return out
