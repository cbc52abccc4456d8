"""The `kesi train` stage: train the baseline of a config and write `<output>/baseline.pt`.

Reads top to bottom: resolve the output folder, make sure the data is prepared, connect Ray (unless
`train.num_workers` is 0), run the baseline schedule on the `train` placement, export the final
model in the kesi_dist checkpoint format. `resume=True` continues from the last epoch checkpoint in
`<output>/train/baseline` (or `cluster.storage`).

Layout written:
    <output>/config.yaml            the resolved config
    <output>/data/                  prepared data (unless data.prepared or source "prepared")
    <output>/train/baseline/        Ray Train run folder: per-epoch checkpoints (last 2 kept)
    <output>/tensorboard/baseline/  scalars per epoch
    <output>/baseline.pt            the trained baseline (written last)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kesi_dist.config import Config, config_to_yaml
from kesi_dist.errors import UsageError
from kesi_dist.pipeline.ray_train import TrainResult, run_training
from kesi_dist.train.spec import ModelSpec, schedule_from

__all__ = ["train_baseline"]


def train_baseline(cfg: Config, output: str | Path, *, resume: bool = False, progress: bool = True) -> TrainResult | None:
    """Train `cfg.model` with `cfg.baseline` on `cfg.data` and write `<output>/baseline.pt`.

    Returns the run's result, or None when nothing was trained: `baseline.checkpoint` names an
    existing baseline (validated and copied), or `resume` finds `<output>/baseline.pt` complete.

    Raises:
        UsageError: `<output>/baseline.pt` exists and `resume` is False; output is not a local folder.
    """
    from kesi_dist.checkpoint import load_checkpoint
    from kesi_dist.pipeline.manifest import atomic_write_text

    if "://" in str(output):
        raise UsageError(f"--output {output}: kesi train writes to a local folder; put checkpoints on shared "
                         "storage with cluster.storage")
    output = Path(output).absolute()
    final = output / "baseline.pt"
    if final.exists():
        if not resume:
            raise UsageError(f"{final} already exists: pass --resume to keep it, or choose another --output")
        load_checkpoint(final)  # a finished baseline: validate it, nothing left to do
        return None
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output / "config.yaml", config_to_yaml(cfg))
    if cfg.baseline.checkpoint:
        load_checkpoint(cfg.baseline.checkpoint)  # validates (RunError names the file)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        shutil.copyfile(cfg.baseline.checkpoint, tmp)
        os.replace(tmp, final)
        return None

    from kesi_dist.cluster import connect_ray
    from kesi_dist.pipeline.run import engine_spec, loader_spec, prepare_data

    data_dir, meta = prepare_data(cfg, output / "data")
    num_classes = cfg.model.num_classes or int(meta["num_classes"])
    engine = engine_spec(cfg)
    if engine.num_workers > 0:
        connect_ray(cfg.cluster.address)
    return run_training(
        model=ModelSpec(cfg.model.arch, num_classes=num_classes),
        schedule=schedule_from(cfg.baseline),
        loader=loader_spec(cfg, data_dir),
        engine=engine,
        storage_path=f"{cfg.cluster.storage.rstrip('/')}/{output.name}/train" if cfg.cluster.storage
        else str(output / "train"),
        name="baseline",
        seed=cfg.seed,
        resume=resume,
        final_checkpoint=str(final),
        tensorboard_dir=str(output / "tensorboard" / "baseline"),
        progress=progress,
    )
