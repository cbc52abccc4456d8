"""KESI, top to bottom (Le et al., BMVC 2020).

    data -> baseline -> prune_1 -> ... -> prune_K -> ensemble -> [soft_labels] -> distill -> report
      prune_k: prune the parent in the driver, then retrain B one-cycle branches (+ the fixed-LR
               comparison arm) as parallel Ray Tune trials; the best branch is the parent of the next
               iteration; every finished branch is a snapshot.
      ensemble: pick the teachers (distill.teachers policy) and measure the ensemble (a Ray task).
      soft_labels: cached mode only: a pool of Ray actors computes the teachers' top-k soft labels for
               every (epoch, image) the student will see, once.
      distill: the last chosen snapshot learns from the ensemble on a Ray Train worker group.

Every stage records itself in `<run>/manifest.json` only after its outputs are on disk, so `--resume`
skips what is complete and redoes only what was in flight.
"""

from __future__ import annotations

from kesi_dist import storage
from kesi_dist.budget import run_budget
from kesi_dist.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from kesi_dist.config import Config
from kesi_dist.errors import RunError
from kesi_dist.methods.kesi.prune import prune_iteration, resolve_prune, restart_grid
from kesi_dist.methods.kesi.report import build_report, layout
from kesi_dist.methods.opening import open_recipe
from kesi_dist.runs import RunContext, describe_snapshot, fmt_acc, fmt_size, select_acc
from kesi_dist.stages.distill import distill_stage
from kesi_dist.stages.ensemble import ensemble_stage
from kesi_dist.stages.latency import latency_stage
from kesi_dist.stages.quantize import quantize_stage
from kesi_dist.stages.report import report_stage
from kesi_dist.stages.retrain import Branch, retrain
from kesi_dist.stages.soft_labels import soft_labels_stage
from kesi_dist.train.spec import EngineSpec, LoaderSpec, schedule_from
from kesi_dist.train.task_specs import DistillationSpec

__all__ = ["run"]


def run(cfg: Config, ctx: RunContext) -> None:
    m = cfg.method
    budget = run_budget(cfg)  # a latency budget's table is read (and checked) before anything runs
    prune, _ = resolve_prune(cfg, budget)  # an unreachable budget is refused before anything runs too
    o = open_recipe(cfg, ctx)
    loader, engine, model = o.loader, o.engine, o.model
    parent = fixed_parent = "baseline"
    for k in range(1, m.prune.iterations + 1):
        parent, fixed_parent = prune_stage(cfg, ctx, k, parent, fixed_parent, loader, engine, prune)
    chain = ["baseline"] + [ctx.manifest.stages[f"prune_{k}"]["chosen"] for k in range(1, m.prune.iterations + 1)]
    candidates = {n: select_acc(s) for n, s in ctx.manifest.snapshots.items() if s.get("arm") in ("baseline", "onecycle")}
    d = m.distill
    teachers = ensemble_stage(ctx, policy=d.teachers, chain=chain, candidates=candidates, k=d.num_teachers,
                              loader=loader, engine=engine)
    if d.enabled:
        if d.mode == "cached":
            cache = soft_labels_stage(ctx, teachers, loader=loader, engine=engine, seed=cfg.seed, epochs=d.epochs,
                                      temperature=d.temperature, topk=d.cache_topk or model.num_classes,
                                      actors=d.cache_actors)
            task = DistillationSpec(d.temperature, d.alpha, soft_labels=cache)
        else:
            task = DistillationSpec(d.temperature, d.alpha, teachers=tuple(ctx.snapshot(n) for n in teachers))
        distill_stage(ctx, student=chain[-1], teachers=teachers, task=task, schedule=schedule_from(d), loader=loader,
                      engine=engine, seed=cfg.seed, iteration=m.prune.iterations)
    if budget is not None and budget.table is not None:
        latency_stage(ctx, table_path=budget.table_path, resolution=cfg.data.resolution,
                      snapshots=["baseline", "student" if d.enabled else chain[-1]])
    if cfg.quantize.enabled:  # the deliverable as an int8 ONNX model, calibrated on held-out images
        q = cfg.quantize
        quantize_stage(ctx, "student" if d.enabled else chain[-1], loader=loader, images=q.calibration_images,
                       calibration=q.calibration)
    ctx.complete()
    report_stage(ctx, build_report(ctx.manifest.data), layout(cfg))


