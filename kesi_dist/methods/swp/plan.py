"""SWP's `kesi plan`: the baseline, the MACs budget and the uniform arm at it (the searched widths come
from the search), plus the size of the search space per stage."""

from __future__ import annotations

import math

from kesi_dist.plan import count_row, random_model

__all__ = ["plan"]


def plan(cfg) -> dict:
    from kesi_dist.models import build_model
    from kesi_dist.models.slimmable import width_choices
    from kesi_dist.pruning import macs_function, uniform_widths

    res, m = cfg.data.resolution, cfg.method
    model = random_model(cfg)
    macs = macs_function(model, (3, res, res))
    table = None
    if m.target_latency:
        from kesi_dist.latency import budget_table, predict

        table = budget_table(cfg, m.target_latency, "method.target_latency")
        widths = uniform_widths(model.widths, lambda w: predict(table, list(w)), m.budget(), m.supernet.round_to)
    else:
        widths = uniform_widths(model.widths, macs, m.target_macs_ratio, m.supernet.round_to)
    uniform = build_model(cfg.model.arch, model.num_classes, widths, **cfg.model.options())
    choices = width_choices(model.widths, m.supernet.ratios, m.supernet.round_to)
    per_stage: dict[int, int] = {}
    for u, c in zip(model.units(), choices):
        per_stage[u.stage] = per_stage.get(u.stage, 1) * len(c)
    whole = math.prod(len(c) for c in choices)
    out = {"model": cfg.model.arch, "method": "swp", "target_macs_ratio": m.target_macs_ratio,
            "target_macs": int(m.target_macs_ratio * macs(model.widths)),
            "iterations": [count_row(0, model, res), count_row(1, uniform, res)],
            "search_space": {"per_stage": [per_stage[s] for s in sorted(per_stage)], "whole_net": whole},
            "note": f"row 1 is the uniform arm at the {100 * m.target_macs_ratio:.0f}% MACs budget; the search space "
                    f"has {whole:.3g} sub-nets, {' + '.join(f'{n:.3g}' for n in per_stage.values())} per stage "
                    "supernet (what the stage split buys)"}
    if table is not None:
        from kesi_dist.latency import plan_latency

        del out["target_macs_ratio"], out["target_macs"]
        out["note"] = out["note"].replace(f"at the {100 * m.target_macs_ratio:.0f}% MACs budget",
                                          f"at {100 * m.budget():.0f}% of the baseline's predicted {table['full_ms']:.2f} ms")
        return plan_latency(out, table)
    return out
