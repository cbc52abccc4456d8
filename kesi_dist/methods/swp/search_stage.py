"""SWP's search stage: evolution under the budget (`evolution.Evolution`); each generation's proxy
evaluations (a sub-net cut out of a supernet, BatchNorm recalibrated, holdout accuracy) run on an actor
pool of `ProxyWorker`s; saved after every generation, so a killed driver resumes at its last one. The
correlation study's sub-nets are drawn in the same band and scored on both supernets.
"""

from __future__ import annotations

import json
import random

import torch

from kesi_dist import storage
from kesi_dist.budget import Budget
from kesi_dist.checkpoint import load_model
from kesi_dist.data.loaders import make_loader, split_tensors
from kesi_dist.methods.swp.evolution import Evolution, sample_in_band
from kesi_dist.models.slimmable import materialise, recalibrate_bn, width_choices
from kesi_dist.progress import bar
from kesi_dist.pruning import macs_function, uniform_widths
from kesi_dist.runs import RunContext
from kesi_dist.runtime import ActorPool
from kesi_dist.train.devices import compute_device
from kesi_dist.train.spec import EngineSpec, LoaderSpec

__all__ = ["ProxyWorker", "search_stage"]


class ProxyWorker:
    """An actor of the search's pool: the supernets, the calibration batches and the holdout."""

    def __init__(self, supernets: list[str], loader: dict, *, calib_batches: int, threads: int, gpus: float, seed: int):
        torch.set_num_threads(threads)
        self.device = compute_device(gpus)  # a GPU request without CUDA stops here, naming the node
        self.supernets = [load_model(p).to(self.device) for p in supernets]
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
        net = load_model(supernets["supernet"])
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
