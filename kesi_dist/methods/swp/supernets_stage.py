"""SWP's supernets stage: one Ray Train run per network stage (a Tune trial each, so they overlap in
time), each training its network stage between the frozen baseline's (`kesi_dist.train.supernet`), plus
the whole-network supernet of the correlation study; the network stages are then put together into one
supernet. `save_subnet` cuts a sub-net (the first filters of every unit) out of a snapshot.
"""

from __future__ import annotations

from dataclasses import replace

from kesi_dist import storage
from kesi_dist.checkpoint import load_model, save_checkpoint
from kesi_dist.errors import RunError
from kesi_dist.models.slimmable import l1_ordered, materialise
from kesi_dist.runs import RunContext
from kesi_dist.stages.retrain import Branch, retrain
from kesi_dist.train.spec import EngineSpec, LoaderSpec, schedule_from
from kesi_dist.train.task_specs import SupernetSpec

__all__ = ["supernets_stage", "save_subnet"]


def save_subnet(src: str, widths: list[int], dst: str, **extra) -> str:
    """The first `widths[i]` filters of every unit of snapshot `src`, written once to `dst`."""
    if not storage.exists(dst):
        save_checkpoint(dst, materialise(load_model(src), widths), extra=extra)
    return dst


def supernets_stage(ctx: RunContext, *, baseline: str, loader: LoaderSpec, engine: EngineSpec, supernet,
                    whole_net: bool, seed: int) -> dict:
    """Train the stage supernets (and the whole-network one) in parallel; returns the stage record: the
    assembled supernet's file, the whole-network supernet's (or None) and every run's start, end and node."""
    with ctx.stage("supernets") as st:
        if st.done:
            return st.record
        ordered = ctx.run.path("swp", "ordered.pt")
        if not storage.exists(ordered):  # the baseline, every unit's filters sorted by L1 norm
            save_checkpoint(ordered, l1_ordered(load_model(baseline)), extra={"parent": "baseline"})
        n_stages = load_model(ordered).num_stages
        schedule = vars(schedule_from(supernet))
        spec = dict(baseline=storage.absolute(baseline), ratios=tuple(supernet.ratios), round_to=supernet.round_to,
                    n_random=supernet.n_random)
        runs = [Branch(name=f"supernet_s{s}", arm="supernet", init_checkpoint=ordered,
                       checkpoint=ctx.snapshot(f"supernet_s{s}"), schedule=schedule, compete=False,
                       hparams={"stage": s, "rule": "sandwich"}, task=SupernetSpec(**spec, stage=s),
                       meta={"iteration": 0, "branch": s, "parent": "baseline"}) for s in range(n_stages)]
        if whole_net:
            runs.append(Branch(name="supernet_whole", arm="supernet_whole", init_checkpoint=ordered,
                               checkpoint=ctx.snapshot("supernet_whole"), schedule=schedule, compete=False,
                               hparams={"stage": "all", "rule": "uniform"},
                               task=SupernetSpec(**spec, stage=None, mode="uniform"),
                               meta={"iteration": 0, "branch": None, "parent": "baseline"}))
        # Each supernet is its own Ray Train run (a worker group of at least one worker), in a Tune trial.
        group = replace(engine, num_workers=max(1, engine.num_workers),
                        cpus_per_worker=supernet.cpus_per_worker or engine.cpus_per_worker,
                        gpus_per_worker=engine.gpus_per_worker if supernet.gpus_per_worker is None
                        else supernet.gpus_per_worker)
        ctx.print(f"[bold]supernets[/]: {n_stages} stage supernets" + (" + the whole-network one" if whole_net else "")
                  + f" in parallel, {supernet.epochs} epochs, {group.num_workers} Ray Train worker(s) each")
        failures = retrain(ctx, "supernets", runs, loader=loader, engine=group, seed=seed)
        missing = [r.name for r in runs if r.name not in ctx.manifest.snapshots]
        if missing:
            raise RunError(f"supernets: {', '.join(f'{n} failed ({failures.get(n)})' for n in missing)}")
        # One supernet: stage s's weights from stage s's run (stem with stage 0, head with the last).
        net = load_model(ordered)
        state = net.state_dict()
        for s in range(n_stages):
            trained = load_model(ctx.snapshot(f"supernet_s{s}")).state_dict()
            state.update({k: v for k, v in trained.items() if net.stage_of(k) == s})
        net.load_state_dict(state)
        assembled = ctx.run.path("swp", "supernet.pt")
        save_checkpoint(assembled, net, extra={"parent": "baseline"})
        snaps = ctx.manifest.snapshots
        record = [{"name": r.name, "stage": r.hparams["stage"], "start": snaps[r.name]["train_start"],
                   "end": snaps[r.name]["train_end"], "node_id": snaps[r.name]["node_id"],
                   "workers": snaps[r.name]["workers"]} for r in runs]
        st.update(supernet=assembled, whole_net=ctx.snapshot("supernet_whole") if whole_net else None, runs=record,
                  overlap=_overlap([r for r in record if r["name"] != "supernet_whole"]))
    return ctx.manifest.stages["supernets"]


def _overlap(runs: list[dict]) -> float:
    """Seconds during which at least two of `runs` were training at once."""
    events = sorted([(r["start"], 1) for r in runs] + [(r["end"], -1) for r in runs])
    busy, last, total = 0, None, 0.0
    for t, d in events:
        if busy >= 2 and last is not None:
            total += t - last
        busy, last = busy + d, t
    return round(total, 2)
