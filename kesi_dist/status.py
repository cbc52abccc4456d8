"""`kesi status RUN`: where a run is, from its folder alone (a local path or a storage URI).

Reads `manifest.json` (stages, registered snapshots, a search's recorded steps or generations),
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

__all__ = ["run_status", "format_status"]


class _Bad(Exception):
    """Field `field` of a file is missing or has the wrong type."""

    def __init__(self, field: str, what: str):
        super().__init__(f"{field}: {what}")


def _get(obj, key: str, kind, where: str, required: bool = True):
    """obj[key] checked to be `kind` (a number is int or float, never bool); None when optional and absent."""
    field = f"{where}.{key}" if where else key
    if not isinstance(obj, dict):
        raise _Bad(where or "(top level)", f"a {type(obj).__name__}, expected a mapping")
    value = obj.get(key)
    if value is None:
        if required:
            raise _Bad(field, "missing")
        return None
    kinds = (int, float) if kind is float else kind
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kinds):
        name = {dict: "mapping", list: "list", str: "string", int: "whole number", float: "number"}[kind]
        raise _Bad(field, f"{value!r} is a {type(value).__name__}, expected a {name}")
    return value


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
            _get(cfg, section, dict, "", required=False)
        _get(cfg.get("method") or {}, "name", str, "method", required=False)
        _get(cfg.get("model") or {}, "arch", str, "model", required=False)
        _get(cfg.get("method") or {}, "search", dict, "method", required=False)
        _get((cfg.get("method") or {}).get("search") or {}, "generations", int, "method.search", required=False)
    except _Bad as e:
        raise RunError(f"{path}: {e}; the run folder is damaged") from None
    return cfg


def _search_detail(st: dict, cfg: dict) -> str | None:
    """A search stage's progress: EKG's accepted steps, SWP's generations (None when neither)."""
    steps = _get(st, "steps", list, "stages.search", required=False)
    if steps:
        last = _get({"steps[-1]": steps[-1]}, "steps[-1]", dict, "stages.search")
        macs = _get(last, "macs_ratio", float, "stages.search.steps[-1]")
        budget = _get(last, "budget_ratio", float, "stages.search.steps[-1]", required=False)
        lat = _get(st, "target_latency_ratio", float, "stages.search", required=False)
        macs_target = _get(st, "target_macs_ratio", float, "stages.search", required=False)
        if lat is not None:  # a latency budget: the predicted latency is what the search stops on
            return (f"{len(steps)} steps, MACs {100 * macs:.1f}%"
                    + (f", predicted latency {100 * budget:.1f}%" if budget is not None else "")
                    + f" (target {100 * lat:.0f}% of the latency)")
        return f"{len(steps)} steps, MACs {100 * macs:.1f}%" + (
            f" (target {100 * macs_target:.0f}%)" if macs_target is not None else "")
    gens = _get(st, "generations", list, "stages.search", required=False)
    if gens:
        g = _get({"generations[-1]": gens[-1]}, "generations[-1]", dict, "stages.search")
        total = ((cfg.get("method") or {}).get("search") or {}).get("generations")
        return (f"generation {_get(g, 'generation', int, 'stages.search.generations[-1]')}"
                + (f"/{total}" if total else "")
                + f", best proxy {100 * _get(g, 'best', float, 'stages.search.generations[-1]'):.2f}%")
    return None


def _stages(m: dict, cfg: dict, now: float) -> list[dict]:
    rows = []
    for name, st in _get(m, "stages", dict, "").items():
        where = f"stages.{name}"
        status = _get(st, "status", str, where)
        start = _get(st, "start", float, where)
        end = _get(st, "end", float, where, required=False)
        attempts = _get(st, "attempts", int, where, required=False) or 1
        row = {"stage": name, "status": status, "attempts": attempts,
               "seconds": round((end if status != "running" and end is not None else now) - start, 1)}
        detail = _search_detail(st, cfg) if name == "search" else None
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
            epoch, epochs = _get(p, "epoch", int, ""), _get(p, "epochs", int, "")
            metrics = _get(p, "metrics", dict, "")
            updated = _get(p, "updated", float, "")
            times = [_get({"t": t}, "t", float, "epoch_times[]") for t in _get(p, "epoch_times", list, "", False) or []]
            per_epoch = statistics.median([b - a for a, b in zip(times, times[1:])]) if len(times) > 1 else \
                _get(metrics, "epoch_s", float, "metrics", required=False)
            accs = {k: _get(metrics, k, float, "metrics", required=False) for k in ("holdout/acc", "val/acc")}
            node = _get(metrics, "node_id", str, "metrics", required=False)
            attempts = _get(p, "attempts", int, "", required=False)
        except _Bad as e:
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
                rows.append({"row": key, "val_acc": _get(value, "val_acc", float, key),
                             "holdout_acc": _get(value, "holdout_acc", float, key, required=False),
                             "macs": _get(value, "macs", float, key),
                             "params": _get(value, "params", float, key, required=False)})
            except _Bad as e:
                problems.append(f"{storage.join(run, 'report.json')}: {e}; row skipped")
    return rows


def run_status(run: str) -> dict:
    """{run, method, arch, status, created, updated, driver, stages: [...], training: [...], report_rows:
    [...], problems: [...]}; RunError naming the file and field when the manifest or config is damaged."""
    from kesi_dist.runs.lease import LEASE, describe_holder, read_lease
    from kesi_dist.runs.manifest import Manifest

    run = run if storage.is_uri(run) else str(run)
    mpath = storage.join(run, "manifest.json")
    if not storage.is_file(mpath):
        raise UsageError(f"{run}: no manifest.json; give a run folder (the --output of `kesi run`)")
    m = Manifest.load(mpath).data
    cfg = _config(run)
    now, problems = time.time(), []
    try:
        snaps = _get(m, "snapshots", dict, "")
        stages = _stages(m, cfg, now)
        status = _get(m, "status", str, "")
        created = _get(m, "created", float, "", required=False)
        events = _get(m, "events", list, "", required=False) or []
        updated = _get({"events[-1]": events[-1]}, "events[-1]", dict, "") if events else None
        updated = _get(updated, "t", float, "events[-1]") if updated else None
    except _Bad as e:
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
