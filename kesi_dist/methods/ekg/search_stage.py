"""EKG's own pipeline stage, the search (on an actor pool), its teachers and result, and the uniform
comparison arm's initial net (the finetune stage trains it).

    search    the greedy loop in the driver; the Taylor scores (sharded by holdout batch) and each step's
              candidate evaluations run on a pool of actors that each hold the baseline and the holdout;
              after every accepted step the search's state is saved and the step recorded, so a killed
              driver resumes at its last accepted step
    teachers  the memory bank's interim sub-networks (`teacher_pick.pick_teachers`) cut out of the baseline
    uniform   the baseline pruned by one ratio in every unit (L1 filters) to the same budget
"""

from __future__ import annotations

import io
import time

import torch

from kesi_dist import storage
from kesi_dist.budget import Budget
from kesi_dist.checkpoint import load_checkpoint, load_tensors, model_from_checkpoint, save_checkpoint
from kesi_dist.data.loaders import split_tensors
from kesi_dist.methods.ekg.evaluator import SubnetEvaluator
from kesi_dist.methods.ekg.search import Step, SubnetSearch, uniform_widths
from kesi_dist.methods.ekg.teacher_pick import pick_teachers
from kesi_dist.progress import bar
from kesi_dist.pruning import l1_keep_indices, slice_units
from kesi_dist.report import save_figure
from kesi_dist.runs import RunContext, describe_snapshot, fmt_size
from kesi_dist.runtime import ActorPool
from kesi_dist.train.devices import compute_device
from kesi_dist.train.spec import EngineSpec, LoaderSpec
from kesi_dist.train.tensorboard import ScalarWriter

__all__ = ["SearchWorker", "search_pool", "pool_functions", "search_stage", "uniform_stage"]



class SearchWorker:
    """An actor of the search's pool: the baseline on its device and the holdout as tensors."""

    def __init__(self, checkpoint: str, loader: dict, *, batch_size: int, threads: int, gpus: float):
        torch.set_num_threads(threads)
        device = compute_device(gpus)  # a GPU request without CUDA stops here, naming the node
        model, _ = model_from_checkpoint(load_checkpoint(checkpoint))
        spec = LoaderSpec(**loader)
        images, labels = split_tensors(spec.data_dir, "holdout", resolution=spec.resolution, augment=spec.augment,
                                       backend=spec.backend, device=device, **spec.split_args)
        torch.set_num_threads(threads)  # FFCV sets it to its own thread count
        self.evaluator = SubnetEvaluator(model, images, labels, batch_size=batch_size, device=device)

    def info(self) -> dict:
        ev = self.evaluator
        return {"device": str(ev.device), "holdout": len(ev.labels), "batches": ev.num_batches}

    def evaluate(self, widths, order, knowledge):
        return self.evaluator.evaluate(widths, order, knowledge)

    def taylor(self, widths, order, knowledge, start: int, stop: int):
        return self.evaluator.taylor(widths, order, knowledge, start, stop)


def search_pool(baseline: str, loader: LoaderSpec, engine: EngineSpec, batch_size: int, actors: int):
    """An `ActorPool` of `SearchWorker`s, each holding one training worker's resources."""
    return ActorPool(SearchWorker, num_actors=actors, args=(storage.absolute(baseline), vars(loader)),
                     kwargs=dict(batch_size=batch_size, threads=max(1, int(engine.cpus_per_worker)),
                                 gpus=engine.gpus_per_worker),
                     num_cpus=engine.cpus_per_worker, num_gpus=engine.gpus_per_worker, what="ekg search")


def pool_functions(pool, used: set[int]):
    """(evaluate_many, taylor_many) of `SubnetSearch` on `pool`: a step's candidates are evaluated in
    parallel, one unit per candidate, the actors that did so added to `used`; the Taylor scores are split
    into contiguous runs of holdout batches, one per live actor, and come back in batch order."""

    def evaluate_many(trials, order, knowledge):
        return pool.map([(w, order, knowledge) for w in trials], method="evaluate",
                        on_result=lambda unit, r, actor: used.add(actor["actor"]))

    def taylor_many(widths, order, knowledge):
        n = pool.infos[0]["batches"]
        k = min(n, len(pool.infos))
        bounds = [round(i * n / k) for i in range(k + 1)]
        parts = pool.map([(widths, order, knowledge, bounds[i], bounds[i + 1]) for i in range(k)], method="taylor")
        return [batch for part in parts for batch in part]

    return evaluate_many, taylor_many


