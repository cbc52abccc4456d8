"""Distillation overhead: a student epoch with no KD, online KD (6 teachers) and cached KD; the cached
mode's soft-label pass on 1 vs 2 Ray actors; and what a whole distillation costs in each mode.

    ./dev bench distill_overhead --json
    .venv/bin/python bench/distill_overhead.py --json --num-train 2048 --reps 3 --pass-reps 3 --total-epochs 3 --whole-reps 2

Setup (random weights: only time matters): synthetic 32x32 images, 10 classes; teachers = an
unpruned ResNet-56 and its 5 successive PFEC prunings (the paper's ratios and skipped blocks);
student = the last of them (0.85 M -> ~0.3 M parameters).

Student arms (`*_epoch_s`): one epoch of `train_epoch` in this process (FFCV loader, Adam), timed
by the loop's own clock. The three arms replay the same epoch of the same loader, interleaved
`--reps` times after a warm-up epoch, so drifting load on a shared machine hits all arms alike;
each arm's figure is the median over reps (min, max and every rep are in the context). Torch and FFCV use `--threads` threads in this process, default 1:
on a 2-core machine that others are using, 2 OpenMP threads collapse (measured: the 6-teacher
forward of a 128-image batch took 5.9 s with 1 thread and 37.8 s with 2 at load average 6).
  no_kd: cross-entropy; online: the Distillation task with OnlineTeachers runs the 6 teachers on every batch; cached: with CachedSoftLabels,
  reads the batch's soft labels (top-k of the ensemble) by (epoch, sample index).

Soft-label pass (`soft_label_pass_s_{1,2}_actor(s)`): `build_soft_label_cache` over one epoch on a
local Ray (`num_cpus` = `--cpus`), one CPU and one torch thread per actor; the time from the moment the first
actor is up (teachers loaded, loader compiled) until the last shard is written (a second actor that
comes up later is inside it). Actor start-up is reported apart (`*_startup_s`). 1 and 2 actors
alternate `--pass-reps` times; the figures and the speed-up are medians.

Whole distillation (`total_*`): a whole cached and a whole online distillation of `--total-epochs` E
epochs, each run as `kesi run` runs it (the soft_labels and distill stages' calls) and timed end to end
on the same local Ray (`num_cpus` = `--cpus`), alternating `--whole-reps` times (figures: medians):
  cached: `build_soft_label_cache` over E epochs on `--cpus` actors (1 CPU and 1 torch thread each;
    actor start-up and shard writing included), then `run_training` of the student reading that cache
    on a 1-worker TorchTrainer with `--cpus` CPUs (FFCV and torch on `--cpus` threads);
  online: `run_training` of the same student on the same 1-worker TorchTrainer with `--cpus` CPUs, the
    6 teachers run on every batch inside that worker.
Both arms get the whole machine's `--cpus` CPUs all the time; each student run includes Ray Train's
start-up, an evaluation and a checkpoint per epoch and the final checkpoint (`whole_runs` splits them).

Goals: cached epoch within 15 % of no-KD; the pass >= 1.7x faster on 2 actors. The machine load
(1-minute load average) is recorded before each phase: on a busy 2-core machine neither the pass
speed-up nor the epoch times are meaningful.
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

RESNET56_SKIP = ["layer1.7", "layer2.0", "layer3.0", "layer3.8"]


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def make_teachers(out: Path, num_classes: int) -> tuple[list[str], dict]:
    """Unpruned ResNet-56 + 5 PFEC iterations, saved as kesi_dist checkpoints; the last is the student."""
    import torch

    from kesi_dist.checkpoint import save_checkpoint
    from kesi_dist.models import build_model
    from kesi_dist.pruning import count_macs, count_params, pfec_prune

    torch.manual_seed(0)
    model = build_model("resnet56", num_classes)
    paths, sizes = [], []
    for i in range(6):
        if i:
            model = pfec_prune(model, [0.1, 0.2, 0.3], RESNET56_SKIP)
        paths.append(str(out / f"snapshot{i}.pt"))
        save_checkpoint(paths[-1], model)
        sizes.append({"params": count_params(model), "macs": count_macs(model, (3, 32, 32))})
    return paths, {"teachers": sizes, "student": sizes[-1]}


def student_arms(data_dir: str, teacher_paths: list[str], cache_dir: str, args) -> dict:
    import torch

    from kesi_dist.checkpoint import load_checkpoint, model_from_checkpoint
    from kesi_dist.data.loaders import make_loader
    from kesi_dist.distill import CachedSoftLabels, OnlineTeachers
    from kesi_dist.train import Distillation, build_optimizer, train_epoch

    torch.set_num_threads(args.threads)
    student, _ = model_from_checkpoint(load_checkpoint(teacher_paths[-1]))
    opt = build_optimizer(student.parameters(), optimizer="adam", lr=1e-3, weight_decay=0)
    loader = make_loader(data_dir, "train", batch_size=args.batch_size, resolution=32, augment="cifar",
                         num_workers=args.threads, seed=0, return_indices=True)
    hooks = {
        "no_kd": None,
        "online": Distillation(OnlineTeachers.load(teacher_paths, temperature=5.0), temperature=5.0),
        "cached": Distillation(CachedSoftLabels(cache_dir, temperature=5.0, num_classes=args.num_classes),
                               temperature=5.0),
    }
    loader.set_epoch(0)
    train_epoch(student, loader, opt, None)  # warm-up: FFCV compilation, allocator
    times: dict[str, list[float]] = {k: [] for k in hooks}
    for _ in range(args.reps):
        for name, hook in hooks.items():
            loader.set_epoch(0)
            if hook is not None:
                hook.set_epoch(0)
            times[name].append(train_epoch(student, loader, opt, None, task=hook)["epoch_s"])
    return {f"{k}_epoch_s": round(statistics.median(v), 3) for k, v in times.items()} | {
        "epoch_s_min_max": {k: [round(min(v), 3), round(max(v), 3)] for k, v in times.items()},
        "epoch_s_all_reps": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "torch_threads_student": torch.get_num_threads(),
    }


def soft_label_pass(data_dir: str, teacher_paths: list[str], out: str, actors: int, args, epochs: int = 1) -> dict:
    from kesi_dist.stages.soft_labels import build_soft_label_cache

    return build_soft_label_cache(teacher_paths, data_dir, out, epochs=epochs, seed=0, batch_size=args.batch_size,
                                  resolution=32, augment="cifar", temperature=5.0, topk=args.topk,
                                  num_actors=actors, cpus_per_actor=1, loader_workers=1)


def whole_distillation(mode: str, data_dir: str, teacher_paths: list[str], work: Path, args) -> dict:
    """One whole distillation of `args.total_epochs` epochs as the KESI recipe runs it (Ray must be up).

    cached: the soft_labels stage's `build_soft_label_cache` on `args.cpus` actors, then the distill stage's
    `run_training` reading the cache; online: that `run_training` with the teachers. Wall times from the
    calls; the student run split by the stamps its worker records."""
    from kesi_dist.runtime import run_training
    from kesi_dist.train.spec import EngineSpec, LoaderSpec, ModelSpec, ScheduleSpec
    from kesi_dist.train.task_specs import DistillationSpec

    e = args.total_epochs
    out: dict = {"mode": mode}
    start = time.time()
    if mode == "cached":
        meta = soft_label_pass(data_dir, teacher_paths, str(work / "soft_labels"), args.cpus, args, epochs=e)
        out["pass_s"] = round(time.time() - start, 2)
        out["pass_actors_start_s"] = round(meta["timings"]["actors_start_s"], 2)
        task = DistillationSpec(temperature=5.0, soft_labels=str(work / "soft_labels"))
    else:
        task = DistillationSpec(temperature=5.0, teachers=tuple(teacher_paths))
    t0 = time.time()
    result = run_training(
        model=ModelSpec("", init_checkpoint=teacher_paths[-1]),
        schedule=ScheduleSpec(epochs=e, optimizer="adam", lr=1e-3, weight_decay=0.0),
        loader=LoaderSpec(data_dir, batch_size=args.batch_size, resolution=32, augment="cifar", backend="ffcv",
                          num_workers=args.cpus),
        engine=EngineSpec(engine="ddp", num_workers=1, cpus_per_worker=args.cpus, max_failures=0),
        storage_path=str(work / "train"), name="distill", seed=0, progress=False, task=task,
        final_checkpoint=str(work / "student.pt"),
    )
    end = time.time()
    h = result.history
    out |= {
        "student_s": round(end - t0, 2),
        "total_s": round(end - start, 2),
        "student_startup_s": round(h[0]["worker_start_time"] - t0, 2),  # Ray Train's start-up
        "student_setup_s": round(h[0]["epoch_start_time"] - h[0]["worker_start_time"], 2),
        "student_epochs_s": round(sum(m["train_end_time"] - m["epoch_start_time"] for m in h), 2),
        "student_eval_and_checkpoints_s": round(sum(m["checkpoint_end_time"] - m["train_end_time"] for m in h), 2),
        "student_epoch_s": [round(m["epoch_s"], 2) for m in h],
    }
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--num-train", type=int, default=2048)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--reps", type=int, default=3, help="timed epochs per student arm")
    p.add_argument("--pass-reps", type=int, default=3, help="soft-label passes per actor count")
    p.add_argument("--total-epochs", type=int, default=3, help="epochs of the whole-distillation comparison")
    p.add_argument("--whole-reps", type=int, default=2, help="whole cached and online distillations, alternating")
    p.add_argument("--cpus", type=int, default=2, help="Ray's CPUs: the pass's actors, the whole runs' worker")
    p.add_argument("--threads", type=int, default=1, help="torch/FFCV threads of the student loop")
    args = p.parse_args()
    if args.whole_reps < 1 or args.total_epochs < 1 or args.cpus < 1:
        p.error("--whole-reps, --total-epochs and --cpus must be >= 1")

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    import ray

    from kesi_dist.data.prepare import prepare_dataset

    load = {}
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="kesi-bench-distill-") as tmp:
        tmp = Path(tmp)
        data_dir = str(tmp / "data")
        prepare_dataset("synthetic", None, data_dir, resolution=32, seed=0, workers=1, num_train=args.num_train,
                        num_val=256, num_classes=args.num_classes, difficulty=0.5)
        teacher_paths, sizes = make_teachers(tmp, args.num_classes)

        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
                 configure_logging=True, logging_level="WARNING")
        try:
            passes: dict[int, list[dict]] = {1: [], 2: []}
            for rep in range(args.pass_reps):
                for actors in (1, 2):
                    load[f"pass_{actors}_rep{rep}"] = round(os.getloadavg()[0], 2)
                    log(f"soft-label pass {rep + 1}/{args.pass_reps} on {actors} actor(s)")
                    passes[actors].append(soft_label_pass(data_dir, teacher_paths, str(tmp / f"cache{actors}_{rep}"),
                                                          actors, args))
            whole: dict[str, list[dict]] = {"cached": [], "online": []}
            for rep in range(args.whole_reps):
                for mode in (("cached", "online") if rep % 2 == 0 else ("online", "cached")):
                    load[f"whole_{mode}_rep{rep}"] = round(os.getloadavg()[0], 2)
                    log(f"whole {mode} distillation {rep + 1}/{args.whole_reps} ({args.total_epochs} epochs)")
                    whole[mode].append(whole_distillation(mode, data_dir, teacher_paths, tmp / f"whole_{mode}_{rep}", args))
        finally:
            ray.shutdown()
        load["student_arms"] = round(os.getloadavg()[0], 2)
        # The arms run after Ray is gone, so its idle processes take no CPU from them.
        log(f"student epochs: no KD, online, cached x {args.reps}")
        arms = student_arms(data_dir, teacher_paths, str(tmp / "cache2_0"), args)

    def med(actors: int, key: str) -> float:
        return round(statistics.median(p["timings"][key] for p in passes[actors]), 3)

    speedups = [a["timings"]["pass_s"] / b["timings"]["pass_s"] for a, b in zip(passes[1], passes[2])]
    e = args.total_epochs

    def whole_med(mode: str, key: str) -> float:
        return round(statistics.median(r[key] for r in whole[mode]), 1)

    cached_total, online_total = whole_med("cached", "total_s"), whole_med("online", "total_s")
    result = {
        "no_kd_epoch_s": arms["no_kd_epoch_s"],
        "online_epoch_s": arms["online_epoch_s"],
        "cached_epoch_s": arms["cached_epoch_s"],
        "soft_label_pass_s_1_actor": med(1, "pass_s"),
        "soft_label_pass_s_2_actors": med(2, "pass_s"),
        "cached_vs_no_kd": round(arms["cached_epoch_s"] / arms["no_kd_epoch_s"], 3),
        "online_vs_no_kd": round(arms["online_epoch_s"] / arms["no_kd_epoch_s"], 3),
        "pass_speedup_2_vs_1": round(statistics.median(speedups), 3),
        "pass_speedup_all_reps": [round(x, 3) for x in speedups],
        f"total_cached_s_{e}_epochs": cached_total,
        f"total_online_s_{e}_epochs": online_total,
        f"total_soft_label_pass_s_{e}_epochs": whole_med("cached", "pass_s"),
        f"total_cached_student_s_{e}_epochs": whole_med("cached", "student_s"),
        "total_online_vs_cached": round(online_total / cached_total, 3),
        "total_online_vs_cached_all_reps": [round(o["total_s"] / c["total_s"], 3)
                                            for c, o in zip(whole["cached"], whole["online"])],
        "whole_runs": whole,
        "whole_arms": {
            "cached": f"soft-label pass over {e} epoch(s) on {args.cpus} Ray actors (1 CPU, 1 torch thread each), then "
                      f"the student on a 1-worker TorchTrainer with {args.cpus} CPUs ({args.cpus} FFCV/torch threads) "
                      "reading the cache",
            "online": f"the student on a 1-worker TorchTrainer with {args.cpus} CPUs ({args.cpus} FFCV/torch "
                      f"threads), the {len(teacher_paths)} teachers run on every batch in that worker",
            "both": f"{e} epoch(s), Adam, batch {args.batch_size}, an evaluation and a checkpoint per epoch, the final "
                    f"checkpoint; timed from the first call to the last return on one local Ray of {args.cpus} CPUs",
        },
        "goals": {
            "cached_within_15pct_of_no_kd": arms["cached_epoch_s"] <= 1.15 * arms["no_kd_epoch_s"],
            "pass_2_actors_at_least_1.7x": statistics.median(speedups) >= 1.7,
        },
        "soft_label_pass_startup_s_1_actor": med(1, "actors_start_s"),
        "soft_label_pass_startup_s_2_actors": med(2, "actors_start_s"),
        # Per shard of the first rep: wall and CPU seconds in the teachers. With 2 actors each shard has
        # half the batches, so its CPU time should halve; wall > CPU means the actor waited for a core.
        "soft_label_pass_teacher_s_per_shard": {
            str(a): [s["teacher_s"] for s in passes[a][0]["shards"]] for a in (1, 2)
        },
        "soft_label_pass_teacher_cpu_s_per_shard": {
            str(a): [s["teacher_cpu_s"] for s in passes[a][0]["shards"]] for a in (1, 2)
        },
        "context": {
            "images": args.num_train, "resolution": 32, "classes": args.num_classes, "batch_size": args.batch_size,
            "teachers": len(teacher_paths), "teacher_arch": "resnet56 + 5 PFEC iterations",
            "teacher_params": [s["params"] for s in sizes["teachers"]],
            "teacher_macs": [s["macs"] for s in sizes["teachers"]],
            "student_params": sizes["student"]["params"], "student_macs": sizes["student"]["macs"],
            "topk": args.topk, "reps": args.reps, "pass_epochs": 1,
            "torch_threads_student": arms["torch_threads_student"], "torch_threads_per_actor": 1,
            "cpus": os.cpu_count(), "loadavg_1min_before": load,
            "epoch_s_min_max": arms["epoch_s_min_max"], "epoch_s_all_reps": arms["epoch_s_all_reps"],
        },
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            if k not in ("context", "whole_runs", "whole_arms"):
                print(f"{k:40s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
