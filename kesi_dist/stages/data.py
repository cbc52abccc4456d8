"""The data stage: convert the run's data source once (or take a prepared folder) and record it, with
the held-out selection split carved from its training images (`kesi_dist.data.holdout`)."""

from __future__ import annotations

from kesi_dist.data.holdout import describe_holdout
from kesi_dist.data.loaders import read_meta
from kesi_dist.data.prepare import DataSpec, prepare_data
from kesi_dist.errors import BadValue, UsageError
from kesi_dist.runs import RunContext

__all__ = ["data_stage"]


def data_stage(ctx: RunContext, spec: DataSpec, *, holdout: float = 0, holdout_seed: int = 0) -> tuple[str, dict]:
    """(prepared folder, its meta); prepared into `<run>/data` unless the spec names a folder. The
    manifest records the holdout (`data.holdout`): size, per-class counts and its indices' sha256."""
    with ctx.stage("data") as st:
        if st.done:
            return st.record["path"], read_meta(st.record["path"])
        ctx.print(f"[bold]data[/]: {spec.source}" + (f" from {spec.root}" if spec.root else ""))
        data_dir, meta = prepare_data(spec, ctx.run.data)
        try:
            held = describe_holdout(data_dir, holdout, holdout_seed)
        except BadValue as e:
            raise UsageError(f"data.holdout: {e.what}") from None
        split = (f"{held['train_size']} train + {held['size']} held out for selection" if held["size"]
                 else f"{meta['train_size']} train (no holdout: selection uses the test split)")
        ctx.print(f"  {split} / {meta['val_size']} val images, {meta['num_classes']} classes, "
                  f"{meta['resolution']} px -> {data_dir}")
        st.update(path=str(data_dir), num_classes=meta["num_classes"], train_size=meta["train_size"],
                  val_size=meta["val_size"], holdout=held)
    return data_dir, meta
