"""The quantize stage (`quantize.enabled`): the run's deliverable as an int8 ONNX model, calibrated on
held-out images, scored on the test split and timed against the fp32 model in onnxruntime."""

from __future__ import annotations

import hashlib
import json

from kesi_dist import storage
from kesi_dist.runs import RunContext
from kesi_dist.train.spec import LoaderSpec

__all__ = ["quantize_stage", "int8_file"]


def int8_file(snapshot: str) -> str:
    """The int8 model's path in the run folder, relative to its root."""
    return f"int8/{snapshot}.int8.onnx"


def quantize_stage(ctx: RunContext, snapshot: str, *, loader: LoaderSpec, images: int, calibration: str) -> dict:
    """Quantize snapshot `snapshot` (`kesi_dist.quantize`) into `<run>/int8/<snapshot>.int8.onnx`, once.

    Records {"snapshot", "file", "fp32_acc", "int8_acc", "test_images", "bytes": {fp32, int8}, "calibration":
    {split, images, method, sha256 of the positions served}, "latency": {batch, threads, cpu, fp32_ms,
    int8_ms}}. The latency is measured here, interleaved, at the latency stage's batch and threads when
    the run has one (else batch 64, 2 threads), like the latency stage on the machine that runs the driver.
    """
    from kesi_dist.latency_table import cpu_model, threads_text
    from kesi_dist.quantize import DEFAULT_BATCH, DEFAULT_THREADS, quantize_snapshot, time_onnx

    with ctx.stage("quantize", snapshot=snapshot) as st:
        if st.done:
            return st.record
        q = quantize_snapshot(ctx.snapshot(snapshot), data_dir=loader.data_dir, holdout=loader.holdout,
                              seed=loader.holdout_seed, resolution=loader.resolution, augment=loader.augment,
                              images=images, calibration=calibration)
        rel = int8_file(snapshot)
        storage.write_bytes(ctx.run.path(*rel.split("/")), q["int8"])
        lat = ctx.manifest.stages.get("latency", {})
        done = lat.get("status") == "complete"
        batch, threads = (lat["batch"], lat["threads"]) if done else (DEFAULT_BATCH, DEFAULT_THREADS)
        fp32_ms, int8_ms = time_onnx([q["fp32"], q["int8"]], loader.resolution, batch=batch, threads=threads)
        cal = q["calibration"]
        info = {
            "snapshot": snapshot, "file": rel, "fp32_acc": q["fp32_acc"], "int8_acc": q["int8_acc"],
            "test_images": q["test_images"], "bytes": {"fp32": len(q["fp32"]), "int8": len(q["int8"])},
            "calibration": {"split": cal["split"], "images": cal["images"], "method": cal["method"],
                            "sha256": hashlib.sha256(json.dumps(cal["positions"]).encode()).hexdigest()},
            "latency": {"batch": batch, "threads": threads, "cpu": cpu_model(), "fp32_ms": round(fp32_ms, 3),
                        "int8_ms": round(int8_ms, 3)},
        }
        st.update(**info)
        ctx.print(f"[bold]quantize[/]: {snapshot} -> {rel}, calibrated on {cal['images']} held-out images: test top-1 "
                  f"{100 * q['int8_acc']:.2f}% int8 vs {100 * q['fp32_acc']:.2f}% fp32; onnxruntime batch {batch}, "
                  f"{threads_text(threads)}: {int8_ms:.2f} ms int8 vs {fp32_ms:.2f} ms fp32")
        return info
