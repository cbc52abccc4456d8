"""EKG, top to bottom (Lee & Song, ECCV 2022; reference code sseung0703/EKG).

    data -> baseline -> search -> memory_bank -> finetune -> report
      search: the greedy, training-free sub-network search on the held-out split, scored by CE + soft CE
              to K, the running mean of the logits of every accepted interim sub-network; a step's
              candidate evaluations run in parallel on an actor pool (`stages.search_stage`)
      memory_bank: `bank.teachers` interim sub-networks spread in holdout loss; their logits on every
              clean training image, sharded over an actor pool (`kesi_dist.stages.memory_bank`)
      finetune: the arms as parallel Ray Tune trials, each on Ray Train like every stage: the searched
              net with the memory bank's curriculum loss (EKG, snapshot "student"), the same net with CE
              only (`ce_finetune`), and a uniformly pruned net at the same MACs with CE (`uniform`)

Every stage records itself in the manifest only after its outputs are on disk; the search also saves
its state after every accepted step, so `--resume` continues a killed search where it stopped.
"""

from __future__ import annotations

from kesi_dist.budget import run_budget
from kesi_dist.config import Config
from kesi_dist.errors import RunError
from kesi_dist.methods.ekg.report import build_report, layout
from kesi_dist.methods.ekg.search_stage import search_stage, uniform_stage
from kesi_dist.methods.opening import open_recipe
from kesi_dist.runs import RunContext
from kesi_dist.stages.memory_bank import memory_bank_stage
from kesi_dist.stages.report import report_stage
from kesi_dist.stages.latency import latency_stage
from kesi_dist.stages.quantize import quantize_stage
from kesi_dist.stages.retrain import Branch, retrain
from kesi_dist.train.spec import schedule_from
from kesi_dist.train.task_specs import MemoryBankSpec

__all__ = ["run"]


def run(cfg: Config, ctx: RunContext) -> None:
    m = cfg.method
    budget = run_budget(cfg)  # MACs, or a latency table read and checked before anything runs
    o = open_recipe(cfg, ctx)
    loader, engine, classes = o.loader, o.engine, o.model.num_classes
    found = search_stage(ctx, baseline=ctx.snapshot("baseline"), loader=loader, engine=engine,
                         budget=budget, step=m.search.step, cut=m.search.otsu_cut,
                         batch_size=m.search.batch_size, actors=m.search.actors, teachers=m.bank.teachers,
                         round_to=m.search.round_to)
    bank = memory_bank_stage(ctx, [t["file"] for t in found["teachers"]], loader=loader, engine=engine,
                             actors=m.bank.actors, batch_size=m.search.batch_size)

    with ctx.stage("finetune") as st:
        if not st.done:
            f = m.finetune
            schedule = vars(schedule_from(f))
            arms = [Branch(name="student", arm="ekg", init_checkpoint=found["subnet"], checkpoint=ctx.snapshot("student"),
                           schedule=schedule, compete=False, hparams={"loss": "memory bank", "views": f.views},
                           task=MemoryBankSpec(bank, m.temperature(classes), f.views),
                           meta={"iteration": 1, "branch": None, "parent": "baseline"})]
            if m.arms.ce_finetune:
                arms.append(Branch(name="ce_finetune", arm="ce_finetune", init_checkpoint=found["subnet"],
                                   checkpoint=ctx.snapshot("ce_finetune"), schedule=schedule, compete=False,
                                   hparams={"loss": "CE"}, meta={"iteration": 1, "branch": None, "parent": "baseline"}))
            if m.arms.uniform:
                init = uniform_stage(ctx, baseline=ctx.snapshot("baseline"), budget=budget,
                                     round_to=m.search.round_to)
                arms.append(Branch(name="uniform", arm="uniform", init_checkpoint=init, checkpoint=ctx.snapshot("uniform"),
                                   schedule=schedule, compete=False, hparams={"loss": "CE", "pruning": "uniform L1"},
                                   meta={"iteration": 1, "branch": None, "parent": "baseline"}))
            todo = [a for a in arms if a.name not in ctx.manifest.snapshots]
            ctx.print(f"[bold]finetune[/]: {', '.join(a.name for a in todo)} in parallel for {f.epochs} epochs"
                      + (f" ({len(arms) - len(todo)} already done)" if len(todo) < len(arms) else ""))
            failures = retrain(ctx, "finetune", arms, loader=loader, engine=engine, seed=cfg.seed)
            missing = [a.name for a in arms if a.name not in ctx.manifest.snapshots]
            if missing:
                raise RunError(f"finetune: {', '.join(f'{n} failed ({failures.get(n)})' for n in missing)}")
            st.update(arms=[a.name for a in arms], failed=failures)
    if budget.table is not None:
        latency_stage(ctx, table_path=budget.table_path, resolution=cfg.data.resolution,
                      snapshots=["baseline", "student", *(["uniform"] if m.arms.uniform else [])])
    if cfg.quantize.enabled:  # the deliverable as an int8 ONNX model, calibrated on held-out images
        q = cfg.quantize
        quantize_stage(ctx, "student", loader=loader, images=q.calibration_images, calibration=q.calibration)
    ctx.complete()
    report_stage(ctx, build_report(ctx.manifest.data), layout(cfg))
