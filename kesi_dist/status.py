"""`kesi status RUN`: where a run is, from its folder alone (a local path or a storage URI).

Reads `manifest.json` (stages, registered snapshots, a search's recorded steps or generations),
`config.yaml`, `progress/<snapshot>.json` (rewritten by every training run after each epoch: epoch,
last metrics, node, epoch end times) and, once the run is complete, `report.json`. Works while the run is in
progress (from any machine that can read the folder) and after it ended; it never writes.
"""

from __future__ import annotations

import json
import statistics
import time

import yaml

from kesi_dist import storage
from kesi_dist.errors import UsageError

__all__ = ["run_status", "format_status"]


def _read_json(path: str) -> dict | None:
    try:
        return json.loads(storage.read_text(path))
    except (FileNotFoundError, ValueError, OSError):
        return None


def run_status(run: str) -> dict:
    """{run, method, arch, status, created, updated, stages: [...], training: [...], report_rows: [...]}."""
    from kesi_dist.runs.manifest import Manifest

    run = run if storage.is_uri(run) else str(run)
    if not storage.is_file(storage.join(run, "manifest.json")):
        raise UsageError(f"{run}: no manifest.json; give a run folder (the --output of `kesi run`)")
    m = Manifest.load(storage.join(run, "manifest.json")).data
    cfg = {}
    if storage.is_file(storage.join(run, "config.yaml")):
        cfg = yaml.safe_load(storage.read_text(storage.join(run, "config.yaml"))) or {}
    method = (cfg.get("method") or {}).get("name", "kesi")
    snaps = m["snapshots"]
    now = time.time()
    stages = []
    for name, st in m["stages"].items():
        row = {"stage": name, "status": st.get("status"), "attempts": st.get("attempts", 1),
               "seconds": round((st.get("end") if st.get("status") != "running" else now) - st["start"], 1)}
        if name == "search" and st.get("steps"):  # EKG: accepted steps so far
            last = st["steps"][-1]
            row["detail"] = (f"{len(st['steps'])} steps, MACs {100 * last['macs_ratio']:.1f}% (target "
                             f"{100 * st.get('target_macs_ratio', 0):.0f}%)")
        elif name == "search" and st.get("generations"):  # SWP: generations so far
            g = st["generations"][-1]
            total = ((cfg.get("method") or {}).get("search") or {}).get("generations")
            row["detail"] = (f"generation {g['generation']}" + (f"/{total}" if total else "")
                             + f", best proxy {100 * g['best']:.2f}%")
        elif st.get("error"):
            row["detail"] = st["error"]
        stages.append(row)
    training = []
    folder = storage.join(run, "progress")
    names = sorted(n for n in storage.listdir(folder) if n.endswith(".json")) if storage.is_dir(folder) else []
    for file in names:
        p, snapshot = _read_json(storage.join(folder, file)), file.removesuffix(".json")
        if not p or snapshot in snaps:  # its snapshot is registered: finished
            continue
        times = p.get("epoch_times") or []
        per_epoch = statistics.median([b - a for a, b in zip(times, times[1:])]) if len(times) > 1 else \
            p["metrics"].get("epoch_s")
        left = p["epochs"] - p["epoch"]
        training.append({"name": snapshot, "epoch": p["epoch"], "epochs": p["epochs"],
                         "holdout_acc": p["metrics"].get("holdout/acc"), "val_acc": p["metrics"].get("val/acc"),
                         "node_id": p["metrics"].get("node_id"), "attempts": p.get("attempts"),
                         "eta_s": round(left * per_epoch, 1) if per_epoch is not None else None,
                         "updated_s_ago": round(now - p["updated"], 1)})
    rows = []
    report = _read_json(storage.join(run, "report.json")) if m.get("status") == "complete" else None
    for key, value in (report or {}).items():
        if isinstance(value, dict) and "val_acc" in value and "macs" in value:
            rows.append({"row": key, "val_acc": value["val_acc"], "holdout_acc": value.get("holdout_acc"),
                         "macs": value["macs"], "params": value.get("params")})
    return {"run": run, "method": method, "arch": (cfg.get("model") or {}).get("arch"), "status": m.get("status"),
            "created": m.get("created"), "updated": m["events"][-1]["t"] if m.get("events") else None,
            "snapshots": len(snaps), "stages": stages, "training": training, "report_rows": rows}


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min" if seconds < 5400 else \
        f"{seconds / 3600:.1f} h"


def format_status(s: dict) -> str:
    now = time.time()
    lines = [f"{s['run']}  ·  {s['method']}  ·  {s['arch']}  ·  {s['status']}"
             + (f" (started {_ago(now - s['created'])} ago" if s.get("created") else "")
             + (f", last event {_ago(now - s['updated'])} ago)" if s.get("updated") else ")"),
             f"snapshots registered: {s['snapshots']}", "", "stages:"]
    width = max([len(r["stage"]) for r in s["stages"]] + [5])
    for r in s["stages"]:
        extra = f"  attempt {r['attempts']}" if r["attempts"] > 1 else ""
        lines.append(f"  {r['stage']:<{width}}  {r['status']:<8}  {r['seconds']:>7.1f} s{extra}"
                     + (f"  {r['detail']}" if r.get("detail") else ""))
    if s["training"]:
        lines += ["", "training now (or when the run stopped):"]
        for t in s["training"]:
            acc = t["holdout_acc"] if t["holdout_acc"] is not None else t["val_acc"]
            lines.append(f"  {t['name']}  epoch {t['epoch']}/{t['epochs']}"
                         + (f"  {'holdout' if t['holdout_acc'] is not None else 'val'} acc {100 * acc:.1f}%"
                            if acc is not None else "")
                         + (f"  node {t['node_id'][:12]}" if t.get("node_id") else "")
                         + (f"  ETA {_ago(t['eta_s'])}" if t.get("eta_s") is not None and t["epoch"] < t["epochs"]
                            else "")
                         + f"  (updated {_ago(t['updated_s_ago'])} ago)")
    if s["report_rows"]:
        lines += ["", "result (test top-1):"]
        for r in s["report_rows"]:
            lines.append(f"  {r['row']:<12} {100 * r['val_acc']:.2f}%  {r['macs'] / 1e6:.2f} M MACs")
    return "\n".join(lines)