def _save_tensors(path: str, obj) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    storage.write_bytes(path, buf.getvalue())  # atomic: a killed driver leaves the previous state


def _record(s: Step, actors: set[int], seconds: float) -> dict:
    return {"step": s.step, "unit": s.unit, "widths": s.widths, "macs": s.macs, "macs_ratio": round(s.macs_ratio, 6),
            "budget_ratio": round(s.budget_ratio, 6), "holdout_loss": s.holdout_loss, "score": s.score, "candidates": s.candidates,
            "actors": sorted(actors), "seconds": round(seconds, 3)}


def search_stage(ctx: RunContext, *, baseline: str, loader: LoaderSpec, engine: EngineSpec, budget: Budget,
                 step: float, cut: float, batch_size: int, actors: int, teachers: int, round_to: int = 1) -> dict:
    """Search the baseline's sub-network to `budget` (`budget.ratio` x its MACs, or its predicted
    latency); returns the stage record: steps, the final widths, MACs and ratio, the teachers (step,
    widths, holdout loss, file) and `subnet` (the cut sub-network's snapshot file, not trained)."""
    target = budget.ratio
    with ctx.stage("search", **budget.record()) as st:
        if st.done:
            return st.record
        model, _ = model_from_checkpoint(load_checkpoint(baseline))
        state_path = ctx.run.path("ekg", "search_state.pt")
        shape = (3, ctx.resolution, ctx.resolution)
        with search_pool(baseline, loader, engine, batch_size, actors) as pool:
            used: set[int] = set()
            evaluate_many, taylor_many = pool_functions(pool, used)
            search = SubnetSearch(model, target_ratio=target, step=step, cut=cut, batch_size=batch_size,
                                  input_shape=shape, round_to=round_to, cost=budget.cost(model, shape),
                                  evaluate_many=evaluate_many, taylor_many=taylor_many)
            holdout = pool.infos[0]["holdout"]
            used.clear()  # from here: the actors that evaluated each step's candidates
            steps: list[dict] = []
            resumed = 0
            if storage.is_file(state_path):  # a killed driver's search: continue from its last accepted step
                state = load_tensors(state_path)
                search.load_state(state)
                resumed, steps = len(search.history) - 1, list(state["records"])
                ctx.print(f"  search: resuming after step {resumed} of a stopped run (MACs "
                          f"{100 * search.ratio(search.widths):.1f}%)")
            ctx.print(f"[bold]search[/]: {model.arch} to {100 * target:.0f}% of {budget.amount(search.base_cost)} on "
                      f"{holdout} held-out images, {actors} actor(s)")
            ctx.note("search", steps=steps, resumed_from=resumed, holdout=holdout)
            writer = ScalarWriter(ctx.run.path("tensorboard", "search"))
            began = time.perf_counter()

            def on_step(s: Step) -> None:
                nonlocal began
                steps.append(_record(s, used, time.perf_counter() - began))
                _save_tensors(state_path, {**search.state(), "records": steps})
                ctx.note("search", steps=steps)
                writer.scalars({"search/macs_ratio": s.macs_ratio, "search/budget_ratio": s.budget_ratio,
                                "search/holdout_loss": s.holdout_loss,
                                "search/score": s.score, "search/candidates": s.candidates}, step=s.step)
                ctx.print(f"  step {s.step}: {s.unit} -> {s.widths[[u.name for u in search.units].index(s.unit)]} "
                          f"channels, MACs {100 * s.macs_ratio:.1f}%{budget.besides_macs(s.budget_ratio)}"
                          f", holdout loss {s.holdout_loss:.4f}, "
                          f"{s.candidates} candidates on {len(used)} actor(s)")
                used.clear()
                began = time.perf_counter()

            with bar(ctx.console, "search", 100, unit="%") as b:
                def step_and_show(s: Step) -> None:
                    on_step(s)  # towards the target: 0 % at the full net, 100 % at the target's MACs
                    b.update(completed=round(100 * (1 - s.budget_ratio) / (1 - target), 1))

                try:
                    search.run(step_and_show)
                finally:
                    writer.close()
        record = _outputs(ctx, model, search, teachers, steps, budget)
        st.update(**record)
        ctx.print(f"  searched sub-network: {fmt_size(describe(ctx, record['subnet']))}, "
                  f"{100 * record['macs_ratio']:.1f}% of the MACs; teachers at steps "
                  f"{', '.join(str(t['step']) for t in record['teachers'])}")
    return record


