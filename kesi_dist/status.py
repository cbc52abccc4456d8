"""`kesi status RUN`: where a run is, from its folder alone (a local path or a storage URI).

Reads `manifest.json` (stages, registered snapshots; a method's own stages, such as a search's recorded
steps or generations, are described by the method: `status_detail` in its report module),
`config.yaml`, `progress/<snapshot>.json` (rewritten by every training run after each epoch: epoch,
last metrics, node, epoch end times), `lease.json` (the driver running it) and, once the run is
complete, `report.json`. Works while the run is in progress (from any machine that can read the
folder) and after it ended; it never writes. Every field is checked before it is used: a manifest or
config.yaml with a missing or mistyped field is one line naming the file and the field; a progress
file or report.json that is not what it should be is skipped with a warning line.
"""

from __future__ import annotations

import json
import statistics
import time

import yaml

from kesi_dist import storage
from kesi_dist.errors import RunError, UsageError
from kesi_dist.fields import FieldError, get_field
from kesi_dist.methods import METHODS
from kesi_dist.runs.lease import LEASE, describe_holder, read_lease
from kesi_dist.runs.manifest import Manifest

__all__ = ["run_status", "format_status"]


def _read_json(path: str):
    try:
        return json.loads(storage.read_text(path))
    except (FileNotFoundError, ValueError, OSError):
        return None


def _config(run: str) -> dict:
    path = storage.join(run, "config.yaml")
    if not storage.is_file(path):
        return {}
    try:
        cfg = yaml.safe_load(storage.read_text(path))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RunError(f"{path}: not readable YAML ({type(e).__name__}); the run folder is damaged") from None
    cfg = {} if cfg is None else cfg
    if not isinstance(cfg, dict):
        raise RunError(f"{path}: a {type(cfg).__name__} at the top level, expected a mapping of sections; the run "
                       "folder is damaged")
    try:
        for section in ("method", "model"):
            get_field(cfg, section, dict, "", required=False)
        get_field(cfg.get("method") or {}, "name", str, "method", required=False)
        get_field(cfg.get("model") or {}, "arch", str, "model", required=False)
    except FieldError as e:
        raise RunError(f"{path}: {e}; the run folder is damaged") from None
    return cfg


def _detail_of(method: str):
    """The method's status line for one of its own stages (`status_detail` of its report module), if any."""
    m = METHODS.get(method)
    return getattr(m.module("report"), "status_detail", None) if m else None


def _stages(m: dict, cfg: dict, now: float) -> list[dict]:
    rows, detail_of = [], _detail_of((cfg.get("method") or {}).get("name", "kesi"))
    for name, st in get_field(m, "stages", dict, "").items():
        where = f"stages.{name}"
        status = get_field(st, "status", str, where)
        start = get_field(st, "start", float, where)
        end = get_field(st, "end", float, where, required=False)
        attempts = get_field(st, "attempts", int, where, required=False) or 1
        row = {"stage": name, "status": status, "attempts": attempts,
               "seconds": round((end if status != "running" and end is not None else now) - start, 1)}
        detail = detail_of(name, st, cfg) if detail_of else None
        if detail:
            row["detail"] = detail
        elif status == "failed" and st.get("error"):  # a completed stage's earlier failure is history
            row["detail"] = str(st["error"])
        elif status == "interrupted":
            row["detail"] = f"interrupted by {st.get('interrupted') or 'a signal'}; `kesi run ... --resume` redoes it"
        rows.append(row)
    return rows


