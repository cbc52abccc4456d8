"""`kesi plan`: the method's pruning schedule applied to random weights, counted and printed.

No data and no training: widths, parameters, nonzero parameters and MACs per step depend only on the
architecture and the schedule. The rows come from the method (`kesi_dist.methods.<name>.plan.plan`);
this module builds the random model, counts a row and prints the table.
"""

from __future__ import annotations

import torch
from rich import box
from rich.console import Console
from rich.table import Table
from torch import nn

from kesi_dist.config import Config
from kesi_dist.latency_table import threads_text
from kesi_dist.methods import METHODS
from kesi_dist.model_config import default_num_classes
from kesi_dist.models import build_model, model_units
from kesi_dist.pruning import count_macs, count_nonzero_params, count_params

__all__ = ["plan_schedule", "print_plan", "random_model", "count_row", "unit_kinds"]


def random_model(cfg: Config) -> nn.Module:
    """`cfg.model` with seeded random weights and no exactly-zero parameter."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.arch, default_num_classes(cfg), **cfg.model.options())
    _randomize(model, cfg.seed)
    return model


def _randomize(model: nn.Module, seed: int) -> None:
    # Like a trained network, no parameter is exactly zero (fresh BN biases are), so iteration 0 has
    # nonzero_params == params and MWP's counts are the pruned weights only.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=g) * 0.9 + 0.1)


def count_row(index: int, model: nn.Module, res: int) -> dict:
    return {
        "index": index,
        "params": count_params(model),
        "nonzero_params": count_nonzero_params(model),
        "macs": count_macs(model, (3, res, res)),
        "widths": list(model.widths),
    }


def unit_kinds(units, stream: bool = True) -> dict:
    """{kind: number of units} (inner, stream, depthwise: `kesi_dist.models.graph`) and which kinds PFEC
    cuts ("kept": the stream units with `prune.stream: false`)."""
    kinds: dict[str, int] = {}
    for u in units:
        kinds[u.kind] = kinds.get(u.kind, 0) + 1
    kept = [] if stream or "stream" not in kinds else ["stream"]
    return {"kinds": kinds, "kept": kept}


def plan_schedule(cfg: Config) -> dict:
    """The method's plan: {"model": arch, "method", "iterations": [count_row, ...]}, index 0 unpruned."""
    return METHODS[cfg.method.name].module("plan").plan(cfg)


def _widths_summary(arch: str, widths: list[int]) -> str:
    """Per stage: the width range of its units, e.g. "8-16 9-32 9-64"."""
    stages: dict[int, list[int]] = {}
    for u, w in zip(model_units(arch, widths), widths):
        stages.setdefault(u.stage, []).append(w)
    parts = []
    for ws in stages.values():
        lo, hi = min(ws), max(ws)
        parts.append(str(lo) if lo == hi else f"{lo}-{hi}")
    return " ".join(parts)


def print_plan(plan: dict) -> None:
    """Print the plan as a rich table: params, nonzero params, MACs (millions) and reductions per iteration."""
    rows = plan["iterations"]
    base = rows[0]
    table = Table(
        title=f"{plan['model']} · {plan['method']} · " + (f"target {100 * plan['target_macs_ratio']:.0f}% of the MACs "
              f"({plan['target_macs'] / 1e6:.2f} M)" if "target_macs" in plan else f"{len(rows) - 1} iterations"),
        caption="params, nonzero, MACs in millions; ↓ = reduction vs iteration 0",
        box=box.SIMPLE_HEAD,
    )
    lat = plan.get("latency")
    for col in ("iter", "params", "nonzero", "MACs", "nonzero ↓", "MACs ↓") + (("ms", "ms ↓") if lat else ()):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("widths per stage", no_wrap=True)

    def pct(a: int, b: int) -> str:
        return f"{100 * (1 - a / b):.1f}%" if b else "-"

    for r in rows:
        widths = _widths_summary(plan["model"], r["widths"]) if "widths" in r else ""
        table.add_row(
            str(r["index"]), f"{r['params'] / 1e6:.3f}", f"{r['nonzero_params'] / 1e6:.3f}",
            f"{r['macs'] / 1e6:.2f}", pct(r["nonzero_params"], base["nonzero_params"]),
            pct(r["macs"], base["macs"]),
            *((f"{r['latency_ms']:.2f}", pct(r["latency_ms"], base["latency_ms"])) if lat else ()), widths,
        )
    if lat:
        table.caption += (f"; ms = predicted {lat['runtime']} latency at batch {lat['batch']}, "
                          f"{threads_text(lat['threads'])} on {lat['cpu']}")
    console = Console()
    if not console.is_terminal:  # a pipe or a log: no 80-column wrap of the numbers
        console = Console(width=160)
    console.print(table)
    if plan.get("units"):
        u = plan["units"]
        kinds = ", ".join(f"{n} {k}" for k, n in u["kinds"].items())
        kept = f"; {', '.join(u['kept'])} units kept whole (method.prune.stream: false)" if u["kept"] else ""
        console.print(f"units: {sum(u['kinds'].values())} ({kinds}){kept}")
    if plan.get("note"):
        console.print(plan["note"])