def describe(ctx: RunContext, path: str) -> dict:
    return describe_snapshot(path, ctx.resolution)


def _outputs(ctx: RunContext, model, search: SubnetSearch, num_teachers: int, steps: list[dict],
             budget: Budget) -> dict:
    """Cut the final sub-network and the teachers out of the baseline, plot the trajectory."""
    subnet = ctx.snapshot("ekg_init")
    save_checkpoint(subnet, slice_units(model, search.keep()), extra={"parent": "baseline", "method": "ekg"})
    interim = search.history[:-1]  # the final sub-network is not its own teacher (the reference's pop)
    teachers = []
    for j, i in enumerate(pick_teachers([h["loss"] for h in interim], num_teachers)):
        path = ctx.run.path("ekg", f"teacher{j}.pt")
        save_checkpoint(path, slice_units(model, search.keep(interim[i])), extra={"parent": "baseline", "step": i})
        teachers.append({"step": i, "widths": interim[i]["widths"], "macs": search.macs(interim[i]["widths"]),
                         "holdout_loss": interim[i]["loss"], "file": path})
    _plot(steps, search.target, ctx.run.path("search.png"), budget.noun)
    return {"steps": steps, "widths": list(search.widths), "macs": search.macs(search.widths),
            "macs_ratio": search.macs_ratio(search.widths), "budget_ratio": search.ratio(search.widths),
            "budget": budget.kind, "base_macs": search.base_macs, "teachers": teachers,
            "subnet": subnet, "original_loss": search.history[0]["loss"]}


def _plot(steps: list[dict], target: float, path: str, noun: str = "MACs") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [100 * s.get("budget_ratio", s["macs_ratio"]) for s in steps]
    ax.plot(xs, [s["holdout_loss"] for s in steps], "o-", ms=3, label="holdout CE")
    ax.plot(xs, [s["score"] for s in steps], "s-", ms=3, alpha=0.6, label="score (CE + soft CE to K)")
    ax.axvline(100 * target, color="tab:red", linestyle="--", label=f"target {100 * target:.0f}%")
    ax.invert_xaxis()
    ax.set_xlabel(f"{noun} of the sub-network (% of the baseline's)")
    ax.set_ylabel("holdout loss")
    ax.set_title("EKG search: one accepted step per point")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def uniform_stage(ctx: RunContext, *, baseline: str, budget: Budget, round_to: int = 1) -> str:
    """The baseline with every unit keeping the same fraction of its highest-L1 filters, the widest at or
    under `budget`; written once to snapshot file "uniform_init"."""
    dst = ctx.snapshot("uniform_init")
    if storage.exists(dst):  # written atomically; deterministic anyway
        return dst
    model, _ = model_from_checkpoint(load_checkpoint(baseline))
    shape = (3, ctx.resolution, ctx.resolution)
    widths = uniform_widths(model, budget.ratio, shape, round_to, budget.cost(model, shape))
    convs = dict(model.named_modules())
    keep = {u.name: l1_keep_indices(convs[u.conv].weight, w) for u, w in zip(model.units(), widths)}
    save_checkpoint(dst, slice_units(model, keep), extra={"parent": "baseline", "method": "uniform"})
    return dst
