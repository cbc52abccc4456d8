"""The run report, rendered from rows a method gives: report.json, report.md, the plot, TensorBoard.

    <run>/report.json        the method's report dict (rows such as baseline / student with val_acc,
                             params, nonzero_params, macs; the chain; every snapshot; timings)
    <run>/report.md          the method's table, its chain and the stage timings
    <run>/accuracy_vs_macs.png
    <run>/tensorboard/report summary scalars per chain step, the plot, widths and the config as text, and
                             an hparams entry per snapshot

What the rows are and what they are called is the method's (`ReportLayout`, e.g.
`kesi_dist.methods.kesi.report`); this module only renders. `run_root` may be a storage URI
(`kesi_dist.storage`): files are written there atomically, the TensorBoard summary is staged locally.

A report dict has: "status", one entry per row key (None when missing), "ensemble" (optional: val_acc,
params/MACs summed over "teachers"), "chain" (rows with iteration, snapshot, val_acc, params, macs and the
layout's `chain_extra` keys), "snapshots" (the registry), "timings" (seconds per stage), and "protocol"
(which split selected and which is reported, `protocol`). `val_acc` is always the test split's
accuracy (measured once per snapshot); `holdout_acc` the selection split's, when the run has one.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kesi_dist import storage
from kesi_dist.latency_table import threads_text

__all__ = ["ReportLayout", "size_row", "protocol", "protocol_line", "write_report", "render_markdown", "latency_entry",
           "latency_lines", "int8_entry", "int8_lines", "save_figure"]

SIZE_KEYS = ("val_acc", "holdout_acc", "params", "nonzero_params", "macs")


@dataclass(frozen=True)
class ReportLayout:
    """How a method's report reads.

    rows: (table label, report key, console label) in table order.
    deliverables: report keys of the shipped model, first present wins (e.g. the student, else the
        last snapshot when distillation was off); the model card describes it.
    card_titles: report key -> the model card's title for that deliverable.
    arms: snapshot arm -> legend label; those arms' snapshots are scattered in the plot.
    chain_acc_label: the chain table's accuracy column; chain_extra: (column label, chain key,
        TensorBoard tag) of further chain columns.
    sections: report -> the method's own report.md lines after the table (a search's steps, ...).
    teachers: report -> the model card's "Teachers" section (None: the method has no teachers).
    """

    title: str
    rows: tuple[tuple[str, str, str], ...]
    deliverables: tuple[str, ...]
    card_titles: dict[str, str] = field(default_factory=dict)
    arms: dict[str, str] = field(default_factory=dict)
    chain_acc_label: str = "top-1 (%)"
    chain_extra: tuple[tuple[str, str, str], ...] = ()
    sections: Callable[[dict], list[str]] | None = None
    teachers: Callable[[dict], list[str]] | None = None

    def deliverable(self, report: dict) -> str | None:
        return next((k for k in self.deliverables if report.get(k)), None)


def size_row(entry: dict | None, **extra) -> dict | None:
    """A report row from a registry entry: accuracy, size and the snapshot's name."""
    if entry is None:
        return None
    return {**{k: entry.get(k) for k in SIZE_KEYS}, "snapshot": entry.get("name"), **extra}


def protocol(manifest: dict) -> dict:
    """How a run chose and what it reports: {selection: "holdout" | "test", holdout_size, reported_on}."""
    held = (manifest.get("stages", {}).get("data", {}).get("holdout") or {})
    size = int(held.get("size") or 0)
    return {"selection": "holdout" if size else "test", "holdout_size": size, "reported_on": "test",
            **({"holdout": held["holdout"], "holdout_sha256": held["sha256"]} if size else {})}


def protocol_line(report: dict) -> str:
    """One sentence for report.md and MODEL_CARD.md."""
    p = report.get("protocol") or {"selection": "test"}
    if p["selection"] == "holdout":
        return (f"Every choice the method made (branches, early stops, teachers, search steps) was made on "
                f"{p['holdout_size']} training images held out from training (`data.holdout`); every top-1 here is "
                "on the test split, measured once per snapshot.")
    return ("Selection used the test split (`data.holdout: 0`): the rows chosen by accuracy are optimistic, "
            "since the split they were chosen on is the one reported.")


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def latency_entry(stages: dict) -> dict:
    """`{"latency": ...}` for a report when the run's latency stage is complete, else `{}`."""
    lat = stages.get("latency", {})
    if lat.get("status") != "complete":
        return {}
    return {"latency": {k: lat[k] for k in ("batch", "threads", "table", "table_cpu", "cpu", "rows")}}


