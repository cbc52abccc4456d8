"""The run report: the paper's comparison for one run, from the manifest alone.

    <run>/report.json        baseline, fixed_lr, one_cycle, ensemble, student (val_acc, params,
                             nonzero_params, macs), snapshots (the registry), timings (s per stage)
    <run>/report.md          the paper-style table plus the per-iteration chain
    <run>/accuracy_vs_macs.png
    <run>/tensorboard/report summary scalars per iteration (chain, fixed arm, every branch)

`run_root` may be a storage URI (`kesi_dist.storage`): files are written there atomically, the
TensorBoard summary is staged locally and uploaded.

Rows (as in KESI's Table 1): "fixed LR" is the comparison arm's last snapshot (conventional
fine-tuning), "one-cycle" the last snapshot of the one-cycle chain before distillation, "KESI" the
distilled student, which has the one-cycle snapshot's architecture.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from kesi_dist import storage

__all__ = ["build_report", "write_report"]

_SIZE_KEYS = ("val_acc", "params", "nonzero_params", "macs")


def _row(entry: dict | None, **extra: Any) -> dict | None:
    if entry is None:
        return None
    return {**{k: entry.get(k) for k in _SIZE_KEYS}, "snapshot": entry.get("name"), **extra}


def build_report(manifest: dict) -> dict:
    """The report dict for a manifest (complete or not: missing rows are None)."""
    snaps: dict[str, dict] = manifest["snapshots"]
    stages: dict[str, dict] = manifest["stages"]
    iterations = sorted(int(k.split("_")[1]) for k in stages if k.startswith("prune_") and stages[k].get("chosen"))
    last = iterations[-1] if iterations else None
    chosen = stages[f"prune_{last}"]["chosen"] if last else None
    fixed = stages[f"prune_{last}"].get("fixed") if last else None
    ens = stages.get("ensemble", {})
    ensemble = None
    if ens.get("status") == "complete":
        members = [snaps[n] for n in ens["teachers"]]
        ensemble = {"val_acc": ens["acc"], "params": sum(m["params"] for m in members),
                    "nonzero_params": sum(m["nonzero_params"] for m in members),
                    "macs": sum(m["macs"] for m in members), "teachers": ens["teachers"]}
    chain = [{"iteration": 0, "snapshot": "baseline", **_row(snaps["baseline"])}] if "baseline" in snaps else []
    for k in iterations:
        st = stages[f"prune_{k}"]
        row = {"iteration": k, **_row(snaps[st["chosen"]])}
        if st.get("fixed"):
            row["fixed_lr_val_acc"] = snaps[st["fixed"]]["val_acc"]
        chain.append(row)
    timings = {name: round(st["end"] - st["start"], 2) for name, st in stages.items()
               if st.get("status") == "complete" and "end" in st and "start" in st}
    return {
        "status": manifest.get("status"),
        "baseline": _row(snaps.get("baseline")),
        "fixed_lr": _row(snaps.get(fixed) if fixed else None),
        "one_cycle": _row(snaps.get(chosen) if chosen else None),
        "ensemble": ensemble,
        "student": _row(snaps.get("student")),
        "chain": chain,
        "snapshots": list(snaps.values()),
        "timings": timings,
    }


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _markdown(report: dict, title: str) -> str:
    base = report["baseline"]
    lines = [f"# {title}", "", f"Run status: {report['status']}", "",
             "| | top-1 (%) | params (M) | nonzero params (M) | MACs (M) | MACs reduction |",
             "|---|---|---|---|---|---|"]
    for label, key in (("baseline", "baseline"), ("pruned + fixed LR", "fixed_lr"),
                       ("pruned + one-cycle", "one_cycle"), ("ensemble of snapshots", "ensemble"),
                       ("pruned + KESI (student)", "student")):
        r = report.get(key)
        if r is None:
            lines.append(f"| {label} | – | – | – | – | – |")
            continue
        red = "–" if not base or key == "ensemble" else f"{100 * (1 - r['macs'] / base['macs']):.1f} %"
        lines.append(f"| {label} | {_pct(r['val_acc'])} | {r['params'] / 1e6:.3f} | "
                     f"{r['nonzero_params'] / 1e6:.3f} | {r['macs'] / 1e6:.1f} | {red} |")
    if report.get("ensemble"):
        lines += ["", f"Ensemble: {len(report['ensemble']['teachers'])} teachers "
                      f"({', '.join(report['ensemble']['teachers'])}); its params/MACs are the sum over members."]
    lines += ["", "## Chain", "", "| iteration | snapshot | top-1 one-cycle (%) | top-1 fixed LR (%) | params (M) | MACs (M) |",
              "|---|---|---|---|---|---|"]
    for r in report["chain"]:
        lines.append(f"| {r['iteration']} | {r['snapshot']} | {_pct(r['val_acc'])} | "
                     f"{_pct(r.get('fixed_lr_val_acc'))} | {r['params'] / 1e6:.3f} | {r['macs'] / 1e6:.1f} |")
    if report["timings"]:
        lines += ["", "## Timings (s)", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in report["timings"].items()]
    return "\n".join(lines) + "\n"


def _plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    snaps = [s for s in report["snapshots"] if s.get("val_acc") is not None and not s["name"].endswith("_init")]
    for arm, marker, color in (("onecycle", "o", "tab:blue"), ("fixed", "s", "tab:orange")):
        pts = [s for s in snaps if s.get("arm") == arm]
        if pts:
            ax.scatter([s["macs"] / 1e6 for s in pts], [100 * s["val_acc"] for s in pts], marker=marker,
                       color=color, alpha=0.6, label=f"{'one-cycle branches' if arm == 'onecycle' else 'fixed-LR arm'}")
    chain = report["chain"]
    if chain:
        ax.plot([r["macs"] / 1e6 for r in chain], [100 * r["val_acc"] for r in chain], "-", color="tab:blue",
                alpha=0.8, label="chosen chain")
    if report["baseline"]:
        b = report["baseline"]
        ax.scatter([b["macs"] / 1e6], [100 * b["val_acc"]], marker="D", color="black", s=60, label="baseline", zorder=3)
    if report["ensemble"] and report["student"]:
        # The ensemble's cost is the sum of its members; drawn at the student's MACs with a note instead
        # would hide that, so it is a horizontal reference line.
        ax.axhline(100 * report["ensemble"]["val_acc"], color="tab:green", linestyle="--",
                   label=f"ensemble ({len(report['ensemble']['teachers'])} teachers)")
    if report["student"]:
        s = report["student"]
        ax.scatter([s["macs"] / 1e6], [100 * s["val_acc"]], marker="*", color="tab:red", s=200,
                   label="KESI student", zorder=4)
    ax.set_xlabel("MACs (M)")
    ax.set_ylabel("validation top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    storage.write_bytes(path, buf.getvalue())


def _tensorboard(report: dict, logdir: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with storage.staged_dir(logdir) as local, SummaryWriter(local) as w:
        for r in report["chain"]:
            w.add_scalar("chain/val_acc", r["val_acc"], r["iteration"])
            w.add_scalar("chain/macs", r["macs"], r["iteration"])
            w.add_scalar("chain/params", r["params"], r["iteration"])
            if r.get("fixed_lr_val_acc") is not None:
                w.add_scalar("fixed_lr/val_acc", r["fixed_lr_val_acc"], r["iteration"])
        for key in ("ensemble", "student", "baseline"):
            if report.get(key):
                w.add_scalar(f"{key}/val_acc", report[key]["val_acc"], 0)


def write_report(run_root: str | Path, manifest: dict, title: str) -> dict:
    """Write report.json, report.md, accuracy_vs_macs.png and TensorBoard summaries; return the report."""
    root = run_root if storage.is_uri(run_root) else str(run_root)
    report = build_report(manifest)
    storage.write_text(storage.join(root, "report.json"), json.dumps(report, indent=1))
    storage.write_text(storage.join(root, "report.md"), _markdown(report, title))
    _plot(report, storage.join(root, "accuracy_vs_macs.png"))
    _tensorboard(report, storage.join(root, "tensorboard", "report"))
    return report
