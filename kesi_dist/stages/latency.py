"""The latency stage: the student's predicted and measured latency next to the baseline's, for a run
pruned against a latency budget (the budget's table: its batch and threads, onnxruntime)."""

from __future__ import annotations

from kesi_dist.checkpoint import load_checkpoint, model_from_checkpoint
from kesi_dist.latency import measure
from kesi_dist.latency_table import cpu_model, load_table, predict, threads_text
from kesi_dist.runs import RunContext

__all__ = ["latency_stage"]


def latency_stage(ctx: RunContext, *, table_path: str, snapshots: list[str], resolution: int) -> dict:
    """{"batch", "threads", "table", "cpu", "rows": {snapshot: {"predicted_ms", "measured_ms"}}}, recorded
    once. Measured here, in the driver, on the machine that runs it: where the table was profiled is what
    the prediction is for (`cpu` says which), so compare the ratios when the two differ."""
    with ctx.stage("latency") as st:
        if st.done:
            return st.record
        table = load_table(table_path)
        key = table["key"]
        models = [model_from_checkpoint(load_checkpoint(ctx.snapshot(n)))[0] for n in snapshots]
        measured = measure(models, resolution, batch=key["batch"], threads=key["threads"])
        rows = {}
        for name, model, ms in zip(snapshots, models, measured):
            rows[name] = {"predicted_ms": round(predict(table, list(model.widths)), 3), "measured_ms": round(ms, 3)}
            ctx.print(f"  latency of {name} (onnxruntime, batch {key['batch']}, {threads_text(key['threads'])}): predicted "
                      f"{rows[name]['predicted_ms']:.2f} ms, measured {rows[name]['measured_ms']:.2f} ms")
        info = {"batch": key["batch"], "threads": key["threads"], "table": table_path, "table_cpu": key["cpu"],
                "cpu": cpu_model(), "rows": rows}
        st.update(**info)
        return info
