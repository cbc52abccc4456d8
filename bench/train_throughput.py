"""Training throughput: the same training run in-process without Ray vs under a 1- and a 2-worker TorchTrainer.

    ./dev bench train_throughput --json
    .venv/bin/python bench/train_throughput.py --json --epochs 3 --num-train 2048 --repeats 3

Every arm is one `run_training` call with the same model, data, schedule, global batch and CPU budget,
and does the same work: per epoch the training steps, an evaluation on the val split and a checkpoint
(model, train state, optimizer). The arms:

- `bare`: `train.num_workers: 0` with no Ray at all, the worker function in a fresh process of its own
  (so FFCV compiles its pipeline there, as in a Ray worker), all `--cpus` for torch and FFCV;
- `ray_1worker`: a 1-worker TorchTrainer (DDP over gloo) with all `--cpus`;
- `ray_2worker`: a 2-worker TorchTrainer, the `--cpus` split evenly.

Each arm runs `--repeats` times, interleaved (round r runs the arms in the order rotated by r), so load
drifting on a shared machine hits all arms alike; every figure is the median over the repeats (every
repeat is in `all_reps`). Ray is started before and stopped after every Ray arm, outside its timing
(`ray_init_s` is what `ray.init` took: a `kesi run` pays it once, not per training run).

What is measured:
- steady state (`*_images_per_s`): images/s of epochs 2..N, timed inside the training process
  (`train_epoch`'s own clock), median over those epochs; the first epoch (FFCV/numba compilation,
  allocator warm-up) is excluded. `ray_*_vs_bare` is the ratio to the bare arm (goal: >= 0.9).
- the whole run (`*_wall_s`): from the `run_training` call to its return, as a user waits for it, split
  by the wall-clock stamps rank 0 records (`breakdown_s`, which sums to the wall):
    startup        the call until the worker function starts: Ray Train's controller, worker group,
                   processes and process group (bare: next to nothing);
    setup          the worker function until its first epoch: model, loaders (FFCV compiles), optimizer,
                   DDP wrapper;
    epochs         the training steps of every epoch;
    evaluation     the val split after every epoch;
    checkpoint     writing every epoch's checkpoint and reporting it (Ray Train persists it to storage);
    between_epochs from one epoch's reported checkpoint to the next epoch's start;
    teardown       the last checkpoint reported until the call returns (Ray Train shutting down).
  `outside_epochs_s` is the wall minus `epochs`.

Only numbers from a quiet machine (`load_avg_1min` well below `--cpus` in every round) say anything
about the 10 % goal. Prints one JSON object (with --json) or a short table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = ("bare", "ray_1worker", "ray_2worker")
WORKERS = {"bare": 0, "ray_1worker": 1, "ray_2worker": 2}
PHASES = ("startup", "setup", "epochs", "evaluation", "checkpoint", "between_epochs", "teardown")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def train(data_dir: str, storage: str, name: str, workers: int, args) -> dict:
    """One timed `run_training` (workers 0: in this process, no Ray). Returns rates, wall and its split."""
    from kesi_dist.runtime import run_training
    from kesi_dist.train.spec import EngineSpec, LoaderSpec, ModelSpec, ScheduleSpec

    cpus = args.cpus / max(1, workers)
    t0 = time.time()
    result = run_training(
        model=ModelSpec(args.arch, num_classes=args.num_classes),
        schedule=ScheduleSpec(epochs=args.epochs, lr=0.05, schedule="onecycle"),
        loader=LoaderSpec(data_dir, batch_size=args.batch_size, resolution=args.resolution,
                          num_workers=max(1, int(cpus))),
        engine=EngineSpec(engine="ddp", num_workers=workers, cpus_per_worker=cpus, max_failures=0),
        storage_path=storage, name=name, progress=False,
    )
    t1 = time.time()
    h = result.history
    if len(h) != args.epochs or any("checkpoint_end_time" not in m for m in h):
        raise RuntimeError(f"{name}: expected {args.epochs} epochs with their stamps, got {len(h)}")
    split = {
        "startup": h[0]["worker_start_time"] - t0,
        "setup": h[0]["epoch_start_time"] - h[0]["worker_start_time"],
        "epochs": sum(m["train_end_time"] - m["epoch_start_time"] for m in h),
        "evaluation": sum(m["time"] - m["train_end_time"] for m in h),
        "checkpoint": sum(m["checkpoint_end_time"] - m["time"] for m in h),
        "between_epochs": sum(b["epoch_start_time"] - a["checkpoint_end_time"] for a, b in zip(h, h[1:])),
        "teardown": t1 - h[-1]["checkpoint_end_time"],
    }
    return {"rates": [m["images_per_s"] for m in h], "wall_s": t1 - t0, "split": split,
            "loop_epoch_s": [m["epoch_s"] for m in h], "world_size": h[-1]["world_size"]}


def bare_in_fresh_process(data_dir: str, storage: str, name: str, args) -> dict:
    """The bare arm in a new Python process (no Ray, FFCV compiles afresh as in a Ray worker)."""
    cmd = [sys.executable, __file__, "--child-bare", json.dumps({"data": data_dir, "storage": storage, "name": name}),
           *sys.argv[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"bare arm failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ray_arm(data_dir: str, storage: str, name: str, workers: int, args) -> dict:
    import ray

    t = time.perf_counter()
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    init_s = time.perf_counter() - t
    try:
        run = train(data_dir, storage, name, workers, args)
    finally:
        ray.shutdown()
    return {**run, "ray_init_s": init_s}


def steady(rates: list[float]) -> float:
    return statistics.median(rates[1:]) if len(rates) > 1 else rates[0]


def summarise(runs: dict[str, list[dict]], order: list[list[str]], loads: list[float], args) -> dict:
    med = statistics.median
    rate = {a: med(steady(r["rates"]) for r in runs[a]) for a in ARMS}
    wall = {a: med(r["wall_s"] for r in runs[a]) for a in ARMS}
    split = {a: {p: round(med(r["split"][p] for r in runs[a]), 2) for p in PHASES} for a in ARMS}
    out = {f"{a}_images_per_s": round(rate[a], 1) for a in ARMS}
    for a in ARMS[1:]:
        out[f"{a}_vs_bare"] = round(rate[a] / rate["bare"], 3)
    out |= {f"{a}_wall_s": round(wall[a], 1) for a in ARMS}
    for a in ARMS[1:]:
        out[f"{a}_wall_vs_bare"] = round(wall["bare"] / wall[a], 3)
    out["outside_epochs_s"] = {a: round(med(r["wall_s"] - r["split"]["epochs"] for r in runs[a]), 1) for a in ARMS}
    out["breakdown_s"] = split
    out["ray_init_s"] = round(med(r["ray_init_s"] for a in ARMS[1:] for r in runs[a]), 1)
    out["all_reps"] = {a: {"steady_images_per_s": [round(steady(r["rates"]), 1) for r in runs[a]],
                           "wall_s": [round(r["wall_s"], 1) for r in runs[a]],
                           "per_epoch_images_per_s": [[round(x, 1) for x in r["rates"]] for r in runs[a]],
                           "breakdown_s": [{p: round(v, 2) for p, v in r["split"].items()} for r in runs[a]]}
                       for a in ARMS}
    out["order"] = order
    out["measured"] = ("steady state: median images/s over epochs 2..N of a run (timed in the training process), "
                       "median over repeats; wall: the run_training call, split by rank 0's stamps (breakdown_s); "
                       "every arm trains, evaluates and checkpoints every epoch; arms interleaved per repeat")
    out["load_avg_1min"] = loads  # at the end of each round; > cpus means the numbers are contended
    out["setup"] = {"arch": args.arch, "resolution": args.resolution, "num_train": args.num_train,
                    "batch_size": args.batch_size, "epochs": args.epochs, "cpus": args.cpus, "repeats": args.repeats,
                    "engine": "ddp/gloo", "bare": "num_workers 0, no Ray, a fresh process per repeat"}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--num-train", type=int, default=2048)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128, help="global batch")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is warm-up)")
    p.add_argument("--repeats", type=int, default=3, help="runs of every arm, interleaved")
    p.add_argument("--cpus", type=int, default=min(2, os.cpu_count() or 1), help="CPU budget per arm")
    p.add_argument("--data", help="a prepared dataset folder (default: synthetic data in a temp folder)")
    p.add_argument("--child-bare", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (the first epoch is excluded as warm-up)")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.child_bare:
        job = json.loads(args.child_bare)
        print(json.dumps(train(job["data"], job["storage"], job["name"], 0, args)))
        return 0

    from kesi_dist.data.prepare import prepare_dataset

    runs: dict[str, list[dict]] = {a: [] for a in ARMS}
    order, loads = [], []
    with tempfile.TemporaryDirectory(prefix="kesi-bench-") as tmp:
        data_dir = args.data or os.path.join(tmp, "data")
        if not args.data:
            prepare_dataset("synthetic", None, data_dir, resolution=args.resolution, seed=0,
                            num_train=args.num_train, num_val=256, num_classes=args.num_classes, difficulty=0.5)
        storage = os.path.join(tmp, "storage")
        for rep in range(args.repeats):
            arms = list(ARMS[rep % len(ARMS):] + ARMS[:rep % len(ARMS)])
            order.append(arms)
            for arm in arms:
                name = f"{arm}_r{rep}"
                log(f"round {rep + 1}/{args.repeats}: {arm}")
                if arm == "bare":
                    runs[arm].append(bare_in_fresh_process(data_dir, storage, name, args))
                else:
                    runs[arm].append(ray_arm(data_dir, storage, name, WORKERS[arm], args))
            loads.append(round(os.getloadavg()[0], 2))
    out = summarise(runs, order, loads, args)
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            if k not in ("all_reps", "order", "setup"):
                print(f"{k:28s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
