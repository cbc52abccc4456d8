"""KESI's report: the rows of the paper's Table 1 for one run, built from the manifest alone.

"fixed LR" is the comparison arm's last snapshot (conventional fine-tuning), "one-cycle" the last
snapshot of the chosen chain before distillation, "KESI" the distilled student, which has the
one-cycle snapshot's architecture. The chain is the chosen snapshot of every iteration.
"""

from __future__ import annotations

from kesi_dist.report import ReportLayout, latency_entry, size_row

__all__ = ["build_report", "layout", "teacher_lines"]


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
    chain = [{"iteration": 0, "snapshot": "baseline", **size_row(snaps["baseline"])}] if "baseline" in snaps else []
    for k in iterations:
        st = stages[f"prune_{k}"]
        row = {"iteration": k, **size_row(snaps[st["chosen"]])}
        if st.get("fixed"):
            row["fixed_lr_val_acc"] = snaps[st["fixed"]]["val_acc"]
        chain.append(row)
    timings = {name: round(st["end"] - st["start"], 2) for name, st in stages.items()
               if st.get("status") == "complete" and "end" in st and "start" in st}
    return {
        "status": manifest.get("status"),
        "baseline": size_row(snaps.get("baseline")),
        "fixed_lr": size_row(snaps.get(fixed) if fixed else None),
        "one_cycle": size_row(snaps.get(chosen) if chosen else None),
        "ensemble": ensemble,
        "student": size_row(snaps.get("student")),
        "chain": chain,
        "snapshots": list(snaps.values()),
        "timings": timings,
        **latency_entry(stages),
    }


def teacher_lines(report: dict) -> list[str]:
    """The model card's teachers: the ensemble the student was distilled from."""
    ens = report.get("ensemble")
    if not ens:
        return ["No ensemble stage completed (distillation off or the run stopped early)."]
    members = {s["name"]: s for s in report.get("snapshots", [])}
    lines = [f"The student was distilled from {len(ens['teachers'])} teachers (ensemble top-1 {_pct(ens['val_acc'])}):",
             ""]
    for t in ens["teachers"]:
        m = members.get(t, {})
        lines.append(f"- `{t}`: top-1 {_pct(m.get('val_acc'))}, {_m(m.get('params'))} params, "
                     f"{(m.get('macs') or 0) / 1e6:.1f} M MACs")
    return lines


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.2f} %"


def _m(x) -> str:
    return "–" if x is None else f"{x / 1e6:.3f} M"


def layout(cfg) -> ReportLayout:
    """How KESI's report reads for config `cfg` (the root Config)."""
    p = cfg.method.prune
    what = f"{cfg.model.arch} pruned with {p.method.upper()} x{p.iterations}"
    return ReportLayout(
        title=f"{cfg.model.arch} · {p.method} x{p.iterations} · {cfg.data.source}",
        rows=(("baseline", "baseline", "baseline"), ("pruned + fixed LR", "fixed_lr", "fixed LR"),
              ("pruned + one-cycle", "one_cycle", "one-cycle"), ("ensemble of snapshots", "ensemble", "ensemble"),
              ("pruned + KESI (student)", "student", "KESI student")),
        deliverables=("student", "one_cycle"),
        card_titles={"student": f"{what} + KESI ensemble distillation", "one_cycle": what},
        arms={"onecycle": "one-cycle branches", "fixed": "fixed-LR arm"},
        chain_acc_label="top-1 one-cycle (%)",
        chain_extra=(("top-1 fixed LR (%)", "fixed_lr_val_acc", "fixed_lr/val_acc"),),
        teachers=teacher_lines,
    )