def prune_stage(cfg: Config, ctx: RunContext, k: int, parent: str, fixed_parent: str, loader: LoaderSpec,
                engine: EngineSpec, prune) -> tuple[str, str]:
    """Iteration k: prune `parent` (and the fixed-LR arm's `fixed_parent`) by `prune` (the schedule as
    resolved against the budget), retrain the branches in parallel, choose the best one-cycle branch;
    returns (next parent, next fixed-LR parent)."""
    m, stage = cfg.method, f"prune_{k}"
    with ctx.stage(stage, parent=parent) as st:
        if st.done:
            return st.record["chosen"], st.record.get("fixed") or fixed_parent
        init = _prune_once(ctx, prune, parent, f"iter{k}_init", k)
        branches = [
            Branch(name=f"iter{k}_b{j}", arm="onecycle", init_checkpoint=init, checkpoint=ctx.snapshot(f"iter{k}_b{j}"),
                   schedule=vars(schedule_from(m.retrain, **{key: (int(v) if key == "epochs" else v)
                                                             for key, v in hp.items()})),
                   hparams=hp, meta={"iteration": k, "branch": j, "parent": parent})
            for j, hp in enumerate(restart_grid(m.tune.space, m.tune.branches, m.tune.search, cfg.seed + k))
        ]
        if m.fixed_lr.enabled:
            fixed_init = _prune_once(ctx, prune, fixed_parent, f"iter{k}_fixed_init", k)
            branches.append(Branch(name=f"iter{k}_fixed", arm="fixed", init_checkpoint=fixed_init,
                                   checkpoint=ctx.snapshot(f"iter{k}_fixed"), schedule=vars(schedule_from(m.fixed_lr)),
                                   hparams={"lr": m.fixed_lr.lr}, compete=False,
                                   meta={"iteration": k, "branch": None, "parent": fixed_parent}))
        todo = [b for b in branches if b.name not in ctx.manifest.snapshots]
        size = describe_snapshot(init, cfg.data.resolution)
        ctx.print(f"[bold]{stage}[/]: pruned {parent} -> {fmt_size(size)}; retraining {len(todo)} branch(es) in "
                  "parallel" + (f" ({len(branches) - len(todo)} already done)" if len(todo) < len(branches) else ""))
        failures = retrain(ctx, stage, branches, loader=loader, engine=engine, seed=cfg.seed, asha=m.tune.asha,
                           asha_grace_epochs=m.tune.asha_grace_epochs)
        snaps = ctx.manifest.snapshots
        finished = [b.name for b in branches if b.arm == "onecycle" and b.name in snaps]
        if not finished:
            detail = "; ".join(f"{name}: {why}" for name, why in failures.items()) or "no branch ran"
            raise RunError(f"iteration {k}: every branch failed ({detail})")
        chosen = max(finished, key=lambda n: select_acc(snaps[n]))  # the holdout's: never the reported split
        fixed = f"iter{k}_fixed" if f"iter{k}_fixed" in snaps else None
        if m.fixed_lr.enabled and fixed is None:
            raise RunError(f"iteration {k}: the fixed-LR comparison arm failed ({failures.get(f'iter{k}_fixed')})")
        st.update(chosen=chosen, fixed=fixed, failed=failures)
        ctx.print(f"  parent of the next iteration: {chosen} ({fmt_acc(snaps[chosen])})")
    return chosen, fixed or fixed_parent


def _prune_once(ctx: RunContext, prune, parent: str, name: str, k: int) -> str:
    """Prune snapshot `parent` (iteration k of `prune`) into snapshot file `name`, once."""
    dst = ctx.snapshot(name)
    if storage.exists(dst):  # written atomically: present means complete; pruning is deterministic anyway
        return dst
    model, masks = model_from_checkpoint(load_checkpoint(ctx.snapshot(parent)))
    pruned, new_masks = prune_iteration(model, masks, prune, k)
    save_checkpoint(dst, pruned, new_masks, extra={"parent": parent, "iteration": k})
    return dst
