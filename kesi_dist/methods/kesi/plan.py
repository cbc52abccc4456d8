"""KESI's `kesi plan`: the pruning chain of `method.prune`, iteration by iteration, on random weights.

PFEC ranks random filters, but the kept *counts* are fixed; MWP's global threshold prunes an exact
fraction of conv weights whatever their values: so the counts are those of a real run.
"""

from __future__ import annotations

from kesi_dist.methods.kesi.prune import prune_iteration
from kesi_dist.plan import count_row, random_model

__all__ = ["plan"]


def plan(cfg) -> dict:
    """{"model": arch, "method": "pfec"|"mwp", "iterations": [{"index", "params", "nonzero_params",
    "macs", "widths"}, ...]}, index 0 being the unpruned model; MACs at `cfg.data.resolution`."""
    p, res = cfg.method.prune, cfg.data.resolution
    model = random_model(cfg)
    rows = [count_row(0, model, res)]
    masks = None
    for it in range(1, p.iterations + 1):
        model, masks = prune_iteration(model, masks, p, it)
        rows.append(count_row(it, model, res))
    return {"model": cfg.model.arch, "method": p.method, "iterations": rows}
