"""EKG's report, built from the manifest alone: the three fine-tuning arms at (about) equal MACs, the
search's trajectory and the memory bank's teachers.

    ekg          the searched sub-network fine-tuned with the memory bank's curriculum loss ("student")
    ce_finetune  the same sub-network fine-tuned with CE only: EKG vs this is what the bank is worth
    uniform      every unit pruned by the same ratio (L1) to the same MACs, CE: CE fine-tune vs this is
                 what the search is worth
"""

from __future__ import annotations

from kesi_dist.budget import recorded_budget, reached, search_fields
from kesi_dist.fields import get_field
from kesi_dist.report import ReportLayout, latency_entry, size_row

__all__ = ["build_report", "layout", "sections", "status_detail", "teacher_lines"]


def build_report(manifest: dict) -> dict:
    """The report dict for a manifest (complete or not: missing rows are None)."""
    snaps: dict[str, dict] = manifest["snapshots"]
    stages: dict[str, dict] = manifest["stages"]
    search = stages.get("search", {})
    bank = stages.get("memory_bank", {})
    timings = {name: round(st["end"] - st["start"], 2) for name, st in stages.items()
               if st.get("status") == "complete" and "end" in st and "start" in st}
    return {
        "method": "ekg",
        "status": manifest.get("status"),
        "baseline": size_row(snaps.get("baseline")),
        "ekg": size_row(snaps.get("student")),
        "ce_finetune": size_row(snaps.get("ce_finetune")),
        "uniform": size_row(snaps.get("uniform")),
        "search": {
            **search_fields(search),
            "widths": search.get("widths"), "holdout_images": search.get("holdout"),
            "resumed_from": search.get("resumed_from"), "original_loss": search.get("original_loss"),
            "steps": [{k: s[k] for k in ("step", "unit", "widths", "macs", "macs_ratio", "holdout_loss", "score",
                                         "candidates", "actors")} for s in search.get("steps") or []],
        },
        "teachers": [{k: t[k] for k in ("step", "widths", "macs", "holdout_loss")} for t in search.get("teachers") or []],
        "memory_bank": {k: bank.get(k) for k in ("samples", "reused", "actors")} if bank else None,
        "test_images": stages.get("data", {}).get("val_size"),
        "chain": [],
        "snapshots": list(snaps.values()),
        "timings": timings,
        **latency_entry(stages),
    }


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def sections(report: dict) -> list[str]:
    """report.md's EKG part: what the arms say, the search and the teachers."""
    lines: list[str] = []
    e, ce, u = report.get("ekg"), report.get("ce_finetune"), report.get("uniform")
    held = (report.get("protocol") or {}).get("holdout_size") or 0
    if e and ce and u:
        val = report.get("test_images")
        lines += ["", "## What the arms say", "",
                  f"- memory bank vs CE on the same searched net: {100 * (e['val_acc'] - ce['val_acc']):+.2f} points",
                  f"- searched vs uniform widths, both CE: {100 * (ce['val_acc'] - u['val_acc']):+.2f} points "
                  f"(MACs {u['macs'] / 1e6:.2f} M uniform vs {ce['macs'] / 1e6:.2f} M searched)"]
        if val:
            lines.append(f"- one test image is {100 / val:.2f} points on this test split")
    s = report.get("search") or {}
    if s.get("steps"):
        lines += ["", "## Search", "",
                  f"{len(s['steps'])} accepted steps on {s.get('holdout_images') or held} held-out images, "
                  f"to {reached(s)}"
                  + (f"; resumed after step {s['resumed_from']} of a stopped run" if s.get("resumed_from") else "")
                  + ". Plot: `search.png`; TensorBoard: `tensorboard/search`.", "",
                  "| step | unit narrowed | MACs (%) | holdout CE | score | candidates | actors |", "|---|---|---|---|---|---|---|"]
        for r in s["steps"]:
            lines.append(f"| {r['step']} | {r['unit']} | {100 * r['macs_ratio']:.1f} | {r['holdout_loss']:.4f} | "
                         f"{r['score']:.4f} | {r['candidates']} | {len(r['actors'])} |")
    if report.get("teachers"):
        lines += ["", "## Memory-bank teachers", "",
                  "Interim sub-networks of the search (weights of the baseline, not trained), spread evenly in holdout "
                  "loss; teacher 0 is the best, the curriculum's anchor.", "",
                  "| teacher | step | MACs (M) | holdout CE |", "|---|---|---|---|"]
        for j, t in enumerate(report["teachers"]):
            lines.append(f"| {j} | {t['step']} | {t['macs'] / 1e6:.2f} | {t['holdout_loss']:.4f} |")
    return lines


def status_detail(stage: str, record: dict, config: dict) -> str | None:
    """`kesi status`'s line for the search stage: its accepted steps, MACs and the budget's own ratio
    against the target (every field checked: `kesi_dist.fields.FieldError` names a damaged one)."""
    steps = get_field(record, "steps", list, f"stages.{stage}", required=False) if stage == "search" else None
    if not steps:
        return None
    where = "stages.search.steps[-1]"
    last = get_field({"steps[-1]": steps[-1]}, "steps[-1]", dict, "stages.search")
    macs, ratio = get_field(last, "macs_ratio", float, where), get_field(last, "budget_ratio", float, where, False)
    budget = recorded_budget(record, "stages.search")
    line = f"{len(steps)} steps, MACs {100 * macs:.1f}%"
    return line if budget is None else f"{line}{budget[0].besides_macs(ratio)} ({budget[0].target_words(budget[1])})"


def teacher_lines(report: dict) -> list[str]:
    """The model card's teachers: the memory bank's interim sub-networks."""
    if not report.get("teachers"):
        return ["No memory bank was built (the run stopped before it)."]
    lines = [f"The student was fine-tuned from a memory bank of {len(report['teachers'])} interim sub-networks of "
             "the search (the baseline's weights, not trained; their logits on the clean training images), "
             "with the curriculum loss:", ""]
    for j, t in enumerate(report["teachers"]):
        lines.append(f"- teacher {j}: search step {t['step']}, {t['macs'] / 1e6:.1f} M MACs, holdout CE "
                     f"{t['holdout_loss']:.4f}")
    return lines


def layout(cfg) -> ReportLayout:
    """How EKG's report reads for config `cfg` (the root Config)."""
    b = cfg.method.budget()
    what = f"{cfg.model.arch} searched by EKG to {b.label}"
    return ReportLayout(
        title=f"{cfg.model.arch} · EKG to {b.label.replace(' of its ', ' ')} · {cfg.data.source}",
        rows=(("baseline", "baseline", "baseline"), ("EKG: searched + memory-bank fine-tune", "ekg", "EKG"),
              ("searched + CE fine-tune", "ce_finetune", "CE fine-tune"),
              (f"uniform L1 + CE fine-tune (equal {b.short})", "uniform", "uniform")),
        deliverables=("ekg", "ce_finetune"),
        card_titles={"ekg": f"{what} + memory-bank fine-tuning", "ce_finetune": f"{what}, CE fine-tuning"},
        arms={"ekg": "EKG", "ce_finetune": "CE fine-tune", "uniform": "uniform"},
        sections=sections,
        teachers=teacher_lines,
    )
