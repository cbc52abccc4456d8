"""The report stage: write a method's report (report.json/md, plot, TensorBoard) and MODEL_CARD.md, and
print its rows."""

from __future__ import annotations

from kesi_dist.report import ReportLayout, int8_entry, protocol, write_report
from kesi_dist.runs import RunContext

__all__ = ["report_stage"]


def report_stage(ctx: RunContext, report: dict, layout: ReportLayout) -> None:
    """`report` (the method's rows) gains the run's evaluation protocol (`kesi_dist.report.protocol`) and, when
    its quantize stage ran, the int8 model's entry (`kesi_dist.report.int8_entry`)."""
    from kesi_dist.model_card import write_model_card

    report = {**report, "protocol": protocol(ctx.manifest.data), **int8_entry(ctx.manifest.stages)}
    write_report(ctx.run.root, report, layout)
    write_model_card(ctx.run.root, ctx.manifest.data, report, layout, ctx.run.config)
    base = report.get("baseline")
    width = max(len(c) for _, _, c in layout.rows)
    for _, key, label in layout.rows:
        r = report.get(key)
        if r:
            red = "" if key == "ensemble" or not base else f", {100 * (1 - r['macs'] / base['macs']):.1f}% fewer MACs"
            ctx.print(f"  {label:>{width}}: {100 * r['val_acc']:.2f}%  ({r['params'] / 1e6:.3f} M params{red})")
