"""Training throughput: the bare core loop vs the same epochs under a 1- and a 2-worker TorchTrainer.

    ./dev bench train_throughput --json
    .venv/bin/python bench/train_throughput.py --json --epochs 4 --num-train 4096

What is measured: images/s of training epochs (forward, backward, step; FFCV loading included),
timed inside the process that trains (`train_epoch`'s own clock), median over the steady-state
epochs: the first epoch (FFCV/numba compilation, allocator warm-up) is excluded, and so is Ray's
start-up (cluster, worker group, process group). Next to it, the whole run as a user waits for it:
`*_wall_s` (start-up, epochs, evaluation, checkpoints), `ray_*_wall_vs_bare` (bare wall / Ray wall,
medians of the two bare runs) and `outside_epochs_s` (wall minus the training epochs).
The bare loop runs before and after the Ray arms (its median covers both) so that load drifting on
a shared machine does not masquerade as Ray overhead; still, only numbers from a quiet machine
(`load_avg_1min_at_end` well below `--cpus`) say anything about the 10 % goal.
Every arm uses the same model, data, global batch and CPU budget: the bare loop and the 1-worker
group get all `--cpus` (torch and FFCV threads), the 2-worker group splits them evenly. The ratio
`ray_1worker_vs_bare` is Ray's steady-state overhead (goal: >= 0.9); `ray_1worker_wall_vs_bare`
is what it costs a run of `--epochs` epochs, start-up included (short runs pay most).

Prints one JSON object (with --json) or a short table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bare_loop(data_dir: str, args) -> tuple[list[float], float, float]:
    import torch

    from kesi_dist.data.loaders import make_loader
    from kesi_dist.models import build_model
    from kesi_dist.train import build_optimizer, build_scheduler, train_epoch

    start = time.perf_counter()
    torch.manual_seed(0)
    model = build_model(args.arch, num_classes=args.num_classes)
    loader = make_loader(data_dir, "train", batch_size=args.batch_size, resolution=args.resolution,
                         num_workers=args.cpus, seed=0)
    opt = build_optimizer(model.parameters(), lr=0.05)
    sched = build_scheduler(opt, schedule="onecycle", epochs=args.epochs, steps_per_epoch=len(loader), lr=0.05)
    rates, epoch_s = [], 0.0
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        m = train_epoch(model, loader, opt, sched)
        rates.append(m["images_per_s"])
        epoch_s += m["epoch_s"]
    return rates, time.perf_counter() - start, epoch_s


def ray_run(data_dir: str, storage: str, workers: int, args) -> tuple[list[float], float, float]:
    from kesi_dist.runtime import run_training
    from kesi_dist.train.spec import EngineSpec, LoaderSpec, ModelSpec, ScheduleSpec

    cpus = args.cpus / workers
    start = time.perf_counter()
    result = run_training(
        model=ModelSpec(args.arch, num_classes=args.num_classes),
        schedule=ScheduleSpec(epochs=args.epochs, lr=0.05, schedule="onecycle"),
        loader=LoaderSpec(data_dir, batch_size=args.batch_size, resolution=args.resolution,
                          num_workers=max(1, int(cpus))),
        engine=EngineSpec(engine="ddp", num_workers=workers, cpus_per_worker=cpus, max_failures=0),
        storage_path=storage, name=f"bench_{workers}w", progress=False,
    )
    return ([m["images_per_s"] for m in result.history], time.perf_counter() - start,
            sum(m["epoch_s"] for m in result.history))


def steady(rates: list[float]) -> float:
    return statistics.median(rates[1:]) if len(rates) > 1 else rates[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--num-train", type=int, default=2048)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128, help="global batch")
    p.add_argument("--epochs", type=int, default=3, help="epochs per arm (the first is warm-up)")
    p.add_argument("--cpus", type=int, default=min(2, os.cpu_count() or 1), help="CPU budget per arm")
    p.add_argument("--data", help="a prepared dataset folder (default: synthetic data in a temp folder)")
    args = p.parse_args()
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (the first epoch is excluded as warm-up)")

    import ray

    from kesi_dist.data.prepare import prepare_dataset

    with tempfile.TemporaryDirectory(prefix="kesi-bench-") as tmp:
        data_dir = args.data or os.path.join(tmp, "data")
        if not args.data:
            prepare_dataset("synthetic", None, data_dir, resolution=args.resolution, seed=0,
                            num_train=args.num_train, num_val=256, num_classes=args.num_classes, difficulty=0.5)
        bare, bare_wall, bare_epochs = bare_loop(data_dir, args)
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
                 logging_level="WARNING")
        try:
            one, one_wall, one_epochs = ray_run(data_dir, os.path.join(tmp, "storage"), 1, args)
            two, two_wall, two_epochs = ray_run(data_dir, os.path.join(tmp, "storage"), 2, args)
        finally:
            ray.shutdown()
        # the bare loop again: on a shared machine load drifts, so it brackets the Ray arms
        bare_after, bare_wall_after, _ = bare_loop(data_dir, args)
    bare_steady = bare[1:] + bare_after[1:]  # steady state of both bare runs (each run's epoch 1 dropped)
    bare_rate = statistics.median(bare_steady)
    out = {
        "bare_images_per_s": round(bare_rate, 1),
        "ray_1worker_images_per_s": round(steady(one), 1),
        "ray_2worker_images_per_s": round(steady(two), 1),
        "ray_1worker_vs_bare": round(steady(one) / bare_rate, 3),
        "ray_2worker_vs_bare": round(steady(two) / bare_rate, 3),
        # The whole run as a user waits for it: start-up (Ray Train's worker group, process group, FFCV
        # compilation), every epoch, evaluation and checkpoints; and what is not training epochs.
        "bare_wall_s": round(statistics.median([bare_wall, bare_wall_after]), 1),
        "ray_1worker_wall_s": round(one_wall, 1), "ray_2worker_wall_s": round(two_wall, 1),
        "ray_1worker_wall_vs_bare": round(statistics.median([bare_wall, bare_wall_after]) / one_wall, 3),
        "ray_2worker_wall_vs_bare": round(statistics.median([bare_wall, bare_wall_after]) / two_wall, 3),
        "outside_epochs_s": {"bare": round(bare_wall - bare_epochs, 1), "ray_1worker": round(one_wall - one_epochs, 1),
                             "ray_2worker": round(two_wall - two_epochs, 1)},
        "per_epoch_images_per_s": {"bare": [round(r, 1) for r in bare + bare_after], "ray_1worker": [round(r, 1) for r in one],
                                   "ray_2worker": [round(r, 1) for r in two]},
        "measured": "steady state: median images/s over epochs 2..N (epoch 1 and Ray start-up excluded), timed in "
                    "the worker; bare = both bare runs (before and after the Ray arms). wall: the whole run, start-up "
                    "included; outside_epochs_s: wall minus the training epochs (start-up, evaluation, checkpoints)",
        "load_avg_1min_at_end": round(os.getloadavg()[0], 2),  # > cpus means the numbers are contended
        "setup": {"arch": args.arch, "resolution": args.resolution, "num_train": args.num_train,
                  "batch_size": args.batch_size, "epochs": args.epochs, "cpus": args.cpus, "engine": "ddp/gloo"},
    }
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            if not isinstance(v, dict):
                print(f"{k:28s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
