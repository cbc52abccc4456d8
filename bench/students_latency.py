"""Accuracy at measured latency: the students (and baselines) of finished KESI runs timed side by side.

    .venv/bin/python bench/students_latency.py runs/qs_paper runs/qs_aligned --batch 64 --threads 1 --json

Each run's `student` and `baseline` snapshots are exported as `kesi export --format onnx` does and timed in
onnxruntime at `--batch` and `--threads`, every model of every run interleaved round by round (median of
`--repeats` after `--warmup`), so a load change hits them alike. Next to each time: the snapshot's test and
holdout top-1, params, MACs and widths from the run's report.json, and what the run's latency stage
predicted and measured during the run (when it had a budget).

Prints {"runs": [{"run", "round_to", "latency_ratio", "student": {...}, "baseline": {...}}], "batch",
"threads", "repeats", "cpu", "load_avg_1min_*"}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SNAPSHOTS = ("baseline", "student")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="finished run folders")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from kesi_dist.checkpoint import load_checkpoint, model_from_checkpoint
    from kesi_dist.config import load_config
    from kesi_dist.latency import measure
    from kesi_dist.latency_table import cpu_model

    load_start = os.getloadavg()[0]
    entries, models, resolution = [], [], None
    for run in map(Path, args.runs):
        report = json.loads((run / "report.json").read_text())
        cfg = load_config(run / "config.yaml")
        resolution = resolution or cfg.data.resolution
        if cfg.data.resolution != resolution:
            sys.exit(f"{run}: resolution {cfg.data.resolution}, the first run's is {resolution}; time like with like")
        if cfg.method.name != "kesi":
            sys.exit(f"{run}: a {cfg.method.name} run; this benchmark compares KESI runs (prune.round_to, prune.target)")
        prune = cfg.method.prune
        entry = {"run": str(run), "round_to": prune.round_to,
                 "latency_ratio": prune.target.latency_ratio if prune.target else None}
        rows = {s["name"]: s for s in report["snapshots"]}
        during = (report.get("latency") or {}).get("rows", {})
        for name in SNAPSHOTS:
            snap = rows[name]
            entry[name] = {"test_acc": round(100 * snap["val_acc"], 2), "holdout_acc": round(100 * snap["holdout_acc"], 2),
                           **{k: snap[k] for k in ("params", "macs", "widths")}}
            entry[name]["during_run"] = during.get(name)
            models.append(model_from_checkpoint(load_checkpoint(run / snap["checkpoint"]))[0])
        entries.append(entry)
    times = measure(models, resolution, batch=args.batch, threads=args.threads, warmup=args.warmup,
                    repeats=args.repeats)
    it = iter(times)
    for entry in entries:
        for name in SNAPSHOTS:
            entry[name]["ort_ms"] = round(next(it), 3)
        entry["student"]["speedup"] = round(entry["baseline"]["ort_ms"] / entry["student"]["ort_ms"], 3)
    out = {"runs": entries, "batch": args.batch, "threads": args.threads, "repeats": args.repeats,
           "warmup": args.warmup, "cpu": cpu_model(), "load_avg_1min_at_start": round(load_start, 2),
           "load_avg_1min_at_end": round(os.getloadavg()[0], 2)}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for e in entries:
        s, b = e["student"], e["baseline"]
        print(f"{e['run']}: student {s['test_acc']}% test, {s['ort_ms']} ms ({s['speedup']}x the baseline's "
              f"{b['ort_ms']} ms), {s['macs'] / 1e6:.2f} M MACs, round_to {e['round_to']}")


if __name__ == "__main__":
    main()
