"""The distillation stage: a student snapshot learns from teachers on a Ray Train worker group.

The task says where the teachers' targets come from (`DistillationSpec`: the frozen teachers run on every
worker's shard of each batch, or a soft-label cache read by (epoch, sample index)); teachers are never
wrapped, only the student is distributed. The result is registered under `name` ("student").
"""

from __future__ import annotations

import time

from kesi_dist.runs import RunContext, fmt_acc, fmt_size
from kesi_dist.runtime import run_training
from kesi_dist.train.spec import EngineSpec, LoaderSpec, ModelSpec, ScheduleSpec
from kesi_dist.train.task_specs import DistillationSpec

__all__ = ["distill_stage"]


def distill_stage(ctx: RunContext, *, student: str, teachers: list[str], task: DistillationSpec, schedule: ScheduleSpec,
                  loader: LoaderSpec, engine: EngineSpec, seed: int, iteration: int, name: str = "student") -> dict:
    """Distil snapshot `student` with `task` into snapshot `name`; returns its registry entry."""
    with ctx.stage("distill", student=student, teachers=teachers, mode=task.source) as st:
        if st.done:
            return ctx.manifest.snapshots[name]
        start = time.time()
        ctx.print(f"[bold]distill[/] ({task.source}): {student} learns from {len(teachers)} teachers for "
                  f"{schedule.epochs} epochs, T={task.temperature:g}, alpha={task.alpha:g}")
        result = run_training(
            model=ModelSpec(arch="", init_checkpoint=ctx.snapshot(student)), schedule=schedule, loader=loader,
            engine=engine, storage_path=ctx.run.train, name="distill", seed=seed, resume=True,
            final_checkpoint=ctx.snapshot(name), tensorboard_dir=ctx.run.path("tensorboard", "distill"),
            progress_file=ctx.progress_file(name),
            max_steps_per_epoch=ctx.max_steps, task=task,
        )
        entry = ctx.register(name, arm="student", iteration=iteration, branch=None, parent=student,
                             hparams={"teachers": teachers, "mode": task.source}, val_acc=result.metrics["val/acc"],
                             holdout_acc=result.metrics.get("holdout/acc"),
                             node_id=result.metrics.get("node_id"), start=start, end=time.time(),
                             attempts=result.attempts, resumed_at=result.resumed_at,
                             workers=result.metrics.get("world_size", 1))
        if result.attempts > 1:
            ctx.manifest.log("distill retried", attempts=result.attempts)
        ctx.print(f"  {name}: {fmt_acc(entry)}, {fmt_size(entry)}")
    return entry
