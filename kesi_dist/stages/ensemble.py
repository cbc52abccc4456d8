"""The ensemble stage: choose the teachers among the candidate snapshots and measure their ensemble.

The measurement runs as a Ray task holding one training worker's resources (a GPU node when the
run asks for GPUs), not in the driver.
"""

from __future__ import annotations

from kesi_dist.data.loaders import make_loader
from kesi_dist.distill import evaluate_ensemble, load_teachers, select_teachers
from kesi_dist.progress import bar
from kesi_dist.runs import RunContext
from kesi_dist.runtime import run_remote
from kesi_dist.train.devices import compute_device
from kesi_dist.train.spec import EngineSpec, LoaderSpec

__all__ = ["ensemble_stage", "measure_ensemble"]


def _measure(paths: list[str], loader: dict, gpus: float, split: str, events=None) -> dict:
    """Runs where the resources are: members' and ensemble accuracy on `split` (batches done to `events`)."""
    device = compute_device(gpus)
    val = make_loader(loader["data_dir"], split, batch_size=loader["batch_size"], resolution=loader["resolution"],
                      augment=loader["augment"], backend=loader["backend"], num_workers=loader["num_workers"],
                      device=device, holdout=loader["holdout"], holdout_seed=loader["holdout_seed"])
    total = len(val)

    def done(batches: int) -> None:
        if events is not None:
            events.put({"done": batches, "total": total})

    out = evaluate_ensemble(load_teachers(paths, device=device), val, device=device, on_batch=done)
    return {"acc": float(out["acc"]), "member_acc": [float(a) for a in out["member_acc"]],
            "predictions": out["predictions"].cpu()}


def measure_ensemble(paths: list[str], loader: LoaderSpec, engine: EngineSpec, split: str = "val",
                     on_event=None) -> dict:
    """{"acc", "member_acc", "predictions" [members, samples]} of the snapshot files `paths` on `split`
    ("val": the test split, reported; "holdout": the selection split); `on_event({"done", "total"})`
    sees the batches as they are evaluated."""
    return run_remote(_measure, paths, vars(loader), engine.gpus_per_worker, split, num_cpus=engine.cpus_per_worker,
                      num_gpus=engine.gpus_per_worker, on_event=on_event)


def ensemble_stage(ctx: RunContext, *, policy: str, chain: list[str], candidates: dict[str, float], k: int,
                   loader: LoaderSpec, engine: EngineSpec) -> list[str]:
    """The teachers chosen by `policy` (`kesi_dist.distill.select_teachers`) among `candidates`
    (snapshot name -> selection accuracy, `kesi_dist.runs.select_acc`), recorded with the ensemble's
    accuracy on the test split. The diverse policy compares predictions on the holdout (the test split
    only when the run has none): nothing chosen here has seen the split that is reported."""
    with ctx.stage("ensemble") as st:
        if st.done:
            return st.record["teachers"]
        predictions = None
        if policy == "diverse":
            names = list(candidates)
            split = "holdout" if loader.holdout else "val"
            preds = measure_ensemble([ctx.snapshot(n) for n in names], loader, engine, split)["predictions"]
            predictions = dict(zip(names, preds))
        teachers = select_teachers(policy, chain=chain, candidates=candidates, k=k, predictions=predictions)
        with bar(ctx.console, f"ensemble of {len(teachers)}", None, unit="batch") as b:
            ens = measure_ensemble([ctx.snapshot(n) for n in teachers], loader, engine,
                                   on_event=lambda e: b.update(completed=e["done"], total=e["total"]))
        member = dict(zip(teachers, ens["member_acc"]))
        ctx.print(f"[bold]ensemble[/] ({policy}): {len(teachers)} teachers {', '.join(teachers)}: "
                  f"val acc {100 * ens['acc']:.2f}% (members {100 * min(member.values()):.2f}-"
                  f"{100 * max(member.values()):.2f}%)")
        st.update(teachers=teachers, acc=ens["acc"], member_acc=member)
    return teachers
