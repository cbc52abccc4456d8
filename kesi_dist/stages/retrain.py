"""Train a set of branches as parallel Ray Tune trials and register each snapshot as it finishes.

A step inside a method's stage (KESI's prune_k, EKG's fine-tuning arms): the method builds the
`Branch` specs (arms, hyper-parameters, its own `meta` such as iteration and parent), this registers
every finished branch with `meta`, prints one line per epoch, retry and failure, and returns the
failures; choosing among the branches is the method's.
"""

from __future__ import annotations

from kesi_dist.runs import RunContext, fmt_acc
from kesi_dist.runtime.branches import Branch
from kesi_dist.train.spec import EngineSpec, LoaderSpec

__all__ = ["retrain", "Branch"]


def retrain(ctx: RunContext, stage: str, branches: list[Branch], *, loader: LoaderSpec, engine: EngineSpec,
            seed: int, asha: bool = False, asha_grace_epochs: int = 1) -> dict[str, str]:
    """Run the branches not yet registered; returns {branch name: why it failed} for those that did not
    finish (diverged, stopped early by ASHA, lost more often than `engine.max_failures`)."""
    from kesi_dist.runtime import run_branches

    failures: dict[str, str] = {}

    def done(b: Branch, result: dict) -> None:
        entry = ctx.register(b.name, arm=b.arm, **b.meta, hparams=b.hparams, val_acc=result["val/acc"],
                             holdout_acc=result.get("holdout/acc"), node_id=result.get("node_id"),
                             start=result.get("start"), end=result.get("end"), attempts=result.get("attempts"),
                             resumed_at=result.get("resumed_at"),
                             workers=result.get("world_size"), train_start=result.get("train_start"),
                             train_end=result.get("train_end"))
        ctx.print(f"  [green]{b.name}[/] done: {fmt_acc(entry)} ({', '.join(f'{k}={v}' for k, v in b.hparams.items())})")

    def failed(b: Branch, why: str) -> None:
        failures[b.name] = why
        ctx.manifest.log(f"branch {b.name} failed", error=why)
        ctx.print(f"  [red]{b.name} failed[/]: {why}")

    def progress(b: Branch, result: dict) -> None:
        if "epoch" in result:
            what = "holdout acc" if loader.holdout else "val acc"
            ctx.print(f"  {b.name} epoch {result['epoch']}/{b.schedule['epochs']}  "
                      f"{what} {100 * result['select/acc']:.1f}%  loss {result['train/loss']:.4f}")

    def retry(b: Branch, why: str, attempt: int) -> None:
        ctx.manifest.log(f"branch {b.name} retried", attempt=attempt, error=why)
        ctx.print(f"  [yellow]{b.name} lost[/] ({why}); restarting from its last epoch checkpoint "
                  f"(attempt {attempt})")

    todo = [b for b in branches if b.name not in ctx.manifest.snapshots]
    run_branches(todo, loader=loader, engine=engine, storage=ctx.run.path("train", stage),
                 tensorboard=ctx.run.path("tensorboard", stage), experiment="tune", seed=seed, asha=asha,
                 asha_grace_epochs=asha_grace_epochs, on_done=done, on_failed=failed, on_progress=progress,
                 on_retry=retry, max_steps_per_epoch=ctx.max_steps, progress=ctx.run.path("progress"))
    return failures
