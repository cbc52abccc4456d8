"""EKG's `kesi plan`: what can be known before the search: the baseline's size, the MACs target and the
uniform comparison arm at that target (the searched widths depend on the trained weights and the holdout)."""

from __future__ import annotations

from kesi_dist.methods.ekg.search import uniform_widths
from kesi_dist.plan import count_row, random_model

__all__ = ["plan"]


def plan(cfg) -> dict:
    """{"model", "method": "ekg", "target_macs", "iterations": [baseline row, uniform row at the target]}."""
    from kesi_dist.models import build_model

    res = cfg.data.resolution
    model = random_model(cfg)
    base = count_row(0, model, res)
    m = cfg.method
    if m.target_latency:
        from kesi_dist.latency import budget_table, plan_latency, predict

        table = budget_table(cfg, m.target_latency, "method.target_latency")
        r = m.target_latency.latency_ratio
        widths = uniform_widths(model, r, (3, res, res), m.search.round_to, lambda w: predict(table, w))
        uniform = build_model(cfg.model.arch, model.num_classes, widths, **cfg.model.options())
        out = {"model": cfg.model.arch, "method": "ekg", "iterations": [base, count_row(1, uniform, res)],
               "note": f"row 1 is the uniform arm at {100 * r:.0f}% of the baseline's predicted {table['full_ms']:.2f} ms "
                       f"({m.target_latency.table}); the EKG sub-network's widths come from the search (same budget)"}
        return plan_latency(out, table)
    target = m.target_macs_ratio
    widths = uniform_widths(model, target, (3, res, res), m.search.round_to)
    uniform = build_model(cfg.model.arch, model.num_classes, widths, **cfg.model.options())
    return {"model": cfg.model.arch, "method": "ekg", "target_macs_ratio": target,
            "target_macs": int(target * base["macs"]), "iterations": [base, count_row(1, uniform, res)],
            "note": f"row 1 is the uniform arm at the {100 * target:.0f}% MACs target; the EKG sub-network's widths "
                    "come from the search (same target, widths chosen per unit)"}