def latency_lines(report: dict) -> list[str]:
    """The latency budget's section: predicted (the table) and measured onnxruntime ms per snapshot."""
    lat = report.get("latency")
    if not lat:
        return []
    lines = ["", "## Latency (onnxruntime)", "",
             f"Batch {lat['batch']}, {threads_text(lat['threads'])}; predicted by `{lat['table']}` (profiled on "
             f"{lat['table_cpu']}), measured after the run on {lat['cpu']}.", "",
             "| snapshot | predicted (ms) | measured (ms) | measured speed-up |", "|---|---|---|---|"]
    base = lat["rows"].get("baseline", {}).get("measured_ms")
    for name, r in lat["rows"].items():
        speed = f"{base / r['measured_ms']:.2f}x" if base else "–"
        lines.append(f"| {name} | {r['predicted_ms']:.2f} | {r['measured_ms']:.2f} | {speed} |")
    return lines


def int8_entry(stages: dict) -> dict:
    """`{"int8": ...}` for a report when the run's quantize stage is complete, else `{}`."""
    q = stages.get("quantize", {})
    if q.get("status") != "complete":
        return {}
    return {"int8": {k: q[k] for k in ("snapshot", "file", "fp32_acc", "int8_acc", "test_images", "bytes",
                                       "calibration", "latency")}}


def int8_lines(report: dict, heading: str = "##") -> list[str]:
    """The quantize stage's section: the int8 model's test top-1, size and onnxruntime latency next to
    the fp32 model's."""
    q = report.get("int8")
    if not q:
        return []
    lat, cal, size = q["latency"], q["calibration"], q["bytes"]
    drop = 100 * (q["int8_acc"] - q["fp32_acc"])
    return ["", f"{heading} INT8 (onnxruntime)", "",
            f"`{q['file']}`: `{q['snapshot']}` quantized by onnxruntime (static, QDQ, per-channel 7-bit int8 weights, "
            f"uint8 activations), calibrated ({cal['method']}) on {cal['images']} held-out training images, never the "
            f"test split. Top-1 on all {q['test_images']} test images, both ONNX models in onnxruntime ({drop:+.2f} "
            f"points); latency at batch {lat['batch']}, {threads_text(lat['threads'])}, the two models interleaved, "
            f"measured after the run on {lat['cpu']}.", "",
            "| model | top-1 test (%) | size (KB) | latency (ms) | speed-up |", "|---|---|---|---|---|",
            f"| fp32 | {_pct(q['fp32_acc'])} | {size['fp32'] / 1024:.1f} | {lat['fp32_ms']:.2f} | 1.00x |",
            f"| int8 | {_pct(q['int8_acc'])} | {size['int8'] / 1024:.1f} | {lat['int8_ms']:.2f} | "
            f"{lat['fp32_ms'] / lat['int8_ms']:.2f}x |"]


def render_markdown(report: dict, layout: ReportLayout) -> str:
    base = report.get("baseline")
    lines = [f"# {layout.title}", "", f"Run status: {report['status']}", "", protocol_line(report), "",
             "| | top-1 test (%) | top-1 holdout (%) | params (M) | nonzero params (M) | MACs (M) | MACs reduction |",
             "|---|---|---|---|---|---|---|"]
    for label, key, _ in layout.rows:
        r = report.get(key)
        if r is None:
            lines.append(f"| {label} | – | – | – | – | – | – |")
            continue
        red = "–" if not base or key == "ensemble" else f"{100 * (1 - r['macs'] / base['macs']):.1f} %"
        lines.append(f"| {label} | {_pct(r['val_acc'])} | {_pct(r.get('holdout_acc'))} | {r['params'] / 1e6:.3f} | "
                     f"{r['nonzero_params'] / 1e6:.3f} | {r['macs'] / 1e6:.1f} | {red} |")
    if report.get("ensemble"):
        lines += ["", f"Ensemble: {len(report['ensemble']['teachers'])} teachers "
                      f"({', '.join(report['ensemble']['teachers'])}); its params/MACs are the sum over members."]
    if layout.sections is not None:
        lines += layout.sections(report)
    lines += latency_lines(report)
    lines += int8_lines(report)
    extra = layout.chain_extra
    if report.get("chain"):
        lines += ["", "## Chain", "", "| iteration | snapshot | " + " | ".join([layout.chain_acc_label, *(e[0] for e in extra)])
                  + " | params (M) | MACs (M) |", "|---|---|---|" + "---|" * len(extra) + "---|---|"]
    for r in report.get("chain") or []:
        cols = [_pct(r["val_acc"]), *(_pct(r.get(e[1])) for e in extra)]
        lines.append(f"| {r['iteration']} | {r['snapshot']} | {' | '.join(cols)} | {r['params'] / 1e6:.3f} | "
                     f"{r['macs'] / 1e6:.1f} |")
    if report["timings"]:
        lines += ["", "## Timings (s)", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in report["timings"].items()]
    return "\n".join(lines) + "\n"