def _training(run: str, snaps: dict, now: float, problems: list[str]) -> list[dict]:
    folder = storage.join(run, "progress")
    names = sorted(n for n in storage.listdir(folder) if n.endswith(".json")) if storage.is_dir(folder) else []
    out = []
    for file in names:
        path, snapshot = storage.join(folder, file), file.removesuffix(".json")
        p = _read_json(path)
        if p is None or snapshot in snaps:  # mid-write or gone; or its snapshot is registered: finished
            continue
        try:
            epoch, epochs = get_field(p, "epoch", int, ""), get_field(p, "epochs", int, "")
            metrics = get_field(p, "metrics", dict, "")
            updated = get_field(p, "updated", float, "")
            times = [get_field({"t": t}, "t", float, "epoch_times[]") for t in get_field(p, "epoch_times", list, "", False) or []]
            per_epoch = statistics.median([b - a for a, b in zip(times, times[1:])]) if len(times) > 1 else \
                get_field(metrics, "epoch_s", float, "metrics", required=False)
            accs = {k: get_field(metrics, k, float, "metrics", required=False) for k in ("holdout/acc", "val/acc")}
            node = get_field(metrics, "node_id", str, "metrics", required=False)
            attempts = get_field(p, "attempts", int, "", required=False)
        except FieldError as e:
            problems.append(f"{path}: {e}; skipped")
            continue
        out.append({"name": snapshot, "epoch": epoch, "epochs": epochs, "holdout_acc": accs["holdout/acc"],
                    "val_acc": accs["val/acc"], "node_id": node, "attempts": attempts,
                    "eta_s": round((epochs - epoch) * per_epoch, 1) if per_epoch is not None else None,
                    "updated_s_ago": round(now - updated, 1)})
    return out


def _report_rows(run: str, problems: list[str]) -> list[dict]:
    rows = []
    report = _read_json(storage.join(run, "report.json"))
    for key, value in (report if isinstance(report, dict) else {}).items():
        if isinstance(value, dict) and "val_acc" in value and "macs" in value:
            try:
                rows.append({"row": key, "val_acc": get_field(value, "val_acc", float, key),
                             "holdout_acc": get_field(value, "holdout_acc", float, key, required=False),
                             "macs": get_field(value, "macs", float, key),
                             "params": get_field(value, "params", float, key, required=False)})
            except FieldError as e:
                problems.append(f"{storage.join(run, 'report.json')}: {e}; row skipped")
    return rows


def run_status(run: str) -> dict:
    """{run, method, arch, status, created, updated, driver, stages: [...], training: [...], report_rows:
    [...], problems: [...]}; RunError naming the file and field when the manifest or config is damaged."""
    run = run if storage.is_uri(run) else str(run)
    mpath = storage.join(run, "manifest.json")
    if not storage.is_file(mpath):
        raise UsageError(f"{run}: no manifest.json; give a run folder (the --output of `kesi run`)")
    m = Manifest.load(mpath).data
    cfg = _config(run)
    now, problems = time.time(), []
    try:
        snaps = get_field(m, "snapshots", dict, "")
        stages = _stages(m, cfg, now)
        status = get_field(m, "status", str, "")
        created = get_field(m, "created", float, "", required=False)
        events = get_field(m, "events", list, "", required=False) or []
        updated = get_field({"events[-1]": events[-1]}, "events[-1]", dict, "") if events else None
        updated = get_field(updated, "t", float, "events[-1]") if updated else None
    except FieldError as e:
        raise RunError(f"{mpath}: {e}; the run folder is damaged") from None
    held = read_lease(storage.join(run, LEASE))
    return {"run": run, "method": (cfg.get("method") or {}).get("name", "kesi"),
            "arch": (cfg.get("model") or {}).get("arch"), "status": status, "created": created, "updated": updated,
            "driver": describe_holder(held) if held else None, "snapshots": len(snaps), "stages": stages,
            "training": _training(run, snaps, now, problems),
            "report_rows": _report_rows(run, problems) if status == "complete" else [], "problems": problems}


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min" if seconds < 5400 else \
        f"{seconds / 3600:.1f} h"


def format_status(s: dict) -> str:
    now = time.time()
    lines = [f"{s['run']}  ·  {s['method']}  ·  {s['arch']}  ·  {s['status']}"
             + (f" (started {_ago(now - s['created'])} ago" if s.get("created") else "")
             + (f", last event {_ago(now - s['updated'])} ago)" if s.get("updated") else ")"),
             f"snapshots registered: {s['snapshots']}"]
    if s.get("driver"):
        lines.append(f"driver: {s['driver']}")
    lines += ["", "stages:"]
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
    lines += [f"warning: {p}" for p in s.get("problems", [])]
    return "\n".join(lines)
