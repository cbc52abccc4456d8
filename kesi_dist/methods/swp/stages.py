"""SWP's own stages: the supernets, the proxy, the search under the budget, the sub-nets to retrain.

    supernets  one Ray Train run per stage (a Tune trial each, so they overlap in time), each training its
               stage between the frozen baseline's (`kesi_dist.train.supernet`), plus the whole-network
               supernet of the correlation study; the stages are then put together into one supernet
    search     evolution under the budget (`evolution.Evolution`); each generation's proxy evaluations
               (sub-net cut out of a supernet, BatchNorm recalibrated, holdout accuracy) run on an actor
               pool; saved after every generation, so a killed driver resumes at its last one
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import torch

from kesi_dist import storage
from kesi_dist.budget import Budget
from kesi_dist.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from kesi_dist.data.loaders import make_loader, split_tensors
from kesi_dist.errors import RunError
from kesi_dist.methods.swp.evolution import Evolution, sample_in_band
from kesi_dist.models.slimmable import l1_ordered, materialise, recalibrate_bn, width_choices
from kesi_dist.progress import bar
from kesi_dist.pruning import macs_function, uniform_widths
from kesi_dist.runs import RunContext
from kesi_dist.runtime import ActorPool
from kesi_dist.stages.retrain import Branch, retrain
from kesi_dist.train.devices import compute_device
from kesi_dist.train.spec import EngineSpec, LoaderSpec, schedule_from
from kesi_dist.train.task_specs import SupernetSpec

__all__ = ["ProxyWorker", "supernets_stage", "search_stage", "save_subnet"]



def _load(path: str):
    return model_from_checkpoint(load_checkpoint(path))[0]


def save_subnet(src: str, widths: list[int], dst: str, **extra) -> str:
    """The first `widths[i]` filters of every unit of snapshot `src`, written once to `dst`."""
    if not storage.exists(dst):
        save_checkpoint(dst, materialise(_load(src), widths), extra=extra)
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
            save_checkpoint(ordered, l1_ordered(_load(baseline)), extra={"parent": "baseline"})
        stages = _load(ordered).num_stages
        schedule = vars(schedule_from(supernet))
        spec = dict(baseline=storage.absolute(baseline), ratios=tuple(supernet.ratios), round_to=supernet.round_to,
                    n_random=supernet.n_random)
        runs = [Branch(name=f"supernet_s{s}", arm="supernet", init_checkpoint=ordered,
                       checkpoint=ctx.snapshot(f"supernet_s{s}"), schedule=schedule, compete=False,
                       hparams={"stage": s, "rule": "sandwich"}, task=SupernetSpec(**spec, stage=s),
                       meta={"iteration": 0, "branch": s, "parent": "baseline"}) for s in range(stages)]
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
        ctx.print(f"[bold]supernets[/]: {stages} stage supernets" + (" + the whole-network one" if whole_net else "")
                  + f" in parallel, {supernet.epochs} epochs, {group.num_workers} Ray Train worker(s) each")
        failures = retrain(ctx, "supernets", runs, loader=loader, engine=group, seed=seed)
        missing = [r.name for r in runs if r.name not in ctx.manifest.snapshots]
        if missing:
            raise RunError(f"supernets: {', '.join(f'{n} failed ({failures.get(n)})' for n in missing)}")
        # One supernet: stage s's weights from stage s's run (stem with stage 0, head with the last).
        net = _load(ordered)
        state = net.state_dict()
        for s in range(stages):
            trained = _load(ctx.snapshot(f"supernet_s{s}")).state_dict()
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


class ProxyWorker:
    """An actor of the search's pool: the supernets, the calibration batches and the holdout."""

    def __init__(self, supernets: list[str], loader: dict, *, calib_batches: int, threads: int, gpus: float, seed: int):
        torch.set_num_threads(threads)
        self.device = compute_device(gpus)  # a GPU request without CUDA stops here, naming the node
        self.supernets = [_load(p).to(self.device) for p in supernets]
        spec = LoaderSpec(**loader)
        self.images, self.labels = split_tensors(spec.data_dir, "holdout", resolution=spec.resolution,
                                                 augment=spec.augment, backend=spec.backend, device=self.device,
                                                 **spec.split_args)
        train = make_loader(spec.data_dir, "train", batch_size=spec.batch_size, resolution=spec.resolution,
                            augment="none", backend=spec.backend, num_workers=1, seed=seed, shuffle=True,
                            drop_last=True, device=self.device, **spec.split_args)
        self.calib = [x for x, _ in zip((b[0] for b in train), range(calib_batches))]
        torch.set_num_threads(threads)

    def info(self) -> dict:
        return {"device": str(self.device), "holdout": len(self.labels), "calib": len(self.calib)}

    @torch.no_grad()
    def evaluate(self, widths: list[int], which: int = 0) -> float:
        """Holdout accuracy of sub-net `widths` of supernet `which`, its BatchNorm recalibrated first."""
        net = recalibrate_bn(materialise(self.supernets[which], widths), self.calib)
        correct = 0
        for a in range(0, len(self.labels), 256):
            correct += int((net(self.images[a:a + 256]).argmax(1) == self.labels[a:a + 256]).sum())
        return correct / len(self.labels)


