"""SWP, top to bottom (Rong, Ou, Zhang et al., arXiv 2011.04908).

    data -> baseline -> supernets -> search -> retrain -> report
      supernets: the baseline's filters sorted by L1 norm; one supernet per stage, each a Ray Train run
              of its own, in parallel: the stage between the frozen baseline's other stages, trained with
              the sandwich rule (full, tiny and random widths every step) and in-place distillation
              (the full width's output supervises the others); plus, for the correlation study, a
              whole-network supernet trained with uniform sampling and CE only (the conventional one)
      search: regularised evolution under the MACs budget; fitness = holdout accuracy of the sub-net
              cut out of the assembled supernet with its BatchNorm recalibrated (on an actor pool)
      retrain: as parallel Ray Tune trials, from the baseline's L1-first filters at their widths with the
              same schedule: the searched net ("student"), a uniformly pruned net at the same MACs
              ("uniform"), and the correlation study's sub-nets ("subnet<i>")

Every retrained net starts from the baseline (not from a supernet), so the retrained accuracies are a
ground truth neither supernet shaped: the correlation study compares both supernets' proxies with it.
"""

from __future__ import annotations

from kesi_dist.budget import run_budget
from kesi_dist.config import Config
from kesi_dist.errors import RunError
from kesi_dist.methods.opening import open_recipe
from kesi_dist.methods.swp.report import build_report, layout, write_scatter
from kesi_dist.methods.swp.search_stage import search_stage
from kesi_dist.methods.swp.supernets_stage import save_subnet, supernets_stage
from kesi_dist.runs import RunContext
from kesi_dist.stages.report import report_stage
from kesi_dist.stages.latency import latency_stage
from kesi_dist.stages.quantize import quantize_stage
from kesi_dist.stages.retrain import Branch, retrain
from kesi_dist.train.spec import schedule_from

__all__ = ["run"]


def run(cfg: Config, ctx: RunContext) -> None:
    m = cfg.method
    budget = run_budget(cfg)  # MACs, or a latency table read and checked before anything runs
    o = open_recipe(cfg, ctx)
    loader, engine = o.loader, o.engine
    nets = supernets_stage(ctx, baseline=ctx.snapshot("baseline"), loader=loader, engine=engine, supernet=m.supernet,
                           whole_net=m.correlation.subnets > 0, seed=cfg.seed)
    found = search_stage(ctx, supernets=nets, loader=loader, engine=engine, budget=budget,
                         ratios=m.supernet.ratios, search=m.search, subnets=m.correlation.subnets, seed=cfg.seed,
                         round_to=m.supernet.round_to)

    with ctx.stage("retrain") as st:
        if not st.done:
            ordered = ctx.run.path("swp", "ordered.pt")
            schedule = vars(schedule_from(m.retrain))
            chosen = [("student", "swp", found["widths"], {"widths": "searched"})]
            if m.uniform:
                chosen.append(("uniform", "uniform", found["uniform"], {"widths": "uniform"}))
            chosen += [(f"subnet{i}", "subnet", s["widths"], {"widths": f"correlation {i}"})
                       for i, s in enumerate(found["subnets"])]
            arms = [Branch(name=name, arm=arm, init_checkpoint=save_subnet(ordered, widths, ctx.snapshot(f"{name}_init"),
                                                                           parent="baseline"),
                           checkpoint=ctx.snapshot(name), schedule=schedule, compete=False, hparams=hp,
                           meta={"iteration": 1, "branch": None, "parent": "baseline"})
                    for name, arm, widths, hp in chosen]
            todo = [a for a in arms if a.name not in ctx.manifest.snapshots]
            ctx.print(f"[bold]retrain[/]: {len(todo)} sub-net(s) in parallel for {m.retrain.epochs} epochs from the "
                      "baseline's L1-first filters" + (f" ({len(arms) - len(todo)} already done)"
                                                       if len(todo) < len(arms) else ""))
            failures = retrain(ctx, "retrain", arms, loader=loader, engine=engine, seed=cfg.seed)
            missing = [a.name for a in arms if a.name not in ctx.manifest.snapshots]
            if missing:
                raise RunError(f"retrain: {', '.join(f'{n} failed ({failures.get(n)})' for n in missing)}")
            st.update(arms=[a.name for a in arms])
    if budget.table is not None:
        latency_stage(ctx, table_path=budget.table_path, resolution=cfg.data.resolution,
                      snapshots=["baseline", "student", *(["uniform"] if m.uniform else [])])
    if cfg.quantize.enabled:  # the deliverable as an int8 ONNX model, calibrated on held-out images
        q = cfg.quantize
        quantize_stage(ctx, "student", loader=loader, images=q.calibration_images, calibration=q.calibration)
    ctx.complete()
    report = build_report(ctx.manifest.data)
    report_stage(ctx, report, layout(cfg))
    write_scatter(ctx.run.path("correlation.png"), report)