def save_figure(fig, path: str) -> bytes:
    """Write a matplotlib figure as a PNG to `path` (a local path or storage URI, atomically), close it and
    return the PNG's bytes."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    storage.write_bytes(path, buf.getvalue())
    return buf.getvalue()


def _plot(report: dict, layout: ReportLayout, path: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    snaps = [s for s in report["snapshots"] if s.get("val_acc") is not None and not s["name"].endswith("_init")]
    styles = [("o", "tab:blue"), ("s", "tab:orange"), ("^", "tab:purple"), ("v", "tab:brown")]
    for (arm, label), (marker, color) in zip(layout.arms.items(), styles):
        pts = [s for s in snaps if s.get("arm") == arm]
        if pts:
            ax.scatter([s["macs"] / 1e6 for s in pts], [100 * s["val_acc"] for s in pts], marker=marker,
                       color=color, alpha=0.6, label=label)
    chain = report.get("chain")
    if chain:
        ax.plot([r["macs"] / 1e6 for r in chain], [100 * r["val_acc"] for r in chain], "-", color="tab:blue",
                alpha=0.8, label="chosen chain")
    if report.get("baseline"):
        b = report["baseline"]
        ax.scatter([b["macs"] / 1e6], [100 * b["val_acc"]], marker="D", color="black", s=60, label="baseline", zorder=3)
    final = layout.deliverable(report)
    if report.get("ensemble") and final:
        # The ensemble's cost is the sum of its members; drawn at the student's MACs with a note instead
        # would hide that, so it is a horizontal reference line.
        ax.axhline(100 * report["ensemble"]["val_acc"], color="tab:green", linestyle="--",
                   label=f"ensemble ({len(report['ensemble']['teachers'])} teachers)")
    if final:
        s = report[final]
        label = next((c for _, k, c in layout.rows if k == final), final)
        ax.scatter([s["macs"] / 1e6], [100 * s["val_acc"]], marker="*", color="tab:red", s=200, label=label,
                   zorder=4)
    ax.set_xlabel("MACs (M)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(layout.title)
    for r in chain or []:  # which point is which iteration
        ax.annotate(str(r["iteration"]), (r["macs"] / 1e6, 100 * r["val_acc"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7, color="tab:blue")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)


def _scalar(v) -> bool:
    return isinstance(v, (int, float, str, bool)) and not (isinstance(v, float) and v != v)


def _tensorboard(report: dict, layout: ReportLayout, logdir: str, png: bytes, config_text: str | None) -> None:
    """The report run: chain scalars, the plot as an image, widths and the resolved config as text, and
    one hparams entry per snapshot (its hyper-parameters; accuracy, params and MACs as metrics), so the
    HPARAMS tab compares every model of the run."""
    import numpy as np
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    with storage.staged_dir(logdir) as local, SummaryWriter(local) as w:
        for r in report.get("chain") or []:
            w.add_scalar("chain/val_acc", r["val_acc"], r["iteration"])
            w.add_scalar("chain/macs", r["macs"], r["iteration"])
            w.add_scalar("chain/params", r["params"], r["iteration"])
            for _, key, tag in layout.chain_extra:
                if r.get(key) is not None:
                    w.add_scalar(tag, r[key], r["iteration"])
        for key in ("ensemble", *layout.deliverables[:1], "baseline"):
            if report.get(key):
                w.add_scalar(f"{key}/val_acc", report[key]["val_acc"], 0)
        w.add_image("accuracy_vs_macs", np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), 0, dataformats="HWC")
        rows = ["| snapshot | arm | widths | params | MACs | top-1 test (%) |", "|---|---|---|---|---|---|"]
        rows += [f"| {s['name']} | {s.get('arm', '')} | {s.get('widths')} | {s['params']} | {s['macs']} | "
                 f"{_pct(s.get('val_acc'))} |" for s in report.get("snapshots", [])]
        w.add_text("snapshots/widths", "\n".join(rows), 0)
        if config_text:
            w.add_text("config", "```yaml\n" + config_text + "\n```", 0)
        for snap in report.get("snapshots", []):
            if snap.get("val_acc") is None:
                continue
            hp = {"snapshot": snap["name"], "arm": snap.get("arm") or "", "iteration": snap.get("iteration") or 0,
                  **{k: v for k, v in (snap.get("hparams") or {}).items() if _scalar(v)}}
            metrics = {f"hparam/{k}": float(snap[k]) for k in ("val_acc", "holdout_acc", "params", "macs")
                       if snap.get(k) is not None}
            w.add_hparams(hp, metrics, run_name=f"hparams/{snap['name']}")


def write_report(run_root: str | Path, report: dict, layout: ReportLayout) -> None:
    """Write report.json, report.md, accuracy_vs_macs.png and TensorBoard summaries of `report`."""
    root = run_root if storage.is_uri(run_root) else str(run_root)
    storage.write_text(storage.join(root, "report.json"), json.dumps(report, indent=1))
    storage.write_text(storage.join(root, "report.md"), render_markdown(report, layout))
    png = _plot(report, layout, storage.join(root, "accuracy_vs_macs.png"))
    config = storage.join(root, "config.yaml")
    _tensorboard(report, layout, storage.join(root, "tensorboard", "report"), png,
                 storage.read_text(config) if storage.is_file(config) else None)
