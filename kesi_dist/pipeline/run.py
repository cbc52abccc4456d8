"""`kesi run`: the KESI pipeline, top to bottom.

    data -> baseline -> prune_1 -> ... -> prune_K -> ensemble -> [soft_labels] -> distill -> report
      prune_k: prune the parent in the driver, then retrain B one-cycle branches (+ the fixed-LR
               comparison arm) as parallel Ray Tune trials; the best branch is the parent of the next
               iteration; every finished branch is a snapshot.
      ensemble: pick the teachers (distill.teachers policy) and measure the ensemble (a Ray task).
      soft_labels: cached mode only: a pool of Ray actors computes the teachers' top-k soft labels for
               every (epoch, image) the student will see, once.
      distill: the last chosen snapshot learns from the ensemble on a Ray Train worker group.

Every stage records itself in `<run>/manifest.json` only after its outputs are on disk, so
`--resume` skips what is complete and redoes only what was in flight.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from kesi_dist import storage
from kesi_dist.config import Config
from kesi_dist.errors import KesiError, RunError, UsageError
from kesi_dist.pipeline.branches import Branch, require_some, restart_grid, run_branches
from kesi_dist.pipeline.manifest import Manifest
from kesi_dist.pipeline.rundir import RunDir, open_run
from kesi_dist.train.spec import EngineSpec, LoaderSpec, ModelSpec, schedule_from

__all__ = ["run_pipeline", "loader_spec", "engine_spec", "prepare_data"]

console = Console(highlight=False, soft_wrap=True)


def loader_spec(cfg: Config, data_dir: str | Path) -> LoaderSpec:
    d = cfg.data
    return LoaderSpec(data_dir=str(data_dir), batch_size=d.batch_size, resolution=d.resolution,
                      augment=d.augment, backend=d.loader, num_workers=d.num_workers)


def engine_spec(cfg: Config) -> EngineSpec:
    t = cfg.train
    return EngineSpec(engine=t.engine, zero_stage=t.zero_stage, num_workers=t.num_workers,
                      cpus_per_worker=t.cpus_per_worker, gpus_per_worker=t.gpus_per_worker, bf16=t.bf16,
                      channels_last=t.channels_last, max_failures=t.max_failures)


def prepare_data(cfg: Config, default_dir: str | Path) -> tuple[str, dict]:
    """The prepared data folder for `cfg.data`, converting a raw source first when needed.

    The folder may be a storage URI (prepared locally and uploaded, see `prepare_dataset`); loaders
    fetch it into a node-local cache (`kesi_dist.storage.local_copy`): FFCV memory-maps local files.
    """
    from kesi_dist.data.loaders import read_meta
    from kesi_dist.data.prepare import prepare_dataset

    d = cfg.data
    if d.source == "prepared":
        return str(d.prepared), read_meta(d.prepared)
    out = str(d.prepared or default_dir)
    opts = d.synthetic.model_dump() if d.source == "synthetic" else {}
    return out, prepare_dataset(d.source, d.root, out, resolution=d.store_resolution, seed=cfg.seed, **opts)


def _describe(path: str, resolution: int) -> dict:
    """Architecture and size of a saved snapshot (what the registry records)."""
    from kesi_dist.checkpoint import load_checkpoint, model_from_checkpoint
    from kesi_dist.pruning import count_macs, count_nonzero_params, count_params

    ck = load_checkpoint(path)
    model, _ = model_from_checkpoint(ck)
    return {"arch": ck["arch"], "widths": ck["widths"], "num_classes": ck["num_classes"],
            "params": count_params(model), "nonzero_params": count_nonzero_params(model),
            "macs": count_macs(model, (3, resolution, resolution))}


def _register(manifest: Manifest, run: RunDir, name: str, resolution: int, **info) -> dict:
    entry = {**_describe(run.snapshot(name), resolution), **info,
             "checkpoint": RunDir.snapshot_rel(name)}
    manifest.add_snapshot(name, entry)
    return entry


def _fmt_size(entry: dict) -> str:
    return f"{entry['params'] / 1e6:.3f} M params ({entry['nonzero_params'] / 1e6:.3f} M nonzero), " \
           f"{entry['macs'] / 1e6:.1f} M MACs"


def _preflight(cfg: Config) -> None:
    """Mistakes found from the config alone, before Ray starts or the run folder is touched: a search
    space that cannot yield the branches, a given baseline that is unreadable or of another model."""
    restart_grid(cfg.tune.space, cfg.tune.branches, cfg.tune.search, cfg.seed)
    path = cfg.baseline.checkpoint
    if path:
        from kesi_dist.checkpoint import load_checkpoint

        try:
            ck = load_checkpoint(path)
        except RunError as e:
            raise RunError(f"baseline.checkpoint: {e}") from None
        if ck["arch"] != cfg.model.arch:
            raise UsageError(f"baseline.checkpoint {path}: holds a {ck['arch']}, but model.arch is {cfg.model.arch}")
        if cfg.model.num_classes and ck["num_classes"] != cfg.model.num_classes:
            raise UsageError(f"baseline.checkpoint {path}: has {ck['num_classes']} classes, but model.num_classes "
                             f"is {cfg.model.num_classes}")


def run_pipeline(cfg: Config, output: str, resume: bool = False, *, max_steps_per_epoch: int | None = None) -> RunDir:
    """Run (or resume) the whole pipeline for `cfg` into the run directory `output`."""
    from kesi_dist.cluster import check_resources, check_shared_path, connect_ray

    _preflight(cfg)
    # Cluster checks come before the run folder is created: a config the cluster cannot run (GPUs it
    # lacks, an output path some node cannot see) fails in seconds and leaves nothing to clean up.
    connect_ray(cfg.cluster.address)
    t = cfg.train
    workers = max(t.num_workers, 1)  # num_workers == 0: a branch trial holds one worker's resources
    check_resources(workers * t.gpus_per_worker, workers * t.cpus_per_worker)
    shared_with = check_shared_path(output)
    run, manifest = open_run(output, cfg, resume)
    console.rule(f"kesi run · {cfg.model.arch} · {cfg.prune.method} x{cfg.prune.iterations} · {run.root}")
    if shared_with:
        console.print(f"output {output}: visible from all {len(shared_with)} other node(s) with CPUs/GPUs")
    try:
        data_dir, meta = _stage_data(cfg, run, manifest)
        num_classes = cfg.model.num_classes or meta["num_classes"]
        if num_classes != meta["num_classes"]:
            raise UsageError(f"model.num_classes is {num_classes} but the data has {meta['num_classes']} "
                             "classes; remove model.num_classes or fix it")
        loader, engine = loader_spec(cfg, data_dir), engine_spec(cfg)
        _stage_baseline(cfg, run, manifest, num_classes, loader, engine, max_steps_per_epoch)
        parent = fixed_parent = "baseline"
        for k in range(1, cfg.prune.iterations + 1):
            parent, fixed_parent = _stage_prune(cfg, run, manifest, k, parent, fixed_parent, loader, engine,
                                                max_steps_per_epoch)
        chain = ["baseline"] + [manifest.stages[f"prune_{k}"]["chosen"] for k in range(1, cfg.prune.iterations + 1)]
        teachers = _stage_ensemble(cfg, run, manifest, chain, loader, engine)
        if cfg.distill.enabled:
            _stage_distill(cfg, run, manifest, chain[-1], teachers, data_dir, loader, engine, max_steps_per_epoch)
        manifest.data["status"] = "complete"
        manifest.log("run complete")
        _stage_report(cfg, run, manifest)
    except KesiError as e:
        manifest.data["status"] = "failed"
        manifest.log("run failed", error=str(e))
        raise
    console.print(f"[green]done[/]: report in {run.path('report.md')}")
    return run


# ----------------------------------------------------------------------------------------------
# stages

def _stage_data(cfg: Config, run: RunDir, manifest: Manifest) -> tuple[str, dict]:
    from kesi_dist.data.loaders import read_meta

    if manifest.is_complete("data"):
        data_dir = manifest.stages["data"]["path"]
        return data_dir, read_meta(data_dir)
    manifest.start_stage("data")
    console.print(f"[bold]data[/]: {cfg.data.source}" + (f" from {cfg.data.root}" if cfg.data.root else ""))
    data_dir, meta = prepare_data(cfg, run.data)
    console.print(f"  {meta['train_size']} train / {meta['val_size']} val images, {meta['num_classes']} classes, "
                  f"{meta['resolution']} px -> {data_dir}")
    manifest.finish_stage("data", path=str(data_dir), num_classes=meta["num_classes"],
                          train_size=meta["train_size"], val_size=meta["val_size"])
    return data_dir, meta


def _stage_baseline(cfg: Config, run: RunDir, manifest: Manifest, num_classes: int, loader: LoaderSpec,
                    engine: EngineSpec, max_steps: int | None) -> None:
    from kesi_dist.pipeline.ray_train import run_training

    if manifest.is_complete("baseline"):
        console.print("[bold]baseline[/]: complete, reused")
        return
    manifest.start_stage("baseline")
    start = time.time()
    if cfg.baseline.checkpoint:
        node_id, attempts = _import_baseline(cfg, run, num_classes, loader)
        val_acc = None
    else:
        console.print(f"[bold]baseline[/]: training {cfg.model.arch} for {cfg.baseline.epochs} epochs "
                      f"on {max(engine.num_workers, 1)} worker(s)")
        result = run_training(
            model=ModelSpec(arch=cfg.model.arch, num_classes=num_classes), schedule=schedule_from(cfg.baseline),
            loader=loader, engine=engine, storage_path=str(run.train), name="baseline", seed=cfg.seed,
            resume=True, final_checkpoint=str(run.snapshot("baseline")),
            tensorboard_dir=run.path("tensorboard", "baseline"), max_steps_per_epoch=max_steps,
        )
        val_acc, node_id, attempts = result.metrics["val/acc"], result.metrics.get("node_id"), result.attempts
    entry = _register(manifest, run, "baseline", cfg.data.resolution, arm="baseline", iteration=0, branch=None,
                      parent=None, hparams={}, node_id=node_id, start=start, end=time.time(), attempts=attempts,
                      **({"val_acc": val_acc} if val_acc is not None else {}))
    if val_acc is None:
        entry["val_acc"] = _evaluate_snapshot(run.snapshot("baseline"), loader)
        manifest.add_snapshot("baseline", entry)
    console.print(f"  baseline: val acc {100 * entry['val_acc']:.2f}%, {_fmt_size(entry)}")
    manifest.finish_stage("baseline")


def _import_baseline(cfg: Config, run: RunDir, num_classes: int, loader: LoaderSpec) -> tuple[None, int]:
    """Use a given trained baseline: check it fits the config, copy it into the run."""
    from kesi_dist.checkpoint import load_checkpoint

    path = cfg.baseline.checkpoint
    ck = load_checkpoint(path)
    if ck["arch"] != cfg.model.arch:
        raise UsageError(f"baseline.checkpoint {path}: holds a {ck['arch']}, but model.arch is {cfg.model.arch}")
    if ck["num_classes"] != num_classes:
        raise UsageError(f"baseline.checkpoint {path}: has {ck['num_classes']} classes, the data has {num_classes}")
    console.print(f"[bold]baseline[/]: using {path}")
    storage.copy_file(path, run.snapshot("baseline"))  # either may be a URI; atomic at the destination
    return None, 0


def _evaluate_snapshot(path: str, loader: LoaderSpec) -> float:
    from kesi_dist.checkpoint import load_checkpoint, model_from_checkpoint
    from kesi_dist.data.loaders import make_loader
    from kesi_dist.train.loop import evaluate

    model, _ = model_from_checkpoint(load_checkpoint(path))
    val = make_loader(loader.data_dir, "val", batch_size=loader.batch_size, resolution=loader.resolution,
                      augment=loader.augment, backend=loader.backend, num_workers=loader.num_workers)
    return float(evaluate(model, val, "cpu")["val/acc"])


def _prune_parent(cfg: Config, run: RunDir, parent: str, name: str, k: int) -> str:
    """Prune snapshot `parent` (iteration k) into `<run>/snapshots/<name>.pt`, once."""
    from kesi_dist.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
    from kesi_dist.pruning import prune

    dst = run.snapshot(name)
    if storage.exists(dst):  # written atomically: present means complete; pruning is deterministic anyway
        return dst
    model, masks = model_from_checkpoint(load_checkpoint(run.snapshot(parent)))
    p = cfg.prune
    pruned, new_masks = prune(model, masks, method=p.method, iteration=k, stage_ratios=p.stage_ratios,
                              skip=p.skip, layer_ratios=p.layer_ratios, targets=p.targets)
    save_checkpoint(dst, pruned, new_masks, extra={"parent": parent, "iteration": k})
    return dst


def _stage_prune(cfg: Config, run: RunDir, manifest: Manifest, k: int, parent: str, fixed_parent: str,
                 loader: LoaderSpec, engine: EngineSpec, max_steps: int | None) -> tuple[str, str]:
    stage = f"prune_{k}"
    if manifest.is_complete(stage):
        info = manifest.stages[stage]
        console.print(f"[bold]{stage}[/]: complete, reused (parent of next: {info['chosen']})")
        return info["chosen"], info.get("fixed") or fixed_parent
    manifest.start_stage(stage, parent=parent)
    init = _prune_parent(cfg, run, parent, f"iter{k}_init", k)
    branches = [
        Branch(name=f"iter{k}_b{j}", arm="onecycle", iteration=k, branch=j, parent=parent,
               init_checkpoint=str(init), checkpoint=str(run.snapshot(f"iter{k}_b{j}")),
               schedule=vars(schedule_from(cfg.retrain, **{key: (int(v) if key == "epochs" else v)
                                                             for key, v in hp.items()})),
               hparams=hp)
        for j, hp in enumerate(restart_grid(cfg.tune.space, cfg.tune.branches, cfg.tune.search, cfg.seed + k))
    ]
    if cfg.fixed_lr.enabled:
        fixed_init = _prune_parent(cfg, run, fixed_parent, f"iter{k}_fixed_init", k)
        branches.append(Branch(name=f"iter{k}_fixed", arm="fixed", iteration=k, branch=None, parent=fixed_parent,
                               init_checkpoint=str(fixed_init), checkpoint=str(run.snapshot(f"iter{k}_fixed")),
                               schedule=vars(schedule_from(cfg.fixed_lr)), hparams={"lr": cfg.fixed_lr.lr}))
    todo = [b for b in branches if b.name not in manifest.snapshots]
    size = _describe(init, cfg.data.resolution)
    console.print(f"[bold]{stage}[/]: pruned {parent} -> {_fmt_size(size)}; retraining "
                  f"{len(todo)} branch(es) in parallel" + (f" ({len(branches) - len(todo)} already done)"
                                                           if len(todo) < len(branches) else ""))
    failures: dict[str, str] = {}

    def done(b: Branch, result: dict) -> None:
        entry = _register(manifest, run, b.name, cfg.data.resolution, arm=b.arm, iteration=k, branch=b.branch,
                          parent=b.parent, hparams=b.hparams, val_acc=result["val/acc"],
                          node_id=result.get("node_id"), start=result.get("start"), end=result.get("end"),
                          attempts=result.get("attempts"))
        console.print(f"  [green]{b.name}[/] done: val acc {100 * entry['val_acc']:.2f}% "
                      f"({', '.join(f'{k2}={v}' for k2, v in b.hparams.items())})")

    def failed(b: Branch, why: str) -> None:
        failures[b.name] = why
        manifest.log(f"branch {b.name} failed", error=why)
        console.print(f"  [red]{b.name} failed[/]: {why}")

    def progress(b: Branch, result: dict) -> None:
        if "epoch" in result:
            console.print(f"  {b.name} epoch {result['epoch']}/{b.schedule['epochs']}  "
                          f"val acc {100 * result['val/acc']:.1f}%  loss {result['train/loss']:.4f}")

    def retry(b: Branch, why: str, attempt: int) -> None:
        manifest.log(f"branch {b.name} retried", attempt=attempt, error=why)
        console.print(f"  [yellow]{b.name} lost[/] ({why}); restarting from its last epoch checkpoint "
                      f"(attempt {attempt})")

    run_branches(todo, loader=loader, engine=engine, storage=run.path("train", stage),
                 tensorboard=run.path("tensorboard", stage), experiment="tune", seed=cfg.seed,
                 asha=cfg.tune.asha, asha_grace_epochs=cfg.tune.asha_grace_epochs,
                 on_done=done, on_failed=failed, on_progress=progress, on_retry=retry,
                 max_steps_per_epoch=max_steps)
    finished = [b.name for b in branches if b.arm == "onecycle" and b.name in manifest.snapshots]
    require_some(finished, k, failures)
    chosen = max(finished, key=lambda n: manifest.snapshots[n]["val_acc"])
    fixed = f"iter{k}_fixed" if f"iter{k}_fixed" in manifest.snapshots else None
    if cfg.fixed_lr.enabled and fixed is None:
        raise RunError(f"iteration {k}: the fixed-LR comparison arm failed ({failures.get(f'iter{k}_fixed')})")
    manifest.finish_stage(stage, chosen=chosen, fixed=fixed, failed=failures)
    console.print(f"  parent of the next iteration: {chosen} "
                  f"(val acc {100 * manifest.snapshots[chosen]['val_acc']:.2f}%)")
    return chosen, fixed or fixed_parent


def _evaluate_remote(paths: list[str], loader: dict, gpus: float) -> dict:
    """Ray task: the ensemble of `paths` on the validation split (members' predictions included)."""
    import torch

    from kesi_dist.data.loaders import make_loader
    from kesi_dist.distill import evaluate_ensemble, load_teachers

    device = "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"
    val = make_loader(loader["data_dir"], "val", batch_size=loader["batch_size"], resolution=loader["resolution"],
                      augment=loader["augment"], backend=loader["backend"], num_workers=loader["num_workers"],
                      device=device)
    out = evaluate_ensemble(load_teachers(paths, device=device), val, device=device)
    return {"acc": float(out["acc"]), "member_acc": [float(a) for a in out["member_acc"]],
            "predictions": out["predictions"].cpu()}


def _evaluate_ensemble(paths: list[str], loader: LoaderSpec, engine: EngineSpec) -> dict:
    import ray

    task = ray.remote(_evaluate_remote).options(num_cpus=engine.cpus_per_worker, num_gpus=engine.gpus_per_worker)
    return ray.get(task.remote(paths, vars(loader), engine.gpus_per_worker))


def _stage_ensemble(cfg: Config, run: RunDir, manifest: Manifest, chain: list[str], loader: LoaderSpec,
                    engine: EngineSpec) -> list[str]:
    from kesi_dist.distill import select_teachers

    if manifest.is_complete("ensemble"):
        return manifest.stages["ensemble"]["teachers"]
    manifest.start_stage("ensemble")
    d = cfg.distill
    candidates = {n: s["val_acc"] for n, s in manifest.snapshots.items() if s.get("arm") in ("baseline", "onecycle")}
    predictions = None
    if d.teachers == "diverse":
        names = list(candidates)
        preds = _evaluate_ensemble([str(run.snapshot(n)) for n in names], loader, engine)["predictions"]
        predictions = dict(zip(names, preds))
    teachers = select_teachers(d.teachers, chain=chain, candidates=candidates, k=d.num_teachers,
                               predictions=predictions)
    ens = _evaluate_ensemble([str(run.snapshot(n)) for n in teachers], loader, engine)
    best = max(teachers, key=lambda n: candidates[n])
    console.print(f"[bold]ensemble[/] ({d.teachers}): {len(teachers)} teachers {', '.join(teachers)}: "
                  f"val acc {100 * ens['acc']:.2f}% (best member {best} {100 * candidates[best]:.2f}%)")
    manifest.finish_stage("ensemble", teachers=teachers, acc=ens["acc"],
                          member_acc=dict(zip(teachers, ens["member_acc"])))
    return teachers


def _stage_distill(cfg: Config, run: RunDir, manifest: Manifest, student: str, teachers: list[str], data_dir: str,
                   loader: LoaderSpec, engine: EngineSpec, max_steps: int | None) -> None:
    from kesi_dist.pipeline.ray_train import run_training

    if manifest.is_complete("distill"):
        console.print("[bold]distill[/]: complete, reused")
        return
    d = cfg.distill
    paths = [str(run.snapshot(n)) for n in teachers]
    kd = {"mode": d.mode, "temperature": d.temperature, "alpha": d.alpha}
    if d.mode == "cached":
        kd["cache_dir"] = run.path("soft_labels")
        if not manifest.is_complete("soft_labels"):
            from kesi_dist.distill import build_soft_label_cache

            manifest.start_stage("soft_labels")
            console.print(f"[bold]soft_labels[/]: {len(teachers)} teachers x {d.epochs} epochs on "
                          f"{d.cache_actors} actor(s), top-{d.cache_topk}")
            meta = build_soft_label_cache(
                paths, str(data_dir), kd["cache_dir"], epochs=d.epochs, seed=cfg.seed, batch_size=loader.batch_size,
                resolution=loader.resolution, augment=loader.augment, temperature=d.temperature, topk=d.cache_topk,
                num_actors=d.cache_actors, backend=loader.backend, cpus_per_actor=engine.cpus_per_worker,
                gpus_per_actor=engine.gpus_per_worker)
            manifest.finish_stage("soft_labels", reused=bool(meta.get("reused")), actors=d.cache_actors)
    else:
        kd["teachers"] = paths
    manifest.start_stage("distill", student=student, teachers=teachers, mode=d.mode)
    start = time.time()
    console.print(f"[bold]distill[/] ({d.mode}): {student} learns from {len(teachers)} teachers for {d.epochs} "
                  f"epochs, T={d.temperature:g}, alpha={d.alpha:g}")
    result = run_training(
        model=ModelSpec(arch="", init_checkpoint=str(run.snapshot(student))), schedule=schedule_from(d),
        loader=loader, engine=engine, storage_path=str(run.train), name="distill", seed=cfg.seed, resume=True,
        final_checkpoint=str(run.snapshot("student")), tensorboard_dir=run.path("tensorboard", "distill"),
        max_steps_per_epoch=max_steps, kd=kd,
    )
    entry = _register(manifest, run, "student", cfg.data.resolution, arm="student", iteration=cfg.prune.iterations,
                      branch=None, parent=student, hparams={"teachers": teachers, "mode": d.mode},
                      val_acc=result.metrics["val/acc"], node_id=result.metrics.get("node_id"), start=start,
                      end=time.time(), attempts=result.attempts)
    if result.attempts > 1:
        manifest.log("distill retried", attempts=result.attempts)
    console.print(f"  student: val acc {100 * entry['val_acc']:.2f}%, {_fmt_size(entry)}")
    manifest.finish_stage("distill")


def _stage_report(cfg: Config, run: RunDir, manifest: Manifest) -> None:
    from kesi_dist.model_card import write_model_card
    from kesi_dist.report import write_report

    title = f"{cfg.model.arch} · {cfg.prune.method} x{cfg.prune.iterations} · {cfg.data.source}"
    report = write_report(run.root, manifest.data, title)
    write_model_card(run.root, manifest.data, report, run.config)
    rows = [("baseline", "baseline"), ("fixed LR", "fixed_lr"), ("one-cycle", "one_cycle"),
            ("ensemble", "ensemble"), ("KESI student", "student")]
    base = report["baseline"]
    for label, key in rows:
        r = report.get(key)
        if r:
            red = "" if key == "ensemble" else f", {100 * (1 - r['macs'] / base['macs']):.1f}% fewer MACs"
            console.print(f"  {label:>13}: {100 * r['val_acc']:.2f}%  ({r['params'] / 1e6:.3f} M params{red})")
