"""The data stage: convert the run's data source once (or take a prepared folder) and record it."""

from __future__ import annotations

from kesi_dist.data.prepare import DataSpec, prepare_data
from kesi_dist.runs import RunContext

__all__ = ["data_stage"]


def data_stage(ctx: RunContext, spec: DataSpec) -> tuple[str, dict]:
    """(prepared folder, its meta); prepared into `<run>/data` unless the spec names a folder."""
    from kesi_dist.data.loaders import read_meta

    with ctx.stage("data") as st:
        if st.done:
            return st.record["path"], read_meta(st.record["path"])
        ctx.print(f"[bold]data[/]: {spec.source}" + (f" from {spec.root}" if spec.root else ""))
        data_dir, meta = prepare_data(spec, ctx.run.data)
        ctx.print(f"  {meta['train_size']} train / {meta['val_size']} val images, {meta['num_classes']} classes, "
                  f"{meta['resolution']} px -> {data_dir}")
        st.update(path=str(data_dir), num_classes=meta["num_classes"], train_size=meta["train_size"],
                  val_size=meta["val_size"])
    return data_dir, meta