def search_stage(ctx: RunContext, *, supernets: dict, loader: LoaderSpec, engine: EngineSpec, budget: Budget,
                 ratios: list[float], search, subnets: int, seed: int, round_to: int = 1) -> dict:
    """Evolve the best proxy under `budget` (`budget.ratio` x the MACs, or x the predicted latency); draw
    the correlation study's sub-nets and score them on both supernets. Returns the stage record (widths,
    macs, proxy, generations, subnets, uniform)."""
    target = budget.ratio
    with ctx.stage("search", **budget.record()) as st:
        if st.done:
            return st.record
        net = _load(supernets["supernet"])
        shape = (3, ctx.resolution, ctx.resolution)
        macs = macs_function(net, shape)
        base = macs(net.widths)
        cost = budget.cost(net, shape)  # what the budget bounds: MACs, the predicted latency, ...
        full_cost = cost(net.widths)
        lo, hi = (target - search.band) * full_cost, target * full_cost
        choices = width_choices(net.widths, ratios, round_to)
        files = [supernets["supernet"]] + ([supernets["whole_net"]] if supernets.get("whole_net") else [])
        state_path = ctx.run.path("swp", "search_state.json")
        with ActorPool(ProxyWorker, num_actors=search.actors, args=([storage.absolute(f) for f in files], vars(loader)),
                       kwargs=dict(calib_batches=search.calib_batches, threads=max(1, int(engine.cpus_per_worker)),
                                   gpus=engine.gpus_per_worker, seed=seed),
                       num_cpus=engine.cpus_per_worker, num_gpus=engine.gpus_per_worker, what="swp search") as pool:

            def proxies(cands, which=0):
                return pool.map([(list(c), which) for c in cands], method="evaluate")

            evo = Evolution(choices, cost, lo, hi, proxies, population=search.population, parents=search.parents,
                            mutation=search.mutation, mutate_prob=search.mutate_prob, seed=seed)
            if storage.is_file(state_path):  # a killed driver's search: continue after its last generation
                evo.load_state(json.loads(storage.read_text(state_path)))
                ctx.print(f"  search: resuming after generation {evo.generation} of a stopped run")
            else:
                ctx.print(f"[bold]search[/]: evolution to {100 * target:.0f}% of {budget.amount(full_cost)} (band "
                          f"{100 * (target - search.band):.0f}-{100 * target:.0f}%), population {search.population}, "
                          f"{search.generations} generations, {search.actors} actor(s)")
                _saved(ctx, state_path, evo, evo.start())
            with bar(ctx.console, "search", search.generations, unit="generation") as b:
                b.update(completed=evo.generation)
                while evo.generation < search.generations:
                    _saved(ctx, state_path, evo, evo.step())
                    b.update(completed=evo.generation)
            widths, proxy = evo.best()
            rng = random.Random(f"{seed}-correlation")
            sample = [sample_in_band(rng, lambda: [rng.choice(c) for c in choices], cost, lo, hi)
                      for _ in range(subnets)]
            study = []
            if sample:
                ctx.print(f"  correlation study: {subnets} sub-nets in the band, proxies on both supernets")
                swp, whole = proxies(sample, 0), proxies(sample, 1)
                study = [{"widths": list(w), "macs": macs(list(w)), "proxy_swp": a, "proxy_whole_net": b}
                         for w, a, b in zip(sample, swp, whole)]
        uniform = uniform_widths(net.widths, cost, target, round_to)
        st.update(widths=list(widths), macs=macs(list(widths)), macs_ratio=macs(list(widths)) / base, proxy=proxy,
                  budget_ratio=cost(list(widths)) / full_cost,
                  base_macs=base, generations=evo.history, evaluated=len(evo.fitness), subnets=study,
                  uniform=uniform, uniform_macs=macs(uniform))
        ctx.print(f"  best sub-net: proxy {100 * proxy:.2f}% on the holdout, {100 * macs(list(widths)) / base:.2f}% of "
                  f"the MACs ({len(evo.fitness)} evaluated)")
    return ctx.manifest.stages["search"]


def _saved(ctx: RunContext, path: str, evo: Evolution, rec: dict) -> None:
    storage.write_text(path, json.dumps(evo.state()))  # atomic: a killed driver leaves the previous one
    ctx.note("search", generations=evo.history)
    ctx.print(f"  generation {rec['generation']}: best proxy {100 * rec['best']:.2f}%, mean {100 * rec['mean']:.2f}%, "
              f"{rec['evaluated']} sub-nets evaluated")
